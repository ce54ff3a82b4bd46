"""Image prompts: what a user asks for, and its preparation into per-layer keys and values.

Data flow, one function per arrow:
reference images -> pixels -> encoder features (+ unconditional features) -> combined features
-> image tokens (projection, once per generation) -> per-layer ImageKV (once per generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..adapter.attach import Attachment
from ..adapter.attention import ImageKV, StepWindow
from ..adapter.embeds_scaling import check_embeds_scaling
from ..adapter.layers import LayerScales, parse_layer_scales
from ..adapter.weight_types import check_weight_type, layer_weights
from ..encoding import CropMode, ImageEncoder, ImageInputError, check_encoder
from .negative_noise import NegativeNoise
from .embeds import ImageFeatures, check_features, encode_references, fill_unconditional
from .text_diff import TextDiff, check_takes_text_diff
from .tiles import TileOptions, region_mask
from .faceid import FaceEmbeddingLike, check_face_embeddings, faceid_tokens

CombineMode = Literal["concat", "average", "weighted", "add", "subtract", "norm average"]
COMBINE_MODES: tuple[str, ...] = ("concat", "average", "weighted", "add", "subtract", "norm average")
DEFAULT_SCALE = 0.6

MaskLike = Image.Image | np.ndarray | torch.Tensor


@dataclass
class ImagePrompt:
    """One adapter's image prompt for a generation.

    Several ``images`` are combined by ``combine``: ``concat`` joins their tokens into one sequence
    (one softmax over all of them, as diffusers does with a list of images), ``average`` averages
    their encoder features, ``weighted`` averages them with ``weights``. ``masks`` (one per image,
    white = where the image acts) restrict each image to a region; masked images attend separately.
    ``negative_images`` replace the unconditional image embedding (averaged if several); so does a
    ``negative_noise`` image (averaged with them). ``add``, ``subtract`` (the first image minus the mean
    of the others) and ``norm average`` are ComfyUI_IPAdapter_plus's other combinations.
    ``weight_type`` spreads ``scale`` over the layers (:mod:`imprompt.adapter.weight_types`;
    ``composition_scale`` is the composition blocks' weight where a type has one, default ``scale``);
    ``embeds_scaling`` says where the weight acts (:mod:`imprompt.adapter.embeds_scaling`).
    ``embeds``: encoder features computed before (``imprompt encode``, diffusers, ComfyUI), used
    instead of ``images``. ``tiles``: each reference is cut into encoder-sized tiles, each a unit
    (:mod:`imprompt.generation.tiles`); ``combine``, ``weights`` and ``masks`` still count references.
    ``text_diff``: DALL-E 2's edit of the (combined) image embedding by two texts
    (:mod:`imprompt.generation.text_diff`); adapters that read ``image_embeds`` only.
    """

    images: Sequence[Image.Image] = ()
    adapter: int = 0
    scale: float = DEFAULT_SCALE
    combine: CombineMode = "concat"
    weights: Sequence[float] | None = None
    layers: LayerScales | str | None = None
    start: float = 0.0
    end: float = 1.0
    masks: Sequence[MaskLike | None] | None = None
    negative_images: Sequence[Image.Image] | None = None
    crop: CropMode = "center"
    weight_type: str = "linear"
    composition_scale: float | None = None
    embeds_scaling: str = "V only"
    negative_noise: NegativeNoise | None = None
    embeds: ImageFeatures | None = None
    tiles: TileOptions | None = None
    text_diff: TextDiff | None = None

    # FaceID adapters only (imprompt.generation.faceid): insightface face-ID embeddings, (512,) or
    # (n, 512) or a list (None: computed from ``images`` when insightface is installed); the LoRA's
    # scale (official lora_scale); FaceID-PlusV2's shortcut (None: on for PlusV2 files) and its s_scale.
    face_embeddings: FaceEmbeddingLike | Sequence[FaceEmbeddingLike] | None = None
    lora_scale: float = 1.0
    shortcut: bool | None = None
    s_scale: float = 1.0

    @property
    def num_references(self) -> int:
        return self.embeds.references if self.embeds is not None else len(self.images)

    def check(self, num_adapters: int) -> None:
        if self.embeds is not None:
            if self.images or self.negative_images or self.tiles is not None:
                raise ValueError("an image prompt with embeds takes no images, negative images or tiles (they were "
                                 "fixed when the embeds were encoded); give either images or embeds")
        elif not self.images and self.face_embeddings is None:
            raise ValueError("an image prompt needs at least one reference image (or embeds; for FaceID, a face "
                             "embedding)")
        if self.tiles is not None:
            self.tiles.check()
            if self.tiles.masks and self.combine != "concat":
                raise ValueError("tile masks apply per tile; use combine='concat' with masked tiles")
            if self.tiles.masks and self.masks is not None:
                raise ValueError("give region masks or masked tiles, not both (combining them is not supported yet)")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {self.lora_scale}")
        if not 0 <= self.adapter < num_adapters:
            raise ValueError(f"image prompt refers to adapter {self.adapter}, but {num_adapters} adapter(s) are attached")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.combine == "weighted" and self.face_embeddings is None:
            if self.weights is None or len(self.weights) != self.num_references:
                raise ValueError(
                    f"combine='weighted' needs one weight per image: {self.num_references} images, "
                    f"{0 if self.weights is None else len(self.weights)} weights"
                )
        if self.combine == "weighted":
            if self.weights and sum(self.weights) == 0:
                raise ValueError("weights sum to zero; give at least one non-zero weight")
        if self.combine == "subtract" and self.num_references < 2:
            raise ValueError("combine='subtract' takes the later images away from the first: give at least two images")
        check_weight_type(self.weight_type)
        check_embeds_scaling(self.embeds_scaling)
        if self.text_diff is not None:
            self.text_diff.check()
        if self.composition_scale is not None and not math.isfinite(self.composition_scale):
            raise ValueError(f"composition_scale must be a finite number, got {self.composition_scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1 (fractions of the denoising steps), got start={self.start}, end={self.end}")
        if self.masks is not None:
            if len(self.masks) != self.num_references and self.face_embeddings is None:  # FaceID: in prepare
                raise ValueError(f"give one mask per reference image (or None): {self.num_references} images, {len(self.masks)} masks")
            if self.combine != "concat":
                raise ValueError("region masks apply per image; use combine='concat' with masks")


def combine_features(features: torch.Tensor, mode: CombineMode, weights: Sequence[float] | None) -> torch.Tensor:
    """(images, ...) -> (units, ...): concat keeps every image; the others fold them into one.

    ``add``, ``subtract`` and ``norm average`` are ComfyUI_IPAdapter_plus's ``combine_embeds`` (applied,
    as there, to the encoder features before the projection): the sum; the first minus the mean of
    the rest; and the mean of ``x / ||x||`` where the norm is taken across the images, element by
    element (``torch.norm(x, dim=0)``), not per feature vector.
    """
    if mode == "concat":
        return features
    if mode == "average":
        return features.mean(dim=0, keepdim=True)
    if mode == "add":
        return features.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return features[:1] - features[1:].mean(dim=0, keepdim=True)
    if mode == "norm average":
        return (features / features.norm(dim=0, keepdim=True)).mean(dim=0, keepdim=True)
    w = torch.tensor(list(weights), dtype=features.dtype, device=features.device)
    w = (w / w.sum()).view(-1, *[1] * (features.ndim - 1))
    return (features * w).sum(dim=0, keepdim=True)


def combine_unconditional(features: torch.Tensor, mode: CombineMode, weights: Sequence[float] | None) -> torch.Tensor:
    """The unconditional side of :func:`combine_features`. For add / subtract / norm average ComfyUI
    keeps the first image's unconditional features (summing or subtracting blank-image features would
    not give a blank image's); the older modes combine them as the references, as before."""
    if mode in ("add", "subtract", "norm average"):
        return features[:1]
    return combine_features(features, mode, weights)


