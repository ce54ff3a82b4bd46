"""Image projections: encoder features -> image tokens in the UNet's cross-attention width.

Module and parameter names follow the official checkpoints' ``image_proj.*`` keys exactly, so that
loading is a checked ``load_state_dict`` and saving needs no translation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .variants import RESAMPLER_HEAD_DIM, AdapterVariant


class LinearProjection(nn.Module):
    """Base / light / SDXL / vit-G: pooled embedding -> ``num_tokens`` tokens (paper section 3.2.1).

    One linear layer produces all tokens at once, then each token is layer-normed.
    Keys: ``proj``, ``norm``.
    """

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjection(nn.Module):
    """Full-face: every penultimate hidden state becomes a token through a two-layer MLP.

    Keys ``proj.0`` (Linear), ``proj.2`` (Linear), ``proj.3`` (LayerNorm); ``proj.1`` is the GELU.
    """

    def __init__(self, embed_dim: int, cross_attention_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents] (Flamingo's Perceiver Resampler, Alayrac et al. 2022).

    Keys: ``norm1`` (features), ``norm2`` (latents), ``to_q``, ``to_kv`` (keys and values stacked),
    ``to_out``; no biases.
    """

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        batch, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # The official code scales q and k by d**-1/4 each before the product (more stable in fp16)
        # and takes the softmax in float32; the result is standard scaled dot-product attention.
        scale = 1.0 / math.sqrt(math.sqrt(self.head_dim))
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (weight @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out)


def _feed_forward(width: int, inner: int) -> nn.Sequential:
    # Keys layers.N.1.{0,1,3}: LayerNorm, Linear (no bias), GELU, Linear (no bias).
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, width, bias=False),
    )


class PerceiverResampler(nn.Module):
    """The Perceiver blocks of the plus projections: queries read the encoder's hidden states through
    ``depth`` rounds of attention + feed-forward, then ``proj_out`` and ``norm_out``. The queries are the
    caller's (FaceID-Plus: the face-ID tokens, its ``FacePerceiverResampler``); :class:`Resampler` adds
    learned ones. Keys: ``proj_in``, ``layers.N.0`` (attention), ``layers.N.1`` (feed-forward),
    ``proj_out``, ``norm_out``."""

    def __init__(self, embed_dim: int, width: int, depth: int, heads: int, head_dim: int,
                 cross_attention_dim: int, ff_width: int):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads, head_dim), _feed_forward(width, ff_width)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)

    def forward(self, latents: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverResampler):
    """Plus / plus-face: ``num_tokens`` learned queries (key ``latents``) read the encoder's penultimate
    hidden states through the :class:`PerceiverResampler` blocks."""

    def __init__(self, embed_dim: int, width: int, depth: int, heads: int, head_dim: int,
                 num_tokens: int, cross_attention_dim: int, ff_width: int):
        super().__init__(embed_dim, width, depth, heads, head_dim, cross_attention_dim, ff_width)
        self.latents = nn.Parameter(torch.randn(1, num_tokens, width) / width**0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(self.latents.expand(hidden_states.shape[0], -1, -1), hidden_states)


class FaceIDProjection(nn.Module):
    """FaceID / FaceID-Portrait: a face-ID embedding -> ``num_tokens`` tokens (tencent-ailab
    ``ip_adapter_faceid.MLPProjModel``): a two-layer MLP makes all tokens at once, each is layer-normed.

    Keys: ``proj.0`` (Linear), ``proj.2`` (Linear), ``norm`` (LayerNorm); ``proj.1`` is the GELU.
    """

    def __init__(self, face_dim: int, hidden: int, width: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.proj = nn.Sequential(nn.Linear(face_dim, hidden), nn.GELU(), nn.Linear(hidden, width * num_tokens))
        self.norm = nn.LayerNorm(width)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face_embeds).reshape(-1, self.num_tokens, self.width))


class FaceIDPlusProjection(nn.Module):
    """FaceID-Plus / PlusV2 (``ip_adapter_faceid.ProjPlusModel``): face-ID tokens as in FaceID, refined by
    a Perceiver reading CLIP's penultimate hidden states of the face crop.

    With ``shortcut`` (PlusV2) the face-ID tokens are kept and the Perceiver's output added to them,
    weighted by ``s_scale``: ``out = id_tokens + s_scale * perceiver(id_tokens, clip)``.
    Keys: ``proj.0``, ``proj.2``, ``norm``, ``perceiver_resampler.*``.
    """

    def __init__(self, variant: AdapterVariant):
        super().__init__()
        self.num_tokens, self.width = variant.num_tokens, variant.resampler_width
        self.proj = nn.Sequential(nn.Linear(variant.face_embed_dim, variant.face_hidden_dim), nn.GELU(),
                                  nn.Linear(variant.face_hidden_dim, self.width * self.num_tokens))
        self.norm = nn.LayerNorm(self.width)
        self.perceiver_resampler = PerceiverResampler(
            variant.image_embed_dim, self.width, variant.resampler_depth, variant.resampler_heads, RESAMPLER_HEAD_DIM,
            variant.cross_attention_dim, variant.resampler_ff_width)

    def forward(self, face_embeds: torch.Tensor, hidden_states: torch.Tensor, shortcut: bool = False,
                s_scale: float = 1.0) -> torch.Tensor:
        if face_embeds.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"{face_embeds.shape[0]} face embeddings but {hidden_states.shape[0]} face images: "
                             "FaceID-Plus reads one face image per face embedding")
        tokens = self.norm(self.proj(face_embeds).reshape(-1, self.num_tokens, self.width))
        out = self.perceiver_resampler(tokens, hidden_states)
        if not shortcut:
            return out
        if out.shape[-1] != self.width:
            raise ValueError(f"the shortcut adds the {self.width}-wide face-ID tokens to {out.shape[-1]}-wide image "
                             "tokens; this checkpoint cannot use it")
        return tokens + s_scale * out


def _linear(variant: AdapterVariant) -> nn.Module:
    return LinearProjection(variant.image_embed_dim, variant.cross_attention_dim, variant.num_tokens)


def _plus(variant: AdapterVariant) -> nn.Module:
    return Resampler(
        embed_dim=variant.image_embed_dim,
        width=variant.resampler_width,
        depth=variant.resampler_depth,
        heads=variant.resampler_heads,
        head_dim=RESAMPLER_HEAD_DIM,
        num_tokens=variant.num_tokens,
        cross_attention_dim=variant.cross_attention_dim,
        ff_width=variant.resampler_ff_width,
    )


def _full(variant: AdapterVariant) -> nn.Module:
    return MLPProjection(variant.image_embed_dim, variant.cross_attention_dim)


def _faceid(variant: AdapterVariant) -> nn.Module:
    return FaceIDProjection(variant.face_embed_dim, variant.face_hidden_dim, variant.cross_attention_dim,
                            variant.num_tokens)


# The registry of projection kinds (variants.PROJECTION_KINDS) -> the module each builds.
PROJECTIONS = {"linear": _linear, "plus": _plus, "full": _full, "faceid": _faceid, "faceid_plus": FaceIDPlusProjection}


def build_projection(variant: AdapterVariant) -> nn.Module:
    """The projection module for a variant."""
    return PROJECTIONS[variant.projection](variant)
