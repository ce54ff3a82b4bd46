"""How well toy generations follow the toy ControlNet (:mod:`imprompt.toy.controlnet`), read back with the
attribute reader: the paper's RQ3 ("compatible with structural control") measured on the toy world.

Every generation goes through :func:`imprompt.generate` on the pipeline that
:func:`imprompt.load_pipeline` builds with ``controlnet=`` (diffusers' ``StableDiffusionControlNetPipeline``),
the way a user runs it. Control images are silhouettes (:func:`imprompt.toy.shapes.silhouette`) of the
first ``n`` test references' true attributes.

* **alone**: control = reference A's silhouette, empty text. Shape, size and position should follow the
  control (:data:`CONTROLLED`); colour, background and style are free.
* **with_caption**: the same control with A's caption as the text: every attribute should be A's (the
  text and the control agree; shows the ControlNet does not fight the text).
* **with_adapter**: control = A's silhouette, image prompt = reference B (a later test reference with
  another shape and another placement, :func:`partners`), empty text, at ``adapter_scale`` (by default 1,
  the quality stage's image-only setting). Shape, size and position should follow A; colour, background and style B
  (:data:`FROM_REFERENCE`). Scored per attribute against that mixed target, and as ``control`` (all three
  of A's), ``reference`` (all three of B's) and ``all``.
* **with_adapter_and_text**: the same, with a text naming A's shape (``a circle``): how a user combines
  them, the reference for the look, the control for the layout and the text for the object. Scored as
  ``with_adapter``.

With ``text_diff`` > 0 the image prompt of both ``with_adapter`` parts also carries a text diff
(:mod:`imprompt.generation.text_diff`) from B's shape to A's (``a square -> a circle``, the toy CLIP's text
tower): the image prompt itself is told that the shape changes; with ``text_diff_layout`` the words name size
and position too (``a small square on the left -> a large circle in the center``), all that the control fixes.

The issue's target is >= 80% for each of these attributes. Generations use the model's own scheduler,
``steps`` steps, guidance 3 (as :mod:`imprompt.toy.quality`) and seed i for reference i.
"""

from __future__ import annotations

import dataclasses
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
from .judge import attribute_hits, read_many
from .shapes import Attributes

PARTS: tuple[str, ...] = ("alone", "with_caption", "with_adapter", "with_adapter_and_text")
WITH_ADAPTER = ("with_adapter", "with_adapter_and_text")
CONTROLLED: tuple[str, ...] = ("shape", "size", "position")  # what a silhouette fixes
FROM_REFERENCE: tuple[str, ...] = ("color", "background", "style")  # what it leaves to the text or image prompt
TARGET = 0.8


def partners(truth: Sequence[Attributes]) -> list[int]:
    """For each reference A, the index of its image-prompt reference B: the first later one (cyclically) with
    another shape and another (size, position), so a generation that copies B instead of following A's
    control is caught on all three controlled attributes."""
    out = []
    for i, a in enumerate(truth):
        for k in range(1, len(truth)):
            b = truth[(i + k) % len(truth)]
            if b.shape != a.shape and (b.size, b.position) != (a.size, a.position):
                out.append((i + k) % len(truth))
                break
        else:
            raise ValueError(f"no reference among the {len(truth)} differs from reference {i} ({a}) in shape and "
                             "placement; measure with more references")
    return out


def mixed(control: Attributes, reference: Attributes) -> Attributes:
    """What a generation with ``control``'s silhouette and ``reference`` as the image prompt should show."""
    return dataclasses.replace(reference, **{name: getattr(control, name) for name in CONTROLLED})


