"""LoRA stacking (imprompt.generation.loras): A1111 ``<lora:NAME:TE:UNET>`` on tiny SD1.5 / SDXL pipelines.

The test LoRAs are written in the files' real naming, built from the models' own module trees:
kohya-ss sd-scripts (``lora_unet_<module path with _>.lora_down.weight`` [rank, in], ``.lora_up.weight``
[out, rank], ``.alpha``; 4-d for conv layers, i.e. LoCon; SDXL's UNet under the sgm names
``input_blocks_3_1_...``) and diffusers / PEFT (``unet.<module path>.lora_A.weight``). The math is
checked by hand against A1111's ``W x + m * alpha / rank * up(down(x))``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.generation import loras
from imprompt.generation.loras import LoraUse, loras_applied, read_lora

torch.set_flush_denormal(True)

PROMPT = "a red star"
TE_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's CLIPAttention + CLIPMLP
UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LOCON_CONVS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


# --- LoRA files in the formats' own naming ------------------------------------------------------

def _factors(module: torch.nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """down [rank, in(, kh, kw)] and up [out, rank(, 1, 1)], large enough to change outputs visibly."""
    if isinstance(module, torch.nn.Linear):
        down, up = (rank, module.in_features), (module.out_features, rank)
    else:
        down, up = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return torch.randn(down, generator=generator) * 0.3, torch.randn(up, generator=generator) * 0.3


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...], inside: str = "") -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and name.endswith(suffixes) and inside in name]


def kohya_part(model, prefix: str, names: list[str], *, rank: int = 2, alphas=(1.0, 4.0, 0.5), seed: int = 0,
               rename=lambda name: name) -> dict[str, torch.Tensor]:
    """kohya tensors for ``names`` of ``model``; the alphas cycle so that the layers' scales differ."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for i, name in enumerate(names):
        key = prefix + rename(name).replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _factors(modules[name], rank, generator)
        if alphas:
            out[f"{key}.alpha"] = torch.tensor(float(alphas[i % len(alphas)]))
    return out


def kohya_te(text_encoder, prefix: str = "lora_te_", **kw) -> dict[str, torch.Tensor]:
    # kohya names CLIP's modules with "text_model." on top, which transformers 5 dropped from CLIPTextModel
    lead = "" if hasattr(text_encoder, "text_model") else "text_model."
    return kohya_part(text_encoder, prefix, _targets(text_encoder, TE_LINEARS), rename=lambda n: lead + n, **kw)


def kohya_sd15(pipe, seed: int = 0, locon: bool = True) -> dict[str, torch.Tensor]:
    unet = _targets(pipe.unet, UNET_LINEARS, "attentions") + (_targets(pipe.unet, LOCON_CONVS) if locon else [])
    return {**kohya_te(pipe.text_encoder, seed=seed), **kohya_part(pipe.unet, "lora_unet_", unet, seed=seed + 1)}


