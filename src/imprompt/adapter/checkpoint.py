"""Reading and writing the official IP-Adapter checkpoint formats.

Two layouts exist (tencent-ailab/IP-Adapter, also read by diffusers' ``load_ip_adapter``,
ComfyUI_IPAdapter_plus and the A1111 ControlNet extension):

* ``.bin``: a pickled nested dict ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}``.
  Read through :func:`imprompt.files.load_torch_weights` (weights only), so a malicious pickle cannot
  run code.
* ``.safetensors``: the same tensors flat, with ``image_proj.`` / ``ip_adapter.`` prefixes.

Both are written from the module's own ``state_dict()`` (whose keys are already the flat layout),
atomically and with the umask's permissions, through :mod:`imprompt.files`.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import (PickleRefusedError, UnsafeFileError, atomic_path, atomic_write, check_regular_file,
                     load_torch_weights)
from .model import IPAdapter, check_finite
from .variants import AdapterVariant, CheckpointError, check_not_faceid

HALVES = ("image_proj", "ip_adapter")


# Adapters are at most a few GB (SDXL plus: 1.0 GB in fp32); the cap only stops a device file or a
# runaway download from being read whole.
MAX_CHECKPOINT_BYTES = 64 * 2**30
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat ``image_proj.* / ip_adapter.*`` state of an official checkpoint file.

    The file's first bytes are read before the loader runs, so that a file whose name lies (a torch
    pickle called ``.safetensors``, a Git LFS pointer, an HTML error page) is named for what it is
    instead of being called truncated.
    """
    path = Path(path)
    try:
        check_regular_file(path, MAX_CHECKPOINT_BYTES, what="adapter checkpoint")
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise CheckpointError(f"{path.name}: unknown checkpoint extension {path.suffix!r}; expected .safetensors or .bin")
    content = sniff(path)
    name = path.name
    if content == "empty":
        raise CheckpointError(f"adapter checkpoint {name} is empty (0 bytes); re-download it")
    if content == "lfs":
        raise CheckpointError(f"{name} is a Git LFS pointer, not the weights: fetch the file itself "
                              "(git lfs pull, or download it from the model page)")
    if content in ("html", "text"):
        expected = "a safetensors file" if path.suffix == ".safetensors" else "a PyTorch checkpoint"
        raise CheckpointError(
            f"{name} is an HTML page, not {expected} (a failed download?): download it again from its direct link"
            if content == "html" else
            f"{name} is a text file, not {expected}: give the adapter's weights file (.safetensors or .bin)"
        )
    if path.suffix == ".safetensors":
        if content == "torch":
            raise CheckpointError(f"{name} is a PyTorch pickle (torch.save), not a safetensors file, despite its "
                                  f"name: rename it to {path.stem}.bin")
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            what = "truncated or corrupt safetensors file" if content == "safetensors" else "not a safetensors file, or truncated"
            raise CheckpointError(f"cannot read {name}: {what} ({_first_line(err)}); re-download it") from None
    if content == "safetensors":
        raise CheckpointError(f"{name} is a safetensors file, not a PyTorch pickle: rename it to {path.stem}.safetensors")
    if content != "torch":  # not even the start of a torch.save file: do not hand it to the unpickler
        raise CheckpointError(f"cannot read {name}: truncated, or not a PyTorch checkpoint (it does not begin like a "
                              "torch.save file); re-download it")
    try:
        nested = load_torch_weights(path, what="adapter checkpoint")
    except PickleRefusedError as err:
        raise CheckpointError(str(err)) from None
    return flatten(nested, source=name)


