"""Invariants of attaching and generating: what must hold whatever the weights are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, LayerScales, attach, generate
from imprompt.adapter.attention import IMAGE_PROMPTS_KWARG, DecoupledAttnProcessor
from imprompt.generation.prompts import BatchLayout, prepare_image_prompt

PROMPT = "a green circle"


@pytest.fixture(scope="module")
def world():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoder = tm.image_encoder()
    return pipe, tm.random_adapter(pipe.unet, "linear", encoder=encoder), ImageEncoder(encoder)


def _generate(pipe, attachment, prompts, encoder, **settings):
    settings = GenerationSettings(**{"prompt": PROMPT, "steps": 3, "seed": 0, **settings})
    encoders = [encoder] * (len(attachment.adapters) if attachment else 0)
    return generate(pipe, attachment, settings, prompts, encoders, output_type="np")


def test_scale_zero_is_bit_identical_to_no_adapter(world):
    pipe, adapter, encoder = world
    plain = _generate(pipe, None, [], encoder)
    with attach(pipe.unet, adapter) as attachment:
        zero = _generate(pipe, attachment, [ImagePrompt(tm.reference_images(1), scale=0.0)], encoder)
        outside = _generate(pipe, attachment, [], encoder)
    assert np.array_equal(plain, zero)
    assert np.array_equal(plain, outside)


def test_detach_restores_the_unet_exactly(world):
    pipe, adapter, _ = world
    before_processors = dict(pipe.unet.attn_processors)
    before_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attachment = attach(pipe.unet, adapter)
    assert any(isinstance(p, DecoupledAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert list(pipe.unet.state_dict()) == list(before_state)  # attaching adds no parameters
    attachment.detach()
    after = pipe.unet.attn_processors
    assert list(after) == list(before_processors)
    assert all(after[k] is before_processors[k] for k in after)
    state = pipe.unet.state_dict()
    assert list(state) == list(before_state)
    assert all(torch.equal(state[k], before_state[k]) for k in state)


def test_same_seed_same_images_and_adapter_changes_them(world):
    pipe, adapter, encoder = world
    prompt = [ImagePrompt(tm.reference_images(1), scale=0.8)]
    with attach(pipe.unet, adapter) as attachment:
        first = _generate(pipe, attachment, prompt, encoder)
        second = _generate(pipe, attachment, prompt, encoder)
    plain = _generate(pipe, None, [], encoder)
    assert np.array_equal(first, second)
    assert np.abs(first - plain).max() > 1e-2


def test_image_keys_and_projection_are_computed_once_per_generation(world):
    pipe, adapter, encoder = world
    calls = {"kv": 0, "proj": 0}
    hooks = [adapter.image_proj.register_forward_hook(lambda *a: calls.__setitem__("proj", calls["proj"] + 1))]
    hooks += [m.register_forward_hook(lambda *a: calls.__setitem__("kv", calls["kv"] + 1)) for m in adapter.ip_adapter.values()]
    try:
        with attach(pipe.unet, adapter) as attachment:
            _generate(pipe, attachment, [ImagePrompt(tm.reference_images(2), scale=0.5)], encoder, steps=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"kv": len(adapter.ip_adapter), "proj": 1}


def test_concatenating_a_duplicate_reference_equals_one_reference(world):
    # One softmax over two identical token sets splits the weights evenly over identical values.
    pipe, adapter, encoder = world
    ref = tm.reference_images(1)
    with attach(pipe.unet, adapter) as attachment:
        single = _generate(pipe, attachment, [ImagePrompt(ref, scale=0.7)], encoder)
        doubled = _generate(pipe, attachment, [ImagePrompt(ref * 2, scale=0.7)], encoder)
        averaged = _generate(pipe, attachment, [ImagePrompt(ref * 2, scale=0.7, combine="average")], encoder)
    assert np.abs(single - doubled).max() < 1e-5
    assert np.abs(single - averaged).max() < 1e-5


def test_weighted_combination_with_one_weight_is_that_image(world):
    pipe, adapter, encoder = world
    refs = tm.reference_images(2)
    with attach(pipe.unet, adapter) as attachment:
        first = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7)], encoder)
        weighted = _generate(pipe, attachment, [ImagePrompt(refs, scale=0.7, combine="weighted", weights=[2, 0])], encoder)
        mixed = _generate(pipe, attachment, [ImagePrompt(refs, scale=0.7, combine="weighted", weights=[1, 1])], encoder)
    assert np.abs(first - weighted).max() < 1e-5
    assert np.abs(first - mixed).max() > 1e-3


def test_region_masks(world):
    pipe, adapter, encoder = world
    ref = tm.reference_images(1)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with attach(pipe.unet, adapter) as attachment:
        whole = _generate(pipe, attachment, [ImagePrompt(ref, scale=0.7)], encoder)
        ones = _generate(pipe, attachment, [ImagePrompt(ref, scale=0.7, masks=[Image.new("L", (size, size), 255)])], encoder)
        zeros = _generate(pipe, attachment, [ImagePrompt(ref, scale=0.7, masks=[np.zeros((size, size))])], encoder)
        half = np.zeros((size, size))
        half[:, : size // 2] = 1
        left = _generate(pipe, attachment, [ImagePrompt(ref, scale=0.7, masks=[half])], encoder)
    plain = _generate(pipe, None, [], encoder)
    assert np.abs(whole - ones).max() < 1e-5
    assert np.abs(zeros - plain).max() < 1e-5
    assert np.abs(left - plain).max() > 1e-3 and np.abs(left - whole).max() > 1e-3


def test_negative_image_replaces_the_unconditional_embedding(world):
    pipe, adapter, encoder = world
    refs = tm.reference_images(2)
    with attach(pipe.unet, adapter) as attachment:
        default = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7)], encoder)
        negative = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7, negative_images=refs[1:])], encoder)
        self_negative = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7, negative_images=refs[:1])], encoder)
    assert np.abs(default - negative).max() > 1e-3
    # Without guidance there is no unconditional branch, so a negative image cannot matter.
    with attach(pipe.unet, adapter) as attachment:
        a = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7)], encoder, guidance=1.0)
        b = _generate(pipe, attachment, [ImagePrompt(refs[:1], scale=0.7, negative_images=refs[1:])], encoder, guidance=1.0)
    assert np.array_equal(a, b)
    assert np.abs(self_negative - negative).max() > 1e-3


def test_step_window_switches_the_adapter_on_and_off(world):
    pipe, adapter, encoder = world
    seen = []
    name, layer = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2"))

    def spy(module, args, kwargs):
        # The image prompts travel with the call: read what this layer receives at each step.
        call = kwargs.get(IMAGE_PROMPTS_KWARG)
        seen.append(call is not None and bool(call.active(name)))

    hook = layer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with attach(pipe.unet, adapter) as attachment:
            _generate(pipe, attachment, [ImagePrompt(tm.reference_images(1), scale=0.7, start=0.25, end=0.75)],
                      encoder, steps=4)
    finally:
        hook.remove()
    assert seen == [False, True, True, False]


def test_layer_presets_select_blocks(world):
    pipe, adapter, encoder = world
    layout = BatchLayout(guidance=True, images_per_prompt=1)
    with attach(pipe.unet, adapter) as attachment:
        everything = prepare_image_prompt(ImagePrompt(tm.reference_images(1)), attachment, encoder, layout, (8, 8))
        style = prepare_image_prompt(ImagePrompt(tm.reference_images(1), layers="style"), attachment, encoder, layout, (8, 8))
        custom = prepare_image_prompt(
            ImagePrompt(tm.reference_images(1), scale=0.5, layers=LayerScales({"mid_block": 0.5}, default=0.0)),
            attachment, encoder, layout, (8, 8))
        with pytest.raises(ValueError, match="down_blocks.2.*not a cross-attention block"):
            prepare_image_prompt(ImagePrompt(tm.reference_images(1), layers="composition"), attachment, encoder, layout, (8, 8))
    assert len(everything[0]) == len(attachment.layers)
    assert set(style[0]) == {b for b in everything[0] if b.startswith("up_blocks.1.")}
    assert [(b, kv.scale) for b, kv in custom[0].items()] == [("mid_block.attentions.0.transformer_blocks.0.attn2", 0.25)]


def test_batch_layout_for_several_images_per_prompt(world):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        prepared = prepare_image_prompt(ImagePrompt(tm.reference_images(1)), attachment, encoder,
                                        BatchLayout(guidance=True, images_per_prompt=3), (8, 8))
        images = _generate(pipe, attachment, [ImagePrompt(tm.reference_images(1))], encoder, num_images=3)
    kv = next(iter(prepared[0].values()))
    assert kv.key.shape[0] == 6
    assert torch.equal(kv.key[0], kv.key[2]) and torch.equal(kv.key[3], kv.key[5])  # [uncond x3, cond x3]
    assert not torch.equal(kv.key[2], kv.key[3])
    assert images.shape[0] == 3 and np.abs(images[0] - images[1]).max() > 1e-3


def test_pad_mode_keeps_the_whole_reference(world):
    _, _, encoder = world
    wide = Image.new("RGB", (96, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 16, 32))  # a blue strip at the far left, cut off by a centre crop
    center = encoder.pixels([wide], "center")[0]
    padded = encoder.pixels([wide], "pad")[0]
    blue_mean = lambda px: px[2].mean().item()  # noqa: E731
    assert blue_mean(padded) > blue_mean(center)
    # Padding uses CLIP's mean colour, which normalises to (almost) zero.
    assert padded[:, 0, :].abs().max() < 0.02


def test_controlnet_never_sees_image_tokens():
    from diffusers import StableDiffusionControlNetPipeline

    base = tm.sd15_pipeline()
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=tm.controlnet(base.unet))
    pipe.set_progress_bar_config(disable=True)
    encoder = tm.image_encoder()
    adapter = tm.random_adapter(pipe.unet, "linear", encoder=encoder)
    outputs = []
    hook = pipe.controlnet.register_forward_hook(lambda m, a, out: outputs.append(out[1].clone()))
    control = tm.reference_images(1, 64)[0].resize((64, 64))
    try:
        settings = GenerationSettings(prompt=PROMPT, steps=2, seed=0)
        generate(pipe, None, settings, control_image=control, output_type="np")
        with attach(pipe.unet, adapter) as attachment:
            generate(pipe, attachment, settings, [ImagePrompt(tm.reference_images(1), scale=1.0)],
                     [ImageEncoder(encoder)], control_image=control, output_type="np")
    finally:
        hook.remove()
    # First step: same latents and text for both runs, so the ControlNet output must be identical.
    assert torch.equal(outputs[0], outputs[2])
    assert all(not isinstance(p, DecoupledAttnProcessor) for p in pipe.controlnet.attn_processors.values())
