"""Reference images -> CLIP image-encoder features, and the unconditional features.

Follows the official code and diffusers: linear adapters read the pooled ``image_embeds``, whose
unconditional counterpart is all zeros; plus and full-face read ``hidden_states[-2]``, whose
unconditional counterpart is the encoder's output for an all-zero (already normalised) pixel tensor.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from .adapter.variants import CheckpointError, EncoderOutput, encoder_family_of
from .files import UnsafeFileError, read_regular_file

CropMode = Literal["center", "pad"]
CROP_MODES: tuple[str, ...] = ("center", "pad")


class ImageInputError(ValueError):
    """An input image (reference, mask, init or control image) that cannot be used."""


# A 97 KB PNG can declare 50000x50000 pixels and take gigabytes to decode (a "decompression bomb").
# 40 megapixels covers every real reference or init image (an 8K frame is 33 MP); override it with
# IMPROMPT_MAX_IMAGE_PIXELS or the ``max_pixels`` argument.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def max_image_pixels() -> int:
    raw = os.environ.get("IMPROMPT_MAX_IMAGE_PIXELS")
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise ImageInputError(f"IMPROMPT_MAX_IMAGE_PIXELS must be a whole number of pixels, got {raw!r}") from None
    if value < 1:
        raise ImageInputError(f"IMPROMPT_MAX_IMAGE_PIXELS must be positive, got {value}")
    return value


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale as 8-bit 'L'. PIL's own convert() clips them at 255 (all white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "I":
        # PNG 16-bit greyscale arrives as 'I' holding 0..65535.
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if values.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(values, 0, top) * 255 // top).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray((np.clip(values / top, 0, 1) * 255).round().astype(np.uint8))
    return image


def decode_image(data: bytes, mode: str = "RGB", *, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (so truncation shows here, not mid-generation), refusing bombs.

    The declared size is checked before any pixel is decoded; EXIF orientation is applied; 16-bit
    images are scaled to 8 bits instead of being clipped.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limit:
                raise ImageInputError(
                    f"{name} declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
                    f"{limit / 1e6:.0f} MP limit; resize it, or raise IMPROMPT_MAX_IMAGE_PIXELS if it is genuine"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_eight_bit(image).convert(mode)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as err:
        # PIL refuses sizes far beyond ours before we can look; say it in our terms.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "too many pixels"
        raise ImageInputError(
            f"{name} declares {size}, over the {limit / 1e6:.0f} MP limit (a decompression bomb?); resize it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which tells a user nothing.
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__
        raise ImageInputError(f"cannot read {name}: {detail}; is it a complete PNG/JPEG/WebP file?") from None


def load_image(path: str | os.PathLike, mode: str = "RGB", *, max_pixels: int | None = None) -> Image.Image:
    """Read an image file (regular files only, size- and pixel-capped) and convert it to ``mode``."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_IMAGE_BYTES, what="image")
    except UnsafeFileError as err:
        raise ImageInputError(str(err)) from None
    return decode_image(data, mode, name=f"image {path.name}", max_pixels=max_pixels)


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
        """Load a CLIP vision model folder, refusing (before loading weights) a folder that holds
        another model: transformers would otherwise build a vision tower from a text encoder's config
        and fill it with random weights, or fail with a traceback on a VAE's."""
        path = Path(path)
        expected = ("expected a CLIP vision model folder (config.json with model_type 'clip_vision_model'), such as "
                    "the official models/image_encoder (SD1.5, ViT-H) or sdxl_models/image_encoder (ViT-bigG)")
        if not (path / "config.json").is_file():
            hint = ""
            if (path / "model_index.json").is_file():
                hint = ("; it is a diffusers pipeline folder" + (f", whose image encoder is {str(path / 'image_encoder')!r}"
                                                                 if (path / "image_encoder").is_dir() else ""))
            raise CheckpointError(f"no image encoder at {str(path)!r} (no config.json{hint}); {expected}")
        try:
            config = json.loads(read_regular_file(path / "config.json", 1 << 20, what="image encoder config"))
        except (UnsafeFileError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"image encoder {str(path)!r}: cannot read config.json ({err}); {expected}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"image encoder {str(path)!r}: config.json is not a JSON object; {expected}")
        # 'clip' is a whole CLIP model; its vision half (vision_config, vision_model.*, visual_projection)
        # loads as a CLIPVisionModelWithProjection.
        kind = config.get("model_type") or config.get("_class_name") or "an unknown model"
        if kind not in ("clip_vision_model", "clip"):
            names = {"clip_text_model": "a CLIP text encoder", "AutoencoderKL": "a VAE",
                     "UNet2DConditionModel": "a UNet", "ControlNetModel": "a ControlNet"}
            raise CheckpointError(f"the image encoder folder {str(path)!r} holds {names.get(kind, repr(kind))} "
                                  f"(config.json: {kind}); {expected}")
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as err:  # missing or unreadable weights
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load the image encoder at {str(path)!r}: {first[:300]}") from None
        return cls(model)

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
