"""Model-file hashes as AUTOMATIC1111 shows them, cached so that a folder of multi-GB files is hashed once.

* :func:`sha256_file`: the SHA-256 of the whole file (A1111 ``hashes.sha256``); :func:`short_hash`
  is its first 10 hex digits, the ``[0123456789]`` A1111 prints after a checkpoint's name and writes
  into infotext as ``Model hash``.
* :func:`addnet_hash`: A1111's LoRA hash for safetensors (``addnet_hash_safetensors``, named after the
  old Additional Networks extension): the SHA-256 of every byte after the header, so editing the
  metadata keeps it; its first 12 hex digits (:func:`addnet_short_hash`) are the LoRA's "shorthash"
  in infotext's ``Lora hashes``.

Cache: ``<folder>/.imprompt-hashes.json`` beside the files, ``{"version": 1, "files": {absolute path:
{"size", "mtime_ns", "sha256"?, "addnet"?}}}``, replaced atomically. An entry whose size or mtime no
longer matches the file is stale and recomputed. When the folder cannot be written (a read-only
share), the per-user cache ``$XDG_CACHE_HOME/imprompt/hashes.json`` (default ``~/.cache``) is used.
A cache that cannot be read is ignored: it only ever saves time, the hashes are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Callable

from ..files import UnsafeFileError, atomic_write

BLOCK_BYTES = 1 << 20
CACHE_NAME = ".imprompt-hashes.json"
_CACHE_VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _digest(path: Path, start: int = 0) -> str:
    """The hex SHA-256 of ``path`` from byte ``start`` on, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path) -> str:
    """The hex SHA-256 of the whole file (cached)."""
    return _cached(path, "sha256", lambda p: _digest(p))


def short_hash(path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path)[:10]


def addnet_hash(path) -> str:
    """A1111's LoRA hash of a safetensors file: the hex SHA-256 of the bytes after its header (cached).
    Raises ValueError for a file that does not start like safetensors (A1111 has no such hash for pickles)."""
    return _cached(path, "addnet", lambda p: _digest(p, _data_start(p)))


def addnet_short_hash(path) -> str:
    """The 12 hex digits A1111 shows for a LoRA (``shorthash``)."""
    return addnet_hash(path)[:12]


def _data_start(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 2 <= length <= _MAX_HEADER_BYTES or 8 + length > size:
        raise ValueError(f"{path.name} is not a safetensors file; the LoRA (addnet) hash is defined for "
                         "safetensors only")
    return 8 + length


# --- cache --------------------------------------------------------------------------------------------

def user_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imprompt" / "hashes.json"


def _cache_files(path: Path) -> tuple[Path, Path]:
    return path.parent / CACHE_NAME, user_cache_file()


def _load(cache_file: Path) -> dict[str, dict]:
    try:
        with open(cache_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _fresh(entry: dict | None, info: os.stat_result) -> bool:
    return bool(entry) and entry.get("size") == info.st_size and entry.get("mtime_ns") == info.st_mtime_ns


def _cached(path, kind: str, compute: Callable[[Path], str]) -> str:
    # Keyed by the real path: a ComfyUI extra_model_paths entry pointing into an A1111 folder, or a
    # symlinked file, shares the entry of the file itself (and the cache beside it).
    path = Path(path).resolve()
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{str(path)!r} is not a regular file; only files are hashed")
    key = str(path)
    for cache_file in _cache_files(path):
        entry = _load(cache_file).get(key)
        if _fresh(entry, info) and isinstance(entry.get(kind), str):
            return entry[kind]
    value = compute(path)  # the stat taken before: a file changed meanwhile is recomputed next time
    _store(path, key, info, kind, value)
    return value


def _store(path: Path, key: str, info: os.stat_result, kind: str, value: str) -> None:
    errors = []
    for cache_file in _cache_files(path):
        files = _load(cache_file)  # read again just before writing: another run may have added entries
        entry = files.get(key) if _fresh(files.get(key), info) else None
        files[key] = {**(entry or {"size": info.st_size, "mtime_ns": info.st_mtime_ns}), kind: value}
        files = {k: v for k, v in files.items() if os.path.exists(k)}  # forget deleted files
        try:
            with atomic_write(cache_file, "w", encoding="utf-8") as f:
                json.dump({"version": _CACHE_VERSION, "files": files}, f, indent=1, sort_keys=True)
            return
        except OSError as err:
            errors.append(f"{cache_file}: {err.strerror or err}")
    warnings.warn(f"hashes are not cached (no cache file could be written: {'; '.join(errors)}); "
                  "they will be computed again next time", stacklevel=3)
