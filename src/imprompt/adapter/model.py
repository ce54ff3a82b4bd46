"""The IP-Adapter module: an image projection plus ``to_k_ip`` / ``to_v_ip`` per cross-attention layer.

The module tree mirrors the official flat key layout (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``
with N the layer's position among the UNet's attention processors), so ``state_dict()`` *is* the
official safetensors format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .lora import add_lora_pairs
from .projection import build_projection
from .variants import (LORA_TARGETS, AdapterVariant, CheckpointError, check_not_faceid, detect_variant, layer_ids,
                       lora_layer_ids)


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN / inf weights, naming the first bad tensor: they would give all-black images with
    no error at all (a corrupt download, or a training run that diverged before it was saved)."""
    for key, value in state.items():
        if value.is_meta or not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise CheckpointError(
                f"{key!r} holds NaN or infinite values ({int((~finite).sum())} of {value.numel()}): the file is "
                "corrupt or was saved from a training run that diverged; re-download it, or use an earlier checkpoint"
            )


class KVProjection(nn.Module):
    """Keys and values of the image tokens for one cross-attention layer (paper Eq. 4; no bias)."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)

    def forward(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_k_ip(image_tokens), self.to_v_ip(image_tokens)


class LoRALayer(nn.Module):
    """``ip_adapter.N`` of a FaceID checkpoint at a self-attention layer: only the LoRA pairs."""


@dataclass(frozen=True)
class LoRAShape:
    """The widths of one layer's FaceID LoRA, read off its weights (see :func:`add_lora_pairs`)."""

    rank: int
    query_width: int
    context_width: int
    inner_width: int


