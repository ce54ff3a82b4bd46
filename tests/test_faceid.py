"""IP-Adapter FaceID (h94/IP-Adapter-FaceID): detection, face-embedding input, the LoRA, and parity
with diffusers' own FaceID support (``load_ip_adapter`` + ``ip_adapter_image_embeds``; diffusers
applies the FaceID LoRA itself, through PEFT) on tiny random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.attach import cross_attention_layers
from imprompt.adapter.checkpoint import load_adapter, nest
from imprompt.adapter.model import IPAdapter, LoRAShape
from imprompt.adapter.variants import AdapterVariant, CheckpointError
from imprompt.generation.faceid import FaceEmbeddingError, check_face_embeddings, insightface_embeddings, load_face_embedding

PROMPT = "a portrait"
FACE = 512


def faceid_adapter(unet, kind: str = "faceid", tokens: int = 4, lora_rank: int = 4, clip_width: int = 32,
                   seed: int = 0) -> IPAdapter:
    """A FaceID adapter shaped as the official release for ``unet`` (MLP 512 -> 1024 -> tokens x dim; a
    depth-4 Perceiver for Plus; LoRA on every attention layer), with random weights."""
    modules = dict(unet.named_modules())
    widths = {layer.index: layer.attn.to_k.out_features for layer in cross_attention_layers(unet)}
    loras = {}
    if lora_rank:
        for i, name in enumerate(unet.attn_processors):
            attn = modules[name.removesuffix(".processor")]
            loras[i] = LoRAShape(lora_rank, attn.to_q.in_features, attn.to_k.in_features, attn.to_q.out_features)
    dim = unet.config.cross_attention_dim
    common = dict(face_embed_dim=FACE, face_hidden_dim=2 * FACE, lora_rank=lora_rank)
    if kind == "faceid":
        variant = AdapterVariant("faceid", FACE, dim, tokens, **common)
    else:  # one 64-wide head: diffusers reads the head count as to_q rows // 64
        variant = AdapterVariant("faceid_plus", clip_width, dim, tokens, resampler_width=dim, resampler_depth=4,
                                 resampler_ff_mult=4, resampler_heads=1, **common)
    adapter = IPAdapter(variant, widths, loras)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if "lora" in name else 0.3))
    return adapter


def faces(n: int = 1, seed: int = 5) -> torch.Tensor:
    f = torch.randn(n, FACE, generator=torch.Generator().manual_seed(seed))
    return f / f.norm(dim=-1, keepdim=True)  # as insightface's normed_embedding


def _run(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0), **kwargs).images


def _pipes(family: str):
    pipe = tm.sd15_pipeline() if family == "sd15" else tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy(pipe)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind,tokens,rank,n", [("faceid", 4, 4, 1), ("portrait", 16, 0, 3)], ids=["faceid", "portrait"])
def test_faceid_matches_diffusers(family, kind, tokens, rank, n):
    ours, theirs = _pipes(family)
    adapter = faceid_adapter(ours.unet, "faceid", tokens=tokens, lora_rank=rank)
    face = faces(n)

    theirs.load_ip_adapter(nest({k: v.clone() for k, v in adapter.state_dict().items()}),
                           subfolder="", weight_name="", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.7)
    embeds = torch.stack([torch.zeros_like(face), face])  # (negative | positive, faces, 512)
    expected = _run(theirs, ip_adapter_image_embeds=[embeds])

    with attach(ours.unet, adapter) as attachment:
        settings = GenerationSettings(prompt=PROMPT, steps=3, guidance=7.5, seed=0)
        got = generate(ours, attachment, settings, [ImagePrompt([], scale=0.7, face_embeddings=face)], [None],
                       output_type="np")
    plain = _run(ours)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-2
