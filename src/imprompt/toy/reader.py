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

Pictures drawn by other means (``read_many(..., drawn=True)``: a user's reference, off the grid, at
other sizes, with patterns of another period) fit none of the 80 maps well; where the fit is poor, the
shape's silhouette is closed, filled and matched at larger shifts and other scales, and the style is
read from the pattern inside it. Generated images are always read the default way.

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


def _match(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the best template for each (N, 1024) alpha map, allowing shifts and a faded colour.

    The image's alpha map is compared at every shift of up to ``MAX_SHIFT`` pixels (a generated shape
    one pixel off is still the same shape at the same position), and each template may be scaled by
    a gain in ``GAIN_RANGE`` (a generated colour a little paler than the palette's is still solid, not
    striped). The distance is ``||a - g T||^2`` with the best gain ``g`` clipped to that range.
    Returns the indices and each best distance relative to ``||a||^2`` (0: a perfect fit).
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
    distance = (gain * gain * norms - 2 * gain * dots).reshape(n, -1)  # ||a||^2 is the same for all
    best = distance.argmin(axis=1)
    power = (alpha ** 2).sum(axis=1)
    return best % len(norms), (distance[np.arange(n), best] + power) / np.maximum(power, 1e-9)


# ------------------------------------------------------------------ pictures drawn by other means

LOOSE_SHIFT = 3  # pixels a drawn shape may be off its place (toy.drawn and toy.augment draw up to 3)
LOOSE_SCALES = (0.85, 0.92, 1.0, 1.08, 1.15)  # sizes a drawn shape may have, relative to the world's
# Relative misfits to the world's maps above which a drawn picture's layout (shape, size, position) and
# its style are read loosely (see read_many). Measured on toy.drawn's test pictures and the renderer's
# perturbed ones (docs/drawn-references.md): a loose style reading is worse than the maps' until the fit
# is poor, a loose layout reading better as soon as it is a little off.
LAYOUT_MISFIT, STYLE_MISFIT = 0.10, 0.35


@lru_cache(maxsize=1)
def _silhouette_templates() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, str]]]:
    """Filled silhouettes (K, 1024) of every (shape, size, position) at :data:`LOOSE_SCALES`, with labels."""
    from .augment import coverage  # the world's geometry, scaled

    maps, labels = [], []
    for shape in shapes.SHAPES:
        for size, position in shapes.placements():
            for scale in LOOSE_SCALES:
                maps.append(coverage(Attributes(shape, "red", "white", "solid", size, position), scale=scale).reshape(-1))
                labels.append((shape, size, position))
    matrix = np.stack(maps).astype(np.float32)
    return matrix, (matrix ** 2).sum(axis=1), labels


def _filled(alpha: np.ndarray) -> np.ndarray:
    """(N, 32, 32) alpha maps -> filled silhouettes in {0, 1}: stripes, dots and outlines closed and filled."""
    from scipy import ndimage

    out = np.empty_like(alpha)
    for i, a in enumerate(alpha):
        closed = ndimage.binary_closing(a > 0.35, structure=np.ones((3, 3)), iterations=2, border_value=0)
        out[i] = ndimage.binary_fill_holes(closed)
    return out


def _loose_style(alpha: np.ndarray, filled: np.ndarray) -> str:
    """Style from the alpha map inside the silhouette, 2 px away from its edge (any period, phase or scale)."""
    from scipy import ndimage

    interior = ndimage.binary_erosion(filled > 0, iterations=2, border_value=0)
    if interior.sum() < 4:
        interior = ndimage.binary_erosion(filled > 0, iterations=1, border_value=0)
    if interior.sum() < 4:
        return "solid"
    inside = alpha[interior].mean()
    if inside > 0.8:
        return "solid"
    if inside < 0.2:
        return "outline"
    # Stripes are horizontal: they change from row to row but not along a row; dots change both ways.
    along = np.abs(np.diff(alpha, axis=1))[interior[:, 1:] & interior[:, :-1]].mean()
    across = np.abs(np.diff(alpha, axis=0))[interior[1:] & interior[:-1]].mean()
    return "dotted" if along > 0.45 * across else "striped"


def _read_loose(alpha: np.ndarray) -> list[tuple[str, str, str, str]]:
    """(shape, size, position, style) of (N, 1024) alpha maps of pictures drawn by other means."""
    matrix, norms, labels = _silhouette_templates()
    n = len(alpha)
    maps = alpha.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
    filled = _filled(maps)
    offsets = range(-LOOSE_SHIFT, LOOSE_SHIFT + 1)
    # np.roll wraps around; a shape 3 px off its place still leaves the far border empty.
    shifted = np.stack([np.roll(filled, (dy, dx), axis=(1, 2)) for dy in offsets for dx in offsets], axis=1)
    distance = norms - 2 * (shifted.reshape(-1, IMAGE_SIZE * IMAGE_SIZE).astype(np.float32) @ matrix.T)
    best = distance.reshape(n, -1).argmin(axis=1) % len(norms)
    return [(*labels[k], _loose_style(maps[i], filled[i])) for i, k in enumerate(best)]


def read_many(images: Iterable[Image.Image | np.ndarray], batch_size: int = 128,
              drawn: bool = False) -> list[Attributes]:
    """Attributes of each 32x32 image (PIL images or 32x32x3 uint8 arrays), in batches for speed.

    ``drawn=True`` reads pictures drawn by other means (a user's reference: shapes off the grid, at
    other sizes, patterns of another period). A picture the world's maps fit well (relative misfit up
    to :data:`LAYOUT_MISFIT`; the renderer's pictures blurred, noisy and JPEG'd stay near it) is read as
    by default; any other is read loosely: its silhouette closed, filled and matched at shifts up to
    :data:`LOOSE_SHIFT` px and at :data:`LOOSE_SCALES`, and, where the fit is poor (over
    :data:`STYLE_MISFIT`), its style read from the pattern inside it.
    Generated images are read the default way, the one every recorded number was read with.
    """
    images = list(images)
    _, _, labels = _templates()
    results = []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([_as_pixels(image) for image in images[start:start + batch_size]])
        backgrounds, colors, alpha = _read_colors(pixels)
        best, misfit = _match(alpha)
        layouts = [labels[k] for k in best]
        if drawn and (loose := np.flatnonzero(misfit > LAYOUT_MISFIT)).size:
            for i, layout in zip(loose, _read_loose(alpha[loose])):
                layouts[i] = layout if misfit[i] > STYLE_MISFIT else (*layout[:3], layouts[i][3])
        for background, color, (shape, size, position, style) in zip(backgrounds, colors, layouts):
            results.append(Attributes(shape, color, background, style, size, position))
    return results


def read(image: Image.Image | np.ndarray, drawn: bool = False) -> Attributes:
    """Attributes of one 32x32 image (PIL or uint8 array); the module docstring and :func:`read_many` say how."""
    return read_many([image], drawn=drawn)[0]


def silhouette_of(image: Image.Image | np.ndarray) -> Image.Image:
    """The silhouette (:func:`imprompt.toy.shapes.silhouette`) of the shape this reader sees in a toy
    image: how a user turns any reference into the toy ControlNet's control image. It is redrawn from
    the reading (the drawn one: a reference comes from anywhere), so it is as right as that reading
    (shape, size, position) and exactly on the grid."""
    return shapes.silhouette(read(image, drawn=True))


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