def _sgm(name: str, layers_per_block: int) -> str:
    """The sgm (original SDXL) name of a diffusers attention module, as kohya writes SDXL UNet LoRAs:
    down_blocks.i.attentions.j -> input_blocks.(1 + i*(lpb+1) + j).1, up_blocks.i.attentions.j ->
    output_blocks.(i*(lpb+1) + j).1, mid_block.attentions.0 -> middle_block.1."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return ".".join([f"input_blocks.{1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])}.1", *parts[4:]])
    if parts[0] == "up_blocks":
        return ".".join([f"output_blocks.{int(parts[1]) * (layers_per_block + 1) + int(parts[3])}.1", *parts[4:]])
    assert parts[:3] == ["mid_block", "attentions", "0"], name
    return ".".join(["middle_block.1", *parts[3:]])


def kohya_sdxl(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    lpb = pipe.unet.config.layers_per_block
    unet = kohya_part(pipe.unet, "lora_unet_", _targets(pipe.unet, UNET_LINEARS, "attentions"), seed=seed,
                      rename=lambda n: _sgm(n, lpb))
    return {**unet, **kohya_te(pipe.text_encoder, "lora_te1_", seed=seed + 1),
            **kohya_te(pipe.text_encoder_2, "lora_te2_", seed=seed + 2)}


def save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "style.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata)
    return path


# --- what "the pipeline as before" means ----------------------------------------------------------

def snapshot(pipe) -> dict:
    """Every tensor, every module and parameter object (by identity), and the attributes of each model."""
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, part, None)
        if model is None:
            continue
        out[part] = {
            "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
            "modules": [(name, type(m), id(m)) for name, m in model.named_modules()],
            "parameters": [(name, id(p)) for name, p in model.named_parameters()],
            "attributes": {k: v for k, v in vars(model).items() if k not in ("_modules", "_parameters", "_buffers")},
            "processors": dict(model.attn_processors) if part == "unet" else None,
        }
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for part in before:
        b, a = before[part], after[part]
        assert b["modules"] == a["modules"], f"{part}: module tree changed"
        assert b["tensors"].keys() == a["tensors"].keys()
        for key, tensor in b["tensors"].items():
            assert torch.equal(tensor, a["tensors"][key]), f"{part}.{key} changed"
        assert b["parameters"] == a["parameters"], f"{part}: parameter objects replaced"
        assert b["attributes"].keys() == a["attributes"].keys(), f"{part}: attributes added or removed"
        assert all(a["attributes"][k] is v for k, v in b["attributes"].items()), f"{part}: attributes replaced"
        assert b["processors"] == a["processors"]
    from peft.tuners.tuners_utils import BaseTunerLayer
    # (the module lists above are equal, so no PEFT wrapper is left; said again for the reader)
    assert not any(issubclass(t, BaseTunerLayer) for part in after.values() for _, t, _ in part["modules"])


def latents(pipe, **kw) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


def te_output(text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=generator),
                                       "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        return pipe.unet(sample, 10, context, **kwargs).sample


@pytest.fixture(scope="module")
def sd15():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- applying and removing ----------------------------------------------------------------------

def test_empty_uses_yield_nothing_and_touch_nothing(sd15):
    before = snapshot(sd15)
    with loras_applied(sd15, []) as names:
        assert names == []
        assert_same(before, snapshot(sd15))


def test_kohya_sd15_changes_the_image_and_is_removed_bit_for_bit(sd15, tmp_path):
    path = save(tmp_path, {k: v.half() for k, v in kohya_sd15(sd15).items()})  # as most LoRA files are
    plain, before = latents(sd15), snapshot(sd15)
    with loras_applied(sd15, [LoraUse(path, "style")]) as names:
        assert names == ["imprompt_0_style"]
        inside = latents(sd15)
    assert not torch.allclose(inside, plain, atol=1e-3)
    assert torch.equal(latents(sd15), plain)
    assert_same(before, snapshot(sd15))


def test_every_layer_of_the_file_is_applied(sd15, tmp_path):
    """UNet attention Linears, 1x1 proj convs, LoCon 3x3 convs (stride 2 in the downsampler) and all six
    Linears of each CLIP layer: each is wrapped, with A1111's scale m * alpha / rank."""
    state = kohya_sd15(sd15)
    path = save(tmp_path, state)
    with loras_applied(sd15, [LoraUse(path, "style", te=0.5, unet=2.0)]) as (adapter,):
        for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
            wrapped = {n: m for n, m in getattr(sd15, part).named_modules() if hasattr(m, "scaling")}
            in_file = {k[len(prefix):-len(".alpha")] for k in state if k.startswith(prefix) and k.endswith(".alpha")}
            assert {n.replace(".", "_") for n in wrapped} == in_file
            for name, module in wrapped.items():
                key = prefix + name.replace(".", "_")
                rank = state[f"{key}.lora_down.weight"].shape[0]
                # alpha / rank is folded into the up weight; PEFT's scaling is the multiplier alone
                assert module.scaling[adapter] == (2.0 if part == "unet" else 0.5)
                assert torch.allclose(module.lora_B[adapter].weight,
                                      state[f"{key}.lora_up.weight"] * state[f"{key}.alpha"] / rank)
                assert torch.equal(module.lora_A[adapter].weight, state[f"{key}.lora_down.weight"])


