"""The toy ControlNet: the shape's silhouette steers the toy UNet (the paper's "compatible with
structural control", RQ3, measured in :mod:`imprompt.toy.control_quality`).

* **Control signal**: :func:`imprompt.toy.shapes.silhouette`, white where the solid shape would be, so
  it carries shape, size and position and nothing of colour, background or style; a user gets it from
  any toy image with :func:`imprompt.toy.reader.silhouette_of` (the ``toy_silhouette`` preprocessor).
* **Model**: diffusers' ``ControlNetModel``, a trainable copy of the UNet's encoder whose zero-initialised
  1x1 convolutions add a residual to each skip connection and to the middle block (Zhang et al. 2023,
  "Adding Conditional Control to Text-to-Image Diffusion Models", section 3.1-3.2). Its layouts are
  :data:`VARIANTS`. The control image enters through diffusers' ``ControlNetConditioningEmbedding``: a
  conv, then per further entry of ``conditioning_embedding_out_channels`` a conv and a stride-2 conv,
  so 32 px control images reach the 8x8 latents with three entries (two halvings) where SD's
  512 px -> 64x64 takes four.
* **Training** (:func:`stage_controlnet`): the UNet frozen, the ControlNet trained on the ``latents``
  stage's cached latents and caption states with the UNet stage's epsilon loss, noise scheduler and
  random streams (:func:`imprompt.toy.loop.denoising_step`), and every caption dropped (the ControlNet
  paper, section 3.3, drops half so that the control, not the caption, carries the shape; on the toy
  the shape followed an empty-text control 31% of the time at the UNet's 10%, 63% at half, 73% at all;
  2,000 steps each). Resumable through :class:`~imprompt.toy.loop.TrainingLoop`; saved as a diffusers
  folder ``controlnet/model``, which :func:`imprompt.load_pipeline` takes as ``controlnet=``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_dir, load_torch_weights
from . import models, shapes, workdir
from .config import CONTROLNET_VARIANTS, BuildConfig
from .loop import denoising_step, learning_rate, seeded, set_learning_rate, step_batch
from .stages import training_loop

# Three entries: two stride-2 convolutions, 32 px -> 8x8 latents (the toy VAE's factor 4).
CONDITIONING_CHANNELS: tuple[int, ...] = (16, 32, 64)
WARMUP_STEPS = 100


@dataclass(frozen=True)
class ControlNetVariant:
    """A toy ControlNet layout. Both give the residuals the toy UNet takes (one per skip connection, with its
    channels and size, and one for the middle block): those depend on the block widths and layer counts only,
    which a ControlNet must share with its UNet, so a smaller one can only drop layers that add no residual."""

    name: str
    attention: bool  # the UNet's cross-attention down blocks and mid block; False: DownBlock2D and a resnet mid block
    description: str


VARIANTS: dict[str, ControlNetVariant] = {
    "full": ControlNetVariant("full", True, "the UNet's encoder copied whole (ControlNetModel.from_unet)"),
    "light": ControlNetVariant("light", False, "no attention: DownBlock2D blocks and a one-resnet mid block, "
                                               "initialised from the UNet's resnets and downsamplers"),
}
assert tuple(sorted(VARIANTS)) == tuple(sorted(CONTROLNET_VARIANTS))


def make_controlnet(unet, variant: str = "light", conditioning_channels: tuple[int, ...] = CONDITIONING_CHANNELS,
                    vae_scale_factor: int = 4):
    """A ControlNet for ``unet`` of layout ``variant`` (:data:`VARIANTS`), initialised from the UNet's weights
    where the layers are the same, its output convolutions zero (so it starts as no control at all).

    ``conditioning_channels``: diffusers' ``conditioning_embedding_out_channels``, one stride-2 convolution per
    entry after the first, which must bring control images at pixel size down to the latents by
    ``vae_scale_factor``."""
    from diffusers import ControlNetModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown toy ControlNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    factor = 2 ** (len(conditioning_channels) - 1)
    if factor != vae_scale_factor:
        raise ValueError(f"conditioning channels {tuple(conditioning_channels)} downsample the control image "
                         f"{factor}x, but the latents are {vae_scale_factor}x smaller than the images; give "
                         f"{1 + int(np.log2(vae_scale_factor))} entries")
    conditioning_channels = tuple(conditioning_channels)
    if VARIANTS[variant].attention:
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels)
    template = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels,
                                         load_weights_from_unet=False)
    config = {k: v for k, v in template.config.items() if not k.startswith("_")}
    config.update(down_block_types=("DownBlock2D",) * len(config["down_block_types"]), mid_block_type="UNetMidBlock2D")
    net = ControlNetModel.from_config(config)
    _copy_matching(net, unet, ("conv_in", "time_embedding", "down_blocks", "mid_block"))
    return net


@torch.no_grad()
def _copy_matching(net, unet, parts: tuple[str, ...]) -> None:
    """Copy ``unet``'s weights into ``net``'s same-named ``parts``; every weight of those parts must have its
    twin in the UNet (a layer the UNet lacks would be left random: refused)."""
    for part in parts:
        target, source = getattr(net, part).state_dict(), getattr(unet, part).state_dict()
        missing = [k for k, v in target.items() if k not in source or source[k].shape != v.shape]
        if missing:
            raise ValueError(f"the ControlNet's {part} has {len(missing)} weights the UNet lacks or shapes "
                             f"differently (first: {missing[0]}); it cannot start from this UNet")
        getattr(net, part).load_state_dict({k: source[k] for k in target})


def size_report(net) -> dict:
    """Parameters and the size of fp16 safetensors weights (2 bytes each; the header adds a few kB)."""
    n = models.parameter_count(net)
    return {"parameters": n, "fp16_mib": round(2 * n / 2 ** 20, 2)}


def silhouette_array(attrs: shapes.Attributes) -> np.ndarray:
    """The silhouette of ``attrs`` as a 32x32 uint8 array (one channel: all three are equal)."""
    return np.asarray(shapes.silhouette(attrs))[..., 0]


def train_silhouettes(work: Path) -> np.ndarray:
    """The silhouettes of the train split, (N, 32, 32) uint8, in the order of its metadata (= the latent cache's)."""
    cached: dict[tuple[str, str, str], np.ndarray] = {}  # only 20 (shape, size, position) exist
    out = []
    for _, _, a in workdir.load_metadata(work, "train"):
        key = (a.shape, a.size, a.position)
        if key not in cached:
            cached[key] = silhouette_array(a)
        out.append(cached[key])
    return np.stack(out)


def control_pixels(silhouettes: np.ndarray) -> torch.Tensor:
    """(N, 32, 32) uint8 silhouettes as (N, 3, 32, 32) float in [0, 1]: what diffusers' ControlNet pipelines
    give the ControlNet (their control image processor does not normalise to [-1, 1])."""
    x = torch.from_numpy(np.ascontiguousarray(silhouettes)).float().div(255)
    return x[:, None].expand(-1, 3, -1, -1)


def train_controlnet(cfg: BuildConfig) -> dict:
    """Train the ControlNet into ``controlnet/model`` (resumable; see the module docstring)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cache = load_torch_weights(cfg.work / "latents" / "cache.pt", "latent cache")
    latents, text, empty = cache["latents"], cache["text"], cache["empty"]
    control = train_silhouettes(cfg.work)
    if len(control) != len(latents):
        raise ValueError(f"the latent cache has {len(latents)} train images but data/train has {len(control)}; "
                         "rerun the latents stage (imprompt toy build --stage latents --force)")
    unet = UNet2DConditionModel.from_pretrained(cfg.work / "pipeline" / "unet").eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER_CONFIG)
    net = seeded(cfg.seed, lambda: make_controlnet(unet, cfg.controlnet_variant)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.controlnet_lr, weight_decay=0.0)
    loop = training_loop(cfg, "controlnet", cfg.controlnet_steps, {"model": net, "opt": opt})

    def step(i: int) -> float:
        set_learning_rate(opt, learning_rate(i, cfg.controlnet_steps, WARMUP_STEPS, cfg.controlnet_lr, cosine=False))
        idx = step_batch(len(latents), cfg.controlnet_batch, cfg.seed, i)
        return denoising_step(unet, opt, noise_scheduler, latents[idx], text[idx], empty,
                              cfg.controlnet_caption_dropout, cfg.seed, i, controlnet=net,
                              control=control_pixels(control[idx]))

    info = loop.run(step)
    net.eval()
    with atomic_dir(workdir.controlnet_folder(cfg.work, "controlnet")) as staging:
        net.save_pretrained(staging)
    info.update(variant=cfg.controlnet_variant, **size_report(net))
    return info


def stage_controlnet(cfg: BuildConfig) -> dict:
    """Train the ControlNet, then measure how well generations follow the control alone
    (:func:`imprompt.toy.control_quality.measure`; with the adapter it needs the adapter stage)."""
    from . import control_quality

    info = train_controlnet(cfg)
    started = time.perf_counter()
    info["quality"] = control_quality.measure(
        cfg.work / "pipeline", workdir.controlnet_folder(cfg.work, "controlnet"), cfg.work / "data" / "test",
        n=cfg.controlnet_quality_samples, steps=cfg.quality_steps, parts=("alone", "with_caption"),
        progress=cfg.progress)
    info["quality_seconds"] = round(time.perf_counter() - started, 1)
    return info
