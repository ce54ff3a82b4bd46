"""Embeds scaling: where an image prompt's weight acts, as ComfyUI_IPAdapter_plus's ``embeds_scaling``.

Facts from its ``CrossAttentionPatch`` (keys/values there are (batch, tokens, channels)):

* ``V only``: the attention output times the weight: ``w * softmax(Q K^T) V`` (the IP-Adapter paper's
  scale, and imprompt's behaviour without this option).
* ``K+V``: keys and values times the weight, output unscaled. Scaling K sharpens or flattens the
  softmax over the image tokens, so this is not the same as V only.
* ``K+V w/ C penalty``: as K+V with the weight times ``C / 1280``, C = the layer's channels
  (``to_k_ip`` outputs), so wide layers get more.
* ``K+mean(V) w/ C penalty``: keys times ``w' = w * C / 1280``; of the values only their mean over the
  image tokens is scaled: ``V - mean(V) + w' * mean(V)``.

Our image keys and values are computed once per generation, so the scaling is applied there, once,
instead of at every denoising step.
"""

from __future__ import annotations

import torch

EMBEDS_SCALING: tuple[str, ...] = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
C_PENALTY_WIDTH = 1280.0


def check_embeds_scaling(name: str) -> str:
    """The canonical name (case-insensitive), or a ValueError listing them."""
    for mode in EMBEDS_SCALING:
        if name.strip().lower() == mode.lower():
            return mode
    raise ValueError(f"unknown embeds scaling {name!r}; choose one of: {', '.join(EMBEDS_SCALING)}")


def scale_image_kv(key: torch.Tensor, value: torch.Tensor, weight: float,
                   mode: str = "V only") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(key, value, output scale) for one layer; ``key`` / ``value`` are (rows, tokens, channels).

    ``V only`` returns the very same tensors and ``weight`` as the output scale, so the attention
    computes exactly what it did before embeds scaling existed.
    """
    mode = check_embeds_scaling(mode)
    if mode == "V only":
        return key, value, weight
    if mode != "K+V":
        weight = weight * key.shape[-1] / C_PENALTY_WIDTH
    if mode == "K+mean(V) w/ C penalty":
        mean = value.mean(dim=1, keepdim=True)
        return key * weight, value - mean + mean * weight, 1.0
    return key * weight, value * weight, 1.0