def score(read: Sequence[Attributes], expected: Sequence[Attributes],
          groups: dict[str, Sequence[str]]) -> dict[str, float]:
    """Fraction right per attribute named in ``groups``, and per group the fraction with all of its attributes right."""
    hits = [attribute_hits(r, e) for r, e in zip(read, expected)]
    names = [n for g in groups.values() for n in g]
    out = {name: float(np.mean([h[name] for h in hits])) for name in dict.fromkeys(names)}
    out.update({group: float(np.mean([all(h[n] for n in members) for h in hits])) for group, members in groups.items()})
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def controlled(pipe, controls: Sequence[Image.Image], texts: Sequence[str], seeds: Sequence[int], steps: int,
               guidance: float, control_scale: float = 1.0, attachment=None, encoder=None,
               references: Sequence[Image.Image] | None = None, adapter_scale: float = 1.0,
               adapter_start: float = 0.0, diffs: Sequence | None = None) -> list[np.ndarray]:
    """One image per (control, text, seed) through :func:`imprompt.generate`; with ``references``, each
    also the image prompt of its row (the adapter attached as ``attachment``, its ``encoder``), acting from
    ``adapter_start`` of the steps on, with the row's text diff of ``diffs`` if given."""
    from ..generation.generate import generate
    from ..generation.prompts import ImagePrompt
    from ..generation.settings import GenerationSettings

    out = []
    for i, (control, text, seed) in enumerate(zip(controls, texts, seeds)):
        settings = GenerationSettings(prompt=text, steps=steps, guidance=guidance, seed=seed,
                                      controlnet_scale=control_scale)
        prompts = [] if references is None else [ImagePrompt([references[i]], scale=adapter_scale, start=adapter_start,
                                                             text_diff=diffs[i] if diffs else None)]
        images = generate(pipe, attachment, settings, prompts, [encoder] if references is not None else [],
                          control_image=control, output_type="np")
        out.append((np.asarray(images[0]) * 255).round().clip(0, 255).astype(np.uint8))
    return out


def layout_words(a: Attributes) -> str:
    """The words for what a silhouette fixes: size, shape and position ('a small circle on the left')."""
    return f"a {a.size} {a.shape} {shapes.POSITION_PHRASES[a.position]}"


def measure(pipeline: str | Path, controlnet: str | Path, test_folder: str | Path,
            adapter_file: str | Path | None = None, image_encoder: str | Path | None = None, n: int = 100,
            steps: int = 20, guidance: float = 3.0, control_scale: float = 1.0, parts: Sequence[str] = PARTS,
            adapter_scale: float = 1.0, adapter_start: float = 0.0, progress: bool = True, text_diff: float = 0.0,
            clip: str | Path | None = None, text_diff_layout: bool = False) -> dict:
    """The parts of the module docstring on the first ``n`` test references; a JSON-ready dict. The
    ``with_adapter`` parts need ``adapter_file`` (and its image encoder, by default the folder beside it), and
    with ``text_diff`` the CLIP whose text tower partners that encoder (``clip``)."""
    from .quality import load

    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    adapted = [p for p in parts if p in WITH_ADAPTER]
    if adapted and adapter_file is None:
        raise ValueError(f"{' and '.join(adapted)} need{'s' if len(adapted) == 1 else ''} adapter_file "
                         "(the toy ip_adapter.safetensors)")
    folder = Path(test_folder)
    if not (folder / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"{folder} has no metadata.jsonl; give a split folder written by `imprompt toy build` "
                                "(e.g. build/toy/data/test)")
    rows = shapes.read_metadata(folder)[:n]
    truth = [a for _, _, a in rows]
    controls = [shapes.silhouette(a) for a in truth]
    seeds = list(range(len(rows)))
    report: dict = {"n": len(rows), "steps": steps, "guidance": guidance, "control_scale": control_scale,
                    "target": TARGET}
    if adapted:
        report.update(adapter_scale=adapter_scale, adapter_start=adapter_start)
        if text_diff:
            if clip is None:
                raise ValueError("text_diff needs clip: the CLIP folder whose text tower partners the image encoder")
            report["text_diff"] = text_diff
            report["text_diff_layout"] = text_diff_layout
    pipe, adapter, encoder = load(pipeline, adapter_file if adapted else None, image_encoder,
                                  controlnet=controlnet)

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        if progress:
            print(f"[toy control quality] {name}: {json.dumps(value)}", flush=True)
        return value

    groups = {"control": CONTROLLED}
    if "alone" in parts:
        report["alone"] = timed("alone", lambda: score(read_many(controlled(
            pipe, controls, [""] * len(rows), seeds, steps, guidance, control_scale)), truth, groups))
    if "with_caption" in parts:
        report["with_caption"] = timed("with_caption", lambda: score(read_many(controlled(
            pipe, controls, [c for _, c, _ in rows], seeds, steps, guidance, control_scale)), truth,
            {"control": CONTROLLED, "text": FROM_REFERENCE, "all": CONTROLLED + FROM_REFERENCE}))
    if adapted:
        from ..adapter.attach import attach

        partner = partners(truth)
        references = [Image.open(folder / rows[j][0]).convert("RGB") for j in partner]
        expected = [mixed(a, truth[j]) for a, j in zip(truth, partner)]
        texts = {"with_adapter": [""] * len(rows), "with_adapter_and_text": [f"a {a.shape}" for a in truth]}
        diffs = None
        if text_diff:
            from ..generation.text_diff import TextTower, text_diff as make_diff

            tower = TextTower.from_pretrained(clip)
            words = layout_words if text_diff_layout else (lambda a: f"a {a.shape}")
            diffs = [make_diff(tower, words(truth[j]), words(a), text_diff) for a, j in zip(truth, partner)]
        with attach(pipe.unet, adapter) as attachment:
            for part in adapted:
                report[part] = timed(part, lambda part=part: score(read_many(controlled(
                    pipe, controls, texts[part], seeds, steps, guidance, control_scale, attachment, encoder,
                    references, adapter_scale, adapter_start=adapter_start, diffs=diffs)), expected,
                    {"control": CONTROLLED, "reference": FROM_REFERENCE, "all": CONTROLLED + FROM_REFERENCE}))
    return report



