"""Writing a safetensors file one tensor at a time, so that a file larger than memory can be made.

The format (huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with
spaces to a multiple of 8, as the library writes it), then the tensors' bytes back to back in header
order. Every offset follows from the dtypes and shapes, so the header is written first and each tensor's
bytes when it is produced; the file appears atomically when the last one is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..files import atomic_write

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def write_stream(path: str | os.PathLike, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``produce(name)`` for each spec, in order; each tensor must have its spec's dtype and shape."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} is not one imprompt writes ({', '.join(DTYPES)})")
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for spec in specs:
            tensor = produce(spec.name)
            if tensor.dtype != DTYPES[spec.dtype] or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: produced {tensor.dtype} {list(tensor.shape)}, the header says "
                                 f"{spec.dtype} {list(spec.shape)}")
            f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return Path(path)
