"""Two-conditioning guidance (imprompt.generation.image_guidance) on tiny SD1.5 and SDXL models.

What is checked: the three-group UNet returns exactly the [uncond; c] whose pipeline guidance gives
InstructPix2Pix's eq. 3, against three separate UNet calls (with SDXL's pooled text and a masked image
prompt too); an image guidance equal to the guidance changes nothing, bit for bit; a whole generation
with it differs from plain guidance and from the other scale; the batched path gives what single
calls give; settings that cannot combine fail with a message that names the setting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.generation.batched import BatchItem, generate_batch
from imprompt.generation.generate import latent_size
from imprompt.generation.image_guidance import ImageGuidanceUNet, combine
from imprompt.generation.prompts import BatchLayout, prepare_image_prompt

torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def world():
    return tm.adapter_world()


def _settings(**extra) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a red square", "steps": 4, "seed": 7, "guidance": 5.0, **extra})


def _unet_inputs(pipe, rows: int, sdxl: bool):
    generator = torch.Generator().manual_seed(1)
    size = pipe.unet.config.sample_size
    sample = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=generator).repeat(rows, 1, 1, 1)
    states = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if sdxl:
        pooled = pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(rows, 1)}
    return sample, states, kwargs


@pytest.mark.parametrize("sdxl, masked, control", [(False, False, False), (False, True, False), (True, False, False),
                                                   (False, False, True)])
@torch.no_grad()
def test_three_groups_equal_three_separate_calls(sdxl, masked, control):
    pipe = tm.sdxl_pipeline() if sdxl else tm.sd15_pipeline()
    vision = tm.image_encoder()
    adapter = tm.random_adapter(pipe.unet, "linear", seed=3, encoder=vision)
    settings = GenerationSettings(steps=1)
    masks = None
    if masked:  # a regional prompt: its mask is laid out per row of the guidance batch
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        masks = [np.pad(np.ones((size, size // 2)), ((0, 0), (0, size - size // 2)))]
    with attach(pipe.unet, adapter) as attachment:
        prepared = prepare_image_prompt(ImagePrompt(tm.reference_images(1), masks=masks), attachment,
                                        ImageEncoder(vision), BatchLayout(True, 2),
                                        latent_size(pipe, settings, None), vae_scale_factor=pipe.vae_scale_factor)
        call = attachment.prompt_call(prepared)
        extra = call.cross_attention_kwargs()
        sample, states, kwargs = _unet_inputs(pipe, 4, sdxl)
        if control:  # ControlNet residuals come per row too: the uncond rows' residuals saw no text
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            # one control image per image, the same in both halves, as the pipelines lay it out
            cond = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(2)).repeat(2, 1, 1, 1)
            net = tm.controlnet(pipe.unet)

            def residuals(text):
                down, mid = net(sample, 10, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
                return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

            kwargs = residuals(states)
        wrapped = ImageGuidanceUNet(pipe.unet, call, image_guidance=2.0, text_guidance=6.0)
        got = wrapped(sample, 10, states, cross_attention_kwargs=extra, return_dict=False, **kwargs)[0]

        uncond, both = pipe.unet(sample, 10, states, cross_attention_kwargs=extra, **kwargs).sample.chunk(2)
        no_text = torch.cat([states[:2], states[:2]])
        added = {k: torch.cat([v[:2], v[:2]]) for k, v in kwargs.get("added_cond_kwargs", {}).items()}
        text_free = {"added_cond_kwargs": added} if sdxl else residuals(no_text) if control else {}
        uncond2, image = pipe.unet(sample, 10, no_text, cross_attention_kwargs=extra, **text_free).sample.chunk(2)
    torch.testing.assert_close(got[:2], uncond, rtol=0, atol=2e-5)
    torch.testing.assert_close(uncond2, uncond, rtol=0, atol=1e-6)
    # What the pipeline then computes is InstructPix2Pix's eq. 3 with s_I = 2, s_T = 6.
    guided = got[:2] + 6.0 * (got[2:] - got[:2])
    expected = uncond + 2.0 * (image - uncond) + 6.0 * (both - image)
    torch.testing.assert_close(guided, expected, rtol=0, atol=2e-4)
    assert (image - both).abs().max() > 1e-3  # the text moves the prediction, so the check above has teeth


def test_combine_is_plain_guidance_at_equal_scales():
    u, i, b = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(3))
    torch.testing.assert_close(combine(u, i, b, 4.0, 4.0), b, rtol=0, atol=1e-6)
    torch.testing.assert_close(u + 5.0 * (combine(u, i, b, 0.0, 5.0) - u), u + 5.0 * (b - i), rtol=0, atol=1e-5)


def test_equal_scales_change_nothing(world):
    pipe, adapter, encoder = world
    prompt = ImagePrompt(tm.reference_images(1))
    with attach(pipe.unet, adapter) as attachment:
        plain = generate(pipe, attachment, _settings(), [prompt], [encoder], output_type="np")
        same = generate(pipe, attachment, _settings(image_guidance=5.0), [prompt], [encoder], output_type="np")
        split = generate(pipe, attachment, _settings(image_guidance=1.5), [prompt], [encoder], output_type="np")
        other = generate(pipe, attachment, _settings(image_guidance=9.0), [prompt], [encoder], output_type="np")
    assert np.array_equal(plain, same)
    assert np.abs(split - plain).max() > 1e-3 and np.abs(other - split).max() > 1e-3


def test_batched_equals_single_calls(world):
    pipe, adapter, encoder = world
    references = tm.reference_images(2)
    settings = GenerationSettings(steps=3, guidance=5.0, image_guidance=2.0)
    items = [BatchItem(seeds=[11 + i], prompt=f"a shape {i}", image_prompts=[ImagePrompt([r])])
             for i, r in enumerate(references)]
    with attach(pipe.unet, adapter) as attachment:
        batched = generate_batch(pipe, attachment, settings, items, [encoder], output_type="np")
        singles = [generate(pipe, attachment, GenerationSettings(prompt=f"a shape {i}", steps=3, guidance=5.0,
                                                                 image_guidance=2.0, seed=11 + i),
                            [ImagePrompt([r])], [encoder], output_type="np")
                   for i, r in enumerate(references)]
    for got, single in zip(batched, singles):
        np.testing.assert_allclose(np.asarray(got[0]), single[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("extra, with_prompt, message", [
    ({"image_guidance": 2.0}, False, "has none"),
    ({"image_guidance": 2.0, "guidance": 1.0}, True, "guidance above 1"),
    ({"image_guidance": float("nan")}, True, "finite"),
])
def test_settings_that_cannot_combine(world, extra, with_prompt, message):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        with pytest.raises(ValueError, match=message):
            generate(pipe, attachment, _settings(**extra), [ImagePrompt(tm.reference_images(1))] if with_prompt else [],
                     [encoder], output_type="np")


def test_not_with_step_skipping(world):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        with pytest.raises(ValueError, match="--accelerate"):
            generate(pipe, attachment, _settings(image_guidance=2.0), [ImagePrompt(tm.reference_images(1))], [encoder],
                     output_type="np", acceleration="deepcache:2")


# ------------------------------------------------------------- command line, PNG info, the two APIs

def test_the_command_line_takes_image_guidance_and_records_it(tmp_path):
    from imprompt.cli import main
    from imprompt.generation.pnginfo import parse_parameters, read_parameters

    tm.official_tree(tmp_path)
    args = ["generate", "--model", str(tmp_path / "sd"), "--adapter", str(tmp_path / "models" / "ip-base.safetensors"),
            "--image", str(tmp_path / "ref0.png"), "--prompt", "a red star", "--steps", "3", "--seed", "7",
            "--guidance", "6"]
    assert main([*args, "--output", str(tmp_path / "split"), "--image-guidance", "2"]) == 0
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    split, plain = (next((tmp_path / name).glob("*.png")) for name in ("split", "plain"))
    assert parse_parameters(read_parameters(split))["Image CFG scale"] == "2"
    assert "Image CFG scale" not in parse_parameters(read_parameters(plain))
    assert np.abs(np.asarray(Image.open(split), dtype=int) - np.asarray(Image.open(plain), dtype=int)).max() > 0


def test_both_apis_pass_image_guidance_on():
    from imprompt.server.a1111 import Txt2ImgPayload, to_request
    from imprompt.server.native import NativeRequest, native_to_request

    native = native_to_request(NativeRequest(prompt="x", image_guidance=2.5), "m", lambda n, k: n, lambda r, w, m: r)
    assert native.settings().image_guidance == 2.5
    assert native_to_request(NativeRequest(), "m", lambda n, k: n, lambda r, w, m: r).image_guidance is None
    a1111 = to_request(Txt2ImgPayload(prompt="x", cfg_scale=6, image_cfg_scale=1.5), "m", lambda n, k: n,
                       lambda b, f, m: b, lambda path: None)
    assert (a1111.guidance, a1111.image_guidance) == (6, 1.5)
    plain = to_request(Txt2ImgPayload(prompt="x"), "m", lambda n, k: n, lambda b, f, m: b, lambda p: None)
    assert plain.image_guidance is None
