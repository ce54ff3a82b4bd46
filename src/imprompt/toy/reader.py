"""Read a toy image's attributes back from its pixels: the ground-truth judge for generated images.

Every toy image is ``background + alpha * (colour - background)`` for one of 80 alpha maps (5 shapes x
4 placements x 4 styles, :func:`imprompt.toy.shapes.alpha`). So reading is deterministic analysis,
no learned model:

1. **Background**: the median colour of the 2-pixel border (shapes never reach it), then the nearest
   background colour.
2. **Shape colour**: each candidate colour ``c`` (never the background's own) defines the segment of
   blends from the background to ``c``; the candidate whose segment the image's pixels lie closest to
   wins, weighting pixels by how far they are from the background. Fitting the blend line, not the
   nearest colour of each pixel, is what keeps thin stripes, dots and soft edges (half shape, half
   background) from being read as a third colour.
3. **Alpha**: each pixel's position along that segment, in [0, 1].
4. **Shape, size, position and style together**: the nearest of the 80 alpha maps in squared error.
   Each map is also tried blurred (sigma 0.7 and 1.2 px) and with its stripes or dots at every phase,
   the image is tried shifted by up to one pixel, and the map may be scaled by a gain of 0.8-1.0, so a
   soft, slightly misplaced or slightly pale diffusion output still matches its own map. These
   tolerances are limited on purpose: a free gain would read a blurred striped shape as a pale solid
   one, a larger shift would let a small shape drift to the next position (8 px away).

Colours are classified by nearest palette colour (or blend line), never by exact match, so colours a
little off and noise do not matter. JPEG is harder than blur: its 4:2:0 chroma subsampling smears
shapes whose contrast with the background is mostly chroma (a green or magenta shape on gray), so
small dotted shapes there can read as striped. An image with no shape at all still gets an answer
(the nearest map): the reader judges toy-world images, it does not detect whether there is one.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from . import shapes
from .shapes import BACKGROUNDS, COLORS, IMAGE_SIZE, PERIOD, RGB, STYLES, Attributes

BORDER = 2  # pixels of border used for the background; the nearest shape edge is 2 px in
TEMPLATE_BLURS = (0.0, 0.7, 1.2)  # gaussian sigmas, pixels
MAX_SHIFT = 1  # pixels a shape may be off its place and still match
GAIN_RANGE = (0.8, 1.0)  # how much paler than the palette a shape may be and still match (x alpha)


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """A 32x32x3 float64 array in 0..255 from a PIL image or a uint8 HxWx3 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        # A float array could be 0..1 or 0..255; guessing would silently misread every colour.
        raise TypeError(f"the toy reader needs PIL images or uint8 arrays, got dtype {image.dtype}; "
                        "convert with (x * 255).round().clip(0, 255).astype(np.uint8) for 0..1 floats")
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the toy reader needs {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got an array of shape "
                         f"{image.shape}; resize generations to {IMAGE_SIZE}x{IMAGE_SIZE} first")
    return image.astype(np.float64)


