"""Tiled references: a reference of any aspect ratio cut into encoder-sized squares, each encoded alone.

A CLIP image encoder sees one square (224 px for ViT-H); the usual preprocessing centre-crops a wide
reference and loses its sides. Tiling, as ComfyUI_IPAdapter_plus's ``IPAdapterTiled`` does, resizes the
reference so its short side is the encoder's size and covers the long side with squares of that size,
spread evenly with at least the overlap asked for. Each tile becomes one unit of the image prompt (its
own encoder features and tokens, concatenated with the others' like several references), optionally
acting only on its own part of the output (``masks``).

Where we differ from IPAdapterTiled, on purpose: tiles are the encoder's own size (it uses 256 px tiles
that the encoder then scales to 224), a near-square reference is one tile (it makes 2x2 tiles of a 512 px
square), there is no cap of 4 tiles, the overlap is a minimum the user sets (it only spreads the tiles
it needs), and the resize is the encoder's own (bicubic, shortest side, ``int`` of the long side, as
transformers' ``CLIPImageProcessor`` computes it), so that a square reference tiled is bit for bit the
same pixels as the untiled path.

``enhance``: the whole reference (as the untiled path sees it: centre crop or pad) is encoded too and
comes first, before the tiles: global content plus detail. This is our definition; ComfyUI's
``IPAdapterClipVisionEnhancer`` instead splits the encoder's 224 px input into a grid of sub-tiles
(``enhance_tiles``), merges their hidden states back into one token grid and concatenates it after the
whole image's features scaled by ``enhance_ratio``.

Geometry is pure functions on sizes (tested against hand-computed boxes); the sharpening is AMD
FidelityFX Contrast Adaptive Sharpening (CAS), in the 3x3 form with the diagonal ring that
ComfyUI_IPAdapter_plus uses (``contrast_adaptive_sharpening``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels of the resized reference
Region = tuple[float, float, float, float]  # the same box as fractions of the resized reference


@dataclass(frozen=True)
class TileOptions:
    """How one adapter's references are tiled.

    ``overlap``: the least overlap between neighbouring tiles, as a fraction of a tile (0 to 0.9).
    ``sharpen``: contrast-adaptive sharpening of the resized reference before cutting, 0 (off) to 1.
    ``masks``: each tile acts only on its own part of the output (the same fractions of the output's
    width and height as the tile has of the reference); otherwise every tile acts everywhere.
    ``enhance``: the whole reference is encoded too, as one more unit before its tiles.
    """

    overlap: float = 0.0
    sharpen: float = 0.0
    masks: bool = False
    enhance: bool = False

    def check(self) -> None:
        if not (math.isfinite(self.overlap) and 0.0 <= self.overlap <= 0.9):
            raise ValueError(f"tile overlap must be a fraction of a tile from 0 to 0.9, got {self.overlap}")
        if not (math.isfinite(self.sharpen) and 0.0 <= self.sharpen <= 1.0):
            raise ValueError(f"tile sharpening must be 0 (off) to 1, got {self.sharpen}")

    def describe(self) -> str:
        parts = [f"overlap {self.overlap:g}"] if self.overlap else []
        parts += [f"sharpen {self.sharpen:g}"] if self.sharpen else []
        parts += ["masked"] if self.masks else []
        parts += ["enhance"] if self.enhance else []
        return "tiles" + (f" ({', '.join(parts)})" if parts else "")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size`` and the long side ``int(size * long / short)``:
    the shortest-edge resize of transformers' CLIPImageProcessor (``get_resize_output_image_size``)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"an image needs a positive size, got {width}x{height}")
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def tile_starts(length: int, size: int, overlap: float = 0.0) -> list[int]:
    """Where tiles of ``size`` start along a side of ``length`` (>= size), covering it end to end.

    As few tiles as keep neighbours overlapping by at least ``overlap * size``: n tiles cover
    ``n * size - (n - 1) * o`` pixels with overlap o, so n = ceil((length - overlap * size) /
    ((1 - overlap) * size)). They are then spread evenly, the first at 0 and the last ending at
    ``length``; starts are rounded down (as IPAdapterTiled's ``int(x * (tile_size - overlap))``).
    """
    if length < size:
        raise ValueError(f"a side of {length} px is shorter than one {size} px tile")
    n = max(1, math.ceil((length - overlap * size) / ((1.0 - overlap) * size) - 1e-9))
    if n == 1:  # only when length == size: any longer side needs a second tile
        return [0]
    stride = (length - size) / (n - 1)
    return [int(i * stride) for i in range(n)]


def tile_boxes(width: int, height: int, size: int, overlap: float = 0.0) -> list[Box]:
    """The tiles of a ``width`` x ``height`` image already resized (short side == ``size``), row-major."""
    return [(x, y, x + size, y + size) for y in tile_starts(height, size, overlap)
            for x in tile_starts(width, size, overlap)]


def tile_regions(boxes: list[Box], width: int, height: int) -> list[Region]:
    """Each box as fractions (left, top, right, bottom) of the image it was cut from."""
    return [(l / width, t / height, r / width, b / height) for l, t, r, b in boxes]


def region_mask(region: Region, height: int, width: int) -> torch.Tensor:
    """A (height, width) float mask, 1 inside ``region`` (fractions of the frame), 0 outside; edges
    rounded to the nearest row and column."""
    l, t, r, b = region
    mask = torch.zeros(height, width)
    mask[round(t * height):max(round(b * height), round(t * height) + 1),
         round(l * width):max(round(r * width), round(l * width) + 1)] = 1.0
    return mask


def contrast_adaptive_sharpening(pixels: np.ndarray, amount: float) -> np.ndarray:
    """AMD FidelityFX CAS on a float (H, W, C) image in [0, 1]; ``amount`` 0 to 1 (sharpness).

    Per pixel with 3x3 neighbourhood a b c / d e f / g h i: the cross (b d e f h) and diagonal
    (a c g i) minima and maxima are summed (mn, mx in [0, 2]); amp = sqrt(clip(min(mn, 2 - mx) / mx));
    w = -amp * lerp(1/8, 1/5, amount); out = (w (b + d + f + h) + e) / (1 + 4 w). Edges repeat the
    border pixel (ComfyUI pads with zeros, which darkens the border's neighbourhood).
    """
    p = np.pad(pixels.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    a, b, c = at(-1, -1), at(-1, 0), at(-1, 1)
    d, e, f = at(0, -1), at(0, 0), at(0, 1)
    g, hh, i = at(1, -1), at(1, 0), at(1, 1)
    cross, diag = np.stack([b, d, e, f, hh]), np.stack([a, c, g, i])
    mn = cross.min(0) + diag.min(0)
    mx = cross.max(0) + diag.max(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        amp = np.sqrt(np.clip(np.nan_to_num(np.minimum(mn, 2.0 - mx) / mx), 0.0, 1.0))
    weight = -amp * (1 / 8 + amount * (1 / 5 - 1 / 8))
    out = ((b + d + f + hh) * weight + e) / (1.0 + 4.0 * weight)
    return np.clip(np.nan_to_num(out), 0.0, 1.0)


def sharpen(image: Image.Image, amount: float) -> Image.Image:
    if amount <= 0:
        return image
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return Image.fromarray(np.round(contrast_adaptive_sharpening(pixels, amount) * 255).astype(np.uint8))


@dataclass(frozen=True)
class Tiles:
    images: list[Image.Image]  # size x size each
    boxes: list[Box]
    regions: list[Region]


def cut_tiles(image: Image.Image, size: int, options: TileOptions) -> Tiles:
    """Resize ``image`` (short side ``size``, bicubic as the encoder's processor), sharpen, cut."""
    image = image.convert("RGB")
    width, height = resized_size(image.width, image.height, size)
    resized = image if (width, height) == image.size else image.resize((width, height), Image.BICUBIC)
    resized = sharpen(resized, options.sharpen)
    boxes = tile_boxes(width, height, size, options.overlap)
    return Tiles([resized.crop(box) for box in boxes], boxes, tile_regions(boxes, width, height))
