"""Reference images -> CLIP image-encoder features, and the unconditional features.

Follows the official code and diffusers: linear adapters read the pooled ``image_embeds``, whose
unconditional counterpart is all zeros; plus and full-face read ``hidden_states[-2]``, whose
unconditional counterpart is the encoder's output for an all-zero (already normalised) pixel tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from .adapter.variants import CheckpointError, EncoderOutput, encoder_family_of

CropMode = Literal["center", "pad"]
CROP_MODES: tuple[str, ...] = ("center", "pad")


class ImageInputError(ValueError):
    """An input image (reference, mask, init or control image) that cannot be used."""


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image fully (so truncation shows here, not mid-generation) and convert it."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"cannot read image {path.name}: {err}; is it a complete PNG/JPEG/WebP file?") from err


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Center the image on a square canvas so a non-square reference is kept whole, not cropped."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class ImageEncoder:
    """A CLIP vision tower with projection, and the preprocessing its adapters were trained with."""

    def __init__(self, model: CLIPVisionModelWithProjection, processor: CLIPImageProcessor | None = None):
        self.model = model.eval()
        size = model.config.image_size
        # Same as diffusers builds it for IP-Adapter: shortest side to image_size, centre crop.
        self.processor = processor or CLIPImageProcessor(size=size, crop_size=size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "ImageEncoder":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"no image encoder at {str(path)!r} (expected a transformers folder with config.json); "
                "pass --image-encoder pointing at the official models/image_encoder (SD1.5, ViT-H) or "
                "sdxl_models/image_encoder (ViT-bigG)"
            )
        return cls(CLIPVisionModelWithProjection.from_pretrained(path, torch_dtype=dtype))

    def output_width(self, output: EncoderOutput) -> int:
        config = self.model.config
        return config.projection_dim if output == "image_embeds" else config.hidden_size

    def describe(self, output: EncoderOutput) -> str:
        return encoder_family_of(output, self.output_width(output))

    @property
    def sequence_length(self) -> int:
        config = self.model.config
        return (config.image_size // config.patch_size) ** 2 + 1

    def pixels(self, images: Sequence[Image.Image], crop: CropMode = "center") -> torch.Tensor:
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if crop == "pad":
            # Pad with CLIP's mean colour, which normalises to zero: the padding carries no signal.
            fill = tuple(round(255 * m) for m in self.processor.image_mean)
            images = [pad_to_square(im.convert("RGB"), fill) for im in images]
        param = next(self.model.parameters())
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, output: EncoderOutput) -> torch.Tensor:
        if output == "image_embeds":
            return self.model(pixels).image_embeds
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def unconditional(self, pixels: torch.Tensor, output: EncoderOutput) -> torch.Tensor:
        """The 'no image' features for a batch shaped like ``pixels`` (official definition)."""
        if output == "image_embeds":
            return torch.zeros(pixels.shape[0], self.output_width(output), device=pixels.device, dtype=pixels.dtype)
        return self.features(torch.zeros_like(pixels), output)


def check_encoder(variant, encoder: ImageEncoder) -> None:
    """Raise unless ``encoder`` produces what the adapter's projection reads."""
    output = variant.encoder_output
    found = encoder.output_width(output)
    if found != variant.image_embed_dim:
        raise CheckpointError(
            f"the {variant.name} adapter reads {output} of width {variant.image_embed_dim} "
            f"({encoder_family_of(output, variant.image_embed_dim)}), but this image encoder gives width "
            f"{found} ({encoder_family_of(output, found)}); use the image encoder the adapter was trained with"
        )
