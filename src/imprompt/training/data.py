"""Training data sources: caption folders, the official JSON list, and webdataset tar shards.

Every source yields :class:`Record` (a key, the raw image bytes loader, the caption). Unreadable or
truncated images are skipped with a warning and counted (:class:`SkipCounter`), so a long run never
dies on one bad file.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Record:
    key: str
    read: Callable[[], bytes]
    caption: str
    # The image prompt, when it is not the training image itself (e.g. another view of the subject, or
    # the image before an edit the caption describes); the official recipe uses the image itself.
    read_reference: Callable[[], bytes] | None = None


@dataclass
class SkipCounter:
    skipped: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        log.warning("skipping %s: %s", key, reason)
        self.skipped.append(key)


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode fully now: a truncated file fails here, not later
        return image.convert("RGB")


def try_decode(record: Record, counter: SkipCounter, reference: bool = False) -> Image.Image | None:
    """The record's image (or its reference image), or None after counting it as skipped."""
    try:
        return decode_image((record.read_reference if reference else record.read)())
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        counter.skip(record.key, f"{'reference: ' if reference else ''}{type(err).__name__}: {err}")
        return None


def folder_records(folder: Path) -> list[Record]:
    """``name.jpg`` + ``name.txt`` pairs (an image without a caption gets an empty caption)."""
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        records.append(Record(str(path.relative_to(folder)), path.read_bytes, caption))
    if not records:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return records


def json_records(path: Path, root: Path | None) -> list[Record]:
    """The official training list: a JSON array (or JSON lines) of {"image_file": ..., "text": ...}.

    An item may also name ``"reference_file"``: the image prompt for that sample, if not the image itself.
    """
    text = path.read_text()
    items = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    root = root if root is not None else path.parent
    records = []
    for i, item in enumerate(items):
        if "image_file" not in item:
            raise ValueError(f"{path.name} item {i} has no 'image_file' (keys: {sorted(item)})")
        image = root / item["image_file"]
        reference = root / item["reference_file"] if item.get("reference_file") else None
        records.append(Record(item["image_file"], image.read_bytes, str(item.get("text", "")),
                              reference.read_bytes if reference is not None else None))
    return records


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard syntax: 'shards-{000..099}.tar' -> 100 names (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    start, end = match.group(1), match.group(2)
    width = len(start)
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [n for i in range(int(start), int(end) + 1) for n in expand_braces(f"{head}{i:0{width}d}{tail}")]


def _open_shard(name: str):
    if re.match(r"^[a-z]+://", name):
        return urllib.request.urlopen(name)  # noqa: S310 - URLs are the user's own data shards
    return open(name, "rb")


def webdataset_records(pattern: str, counter: SkipCounter) -> Iterator[Record]:
    """Stream samples from tar shards: members sharing a basename form one sample (image + .txt)."""
    for shard in expand_braces(pattern):
        try:
            with _open_shard(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                current, parts = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, _, ext = member.name.partition(".")
                    if current is not None and stem != current:
                        yield from _wds_sample(shard, current, parts)
                        parts = {}
                    current = stem
                    parts[ext.lower()] = tar.extractfile(member).read()
                if current is not None:
                    yield from _wds_sample(shard, current, parts)
        except (tarfile.TarError, OSError) as err:
            counter.skip(shard, f"unreadable shard ({err})")


def _wds_sample(shard: str, key: str, parts: dict[str, bytes]) -> Iterator[Record]:
    image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    if image is None:
        return
    caption = parts.get("txt", parts.get("caption", b"")).decode("utf-8", "replace").strip()
    yield Record(f"{Path(shard).name}/{key}", lambda data=image: data, caption)


def open_source(data: str, root: str | None, counter: SkipCounter) -> list[Record] | Iterator[Record]:
    """A list (random access) for folders and JSON lists; a stream for tar shards."""
    path = Path(data)
    if path.is_dir():
        return folder_records(path)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        return json_records(path, Path(root) if root else None)
    if ".tar" in data:
        return webdataset_records(data, counter)
    raise ValueError(f"training data {data!r}: expected a folder, a .json/.jsonl list, or .tar shards")


@dataclass(frozen=True)
class Prepared:
    """One training image, ready for the frozen encoders."""

    pixels: torch.Tensor  # (3, R, R) in [-1, 1] for the VAE
    original_size: tuple[int, int]  # (height, width) before resizing (SDXL conditioning)
    crop_top_left: tuple[int, int]


def prepare_pixels(image: Image.Image, resolution: int, center_crop: bool, rng: np.random.Generator) -> Prepared:
    """Resize the short side to ``resolution`` and crop a square (official scripts' transform)."""
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if center_crop:
        top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    else:
        top = int(rng.integers(0, image.height - resolution + 1))
        left = int(rng.integers(0, image.width - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return Prepared(pixels, original, (top, left))
