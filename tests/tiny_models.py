"""Tiny Stable Diffusion / SDXL / CLIP models built in code, seeded, for fast CPU tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from imprompt.adapter.attach import adapter_for_unet
from imprompt.adapter.variants import AdapterVariant

torch.set_flush_denormal(True)

IMAGE_SIZE = 32  # of the tiny image encoder


def tokenizer() -> CLIPTokenizer:
    # Character-level CLIP tokenizer built in memory (no vocabulary download exists here).
    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder(seed: int, projection: bool = False, hidden: int = 32):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=190, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=188, eos_token_id=189, pad_token_id=189)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=32).eval()


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1.5-shaped: cross-attention in down, up and mid blocks, so layer indexing is exercised."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4,
    ).eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def image_encoder(seed: int = 0, hidden: int = 32, projection: int = 24) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=37, projection_dim=projection, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8)
    return CLIPVisionModelWithProjection(config).eval()


def feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)


def sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae(seed), text_encoder=text_encoder(seed), tokenizer=tokenizer(), unet=sd15_unet(seed),
        scheduler=scheduler(), safety_checker=None, feature_extractor=feature_extractor(),
        image_encoder=None, requires_safety_checker=False,
    )


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae(seed), text_encoder=text_encoder(seed), text_encoder_2=text_encoder(seed + 1, projection=True),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=sdxl_unet(seed), scheduler=scheduler(),
        feature_extractor=feature_extractor(), image_encoder=None,
    )


def controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():  # from_unet zero-initialises the outputs; make them act
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval()


def variant(kind: str, cross_attention_dim: int, encoder_width: int) -> AdapterVariant:
    if kind == "linear":
        return AdapterVariant("linear", encoder_width, cross_attention_dim, 4)
    if kind == "plus":
        return AdapterVariant("plus", encoder_width, cross_attention_dim, 8, resampler_width=64,
                              resampler_depth=4, resampler_ff_mult=4)
    if kind == "full":
        return AdapterVariant("full", encoder_width, cross_attention_dim, None)
    raise ValueError(f"unknown adapter kind {kind!r}; expected linear, plus or full")


def random_adapter(unet, kind: str = "linear", seed: int = 0, encoder: CLIPVisionModelWithProjection | None = None):
    """An adapter with random weights large enough to change the output visibly."""
    encoder = encoder or image_encoder()
    width = encoder.config.projection_dim if kind == "linear" else encoder.config.hidden_size
    dim = unet.config.cross_attention_dim
    adapter = adapter_for_unet(unet, variant(kind, dim, width), copy_text_kv=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return adapter


def adapter_world(kind: str = "linear", seed: int = 0):
    """A tiny SD1.5 pipeline (progress bar off), a random adapter of ``kind`` and its image encoder."""
    from imprompt.encoding import ImageEncoder

    pipe = sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    vision = image_encoder()
    return pipe, random_adapter(pipe.unet, kind, seed=seed, encoder=vision), ImageEncoder(vision)


def cli_world(root, references: int = 1, adapter: str = "ip-base.safetensors"):
    """What `imprompt generate` reads, in ``root``: a tiny SD1.5 pipeline ``sd/``, ``models/image_encoder`` and a
    random linear adapter ``models/<adapter>`` beside it, and ``ref0.png``, ``ref1.png``, ..."""
    from imprompt.adapter.checkpoint import save_adapter

    pipe = sd15_pipeline()
    pipe.save_pretrained(root / "sd")
    encoder = image_encoder()
    encoder.save_pretrained(root / "models" / "image_encoder")
    save_adapter(random_adapter(pipe.unet, "linear", encoder=encoder), root / "models" / adapter)
    for i, image in enumerate(reference_images(references)):
        image.save(root / f"ref{i}.png")
    return root


def reference_images(n: int = 2, size: int = 48) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        pixels = (torch.rand(size, size + 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels))
    return out


def official_tree(root):
    """A tiny SD1.5 folder (``sd``), the official adapter layout (``models/ip-base.safetensors``,
    ``models/ip-plus.bin`` beside ``models/image_encoder/``) and two references ``ref0.png``, ``ref1.png``."""
    from imprompt.adapter.checkpoint import save_adapter

    pipe = sd15_pipeline()
    pipe.save_pretrained(root / "sd")
    encoder = image_encoder()
    encoder.save_pretrained(root / "models" / "image_encoder")
    save_adapter(random_adapter(pipe.unet, "linear", encoder=encoder), root / "models" / "ip-base.safetensors")
    save_adapter(random_adapter(pipe.unet, "plus", seed=3, encoder=encoder), root / "models" / "ip-plus.bin")
    for i, image in enumerate(reference_images(2)):
        image.save(root / f"ref{i}.png")
    return root
