"""Generation parameters in image files, in the text format AUTOMATIC1111 writes and reads.

PNG: a ``parameters`` text chunk. JPEG / WebP: the EXIF ``UserComment``, as A1111 writes it with
piexif (``b"UNICODE\\0"`` and the text in UTF-16). The text::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15, IP-Adapter: "..."

The last line is ``key: value`` pairs separated by ", "; a value holding a comma, colon or quote is
written as a JSON string (A1111's own quoting rule), which is how A1111, ComfyUI and image viewers'
"PNG info" readers show and re-read it.

Reading is linear in the text's length and capped (:data:`MAX_PARAMETERS_CHARS`): the text comes
from files anyone can craft, and a regular expression with a repeated group backtracks
quadratically on a long line without the separator it looks for.
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Mapping

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from ..images import MAX_IMAGE_BYTES, ImageInputError
from ..files import atomic_path, read_regular_file

NEGATIVE = "Negative prompt: "
MAX_PARAMETERS_CHARS = 64 * 1024  # a real prompt and its settings are a few KiB
TRUNCATED = "Truncated"  # the key parse_parameters adds when it read only the first MAX_PARAMETERS_CHARS
_KEY_CHARS = re.compile(r"[\w \-/+]")  # A1111's key alphabet; a key starts with a word character
_WORD = re.compile(r"\w")


def quote(value) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def _closing_quote(line: str, start: int) -> int:
    """Index of the quote closing the JSON-style string opened at ``start``, or -1."""
    i = start + 1
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            i += 2
        elif ch == '"':
            return i
        else:
            i += 1
    return -1


def settings_pairs(line: str) -> list[tuple[str, str]]:
    """The ``key: value`` pairs of a settings line, as A1111's pattern
    ``\\s*(\\w[\\w \\-/]+):\\s*("(?:\\\\.|[^\\\\"])+"|[^,]*)(?:,|$)`` finds them, in linear time.

    Every search moves forward: colons are found left to right, the backward scan for a key stops at
    the previous colon, and a quoted value's scan stops at the next unescaped quote (which the next
    quoted value would start at), so each character is looked at a bounded number of times.
    """
    pairs: list[tuple[str, str]] = []
    n = len(line)
    pos = 0  # where the next pair may start (after the previous pair's comma)
    search = 0  # where to look for the next colon
    while pos < n:
        colon = line.find(":", search)
        if colon < 0:
            break
        search = colon + 1
        start = colon
        while start > pos and _KEY_CHARS.match(line, start - 1):
            start -= 1
        while start < colon and not _WORD.match(line, start):
            start += 1  # a key starts with a word character (the pattern's \s* eats leading spaces)
        if start == colon:
            continue  # no key before this colon: look at the next one
        key = line[start:colon].strip()
        value_start = colon + 1
        while value_start < n and line[value_start].isspace():
            value_start += 1
        end = -1
        if value_start < n and line[value_start] == '"':
            close = _closing_quote(line, value_start)
            if close >= 0 and (close + 1 == n or line[close + 1] == ","):
                end = close + 1
        if end < 0:
            comma = line.find(",", value_start)
            end = n if comma < 0 else comma
        pairs.append((key, line[value_start:end]))
        pos = search = end + 1
    return pairs


def parse_parameters(text: str, max_chars: int = MAX_PARAMETERS_CHARS) -> dict[str, str]:
    """Read A1111 parameters text back: ``Prompt``, ``Negative prompt`` and every setting, as strings.

    Only the first ``max_chars`` characters are read; if there were more, the result says so under
    :data:`TRUNCATED` (with the total length).
    """
    total = len(text)
    text = text[:max_chars]
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    settings: dict[str, str] = {}
    pairs = settings_pairs(last)
    if len(pairs) >= 3:  # A1111's own test for "this line is the settings line"
        lines = lines[:-1]
        settings = {k: unquote(v.strip()) for k, v in pairs}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):]
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}
    if total > max_chars:
        result[TRUNCATED] = f"the parameters text is {total} characters; only the first {max_chars} were read"
    return result


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str, *, exclusive: bool = False) -> Path:
    """Write a PNG with a ``parameters`` chunk, atomically, with the permissions the umask gives.
    ``exclusive``: raise FileExistsError rather than replace an existing file."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path, exclusive=exclusive) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


_COMMENT_CODES = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}


def decode_user_comment(raw: bytes | str) -> str:
    """An EXIF UserComment's text: an 8-byte character-code prefix, then the text.

    A1111 writes ``b"UNICODE\\0"`` and big-endian UTF-16 (piexif's ``UserComment.dump``); some
    writers use little-endian UTF-16, recognisable by ASCII text starting with its zero byte second.
    """
    if isinstance(raw, str):
        return raw.rstrip("\0")
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            encoding, body = ("utf_16_be" if body[:2] == b"\xfe\xff" else "utf_16_le"), body[2:]
        else:
            encoding = "utf_16_le" if len(body) >= 2 and body[0] != 0 and body[1] == 0 else "utf_16_be"
        text = body[: len(body) // 2 * 2].decode(encoding, errors="replace")
    elif prefix in _COMMENT_CODES:
        text = body.decode(_COMMENT_CODES[prefix], errors="replace")
    elif prefix == b"\0" * 8:
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")  # no prefix: A1111's own fallback
    return text.rstrip("\0")


def read_parameters(path: str | os.PathLike) -> str | None:
    """The A1111 parameters text of an image file (PNG text chunk, or JPEG/WebP EXIF UserComment);
    None if it has none. Only regular files are read, and pixels are never decoded."""
    path = Path(path)
    data = read_regular_file(path, MAX_IMAGE_BYTES, what="image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            text = image.info.get("parameters")
            if isinstance(text, str):
                return text
            comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Image.DecompressionBombError:
        raise ImageInputError(f"{path.name} declares more pixels than an image may have; "
                              "it is not an image imprompt or AUTOMATIC1111 wrote") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"cannot read {path.name} as an image ({type(err).__name__}); "
                              "give a PNG, JPEG or WebP file") from None
    if not comment:
        return None
    return decode_user_comment(comment) or None


read_png_parameters = read_parameters  # the earlier name, still used by callers


# Bidirectional-text overrides reorder what a terminal shows ("Trojan Source"); show them escaped.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _escape_char(ch: str) -> str:
    if ch in "\n\t\r":
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (escape sequences, carriage
    returns, bidi overrides) shown as backslash escapes."""
    return "".join(
        _escape_char(ch) if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS else ch for ch in text
    )


def json_safe(text: str) -> str:
    """JSON text (from ``json.dumps(..., ensure_ascii=False)``, which escapes C0 controls itself)
    with the control characters it leaves raw (DEL, C1, bidi overrides) written as ``\\uXXXX``
    escapes: the same JSON value. These characters can only occur inside strings."""
    return "".join(
        f"\\u{ord(ch):04x}" if (ord(ch) >= 0x7f and unicodedata.category(ch) == "Cc") or ch in _BIDI_CONTROLS else ch
        for ch in text
    )