def _shipped(name: str) -> Path:
    from . import toy_paths

    return toy_paths()[name]


@dataclass
class ControlQualityConfig:
    """``imprompt toy control``: how well generations follow a toy ControlNet (the parts of the module docstring)."""

    pipeline: Path = field(default_factory=lambda: _shipped("model"), metadata=path_option(
        "diffusers pipeline folder of the toy model (default: the shipped one)"))
    controlnet: Path = field(default_factory=lambda: _shipped("controlnet"), metadata=path_option(
        "the toy ControlNet's folder (default: the shipped one)"))
    adapter: Path = field(default_factory=lambda: _shipped("adapter"), metadata=path_option(
        "ip_adapter.safetensors of the with_adapter parts (default: the shipped one)"))
    image_encoder: Path | None = field(default=None, metadata=path_option(
        "image encoder folder (default: image_encoder/ beside the adapter file)"))
    test: Path = field(default=Path("build/toy/data/test"), metadata=path_option(
        "a split folder written by the toy build (images + metadata.jsonl)"))
    n: int = field(default=100, metadata=option("test references", short="-n"))
    steps: int = field(default=20, metadata=option("sampling steps"))
    guidance: float = field(default=3.0, metadata=option("classifier-free guidance scale"))
    control_scale: float = field(default=1.0, metadata=option("ControlNet conditioning scale"))
    adapter_scale: float = field(default=1.0, metadata=option("image prompt scale of the with_adapter parts"))
    # docs/toy-controlnet.md: 0.3 lifts the control's shape with an empty text (0.58 -> 0.64 at control 1.5)
    adapter_start: float = field(default=0.0, metadata=option(
        "first fraction of the steps the image prompt acts in, in the with_adapter parts"))
    text_diff: float = field(default=0.0, metadata=option(
        "in the with_adapter parts, a text diff from the reference's shape to the control's of this strength "
        "(0: none)"))
    text_diff_layout: bool = field(default=False, metadata=option(
        "the text diff names size and position too (all the silhouette fixes), not the shape alone"))
    clip: Path = field(default_factory=lambda: _shipped("clip"), metadata=path_option(
        "the CLIP whose text tower partners the image encoder, for --text-diff (default: the shipped one)"))
    parts: list[str] = field(default_factory=lambda: ["alone", "with_caption"], metadata=option(
        "parts to measure (repeat the flag; default: alone, with_caption)", choices=PARTS))
    threads: int = field(default=1, metadata=option("torch threads"))
    out: Path | None = field(default=None, metadata=path_option("also write the report as JSON here"))

    def __post_init__(self):
        for name in ("pipeline", "controlnet", "adapter", "image_encoder", "test", "out", "clip"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for name in ("n", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.adapter_start < 1:
            raise ConfigError(f"adapter_start must be in [0, 1), got {self.adapter_start}")
        if not 0 <= self.text_diff <= 1:
            raise ConfigError(f"text_diff must be 0 (none) to 1, got {self.text_diff}")


def run(config: ControlQualityConfig) -> dict:
    """Measure, print the report as JSON (and write it to ``config.out``)."""
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)
    report = measure(config.pipeline, config.controlnet, config.test, config.adapter, config.image_encoder,
                     n=config.n, steps=config.steps, guidance=config.guidance, control_scale=config.control_scale,
                     parts=config.parts, adapter_scale=config.adapter_scale, adapter_start=config.adapter_start,
                     progress=False, text_diff=config.text_diff, clip=config.clip,
                     text_diff_layout=config.text_diff_layout)
    text = json.dumps(report, indent=2)
    print(text)
    if config.out is not None:
        write_text(config.out, text + "\n")
    return report
