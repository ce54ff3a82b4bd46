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
from .shapes import BACKGROUNDS, CENTER_X, CENTER_Y, COLORS, IMAGE_SIZE, SIZE_PIXELS, PERIOD, RGB, STYLES, Attributes

BORDER = 2  # pixels of border used for the background; the nearest shape edge is 2 px in
TEMPLATE_BLURS = (0.0, 0.7, 1.2)  # gaussian sigmas, pixels
MAX_SHIFT = 1  # pixels a shape may be off its centroid-aligned place and still match
# The canonical reading must beat the as-drawn one by this much (relative squared error): without a
# margin, 2-3% of the world's own blurred + noisy + JPEG'd images switch to a wrong canonical reading.
CANONICAL_MARGIN = 0.05
TEMPLATE_PERIODS = (3, 4, 5)  # pattern periods tried, pixels (the world uses 4)
OUTLINE_WIDTHS = (1.5, 2.0, 3.0)  # outline widths tried, pixels (the world uses 2)
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


def _variants(style: str, world_only: bool = False) -> list[tuple[tuple[int, int], int, float]]:
    """The (phase, period, outline width) of a style's templates: the world's own, and those a reference
    drawn by other means uses (patterns every 3-5 pixels at any phase, outlines 1.5-3 pixels wide)."""
    if style == "solid":
        return [((0, 0), PERIOD, shapes.OUTLINE)]
    if style == "outline":
        return [((0, 0), PERIOD, width) for width in ((shapes.OUTLINE,) if world_only else OUTLINE_WIDTHS)]
    periods = (PERIOD,) if world_only else TEMPLATE_PERIODS
    return [((dy, dx), period, shapes.OUTLINE) for period in periods for dy in range(period)
            for dx in (range(period) if style == "dotted" else (0,))]


def _interpolation(source: np.ndarray) -> np.ndarray:
    """(N, 32, 32) bilinear weights that sample 1-D signals at ``source`` (N, 32) pixel coordinates
    (pixel centres at 0.5, 1.5, ...); samples outside the image get zero, i.e. background."""
    return np.maximum(0.0, 1.0 - np.abs(source[..., None] - 0.5 - np.arange(IMAGE_SIZE)))


