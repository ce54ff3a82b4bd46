"""Reference-only (imprompt.generation.reference): the extension's semantics, checked on tiny models.

The invariant that holds is *not* "style fidelity 0 equals no reference": in sd-webui-controlnet, style
fidelity only decides what the unconditional half of the guidance batch sees (0: the reference, like
the conditional half; 1: the plain model). What equals no reference bit for bit is weight 0, a step
outside start/end, or no reference; and without guidance the style fidelity does nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.attention import ImagePromptCall
from imprompt.generation.reference import (ReferenceOptions, adain, adain_points, attention_layer_order,
                                           blend_unconditional, noised_reference, prepare_reference,
                                           reference_applied, selected_attention_layers)

PROMPT = "a green circle"


@pytest.fixture(scope="module")
def pipe():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_image():
    return tm.reference_images(1, 64)[0]


def _run(pipe, reference=None, attachment=None, prompts=(), encoders=(), **settings):
    # 32 px (a 4x4 latent) keeps the tiny pipelines fast.
    settings = GenerationSettings(**{"prompt": PROMPT, "steps": 2, "seed": 0, "width": 32, "height": 32, **settings})
    return generate(pipe, attachment, settings, list(prompts), list(encoders), output_type="np",
                    reference=reference, control_image=settings.extra.pop("control", None))


def _unet_inputs(pipe, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(500), text


def test_weight_zero_and_outside_the_window_equal_no_reference_bit_for_bit(pipe, ref_image):
    unet = pipe.unet
    before = dict(unet.attn_processors)
    plain = _run(pipe)
    assert np.array_equal(plain, _run(pipe, ReferenceOptions(ref_image, mode="reference_adain+attn", weight=0)))
    # 2 steps: step i acts when start <= i/2 < end; start 0.9 leaves both out.
    assert np.array_equal(plain, _run(pipe, ReferenceOptions(ref_image, start=0.9, end=1.0)))
    # Style fidelity 0 is not "off": both guidance halves see the reference.
    assert not np.array_equal(plain, _run(pipe, ReferenceOptions(ref_image, mode="reference_adain+attn",
                                                                  weight=2.0, style_fidelity=0.0)))
    # Every processor object is back and no hook is left on the UNet or its blocks.
    after = unet.attn_processors
    assert list(after) == list(before) and all(after[k] is before[k] for k in after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_without_guidance_style_fidelity_changes_nothing(pipe, ref_image):
    def run(fidelity):
        return _run(pipe, ReferenceOptions(ref_image, mode="reference_adain+attn", style_fidelity=fidelity,
                                           weight=2.0), guidance=1.0)
    # No unconditional half, so nothing for style fidelity to act on: bit for bit.
    assert np.array_equal(run(0.0), run(1.0))


def test_style_fidelity_one_leaves_the_unconditional_rows_plain(pipe, ref_image):
    unet = pipe.unet
    sample, t, text = _unet_inputs(pipe)
    with torch.no_grad():
        plain = unet(sample, t, text).sample
    for fidelity, uncond_plain in ((1.0, True), (0.0, False)):
        ref = prepare_reference(pipe, ReferenceOptions(ref_image, mode="reference_adain+attn", weight=2.0,
                                                       style_fidelity=fidelity), True, (8, 8))
        call = ImagePromptCall({}, num_steps=1, reference=ref)
        with reference_applied(unet, ref), torch.no_grad():
            out = unet(sample, t, text, cross_attention_kwargs=call.cross_attention_kwargs()).sample
        # Row 0 is the unconditional half, row 1 the conditional one.
        assert torch.allclose(out[0], plain[0], atol=1e-5) is uncond_plain
        assert not torch.allclose(out[1], plain[1], atol=1e-3)


def test_write_pass_records_one_bank_per_attn1_layer(pipe, ref_image):
    unet = pipe.unet
    sample, t, text = _unet_inputs(pipe)
    order = attention_layer_order(unet)
    widths = {n: dict(unet.named_modules())[n].to_q.in_features for n in order}
    # Widest first, then down / mid / up: the mid block (32 wide) leads the 16-wide layers.
    assert order == ["mid_block.attentions.0.transformer_blocks.0.attn1",
                     "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert selected_attention_layers(order, 0.5) == order[:2]  # i/4 < 0.5 for i = 0, 1
    assert selected_attention_layers(order, 0.51) == order[:3]
    assert selected_attention_layers(order, 0.0) == []
    ref = prepare_reference(pipe, ReferenceOptions(ref_image), True, (8, 8))
    call = ImagePromptCall({}, num_steps=1, reference=ref)
    kwargs = {"encoder_hidden_states": text, "cross_attention_kwargs": call.cross_attention_kwargs()}
    with reference_applied(unet, ref):
        ref.before_unet(unet, (sample, t), kwargs)  # the write pass alone
        assert ref.mode == "read"
        assert sorted(ref.banks) == sorted(order)
        for name, bank in ref.banks.items():
            assert bank.shape == (2, 64 if name.startswith(("down", "up")) else 16, widths[name])
        assert not ref.stats  # reference_only records no AdaIN statistics


def test_attention_over_a_doubled_context_equals_plain_attention(pipe):
    # Hand check of the concatenation: every key twice halves each softmax weight and counts each
    # value twice, so softmax(q [k;k]^T) [v;v] = softmax(q k^T) v.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g) for _ in range(3))
    doubled = F.scaled_dot_product_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2))
    assert torch.allclose(doubled, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    # The same through a UNet attn1 layer: a bank equal to the layer's own input changes nothing.
    name = attention_layer_order(pipe.unet)[0]
    attn = dict(pipe.unet.named_modules())[name]
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ref = prepare_reference(pipe, ReferenceOptions(tm.reference_images(1)[0], style_fidelity=0.0), True, (8, 8))
    ref.mode, ref.banks = "read", {name: hidden}
    with torch.no_grad():
        out = ref.self_attention(name, attn.processor, attn, hidden)
        assert torch.allclose(out, attn.processor(attn, hidden), atol=1e-5)


def test_adain_gives_the_reference_statistics_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g) * 3 + 1
    ref = torch.randn(2, 3, 6, 6, generator=g) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1) - 2
    var, mean = torch.var_mean(ref, dim=(2, 3), keepdim=True, correction=0)
    y = adain(x, mean, var)
    y_var, y_mean = torch.var_mean(y, dim=(2, 3), keepdim=True, correction=0)
    assert torch.allclose(y_mean, mean, atol=1e-5) and torch.allclose(y_var, var, atol=1e-4)
    # Only the statistics move: the normalised pattern is x's.
    x_var, x_mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    assert torch.allclose((y - mean) / var.sqrt(), (x - x_mean) / x_var.sqrt(), atol=1e-4)


def test_blend_and_noise_formulas():
    ref, plain = torch.full((4, 2), 2.0), torch.zeros(2, 2)
    out = blend_unconditional(ref, plain, 0.25)  # rows 0-1: 0.25 * 0 + 0.75 * 2; rows 2-3: reference
    assert torch.equal(out, torch.tensor([[1.5, 1.5], [1.5, 1.5], [2.0, 2.0], [2.0, 2.0]]))
    alphas = torch.tensor([0.9, 0.64, 0.36])
    x = noised_reference(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), alphas, torch.tensor(1.4))
    assert torch.allclose(x, torch.tensor(0.8 * 1 + 0.6 * 2).view(1, 1, 1, 1))  # t rounds to 1


def test_adain_table_matches_the_extension_on_the_sd15_layout():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(4, 4, 4, 4), layers_per_block=2, norm_num_groups=2,
                                cross_attention_dim=4, attention_head_dim=2, sample_size=8)
    points = [(name, round(w, 4)) for name, _, w in adain_points(unet)]
    # hook.py: middle 0; input blocks 4, 5, 7, 8, 10, 11 -> 2 (1 - w/6); output blocks 0..7 -> 2 w/8.
    down = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.1", "down_blocks.3.resnets.0", "down_blocks.3.resnets.1"]
    up = ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0", "up_blocks.1.attentions.0",
          "up_blocks.1.attentions.1", "up_blocks.1.upsamplers.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    assert points == ([("mid_block", 0.0)] + [(n, round(2 * (1 - w / 6), 4)) for w, n in enumerate(down)]
                      + [(n, round(2 * w / 8, 4)) for w, n in enumerate(up)])


def test_combines_with_ip_adapter_and_controlnet():
    from diffusers import StableDiffusionControlNetPipeline

    base = tm.sd15_pipeline()
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=tm.controlnet(base.unet))
    pipe.set_progress_bar_config(disable=True)
    encoder = tm.image_encoder()
    adapter = tm.random_adapter(pipe.unet, "linear", encoder=encoder)
    control = tm.reference_images(1, 64)[0].resize((32, 32))
    reference = ReferenceOptions(tm.reference_images(2, 64)[1], mode="reference_adain+attn", weight=2.0)
    prompts = [ImagePrompt(tm.reference_images(1), scale=1.0)]

    def run(ip: bool, ref: bool):
        settings = GenerationSettings(prompt=PROMPT, steps=1, seed=0, width=32, height=32)
        if not ip:
            return generate(pipe, None, settings, control_image=control, output_type="np",
                            reference=reference if ref else None)
        with attach(pipe.unet, adapter) as attachment:
            return generate(pipe, attachment, settings, prompts, [ImageEncoder(encoder)], control_image=control,
                            output_type="np", reference=reference if ref else None)

    both, ip_only, ref_only, neither = run(True, True), run(True, False), run(False, True), run(False, False)
    for other in (ip_only, ref_only, neither):
        assert np.isfinite(both).all() and not np.allclose(both, other, atol=1e-4)
    assert not np.allclose(ref_only, neither, atol=1e-4)


def test_sdxl_runs_and_differs(ref_image):
    pipe = tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    names = [name for name, _, _ in adain_points(pipe.unet)]
    # Two resolution levels: the second down block, and the first up block (its last layer is the upsampler).
    assert names == ["mid_block", "down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.upsamplers.0"]
    plain = _run(pipe)
    out = _run(pipe, ReferenceOptions(ref_image, mode="reference_adain+attn", weight=2.0))
    assert np.isfinite(out).all() and not np.allclose(plain, out, atol=1e-4)


def test_bad_options_are_refused(pipe, ref_image):
    for bad, words in ((dict(mode="reference"), "reference mode"), (dict(style_fidelity=1.5), "style fidelity"),
                       (dict(weight=-1), "weight"), (dict(start=0.5, end=0.5), "start/end")):
        with pytest.raises(ValueError, match=words):
            _run(pipe, ReferenceOptions(ref_image, **bad))


def test_request_checks_the_reference_fields(tmp_path):
    from imprompt.generation.request import GenerateRequest

    GenerateRequest(reference_image="r.png", style_fidelity=1.0, output=str(tmp_path)).check()
    with pytest.raises(ValueError, match="reference mode"):
        GenerateRequest(reference_image="r.png", reference_mode="reference", output=str(tmp_path)).check()


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from imprompt.server.app import create_app
    from imprompt.server.config import ServerConfig

    app = create_app(ServerConfig(ui=False))
    with TestClient(app) as client:
        yield client
    app.state.engine.close()


def test_a1111_reference_unit_becomes_the_request_fields():
    from imprompt.server.a1111 import Txt2ImgPayload, to_request

    unit = {"module": "reference_adain", "model": "None", "weight": 0.8, "image": "IMG", "threshold_a": 0.3,
            "guidance_start": 0.1, "guidance_end": 0.75}
    payload = Txt2ImgPayload(prompt="x", alwayson_scripts={"controlnet": {"args": [unit]}})
    request = to_request(payload, "model", lambda name, kind: name, lambda data, where, mode: f"file-{data}",
                         lambda adapter: None)
    assert (request.reference_image, request.reference_mode, request.reference_weight, request.style_fidelity,
            request.reference_start, request.reference_end) == ("file-IMG", "reference_adain", 0.8, 0.3, 0.1, 0.75)
    assert request.controlnet == [] and not request.adapter
    with pytest.raises(ValueError, match="one reference unit"):
        to_request(Txt2ImgPayload(alwayson_scripts={"controlnet": {"args": [unit, unit]}}), "model",
                   lambda name, kind: name, lambda data, where, mode: data, lambda adapter: None)


@pytest.mark.slow
def test_a1111_reference_unit_and_native_api_match_the_cli(client, tmp_path):
    import base64
    import io

    from PIL import Image

    from imprompt import toy
    from imprompt.cli import main

    ref = sorted(toy.toy_paths()["references"].glob("*.png"))[0]
    data = base64.b64encode(ref.read_bytes()).decode()
    unit = {"enabled": True, "module": "reference_adain+attn", "model": "None", "weight": 1.0, "image": data,
            "threshold_a": 0.3, "guidance_end": 0.75}
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "cfg_scale": 7,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    a1111 = client.post("/sdapi/v1/txt2img", json=body)
    assert a1111.status_code == 200, a1111.text
    assert "Style Fidelity: 0.3" in json_info(a1111)["infotexts"][0]
    native = client.post("/v1/generate", json={
        "prompt": "a red circle", "steps": 4, "seed": 3, "guidance": 7,
        "reference": {"image": data, "mode": "reference_adain+attn", "style_fidelity": 0.3, "end": 0.75}})
    assert native.status_code == 200, native.text
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--seed", "3", "--guidance", "7",
                 "--reference-image", str(ref), "--reference-mode", "reference_adain+attn", "--style-fidelity", "0.3",
                 "--reference-end", "0.75", "--output", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")

    def pixels(b64png):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"))

    cli = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(pixels(a1111.json()["images"][0]), cli)
    np.testing.assert_array_equal(pixels(native.json()["images"][0]["png"]), cli)
    # "ControlNet is more important" is style fidelity 1, as the extension reads it.
    from imprompt.server.a1111 import ControlNetUnit, reference_fidelity

    assert reference_fidelity(ControlNetUnit(module="reference_only", control_mode=2, threshold_a=0.3)) == 1.0
    assert reference_fidelity(ControlNetUnit(module="reference_only")) == 0.5


def json_info(response):
    import json

    return json.loads(response.json()["info"])


def test_evaluation_method_reference_only(pipe, ref_image):
    from imprompt.evaluation.config import parse_method
    from imprompt.evaluation.methods import MethodModels, Sampling, open_method

    spec = parse_method("ref:reference_only:reference_mode=reference_adain+attn,style_fidelity=0.2")
    spec.check()
    assert spec.reference == ("reference_adain+attn", 0.2)
    assert "style fidelity 0.2" in spec.describe()
    for bad, words in (("x:img2img:style_fidelity=0.2", "reference_only and ip_adapter"),
                       ("x:reference_only:reference_mode=adain", "reference mode")):
        with pytest.raises(ValueError, match=words):
            parse_method(bad).check()
    with open_method(MethodModels(spec), pipe, None, Sampling(steps=2, guidance=7.5, size=32)) as sampler:
        images = sampler(ref_image, "", [0, 1], None)
    assert len(images) == 2 and images[0].size == (16, 16)  # the tiny model's own size
