"""Toy references drawn by other means: a second, independent rasteriser written with PIL.ImageDraw.

:mod:`.shapes` renders every image with its own signed distances, on a 4-pixel grid, with 4x4
supersampling; the toy CLIP, the adapters and the attribute reader have only ever seen those pixels. A
user's reference is drawn by something else (a paint program, a web canvas, a screenshot saved as
JPEG), so this module draws the same :class:`~.shapes.Attributes` with PIL's own polygons, ellipses and
lines, and with seeded perturbations whose size is set by ``strength``:

* the shape off the grid: a sub-pixel plus up to 3 px shift in x and y, and scaled by up to +-15%;
* colours a little off: each channel of the shape and background colours moved by up to +-20 (clipped);
* patterns at their own phase (any, sub-pixel) and period (3-5 px, not the world's 4); an outline
  1.5-3 px wide (the world's is 2);
* other anti-aliasing: none (1 sample per pixel), 2x2 or 8x8 supersampling with a box filter, or 4x
  drawn and reduced with PIL's Lanczos filter;
* then, sometimes, a mild gaussian blur or an unsharp mask, and sometimes a JPEG round trip (quality 60-95).

``strength=0`` is the nominal drawing (the palette's colours, the world's sizes, positions, period 4 at
phase 0, outline 2 px, 4x4 box supersampling, no filter): what the attributes mean, drawn by PIL, which
still differs from :func:`.shapes.render` in its polygons and edge coverage. Every draw is made whatever
the strength (the strength only scales it), so images at different strengths of the same seed are the
same drawing more or less perturbed. The silhouettes below are this module's own (a user draws "a
triangle", not the world's exact one); only names, the palette, sizes and positions are shared.

``toy:drawn-<split>`` in :mod:`imprompt.evaluation.references` names the strength-1 set of a split.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .shapes import CENTER_X, CENTER_Y, IMAGE_SIZE, PERIOD, RGB, SIZE_PIXELS, Attributes, Sample, sample, write_folder

ANTIALIAS: tuple[str, ...] = ("none", "2x", "8x", "lanczos")
MAX_SHIFT = 3.0  # pixels, x and y, at strength 1
MAX_SCALE = 0.15  # relative size change at strength 1
MAX_COLOR = 20  # per channel, at strength 1

# Unit-box silhouettes (y down), this module's own: a user's square fills most of its box, a triangle
# stands on its base, a cross has arms a bit over a third of its width.
_SILHOUETTES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -0.92), (0.98, 0.88), (-0.98, 0.88)),
    "diamond": ((0.0, -0.98), (0.98, 0.0), (0.0, 0.98), (-0.98, 0.0)),
    "cross": ((-0.38, -0.98), (0.38, -0.98), (0.38, -0.38), (0.98, -0.38), (0.98, 0.38), (0.38, 0.38),
              (0.38, 0.98), (-0.38, 0.98), (-0.38, 0.38), (-0.98, 0.38), (-0.98, -0.38), (-0.38, -0.38)),
}


@dataclass(frozen=True)
class Drawing:
    """How one reference is drawn: the perturbations, already scaled by the strength."""

    shift: tuple[float, float]  # (x, y) pixels
    scale: float
    color: tuple[int, int, int]
    background: tuple[int, int, int]
    period: float  # pixels between stripes / dots
    phase: tuple[float, float]  # (rows, columns) pixels
    outline: float  # outline width, pixels
    antialias: str  # one of ANTIALIAS; "4x" for the nominal drawing
    blur: float  # gaussian sigma, pixels; 0: none
    sharpen: int  # unsharp-mask percent; 0: none
    jpeg_quality: int | None


def _jitter(rgb: tuple[int, int, int], rng: random.Random, strength: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c + strength * rng.uniform(-MAX_COLOR, MAX_COLOR)), 0, 255)) for c in rgb)


def draw_plan(attrs: Attributes, rng: random.Random, strength: float = 1.0) -> Drawing:
    """The perturbations of one drawing; every value is drawn whatever ``strength`` (0 to 1) is."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: nominal drawing, 1: full perturbations), got {strength}")
    shift = tuple(strength * rng.uniform(-MAX_SHIFT, MAX_SHIFT) for _ in range(2))
    scale = 1.0 + strength * rng.uniform(-MAX_SCALE, MAX_SCALE)
    color, background = _jitter(RGB[attrs.color], rng, strength), _jitter(RGB[attrs.background], rng, strength)
    other_period, other_aa = rng.random() < strength, rng.random() < strength
    period = float(rng.choice((3, 4, 5))) if other_period else float(PERIOD)
    phase = tuple(strength * rng.uniform(0.0, period) for _ in range(2))
    outline = 2.0 + strength * (rng.uniform(1.5, 3.0) - 2.0)
    antialias = rng.choice(ANTIALIAS) if other_aa else "4x"
    kind, amount = rng.random(), rng.random()
    blur = 0.3 + 0.5 * amount if kind < strength / 4 else 0.0
    sharpen = int(40 + 80 * amount) if strength / 4 <= kind < strength / 2 else 0
    quality = rng.randint(60, 95)
    jpeg_quality = quality if rng.random() < strength / 2 else None
    return Drawing(shift, scale, color, background, period, phase, outline, antialias, blur, sharpen, jpeg_quality)


