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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, option
from ..files import write_text
from . import shapes
from .config import path_option
from .judge import accuracy, edit_accuracy, edit_plan, read_many
from .shapes import Attributes

PARTS: tuple[str, ...] = ("text_to_image", "unconditional", "image_only", "multimodal")
TARGETS = {
    "text_to_image": {"color": 0.9, "background": 0.9, "shape": 0.8},
    "image_only": {"color": 0.9, "background": 0.9, "shape": 0.8},
    "multimodal": 0.75,
}


def load(pipeline: str | Path, adapter_file: str | Path | None, image_encoder: str | Path | None = None,
         controlnet: str | Path | None = None):
    """The toy pipeline (with ``controlnet``: diffusers' ControlNet pipeline) and, given an adapter file, the
    adapter and its image encoder (by default the ``image_encoder/`` folder beside the adapter file, the
    official layout)."""
    from ..adapter.checkpoint import load_adapter
    from ..encoding import ImageEncoder
    from ..generation.pipelines import load_pipeline
    from ..models.pairing import official_candidates

    pipe = load_pipeline(pipeline, controlnet=controlnet)
    if adapter_file is None:
        return pipe, None, None
    encoder = ImageEncoder.from_pretrained(image_encoder or official_candidates(Path(adapter_file))[0])
    return pipe, load_adapter(adapter_file), encoder


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
                   seeds: Sequence[int], steps: int, guidance: float, scale: float,
                   batch: int = 32) -> list[np.ndarray]:
    """One image per (reference, text, seed), ``batch`` references per pipeline call
    (:mod:`imprompt.generation.batched`: the toy UNet runs ~2.5x faster per row in large batches; the
    images equal single calls' to float rounding)."""
    from ..generation.batched import BatchItem, generate_batch
    from ..generation.prompts import ImagePrompt
    from ..generation.settings import GenerationSettings

    settings = GenerationSettings(steps=steps, guidance=guidance)
    items = [BatchItem(seeds=[seed], prompt=text, image_prompts=[ImagePrompt([reference], scale=scale)])
             for reference, text, seed in zip(references, texts, seeds)]
    out = []
    for i in range(0, len(items), batch):
        for images in generate_batch(pipe, attachment, settings, items[i:i + batch], [encoder]):
            out += _as_arrays(images)
    return out


def _score(images: Sequence[np.ndarray], truth: Sequence[Attributes]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in accuracy(read_many(list(images)), list(truth)).items()}


def measure(pipeline: str | Path, adapter_file: str | Path | None, test_folder: str | Path, n: int = 200,
            steps: int = 20, guidance: float = 3.0, scales: Sequence[float] = (0.5, 0.7, 1.0),
            progress: bool = True, multimodal_n: int | None = None, parts: Sequence[str] = PARTS,
            image_encoder: str | Path | None = None) -> dict:
    """All quality numbers on the first ``n`` test samples; a JSON-ready dict."""
    folder = Path(test_folder)
    if not (folder / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"{folder} has no metadata.jsonl; give a split folder written by `imprompt toy build` "
                                "(e.g. build/toy/data/test)")
    rows = shapes.read_metadata(folder)[:n]
    references = [Image.open(folder / name).convert("RGB") for name, _, _ in rows]
    captions = [c for _, c, _ in rows]
    truth = [a for _, _, a in rows]
    seeds = list(range(len(rows)))
    pipe, adapter, encoder = load(pipeline, adapter_file, image_encoder)
    report: dict = {"n": len(rows), "steps": steps, "guidance": guidance, "targets": TARGETS}

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        if progress:
            print(f"[toy quality] {name}: {json.dumps(value)}", flush=True)
        return value

    if "text_to_image" in parts:  # the text-only parts run on the plain UNet
        report["text_to_image"] = timed("text_to_image", lambda: _score(text_batch(pipe, captions, seeds, steps, guidance), truth))
    if "unconditional" in parts:
        report["unconditional"] = timed("unconditional", lambda: _score(text_batch(pipe, [""] * len(rows), seeds, steps, 1.0), truth))
    if adapter is None:
        return report
    from ..adapter.attach import attach

    with attach(pipe.unet, adapter) as attachment:
        if "image_only" in parts:
            report["image_only"] = timed("image_only", lambda: _score(
                image_prompted(pipe, attachment, encoder, references, [""] * len(rows), seeds, steps, guidance, 1.0), truth))
        if "multimodal" in parts:
            m = multimodal_n or len(rows)
            plan = edit_plan(truth[:m])
            report["multimodal"] = {"n": m}
            texts = [e.text for e in plan]
            for scale in scales:
                report["multimodal"][f"scale {scale:g}"] = timed(f"multimodal scale {scale:g}", lambda s=scale: edit_accuracy(
                    read_many(image_prompted(pipe, attachment, encoder, references[:m], texts, seeds[:m], steps, guidance, s)),
                    plan))
    return report


@dataclass
class QualityConfig:
    """``imprompt toy quality``: the quality targets of a toy pipeline (and adapter) on a test split folder."""

    pipeline: Path = field(default=Path("build/toy/pipeline"), metadata=path_option(
        "diffusers pipeline folder of the toy model"))
    adapter: Path | None = field(default=None, metadata=path_option(
        "ip_adapter.safetensors (omit: the text-to-image and unconditional parts only)"))
    image_encoder: Path | None = field(default=None, metadata=path_option(
        "image encoder folder (default: image_encoder/ beside the adapter file)"))
    test: Path = field(default=Path("build/toy/data/test"), metadata=path_option(
        "a split folder written by the toy build (images + metadata.jsonl)"))
    n: int = field(default=200, metadata=option("test references", short="-n"))
    steps: int = field(default=20, metadata=option("sampling steps"))
    guidance: float = field(default=3.0, metadata=option("classifier-free guidance scale"))
    multimodal_n: int | None = field(default=None, metadata=option("references of the image + text part (default: n)"))
    scales: list[float] = field(default_factory=lambda: [0.5, 0.7, 1.0], metadata=option(
        "adapter scales of the image + text part (repeat the flag; default 0.5, 0.7, 1.0)"))
    parts: list[str] = field(default_factory=lambda: list(PARTS), metadata=option(
        "parts to measure (repeat the flag; default: all)", choices=PARTS))
    threads: int = field(default=1, metadata=option("torch threads"))
    out: Path | None = field(default=None, metadata=path_option("also write the report as JSON here"))

    def __post_init__(self):
        for name in ("pipeline", "adapter", "image_encoder", "test", "out"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for name in ("n", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.multimodal_n is not None and self.multimodal_n < 1:
            raise ConfigError(f"multimodal_n must be at least 1, got {self.multimodal_n}")


def run(config: QualityConfig) -> dict:
    """Measure, print the report as JSON (and write it to ``config.out``)."""
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)
    report = measure(config.pipeline, config.adapter, config.test, n=config.n, steps=config.steps,
                     guidance=config.guidance, multimodal_n=config.multimodal_n, scales=config.scales,
                     parts=config.parts, image_encoder=config.image_encoder)
    text = json.dumps(report, indent=2)
    print(text)
    if config.out is not None:
        write_text(config.out, text + "\n")
    return report
