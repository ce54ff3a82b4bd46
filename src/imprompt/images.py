"""Reading input images safely: regular files only, size- and pixel-capped, fully decoded, 8-bit.

Every image imprompt reads from a user (references, masks, init and control images, training and
evaluation data, PNG info) goes through :func:`load_image` or :func:`decode_image`. No torch here:
``imprompt info`` and the server's upload checks import this without the model stack.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import UnsafeFileError, read_regular_file


class ImageInputError(ValueError):
    """An input image (reference, mask, init or control image) that cannot be used."""


# A 97 KB PNG can declare 50000x50000 pixels and take gigabytes to decode (a "decompression bomb").
# 40 megapixels covers every real reference or init image (an 8K frame is 33 MP); override it with
# IMPROMPT_MAX_IMAGE_PIXELS or the ``max_pixels`` argument.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def max_image_pixels() -> int:
    raw = os.environ.get("IMPROMPT_MAX_IMAGE_PIXELS")
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise ImageInputError(f"IMPROMPT_MAX_IMAGE_PIXELS must be a whole number of pixels, got {raw!r}") from None
    if value < 1:
        raise ImageInputError(f"IMPROMPT_MAX_IMAGE_PIXELS must be positive, got {value}")
    return value


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale as 8-bit 'L'. PIL's own convert() clips them at 255 (all white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "I":
        # PNG 16-bit greyscale arrives as 'I' holding 0..65535.
        values = np.asarray(image, dtype=np.int64)
        top = 65535 if values.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(values, 0, top) * 255 // top).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray((np.clip(values / top, 0, 1) * 255).round().astype(np.uint8))
    return image


def decode_image(data: bytes, mode: str = "RGB", *, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (so truncation shows here, not mid-generation), refusing bombs.

    The declared size is checked before any pixel is decoded; EXIF orientation is applied; 16-bit
    images are scaled to 8 bits instead of being clipped.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limit:
                raise ImageInputError(
                    f"{name} declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
                    f"{limit / 1e6:.0f} MP limit; resize it, or raise IMPROMPT_MAX_IMAGE_PIXELS if it is genuine"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_eight_bit(image).convert(mode)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as err:
        # PIL refuses sizes far beyond ours before we can look; say it in our terms.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "too many pixels"
        raise ImageInputError(
            f"{name} declares {size}, over the {limit / 1e6:.0f} MP limit (a decompression bomb?); resize it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which tells a user nothing.
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__
        raise ImageInputError(f"cannot read {name}: {detail}; is it a complete PNG/JPEG/WebP file?") from None


def load_image(path: str | os.PathLike, mode: str = "RGB", *, max_pixels: int | None = None) -> Image.Image:
    """Read an image file (regular files only, size- and pixel-capped) and convert it to ``mode``."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_IMAGE_BYTES, what="image")
    except UnsafeFileError as err:
        raise ImageInputError(str(err)) from None
    return decode_image(data, mode, name=f"image {path.name}", max_pixels=max_pixels)
