"""A derivative of the toy model: its UNet fine-tuned on one style, for the paper's reuse claim (RQ3).

IP-Adapter's authors apply an adapter trained on SD1.5 unchanged to community models fine-tuned from
it (Realistic Vision, Anything v4, ...). The toy analogue: fine-tune the toy UNet briefly on the train
images of one style (say ``striped``), so that it draws that style more often, and apply the toy
adapter trained on the base UNet to it. ``imprompt toy derive`` needs only the shipped package (or a
build's pipeline folder): the subset is regenerated from the seeded world and encoded with the
pipeline's own VAE and text encoder.

Training is resumable (:class:`imprompt.toy.loop.TrainingLoop`: atomic checkpoints every two
minutes) and draws its batches and noise from the training recipe's streams; the result is a full
diffusers pipeline folder (the base one with the new UNet) plus ``derive.json``: settings, loss and
how often the base and the derived model draw the style unprompted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, option
from ..files import atomic_dir, write_text
from . import models, shapes, toy_paths
from .config import path_option
from .judge import read
from .loop import TrainingLoop, denoising_step, step_batch


@dataclass
class DeriveConfig:
    out: Path = field(default=Path("build/toy/derived-striped"), metadata=path_option(
        "output folder: pipeline/ (the derived model), training/ (its checkpoint) and derive.json"))
    base: Path | None = field(default=None, metadata=path_option(
        "base diffusers pipeline folder (default: the shipped toy model)"))
    style: str = field(default="striped", metadata=option("the style to fine-tune on", choices=shapes.STYLES))
    world_size: int = field(default=8000, metadata=option("train samples drawn; about a quarter have the style"))
    steps: int = field(default=300, metadata=option("fine-tuning steps"))
    batch: int = field(default=64, metadata=option("batch size"))
    lr: float = field(default=1e-4, metadata=option("learning rate"))
    caption_dropout: float = field(default=0.1, metadata=option(
        "share of steps with the empty caption (keeps classifier-free guidance working)"))
    seed: int = field(default=0, metadata=option("seed of the samples and the training streams"))
    threads: int = field(default=1, metadata=option("torch threads"))
    check_samples: int = field(default=64, metadata=option(
        "unprompted generations per model to measure how often each draws the style"))
    progress: bool = field(default=True, metadata=option("progress bar"))

    def __post_init__(self):
        self.out = Path(self.out)
        self.base = None if self.base is None else Path(self.base)
        if self.style not in shapes.STYLES:
            raise ConfigError(f"style must be one of {', '.join(shapes.STYLES)}, got {self.style!r}")
        for name in ("world_size", "steps", "batch", "threads", "check_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"caption_dropout must be between 0 and 1, got {self.caption_dropout}")


@torch.no_grad()
def _encode(pipe, samples: list[shapes.Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE latents (posterior mode, scaled), text states of the captions, and the empty text's state."""
    pixels = models.vae_pixels(np.stack([np.asarray(s.image) for s in samples]))
    latents = torch.cat([pipe.vae.encode(c).latent_dist.mode() for c in pixels.split(500)]) * pipe.vae.config.scaling_factor
    ids = models.token_ids(pipe.tokenizer, [s.caption for s in samples] + [""])
    states = torch.cat([pipe.text_encoder(input_ids=c).last_hidden_state for c in ids.split(1000)])
    return latents, states[:-1], states[-1:]


@torch.no_grad()
def style_rate(pipe, style: str, n: int, seed: int) -> float:
    """How often unprompted generations (empty text, guidance 1) read as ``style``."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe(prompt=[""] * n, num_inference_steps=20, guidance_scale=1.0, generator=generators).images
    return float(np.mean([read(image).style == style for image in images]))


def derive(cfg: DeriveConfig, log=print) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..generation.pipelines import load_pipeline

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    base = Path(cfg.base or toy_paths()["model"])
    out = cfg.out
    pipe = load_pipeline(base)
    samples = [s for s in shapes.sample("train", cfg.world_size, cfg.seed) if s.attributes.style == cfg.style]
    if not samples:
        raise ConfigError(f"none of the {cfg.world_size} drawn train samples is {cfg.style}; raise world_size")
    latents, text, empty = _encode(pipe, samples)
    log(f"[toy derive] {len(samples)} {cfg.style} train images encoded; fine-tuning the UNet of {base}")

    unet = UNet2DConditionModel.from_pretrained(base / "unet", dtype=torch.float32).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    loop = TrainingLoop(out / "training", cfg.steps, {"model": unet, "opt": opt}, name="training",
                        progress=cfg.progress, log=lambda m: log(f"[toy derive] {m}"))
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER_CONFIG)

    def step(i: int) -> float:
        idx = step_batch(len(latents), cfg.batch, cfg.seed, i)
        return denoising_step(unet, opt, noise_scheduler, latents[idx], text[idx], empty, cfg.caption_dropout, cfg.seed, i)

    started = time.perf_counter()
    info = loop.run(step)
    with atomic_dir(out / "pipeline") as staging:
        shutil.copytree(base, staging, dirs_exist_ok=True)
        shutil.rmtree(staging / "unet")
        unet.eval().save_pretrained(staging / "unet")

    derived = load_pipeline(out / "pipeline")
    rates = {"base": style_rate(pipe, cfg.style, cfg.check_samples, cfg.seed),
             "derived": style_rate(derived, cfg.style, cfg.check_samples, cfg.seed)}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    report = {**info, "settings": {**settings, "base": str(base)}, "images": len(samples),
              "seconds": round(time.perf_counter() - started, 1), f"unprompted {cfg.style} rate": rates}
    write_text(out / "derive.json", json.dumps(report, indent=2, default=str))
    log(f"[toy derive] {out / 'pipeline'}: unprompted {cfg.style} rate {rates['base']:.0%} (base) -> "
        f"{rates['derived']:.0%} (derived), {info['steps']} steps")
    return report
