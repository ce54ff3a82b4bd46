"""Toy shapes: seeded 32x32 images of one coloured shape on a plain background, with ground truth.

Why this world looks the way it does:

* **32x32 pixels.** A 4x-downsampling VAE turns them into 8x8x4 latents, and a UNet on 8x8x4 latents
  is what a 2-core CPU can train in about an hour (~0.65 s per batch-64 step, measured when the world
  was designed). A pixel-space model at 32x32 learned too little.
* **Few, far-apart values.** Six saturated shape colours, six backgrounds, five shapes with distinct
  silhouettes, two sizes, and only four placements (large shapes are always centred; small ones sit
  left, centre or right). Every free position a model has to learn costs training time, and colour and
  background are learned long before shape, so the world spends its variety on attributes with
  ground truth rather than on jitter.
* **Style is separate from content.** Four fills (solid, striped, dotted, outline) change only the
  inside of a shape. Striped and dotted shapes keep a 1-pixel contour, because a small dotted shape
  without one is a handful of dots whose silhouette neither a person nor a reader can recover.
* **Patterns on the pixel grid.** Stripes and dots repeat every 4 pixels, aligned to the image grid
  (not to the shape), so every 4x4 latent cell inside a striped or dotted shape looks the same and the
  4x VAE can encode the fill as a per-cell code. They sit on even rows/columns so JPEG's 2x2 chroma
  subsampling keeps their colour.
* **Held-out pairs.** ``HELDOUT_PAIRS`` (five shape/colour pairs, one per shape) never occur in the
  train, val or test splits, only in ``heldout``: a model that draws a "blue circle" from an image
  prompt has to compose, not recall.

Rendering is pure numpy float64 (signed distances, 4x4 supersampling, ``np.rint``) so the same
attributes give the same pixels on every machine. Splits draw from separate ``random.Random`` streams
seeded with a string naming the split, which Python hashes with SHA-512 (independent of
``PYTHONHASHSEED``). The world is finite (2,640 attribute combinations), so test images may repeat
train images; the held-out split is the one that measures generalisation.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..files import atomic_dir

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "red", "green", "blue")
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "outline")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")

# Every pair of colours is at least 118 apart in RGB (green-gray), so a blurred, noisy or JPEG'd
# pixel is still nearest to its own colour. No colour lies on the line between two others (no orange between red
# and yellow), so a shape pixel blended with its background is never mistaken for a third colour.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

# One pair per shape, five different colours: each shape and each colour still occurs in training.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "magenta"),
    ("diamond", "red"),
    ("cross", "cyan"),
)

SIZE_PIXELS = {"small": 12, "large": 22}  # bounding-box width of the shape
CENTER_X = {"left": 8.0, "center": 16.0, "right": 24.0}  # on latent-cell boundaries (multiples of 4)
CENTER_Y = 16.0
PERIOD = 4  # stripes and dots repeat every 4 pixels = one latent cell of a 4x VAE
CONTOUR = 1.0  # contour width of striped and dotted shapes, pixels
OUTLINE = 2.0  # line width of the outline style, pixels
SUPERSAMPLE = 4  # 4x4 samples per pixel for anti-aliased edges

# Silhouettes as polygons in a unit box [-1, 1]^2 (y down); the circle is handled by its distance.
_A = 0.4  # half-width of the cross's arms: at the small size they are still ~5 px wide
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.84, -0.84), (0.84, -0.84), (0.84, 0.84), (-0.84, 0.84)),
    "triangle": ((0.0, -0.95), (1.0, 0.85), (-1.0, 0.85)),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
    "cross": ((-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1),
              (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)),
}


@dataclass(frozen=True)
class Attributes:
    """Everything that decides a toy image's pixels (the caption adds wording, not content)."""

    shape: str
    color: str
    background: str
    style: str
    size: str
    position: str

    def __post_init__(self):
        for field, allowed in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS),
                               ("style", STYLES), ("size", SIZES), ("position", POSITIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} shape on a {self.background} background would be invisible")
        if self.size == "large" and self.position != "center":
            raise ValueError(f"large shapes are always centred (got position={self.position!r}); "
                             "only small shapes sit left or right")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    attributes: Attributes
    caption: str


def placements() -> tuple[tuple[str, str], ...]:
    """The (size, position) pairs that occur: large shapes centred, small ones at any position."""
    return tuple(("large", p) for p in POSITIONS if p == "center") + tuple(("small", p) for p in POSITIONS)


# ----------------------------------------------------------------------------------------- rendering

def _polygon_distance(x: np.ndarray, y: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Signed distance from points to a polygon's boundary: negative inside (crossing-number test)."""
    distance = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        ex, ey, wx, wy = bx - ax, by - ay, x - ax, y - ay
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(wx - ex * h, wy - ey * h))
        if ay != by:  # horizontal edges never cross a horizontal ray
            crosses = ((ay > y) != (by > y)) & (x < ax + (y - ay) * ex / ey)
            inside ^= crosses
    return np.where(inside, -distance, distance)


