"""Training pictures the renderer never makes: the toy world drawn with its geometry loosened.

Issue 16: a user's reference is drawn by a paint program, a web canvas or a screenshot saved as JPEG,
not by :func:`.shapes.render`; the toy CLIP trained on the renderer's exact pixels reads such pictures
badly (zero-shot shape 25% on :mod:`.drawn`'s strength-1 references against 95% on the renderer's).
This module renders the same :class:`~.shapes.Attributes` with the world's own signed distances
(:func:`.shapes.signed_distance`), loosened in the ways pictures drawn elsewhere differ:

* the shape shifted off the 4-pixel grid by any sub-pixel amount up to ``shift`` px, scaled, a little
  wider or taller than the world's and turned by a few degrees (a user's square is not the world's);
* stripes and dots at another period (``periods``) and any phase, outlines of another width;
* other anti-aliasing: 1, 2, 4 or 8 samples per pixel side (1: hard edges);
* the shape's and the background's colours each moved per channel by up to ``color``;
* then, sometimes, a gaussian blur, an unsharp mask or a JPEG round trip.

It shares no drawing code with :mod:`.drawn`, the independent rasteriser the robustness is measured
with (its polygons, PIL's fills and its anti-aliasing filters are its own), so a gain measured there
is not the augmentation recognising itself.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .shapes import CENTER_X, CENTER_Y, IMAGE_SIZE, OUTLINE, PERIOD, RGB, Attributes, covered, signed_distance

SAMPLES_PER_PIXEL: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class Augmentation:
    """How far an augmented picture may stray from the renderer's (each value is the maximum)."""

    shift: float = 3.0  # pixels, x and y
    scale: float = 0.15  # relative size change
    aspect: float = 0.12  # relative width-to-height change
    rotation: float = 8.0  # degrees either way (45 would turn a square into a diamond)
    periods: tuple[float, float] = (3.0, 5.0)  # stripe / dot period range, pixels (the world's is 4)
    outline: tuple[float, float] = (1.5, 3.0)  # outline width range, pixels (the world's is 2)
    color: float = 24.0  # per channel, shape and background colour each
    blur_p: float = 0.2
    sharpen_p: float = 0.15
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (60, 95)

    def __post_init__(self):
        if self.shift < 0 or not 0 <= self.scale < 0.5 or not 0 <= self.aspect < 0.5 or self.color < 0:
            raise ValueError(f"shift and color must be >= 0, scale and aspect in [0, 0.5), got shift={self.shift}, "
                             f"scale={self.scale}, aspect={self.aspect}, color={self.color}")
        if not 0 <= self.rotation < 22.5:
            raise ValueError(f"rotation must be in [0, 22.5) degrees (45 turns a square into a diamond), "
                             f"got {self.rotation}")
        if not 0 < self.periods[0] <= self.periods[1] or not 0 < self.outline[0] <= self.outline[1]:
            raise ValueError(f"periods and outline are (low, high) ranges of positive pixels, got periods="
                             f"{self.periods}, outline={self.outline}")
        for name in ("blur_p", "sharpen_p", "jpeg_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")


def coverage(attrs: Attributes, shift: tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
             aspect: float = 1.0, rotation: float = 0.0, period: float = PERIOD,
             phase: tuple[float, float] = (0.0, 0.0), outline: float = OUTLINE, samples: int = 4) -> np.ndarray:
    """Coverage of each pixel by the shape's colour, (32, 32) in [0, 1], for a loosened drawing.

    With the defaults it is :func:`.shapes.alpha` (same distances, same 4x4 samples); the shape is
    moved by ``shift`` (x, y), scaled about its centre by ``scale`` (its width by ``scale * aspect``,
    its height by ``scale / aspect``) and turned by ``rotation`` degrees; the pattern has its own
    ``period`` and ``phase`` (rows, columns; in pixels of the image, not of the shape). Distances
    are the unturned shape's scaled by ``scale``: exact without ``aspect``, near enough with it.
    """
    n = IMAGE_SIZE * samples
    coords = (np.arange(n) + 0.5) / samples
    x, y = np.meshgrid(coords, coords)
    cx, cy = CENTER_X[attrs.position], CENTER_Y
    # Map each sample point back onto the world's shape: undo the shift, the turn, then the scales.
    u, v = x - cx - shift[0], y - cy - shift[1]
    if rotation:
        c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
        u, v = c * u + s * v, -s * u + c * v
    distance = scale * signed_distance(attrs.shape, attrs.size, attrs.position,
                                       cx + u / (scale * aspect), cy + v * aspect / scale)
    hit = covered(attrs.style, distance, x, y, period=period, phase=phase, outline=outline)
    return hit.reshape(IMAGE_SIZE, samples, IMAGE_SIZE, samples).mean(axis=(1, 3))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: float) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float64) + [rng.uniform(-amount, amount) for _ in range(3)], 0, 255)


def augmented(attrs: Attributes, rng: random.Random, aug: Augmentation = Augmentation()) -> Image.Image:
    """One loosened picture of ``attrs`` (32x32 RGB); every draw comes from ``rng``, so a seed repeats it."""
    period = rng.uniform(*aug.periods)
    a = coverage(attrs, shift=(rng.uniform(-aug.shift, aug.shift), rng.uniform(-aug.shift, aug.shift)),
                 scale=1.0 + rng.uniform(-aug.scale, aug.scale), aspect=1.0 + rng.uniform(-aug.aspect, aug.aspect),
                 rotation=rng.uniform(-aug.rotation, aug.rotation), period=period,
                 phase=(rng.uniform(0, period), rng.uniform(0, period)), outline=rng.uniform(*aug.outline),
                 samples=rng.choice(SAMPLES_PER_PIXEL))[..., None]
    background, color = _jitter(RGB[attrs.background], rng, aug.color), _jitter(RGB[attrs.color], rng, aug.color)
    image = Image.fromarray(np.rint(background + a * (color - background)).astype(np.uint8), "RGB")
    kind, amount = rng.random(), rng.random()
    if kind < aug.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(0.3 + 0.6 * amount))
    elif kind < aug.blur_p + aug.sharpen_p:
        image = image.filter(ImageFilter.UnsharpMask(radius=1, percent=int(40 + 100 * amount), threshold=0))
    if rng.random() < aug.jpeg_p:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(*aug.jpeg_quality))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def augmented_array(attributes: list[Attributes], seed: int, aug: Augmentation = Augmentation()) -> np.ndarray:
    """(N, 32, 32, 3) uint8: one loosened picture per item, item i from its own stream (seed, i)."""
    return np.stack([np.asarray(augmented(a, random.Random(f"imprompt-toy/augment/{seed}/{i}"), aug))
                     for i, a in enumerate(attributes)])
