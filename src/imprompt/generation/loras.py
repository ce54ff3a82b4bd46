"""LoRA stacking for one generation: AUTOMATIC1111's ``<lora:NAME:TE:UNET>`` applied to a diffusers pipeline.

Semantics (A1111 ``extensions-builtin/Lora``): each LoRA layer adds ``m * alpha / rank * up @ down`` to the
weight of the layer it names, with ``m`` the text-encoder multiplier for text-encoder layers and the UNet
multiplier for UNet layers; several LoRAs add up. diffusers and PEFT do the work here: the LoRA layers are
injected with the pipeline's own loaders, weighted with ``set_adapters`` and removed with
``unload_lora_weights``, which puts back the very module objects that were wrapped. What this module adds:

- the file is read and checked first, and formats that diffusers would load wrongly or not at all are
  refused with what works instead (:func:`read_lora`);
- kohya's per-layer ``alpha / rank`` is folded into the ``up`` weights before loading. diffusers 0.42 turns
  kohya alphas into PEFT ``alpha_pattern`` keys that match no module name (``...attn1.processor.to_k_lora
  .down.weight`` for the UNet, ``...self_attn`` for all four text-encoder projections), so a file whose
  layers have different alphas would get the most common alpha everywhere. With the scale folded in, PEFT's
  own scale is 1 (``lora_alpha == r``) and the multiplier is the whole of ``set_adapters``' weight;
- kohya text-encoder layers are renamed to the module paths of the text encoder's own tree, in diffusers'
  ``<module>.lora_linear_layer.down.weight`` layout: diffusers guesses the layout of a text-encoder state
  dict from the presence of ``out_proj`` or ``mlp`` layers and raises "Could not automatically infer state
  dict type" for a file that trains only ``q/k/v_proj``; and transformers 5 flattened ``CLIPTextModel``
  (no ``text_model.``, which kohya's names have) but not ``CLIPTextModelWithProjection``: the tree knows;
- every layer of the file must land on a module of the model, else the LoRA is for another base and the
  error says which (diffusers skips what it cannot place, or fails deep inside PEFT).
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from ..adapter.checkpoint import sniff
from ..files import check_regular_file, load_torch_weights
from ..models.info import base_of_width
from ..models.inspect import read_header
from ..models.loras import lora_info

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_LORA_BYTES = 16 * 2**30
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# kohya-ss sd-scripts (networks/lora.py) names a layer "lora_unet_" / "lora_te_" (SD1/2) / "lora_te1_",
# "lora_te2_" (SDXL) + the module path with "." -> "_", and stores down [rank, in(, kh, kw)], up
# [out, rank(, 1, 1)] and an optional scalar alpha (absent or 0 means alpha = rank).
_KOHYA_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
_KOHYA_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# diffusers / PEFT: "<component>.<module>" + one of these (old diffusers attention-processor names included).
_DIFFUSERS_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "up_bias",
                    ".lora.down.weight": "down", ".lora.up.weight": "up", "_lora.down.weight": "down",
                    "_lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                    ".lora_linear_layer.up.weight": "up"}
# Key fragments of the network types that diffusers cannot load as A1111 would (LyCORIS and others).
_REFUSED = (
    ("hada_w1_a", "LyCORIS LoHa (hada_* keys)"), ("hada_w1_b", "LyCORIS LoHa (hada_* keys)"),
    ("lokr_w1", "LyCORIS LoKr (lokr_* keys)"), ("lokr_w2", "LyCORIS LoKr (lokr_* keys)"),
    (".on_input", "LyCORIS (IA)^3 (weight / on_input keys)"),
    (".a1.weight", "LyCORIS GLoRA (a1 / a2 / b1 / b2 keys)"), (".b1.weight", "LyCORIS GLoRA (a1 / a2 / b1 / b2 keys)"),
    (".lora_mid.weight", "LoCon with CP/Tucker decomposition (lora_mid keys)"),
    (".dora_scale", "DoRA (dora_scale keys; diffusers drops them for Stable Diffusion, which changes the result)"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector keys)"),
    ("oft_blocks", "OFT (oft_blocks keys)"), ("oft_diag", "OFT (oft_diag keys)"), ("boft_", "BOFT (boft_* keys)"),
    (".diff", "LyCORIS full fine-tune difference (diff keys)"),
    (".w_norm", "LyCORIS norm layers (w_norm / b_norm keys)"),
    ("bundle_emb.", "a LoRA with bundled textual-inversion embeddings (bundle_emb.*)"),
)
_WHAT_WORKS = ("imprompt loads kohya-ss / A1111 LoRA and LoCon files (lora_down / lora_up / alpha) and diffusers / "
               "PEFT LoRA files (lora_A / lora_B); use this file in A1111 or ComfyUI, or merge it into a checkpoint")
_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
_NOT_WEIGHTS = {"empty": "empty (0 bytes)", "lfs": "a Git LFS pointer", "html": "an HTML page", "text": "a text file"}
_MODULE_STATE = ("_modules", "_parameters", "_buffers")  # restored by unload_lora_weights itself
_MISSING = object()
_LOAD_REPORT_LOGGER = "transformers.integrations.peft"


@dataclass(frozen=True)
class LoraUse:
    """One ``<lora:NAME:TE:UNET>`` of a prompt, its file found."""

    path: Path  # file on disk (already resolved from a name)
    name: str  # the name as written in the prompt (for messages / PNG info)
    te: float = 1.0  # text-encoder multiplier
    unet: float = 1.0  # UNet multiplier


@dataclass(frozen=True)
class _Layer:
    """One LoRA layer of a file: which model part, the module's name in the file, its tensors by role."""

    component: str
    name: str
    tensors: dict[str, str]  # role ("down", "up", "up_bias", "alpha") -> key in the state dict


