"""imprompt.models.inspect / .hashes: model files recognised from their keys and shapes, bad files
reported rather than raised, A1111's hashes computed once and cached.

Most files here are written by ``write_header_only``: a real safetensors header with the real key
names and shapes, and zero-filled (sparse) data, so an SDXL-wide projection costs no time; one test
checks that the safetensors library itself reads such a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from imprompt.models import hashes
from imprompt.models.inspect import (
    HeaderError, ModelInfo, classify_shapes, inspect_file, read_header, required_encoder,
)


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16",
                      metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with these tensors (all zeros), written without materialising them."""
    itemsize = {"F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def inspect_shapes(tmp_path: Path, shapes, name: str = "model.safetensors", **kwargs) -> ModelInfo:
    return inspect_file(write_header_only(tmp_path / name, shapes, **kwargs))


# --- header -----------------------------------------------------------------------------------------

def test_read_header_matches_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "a.safetensors"
    save_file({"a.weight": np.zeros((3, 5), np.float16), "b": np.ones(7, np.float32)}, str(path),
              metadata={"ss_network_dim": "4"})
    tensors, metadata = read_header(path)
    assert tensors == {"a.weight": ("F16", (3, 5)), "b": ("F32", (7,))}
    assert metadata == {"ss_network_dim": "4"}
    sparse = write_header_only(tmp_path / "b.safetensors", {"x": (2, 2048), "y": (4,)}, metadata={"k": "v"})
    with safe_open(str(sparse), "np") as f:  # the test writer makes files the library accepts
        assert f.get_slice("x").get_shape() == [2, 2048] and f.metadata() == {"k": "v"}
    assert read_header(sparse) == ({"x": ("F16", (2, 2048)), "y": ("F16", (4,))}, {"k": "v"})


def _raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize("content, reason", [
    (b"", "too short"),
    (b"\x05\x00", "too short"),
    (_raw(b"{}", length=1 << 40), "header length"),
    (_raw(b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', length=500), "truncated"),
    (_raw({"a": {"dtype": "F16", "shape": [1024], "data_offsets": [0, 2048]}}, b"\0" * 100), "truncated"),
    (_raw(b"{not json}"), "not JSON"),
    (_raw({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 6]}}, b"\0" * 6), "needs 8 bytes"),
    (_raw({"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 0]}}), "dtype and shape"),
    (_raw({"a": {"dtype": "F16", "shape": [1], "data_offsets": [4, 2]}}, b"\0" * 4), "data_offsets"),
    (_raw({"__metadata__": {"n": 4}}), "__metadata__"),
])
def test_read_header_refuses_bad_headers_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(HeaderError, match=reason):
        read_header(path)
    info = inspect_file(path)  # never raises
    assert info.kind == "unknown" and info.problem


# --- bad files give a problem, not an exception --------------------------------------------------------

def test_truncated_download_is_named(tmp_path):
    path = write_header_only(tmp_path / "v1-5.safetensors", SD15_CHECKPOINT)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    info = inspect_file(path)
    assert info.kind == "unknown" and "truncated" in info.problem and "download" in info.problem


@pytest.mark.parametrize("name, content, words", [
    ("page.safetensors", b"\n<!DOCTYPE html><html><head><title>Sign in</title>", "web page"),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3\n", "Git LFS"),
    ("empty.ckpt", b"", "empty"),
    ("noise.safetensors", random.Random(0).randbytes(4096), "unreadable"),
    ("noise.pt", random.Random(1).randbytes(4096), "neither"),
    ("error.safetensors", b'{"error": "Repository not found"}', "text file"),
    ("zip.safetensors", b"PK\x03\x04" + b"\0" * 60, "torch pickle"),
])
def test_garbage_files_give_a_problem(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    info = inspect_file(path, allow_pickle=False)
    assert info.kind == "unknown" and words in info.problem


def test_folders_and_missing_files_give_a_problem(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    assert "directory" in inspect_file(tmp_path / "dir.safetensors").problem
    assert "does not exist" in inspect_file(tmp_path / "gone.safetensors").problem
    assert "no tensors" in inspect_file(write_header_only(tmp_path / "e.safetensors", {})).problem
    assert "no known model layout" in inspect_shapes(tmp_path, {"foo.bar": (3,)}).problem


# --- checkpoints, UNets, VAEs, ControlNets ----------------------------------------------------------------

SD15_CHECKPOINT = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
}


def test_checkpoints_by_base(tmp_path):
    info = inspect_shapes(tmp_path, SD15_CHECKPOINT)
    assert (info.kind, info.base, info.problem) == ("checkpoint", "SD1.5", None)
    assert info.details["inpainting"] is False and info.details["includes_vae"] is True
    inpaint = {**SD15_CHECKPOINT, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    info = inspect_shapes(tmp_path, inpaint)
    assert info.base == "SD1.5" and info.details["inpainting"] is True and info.details["in_channels"] == 9
    sd2 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
           "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
           "cond_stage_model.model.token_embedding.weight": (8, 1024)}
    assert inspect_shapes(tmp_path, sd2).base == "SD2"
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
            "conditioner.embedders.1.model.token_embedding.weight": (8, 1280)}
    info = inspect_shapes(tmp_path, sdxl)
    assert (info.kind, info.base, info.details["cross_attention_dim"]) == ("checkpoint", "SDXL", 2048)
    no_width = {k: v for k, v in sdxl.items() if "attn2" not in k}
    assert inspect_shapes(tmp_path, no_width).base == "SDXL"  # from the second text encoder / label_emb
    refiner = {**sdxl, "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280)}
    assert "refiner" in inspect_shapes(tmp_path, refiner).problem
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (8, 8)}
    assert "SD3" in inspect_shapes(tmp_path, sd3).problem


def test_bare_diffusers_unet(tmp_path):
    unet = {"conv_in.weight": (320, 4, 3, 3), "time_embedding.linear_1.weight": (1280, 320),
            "add_embedding.linear_1.weight": (1280, 2816), "up_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
    info = inspect_shapes(tmp_path, unet)
    assert (info.kind, info.base, info.problem) == ("unet", "SDXL", None)


def test_vaes(tmp_path):
    ldm = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3),
           "decoder.conv_in.weight": (512, 4, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
           "post_quant_conv.weight": (4, 4, 1, 1)}
    info = inspect_shapes(tmp_path, ldm)
    assert (info.kind, info.base, info.problem) == ("vae", None, None)
    assert info.details == {"format": "ldm", "latent_channels": 4}
    diffusers = {"encoder.down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                 "decoder.up_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                 "decoder.conv_in.weight": (512, 4, 3, 3), "quant_conv.weight": (8, 8, 1, 1)}
    assert inspect_shapes(tmp_path, diffusers).details["format"] == "diffusers"
    prefixed = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    assert inspect_shapes(tmp_path, prefixed).kind == "vae"
    sixteen = {**ldm, "decoder.conv_in.weight": (512, 16, 3, 3)}
    assert "16-channel" in inspect_shapes(tmp_path, sixteen).problem


def test_controlnets(tmp_path):
    original = {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
                "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    info = inspect_shapes(tmp_path, original)
    assert (info.kind, info.base, info.details["format"]) == ("controlnet", "SD1.5", "original")
    # ControlNet 1.0 files carry a whole checkpoint beside control_model: still a ControlNet
    assert inspect_shapes(tmp_path, {**SD15_CHECKPOINT, **original}).kind == "controlnet"
    v11 = {k.removeprefix("control_model."): v for k, v in original.items()}  # ControlNet 1.1 .pth keys
    assert inspect_shapes(tmp_path, v11).base == "SD1.5"
    diffusers = {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3),
                 "controlnet_down_blocks.0.weight": (320, 320, 1, 1),
                 "add_embedding.linear_1.weight": (1280, 2816),
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
    info = inspect_shapes(tmp_path, diffusers)
    assert (info.kind, info.base, info.details["format"]) == ("controlnet", "SDXL", "diffusers")


# --- IP-Adapters ---------------------------------------------------------------------------------------

def _ip_layers(cross: int) -> dict:
    return {f"ip_adapter.{i}.to_{kv}_ip.weight": (8, cross) for i in (1, 3) for kv in "kv"}


def _linear(tokens: int, embed: int, cross: int) -> dict:
    return {"image_proj.proj.weight": (tokens * cross, embed), "image_proj.proj.bias": (tokens * cross,),
            "image_proj.norm.weight": (cross,), "image_proj.norm.bias": (cross,), **_ip_layers(cross)}


def _plus(tokens: int, embed: int, width: int, cross: int) -> dict:
    return {"image_proj.latents": (1, tokens, width), "image_proj.proj_in.weight": (width, embed),
            "image_proj.proj_out.weight": (cross, width), "image_proj.norm_out.weight": (cross,),
            "image_proj.layers.0.0.to_q.weight": (width, width), "image_proj.layers.0.1.1.weight": (4 * width, width),
            "image_proj.layers.3.0.to_q.weight": (width, width), **_ip_layers(cross)}


def _full(embed: int, cross: int) -> dict:
    return {"image_proj.proj.0.weight": (embed, embed), "image_proj.proj.2.weight": (cross, embed),
            "image_proj.proj.3.weight": (cross,), **_ip_layers(cross)}


# the released files: name -> (shapes, variant, num_tokens, encoder width, base, encoder)
RELEASED_ADAPTERS = {
    "ip-adapter_sd15.safetensors": (_linear(4, 1024, 768), "linear", 4, 1024, "SD1.5", "ViT-H"),
    "ip-adapter_sd15_light.bin": (_linear(4, 1024, 768), "linear", 4, 1024, "SD1.5", "ViT-H"),
    "ip-adapter_sd15_vit-G.safetensors": (_linear(4, 1280, 768), "linear", 4, 1280, "SD1.5", "ViT-bigG"),
    "ip-adapter-plus_sd15.safetensors": (_plus(16, 1280, 768, 768), "plus", 16, 1280, "SD1.5", "ViT-H"),
    "ip-adapter-full-face_sd15.safetensors": (_full(1280, 768), "full", None, 1280, "SD1.5", "ViT-H"),
    "ip-adapter_sdxl.safetensors": (_linear(4, 1280, 2048), "linear", 4, 1280, "SDXL", "ViT-bigG"),
    "ip-adapter_sdxl_vit-h.safetensors": (_linear(4, 1024, 2048), "linear", 4, 1024, "SDXL", "ViT-H"),
    "ip-adapter-plus_sdxl_vit-h.safetensors": (_plus(16, 1280, 1280, 2048), "plus", 16, 1280, "SDXL", "ViT-H"),
}


@pytest.mark.parametrize("name", sorted(RELEASED_ADAPTERS))
def test_released_adapters(tmp_path, name):
    shapes, variant, tokens, width, base, encoder = RELEASED_ADAPTERS[name]
    info = inspect_shapes(tmp_path, shapes, name=name.replace(".bin", ".safetensors"))
    assert (info.kind, info.base, info.problem) == ("adapter", base, None)
    d = info.details
    found = (d["variant"], d["num_tokens"], d["encoder_width"], d["encoder"], d["layers"])
    assert found == (variant, tokens, width, encoder, 2)
    assert encoder in d["encoder_needed"]
    assert required_encoder(name) == encoder  # the file-name rule agrees with the shapes on every release


def test_shape_rules_agree_with_detect_variant():
    # inspect.py reads adapters without torch; imprompt.adapter.variants is the loader's authority
    from imprompt.adapter.variants import detect_variant

    for name, (shapes, *_) in RELEASED_ADAPTERS.items():
        fake = {k: SimpleNamespace(shape=s) for k, s in shapes.items()}
        half = lambda prefix: {k.removeprefix(prefix): v for k, v in fake.items() if k.startswith(prefix)}  # noqa: E731
        variant = detect_variant(half("image_proj."), half("ip_adapter."))
        d = classify_shapes(shapes, name).details
        assert (d["variant"], d["num_tokens"], d["encoder_width"], d["cross_attention_dim"], d["encoder_output"]) == (
            variant.projection, variant.num_tokens, variant.image_embed_dim, variant.cross_attention_dim,
            variant.encoder_output), name
        assert required_encoder(name, variant) == d["encoder"]


def test_required_encoder_rules():
    assert required_encoder("ip-adapter_sd15.bin") == "ViT-H"
    assert required_encoder("ip-adapter-plus-face_sdxl_vit-h.safetensors") == "ViT-H"
    assert required_encoder("IP-Adapter_SDXL.bin") == "ViT-bigG"
    assert required_encoder("ip-adapter_sd15_vit-G.bin") == "ViT-bigG"
    # widths are facts and decide over the name
    assert required_encoder("ip-adapter_sdxl.bin", ("linear", 1024)) == "ViT-H"
    assert required_encoder("x.bin", ("plus", 1024)) == "ViT-L"  # penultimate hidden 1024 is ViT-L's
    assert required_encoder("x.bin", ("image_embeds", 768)) == "ViT-L"
    assert required_encoder("x_sdxl.bin", ("plus", 999)) == "ViT-bigG"  # unknown width: the name decides


def test_faceid_and_broken_adapters(tmp_path):
    faceid = {"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (3072, 1024),
              "image_proj.norm.weight": (768,), "ip_adapter.1.to_k_lora.down.weight": (128, 320),
              **_ip_layers(768)}
    info = inspect_shapes(tmp_path, faceid, name="ip-adapter-faceid_sd15.safetensors")
    assert info.kind == "adapter" and info.base == "SD1.5" and info.problem is None
    assert info.details["variant"] == "faceid" and info.details["num_tokens"] == 4 and info.details["lora_rank"] == 128
    assert info.details["encoder"] is None  # FaceID reads an insightface embedding, no CLIP encoder
    half = {k: v for k, v in _linear(4, 1024, 768).items() if k.startswith("image_proj.")}
    assert "no 'ip_adapter' weights" in inspect_shapes(tmp_path, half).problem
    assert "image projection" in inspect_shapes(tmp_path, _ip_layers(768)).problem
    mixed = {**_linear(4, 1024, 768), **_ip_layers(2048)}
    assert "mixed" in inspect_shapes(tmp_path, mixed).problem


# --- image encoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, projection, family",
                         [(1024, 768, "ViT-L"), (1280, 1024, "ViT-H"), (1664, 1280, "ViT-bigG")])
def test_image_encoders(tmp_path, width, projection, family):
    transformers = {"vision_model.embeddings.class_embedding": (width,),
                    "vision_model.embeddings.patch_embedding.weight": (width, 3, 14, 14),
                    "vision_model.encoder.layers.0.self_attn.q_proj.weight": (8, width),
                    "vision_model.encoder.layers.1.self_attn.q_proj.weight": (8, width),
                    "visual_projection.weight": (projection, width)}
    info = inspect_shapes(tmp_path, transformers)
    assert (info.kind, info.base, info.problem) == ("image_encoder", None, None)
    assert (info.details["family"], info.details["layers"], info.details["projection_dim"]) == (family, 2, projection)
    open_clip = {"visual.class_embedding": (width,), "visual.conv1.weight": (width, 3, 14, 14),
                 "visual.transformer.resblocks.0.attn.in_proj_weight": (8, width), "visual.proj": (width, projection)}
    info = inspect_shapes(tmp_path, open_clip)
    assert (info.kind, info.details["format"], info.details["family"], info.details["projection_dim"]) == (
        "image_encoder", "open_clip", family, projection)


# --- LoRAs (real tensors, written by the safetensors library) ----------------------------------------------

def _save(tmp_path: Path, tensors: dict[str, tuple[int, ...]], name="lora.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file({k: np.zeros(s, np.float16) for k, s in tensors.items()}, str(path), metadata=metadata)
    return path


def test_kohya_loras(tmp_path):
    sd15 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": (),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (768, 4)}
    info = inspect_file(_save(tmp_path, sd15))
    assert (info.kind, info.base, info.problem) == ("lora", "SD1.5", None)
    assert info.details == {"format": "kohya", "algorithm": None, "rank": 4, "text_encoder": True, "layers": 2}
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (16, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 16),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (8, 640),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (16, 1280)}
    info = inspect_file(_save(tmp_path, sdxl))
    assert (info.base, info.details["rank"], info.details["ranks"]) == ("SDXL", 16, [8, 16])
    te_only_sd2 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)}
    assert inspect_file(_save(tmp_path, te_only_sd2)).base == "SD2"
    te2_only = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)}
    assert inspect_file(_save(tmp_path, te2_only)).base == "SDXL"