def _canonical(maps: np.ndarray, placement: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32) alpha maps moved and zoomed to their placement's nominal centre and size, and the
    index into ``shapes.placements()`` of each.

    The centroid goes to the nearest placement centre (x 8, 16 or 24; y 16) and the extent (the mean of
    the shape's width and height, counted as the summed maximum of each column and row) to its nearest
    size's width, with bilinear resampling, so a shape drawn a few pixels off the grid or 15% too big
    or small meets its template. Templates go through the same map (with their own ``placement``), so
    a triangle, whose centroid sits below its box's centre, is compared centroid to centroid. Only
    confident pixels count (alpha above ~0.2): faint JPEG ringing spread over the background would
    pull every centroid to the middle and widen every extent.
    """
    weight = np.clip((maps - 0.2) / 0.6, 0.0, 1.0)
    total = np.maximum(weight.sum(axis=(1, 2)), 1e-9)
    coords = np.arange(IMAGE_SIZE) + 0.5
    cy = (weight.sum(axis=2) * coords).sum(-1) / total
    cx = (weight.sum(axis=1) * coords).sum(-1) / total
    extent = np.maximum((weight.max(axis=1).sum(-1) + weight.max(axis=2).sum(-1)) / 2, 1.0)
    options = shapes.placements()
    if placement is None:
        # Nearest size in ratio, then the nearest position that size allows (large shapes are centred).
        large = np.log(extent / SIZE_PIXELS["small"]) > np.log(SIZE_PIXELS["large"] / extent)
        centres = np.array([CENTER_X[p] for _, p in options])
        distance = np.abs(cx[:, None] - centres) + np.where(
            large[:, None] == np.array([s == "large" for s, _ in options]), 0.0, np.inf)
        placement = distance.argmin(axis=1)
    placement = np.asarray(placement)
    tx = np.array([CENTER_X[options[k][1]] for k in placement])
    zoom = np.array([SIZE_PIXELS[options[k][0]] for k in placement]) / extent
    rows = _interpolation(cy[:, None] + (coords - CENTER_Y) / zoom[:, None])
    cols = _interpolation(cx[:, None] + (coords - tx[:, None]) / zoom[:, None])
    return np.einsum("nik,nkl,njl->nij", rows, maps, cols), placement


@lru_cache(maxsize=1)
def _plain_templates() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, str, str]]]:
    """The world's own alpha maps (K, 1024) as drawn, with their squared norms and labels: every
    placement, the world's period and outline width, every phase, three blurs."""
    maps, labels = [], []
    for shape in shapes.SHAPES:
        for size, position in shapes.placements():
            for style in STYLES:
                for phase, _, _ in _variants(style, world_only=True):
                    variant = shapes.alpha(shape, size, position, style, phase)
                    for sigma in TEMPLATE_BLURS:
                        maps.append(_gaussian_blur(variant, sigma).reshape(-1))
                        labels.append((shape, size, position, style))
    matrix = np.stack(maps).astype(np.float32)
    return matrix, (matrix ** 2).sum(axis=1), labels


@lru_cache(maxsize=1)
def _templates() -> dict[int, tuple[np.ndarray, np.ndarray, list[tuple[str, str, str, str]]]]:
    """Per placement (index into ``shapes.placements()``): its canonical alpha maps (K, 1024), their
    squared norms and (shape, size, position, style) labels."""
    out = {}
    for k, (size, position) in enumerate(shapes.placements()):
        maps, labels = [], []
        for shape in shapes.SHAPES:
            for style in STYLES:
                for phase, period, outline in _variants(style):
                    maps.append(shapes.alpha(shape, size, position, style, phase, period, outline))
                    labels.append((shape, size, position, style))
        # Blurred first, then canonical: a blurred image's extent is wider, so it is zoomed out by as
        # much as its blurred template is.
        blurred = [_canonical(_gaussian_blur(np.stack(maps), sigma), [k] * len(maps))[0].reshape(len(maps), -1)
                   for sigma in TEMPLATE_BLURS]
        matrix = np.concatenate(blurred).astype(np.float32)
        out[k] = (matrix, (matrix ** 2).sum(axis=1), labels * len(TEMPLATE_BLURS))
    return out


# 0.3 measured best on drawn references at strength 1 among 1, 0.3 and 0.1; lower makes alpha noisy
# where a shape and its background differ mostly in chroma (magenta on gray: 16 levels of luma).
CHROMA_WEIGHT = 0.3
# RGB -> (Y, Cb, Cr) of JPEG (ITU-R BT.601), with chroma scaled by CHROMA_WEIGHT.
_WEIGHTED = np.diag([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT]) @ np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


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
    # Alpha along the chosen segment, measured mostly in luma: JPEG keeps luma at full resolution but
    # halves chroma, so a chroma-measured alpha smears small shapes (see the module docstring).
    chosen = direction[np.arange(n), color_index] @ _WEIGHTED.T  # (N, 3)
    alpha = np.clip(np.einsum("npk,nk->np", flat @ _WEIGHTED.T, chosen)
                    / np.maximum((chosen ** 2).sum(-1), 1.0)[:, None], 0.0, 1.0)
    return [BACKGROUNDS[i] for i in bg_index], [COLORS[i] for i in color_index], alpha


def _best(shifted: np.ndarray, matrix: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best template index and its distance ``||a - g T||^2 - ||a||^2`` for (M, S, P) shifted maps.

    Each template may be scaled by a gain in ``GAIN_RANGE`` (a generated colour a little paler than
    the palette's is still solid, not striped), the best gain clipped to that range.
    """
    m = len(shifted)
    dots = shifted.reshape(-1, matrix.shape[1]) @ matrix.T  # (M * S, K), one matrix product
    gain = np.clip(dots / norms, *GAIN_RANGE)
    distance = (gain * gain * norms - 2 * gain * dots).reshape(m, -1)  # ||a||^2 is the same for every shift
    best = distance.argmin(axis=1)
    return best % len(norms), distance[np.arange(m), best]


def _shifts(maps: np.ndarray) -> np.ndarray:
    """(N, S, 1024) float32: each (N, 32, 32) map at every shift of up to ``MAX_SHIFT`` pixels."""
    offsets = range(-MAX_SHIFT, MAX_SHIFT + 1)
    # np.roll wraps around, which is harmless: the 2-pixel border is background (alpha ~ 0).
    shifted = np.stack([np.roll(maps, (dy, dx), axis=(1, 2)) for dy in offsets for dx in offsets], axis=1)
    return shifted.reshape(len(maps), len(offsets) ** 2, IMAGE_SIZE * IMAGE_SIZE).astype(np.float32)


def _match(alpha: np.ndarray) -> list[tuple[str, str, str, str]]:
    """(shape, size, position, style) of the best template for each (N, 1024) alpha map.

    Two readings, and the one whose template explains the map better (smaller squared error relative
    to the map's own energy) wins:

    * **as drawn**: the map against the world's own alpha maps, at every shift of up to ``MAX_SHIFT``
      pixels (the reader's original reading; exact for the world's images and their blurred, noisy
      or JPEG'd versions);
    * **canonical**: map and templates first brought to their placement's centre and size
      (:func:`_canonical`), then compared the same way against that placement's templates only, which
      include other pattern periods and outline widths: references drawn by other means.
    """
    n = len(alpha)
    maps = alpha.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
    matrix, norms, plain_labels = _plain_templates()
    plain, plain_distance = _best(_shifts(maps), matrix, norms)
    energy = np.maximum((alpha ** 2).sum(-1), 1e-9)
    found = [plain_labels[b] for b in plain]
    score = plain_distance / energy

    # Scores are relative errors minus 1 (||a - gT||^2 / ||a||^2 - 1, >= -1): a canonical reading can
    # only win where the as-drawn one's relative error exceeds the margin, so the world's own images,
    # which it explains almost exactly, skip the second reading.
    unsure = np.flatnonzero(1 + score > CANONICAL_MARGIN)
    if not len(unsure):
        return found
    canonical, placement = _canonical(maps[unsure])
    canonical_energy = np.maximum((canonical ** 2).sum(axis=(1, 2)), 1e-9)
    shifted = _shifts(canonical)
    for k, (matrix, norms, labels) in _templates().items():
        rows = np.flatnonzero(placement == k)
        if not len(rows):
            continue
        members = unsure[rows]
        best, distance = _best(shifted[rows], matrix, norms)
        for i, b, d in zip(members, best, distance / canonical_energy[rows]):
            if d < score[i] - CANONICAL_MARGIN:
                found[i], score[i] = labels[b], d
    return found


def read_many(images: Iterable[Image.Image | np.ndarray], batch_size: int = 128) -> list[Attributes]:
    """Attributes of each 32x32 image (PIL images or 32x32x3 uint8 arrays), in batches for speed."""
    images = list(images)
    results = []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([_as_pixels(image) for image in images[start:start + batch_size]])
        backgrounds, colors, alpha = _read_colors(pixels)
        for background, color, (shape, size, position, style) in zip(backgrounds, colors, _match(alpha)):
            results.append(Attributes(shape, color, background, style, size, position))
    return results


def read(image: Image.Image | np.ndarray) -> Attributes:
    """Attributes of one 32x32 image (PIL or uint8 array); the module docstring says how."""
    return read_many([image])[0]


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
