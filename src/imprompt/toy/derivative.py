"""A derivative of the toy model: its UNet fine-tuned on one style, for the paper's reuse claim (RQ3).

IP-Adapter's authors apply an adapter trained on SD1.5 unchanged to community models fine-tuned from
it (Realistic Vision, Anything v4, ...). The toy analogue: fine-tune the toy UNet briefly on the train
images of one style (say ``striped``), so that it draws that style more often, and apply the toy
adapter trained on the base UNet to it. ``imprompt toy derive`` needs only the shipped package (or a
build's pipeline folder): the subset is regenerated from the seeded world and encoded with the
pipeline's own VAE and text encoder.

Training is resumable (``imprompt.toy.build``'s loop: atomic checkpoints every two minutes); the
result is a full diffusers pipeline folder (the base one with the new UNet) plus ``derive.json``:
settings, loss and how often the base and the derived model draw the style unprompted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import shapes, toy_paths
from .build import BuildConfig, _atomic_json, _batch_indices, _Loop, _vae_pixels, denoising_step


@dataclass
class DeriveConfig:
    out: Path = Path("build/toy/derived-striped")
    base: Path | None = None  # a diffusers pipeline folder; default: the shipped toy model
    style: str = "striped"
    world_size: int = 8000  # train samples drawn; about a quarter have the style
    steps: int = 300
    batch: int = 64
    lr: float = 1e-4
    caption_dropout: float = 0.1  # keeps classifier-free guidance working
    seed: int = 0
    threads: int = 1
    check_samples: int = 64
    progress: bool = True

    def __post_init__(self):
        if self.style not in shapes.STYLES:
            raise ValueError(f"style must be one of {', '.join(shapes.STYLES)}, got {self.style!r}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps} and {self.batch}")


@torch.no_grad()
def _encode(pipe, samples: list[shapes.Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE latents (posterior mode, scaled), text states of the captions, and the empty text's state."""
    pixels = _vae_pixels(np.stack([np.asarray(s.image) for s in samples]))
    latents = torch.cat([pipe.vae.encode(c).latent_dist.mode() for c in pixels.split(500)]) * pipe.vae.config.scaling_factor
    tok = pipe.tokenizer
    ids = torch.tensor(tok([s.caption for s in samples] + [""], padding="max_length", truncation=True,
                           max_length=tok.model_max_length)["input_ids"])
    states = torch.cat([pipe.text_encoder(input_ids=c).last_hidden_state for c in ids.split(1000)])
    return latents, states[:-1], states[-1:]


@torch.no_grad()
def style_rate(pipe, style: str, n: int, seed: int) -> float:
    """How often unprompted generations (empty text, guidance 1) read as ``style``."""
    from .reader import read

    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe(prompt=[""] * n, num_inference_steps=20, guidance_scale=1.0, generator=generators).images
    return float(np.mean([read(image).style == style for image in images]))


def derive(cfg: DeriveConfig, log=print) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..generation.pipelines import load_pipeline
    from .models import SCHEDULER_CONFIG

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    base = Path(cfg.base or toy_paths()["model"])
    out = Path(cfg.out)
    pipe = load_pipeline(base)
    samples = [s for s in shapes.sample("train", cfg.world_size, cfg.seed) if s.attributes.style == cfg.style]
    latents, text, empty = _encode(pipe, samples)
    log(f"[toy derive] {len(samples)} {cfg.style} train images encoded; fine-tuning the UNet of {base}")

    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    loop = _Loop(BuildConfig(work=out, progress=cfg.progress), "training", cfg.steps, {"model": unet, "opt": opt})
    alphas = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod

    def step(i: int) -> float:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + i)
        idx = _batch_indices(len(latents), cfg.batch, cfg.seed + 7, i)
        cond = text[idx].clone()
        cond[torch.rand(len(idx), generator=g) < cfg.caption_dropout] = empty
        return denoising_step(unet, opt, latents[idx], cond, alphas, g)

    started = time.perf_counter()
    info = loop.run(step)
    staging = out / ".pipeline.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging)
    shutil.rmtree(staging / "unet")
    unet.eval().save_pretrained(staging / "unet")
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    os.replace(staging, out / "pipeline")

    derived = load_pipeline(out / "pipeline")
    rates = {"base": style_rate(pipe, cfg.style, cfg.check_samples, cfg.seed),
             "derived": style_rate(derived, cfg.style, cfg.check_samples, cfg.seed)}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    report = {**info, "settings": {**settings, "base": str(base)}, "images": len(samples),
              "seconds": round(time.perf_counter() - started, 1), f"unprompted {cfg.style} rate": rates}
    _atomic_json(out / "derive.json", report)
    log(f"[toy derive] {out / 'pipeline'}: unprompted {cfg.style} rate {rates['base']:.0%} (base) -> "
        f"{rates['derived']:.0%} (derived), {info['steps']} steps")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imprompt toy derive", description=__doc__.split("\n\n")[0])
    defaults = DeriveConfig()
    parser.add_argument("--out", type=Path, default=defaults.out, help=f"output folder (default {defaults.out})")
    parser.add_argument("--base", type=Path, help="base pipeline folder (default: the shipped toy model)")
    parser.add_argument("--style", default=defaults.style, choices=shapes.STYLES)
    for name in ("world_size", "steps", "batch", "seed", "threads", "check_samples"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    derive(DeriveConfig(**args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
