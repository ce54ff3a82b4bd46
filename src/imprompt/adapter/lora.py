"""FaceID's LoRA as a per-call delta on an attention layer's projections, never merged into the UNet.

IP-Adapter-FaceID (tencent-ailab ``attention_processor_faceid.py``) trains a low-rank pair
``down`` (in -> rank) / ``up`` (rank -> out) beside ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]`` of
every attention layer, self-attention included, and computes

    y = W x + b  +  lora_scale * up(down(x))            (diffusers' LoRALinearLayer, no network_alpha)

The official code installs processors that own these weights; diffusers merges them into the UNet
through PEFT. Here the weights stay with the adapter and travel with each call (:class:`LayerLoRA` in
the call's :class:`~imprompt.adapter.attention.ImagePromptCall`), so the UNet's parameters are never
written, a call without the FaceID adapter sees the plain UNet, and detaching needs no undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .variants import LORA_TARGETS


class LoRAPair(nn.Module):
    """``down`` then ``up``, both without bias: the keys ``*_lora.down.weight`` / ``*_lora.up.weight``."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)


def add_lora_pairs(module: nn.Module, rank: int, query_width: int, context_width: int, inner_width: int) -> None:
    """Give ``module`` the four pairs of one attention layer (official names ``to_q_lora`` ... ``to_out_lora``).

    ``to_k`` / ``to_v`` read the context (the text tokens in cross-attention, the latents in
    self-attention); ``to_q`` reads the latents; ``to_out`` maps the attention's inner width back.
    """
    module.to_q_lora = LoRAPair(query_width, inner_width, rank)
    module.to_k_lora = LoRAPair(context_width, inner_width, rank)
    module.to_v_lora = LoRAPair(context_width, inner_width, rank)
    module.to_out_lora = LoRAPair(inner_width, query_width, rank)


@dataclass(frozen=True)
class LayerLoRA:
    """One attention layer's LoRA for one call: per target (``to_q``, ``to_k``, ``to_v``, ``to_out``)
    the ``down`` / ``up`` weights, and the scale (the official ``lora_scale``). ``owner`` is the index
    of the adapter it belongs to: several image prompts of one adapter apply its LoRA once."""

    down: Mapping[str, torch.Tensor]
    up: Mapping[str, torch.Tensor]
    scale: float = 1.0
    owner: int = 0

    @classmethod
    def of(cls, module: nn.Module, scale: float, owner: int) -> "LayerLoRA":
        pairs = {t: getattr(module, f"{t}_lora") for t in LORA_TARGETS}
        return cls({t: p.down.weight for t, p in pairs.items()}, {t: p.up.weight for t, p in pairs.items()}, scale, owner)


def lora_linear(linear: nn.Linear, x: torch.Tensor, loras: Sequence[LayerLoRA], target: str) -> torch.Tensor:
    """``linear(x) + sum_l scale_l * up_l(down_l(x))``: the official ``attn.to_q(h) + lora_scale *
    to_q_lora(h)`` (attention_processor_faceid.LoRAAttnProcessor). Without LoRAs, exactly ``linear(x)``."""
    out = linear(x)
    for lora in loras:
        if lora.scale != 0:
            out = out + lora.scale * F.linear(F.linear(x, lora.down[target]), lora.up[target])
    return out
