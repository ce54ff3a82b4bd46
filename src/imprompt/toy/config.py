"""The toy build's settings: one typed dataclass, which ``imprompt toy build`` turns into its flags.

Sizes, steps, batches and learning rates of every stage (:mod:`imprompt.toy.build` lists the stages);
the model widths are :class:`imprompt.toy.models.ToySpec`. The defaults are what the shipped models
were built with (the model card records the steps each stage actually ran).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, option

STAGES: tuple[str, ...] = ("data", "tokenizer", "clip", "robust_clip", "vae", "latents", "unet", "pipeline",
                           "adapter", "simple_adapter", "quality", "controlnet", "controlnet_compose", "package")
CONTROLNET_VARIANTS: tuple[str, ...] = ("light", "full")  # the keys of imprompt.toy.controlnet.VARIANTS


def _as_path(value, name: str) -> Path:
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise ConfigError(f"{name} must be a path, got {value!r}")


def path_option(help: str) -> dict:
    """Metadata of a ``Path`` field. argparse hands flags and defaults over as ``Path`` objects, which
    imprompt.config's own coercion takes for text only; ``parse`` accepts both."""
    return option(help, parse=_as_path)


def _int(default: int, help: str) -> int:
    return field(default=default, metadata=option(help))


@dataclass
class BuildConfig:
    work: Path = field(default=Path("build/toy"), metadata=path_option("work folder: one folder per stage"))
    seed: int = _int(0, "seed of the data, the initial weights and every training stream")
    threads: int = _int(1, "torch threads; on a shared 2-core machine two processes with two threads each slow "
                           "each other down ~10x (measured: 0.65 s vs 17 s per UNet step)")
    jobs: int = _int(2, "stages run side by side where they do not depend on each other (clip and vae; the two "
                        "adapters, then quality), each in its own process with --threads threads; a stage running "
                        "alone gets jobs x threads")
    train_size: int = _int(20000, "train split images")
    eval_size: int = _int(1000, "val and test split images (each)")
    heldout_size: int = _int(500, "held-out split images (shape/colour pairs never trained on)")
    clip_steps: int = _int(1500, "CLIP training steps")
    clip_batch: int = _int(128, "CLIP batch size")
    clip_lr: float = field(default=5e-4, metadata=option("CLIP learning rate (warm-up, then cosine)"))
    robust_clip_steps: int = _int(5000, "steps of the vision tower's distillation onto loosened pictures (robust_clip)")
    robust_clip_batch: int = _int(128, "robust_clip batch size (each item clean and loosened: twice the rows)")
    robust_clip_lr: float = field(default=7e-4, metadata=option("robust_clip learning rate (warm-up, then cosine)"))
    robust_clip_patch: int = _int(8, "the robust tower's patch size in pixels, a divisor of the clip stage's 8 (4: an 8x8 "
                                     "grid, about 4x the compute; docs/drawn-references.md)")
    vae_steps: int = _int(3000, "VAE training steps")
    vae_batch: int = _int(32, "VAE batch size")
    vae_lr: float = field(default=1e-3, metadata=option("VAE learning rate (warm-up, then cosine)"))
    vae_kl: float = field(default=1e-6, metadata=option("weight of the VAE's KL term"))
    vae_shape_weight: float = field(default=0.0, metadata=option(
        "extra weight of the shape's pixels in the VAE's reconstruction loss: each pixel's error counts "
        "1 + this x the shape's coverage there (0: every pixel alike)"))
    unet_steps: int = _int(4000, "UNet training steps")
    unet_batch: int = _int(64, "UNet batch size")
    unet_lr: float = field(default=4e-4, metadata=option("UNet learning rate (constant after the warm-up)"))
    unet_warmup: int = _int(200, "UNet warm-up steps")
    ema_decay: float = field(default=0.999, metadata=option("decay of the UNet's EMA weights (the ones saved)"))
    caption_dropout: float = field(default=0.1, metadata=option(
        "share of UNet steps with the empty caption (what makes classifier-free guidance work)"))
    adapter_steps: int = _int(3000, "steps of each adapter stage")
    adapter_lr: float = field(default=5e-4, metadata=option("adapter learning rate"))
    adapter_caption_p: float = field(default=0.5, metadata=option(
        "chance each content attribute is named in the adapters' captions"))
    # Off: at 0.5 (3,000 steps, on robust_clip's tower) drawn references were followed no better (shape
    # 0.69, colour 0.90) than by an adapter trained on clean references, and the renderer's worse (shape
    # 0.87 against 0.93): docs/drawn-references.md. The robust encoder alone does the work.
    adapter_loosened_p: float = field(default=0.0, metadata=option(
        "share of the adapters' samples whose image prompt is a loosened picture of the target (imprompt.toy.augment)"))
    # Off: at 0.5 and 3,000 steps the text won more often where it contradicts the reference, but the
    # reference's own attributes were kept less often and image-only colour fell from 90.5% to 76%
    # (build notes in the model card); at 0.2 on the rebuilt world, to 70.5% (docs/toy-results.md, section 3).
    adapter_edit_p: float = field(default=0.0, metadata=option(
        "share of train images that also give an edit sample (one attribute changed, the original as the image prompt)"))
    quality_samples: int = _int(200, "test references of the quality stage")
    quality_steps: int = _int(20, "sampling steps of the quality stage")
    quality_multimodal_samples: int = _int(100, "test references of the quality stage's image + text part")
    controlnet_variant: str = field(default="light", metadata=option(
        "the toy ControlNet's layout (imprompt.toy.controlnet.VARIANTS): light = no attention (1.9M weights, "
        "fp16 3.7 MiB), full = the UNet's encoder copied whole (3.5M, 6.6 MiB)", choices=CONTROLNET_VARIANTS))
    # The shipped run: shape alone 0.73 after 2,000 steps, 0.79 after 4,000 (docs/toy-controlnet.md)
    controlnet_steps: int = _int(4000, "ControlNet training steps (UNet frozen, silhouette control)")
    controlnet_batch: int = _int(64, "ControlNet batch size")
    controlnet_lr: float = field(default=2e-4, metadata=option("ControlNet learning rate (constant after a warm-up)"))
    # docs/toy-controlnet.md, 2,000 steps: shape alone 0.31 at 10%, 0.63 at 50% (the ControlNet paper's 3.3), 0.73
    # at 100%; with the caption the control is followed at 0.93-0.99 after any of them.
    controlnet_caption_dropout: float = field(default=1.0, metadata=option(
        "share of ControlNet training captions replaced by the empty text (the ControlNet paper, 3.3, drops "
        "half; the toy drops all, so that the control, not the caption, carries the shape)"))
    controlnet_quality_samples: int = _int(100, "test references of the ControlNet stage's measurement")
    # docs/toy-controlnet.md: with an image prompt of another shape (scale 1), control 1.5 and a text naming the
    # control's shape, the shape held 0.86 of the time after 9,000 steps and the reference's colour 0.94 (trained
    # alone, at best 0.76 with the colour 0.63); alone, shape 0.78 -> 0.83. 0 steps ships the ControlNet stage's.
    controlnet_compose_steps: int = _int(9000, "steps of the ControlNet's fine-tuning with the adapter in the loop")
    controlnet_compose_lr: float = field(default=1e-4, metadata=option(
        "learning rate of the ControlNet's fine-tuning with the adapter (constant)"))
    checkpoint_seconds: float = field(default=120.0, metadata=option("seconds between a training stage's checkpoints"))
    clip_max_minutes: float = field(default=10.0, metadata=option("cap on the CLIP stage's training time"))
    vae_max_minutes: float = field(default=28.0, metadata=option("cap on the VAE stage's training time"))
    unet_max_minutes: float = field(default=40.0, metadata=option("cap on the UNet stage's training time"))
    # 4,000 steps took 76 min on one thread of a shared CPU; the stage runs beside the adapters' (issue 15's build time)
    controlnet_max_minutes: float = field(default=80.0, metadata=option("cap on the ControlNet stage's training time"))
    # 9,000 steps took 84 min on one or two threads (0.53-0.62 s/step); it runs after the ControlNet, beside nothing
    controlnet_compose_max_minutes: float = field(default=100.0, metadata=option(
        "cap on the ControlNet's fine-tuning time beside the adapter"))
    progress: bool = field(default=True, metadata=option("progress bars"))

    def __post_init__(self):
        self.work = Path(self.work)
        for name in ("threads", "jobs", "train_size", "eval_size", "heldout_size", "clip_batch", "robust_clip_batch",
                     "vae_batch", "unet_batch", "quality_samples", "quality_steps", "quality_multimodal_samples",
                     "controlnet_batch", "controlnet_quality_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("clip_steps", "robust_clip_steps", "vae_steps", "unet_steps", "unet_warmup", "adapter_steps",
                     "controlnet_steps", "controlnet_compose_steps", "checkpoint_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("clip_lr", "robust_clip_lr", "vae_lr", "unet_lr", "adapter_lr", "controlnet_lr",
                     "controlnet_compose_lr", "clip_max_minutes", "vae_max_minutes", "unet_max_minutes",
                     "controlnet_max_minutes", "controlnet_compose_max_minutes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.controlnet_variant not in CONTROLNET_VARIANTS:
            raise ConfigError(f"controlnet_variant must be one of {CONTROLNET_VARIANTS}, "
                              f"got {self.controlnet_variant!r}")
        for name in ("vae_kl", "ema_decay", "caption_dropout", "controlnet_caption_dropout", "adapter_caption_p",
                     "adapter_loosened_p", "adapter_edit_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not (math.isfinite(self.vae_shape_weight) and self.vae_shape_weight >= 0):
            raise ConfigError(f"vae_shape_weight must be a finite number >= 0, got {self.vae_shape_weight}")

    def max_seconds(self, stage: str) -> float:
        """The training-time cap of a stage (only CLIP, the VAE, the UNet and the ControlNet stages have one)."""
        minutes = getattr(self, f"{stage}_max_minutes", None)
        return float("inf") if minutes is None else 60.0 * minutes


@dataclass
class StageSelection:
    """Which stages ``imprompt toy build`` runs; finished ones are skipped unless ``force``."""

    stage: str | None = field(default=None, metadata=option("run only this stage", choices=STAGES))
    until: str | None = field(default=None, metadata=option("run the stages up to and including this one",
                                                            choices=STAGES))
    force: bool = field(default=False, metadata=option("rerun stages even if they are done"))

    def __post_init__(self):
        for name in ("stage", "until"):
            value = getattr(self, name)
            if value is not None and value not in STAGES:
                raise ConfigError(f"unknown stage {value!r} for {name}; stages are {', '.join(STAGES)}")
        if self.stage is not None and self.until is not None:
            raise ConfigError(f"give --stage or --until, not both (got stage {self.stage!r}, until {self.until!r})")

    def stages(self) -> list[str]:
        if self.stage is not None:
            return [self.stage]
        return list(STAGES[: STAGES.index(self.until) + 1] if self.until else STAGES)