def _by_hand(x, weight, bias, down, up, scale, conv=None):
    if conv is None:
        return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, down), up)
    stride, padding = conv
    return (F.conv2d(x, weight, bias, stride, padding)
            + scale * F.conv2d(F.conv2d(x, down, None, stride, padding), up))


@pytest.mark.parametrize("te, unet", [(0.7, -0.4), (1.0, 1.0)])
def test_linear_and_conv_layers_match_a1111_by_hand(sd15, tmp_path, te, unet):
    """W x + m * alpha / rank * up(down(x)) for a UNet Linear, a LoCon conv and a text-encoder Linear,
    each layer with its own alpha (2 / 0.5 / 4 at rank 4); two LoRAs on a layer add up."""
    names = {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.resnets.0.conv1"],
             "te": ["encoder.layers.1.self_attn.q_proj"]}
    first = {**kohya_part(sd15.unet, "lora_unet_", names["unet"], rank=4, alphas=(2.0, 0.5)),
             **kohya_part(sd15.text_encoder, "lora_te_", names["te"], rank=4, alphas=(4.0,),
                          rename=lambda n: "text_model." + n)}
    second = kohya_part(sd15.unet, "lora_unet_", names["unet"][:1], rank=3, alphas=None, seed=5)
    torch.save(second, tmp_path / "b.pt")
    uses = [LoraUse(save(tmp_path, first, "a.safetensors"), "a", te, unet), LoraUse(tmp_path / "b.pt", "b", te, 0.25)]
    modules = {**dict(sd15.unet.named_modules()), **dict(sd15.text_encoder.named_modules())}
    generator = torch.Generator().manual_seed(3)
    inputs = {names["unet"][0]: torch.randn(2, 5, 32, generator=generator),
              names["unet"][1]: torch.randn(1, 16, 8, 8, generator=generator),
              names["te"][0]: torch.randn(2, 5, 32, generator=generator)}
    with loras_applied(sd15, uses):
        live = {**dict(sd15.unet.named_modules()), **dict(sd15.text_encoder.named_modules())}
        with torch.no_grad():
            got = {name: live[name](x) for name, x in inputs.items()}

    def kohya(state, name, te_layer=False):
        key = ("lora_te_text_model_" if te_layer else "lora_unet_") + name.replace(".", "_")
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        alpha = state[f"{key}.alpha"].item() if f"{key}.alpha" in state else down.shape[0]
        return down, up, alpha / down.shape[0]

    with torch.no_grad():
        lin = modules[names["unet"][0]]
        d1, u1, s1 = kohya(first, names["unet"][0])
        d2, u2, s2 = kohya(second, names["unet"][0])
        x = inputs[names["unet"][0]]
        expected = _by_hand(x, lin.weight, lin.bias, d1, u1, unet * s1) + 0.25 * s2 * F.linear(F.linear(x, d2), u2)
        assert torch.allclose(got[names["unet"][0]], expected, atol=1e-5)

        conv = modules[names["unet"][1]]
        d, u, s = kohya(first, names["unet"][1])
        expected = _by_hand(inputs[names["unet"][1]], conv.weight, conv.bias, d, u, unet * s, (conv.stride, conv.padding))
        assert torch.allclose(got[names["unet"][1]], expected, atol=1e-5)

        q = modules[names["te"][0]]
        d, u, s = kohya(first, names["te"][0], te_layer=True)
        expected = _by_hand(inputs[names["te"][0]], q.weight, q.bias, d, u, te * s)
        assert torch.allclose(got[names["te"][0]], expected, atol=1e-5)
        assert s == 1.0 and kohya(first, names["unet"][0])[2] == 0.5  # the layers' scales really differ