def test_diffusers_peft_and_lycoris_loras(tmp_path):
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (8, 2048),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (640, 8)}
    info = inspect_file(_save(tmp_path, peft))
    d = info.details
    assert (info.base, d["format"], d["rank"], d["text_encoder"]) == ("SDXL", "peft", 8, False)
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (4, 1024),
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": (320, 4),
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": (4, 1024)}
    info = inspect_file(_save(tmp_path, old))
    assert (info.base, info.details["format"], info.details["text_encoder"]) == ("SD2", "diffusers", True)
    loha = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.{k}": s for k, s in
            {"hada_w1_a": (320, 8), "hada_w1_b": (8, 768), "hada_w2_a": (320, 8), "hada_w2_b": (8, 768),
             "alpha": ()}.items()}
    info = inspect_file(_save(tmp_path, loha))
    d = info.details
    assert (info.base, d["format"], d["algorithm"], d["rank"]) == ("SD1.5", "lycoris", "loha", 8)
    lokr = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1": (8, 8),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w2": (80, 80)}
    info = inspect_file(_save(tmp_path, lokr, metadata={"ss_base_model_version": "sdxl_base_v1-0"}))
    assert (info.kind, info.base, info.details["algorithm"]) == ("lora", "SDXL", "lokr")  # base from the metadata


