"""Parity with diffusers' own loaders where they apply: ``load_lora_weights`` + ``set_adapters`` for stacked
LoRAs, ``load_textual_inversion`` for embeddings. imprompt goes its own way only where diffusers would load
a file wrongly (kohya per-layer alphas, text-encoder layouts: see imprompt.generation.loras, whose kohya math
tests/test_loras.py checks by hand); on files in diffusers' own layout the two must agree."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.generation.loras import LoraUse, loras_applied
from imprompt.generation.text_encoding import EmbeddingLibrary, PromptEncoder
from test_loras import TE_LINEARS, UNET_LINEARS, _targets, save, te_output, unet_output

torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def sd15():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peft_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA in diffusers' own PEFT layout (``<component>.<module>.lora_A/B.weight``, no alpha: scale 1),
    over the UNet's attention linears and every text-encoder projection: the format diffusers reads as is."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for component, model, names in (
            ("unet", pipe.unet, _targets(pipe.unet, UNET_LINEARS, "attentions")),
            ("text_encoder", pipe.text_encoder, _targets(pipe.text_encoder, TE_LINEARS))):
        modules = dict(model.named_modules())
        for name in names:
            if not isinstance(modules[name], torch.nn.Linear):
                continue  # proj_in / proj_out are 1x1 convolutions in the tiny UNet
            out[f"{component}.{name}.lora_A.weight"] = torch.randn(2, modules[name].in_features, generator=generator) * 0.3
            out[f"{component}.{name}.lora_B.weight"] = torch.randn(modules[name].out_features, 2, generator=generator) * 0.3
    return out


def diffusers_outputs(pipe, states: dict[str, dict], weights: list) -> tuple[torch.Tensor, torch.Tensor]:
    for name, state in states.items():
        pipe.load_lora_weights(dict(state), adapter_name=name)
    try:
        pipe.set_adapters(list(states), adapter_weights=weights)
        return unet_output(pipe), te_output(pipe.text_encoder, pipe.tokenizer)
    finally:
        pipe.unload_lora_weights()


def test_two_stacked_loras_equal_diffusers_set_adapters(sd15, tmp_path):
    states = {"a": peft_lora(sd15, 0), "b": peft_lora(sd15, 100)}
    paths = {name: save(tmp_path, state, f"{name}.safetensors") for name, state in states.items()}
    plain = unet_output(sd15)
    unet_theirs, te_theirs = diffusers_outputs(sd15, states, [0.8, -0.5])
    with loras_applied(sd15, [LoraUse(paths["a"], "a", te=0.8, unet=0.8), LoraUse(paths["b"], "b", te=-0.5, unet=-0.5)]):
        unet_ours, te_ours = unet_output(sd15), te_output(sd15.text_encoder, sd15.tokenizer)
    assert not torch.allclose(unet_ours, plain, atol=1e-3)  # the LoRAs act
    assert torch.allclose(unet_ours, unet_theirs, atol=1e-5)
    assert torch.allclose(te_ours, te_theirs, atol=1e-5)


def test_separate_text_encoder_and_unet_weights_equal_diffusers_per_component_weights(sd15, tmp_path):
    state = peft_lora(sd15, 3)
    path = save(tmp_path, state)
    unet_theirs, te_theirs = diffusers_outputs(sd15, {"s": state}, [{"unet": 0.3, "text_encoder": 1.2}])
    with loras_applied(sd15, [LoraUse(path, "s", te=1.2, unet=0.3)]):
        assert torch.allclose(unet_output(sd15), unet_theirs, atol=1e-5)
        assert torch.allclose(te_output(sd15.text_encoder, sd15.tokenizer), te_theirs, atol=1e-5)


@pytest.mark.parametrize("vectors", [1, 3])
def test_embedding_equals_diffusers_load_textual_inversion(sd15, tmp_path, vectors):
    table = sd15.text_encoder.get_input_embeddings().weight
    embedding = torch.randn(vectors, table.shape[1], generator=torch.Generator().manual_seed(vectors)) * table.std()
    save_file({"emb_params": embedding}, str(tmp_path / "zq.safetensors"))
    prompt = "a zq on a mat"
    ours = PromptEncoder(sd15, EmbeddingLibrary({"zq": tmp_path / "zq.safetensors"})).encode(prompt).hidden

    theirs_pipe = copy.deepcopy(sd15)  # load_textual_inversion grows the tokenizer and the embedding table
    theirs_pipe.load_textual_inversion(str(tmp_path / "zq.safetensors"), token="zq")
    theirs = theirs_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)[0]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, PromptEncoder(sd15).encode(prompt).hidden, atol=1e-3)


def test_sdxl_embedding_pair_equals_diffusers_loading_each_encoder(tmp_path):
    pipe = tm.sdxl_pipeline()
    generator = torch.Generator().manual_seed(5)
    clip_l = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=generator) * 0.02
    clip_g = torch.randn(2, pipe.text_encoder_2.config.hidden_size, generator=generator) * 0.02
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "zq.safetensors"))
    prompt = "a zq cat"
    ours = PromptEncoder(pipe, EmbeddingLibrary({"zq": tmp_path / "zq.safetensors"})).encode(prompt)

    # diffusers' documented way for SDXL: one load per encoder with its own tokenizer
    pipe.load_textual_inversion(clip_l, token="zq", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="zq", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert torch.allclose(ours.hidden, embeds, atol=1e-6)
    assert torch.allclose(ours.pooled, pooled, atol=1e-6)