def mask_tensor(mask: MaskLike) -> torch.Tensor:
    """A mask as a float (H, W) tensor in [0, 1]."""
    if isinstance(mask, Image.Image):
        return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, dtype=torch.float32)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ImageInputError(f"a region mask must be one channel (H, W); got shape {tuple(m.shape)}")
    if m.max() > 1:
        m = m / 255.0
    return m


def region_masks(mask: torch.Tensor, latent_height: int, latent_width: int, levels: int = 6,
                 vae_scale_factor: int = 8) -> dict[int, torch.Tensor]:
    """Resize a mask to every resolution the UNet's attention layers run at, keyed by query count.

    Each down-sampling halves the size rounding up (stride-2 convolution with padding 1).
    ``vae_scale_factor`` (pixels per latent: the pipeline's, 8 for SD, 4 for the toy VAE) is only used to report the
    image size in pixels.
    """
    mh, mw = mask.shape
    if abs(mh / mw - latent_height / latent_width) > 0.02 * (latent_height / latent_width):
        raise ImageInputError(
            f"mask is {mw}x{mh} (width x height) but the image is {latent_width * vae_scale_factor}x"
            f"{latent_height * vae_scale_factor}: give a mask with the output's aspect ratio"
        )
    out = {}
    h, w = latent_height, latent_width
    for _ in range(levels):
        resized = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[h * w] = resized.reshape(1, h * w, 1)
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