# --- embeddings ---------------------------------------------------------------------------------------

def test_embeddings(tmp_path):
    info = inspect_file(_save(tmp_path, {"emb_params": (2, 768)}, "style.safetensors"))
    assert (info.kind, info.base, info.details["vectors"]) == ("embedding", "SD1.5", 2)
    assert inspect_file(_save(tmp_path, {"emb_params": (3, 1024)}, "sd2.safetensors")).base == "SD2"
    info = inspect_file(_save(tmp_path, {"clip_l": (5, 768), "clip_g": (5, 1280)}, "xl.safetensors"))
    assert (info.kind, info.base, info.details["vectors"], info.details["encoders"], info.problem) == (
        "embedding", "SDXL", 5, "clip_l + clip_g", None)
    assert "both" in inspect_file(_save(tmp_path, {"clip_g": (5, 1280)}, "half.safetensors")).problem
    diffusers = inspect_file(_save(tmp_path, {"<cat-toy>": (768,)}, "learned_embeds.safetensors"))
    assert (diffusers.base, diffusers.details["format"]) == ("SD1.5", "diffusers")


# --- pickles (torch) -------------------------------------------------------------------------------------

def test_pickles_are_opened_only_when_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "v1-5.ckpt"
    state = {k: torch.zeros(s, dtype=torch.float16) for k, s in SD15_CHECKPOINT.items()}
    torch.save({"global_step": 1, "state_dict": state}, ckpt)
    info = inspect_file(ckpt)
    assert (info.kind, info.problem, info.details) == ("unknown", None, {"format": "pickle"})
    assert info.describe() == "unknown (pickle, inspected on use)"
    info = inspect_file(ckpt, allow_pickle=True)
    assert (info.kind, info.base) == ("checkpoint", "SD1.5")

    embedding = tmp_path / "style.pt"  # A1111's textual-inversion layout
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(3, 768)},
                "name": "style", "step": 9}, embedding)
    info = inspect_file(embedding, allow_pickle=True)
    assert (info.kind, info.base, info.details["vectors"]) == ("embedding", "SD1.5", 3)

    adapter = tmp_path / "ip-adapter_sd15.bin"  # the official .bin nests the two halves
    flat = {k: torch.zeros(s, dtype=torch.float16) for k, s in _linear(4, 1024, 768).items()}
    torch.save({half: {k.removeprefix(half + "."): v for k, v in flat.items() if k.startswith(half + ".")}
                for half in ("image_proj", "ip_adapter")}, adapter)
    info = inspect_file(adapter, allow_pickle=True)
    d = info.details
    assert (info.kind, info.base, d["variant"], d["encoder"]) == ("adapter", "SD1.5", "linear", "ViT-H")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode(str(marker))}, evil)
    info = inspect_file(evil, allow_pickle=True)
    assert info.kind == "unknown" and "refused" in info.problem and not marker.exists()


