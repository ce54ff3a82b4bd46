"""Negative images made of noise, as ComfyUI_IPAdapter_plus's ``IPAdapterNoise`` node makes them.

Used as an image prompt's negative image, noise instead of the usual blank (zero) unconditional
image gives the guidance a direction away from "random texture" rather than away from "nothing",
which often cleans up IP-Adapter results. The node's facts (images in [0, 1], 224 x 224, a black
image unless one is given):

* fade: ``image * (1 - s) + uniform * s``
* dissolve: each pixel channel replaced by uniform noise with probability ``s``
* gaussian: ``image + normal * s``
* shuffle: the image warped (elastic transform, alpha 75, sigma ``(1 - s) * 3.5``) and flipped both ways,
  then ``image * (1 - g) + g`` with ``g = normal * 0.75 * s``
* then clamped to [0, 1]; ``blur`` > 0: a Gaussian blur with that (odd) kernel size.

The node seeds torch's global generator from the image; here the seed is an argument and the
noise comes from a private generator, so the result is a pure function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NOISE_TYPES: tuple[str, ...] = ("fade", "dissolve", "gaussian", "shuffle")
NOISE_SIZE = 224


@dataclass(frozen=True)
class NegativeNoise:
    """A noise negative image: its type, strength (0..1), blur (kernel size in pixels, 0..32) and seed."""

    kind: str = "fade"
    strength: float = 1.0
    blur: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NOISE_TYPES:
            raise ValueError(f"unknown noise type {self.kind!r}; choose one of: {', '.join(NOISE_TYPES)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"noise strength must be 0 to 1, got {self.strength}")
        if not 0 <= self.blur <= 32:
            raise ValueError(f"noise blur must be a whole number of pixels, 0 to 32, got {self.blur}")

    @classmethod
    def parse(cls, text: str) -> "NegativeNoise":
        """'TYPE[:STRENGTH[:BLUR[:SEED]]]', e.g. 'fade', 'dissolve:0.5', 'gaussian:0.3:5'."""
        parts = text.strip().split(":")
        if len(parts) > 4 or not parts[0]:
            raise ValueError("expected TYPE[:STRENGTH[:BLUR[:SEED]]], e.g. fade:0.8:3")
        try:
            strength = float(parts[1]) if len(parts) > 1 else 1.0
            blur = int(parts[2]) if len(parts) > 2 else 0
            seed = int(parts[3]) if len(parts) > 3 else 0
        except ValueError:
            raise ValueError("expected TYPE[:STRENGTH[:BLUR[:SEED]]] with a number strength and whole-number "
                             "blur and seed, e.g. fade:0.8:3") from None
        return cls(parts[0].strip().lower(), strength, blur, seed)

    def describe(self) -> str:
        return f"{self.kind}:{self.strength:g}:{self.blur}:{self.seed}"

    def image(self, base: Image.Image | None = None) -> Image.Image:
        return noise_image(self.kind, self.strength, self.blur, self.seed, base)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding; torchvision's default sigma
    for a kernel size k is ``0.3 * ((k - 1) / 2 - 1) + 0.8``."""
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8 if sigma is None else sigma
    k = _gaussian_kernel(kernel_size, sigma).to(images)
    c = images.shape[1]
    pad = kernel_size // 2
    out = F.pad(images, (pad, pad, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    out = F.pad(out, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def elastic(images: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Elastic warp of (N, C, H, W): uniform [-1, 1] displacements, smoothed by a Gaussian of ``sigma``,
    scaled to ``alpha`` pixels (torchvision's ElasticTransform), bilinear, zeros outside."""
    n, _, h, w = images.shape
    displacement = torch.rand((2, 1, h, w), generator=generator) * 2 - 1
    if sigma > 0:
        size = int(2 * math.ceil(3 * sigma) + 1)
        displacement = gaussian_blur(displacement, size, sigma)
    dx = displacement[0, 0] * alpha / w
    dy = displacement[1, 0] * alpha / h
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs + dx, ys + dy], dim=-1)[None].expand(n, h, w, 2)
    return F.grid_sample(images, grid.to(images), mode="bilinear", padding_mode="zeros", align_corners=False)


def noise_image(kind: str, strength: float = 1.0, blur: int = 0, seed: int = 0,
                base: Image.Image | None = None, size: int = NOISE_SIZE) -> Image.Image:
    """A noise image (RGB, ``size`` square) over ``base`` (center-cropped and resized; black if None)."""
    NegativeNoise(kind, strength, blur, seed)  # validates
    if base is None:
        image = torch.zeros(1, 3, size, size)
    else:
        rgb = base.convert("RGB")
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        image = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(seed)
    if kind == "fade":
        noise = image * (1 - strength) + torch.rand(image.shape, generator=g) * strength
    elif kind == "dissolve":
        mask = (torch.rand(image.shape, generator=g) < strength).float()
        noise = image * (1 - mask) + torch.rand(image.shape, generator=g) * mask
    elif kind == "gaussian":
        noise = image + torch.randn(image.shape, generator=g) * strength
    else:  # shuffle
        image = elastic(image, 75.0, (1 - strength) * 3.5, g).flip(-1).flip(-2)
        grain = torch.randn(image.shape, generator=g) * (strength * 0.75)
        noise = image * (1 - grain) + grain
    noise = noise.clamp(0, 1)
    if blur > 0:
        noise = gaussian_blur(noise, blur + 1 if blur % 2 == 0 else blur).clamp(0, 1)
    pixels = (noise[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
