"""Training data sources: caption folders, the official JSON list, and webdataset tar shards.

Every source yields :class:`Record` (a key, the raw image bytes loader, the caption). Unreadable,
truncated or oversized images, decompression bombs and special files (a FIFO named ``x.png``, a
link to ``/dev/zero``) are skipped with a warning and counted (:class:`SkipCounter`), so a long run
never dies, hangs or runs out of memory on one bad file: files are read only through
:func:`imprompt.files.read_regular_file` and decoded only through :func:`imprompt.images.decode_image`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ..images import MAX_IMAGE_BYTES, decode_image
from ..files import UnsafeFileError, check_regular_file, read_regular_file

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CAPTION_BYTES = 1 * 2**20
MAX_LIST_BYTES = 1 * 2**30  # a JSON list of a few million items


@dataclass
class Record:
    key: str
    read: Callable[[], bytes]
    caption: str
    # The image prompt, when it is not the training image itself (e.g. another view of the subject, or
    # the image before an edit the caption describes); the official recipe uses the image itself.
    read_reference: Callable[[], bytes] | None = None
    files: tuple[Path, ...] = ()  # the files it reads, for the feature cache's key


@dataclass
class SkipCounter:
    skipped: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        log.warning("skipping %s: %s", key, reason)
        self.skipped.append(key)


def try_decode(record: Record, counter: SkipCounter, reference: bool = False) -> Image.Image | None:
    """The record's image (or its reference image), or None after counting it as skipped."""
    try:
        data = (record.read_reference if reference else record.read)()
        return decode_image(data, "RGB", name=record.key)
    except (OSError, ValueError) as err:  # UnsafeFileError and ImageInputError are ValueErrors
        counter.skip(record.key, f"{'reference: ' if reference else ''}{err}")
        return None


def _reader(path: Path) -> Callable[[], bytes]:
    """Reads ``path`` when called: regular files only, size-capped (never blocks on a FIFO)."""
    return functools.partial(read_regular_file, path, MAX_IMAGE_BYTES, "image")


def read_caption(path: Path) -> str:
    try:
        return read_regular_file(path, MAX_CAPTION_BYTES, "caption").decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise UnsafeFileError(f"caption {path.name} is not UTF-8 text (byte {err.start})") from None


def folder_records(folder: Path, counter: SkipCounter | None = None) -> list[Record]:
    """``name.jpg`` + ``name.txt`` pairs (an image without a caption gets an empty caption).

    An image whose caption file cannot be read (a FIFO, not UTF-8, too large) is skipped (counted).
    """
    counter = counter if counter is not None else SkipCounter()
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    records = []
    for path in paths:
        key = str(path.relative_to(folder))
        caption_file = path.with_suffix(".txt")
        caption = ""
        if caption_file.exists() or caption_file.is_symlink():
            try:
                caption = read_caption(caption_file)
            except UnsafeFileError as err:
                counter.skip(key, f"caption: {err}")
                continue
        records.append(Record(key, _reader(path), caption, files=(path, caption_file)))
    return records


def json_records(path: Path, root: Path | None) -> list[Record]:
    """The official training list: a JSON array (or JSON lines) of {"image_file": ..., "text": ...}.

    An item may also name ``"reference_file"``: the image prompt for that sample, if not the image itself.
    """
    text = read_regular_file(path, MAX_LIST_BYTES, "training list").decode("utf-8", "replace")
    try:
        if path.suffix == ".json":
            items = json.loads(text)
        else:
            items = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise json.JSONDecodeError(err.msg, line, err.pos) from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}" if path.suffix == ".json" else f"line {number}"
        raise ValueError(f"{path.name} is not valid JSON: {err.msg} ({where}, column {err.colno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path.name}: expected a list of items, found {type(items).__name__}")
    root = root if root is not None else path.parent
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path.name} item {i}: expected an object with 'image_file', found {type(item).__name__}")
        if "image_file" not in item:
            raise ValueError(f"{path.name} item {i} has no 'image_file' (keys: {sorted(item)})")
        image = root / item["image_file"]
        reference = root / item["reference_file"] if item.get("reference_file") else None
        records.append(Record(item["image_file"], _reader(image), str(item.get("text", "")),
                              _reader(reference) if reference is not None else None,
                              files=(image,) if reference is None else (image, reference)))
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


def _is_url(name: str) -> bool:
    return re.match(r"^[a-z]+://", name) is not None


def _open_shard(name: str):
    if _is_url(name):
        return urllib.request.urlopen(name)  # noqa: S310 - URLs are the user's own data shards
    check_regular_file(name, max_bytes=2**50, what="shard")  # a FIFO named x.tar would block open()
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
                    if member.size > MAX_IMAGE_BYTES:
                        counter.skip(f"{Path(shard).name}/{member.name}", f"{member.size / 2**20:.0f} MiB, over the "
                                     f"{MAX_IMAGE_BYTES / 2**20:.0f} MiB limit")
                        continue
                    parts[ext.lower()] = tar.extractfile(member).read()
                if current is not None:
                    yield from _wds_sample(shard, current, parts)
        except (tarfile.TarError, OSError, UnsafeFileError) as err:
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
        return folder_records(path, counter)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        return json_records(path, Path(root) if root else None)
    if ".tar" in data:
        return webdataset_records(data, counter)
    raise ValueError(f"training data {data!r}: expected a folder, a .json/.jsonl list, or .tar shards")


def _stamp(path: str | os.PathLike) -> list:
    """What says a file changed without reading it: size, modification time, kind (or 'missing')."""
    try:
        info = os.stat(path)
    except OSError:
        return ["missing"]
    return [info.st_size, info.st_mtime_ns, info.st_mode >> 12]


def data_fingerprint(data: str, root: str | None, records: list[Record] | Iterable[Record]) -> str:
    """A hash of the training data, for the feature cache's key.

    Folders and JSON lists: every record's key and caption (the list's contents) and the size and
    modification time of each file it reads (images, captions, reference files). Tar shards, which
    stream: each local shard's size and modification time (a URL's name only). Stat-ing is cheap next
    to encoding, and a cache built from other data would silently train on the wrong images.
    """
    digest = hashlib.sha256()
    if isinstance(records, list):
        for r in records:
            digest.update(json.dumps([r.key, r.caption, [_stamp(f) for f in r.files]]).encode())
    else:
        for shard in expand_braces(data):
            digest.update(json.dumps([Path(shard).name if not _is_url(shard) else shard,
                                      _stamp(shard) if not _is_url(shard) else None]).encode())
    return digest.hexdigest()[:16]


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
