"""The toy world's quality targets, measured with the attribute reader on the test split.

* **text-to-image**: the caption as prompt; each attribute of the generation vs the caption's.
* **image prompt alone**: empty text, scale 1.0; each attribute vs the reference's. Compared with
  **unconditional** generation (empty text, no adapter) scored against the same references: the rate a
  generation matches a reference by chance.
* **image + text**: the reference plus a short text that changes one attribute (``"<colour> background"``
  or ``"a <colour> <reference's shape>"``); the changed attribute should follow the text and the
  others the reference, at several adapter scales (the trade-off between the two).

Targets: text-to-image and image-only colour and background >= 90%, shape >= 80%; multimodal each
>= 75%. Generations use the model's own scheduler (DPM-Solver++), ``steps`` steps, a fixed seed per
sample; text-to-image and unconditional generations are batched through the pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import shapes
from .judge import accuracy, edit_accuracy, edit_plan, read_many
from .shapes import Attributes

TARGETS = {
    "text_to_image": {"color": 0.9, "background": 0.9, "shape": 0.8},
    "image_only": {"color": 0.9, "background": 0.9, "shape": 0.8},
    "multimodal": 0.75,
}


def load(pipeline: str | Path, adapter_file: str | Path | None):
    """The toy pipeline, its image encoder and (optionally) the adapter, attached."""
    from ..adapter.attach import attach
    from ..adapter.checkpoint import load_adapter
    from ..encoding import ImageEncoder
    from ..generation.pipelines import load_pipeline

    pipe = load_pipeline(pipeline)
    encoder = ImageEncoder.from_pretrained(Path(pipeline) / "image_encoder")
    attachment = attach(pipe.unet, load_adapter(adapter_file)) if adapter_file else None
    return pipe, encoder, attachment


def _as_arrays(images) -> list[np.ndarray]:
    return [np.asarray(i.convert("RGB")) if isinstance(i, Image.Image) else (np.asarray(i) * 255).round().astype(np.uint8)
            for i in images]


@torch.no_grad()
def text_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
               batch: int = 50) -> list[np.ndarray]:
    """Text-to-image for many prompts, ``batch`` at a time, one seeded generator per image."""
    out = []
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompt=list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        out += _as_arrays(images)
    return out


@torch.no_grad()
def image_prompted(pipe, attachment, encoder, references: Sequence[Image.Image], texts: Sequence[str],
                   seeds: Sequence[int], steps: int, guidance: float, scale: float) -> list[np.ndarray]:
    from ..generation.generate import GenerationSettings, generate
    from ..generation.prompts import ImagePrompt

    out = []
    for reference, text, seed in zip(references, texts, seeds):
        settings = GenerationSettings(prompt=text, steps=steps, guidance=guidance, seed=seed)
        out += _as_arrays(generate(pipe, attachment, settings, [ImagePrompt([reference], scale=scale)], [encoder]))
    return out


def _score(images: Sequence[np.ndarray], truth: Sequence[Attributes]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in accuracy(read_many(list(images)), list(truth)).items()}


def measure(pipeline: str | Path, adapter_file: str | Path | None, test_folder: str | Path, n: int = 200,
            steps: int = 20, guidance: float = 3.0, scales: Sequence[float] = (0.5, 0.7, 1.0),
            progress: bool = True, multimodal_n: int | None = None, parts: Sequence[str] = ("text_to_image", "unconditional", "image_only", "multimodal")) -> dict:
    """All quality numbers on the first ``n`` test samples; a JSON-ready dict."""
    rows = shapes.read_metadata(test_folder)[:n]
    folder = Path(test_folder)
    references = [Image.open(folder / name).convert("RGB") for name, _, _ in rows]
    captions = [c for _, c, _ in rows]
    truth = [a for _, _, a in rows]
    seeds = list(range(len(rows)))
    pipe, encoder, attachment = load(pipeline, adapter_file)
    report: dict = {"n": len(rows), "steps": steps, "guidance": guidance, "targets": TARGETS}

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        if progress:
            print(f"[toy quality] {name}: {json.dumps(value)}", flush=True)
        return value

    if attachment is not None:
        attachment.detach()  # text-only parts run on the plain UNet
    if "text_to_image" in parts:
        report["text_to_image"] = timed("text_to_image", lambda: _score(text_batch(pipe, captions, seeds, steps, guidance), truth))
    if "unconditional" in parts:
        report["unconditional"] = timed("unconditional", lambda: _score(text_batch(pipe, [""] * len(rows), seeds, steps, 1.0), truth))
    if attachment is None:
        return report
    from ..adapter.attach import attach

    attachment = attach(pipe.unet, attachment.adapters)
    try:
        if "image_only" in parts:
            report["image_only"] = timed("image_only", lambda: _score(
                image_prompted(pipe, attachment, encoder, references, [""] * len(rows), seeds, steps, guidance, 1.0), truth))
        if "multimodal" in parts:
            m = multimodal_n or len(rows)
            plan = edit_plan(truth[:m])
            report["multimodal"] = {"n": m}
            for scale in scales:
                report["multimodal"][f"scale {scale:g}"] = timed(f"multimodal scale {scale:g}", lambda: edit_accuracy(
                    read_many(image_prompted(pipe, attachment, encoder, references[:m], [e.text for e in plan], seeds[:m],
                                             steps, guidance, scale)), plan))
    finally:
        attachment.detach()
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure the toy world's quality targets")
    parser.add_argument("--pipeline", default="build/toy/pipeline")
    parser.add_argument("--adapter", default=None, help="ip_adapter.safetensors (omit: text-to-image only)")
    parser.add_argument("--test", default="build/toy/data/test")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--multimodal-n", type=int, default=None, help="references for the multimodal part (default: -n)")
    parser.add_argument("--scales", default="0.5,0.7,1.0", help="adapter scales of the multimodal part")
    parser.add_argument("--parts", default="text_to_image,unconditional,image_only,multimodal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    report = measure(args.pipeline, args.adapter, args.test, n=args.n, steps=args.steps, guidance=args.guidance,
                     multimodal_n=args.multimodal_n, scales=[float(x) for x in args.scales.split(",")],
                     parts=args.parts.split(","))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
