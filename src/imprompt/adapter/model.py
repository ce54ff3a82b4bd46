"""The IP-Adapter module: an image projection plus ``to_k_ip`` / ``to_v_ip`` per cross-attention layer.

The module tree mirrors the official flat key layout (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``
with N the layer's position among the UNet's attention processors), so ``state_dict()`` *is* the
official safetensors format.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .projection import build_projection
from .variants import AdapterVariant, CheckpointError, check_not_faceid, detect_variant, layer_ids


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


class IPAdapter(nn.Module):
    """Image projection + per-layer key/value projections of one IP-Adapter checkpoint."""

    def __init__(self, variant: AdapterVariant, layers: Mapping[int, int]):
        """``layers`` maps the official layer index N to that layer's attention width."""
        super().__init__()
        self.variant = variant
        self.image_proj = build_projection(variant)
        self.ip_adapter = nn.ModuleDict(
            {str(i): KVProjection(variant.cross_attention_dim, width) for i, width in sorted(layers.items())}
        )

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.ip_adapter]

    def layer(self, index: int) -> KVProjection:
        return self.ip_adapter[str(index)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (batch, ...) -> image tokens (batch, tokens, cross_attention_dim)."""
        param = next(self.image_proj.parameters())
        return self.image_proj(features.to(dtype=param.dtype, device=param.device))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "IPAdapter":
        """Build from a flat official state (``image_proj.*`` / ``ip_adapter.*``), checking every key."""
        check_not_faceid(state)  # before anything else: a FaceID file fails every later check for that reason
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
        with torch.device("meta"):
            adapter = cls(variant, widths)
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