def test_multiplier_zero_leaves_that_part_out(sd15, tmp_path):
    path = save(tmp_path, kohya_sd15(sd15, locon=False))
    te_plain, unet_plain = te_output(sd15.text_encoder, sd15.tokenizer), unet_output(sd15)
    with loras_applied(sd15, [LoraUse(path, "s", te=1.0, unet=1.0)]):
        assert not torch.allclose(te_output(sd15.text_encoder, sd15.tokenizer), te_plain, atol=1e-4)
        assert not torch.allclose(unet_output(sd15), unet_plain, atol=1e-4)
    with loras_applied(sd15, [LoraUse(path, "s", te=0.0, unet=1.0)]):
        assert torch.equal(te_output(sd15.text_encoder, sd15.tokenizer), te_plain)
        assert loras._adapter_layers(sd15.text_encoder) == []
        assert not torch.allclose(unet_output(sd15), unet_plain, atol=1e-4)
    with loras_applied(sd15, [LoraUse(path, "s", te=0.8, unet=0.0)]):
        assert torch.equal(unet_output(sd15), unet_plain)
        assert loras._adapter_layers(sd15.unet) == []
        assert not torch.allclose(te_output(sd15.text_encoder, sd15.tokenizer), te_plain, atol=1e-4)
    with loras_applied(sd15, [LoraUse(path, "s", te=0.0, unet=0.0)]) as names:
        assert names == []


def test_text_encoder_lora_of_attention_projections_only(sd15, tmp_path):
    """diffusers alone raises "Could not automatically infer state dict type" for a kohya text-encoder
    part without out_proj / mlp layers (it guesses the layout from those); loras_applied loads it."""
    state = kohya_part(sd15.text_encoder, "lora_te_", _targets(sd15.text_encoder, ("q_proj",)),
                       rename=lambda n: "text_model." + n)
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        try:
            sd15.load_lora_weights(dict(state), adapter_name="direct")
        finally:
            sd15.unload_lora_weights()
    plain = te_output(sd15.text_encoder, sd15.tokenizer)
    with loras_applied(sd15, [LoraUse(save(tmp_path, state), "q")]):
        assert len(loras._adapter_layers(sd15.text_encoder)) == 2
        assert not torch.allclose(te_output(sd15.text_encoder, sd15.tokenizer), plain, atol=1e-4)
    assert torch.equal(te_output(sd15.text_encoder, sd15.tokenizer), plain)


def test_diffusers_peft_format_with_and_without_alpha_metadata(sd15, tmp_path):
    to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    fc1 = "encoder.layers.0.mlp.fc1"
    generator = torch.Generator().manual_seed(4)
    modules = {"unet": dict(sd15.unet.named_modules()), "text_encoder": dict(sd15.text_encoder.named_modules())}
    state = {}
    for part, name in (("unet", to_k), ("text_encoder", fc1)):
        down, up = _factors(modules[part][name], 4, generator)
        state[f"{part}.{name}.lora_A.weight"], state[f"{part}.{name}.lora_B.weight"] = down, up
    x_unet = torch.randn(1, 3, 32, generator=generator)
    x_te = torch.randn(1, 3, 32, generator=generator)
    # diffusers' save_lora_weights writes the PEFT config, per part, into the safetensors header
    config = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 4,
              "text_encoder.alpha_pattern": {"mlp.fc1": 2}}
    for metadata, unet_scale, te_scale in ((None, 1.0, 1.0), ({"lora_adapter_metadata": json.dumps(config)}, 2.0, 0.5)):
        path = save(tmp_path, state, metadata=metadata)
        with loras_applied(sd15, [LoraUse(path, "peft", te=0.5, unet=1.5)]):
            with torch.no_grad():
                got_unet = dict(sd15.unet.named_modules())[to_k](x_unet)
                got_te = dict(sd15.text_encoder.named_modules())[fc1](x_te)
        lin, fc = modules["unet"][to_k], modules["text_encoder"][fc1]
        with torch.no_grad():
            assert torch.allclose(got_unet, _by_hand(x_unet, lin.weight, lin.bias, state[f"unet.{to_k}.lora_A.weight"],
                                                     state[f"unet.{to_k}.lora_B.weight"], 1.5 * unet_scale), atol=1e-5)
            assert torch.allclose(got_te, _by_hand(x_te, fc.weight, fc.bias, state[f"text_encoder.{fc1}.lora_A.weight"],
                                                   state[f"text_encoder.{fc1}.lora_B.weight"], 0.5 * te_scale), atol=1e-5)