class IPAdapter(nn.Module):
    """Image projection + per-layer key/value projections of one IP-Adapter checkpoint (+ FaceID's LoRA)."""

    # FaceID-PlusV2 is FaceID-Plus's modules trained with the shortcut: the weights cannot tell them
    # apart, so the loader sets this from the file name (the official examples do the same).
    shortcut_default: bool = False

    def __init__(self, variant: AdapterVariant, layers: Mapping[int, int], loras: Mapping[int, LoRAShape] | None = None):
        """``layers`` maps the official layer index N to that layer's attention width; ``loras`` (FaceID)
        maps every attention layer's index N, self-attention included, to its LoRA's widths."""
        super().__init__()
        self.variant = variant
        self.image_proj = build_projection(variant)
        loras = dict(loras or {})
        modules = {}
        for i in sorted(set(layers) | set(loras)):
            module = KVProjection(variant.cross_attention_dim, layers[i]) if i in layers else LoRALayer()
            if i in loras:
                add_lora_pairs(module, **dataclasses.asdict(loras[i]))
            modules[str(i)] = module
        self.ip_adapter = nn.ModuleDict(modules)

    @property
    def layer_ids(self) -> list[int]:
        """Positions with image keys / values (the cross-attention layers)."""
        return [int(i) for i, m in self.ip_adapter.items() if isinstance(m, KVProjection)]

    @property
    def lora_ids(self) -> list[int]:
        """Positions (among all attention processors) with FaceID LoRA weights."""
        return [int(i) for i, m in self.ip_adapter.items() if hasattr(m, "to_q_lora")]

    def layer(self, index: int) -> KVProjection:
        return self.ip_adapter[str(index)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (batch, ...) -> image tokens (batch, tokens, cross_attention_dim)."""
        param = next(self.image_proj.parameters())
        return self.image_proj(features.to(dtype=param.dtype, device=param.device))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "IPAdapter":
        """Build from a flat official state (``image_proj.*`` / ``ip_adapter.*``), checking every key."""
        check_not_faceid(state)  # before anything else: a FaceID file of another layout fails every later check
        image_proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
        ip_adapter = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
        other = sorted(set(state) - {f"image_proj.{k}" for k in image_proj} - {f"ip_adapter.{k}" for k in ip_adapter})
        if not image_proj:
            raise CheckpointError("the checkpoint has no 'image_proj' weights; is this an IP-Adapter file?")
        variant = detect_variant(image_proj, ip_adapter)
        if other:
            raise CheckpointError(f"unexpected key {other[0]!r}: an IP-Adapter holds only image_proj.* and ip_adapter.*")
        widths: dict[int, int] = {}
        for index in layer_ids(ip_adapter):
            for name in ("to_k_ip", "to_v_ip"):
                key = f"{index}.{name}.weight"
                if key not in ip_adapter:
                    raise CheckpointError(f"layer {index} is incomplete: 'ip_adapter.{key}' is missing (truncated file?)")
                weight = ip_adapter[key]
                if weight.ndim != 2 or weight.shape[1] != variant.cross_attention_dim:
                    raise CheckpointError(
                        f"'ip_adapter.{key}' has shape {tuple(weight.shape)}; expected (width, "
                        f"{variant.cross_attention_dim}) to match the image tokens"
                    )
            widths[index] = ip_adapter[f"{index}.to_k_ip.weight"].shape[0]
        loras = {index: _lora_shape(ip_adapter, index) for index in lora_layer_ids(ip_adapter)}
        with torch.device("meta"):
            adapter = cls(variant, widths, loras)
        expected = adapter.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise CheckpointError(f"the {variant.name} checkpoint is missing {missing[0]!r} ({len(missing)} keys missing)")
        unexpected = [k for k in state if k not in expected]
        if unexpected:
            raise CheckpointError(
                f"unexpected key {unexpected[0]!r} for a {variant.name} adapter ({len(unexpected)} unexpected keys)"
            )
        for key, param in expected.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{key!r} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)} for a {variant.name} adapter"
                )
        check_finite(state)
        adapter.load_state_dict(state, assign=True)
        return adapter

    def project_faces(self, face_embeds: torch.Tensor, hidden_states: torch.Tensor | None = None, *,
                      shortcut: bool = False, s_scale: float = 1.0) -> torch.Tensor:
        """FaceID: face-ID embeddings (n, 512) [+ CLIP penultimate hidden states (n, seq, width) for
        FaceID-Plus] -> image tokens (n, tokens, cross_attention_dim)."""
        if not self.variant.is_faceid:
            raise ValueError(f"the {self.variant.name} adapter is not a FaceID adapter: it reads no face embedding")
        param = next(self.image_proj.parameters())
        face_embeds = face_embeds.to(dtype=param.dtype, device=param.device)
        if self.variant.projection == "faceid":
            return self.image_proj(face_embeds)
        if hidden_states is None:
            raise ValueError(f"the {self.variant.name} adapter also reads CLIP features of the face image")
        return self.image_proj(face_embeds, hidden_states.to(dtype=param.dtype, device=param.device),
                               shortcut=shortcut, s_scale=s_scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())



def _lora_shape(ip_adapter: Mapping[str, torch.Tensor], index: int) -> LoRAShape:
    """The widths of layer ``index``'s four LoRA pairs, each key checked present and 2-D."""
    shapes = {}
    for target in LORA_TARGETS:
        for half in ("down", "up"):
            key = f"{index}.{target}_lora.{half}.weight"
            if key not in ip_adapter:
                raise CheckpointError(f"layer {index}'s LoRA is incomplete: 'ip_adapter.{key}' is missing (truncated file?)")
            if ip_adapter[key].ndim != 2:
                raise CheckpointError(f"'ip_adapter.{key}' has shape {tuple(ip_adapter[key].shape)}; expected 2 dimensions")
            shapes[target, half] = tuple(ip_adapter[key].shape)
    # The remaining widths are compared with these by from_state_dict's shape check, naming the key.
    return LoRAShape(rank=shapes["to_q", "down"][0], query_width=shapes["to_q", "down"][1],
                     context_width=shapes["to_k", "down"][1], inner_width=shapes["to_q", "up"][0])
