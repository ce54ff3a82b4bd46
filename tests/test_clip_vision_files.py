"""Single-file CLIP vision encoders as ComfyUI and the A1111 ControlNet extension keep them: the transformers
and the OpenCLIP key layouts, .safetensors and weights-only .pth, with or without the text tower."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import tiny_models as tm
from imprompt.adapter.checkpoint import save_adapter
from imprompt.adapter.variants import CheckpointError
from imprompt.cli import main
from imprompt.encoding import ImageEncoder
from imprompt.files import PickleRefusedError
from imprompt.models.clip_vision import infer_vision_config, load_clip_vision_file, vision_layout

torch.set_flush_denormal(True)


def _encoder(width: int = 768, heads: int = 12, act: str = "quick_gelu", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=37, projection_dim=24, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=tm.IMAGE_SIZE, patch_size=8, hidden_act=act)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # non-trivial norms, so that a swapped weight and bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _transformers_state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _openclip_state(model) -> dict[str, torch.Tensor]:
    """The same weights as OpenCLIP's VisionTransformer names them, written independently of the loader:
    q, k, v stacked into in_proj, the projection as the [width, projection_dim] matrix used as x @ proj."""
    s = model.state_dict()
    out = {"visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": s["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": s["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": s["vision_model.post_layernorm.bias"],
           "visual.proj": s["visual_projection.weight"].T}
    for i in range(model.config.num_hidden_layers):
        hf, oc = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[oc + f"attn.in_proj_{part}"] = torch.cat([s[hf + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
            for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[oc + f"{ours}.{part}"] = s[hf + f"{theirs}.{part}"]
    return {k: v.contiguous() for k, v in out.items()}


def _text_tower_openclip(width: int = 16) -> dict[str, torch.Tensor]:
    return {"token_embedding.weight": torch.randn(50, width), "positional_embedding": torch.randn(8, width),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * width, width),
            "ln_final.weight": torch.ones(width), "text_projection": torch.randn(width, 24),
            "logit_scale": torch.tensor(4.6)}


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _same_outputs(loaded, reference) -> None:
    x = _pixels()
    with torch.no_grad():
        a, b = loaded(pixel_values=x, output_hidden_states=True), reference(pixel_values=x, output_hidden_states=True)
    assert torch.equal(a.image_embeds, b.image_embeds)
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])  # what the plus adapters read
    assert loaded.config.hidden_act == reference.config.hidden_act
    assert loaded.config.num_attention_heads == reference.config.num_attention_heads


@pytest.mark.parametrize("layout", ["transformers", "openclip"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_both_layouts_load_exactly(tmp_path, layout, suffix):
    model = _encoder()
    state = _transformers_state(model) if layout == "transformers" else _openclip_state(model)
    if layout == "openclip":
        state.update(_text_tower_openclip())  # a whole OpenCLIP model: the text tower is ignored
    else:
        state["text_model.embeddings.token_embedding.weight"] = torch.randn(50, 16)
        state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / f"clip{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert vision_layout(state) == layout
    _same_outputs(load_clip_vision_file(path), model)


def test_a_wrapped_pth_and_the_legacy_position_ids_buffer(tmp_path):
    model = _encoder()
    state = _transformers_state(model)
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # transformers < 4.31 wrote it
    torch.save({"state_dict": state}, tmp_path / "clip_h.pth")
    _same_outputs(load_clip_vision_file(tmp_path / "clip_h.pth"), model)


def test_widths_pick_heads_and_activation_and_unknown_widths_must_be_told(tmp_path):
    vit_h = _encoder(width=1280, heads=16, act="gelu", layers=1)  # OpenCLIP ViT-H/14: GELU, 16 heads of 80
    save_file(_openclip_state(vit_h), tmp_path / "CLIP-ViT-H-14.safetensors")
    _same_outputs(load_clip_vision_file(tmp_path / "CLIP-ViT-H-14.safetensors"), vit_h)
    config = infer_vision_config(_openclip_state(vit_h))
    assert (config.hidden_size, config.image_size, config.patch_size, config.num_hidden_layers,
            config.intermediate_size, config.projection_dim) == (1280, tm.IMAGE_SIZE, 8, 1, 37, 24)

    odd = _encoder(width=32, heads=4, act="gelu")
    save_file(_transformers_state(odd), tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"width 32 is not one imprompt knows .*num_heads"):
        load_clip_vision_file(tmp_path / "odd.safetensors")
    _same_outputs(load_clip_vision_file(tmp_path / "odd.safetensors", num_heads=4, hidden_act="gelu"), odd)
    with pytest.raises(CheckpointError, match=r"num_heads 5 does not divide the width 32"):
        load_clip_vision_file(tmp_path / "odd.safetensors", num_heads=5, hidden_act="gelu")


def test_files_that_are_not_a_vision_encoder_are_refused_by_name(tmp_path):
    model = _encoder()
    text_only = tmp_path / "clip_l_text.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.randn(50, 16)}, text_only)
    with pytest.raises(CheckpointError, match=r"clip_l_text\.safetensors holds a CLIP text encoder .* no vision tower"):
        load_clip_vision_file(text_only)

    no_projection = {k: v for k, v in _openclip_state(model).items() if k != "visual.proj"}
    save_file(no_projection, tmp_path / "no-proj.safetensors")
    with pytest.raises(CheckpointError, match=r"no projection .*visual\.proj.*image_embeds"):
        load_clip_vision_file(tmp_path / "no-proj.safetensors")

    gap = {k: v for k, v in _transformers_state(_encoder(layers=3)).items() if ".layers.1." not in k}
    save_file(gap, tmp_path / "gap.safetensors")
    with pytest.raises(CheckpointError, match=r"layers up to 2 but none numbered 1"):
        load_clip_vision_file(tmp_path / "gap.safetensors")

    short = _transformers_state(model)
    del short["vision_model.encoder.layers.0.mlp.fc2.bias"]
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match=r"1 of its \d+ tensors missing \(vision_model\.encoder\.layers\.0\.mlp\.fc2\.bias\)"):
        load_clip_vision_file(tmp_path / "short.safetensors")

    full = tmp_path / "full.safetensors"
    save_file(_transformers_state(model), full)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_clip_vision_file(truncated)
    with pytest.raises(CheckpointError, match=r"unknown file type '\.onnx'"):
        load_clip_vision_file(tmp_path / "clip.onnx")


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/imprompt-evil-clip-marker", "w"))


def test_a_pth_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/imprompt-evil-clip-marker"
    if os.path.exists(marker):
        os.remove(marker)
    with open(tmp_path / "clip_h.pth", "wb") as f:
        pickle.dump({"visual.proj": _Evil()}, f, protocol=2)
    with pytest.raises(PickleRefusedError, match=r"clip_h\.pth holds more than tensors and was refused without running"):
        load_clip_vision_file(tmp_path / "clip_h.pth")
    assert not os.path.exists(marker)


def test_a_comfyui_clip_vision_file_by_name_gives_the_folder_encoders_pixels(tmp_path):
    """`--image-encoder NAME` finds an OpenCLIP-layout file in models/clip_vision; the image is the one the
    same weights give from a transformers folder."""
    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(tmp_path / "sd")
    encoder = _encoder()
    encoder.save_pretrained(tmp_path / "image_encoder")
    adapter = tm.random_adapter(pipe.unet, "plus", encoder=encoder)
    save_adapter(adapter, tmp_path / "ip-adapter-plus_sd15.safetensors")
    comfy = tmp_path / "comfy" / "models" / "clip_vision"
    comfy.mkdir(parents=True)
    save_file(_openclip_state(encoder), comfy / "Tiny-ViT-B.safetensors")
    tm.reference_images(1)[0].save(tmp_path / "ref.png")
    assert isinstance(ImageEncoder.load(comfy / "Tiny-ViT-B.safetensors"), ImageEncoder)

    def generate(out, *encoder_args):
        code = main(["generate", "--model", str(tmp_path / "sd"), "--adapter", str(tmp_path / "ip-adapter-plus_sd15.safetensors"),
                     "--image", str(tmp_path / "ref.png"), "--prompt", "a red star", "--steps", "2", "--seed", "3",
                     "--output", str(out), *encoder_args])
        assert code == 0
        (png,) = sorted(out.glob("*.png"))
        return np.asarray(Image.open(png))

    folder = generate(tmp_path / "a", "--image-encoder", str(tmp_path / "image_encoder"))
    named = generate(tmp_path / "b", "--models-dir", str(tmp_path / "comfy"), "--image-encoder", "tiny-vit-b")
    assert np.array_equal(folder, named)
    no_adapter = generate(tmp_path / "c", "--image-encoder", str(tmp_path / "image_encoder"), "--scale", "0")
    assert not np.array_equal(folder, no_adapter)  # the encoder's features did reach the image
