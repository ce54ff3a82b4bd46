"""Reading and writing the official IP-Adapter checkpoint formats.

Two layouts exist (tencent-ailab/IP-Adapter, also read by diffusers' ``load_ip_adapter``,
ComfyUI_IPAdapter_plus and the A1111 ControlNet extension):

* ``.bin``: a pickled nested dict ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}``.
  Read with ``torch.load(weights_only=True)`` so a malicious pickle cannot run code.
* ``.safetensors``: the same tensors flat, with ``image_proj.`` / ``ip_adapter.`` prefixes.

Both are written from the module's own ``state_dict()`` (whose keys are already the flat layout),
and writes are atomic: a temporary file in the target folder, then a rename.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import IPAdapter
from .variants import AdapterVariant, CheckpointError, check_not_faceid

HALVES = ("image_proj", "ip_adapter")


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat ``image_proj.* / ip_adapter.*`` state of an official checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path.name}: not a complete safetensors file ({err}); re-download it") from err
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            nested = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zip errors...
            raise CheckpointError(
                f"cannot read {path.name}: truncated, corrupt, or a pickle holding more than tensors "
                f"(only weights are loaded, for safety): {type(err).__name__}: {err}"
            ) from err
        return flatten(nested, source=path.name)
    raise CheckpointError(f"{path.name}: unknown checkpoint extension {path.suffix!r}; expected .safetensors or .bin")


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
    return adapter.to(dtype) if dtype is not None else adapter


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
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter.to(dtype) if dtype is not None else adapter


def save_adapter(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """Write in the official format chosen by the extension (``.safetensors`` or ``.bin``), atomically."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    if path.suffix not in (".safetensors", ".bin"):
        raise ValueError(f"cannot save to {path.name}: use a .safetensors or .bin file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            save_file(state, tmp, metadata={"format": "pt"})
        else:
            # Fresh storages per tensor, so the pickle does not depend on how the weights were loaded.
            # Saved through a file object: given a path, torch names the zip's folder after the
            # (random) temporary file name and the bytes would differ from save to save.
            with open(tmp, "wb") as f:
                torch.save(nest({k: v.clone() for k, v in state.items()}), f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
