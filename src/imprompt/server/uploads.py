"""Images and files arriving in requests: base64 strings, data URLs and multipart uploads, decoded with
the same limits and messages as the CLI's images (:mod:`imprompt.images`), and size limits checked
before any decoding."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from ..images import ImageInputError, decode_image


class UploadTooLarge(ValueError):
    """An upload over the server's byte limit (HTTP 413)."""


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.I)


def base64_bytes(text: str, *, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or ``data:...;base64,`` URL (as A1111 clients send images)."""
    if not isinstance(text, str):
        raise ImageInputError(f"{field}: expected a base64 string, found {type(text).__name__}")
    text = _DATA_URL.sub("", text.strip(), count=1)
    # 4 base64 characters carry 3 bytes: refuse before decoding what cannot fit.
    if len(text) * 3 // 4 > max_bytes:
        raise UploadTooLarge(f"{field}: the image is over the {max_bytes / 2**20:g} MB upload limit "
                             f"(about {len(text) * 3 / 4 / 2**20:.1f} MB); send a smaller image")
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{field}: not valid base64 (expected a base64 PNG / JPEG / WebP, optionally as a "
                              "data:image/png;base64,... URL)") from None


def decode_upload(data: bytes, *, field: str, max_bytes: int, max_pixels: int, mode: str = "RGB") -> Image.Image:
    if len(data) > max_bytes:
        raise UploadTooLarge(f"{field}: {len(data) / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB upload "
                             "limit; send a smaller image")
    try:  # the header alone gives the size: refuse a pixel bomb before decoding a single pixel
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception:  # noqa: BLE001 - not an image: decode_image names the problem in the CLI's words
        width = height = 0
    if width * height > max_pixels:
        raise UploadTooLarge(f"{field}: {width}x{height} is {width * height / 1e6:.1f} MP, over the "
                             f"{max_pixels / 1e6:g} MP limit; send a smaller image")
    return decode_image(data, mode, name=field, max_pixels=max_pixels)


def decode_embeds_upload(data: bytes, *, field: str, max_bytes: int):
    """An uploaded embeds file (``imprompt encode`` / ``tune``, diffusers, ComfyUI) as ImageFeatures, read as
    the CLI reads one file, after the same byte limit as an image."""
    from ..generation.embeds import embeds_from_bytes

    if len(data) > max_bytes:
        raise UploadTooLarge(f"{field}: {len(data) / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB upload "
                             "limit")
    return embeds_from_bytes(data, field)


def decode_base64_image(text: str, *, field: str, max_bytes: int, max_pixels: int, mode: str = "RGB") -> Image.Image:
    return decode_upload(base64_bytes(text, field=field, max_bytes=max_bytes), field=field, max_bytes=max_bytes,
                         max_pixels=max_pixels, mode=mode)


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """A PNG (with A1111's ``parameters`` text chunk) as base64, as A1111's API returns images."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