def sniff(path: Path) -> str:
    """What a file holds, from its first bytes: 'empty', 'safetensors', 'torch' (a ``torch.save`` zip
    or legacy pickle), 'cut' (too short to tell), 'lfs' (a Git LFS pointer), 'html', 'text' or 'unknown'."""
    # O_NONBLOCK: should the checked file have been swapped for a FIFO since, open does not block.
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        head = f.read(4096)
        size = os.fstat(f.fileno()).st_size
    if not head:
        return "empty"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5):
        return "torch"  # zip (torch >= 1.6) or a pickle stream (protocol 2-5: legacy torch.save)
    if b"PK\x03\x04".startswith(head) or head == b"\x80":
        return "cut"  # the first bytes of one of those, and nothing more
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    # Text only on real evidence: a few bytes of a cut binary file can look printable.
    if len(head) >= 16 and all(b >= 0x20 or b in b"\t\n\r" for b in head):
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return "unknown"
        start = text.lstrip().lower()
        return "html" if start.startswith(("<!doctype html", "<html")) else "text"
    return "unknown"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def flatten(nested: Mapping, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Official nested dict -> flat prefixed state. An already flat state passes through."""
    if not isinstance(nested, Mapping):
        raise CheckpointError(f"{source} holds a {type(nested).__name__}, expected a dict of tensors")
    check_not_faceid(str(k) for k in nested)
    if all(isinstance(nested.get(h), Mapping) for h in HALVES):
        extra = sorted(set(nested) - set(HALVES))
        if extra:
            raise CheckpointError(f"{source} has unexpected top-level entry {extra[0]!r} besides image_proj / ip_adapter")
        nested = {f"{h}.{k}": v for h in HALVES for k, v in nested[h].items()}
    elif "state_dict" in nested or "module" in nested:
        raise CheckpointError(
            f"{source} looks like a training checkpoint (accelerate/lightning state), not an adapter file; "
            "extract its image_proj / ip_adapter weights into the official layout first"
        )
    for k, v in nested.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    return dict(nested)


def nest(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat prefixed state -> the official nested ``.bin`` layout."""
    out: dict[str, dict[str, torch.Tensor]] = {h: {} for h in HALVES}
    for key, value in state.items():
        half, _, rest = key.partition(".")
        out[half][rest] = value
    return out


def load_adapter(path: str | os.PathLike, dtype: torch.dtype | None = None) -> IPAdapter:
    """Read, detect and check an official checkpoint; returns the adapter on the CPU."""
    adapter = IPAdapter.from_state_dict(read_state(path))
    if adapter.variant.projection == "faceid_plus":
        adapter.shortcut_default = is_plus_v2(Path(path).name)
    return adapter.to(dtype) if dtype is not None else adapter


def is_plus_v2(file_name: str) -> bool:
    """FaceID-PlusV2 (``ip-adapter-faceid-plusv2_sd15.bin``), which wants the shortcut, by its file name:
    its weights have FaceID-Plus's shapes. The official examples choose ``shortcut = "v2" in name``."""
    return "v2" in file_name.lower()


def load_shared_adapter(path: str | Path, dtype: torch.dtype | None = None) -> IPAdapter:
    """A shared-attention adapter file (``image_proj.*`` only, linear projection) as an IPAdapter without layers."""
    state = read_state(path)
    layers = sorted(k for k in state if not k.startswith("image_proj."))
    if layers:
        raise CheckpointError(f"{Path(path).name} has decoupled-attention weights (e.g. {layers[0]!r}): it is an "
                              "IP-Adapter, not a shared adapter; use kind: ip_adapter")
    proj = {k[len("image_proj."):]: v for k, v in state.items()}
    if set(proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise CheckpointError(f"{Path(path).name}: a shared adapter holds a linear projection (image_proj.proj.* and "
                              f"image_proj.norm.*), found {sorted(proj)}")
    width = proj["norm.weight"].shape[0]
    total, embed_dim = proj["proj.weight"].shape
    if total % width:
        raise CheckpointError(f"image_proj.proj.weight has {total} rows, not a multiple of the token width {width}")
    with torch.device("meta"):
        adapter = IPAdapter(AdapterVariant("linear", embed_dim, width, total // width), {})
    for key, param in adapter.state_dict().items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(f"{Path(path).name}: {key!r} has shape {tuple(state[key].shape)}, expected "
                                  f"{tuple(param.shape)} for a shared adapter of {width}-wide tokens")
    check_finite(state)
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter.to(dtype) if dtype is not None else adapter


def save_adapter(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """Write in the official format chosen by the extension (``.safetensors`` or ``.bin``), atomically."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    if path.suffix not in (".safetensors", ".bin"):
        raise ValueError(f"cannot save to {path.name}: use a .safetensors or .bin file name")
    if path.suffix == ".safetensors":
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        # Fresh storages per tensor, so the pickle does not depend on how the weights were loaded.
        # Saved through a file object: given a path, torch names the zip's folder after the
        # (random) temporary file name and the bytes would differ from save to save.
        with atomic_write(path, "wb") as f:
            torch.save(nest({k: v.clone() for k, v in state.items()}), f)
    return path