@dataclass(frozen=True)
class BatchLayout:
    """How the pipeline lays out its UNet batch: [unconditional * n, conditional * n] with guidance."""

    guidance: bool
    images_per_prompt: int


def prepare_image_prompt(prompt: ImagePrompt, attachment: Attachment, encoder: ImageEncoder,
                         layout: BatchLayout, latent_size: tuple[int, int], *,
                         vae_scale_factor: int = 8) -> list[dict[str, ImageKV]]:
    """Everything the attention layers need from one image prompt, computed once per generation."""
    prompt.check(len(attachment.adapters))
    adapter = attachment.adapters[prompt.adapter]
    variant = adapter.variant
    features = None  # the CLIP features behind the tokens (None for FaceID's face embeddings)
    if prompt.text_diff is not None:
        check_takes_text_diff(variant, prompt.adapter)
    if variant.is_faceid:
        tokens_uncond, tokens_cond = _faceid_tokens(prompt, adapter, encoder)
        if prompt.masks is not None and len(prompt.masks) != tokens_cond.shape[0]:
            raise ValueError(f"give one mask per face embedding (FaceID): {tokens_cond.shape[0]} faces, "
                             f"{len(prompt.masks)} masks")
    else:
        if prompt.face_embeddings is not None:
            raise ValueError(f"face embeddings were given for adapter {prompt.adapter}, a {variant.name} adapter; "
                             "only FaceID adapters read them")
        tokens_uncond, tokens_cond, features = _image_tokens(prompt, adapter, encoder)
    param = next(adapter.parameters())
    layer_scales = prompt.layers if isinstance(prompt.layers, LayerScales) else (
        parse_layer_scales(prompt.layers, attachment.layout) if prompt.layers else LayerScales()
    )
    window = StepWindow(prompt.start, prompt.end)
    weights = layer_weights(prompt.weight_type, [layer.block for layer in attachment.layers], attachment.layout,
                            prompt.scale, prompt.composition_scale)
    swaps = any(w.swap for w in weights.values())

    # Unmasked: all units' tokens form one sequence (a joint softmax). Masked: one entry per image
    # (all its tiles together), or per tile for masked tiles (each on its own part of the output).
    if prompt.masks is not None:
        rows_of = features.reference_rows() if features is not None else [slice(i, i + 1) for i in range(len(prompt.masks))]
        groups = list(zip(rows_of, prompt.masks))
    elif features is not None and features.regions is not None:
        groups = [(slice(i, i + 1), None if r is None else region_mask(r, *latent_size))
                  for i, r in enumerate(features.regions)]
    else:
        groups = [(slice(None), None)]
    prepared = []
    for rows, mask in groups:
        cond_seq = tokens_cond[rows].reshape(1, -1, tokens_cond.shape[-1])
        uncond_seq = tokens_uncond[rows].reshape(1, -1, tokens_uncond.shape[-1])
        rows_tokens = torch.cat([uncond_seq, cond_seq]) if layout.guidance else cond_seq
        # "precise" weight types: in the swapped layers the unconditional rows see the reference and
        # the conditional rows zero tokens (ComfyUI's uncond = cond; cond = cond * 0).
        swapped = None
        if swaps:
            nothing = torch.zeros_like(cond_seq)
            swapped = torch.cat([cond_seq, nothing]) if layout.guidance else nothing
        masks = None
        if mask is not None:
            masks = {n: m.to(param) for n, m in region_masks(mask_tensor(mask), *latent_size, vae_scale_factor=vae_scale_factor).items()}
        with torch.no_grad():
            prepared.append(
                attachment.layer_kv(
                    prompt.adapter, rows_tokens, scale=prompt.scale, layer_scales=layer_scales,
                    window=window, batch_repeat=layout.images_per_prompt, masks=masks, weights=weights,
                    swapped_tokens=swapped, embeds_scaling=prompt.embeds_scaling,
                )
            )
    if adapter.lora_ids:  # FaceID's LoRA acts on the whole UNet for this call (once per adapter)
        prepared.append(attachment.layer_loras(prompt.adapter, prompt.lora_scale))
    return prepared


