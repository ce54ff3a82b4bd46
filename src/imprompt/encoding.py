"""Reference images -> CLIP image-encoder features, and the unconditional features.

Follows the official code and diffusers: linear adapters read the pooled ``image_embeds``, whose
unconditional counterpart is all zeros; plus and full-face read ``hidden_states[-2]``, whose
unconditional counterpart is the encoder's output for an all-zero (already normalised) pixel tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image
# The PIL processor by name: the default class warns that torchvision is missing, then falls back to it.
from transformers import CLIPImageProcessorPil as CLIPImageProcessor, CLIPVisionModelWithProjection

from .adapter.variants import CheckpointError, EncoderOutput, encoder_family_of
from .files import UnsafeFileError, read_regular_file
# Image reading lives in imprompt.images (no torch); re-exported here for existing callers.
from .images import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES, ImageInputError, decode_image, load_image, max_image_pixels  # noqa: F401

CropMode = Literal["center", "pad"]
CROP_MODES: tuple[str, ...] = ("center", "pad")


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
        # The features of all-zero images (the hidden-state adapters' "no image"), per output, batch shape,
        # dtype and device: they depend on the weights alone (see ``unconditional``).
        self._zero_features: dict[tuple, torch.Tensor] = {}

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
            model = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:  # missing or unreadable weights
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load the image encoder at {str(path)!r}: {first[:300]}") from None
        return cls(model)

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "ImageEncoder":
        """A CLIP vision folder (transformers) or a single file as ComfyUI and the A1111 ControlNet
        extension keep them (``clip_vision/*.safetensors``, ``clip_h.pth``; transformers or OpenCLIP keys)."""
        path = Path(path)
        if path.is_file():
            from .models.clip_vision import load_clip_vision_file

            return cls(load_clip_vision_file(path, dtype))
        return cls.from_pretrained(path, dtype)

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
        return penultimate_hidden_states(self.model, pixels)

    @torch.no_grad()
    def unconditional(self, pixels: torch.Tensor, output: EncoderOutput) -> torch.Tensor:
        """The 'no image' features for a batch shaped like ``pixels`` (official definition)."""
        if output == "image_embeds":
            return torch.zeros(pixels.shape[0], self.output_width(output), device=pixels.device, dtype=pixels.dtype)
        # The zero images' hidden states are the same for every generation, so they are encoded once per
        # (output, batch shape, dtype, device) and reused: a plus adapter otherwise runs the encoder twice
        # per generation, as diffusers and the official code do (on the mid-size benchmark model the
        # second pass was about half of imprompt's time above plain generation). The batch is encoded
        # whole, as before, because the CPU kernels' rounding depends on the batch size: the result stays
        # bit-identical to encoding zeros_like(pixels) (and to diffusers'). Reuse assumes the encoder's
        # weights are not changed in place afterwards, as nothing in imprompt does (encoders are frozen).
        key = (output, tuple(pixels.shape), pixels.dtype, pixels.device)
        zero = self._zero_features.get(key)
        if zero is None:
            if len(self._zero_features) >= 8:  # a few batch shapes in use at a time; drop the oldest
                # (a snapshot of the keys, and no error if a request beside this one dropped it first)
                self._zero_features.pop(next(iter(list(self._zero_features)), None), None)
            zero = self._zero_features[key] = self.features(torch.zeros_like(pixels), output)
        return zero.clone()


def penultimate_hidden_states(model: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    """``model(pixels, output_hidden_states=True).hidden_states[-2]`` without running the last layer.

    The plus and full-face projections read the second-to-last hidden states, so the last
    transformer layer's output is never used: skipping it saves 1/N of the encoder (a quarter of the
    benchmarks' 4-layer ViT-H, 1/32 of the real one). Same modules, same order, so the result is
    bit-identical to the full call (tests/test_encoding.py checks it against transformers).
    """
    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is None or not hasattr(vision, "embeddings") or not hasattr(vision, "pre_layrnorm"):
        return model(pixels, output_hidden_states=True).hidden_states[-2]  # an unusual layout: the full call
    hidden = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer in list(layers)[:-1]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers < 5 returned a tuple
    return hidden


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