def test_sdxl_te1_te2_and_unet_applied_and_removed_bit_for_bit(tmp_path):
    pipe = tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe.text_encoder, "text_model") and hasattr(pipe.text_encoder_2, "text_model")
    path = save(tmp_path, kohya_sdxl(pipe), "xl.safetensors")
    te1, te2 = te_output(pipe.text_encoder, pipe.tokenizer), te_output(pipe.text_encoder_2, pipe.tokenizer_2)
    unet = unet_output(pipe)
    plain, before = latents(pipe), snapshot(pipe)
    unet_layers = len(_targets(pipe.unet, UNET_LINEARS, "attentions"))
    with loras_applied(pipe, [LoraUse(path, "xl", te=0.9, unet=1.1)]):
        # every layer landed: sgm block names mapped onto the diffusers UNet, te1 / te2 onto their encoders
        counts = {part: len(loras._adapter_layers(getattr(pipe, part)))
                  for part in ("unet", "text_encoder", "text_encoder_2")}
        assert counts == {"unet": unet_layers, "text_encoder": 12, "text_encoder_2": 12}
        assert not torch.allclose(te_output(pipe.text_encoder, pipe.tokenizer), te1, atol=1e-4)
        assert not torch.allclose(te_output(pipe.text_encoder_2, pipe.tokenizer_2), te2, atol=1e-4)
        assert not torch.allclose(unet_output(pipe), unet, atol=1e-4)
        assert not torch.allclose(latents(pipe), plain, atol=1e-3)
    assert torch.equal(latents(pipe), plain)
    assert_same(before, snapshot(pipe))


def test_controlnet_pipeline_and_attached_ip_adapter_survive(sd15, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline

    from imprompt import attach

    pipe = StableDiffusionControlNetPipeline(**sd15.components, controlnet=tm.controlnet(sd15.unet))
    pipe.set_progress_bar_config(disable=True)
    control = tm.reference_images(1, 16)[0]
    path = save(tmp_path, kohya_sd15(sd15))
    with attach(pipe.unet, tm.random_adapter(pipe.unet)):
        plain, before = latents(pipe, image=control), snapshot(pipe)
        controlnet = {k: v.clone() for k, v in pipe.controlnet.state_dict().items()}
        with loras_applied(pipe, [LoraUse(path, "style")]):
            assert not torch.allclose(latents(pipe, image=control), plain, atol=1e-3)
        assert torch.equal(latents(pipe, image=control), plain)
        assert_same(before, snapshot(pipe))
        assert all(torch.equal(v, controlnet[k]) for k, v in pipe.controlnet.state_dict().items())


# --- refusals -------------------------------------------------------------------------------------

def test_sdxl_lora_on_sd15_is_refused_and_nothing_stays(sd15, tmp_path):
    path = save(tmp_path, kohya_sdxl(tm.sdxl_pipeline()), "xl_style.safetensors")
    before = snapshot(sd15)
    for use in (LoraUse(path, "xl_style"), LoraUse(path, "xl_style", te=0.0)):
        with pytest.raises(ValueError, match=r"xl_style\.safetensors does not fit this model.*an SDXL LoRA.*"
                                             r"StableDiffusionPipeline") as err:
            with loras_applied(sd15, [use]):
                pass
        assert_same(before, snapshot(sd15))
    assert "cross-attention width 32" in str(err.value)


def test_a_layer_that_names_no_module_is_refused_after_good_loras_are_removed(sd15, tmp_path):
    good = save(tmp_path, kohya_sd15(sd15), "good.safetensors")
    state = kohya_part(sd15.unet, "lora_unet_", _targets(sd15.unet, ("to_q",), "attentions"))
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 16)
    state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(16, 2)
    bad = save(tmp_path, state, "partial.safetensors")
    before = snapshot(sd15)
    with pytest.raises(ValueError, match=r"partial\.safetensors does not fit this model: only \d+ of its \d+ unet layers"):
        with loras_applied(sd15, [LoraUse(good, "good"), LoraUse(bad, "partial")]):
            pass
    assert_same(before, snapshot(sd15))


def test_a_pipeline_with_its_own_lora_is_refused(sd15, tmp_path):
    sd15.load_lora_weights(kohya_sd15(sd15), adapter_name="theirs")
    try:
        with pytest.raises(ValueError, match="already has LoRA layers loaded"):
            with loras_applied(sd15, [LoraUse(save(tmp_path, kohya_sd15(sd15)), "style")]):
                pass
        assert loras._adapter_layers(sd15.unet)  # theirs is left alone
    finally:
        sd15.unload_lora_weights()