def _outline_mask(attrs: Attributes, drawing: Drawing, k: int, width: float | None) -> Image.Image:
    """The shape at ``k`` samples per pixel, filled (``width=None``) or as a contour ``width`` px wide."""
    n = IMAGE_SIZE * k
    mask = Image.new("L", (n, n), 0)
    canvas = ImageDraw.Draw(mask)
    half = SIZE_PIXELS[attrs.size] / 2 * drawing.scale
    cx = CENTER_X[attrs.position] + drawing.shift[0]
    cy = CENTER_Y + drawing.shift[1]
    line = None if width is None else max(1, round(width * k))
    if attrs.shape == "circle":
        box = [(cx - half) * k, (cy - half) * k, (cx + half) * k - 1, (cy + half) * k - 1]
        canvas.ellipse(box, fill=255 if line is None else None, outline=None if line is None else 255,
                       width=line or 1)
    else:
        points = [((cx + half * u) * k, (cy + half * v) * k) for u, v in _SILHOUETTES[attrs.shape]]
        if line is None:
            canvas.polygon(points, fill=255)
        else:
            canvas.polygon(points, outline=255, width=line)
    return mask


def _pattern_mask(style: str, drawing: Drawing, k: int) -> Image.Image:
    """Horizontal stripes (half the period thick) or round dots on a square grid, at the drawing's phase."""
    n = IMAGE_SIZE * k
    mask = Image.new("L", (n, n), 0)
    canvas = ImageDraw.Draw(mask)
    p, (py, px) = drawing.period, drawing.phase
    rows = np.arange(-2, IMAGE_SIZE / p + 2) * p + py
    if style == "striped":
        for y in rows:
            canvas.rectangle([0, y * k, n, (y + p / 2) * k - 1], fill=255)
    else:
        radius = 0.3 * p
        for y in rows:
            for x in np.arange(-2, IMAGE_SIZE / p + 2) * p + px:
                canvas.ellipse([(x - radius) * k, (y - radius) * k, (x + radius) * k - 1, (y + radius) * k - 1], fill=255)
    return mask


def _coverage(attrs: Attributes, drawing: Drawing) -> np.ndarray:
    """Coverage of each pixel by the shape's colour, (32, 32) in [0, 1], with the drawing's anti-aliasing."""
    k = {"none": 1, "2x": 2, "4x": 4, "8x": 8, "lanczos": 4}[drawing.antialias]
    inside = np.asarray(_outline_mask(attrs, drawing, k, None)) > 0
    if attrs.style == "solid":
        covered = inside
    elif attrs.style == "outline":
        covered = inside & (np.asarray(_outline_mask(attrs, drawing, k, drawing.outline)) > 0)
    else:  # striped and dotted keep a 1-pixel contour, as in the world, so a small shape keeps its silhouette
        contour = np.asarray(_outline_mask(attrs, drawing, k, 1.0)) > 0
        covered = inside & (contour | (np.asarray(_pattern_mask(attrs.style, drawing, k)) > 0))
    if drawing.antialias == "lanczos":
        small = Image.fromarray(covered.astype(np.uint8) * 255).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        return np.asarray(small, dtype=np.float64) / 255
    return covered.reshape(IMAGE_SIZE, k, IMAGE_SIZE, k).mean(axis=(1, 3))


def draw(attrs: Attributes, drawing: Drawing) -> Image.Image:
    """The 32x32 RGB image of ``attrs`` drawn as ``drawing`` says."""
    a = _coverage(attrs, drawing)[..., None]
    background, color = np.array(drawing.background, float), np.array(drawing.color, float)
    image = Image.fromarray(np.clip(np.rint(background + a * (color - background)), 0, 255).astype(np.uint8), "RGB")
    if drawing.blur:
        image = image.filter(ImageFilter.GaussianBlur(drawing.blur))
    if drawing.sharpen:
        image = image.filter(ImageFilter.UnsharpMask(radius=1, percent=drawing.sharpen, threshold=0))
    if drawing.jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=drawing.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def drawn_samples(split: str, n: int, seed: int = 0, strength: float = 1.0) -> list[Sample]:
    """The attributes and captions of ``shapes.sample(split, n, seed)``, drawn by this module.

    Each image has its own random stream (``"imprompt-toy-drawn/<split>/<seed>/<index>"``), so the
    first ``k`` drawings do not depend on ``n``, and the same arguments always give the same pixels.
    """
    out = []
    for i, s in enumerate(sample(split, n, seed)):
        rng = random.Random(f"imprompt-toy-drawn/{split}/{seed}/{i}")
        out.append(Sample(draw(s.attributes, draw_plan(s.attributes, rng, strength)), s.attributes, s.caption))
    return out


def write_drawn_folder(split: str, n: int, folder: str | os.PathLike, seed: int = 0, strength: float = 1.0) -> Path:
    """:func:`drawn_samples` as a folder in :func:`.shapes.write_folder`'s layout (png + txt + metadata.jsonl)."""
    return write_folder(drawn_samples(split, n, seed, strength), folder)