# --- reading and checking -------------------------------------------------------------------------

def read_lora(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file: ``.safetensors`` (preferred) or a ``.bin/.pt/.pth/.ckpt`` pickle, read with
    ``torch.load(weights_only=True)`` (a pickle that would run code is refused). Raises ValueError for a file
    in a format diffusers cannot load (LyCORIS LoHa / LoKr / (IA)^3 / GLoRA, DoRA, OFT, ...), naming the
    format found and what works."""
    path = Path(path)
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"LoRA {path.name}: unknown extension {path.suffix!r}; expected .safetensors "
                         f"(or {', '.join(PICKLE_SUFFIXES)})")
    check_regular_file(path, MAX_LORA_BYTES, what="LoRA")
    content = sniff(path)  # the first bytes, so that a file whose name lies is named for what it is
    if content in _NOT_WEIGHTS:
        raise ValueError(f"LoRA {path.name} is {_NOT_WEIGHTS[content]}, not LoRA weights: download it again "
                         "from its direct link")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if content == "torch":
            raise ValueError(f"LoRA {path.name} is a PyTorch pickle (torch.save), not a safetensors file, despite "
                             f"its name: rename it to {path.stem}.pt")
        try:
            read_header(path)  # names a truncated or malformed file before the loader runs
        except ValueError as err:
            raise ValueError(f"LoRA {path.name} is not a whole safetensors file: {err}") from None
        state = load_file(path)
    else:
        state = load_torch_weights(path, what="LoRA")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"LoRA {path.name} is not a flat dict of tensors; re-save it as one (.safetensors)")
    state = dict(state)
    lora_layers(state, path.name)  # refuses what cannot be loaded
    return state


def lora_layers(state: Mapping[str, torch.Tensor], file_name: str = "LoRA") -> list[_Layer]:
    """The file's layers, each with its model part; raises ValueError for keys of other network types or
    keys that are neither kohya nor diffusers / PEFT LoRA."""
    for mark, what in _REFUSED:
        found = next((k for k in state if mark in k), None)
        if found is not None:
            raise ValueError(f"LoRA {file_name} is {what}, e.g. {found!r}, which diffusers cannot apply; {_WHAT_WORKS}")
    layers: dict[tuple[str, str], dict[str, str]] = {}
    unknown = []
    for key in state:
        kohya = next((c for p, c in _KOHYA_COMPONENT.items() if key.startswith(p)), None)
        table = _KOHYA_ROLES if kohya else _DIFFUSERS_ROLES
        suffix = next((s for s in table if key.endswith(s)), None)
        component = kohya or next((c for c in ("unet", *TEXT_ENCODERS) if key.startswith(c + ".")), None)
        if component is None and key.startswith(_UNET_BLOCKS):
            component = "unet"  # diffusers' first LoRA files (attention processors) had no "unet." prefix
        if suffix is None or component is None:
            unknown.append(key)
            continue
        layers.setdefault((component, key[: -len(suffix)]), {})[table[suffix]] = key
    if unknown:
        lycoris = any(k.startswith("lora_") and k.endswith((".weight", ".bias")) for k in unknown)
        hint = " (a LyCORIS network type?)" if lycoris else ""
        raise ValueError(f"LoRA {file_name} has {len(unknown)} keys that are not LoRA layers of a Stable Diffusion "
                         f"UNet or text encoder, e.g. {unknown[:3]}{hint}; {_WHAT_WORKS}")
    if not layers:
        raise ValueError(f"LoRA {file_name} holds no tensors")
    out = []
    for (component, name), tensors in layers.items():
        if "down" not in tensors or "up" not in tensors:
            raise ValueError(f"LoRA {file_name}: layer {name!r} has {sorted(tensors)} but needs both down and up "
                             "weights (a truncated or hand-edited file?)")
        out.append(_Layer(component, name, tensors))
    return out


# --- preparing a file for diffusers ---------------------------------------------------------------

def _peft_alpha(metadata: Mapping[str, str], component: str, module: str, rank: int) -> float:
    """PEFT's ``lora_alpha / r`` of one module, from the ``lora_adapter_metadata`` diffusers writes into the
    safetensors header (``unet.lora_alpha``, ``unet.alpha_pattern``, ...); without it diffusers assumes
    ``alpha == r`` (scale 1)."""
    raw = metadata.get("lora_adapter_metadata")
    config = {k[len(component) + 1:]: v for k, v in (json.loads(raw) if raw else {}).items()
              if k.startswith(component + ".")}
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's own rule (peft.utils.other.get_pattern_key)
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _text_encoder_names(text_encoder: torch.nn.Module) -> dict[str, str]:
    """kohya's name of each Linear (``text_model_encoder_layers_0_self_attn_q_proj``) -> its module path.
    kohya names the modules of transformers' CLIPTextModel of its time, which had ``text_model.`` on top;
    transformers 5 dropped that level from CLIPTextModel (not from CLIPTextModelWithProjection)."""
    lead = "" if hasattr(text_encoder, "text_model") else "text_model_"
    return {lead + name.replace(".", "_"): name for name, module in text_encoder.named_modules()
            if isinstance(module, torch.nn.Linear)}


def _prepared(pipe, use: LoraUse, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              ) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
    """Per model part with a non-zero multiplier: (the state dict to give diffusers, number of layers).

    Scales are folded into the up weights (see the module docstring). Text-encoder layers get the names
    ``<component>.<module>.lora_linear_layer.{down,up}.weight``: the one layout diffusers recognises
    whichever of a CLIP layer's Linears a file trains."""
    parts: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
    te_names: dict[str, dict[str, str]] = {}
    for layer in lora_layers(state, use.path.name):
        if (use.unet if layer.component == "unet" else use.te) == 0:
            continue  # that part is not applied at all, as in A1111
        model = getattr(pipe, layer.component, None)
        if not isinstance(model, torch.nn.Module):
            raise _mismatch(pipe, use, state, metadata, f"it has {layer.component} layers (e.g. {layer.name!r}) "
                            f"but the pipeline has no {layer.component}")
        keys = layer.tensors
        rank = state[keys["down"]].shape[0]
        kohya = layer.name.startswith("lora_")
        module = layer.name.removeprefix(layer.component + ".")  # (legacy diffusers UNet files have no "unet.")
        if kohya:
            # A1111 / kohya: scale = alpha / rank, and an absent or zero alpha means scale 1.
            alpha = float(state[keys["alpha"]]) if "alpha" in keys else 0.0
            scale = alpha / rank if alpha else 1.0
        else:
            scale = _peft_alpha(metadata, layer.component, module, rank)

        def scaled(key: str) -> torch.Tensor:
            t = state[key]
            return t if scale == 1.0 else (t.float() * scale).to(t.dtype)

        tensors, count = parts.get(layer.component, ({}, 0))
        if layer.component == "unet":
            prefix = "" if kohya else "unet."
            tensors[prefix + module + keys["down"][len(layer.name):]] = state[keys["down"]]
            for role in ("up", "up_bias"):
                if role in keys:
                    tensors[prefix + module + keys[role][len(layer.name):]] = scaled(keys[role])
        else:
            if kohya:
                names = te_names.setdefault(layer.component, _text_encoder_names(model))
                short = layer.name.split("_", 2)[2]  # without "lora_te_" / "lora_te1_" / "lora_te2_"
                if short not in names:
                    raise _mismatch(pipe, use, state, metadata, f"its layer {layer.name!r} names no Linear of the "
                                    f"pipeline's {layer.component} ({type(model).__name__})")
                module = names[short]
            elif not keys["down"].endswith(".lora_A.weight"):
                module = None  # other diffusers layouts: as they are
            if module is None:
                tensors.update({key: (scaled(key) if role != "down" else state[key]) for role, key in keys.items()})
            else:
                base = f"{layer.component}.{module}.lora_linear_layer"
                tensors[f"{base}.down.weight"] = state[keys["down"]]
                tensors[f"{base}.up.weight"] = scaled(keys["up"])
                if "up_bias" in keys:
                    tensors[f"{base}.up.bias"] = scaled(keys["up_bias"])
        parts[layer.component] = (tensors, count + 1)
    return parts


# --- applying --------------------------------------------------------------------------------------

def _model_base(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "SDXL"
    width = pipe.unet.config.cross_attention_dim
    return base_of_width(width) or f"a Stable Diffusion model with cross-attention width {width}"


def _mismatch(pipe, use: LoraUse, state, metadata, detail: str) -> ValueError:
    info = lora_info({k: tuple(v.shape) for k, v in state.items()}, metadata)
    seems = f"an {info.base} LoRA" if info is not None and info.base else "a LoRA for a base that its shapes do not tell"
    return ValueError(f"<lora:{use.name}>: {use.path.name} does not fit this model: {detail}. It looks like {seems}; "
                      f"the model is {_model_base(pipe)} ({type(pipe).__name__}). Use a LoRA made for this base model")


def _adapter_layers(model: torch.nn.Module, adapter: str | None = None) -> list[str]:
    """Names of the PEFT-wrapped modules of ``model`` (holding ``adapter``, if given)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
            and (adapter is None or adapter in getattr(module, "lora_A", {}))]


class _DropLoadReport(logging.Filter):
    # transformers 5.23 logs a "LOAD REPORT" for every adapter load that lists the text encoder's base weights
    # as "MISSING ... newly initialized"; they are not touched (tests/test_loras.py checks every tensor).
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _load(pipe, adapter: str, use: LoraUse, state, metadata, parts) -> None:
    """Loads the prepared parts under ``adapter`` with the pipeline's own per-part loaders."""
    for component, (tensors, count) in parts.items():
        model = getattr(pipe, component)
        try:
            if component == "unet":
                # kohya names -> diffusers names (the SDXL sgm block layout is mapped with the UNet's config)
                converted, _ = pipe.lora_state_dict(dict(tensors), unet_config=model.config)
                pipe.load_lora_into_unet(converted, network_alphas=None, unet=model, adapter_name=adapter,
                                         _pipeline=pipe, low_cpu_mem_usage=False)
            else:
                pipe.load_lora_into_text_encoder(tensors, network_alphas=None, text_encoder=model, prefix=component,
                                                 adapter_name=adapter, _pipeline=pipe, low_cpu_mem_usage=False)
        except (ValueError, RuntimeError, KeyError) as err:  # PEFT: no target found / size mismatch
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise _mismatch(pipe, use, state, metadata, f"its {component} layers could not be loaded ({first})") from None
        placed = len(_adapter_layers(model, adapter))
        if placed != count:
            raise _mismatch(pipe, use, state, metadata, f"only {placed} of its {count} {component} layers name a "
                            "module of the model")


def _attributes(model: torch.nn.Module) -> dict:
    return {k: v for k, v in vars(model).items() if k not in _MODULE_STATE}


def _restore_attributes(model: torch.nn.Module, saved: dict) -> None:
    """Puts back the model's own attributes: loading an adapter sets ``peft_config`` and
    ``_hf_peft_config_loaded`` (diffusers and transformers), and transformers 5 replaces the text encoder's
    ``_weight_conversions`` (which its ``save_pretrained`` reads) with those of the adapter load."""
    for key in [k for k in _attributes(model) if k not in saved]:
        delattr(model, key)
    for key, value in saved.items():
        if vars(model).get(key, _MISSING) is not value:
            setattr(model, key, value)


def _file_metadata(path: Path) -> dict[str, str]:
    return read_header(path)[1] if path.suffix == ".safetensors" else {}


def _cached_read(path: Path, cache: dict | None) -> dict[str, torch.Tensor]:
    """``read_lora(path)``, kept in ``cache`` as ``path -> (mtime_ns, size, state)`` until the file changes."""
    if cache is None:
        return read_lora(path)
    stat = path.stat()
    hit = cache.get(path)
    if hit is not None and hit[:2] == (stat.st_mtime_ns, stat.st_size):
        return hit[2]
    state = read_lora(path)
    cache[path] = (stat.st_mtime_ns, stat.st_size, state)
    return state


@contextmanager
def loras_applied(pipe, uses: Sequence[LoraUse], cache: dict | None = None) -> Iterator[list[str]]:
    """Applies the LoRAs of ``uses`` to ``pipe`` (a diffusers StableDiffusion* / StableDiffusionXL* pipeline,
    ControlNet, img2img and inpaint ones included) for the length of the block; yields the adapter names.

    Each part of a LoRA is scaled by its multiplier (``te`` for the text encoders, ``unet`` for the UNet;
    0 leaves that part out). When the block ends, normally or not, every LoRA layer is removed and the
    pipeline is as before, bit for bit. ``cache`` (``path -> (mtime_ns, size, state)``) keeps the files read.
    A pipeline that already holds LoRA layers is refused: removing ours would remove those too.
    """
    if not uses:
        yield []
        return
    if not hasattr(pipe, "load_lora_into_unet") or getattr(pipe, "unet", None) is None:
        raise ValueError(f"{type(pipe).__name__} cannot load LoRAs (a Stable Diffusion or SDXL pipeline with a UNet can)")
    components = [c for c in ("unet", *TEXT_ENCODERS) if isinstance(getattr(pipe, c, None), torch.nn.Module)]
    for component in components:
        if _adapter_layers(getattr(pipe, component)):
            raise ValueError(f"the pipeline's {component} already has LoRA layers loaded; remove them first "
                             "(pipe.unload_lora_weights()), or fuse them into the weights (pipe.fuse_lora())")
    saved = {c: _attributes(getattr(pipe, c)) for c in components}
    names: list[str] = []
    weights: list[dict[str, float]] = []
    report_logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    drop_report = _DropLoadReport()
    report_logger.addFilter(drop_report)
    try:
        for i, use in enumerate(uses):
            state = _cached_read(Path(use.path), cache)
            metadata = _file_metadata(Path(use.path))
            parts = _prepared(pipe, use, state, metadata)
            if not parts:
                continue  # every part at multiplier 0
            adapter = f"imprompt_{i}_{re.sub(r'[^0-9A-Za-z_]', '_', use.name)}"  # PEFT names are module keys: no dots
            _load(pipe, adapter, use, state, metadata, parts)
            names.append(adapter)
            weights.append({c: (use.unet if c == "unet" else use.te) for c in parts})
        report_logger.removeFilter(drop_report)
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        yield names
    finally:
        report_logger.removeFilter(drop_report)
        if any(_adapter_layers(getattr(pipe, c)) for c in components):
            # Puts back each wrapped module's base layer (the original object) and drops the PEFT configs.
            pipe.unload_lora_weights()
        for component in components:
            _restore_attributes(getattr(pipe, component), saved[component])