LYCORIS = {
    "LoHa": {".hada_w1_a": (8, 2), ".hada_w1_b": (2, 8), ".hada_w2_a": (8, 2), ".hada_w2_b": (2, 8), ".alpha": ()},
    "LoKr": {".lokr_w1": (2, 2), ".lokr_w2": (4, 4), ".alpha": ()},
    "(IA)^3": {".weight": (8,), ".on_input": ()},
    "GLoRA": {".a1.weight": (2, 8), ".a2.weight": (8, 2), ".b1.weight": (2, 8), ".b2.weight": (8, 2)},
    "DoRA": {".lora_down.weight": (2, 8), ".lora_up.weight": (8, 2), ".dora_scale": (1, 8)},
    "lora_mid": {".lora_down.weight": (2, 8, 1, 1), ".lora_mid.weight": (2, 2, 3, 3), ".lora_up.weight": (8, 2, 1, 1)},
}


@pytest.mark.parametrize("kind", sorted(LYCORIS))
def test_formats_diffusers_cannot_apply_are_refused(tmp_path, kind):
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = save(tmp_path, {layer + k: torch.ones(s) for k, s in LYCORIS[kind].items()}, f"{kind[:4]}.safetensors")
    with pytest.raises(ValueError, match=rf"LoRA {re.escape(path.name)} is .*{re.escape(kind)}.*"
                                         r"kohya-ss / A1111 LoRA and LoCon .* diffusers / PEFT"):
        read_lora(path)


def test_unknown_keys_and_half_layers_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"odd\.safetensors has 1 keys that are not LoRA layers.*'model\.x\.weight'"):
        read_lora(save(tmp_path, {"model.x.weight": torch.ones(2)}, "odd.safetensors"))
    with pytest.raises(ValueError, match=r"needs both down and up"):
        read_lora(save(tmp_path, {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4)}, "half.safetensors"))


class _Payload:
    """Creates the marker file if unpickled, i.e. if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_load_tensors_only(tmp_path, sd15):
    state = kohya_part(sd15.unet, "lora_unet_", _targets(sd15.unet, ("to_q",), "attentions"))
    torch.save(state, tmp_path / "plain.pt")
    loaded = read_lora(tmp_path / "plain.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    marker = tmp_path / "code-ran"
    evil = {"lora_unet_x.lora_down.weight": _Payload(marker)}
    torch.save(evil, tmp_path / "evil.ckpt")
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(evil, protocol=4))
    torch.save(evil, tmp_path / "evil.safetensors")
    for name in ("evil.ckpt", "evil.bin"):
        with pytest.raises(ValueError, match=rf"{name} holds more than tensors and was refused without running it"):
            read_lora(tmp_path / name)
    with pytest.raises(ValueError, match=r"evil\.safetensors is a PyTorch pickle .*rename it to evil\.pt"):
        read_lora(tmp_path / "evil.safetensors")
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"unknown extension '\.txt'"):
        read_lora(tmp_path / "notes.txt")
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueError, match=r"lfs\.safetensors is a Git LFS pointer"):
        read_lora(tmp_path / "lfs.safetensors")


def test_cache_reads_a_file_once_until_it_changes(sd15, tmp_path, monkeypatch):
    reads = []
    real = loras.read_lora
    monkeypatch.setattr(loras, "read_lora", lambda path: reads.append(path) or real(path))
    path = save(tmp_path, kohya_sd15(sd15, locon=False))
    cache: dict = {}
    for _ in range(2):
        with loras_applied(sd15, [LoraUse(path, "s")], cache):
            pass
    assert reads == [path] and cache[path][2].keys() == read_lora(path).keys()
    save(tmp_path, kohya_sd15(sd15, seed=9, locon=False))
    os.utime(path, ns=(cache[path][0] + 10**9, cache[path][0] + 10**9))
    with loras_applied(sd15, [LoraUse(path, "s")], cache):
        pass
    assert reads == [path, path]