def _image_tokens(prompt: ImagePrompt, adapter, encoder: ImageEncoder) -> tuple[torch.Tensor, torch.Tensor, ImageFeatures]:
    """(unconditional, conditional) image tokens, and the features they were projected from: the reference
    images' CLIP features (tiled or not, with negative images and a noise negative), or saved embeds."""
    variant = adapter.variant
    if encoder is not None:  # None: features encoded before (encode_image_prompts), the encoder let go
        check_encoder(variant, encoder)
    elif prompt.embeds is None or prompt.embeds.unconditional is None:
        raise ValueError(f"adapter {prompt.adapter} has no image encoder: give its references as embeds with their "
                         "unconditional half (imprompt encode), or an image encoder")
    features = _prompt_features(prompt, variant, encoder, next(adapter.parameters()))
    if features.regions is not None and prompt.combine != "concat":
        raise ValueError("these features hold masked tiles, which act each on its part of the output; "
                         f"use combine='concat' with them (got {prompt.combine!r})")
    unit_weights = features.unit_weights(prompt.weights)
    cond = combine_features(features.conditional, prompt.combine, unit_weights)
    if prompt.text_diff is not None:
        cond = prompt.text_diff.apply(cond)
    if features.unconditional.shape[0] == 1:  # one for all units (negative images): after combining
        uncond = features.unconditional.expand_as(cond)
    else:
        uncond = combine_unconditional(features.unconditional, prompt.combine, unit_weights)
    with torch.no_grad():  # one projection call for both halves: (2 * units, tokens, dim)
        tokens_uncond, tokens_cond = adapter.project(torch.cat([uncond, cond])).chunk(2)
    return tokens_uncond, tokens_cond, features


def _prompt_features(prompt: ImagePrompt, variant, encoder: ImageEncoder | None,
                     like: torch.Tensor | None = None) -> ImageFeatures:
    """A CLIP image prompt's encoder features: its saved embeds (cast like ``like``, their unconditional
    half filled in), or its references encoded with negative images, a noise negative and tiles."""
    output = variant.encoder_output
    if prompt.embeds is not None:
        embeds = prompt.embeds.for_output(output)
        features = fill_unconditional(embeds if like is None else embeds.to(like), encoder)
        check_features(features, variant, encoder)
        return features
    # a noise negative is one more negative image (averaged with the others)
    negatives = list(prompt.negative_images or ()) + ([prompt.negative_noise.image()] if prompt.negative_noise else [])
    return encode_references(prompt.images, encoder, output, prompt.crop, negatives, prompt.tiles)


def encode_image_prompts(prompts: Sequence[ImagePrompt], adapters: Sequence, encoders: Sequence[ImageEncoder | None]
                         ) -> tuple[list[ImagePrompt], list[ImageEncoder | None]]:
    """The prompts with their encoder features computed now, and the encoders that are still needed.

    Each CLIP image prompt becomes the same prompt with ``embeds``: the features
    :func:`prepare_image_prompt` would compute from its images, negative images, noise negative and
    tiles (with their unconditional half), so later generations read them instead of encoding again.
    An adapter's encoder comes back as None once none of its prompts needs it (FaceID prompts still
    do), so that a caller that loaded it for this job alone can release it before the denoising loop:
    a one-shot ``imprompt generate`` then never holds the image encoder and the UNet's working
    memory at once (for an SD1.5 model with ViT-H, 2.5 GB of encoder weights in fp32).
    """
    encoded, needed = [], set()
    for prompt in prompts:
        prompt.check(len(adapters))
        variant, encoder = adapters[prompt.adapter].variant, encoders[prompt.adapter]
        if variant.is_faceid or encoder is None:
            encoded.append(prompt)
            needed.add(prompt.adapter)
            continue
        check_encoder(variant, encoder)
        features = _prompt_features(prompt, variant, encoder)
        encoded.append(replace(prompt, images=(), negative_images=None, negative_noise=None, tiles=None, embeds=features))
    return encoded, [e if i in needed else None for i, e in enumerate(encoders)]


def _faceid_tokens(prompt: ImagePrompt, adapter, encoder: ImageEncoder | None) -> tuple[torch.Tensor, torch.Tensor]:
    if prompt.negative_images:
        raise ValueError("negative images do not apply to FaceID adapters (their unconditional side is a zero face embedding)")
    faces = None if prompt.face_embeddings is None else check_face_embeddings(prompt.face_embeddings)
    return faceid_tokens(adapter, encoder, prompt.images, faces, combine=prompt.combine, weights=prompt.weights,
                         crop=prompt.crop, shortcut=prompt.shortcut, s_scale=prompt.s_scale)