# --- no torch for listing -------------------------------------------------------------------------------

def test_inspecting_safetensors_does_not_import_torch(tmp_path):
    path = write_header_only(tmp_path / "ip-adapter_sd15.safetensors", _linear(4, 1024, 768))
    code = ("import sys\nfrom imprompt.models.inspect import inspect_file\nimport imprompt.models.hashes as h\n"
            "info = inspect_file(sys.argv[1]); h.short_hash(sys.argv[1])\n"
            "assert info.kind == 'adapter', info\n"
            "heavy = [m for m in ('torch', 'safetensors', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- hashes ---------------------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Counts real hash computations; the per-user cache goes to a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    calls = []
    real = hashes._digest

    def digest(path, start=0):
        calls.append((Path(path).name, start))
        return real(path, start)

    monkeypatch.setattr(hashes, "_digest", digest)
    return calls


def test_short_hash_is_cached_beside_the_file_and_invalidated(tmp_path, counted):
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model.ckpt"
    path.write_bytes(b"weights" * 300_000)  # two 1 MiB blocks and a part
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashes.sha256_file(path) == expected and hashes.short_hash(path) == expected[:10]
    assert len(counted) == 1
    cache = json.loads((folder / hashes.CACHE_NAME).read_text())
    assert cache["files"][str(path.resolve())]["sha256"] == expected
    assert hashes.short_hash(path) == expected[:10] and len(counted) == 1  # from the cache

    stat = path.stat()  # same size, new content and mtime: stale, recomputed
    path.write_bytes(b"Weights" * 300_000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert hashes.short_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10] and len(counted) == 2
    path.write_bytes(b"shorter")  # new size
    assert hashes.short_hash(path) == hashlib.sha256(b"shorter").hexdigest()[:10] and len(counted) == 3
    assert not (tmp_path / "user-cache").exists()


def test_addnet_hash_skips_the_header(tmp_path, counted):
    path = tmp_path / "lora.safetensors"
    tensors = {"lora_unet_x.lora_down.weight": np.arange(12, dtype=np.float16).reshape(3, 4)}
    save_file(tensors, str(path), metadata={"ss_output_name": "a"})
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    first = hashes.addnet_hash(path)
    assert first == hashlib.sha256(data[8 + length:]).hexdigest() and hashes.addnet_short_hash(path) == first[:12]
    assert hashes.sha256_file(path) == hashlib.sha256(data).hexdigest()  # both kinds share one entry
    assert hashes.addnet_hash(path) == first and len(counted) == 2
    save_file(tensors, str(path), metadata={"ss_output_name": "a renamed LoRA"})  # new metadata, same weights
    assert hashes.addnet_hash(path) == first and hashes.sha256_file(path) != hashlib.sha256(data).hexdigest()
    other = tmp_path / "x.ckpt"
    other.write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(ValueError, match="safetensors only"):
        hashes.addnet_hash(other)


def test_unwritable_folder_falls_back_to_the_user_cache(tmp_path, counted):
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / hashes.CACHE_NAME).mkdir()  # cannot be replaced by a file, even by root
    path = folder / "m.safetensors"
    path.write_bytes(b"abc")
    assert hashes.short_hash(path) == hashlib.sha256(b"abc").hexdigest()[:10]
    user = json.loads((tmp_path / "user-cache" / "imprompt" / "hashes.json").read_text())
    assert str(path.resolve()) in user["files"]
    assert hashes.short_hash(path) and len(counted) == 1
    assert not list(folder.glob(".*.tmp"))  # no debris from the failed write
