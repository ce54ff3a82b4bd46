"""Generation parameters in PNG files, in the text format AUTOMATIC1111 writes and reads.

A ``parameters`` tEXt chunk holding::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15, IP-Adapter: "..."

The last line is ``key: value`` pairs separated by ", "; a value holding a comma, colon or quote is
written as a JSON string (A1111's own quoting rule), which is how A1111, ComfyUI and image viewers'
"PNG info" readers show and re-read it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

from PIL import Image, PngImagePlugin

NEGATIVE = "Negative prompt: "
# key: value where value is a JSON string or runs to the next comma (A1111's infotext pattern).
_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


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


def parse_parameters(text: str) -> dict[str, str]:
    """Read A1111 parameters text back: ``Prompt``, ``Negative prompt`` and every setting, as strings."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    settings: dict[str, str] = {}
    if len(_PAIR.findall(last)) >= 3:  # A1111's own test for "this line is the settings line"
        lines = lines[:-1]
        settings = {k.strip(): unquote(v.strip()) for k, v in _PAIR.findall(last)}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):]
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with a ``parameters`` chunk, atomically (temporary file, then rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_png_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as image:
        return image.info.get("parameters")
