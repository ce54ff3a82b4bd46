"""The toy world's model configurations: a tiny CLIP, a tiny VAE, a tiny SD1.5-shaped UNet, a scheduler.

All are the standard classes (transformers ``CLIPModel``, diffusers ``AutoencoderKL`` /
``UNet2DConditionModel`` / ``DPMSolverMultistepScheduler``), so the built models save and load with
``from_pretrained`` like any Stable Diffusion. Widths follow the CPU costs measured when the world was
designed: the UNet works on 8x8x4 latents at (64, 128, ...) channels, about 0.7 s per batch-64
training step on 2 cores.

* **CLIP**: 128 wide in both towers, so the UNet's ``cross_attention_dim`` is 128. The vision tower
  sees 32x32 images in 8x8 patches (16 patches + CLS).
* **VAE**: three blocks (two 2x downsamplings), 32x32x3 -> 8x8x4. ``scaling_factor`` is measured on
  the training latents after the VAE is trained (:func:`imprompt.toy.stages.stage_vae`), as SD's 0.18215 was.
* **UNet**: SD1.5's block layout (three cross-attention down blocks and a plain one, mirrored up
  blocks, a cross-attention mid block), one layer per block, so ``down_blocks.2`` / ``up_blocks.1``
  (the layer presets' composition / style blocks) exist and sit at 1/4 of the latent resolution as
  in SD1.5. At 8x8 latents the deeper blocks run at 2x2 and 1x1, which costs little.
* **Scheduler**: the DDPM linear schedule (beta 1e-4 to 0.02, Ho et al. 2020) rather than SD's
  scaled-linear one: at 8x8 latents SD's schedule leaves ~7% of the signal at t=T, enough for the
  low-frequency background colour to leak through training noise but not sampling noise. Sampling uses
  DPM-Solver++ (2M), which samples well in 20-25 steps.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from .shapes import IMAGE_SIZE

# OpenAI CLIP's normalisation, kept so CLIPImageProcessor's defaults describe our encoder.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipSpec:
    width: int = 128  # both towers; also the UNet's cross_attention_dim
    text_layers: int = 3
    vision_layers: int = 4
    heads: int = 4
    projection_dim: int = 128
    patch_size: int = 8  # 16 patches + CLS: 4x cheaper than 4x4 patches; stripes and dots still fit in a patch
    max_length: int = 24  # token positions, = the tokenizer's model_max_length


@dataclass(frozen=True)
class VaeSpec:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16


@dataclass(frozen=True)
class UNetSpec:
    block_out_channels: tuple[int, ...] = (64, 128, 128, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' (misnamed) head count, as in SD1.5's config
    norm_num_groups: int = 32
    latent_size: int = IMAGE_SIZE // 4


@dataclass(frozen=True)
class ToySpec:
    clip: ClipSpec = field(default_factory=ClipSpec)
    vae: VaeSpec = field(default_factory=VaeSpec)
    unet: UNetSpec = field(default_factory=UNetSpec)

    def to_dict(self) -> dict:
        return asdict(self)


SPEC = ToySpec()  # the widths the toy build uses (and the shipped models have)


def clip(spec: ClipSpec, vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPModel:
    """A randomly initialised tiny CLIP; the tokenizer pads with EOS, as CLIP's does."""
    text = dict(vocab_size=vocab_size, hidden_size=spec.width, intermediate_size=4 * spec.width,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                max_position_embeddings=spec.max_length, projection_dim=spec.projection_dim,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=spec.width, intermediate_size=4 * spec.width, num_hidden_layers=spec.vision_layers,
                  num_attention_heads=spec.heads, image_size=IMAGE_SIZE, patch_size=spec.patch_size,
                  projection_dim=spec.projection_dim)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
    return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """Resize / centre-crop to 32 and CLIP's mean and std: what the vision tower was trained on."""
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def vae(spec: VaeSpec, scaling_factor: float = 1.0) -> AutoencoderKL:
    n = len(spec.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
                         norm_num_groups=spec.norm_num_groups, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor)


def unet(spec: UNetSpec, cross_attention_dim: int) -> UNet2DConditionModel:
    n = len(spec.block_out_channels)
    return UNet2DConditionModel(
        sample_size=spec.latent_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block, attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups, cross_attention_dim=cross_attention_dim)


SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                        lower_order_final=True, timestep_spacing="leading", steps_offset=1)


def scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


# ------------------------------------------------------------------ what the models take as input

def vision_tower(clip: CLIPModel):
    """The vision half of a CLIPModel as the ``CLIPVisionModelWithProjection`` the adapters' image encoder is."""
    from transformers import CLIPVisionModelWithProjection

    config = copy.deepcopy(clip.config.vision_config)
    config.projection_dim = clip.config.projection_dim  # the projection's width is the whole model's
    vision = CLIPVisionModelWithProjection(config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 images -> the CLIP vision tower's input (what :func:`image_processor` gives)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def vae_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 images -> the VAE's input, [-1, 1] as Stable Diffusion's."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """The VAE's output in [-1, 1] -> (N, 32, 32, 3) uint8 images (the inverse of :func:`vae_pixels`)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as Stable Diffusion pipelines encode prompts."""
    return torch.tensor(tokenizer(captions, padding="max_length", truncation=True,
                                  max_length=tokenizer.model_max_length)["input_ids"])


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------- the scoring CLIP, sharing the pipeline's towers
#
# The package ships the CLIP text tower as the pipeline's text_encoder and the vision tower (with its
# projection) as image_encoder/. A full CLIPModel beside them would store both towers twice and
# push the package over its 25 MB budget, so the scoring CLIP's folder holds only what the towers lack
# (text_projection, logit_scale), the CLIPConfig, tokenizer and image processor, and ``towers.json``
# naming the two tower folders; ``load_shared_tower_clip`` assembles the CLIPModel.

TOWERS_FILE = "towers.json"
_OWN_WEIGHTS = ("text_projection.weight", "logit_scale")


def save_shared_tower_clip(model: CLIPModel, folder, text_encoder: str = "../pipeline/text_encoder",
                           image_encoder: str = "../image_encoder", dtype=None) -> None:
    """Write ``folder`` with the CLIP's own weights only; the tower folders are relative to it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = model.state_dict()
    own = {k: state[k].detach().to(dtype or state[k].dtype).contiguous() for k in _OWN_WEIGHTS}
    save_file(own, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / TOWERS_FILE).write_text(json.dumps({"text_model": text_encoder, "vision_model": image_encoder}, indent=2) + "\n")


def load_shared_tower_clip(folder, dtype=None) -> CLIPModel:
    """The CLIPModel saved by ``save_shared_tower_clip``: every weight accounted for, or a clear error."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    folder = Path(folder)
    towers = json.loads((folder / TOWERS_FILE).read_text())
    model = CLIPModel(CLIPConfig.from_pretrained(folder))
    text = CLIPTextModel.from_pretrained(folder / towers["text_model"])
    vision = CLIPVisionModelWithProjection.from_pretrained(folder / towers["vision_model"])
    for name, tower, part in (("text", text, model.text_model), ("vision", vision.vision_model, model.vision_model)):
        result = part.load_state_dict(tower.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"the {name} tower in {folder / towers[name + '_model']} does not fit the CLIPConfig in "
                             f"{folder}: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    own = load_file(str(folder / "model.safetensors"))
    missing = [k for k in _OWN_WEIGHTS if k not in own]
    if missing:
        raise ValueError(f"{folder / 'model.safetensors'} lacks {missing}; rewrite it with save_shared_tower_clip")
    model.load_state_dict(own, strict=False)
    return model.to(dtype or torch.float32).eval()
