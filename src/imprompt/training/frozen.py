"""Which models a training run keeps in memory, and for how long.

A cached training step runs only the UNet (with the adapter): the VAE, the text encoder(s) and the
image encoder are needed to build the feature cache and to draw sample sheets, nothing else. At SD1.5
size they are half of the resident weights (VAE 84M, text encoder 123M, ViT-H 632M parameters beside
the UNet's 860M), so a run loads them only when the cache must be built (or sample sheets are asked
for) and drops them as soon as it is; a run whose cache is already complete (a resume, a second run on
the same data) never loads them at all.

Knowing that the cache is complete without the frozen models needs a key that does not read their
weights: :func:`source_key` hashes the model files' names, sizes and modification times with
everything else the cache depends on. The cache remembers which source keys it was built from
(:meth:`imprompt.training.features.FeatureCache.remember`); a source key nobody remembers (changed
weights, a hub id, a single-file checkpoint) loads the models and hashes their weights as before.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoding import ImageEncoder
from ..generation.pipelines import load_pipeline, resolve_model
from .config import TrainConfig
from .features import FrozenModels


def encoder_output_of(variant: str) -> str:
    """Which image-encoder output a training variant reads (``AdapterVariant.encoder_output``): the
    linear kinds read the pooled, projected embedding, plus and full the penultimate hidden states."""
    return "image_embeds" if variant in ("linear", "shared") else "penultimate_hidden"


@dataclass
class Denoiser:
    """What a training step needs of the base model: the UNet, its noise schedule and the VAE's latent scale."""

    unet: torch.nn.Module
    scheduler_config: dict
    scaling_factor: float


def load_frozen(config: TrainConfig, device) -> FrozenModels:
    """The whole pipeline and the image encoder (for building the cache and drawing sample sheets)."""
    pipe = load_pipeline(config.model, "text2img", device=device, model_config=config.model_config)
    path = config.image_encoder if Path(config.image_encoder).is_file() else resolve_model(config.image_encoder, "image encoder")
    encoder = ImageEncoder.load(path)
    encoder.model.to(device)
    return FrozenModels(pipe, encoder, encoder_output_of(config.variant))


def denoiser_of(models: FrozenModels) -> Denoiser:
    return Denoiser(models.pipe.unet, dict(models.pipe.scheduler.config), float(models.pipe.vae.config.scaling_factor))


def release(models: FrozenModels) -> Denoiser:
    """Keep the UNet and drop everything else of ``models`` (the caller must hold no other reference).

    The pipeline is emptied component by component as well, so that a reference to it left somewhere
    (a diffusers hook, a traceback) holds nothing large."""
    denoiser = denoiser_of(models)
    pipe = models.pipe
    for name in list(pipe.components):
        setattr(pipe, name, None)
    models.pipe = models.encoder = None
    gc.collect()
    return denoiser


def load_denoiser(config: TrainConfig, device) -> Denoiser:
    """Only the UNet, the scheduler config and the VAE's scaling factor of a diffusers folder."""
    from diffusers import UNet2DConditionModel

    folder = Path(config.model)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    # diffusers' AutoencoderKL default, used when a config leaves the field out.
    return Denoiser(unet.eval(), scheduler_config, float(vae_config.get("scaling_factor", 0.18215)))


def _files_state(path: Path) -> list:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def source_key(config: TrainConfig, data_key: str) -> str | None:
    """A hash of what the feature cache of this run depends on, read from file metadata, not weights.

    None where it cannot be known that cheaply: the model is not a local diffusers folder (a hub id, a
    single-file checkpoint, whose UNet cannot be loaded alone here), or the encoder is not a local path.
    """
    model, encoder = Path(config.model), Path(config.image_encoder)
    if not (model / "model_index.json").is_file() or not encoder.exists():
        return None
    parts = {"model": [str(model.resolve()), _files_state(model)],
             "encoder": [str(encoder.resolve()), _files_state(encoder)],
             "encoder_output": encoder_output_of(config.variant), "resolution": config.resolution,
             "center_crop": config.center_crop, "data": data_key,
             "crop_seed": None if config.center_crop else config.seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