def _gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of (..., 32, 32) maps in pure numpy (edges padded by repetition)."""
    if sigma == 0:
        return maps
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (-2, -1):
        pad = [(0, 0)] * maps.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(maps, pad, mode="edge")
        maps = sum(w * np.take(padded, np.arange(i, i + IMAGE_SIZE), axis=axis) for i, w in enumerate(kernel))
    return maps


def _phases(style: str) -> list[tuple[int, int]]:
    """Pattern phases to try: every row phase for stripes, every row and column phase for dots."""
    if style == "striped":
        return [(dy, 0) for dy in range(PERIOD)]
    if style == "dotted":
        return [(dy, dx) for dy in range(PERIOD) for dx in range(PERIOD)]
    return [(0, 0)]


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, str, str]]]:
    """All alpha maps (K, 1024) with their squared norms and (shape, size, position, style) labels."""
    maps, labels = [], []
    for shape in shapes.SHAPES:
        for size, position in shapes.placements():
            for style in STYLES:
                for phase in _phases(style):
                    variant = shapes.alpha(shape, size, position, style, phase)
                    for sigma in TEMPLATE_BLURS:
                        maps.append(_gaussian_blur(variant, sigma).reshape(-1))
                        labels.append((shape, size, position, style))
    matrix = np.stack(maps).astype(np.float32)
    return matrix, (matrix ** 2).sum(axis=1), labels


def _palette(names: Sequence[str]) -> np.ndarray:
    return np.array([RGB[name] for name in names], dtype=np.float64)


def _read_colors(pixels: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    """Background and shape colour names of (N, 32, 32, 3) images, and their (N, 1024) alpha maps."""
    n = len(pixels)
    border = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels[:, border], axis=1)  # (N, 3)
    bg_palette = _palette(BACKGROUNDS)
    bg_index = np.argmin(((background[:, None] - bg_palette[None]) ** 2).sum(-1), axis=1)

    flat = pixels.reshape(n, -1, 3) - background[:, None]  # (N, P, 3), relative to the background
    weight = (flat ** 2).sum(-1)  # far-from-background pixels decide the colour
    direction = _palette(COLORS)[None] - background[:, None]  # (N, C, 3): background -> candidate
    length2 = np.maximum((direction ** 2).sum(-1), 1.0)  # (N, C)
    t = np.clip(np.einsum("npk,nck->ncp", flat, direction) / length2[..., None], 0.0, 1.0)  # (N, C, P)
    residual = np.sqrt(((flat[:, None] - t[..., None] * direction[:, :, None]) ** 2).sum(-1))
    score = (residual * weight[:, None]).sum(-1) / np.maximum(weight.sum(-1, keepdims=True), 1e-9)
    for i, b in enumerate(bg_index):
        if BACKGROUNDS[b] in COLORS:  # a shape is never the colour of its background
            score[i, COLORS.index(BACKGROUNDS[b])] = np.inf
    color_index = np.argmin(score, axis=1)
    alpha = t[np.arange(n), color_index]  # (N, P)
    return [BACKGROUNDS[i] for i in bg_index], [COLORS[i] for i in color_index], alpha


def _match(alpha: np.ndarray) -> np.ndarray:
    """Index of the best template for each (N, 1024) alpha map, allowing shifts and a faded colour.

    The image's alpha map is compared at every shift of up to ``MAX_SHIFT`` pixels (a generated shape
    one pixel off is still the same shape at the same position), and each template may be scaled by
    a gain in ``GAIN_RANGE`` (a generated colour a little paler than the palette's is still solid, not
    striped). The distance is ``||a - g T||^2`` with the best gain ``g`` clipped to that range.
    """
    matrix, norms, _ = _templates()
    n = len(alpha)
    maps = alpha.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
    offsets = range(-MAX_SHIFT, MAX_SHIFT + 1)
    # np.roll wraps around, which is harmless: the 2-pixel border is background (alpha ~ 0).
    shifted = np.stack([np.roll(maps, (dy, dx), axis=(1, 2)) for dy in offsets for dx in offsets], axis=1)
    shifted = shifted.reshape(-1, IMAGE_SIZE * IMAGE_SIZE).astype(np.float32)  # (N * S, P)
    dots = shifted @ matrix.T  # (N * S, K), one matrix product
    gain = np.clip(dots / norms, *GAIN_RANGE)
    distance = gain * gain * norms - 2 * gain * dots  # ||a||^2 is the same for every shift and template
    return distance.reshape(n, -1).argmin(axis=1) % len(norms)


def read_many(images: Iterable[Image.Image | np.ndarray], batch_size: int = 128) -> list[Attributes]:
    """Attributes of each 32x32 image (PIL images or 32x32x3 uint8 arrays), in batches for speed."""
    images = list(images)
    _, _, labels = _templates()
    results = []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([_as_pixels(image) for image in images[start:start + batch_size]])
        backgrounds, colors, alpha = _read_colors(pixels)
        for background, color, k in zip(backgrounds, colors, _match(alpha)):
            shape, size, position, style = labels[k]
            results.append(Attributes(shape, color, background, style, size, position))
    return results


def read(image: Image.Image | np.ndarray) -> Attributes:
    """Attributes of one 32x32 image (PIL or uint8 array); the module docstring says how."""
    return read_many([image])[0]


def silhouette_of(image: Image.Image | np.ndarray) -> Image.Image:
    """The silhouette (:func:`imprompt.toy.shapes.silhouette`) of the shape this reader sees in a toy
    image: how a user turns any reference into the toy ControlNet's control image. It is redrawn from
    the reading, so it is as right as the reading (shape, size, position) and exactly on the grid."""
    return shapes.silhouette(read(image))


def perturb(image: Image.Image, seed: int, blur: float = 0.7, noise: float = 8 / 255,
            jpeg_quality: int | None = 85) -> Image.Image:
    """Blur, add gaussian noise and JPEG-compress an image: a stand-in for a diffusion model's output.

    Used to check that the reader does not depend on exact pixels. ``noise`` is a standard deviation
    in units of full scale; ``jpeg_quality=None`` skips the JPEG round trip.
    """
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64)
    if noise > 0:
        pixels = pixels + np.random.default_rng(seed).normal(0.0, noise * 255, pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image
