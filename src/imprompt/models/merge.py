"""Checkpoint merges as AUTOMATIC1111's Checkpoint Merger makes them, with per-block weights as the
Merge Block Weighted extension (bbc-mc/sdweb-merge-block-weighted-gui) defines them.

Methods (A1111 ``modules/extras.py``, ``run_modelmerger``), with M the multiplier ``alpha``:

- ``weighted_sum``:   ``A * (1 - M) + B * M``
- ``add_difference``: ``A + (B - C) * M``

Every key of A that B (and C) also hold with the same shape is merged; keys only in A are kept; keys only
in B whose name contains ``model`` are added (as A1111 does); ``position_ids`` buffers are copied from A,
never merged. An inpainting A (9 input channels) with a plain B merges the first 4 input channels and
keeps the other 5; a plain A with an inpainting B is refused (A1111: "A must be the inpainting model").

Block weights: one weight per UNet block, ``IN00 .. IN{n-1}``, ``M00``, ``OUT00 .. OUT{n-1}`` (25 for
SD1.5 / SD2 with 12 input blocks, 19 for SDXL with 9); as in the MBW extension ``time_embed`` takes IN00's
weight, the final ``out`` OUT{n-1}'s, and everything outside the UNet (text encoders, VAE) ``alpha``.

The merge is streamed: each output tensor is computed from one tensor of each input and written before
the next is read (:func:`imprompt.models.safetensors_stream.write_stream`), so merging two SDXL
checkpoints never holds a whole model in memory. The file is written atomically with A1111's
``sd_merge_recipe`` metadata.

sd-mecha (PyPI) is a maintained merger, not used here: its block-level weights are tied to its registered
model configs, which it identifies from the key set, so the tiny and toy models imprompt is tested on get
only its structural fallback; the two formulas over a tensor stream are a few lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapter.variants import CheckpointError
from ..config import option
from .hashes import short_hash
from .safetensors_stream import TensorSpec, write_stream

METHODS = ("weighted_sum", "add_difference")
UNET = "model.diffusion_model."
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
_INPUT = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\.")
_INPAINT_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass
class MergeConfig:
    # A, B and C are the command's positional arguments (imprompt merge A B [C])
    a: str = ""
    b: str = ""
    c: str | None = None
    method: str = field(default="weighted_sum", metadata=option("A*(1-M) + B*M, or A + (B-C)*M", choices=list(METHODS)))
    alpha: float = field(default=0.5, metadata=option("the multiplier M"))
    blocks: str | None = field(default=None, metadata=option(
        "per-block M: IN00..,M00,OUT.. comma-separated (25 for SD1.5, 19 for SDXL); alpha stays for the text "
        "encoders and the VAE"))
    vae: str | None = field(default=None, metadata=option("bake in this VAE (its weights replace first_stage_model.*)"))
    half: bool = field(default=False, metadata=option("save float16 (A1111's 'Save as float16')"))
    output: str = field(default="", metadata=option("the merged .safetensors to write"))

    def check(self) -> None:
        if not self.a or not self.b or not self.output:
            raise ValueError("imprompt merge needs A, B and --output")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.method == "add_difference") != (self.c is not None):
            raise ValueError("add_difference needs a third model C, and only add_difference uses one")
        if not Path(self.output).name.endswith(".safetensors"):
            raise ValueError(f"--output must be a .safetensors file, got {self.output!r}")
        block_weights(self.blocks)


def block_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--blocks must be comma-separated numbers, got {text!r}") from None
    if len(weights) % 2 == 0 or len(weights) < 3:
        raise ValueError(f"--blocks takes 2n+1 weights (IN00..IN(n-1), M00, OUT00..OUT(n-1): 25 for SD1.5, 19 for "
                         f"SDXL), got {len(weights)}")
    return weights


def block_index(key: str, inputs: int) -> int | None:
    """The MBW weight index of a UNet key (None: not a UNet key, use alpha)."""
    if not key.startswith(UNET):
        return None
    if ".time_embed." in key or key.startswith(UNET + "time_embed."):
        return 0
    if key.startswith(UNET + "out."):
        return 2 * inputs
    if m := _INPUT.match(key):
        return int(m.group(1))
    if key.startswith(UNET + "middle_block."):
        return inputs
    if m := _OUTPUT.match(key):
        return inputs + 1 + int(m.group(1))
    return None  # label_emb (SDXL): alpha, as the extension leaves it


def merge_tensor(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, method: str, m: float) -> torch.Tensor:
    """A1111's formulas, computed in A's dtype."""
    b = b.to(a.dtype)
    if method == "weighted_sum":
        return a * (1 - m) + b * m
    return a + (b - c.to(a.dtype)) * m


class _Reader:
    """Tensors of one safetensors file, read one at a time."""

    def __init__(self, path: str, what: str):
        from safetensors import safe_open

        from .inspect import HeaderError, read_header

        self.path = Path(path)
        try:
            self.header, self.metadata = read_header(self.path)
        except (HeaderError, OSError) as err:
            raise CheckpointError(f"model {what} ({self.path.name}): not a usable safetensors file: {err}") from None
        self._file = safe_open(str(self.path), framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key][1])

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def merge_checkpoints(config: MergeConfig, log: Callable[[str], None] = print) -> Path:
    """Write the merge ``config`` describes; returns the output path."""
    config.check()
    a, b = _Reader(config.a, "A"), _Reader(config.b, "B")
    c = _Reader(config.c, "C") if config.c else None
    vae = _Reader(config.vae, "VAE") if config.vae else None
    weights = block_weights(config.blocks)
    inputs = 1 + max((int(m.group(1)) for k in a.keys() if (m := _INPUT.match(k))), default=-1)
    if weights is not None and len(weights) != 2 * inputs + 1:
        raise ValueError(f"--blocks has {len(weights)} weights, but A's UNet has {inputs} input blocks, so it takes "
                         f"{2 * inputs + 1} (IN00..IN{inputs - 1:02d}, M00, OUT00..OUT{inputs - 1:02d})")
    if _INPAINT_KEY in a.header and _INPAINT_KEY in b.header:
        channels_a, channels_b = a.shape(_INPAINT_KEY)[1], b.shape(_INPAINT_KEY)[1]
        if channels_a == 4 and channels_b != 4:
            raise ValueError(f"B ({b.path.name}) is an inpainting model ({channels_b} input channels) and A is not; "
                             "when merging an inpainting model with a normal one, A must be the inpainting model")

    vae_keys = {}
    if vae is not None:  # a VAE file's keys, with or without the first_stage_model. prefix
        vae_keys = {("" if k.startswith("first_stage_model.") else "first_stage_model.") + k: k for k in vae.keys()}
    names = [k for k in a.keys() if not (vae_keys and k.startswith("first_stage_model."))]
    names += [k for k in b.keys() if "model" in k and k not in a.header and k not in SKIP_ON_MERGE
              and not (vae_keys and k.startswith("first_stage_model."))]
    names += [k for k in vae_keys if k not in names]

    def multiplier(key: str) -> float:
        index = block_index(key, inputs) if weights is not None else None
        return config.alpha if index is None else weights[index]

    def produce(key: str) -> torch.Tensor:
        if key in vae_keys:
            tensor = vae.get(vae_keys[key])
        elif key not in a.header:
            tensor = b.get(key)
        else:
            tensor = a.get(key)
            in_b = b.shape(key) if key in b.header else None
            shapes = [a.shape(key), in_b, (c.shape(key) if key in c.header else None) if c else in_b]
            mergeable = (key not in SKIP_ON_MERGE and tensor.is_floating_point() and None not in shapes)
            if mergeable and len(set(shapes)) == 1:
                tensor = merge_tensor(tensor, b.get(key), c.get(key) if c else None, config.method, multiplier(key))
            elif mergeable and key == _INPAINT_KEY and shapes[1] == shapes[2] and shapes[1][1] == 4:
                tensor = tensor.clone()  # inpainting A: merge the latent channels, keep mask + masked image
                tensor[:, :4] = merge_tensor(tensor[:, :4], b.get(key), c.get(key) if c else None, config.method,
                                             multiplier(key))
        if config.half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        return tensor

    def spec(key: str) -> TensorSpec:
        source = vae.header[vae_keys[key]] if key in vae_keys else (a.header[key] if key in a.header else b.header[key])
        dtype, shape = source  # a merged tensor keeps A's dtype (merge_tensor computes in it)
        return TensorSpec(key, "F16" if config.half and dtype in ("F64", "F32", "BF16") else dtype, tuple(shape))

    recipe = {"type": "webui", "primary_model_hash": short_hash(a.path), "secondary_model_hash": short_hash(b.path),
              "tertiary_model_hash": short_hash(c.path) if c else None, "interp_method": _A1111_METHOD[config.method],
              "multiplier": config.alpha, "save_as_half": config.half, "custom_name": Path(config.output).stem,
              "config_source": 0, "bake_in_vae": Path(config.vae).name if config.vae else "None",
              "discard_weights": "", "is_inpainting": _INPAINT_KEY in a.header and a.shape(_INPAINT_KEY)[1] == 9,
              "is_instruct_pix2pix": False, "block_weights": weights}
    metadata = {"sd_merge_recipe": json.dumps(recipe), "format": "pt",
                "sd_merge_models": json.dumps({short_hash(r.path): {"name": r.path.name} for r in (a, b, c) if r})}
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_stream(output, [spec(k) for k in names], produce, metadata)
    log(f"wrote {output} ({len(names)} tensors, {config.method}, alpha {config.alpha:g}"
        + (f", {len(weights)} block weights" if weights else "") + ")")
    return output


_A1111_METHOD = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}