def signed_distance(shape: str, size: str, position: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance in pixels from sample points to the shape's edge (negative inside)."""
    half = SIZE_PIXELS[size] / 2
    cx = CENTER_X[position]
    if shape == "circle":
        return np.hypot(x - cx, y - CENTER_Y) - half
    vertices = [(cx + half * u, CENTER_Y + half * v) for u, v in _POLYGONS[shape]]
    return _polygon_distance(x, y, vertices)


@lru_cache(maxsize=None)
def alpha(shape: str, size: str, position: str, style: str, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Coverage of each pixel by the shape's colour, in [0, 1] (a read-only 32x32 float64 array).

    Every toy image is ``background + alpha * (colour - background)``; there are only 80 distinct
    alpha maps, so they are cached, and the reader matches images against these same maps.
    ``phase`` (rows, columns) shifts the stripes and dots; the dataset always uses (0, 0), the reader
    also tries the other phases so a pattern drawn off the grid still reads as a pattern.
    """
    Attributes(shape, "red", "white", style, size, position)  # validates the names
    s, n = SUPERSAMPLE, IMAGE_SIZE
    coords = (np.arange(n * s) + 0.5) / s
    x, y = np.meshgrid(coords, coords)
    coverage = covered(style, signed_distance(shape, size, position, x, y), x, y, phase=phase)
    coverage = coverage.reshape(n, s, n, s).mean(axis=(1, 3))
    coverage.setflags(write=False)
    return coverage


def covered(style: str, distance: np.ndarray, x: np.ndarray, y: np.ndarray, period: float = PERIOD,
            phase: tuple[float, float] = (0, 0), outline: float = OUTLINE) -> np.ndarray:
    """Which sample points (``x``, ``y`` in pixels, ``distance`` to the shape's edge) the shape's colour covers.

    Stripes are the rows where ``(y - phase[0]) mod period < period / 2``; dots also need the same of
    ``x``. With the world's integer period and phase, a pattern's edges fall on pixel edges, so stripes
    and dots are whole pixels (2x2 dots on a 4-pixel grid); striped and dotted shapes keep a contour.
    :mod:`.augment` draws other periods, phases and outline widths with the same rule.
    """
    inside = distance < 0
    on_row = (y - phase[0]) % period < period / 2
    if style == "solid":
        return inside
    if style == "outline":
        return inside & (distance > -outline)
    if style == "striped":
        return inside & ((distance > -CONTOUR) | on_row)
    on_col = (x - phase[1]) % period < period / 2  # dotted
    return inside & ((distance > -CONTOUR) | (on_row & on_col))


def render(attrs: Attributes) -> Image.Image:
    """Draw the image for these attributes; the same attributes always give the same pixels."""
    a = alpha(attrs.shape, attrs.size, attrs.position, attrs.style)[..., None]
    background = np.array(RGB[attrs.background], dtype=np.float64)
    color = np.array(RGB[attrs.color], dtype=np.float64)
    pixels = np.rint(background + a * (color - background)).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def silhouette(attrs: Attributes) -> Image.Image:
    """The shape's silhouette: white where the shape is, black elsewhere (a 32x32 RGB control image).

    The coverage of the *solid* shape, whatever the image's style, so it carries shape, size and
    position and nothing of colour, background or style: the toy ControlNet's control signal
    (:mod:`imprompt.toy.controlnet`). Edges keep their anti-aliased grey, as the images' edges do.
    """
    coverage = alpha(attrs.shape, attrs.size, attrs.position, "solid")
    mask = np.rint(coverage * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(mask[..., None], 3, axis=2), mode="RGB")


# ------------------------------------------------------------------------------------------ captions

STYLE_WORDS = {"solid": "solid", "striped": "striped", "dotted": "dotted", "outline": "outlined"}
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
_TEMPLATES = (
    "a {thing} on a {background} background",
    "{background} background, {thing}",
    "a {thing} on {background}",
    "{thing}, {background} background",
    "a {thing} against a {background} background",
    "{background} backdrop with a {thing}",
)


def caption(attrs: Attributes, rng: random.Random) -> str:
    """A caption from varied templates; always names shape, colour, background and style.

    Size is mentioned half the time and position a third of the time, so a text-conditioned model
    learns them but also learns to fill them in when a prompt leaves them out.
    """
    words = [STYLE_WORDS[attrs.style], attrs.color]
    if rng.random() < 0.5:
        words.reverse()  # "striped red" and "red striped" are both natural
    if rng.random() < 0.5:
        words.insert(0, attrs.size)
    thing = " ".join(words + [attrs.shape])
    if rng.random() < 1 / 3:
        thing += " " + POSITION_PHRASES[attrs.position]
    return _with_articles(rng.choice(_TEMPLATES).format(thing=thing, background=attrs.background))


def _with_articles(text: str) -> str:
    # word boundaries: a plain replace would also turn "magenta outlined" into "magentan outlined"
    return re.sub(r"\ba outlined\b", "an outlined", text)


PARTIAL_ATTRIBUTES = ("shape", "color", "style", "background")


def partial_caption(attrs: Attributes, rng: random.Random, p_name: float = 0.5, always: Sequence[str] = ()) -> str:
    """A caption that names each of shape, colour, style and background with probability ``p_name``.

    Real alt-texts describe part of an image; the toy captions name every content attribute, so with
    them a text-conditioned UNet needs nothing from an image prompt except on the few training steps
    whose text is dropped (5% in the paper's recipe). Training the toy adapter on partial captions
    makes the image carry the attributes the text leaves out on every step. Only caption words are
    used (the toy tokenizer knows no others); naming nothing gives the empty caption. Attributes in
    ``always`` are named whatever the draw (the draws are made all the same, so the stream does not shift).
    """
    named = {a for a in PARTIAL_ATTRIBUTES if rng.random() < p_name or a in always}
    words = [w for a, w in (("style", STYLE_WORDS[attrs.style]), ("color", attrs.color)) if a in named]
    if len(words) == 2 and rng.random() < 0.5:
        words.reverse()
    if "shape" in named:
        words.append(attrs.shape)
    thing = " ".join(words)
    if "background" not in named:
        return _with_articles(f"a {thing}") if thing else ""
    if not thing:
        return f"{attrs.background} background"
    return _with_articles(rng.choice(_TEMPLATES).format(thing=thing, background=attrs.background))


def edited(attrs: Attributes, rng: random.Random, split: str = "train") -> tuple[str, Attributes]:
    """``attrs`` with one content attribute (drawn uniformly) changed to another value the split allows."""
    pairs = set(allowed_pairs(split))
    values = {"shape": SHAPES, "color": COLORS, "style": STYLES, "background": BACKGROUNDS}
    for attribute in rng.sample(PARTIAL_ATTRIBUTES, len(PARTIAL_ATTRIBUTES)):
        options = [{**asdict(attrs), attribute: v} for v in values[attribute] if v != getattr(attrs, attribute)]
        options = [a for a in options if (a["shape"], a["color"]) in pairs and a["background"] != a["color"]]
        if options:
            return attribute, Attributes(**rng.choice(options))
    raise ValueError(f"no valid edit of {attrs} in split {split!r}")


# -------------------------------------------------------------------------------------------- splits

def allowed_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (shape, colour) pairs a split draws from: only the held-out ones, or all the others."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if split == "heldout":
        return HELDOUT_PAIRS
    return tuple((s, c) for s in SHAPES for c in COLORS if (s, c) not in HELDOUT_PAIRS)


def _draw(rng: random.Random, pairs: Sequence[tuple[str, str]]) -> Attributes:
    shape, color = rng.choice(pairs)
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    style = rng.choice(STYLES)
    size, position = rng.choice(placements())
    return Attributes(shape, color, background, style, size, position)


def sample(split: str, n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of a split; the same (split, n, seed) always gives the same samples.

    Each split has its own random stream (seeded with ``"imprompt-toy/<split>/<seed>"``), and the
    first ``k`` samples of ``sample(split, n, seed)`` do not depend on ``n``. Placements are drawn
    uniformly over the four (size, position) pairs, so every placement is equally well trained: a
    quarter of the shapes are large (and centred), three quarters small.
    """
    pairs = allowed_pairs(split)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(f"imprompt-toy/{split}/{seed}")
    samples = []
    for _ in range(n):
        attrs = _draw(rng, pairs)
        samples.append(Sample(render(attrs), attrs, caption(attrs, rng)))
    return samples


def write_folder(samples: Iterable[Sample], folder: str | os.PathLike) -> Path:
    """Write ``000000.png`` + ``000000.txt`` (caption) pairs and ``metadata.jsonl`` into ``folder``.

    ``metadata.jsonl`` has one line per image with ``file_name``, ``text`` and the attributes, the
    layout Hugging Face ``datasets``' imagefolder loader reads. Files are written to a staging
    folder beside ``folder`` and renamed into place (:func:`imprompt.files.atomic_dir`), so an
    interrupted run leaves no half dataset.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another folder")
    with atomic_dir(folder) as staging:
        with open(staging / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for i, item in enumerate(samples):
                name = f"{i:06d}"
                item.image.save(staging / f"{name}.png")
                (staging / f"{name}.txt").write_text(item.caption + "\n", encoding="utf-8")
                record = {"file_name": f"{name}.png", "text": item.caption, **asdict(item.attributes)}
                metadata.write(json.dumps(record) + "\n")
    return folder


def read_metadata(folder: str | os.PathLike) -> list[tuple[str, str, Attributes]]:
    """``(file_name, caption, attributes)`` for each line of a folder's ``metadata.jsonl``."""
    rows = []
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as metadata:
        for line in metadata:
            record = json.loads(line)
            file_name, text = record.pop("file_name"), record.pop("text")
            rows.append((file_name, text, Attributes(**record)))
    return rows
