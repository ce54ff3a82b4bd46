"""Image-prompt controls of ComfyUI_IPAdapter_plus: weight types, embeds combination and scaling, noise
negatives. Expected values are worked out by hand from the definitions cited in each module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, LayerScales, attach, generate
from imprompt.adapter.embeds_scaling import scale_image_kv
from imprompt.adapter.weight_types import WEIGHT_TYPES, LayerWeight, layer_weights
from imprompt.generation.adapter_options import adapter_options
from imprompt.generation.negative_noise import NegativeNoise, noise_image
from imprompt.generation.prompts import BatchLayout, combine_features, prepare_image_prompt
from imprompt.generation.request import GenerateRequest
from imprompt.server.native import ImagePromptSpec, NativeRequest, native_to_request

torch.set_flush_denormal(True)

# The real UNets' attn2 layers, in diffusers' registration order (down, up, mid).
SD15 = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)] + [
    f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)] + [
    "mid_block.attentions.0.transformer_blocks.0.attn2"]


def _sdxl_block(block: str, depth: int) -> list[str]:
    return [f"{block}.transformer_blocks.{i}.attn2" for i in range(depth)]


SDXL = (_sdxl_block("down_blocks.1.attentions.0", 2) + _sdxl_block("down_blocks.1.attentions.1", 2)
        + _sdxl_block("down_blocks.2.attentions.0", 10) + _sdxl_block("down_blocks.2.attentions.1", 10)
        + [x for a in range(3) for x in _sdxl_block(f"up_blocks.0.attentions.{a}", 10)]
        + [x for a in range(3) for x in _sdxl_block(f"up_blocks.1.attentions.{a}", 2)]
        + _sdxl_block("mid_block.attentions.0", 10))


def _by_block(weights: dict[str, LayerWeight]) -> dict[str, tuple[float, bool]]:
    """One entry per attention block (all its transformer layers must agree)."""
    out: dict[str, tuple[float, bool]] = {}
    for name, w in weights.items():
        block = name.split(".transformer_blocks")[0]
        assert out.setdefault(block, (w.weight, w.swap)) == (w.weight, w.swap), name
    return out


def _at(weights, block):
    return _by_block(weights)[block]


def test_layer_lists_are_the_real_ones():
    assert len(SD15) == 16 and len(SDXL) == 70


def test_ease_curves_by_hand():
    ease_in = layer_weights("ease in", SD15, "SD1.5", 1.0)
    assert _at(ease_in, "down_blocks.0.attentions.0")[0] == pytest.approx(1.0)
    assert _at(ease_in, "down_blocks.2.attentions.1")[0] == pytest.approx(0.703125)  # t=5: .05+.95*(11/16)
    assert _at(ease_in, "up_blocks.3.attentions.2")[0] == pytest.approx(0.109375)  # t=15
    ease_out = layer_weights("ease out", SD15, "SD1.5", 2.0)
    assert _at(ease_out, "down_blocks.0.attentions.0")[0] == pytest.approx(0.1)
    assert _at(ease_out, "up_blocks.3.attentions.2")[0] == pytest.approx(2 * 0.940625)
    in_out = layer_weights("ease in-out", SDXL, "SDXL", 1.0)  # n=11, n/2=5.5
    assert _at(in_out, "mid_block.attentions.0")[0] == pytest.approx(0.05 + 0.95 * (1 - 1.5 / 5.5))  # t=4
    assert _at(in_out, "up_blocks.0.attentions.1")[0] == pytest.approx(0.05 + 0.95 * (1 - 0.5 / 5.5))  # t=6
    reverse = layer_weights("reverse in-out", SDXL, "SDXL", 1.0)
    assert _at(reverse, "down_blocks.1.attentions.0")[0] == pytest.approx(1.0)
    assert _at(reverse, "up_blocks.0.attentions.1")[0] == pytest.approx(0.05 + 0.95 / 11)


@pytest.mark.parametrize("kind, down, mid, up", [
    ("weak input", 0.1, 0.5, 0.5), ("weak middle", 0.5, 0.1, 0.5), ("weak output", 0.5, 0.5, 0.1),
    ("strong middle", 0.1, 0.5, 0.1), ("linear", 0.5, 0.5, 0.5),
])
def test_block_group_types(kind, down, mid, up):
    for layers, layout in ((SD15, "SD1.5"), (SDXL, "SDXL")):
        for name, w in layer_weights(kind, layers, layout, 0.5).items():
            want = down if name.startswith("down") else mid if name.startswith("mid") else up
            assert w.weight == pytest.approx(want) and not w.swap, name


def test_style_and_composition_tables_sdxl():
    style = _by_block(layer_weights("style transfer", SDXL, "SDXL", 0.8))
    assert {b: w for b, (w, _) in style.items() if w} == {"up_blocks.0.attentions.1": 0.8}
    comp = _by_block(layer_weights("composition", SDXL, "SDXL", 0.8))
    assert {b: w for b, (w, _) in comp.items() if w} == {"down_blocks.2.attentions.1": 0.8}
    strong = _by_block(layer_weights("strong style transfer", SDXL, "SDXL", 1.0))
    assert {b for b, (w, _) in strong.items() if not w} == {"down_blocks.2.attentions.1"}
    both = _by_block(layer_weights("style and composition", SDXL, "SDXL", 0.8, composition_weight=0.3))
    assert {b: w for b, (w, _) in both.items() if w} == {"down_blocks.2.attentions.1": 0.3, "up_blocks.0.attentions.1": 0.8}


def test_style_and_composition_tables_sd15():
    style = _by_block(layer_weights("style transfer", SD15, "SD1.5", 1.0))
    assert {b for b, (w, _) in style.items() if not w} == {
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    comp = _by_block(layer_weights("composition", SD15, "SD1.5", 0.8))
    assert {b: w for b, (w, _) in comp.items() if w} == {"down_blocks.2.attentions.0": pytest.approx(0.2),
                                                        "down_blocks.2.attentions.1": 0.8}
    strong = _by_block(layer_weights("strong style transfer", SD15, "SD1.5", 1.0))
    assert {b for b, (w, _) in strong.items() if not w} == {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1"}
    both = _by_block(layer_weights("style and composition", SD15, "SD1.5", 1.0, composition_weight=0.4))
    assert both["down_blocks.2.attentions.0"][0] == pytest.approx(0.1) and both["down_blocks.2.attentions.1"][0] == 0.4
    assert both["up_blocks.3.attentions.0"][0] == 1.0 and both["mid_block.attentions.0"][0] == 0.0


def test_precise_types_swap_the_right_blocks():
    style = _by_block(layer_weights("style transfer precise", SDXL, "SDXL", 1.0, composition_weight=0.5))
    assert {b: v for b, v in style.items() if v[0]} == {"down_blocks.2.attentions.1": (0.5, True),
                                                        "up_blocks.0.attentions.1": (1.0, False)}
    comp = _by_block(layer_weights("composition precise", SDXL, "SDXL", 1.0, composition_weight=0.5))
    assert comp["down_blocks.2.attentions.1"] == (0.5, False)
    assert comp["up_blocks.0.attentions.1"] == (1.0, True)
    assert comp["mid_block.attentions.0"] == (pytest.approx(0.1), True)
    sd = _by_block(layer_weights("composition precise", SD15, "SD1.5", 1.0, composition_weight=0.5))
    assert sd["down_blocks.2.attentions.0"] == (0.125, False) and sd["down_blocks.2.attentions.1"] == (0.5, False)
    assert sd["mid_block.attentions.0"] == (pytest.approx(0.1), True) and sd["up_blocks.2.attentions.0"] == (1.0, True)
    sd_style = _by_block(layer_weights("style transfer precise", SD15, "SD1.5", 1.0))
    assert {b for b, (w, s) in sd_style.items() if s} == {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1"}


def test_every_weight_type_is_defined_for_both_layouts():
    for kind in WEIGHT_TYPES:
        for layers, layout in ((SD15, "SD1.5"), (SDXL, "SDXL")):
            assert set(layer_weights(kind, layers, layout, 1.0)) == set(layers)
    assert layer_weights("style_transfer", SDXL, "SDXL", 1.0) == layer_weights("style transfer", SDXL, "SDXL", 1.0)
    with pytest.raises(ValueError, match="unknown weight type 'stile'.*style transfer"):
        layer_weights("stile", SD15, "SD1.5", 1.0)
    with pytest.raises(ValueError, match="not in the SD1.5 block layout.*linear"):
        layer_weights("ease in", ["down_blocks.7.attentions.0.transformer_blocks.0.attn2"], "SD1.5", 1.0)


def test_combine_modes_by_hand():
    x = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, -1.0], [0.0, 2.0, 2.0]])
    assert torch.equal(combine_features(x, "add", None), torch.tensor([[7.0, 4.0, 2.0]]))
    assert torch.equal(combine_features(x, "subtract", None), torch.tensor([[1.0, -2.0, 0.5]]))
    # norm across the images, element by element: column norms 5, sqrt(8), sqrt(6)
    want = torch.tensor([[(3 / 5 + 4 / 5 + 0) / 3, (0 + 2 / 8 ** .5 + 2 / 8 ** .5) / 3, (1 - 1 + 2) / 6 ** .5 / 3]])
    assert torch.allclose(combine_features(x, "norm average", None), want)


def test_embeds_scaling_by_hand():
    key = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (rows, tokens, channels): C = 2
    value = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    k, v, s = scale_image_kv(key, value, 0.5, "V only")
    assert k is key and v is value and s == 0.5
    k, v, s = scale_image_kv(key, value, 0.5, "K+V")
    assert torch.equal(k, key * 0.5) and torch.equal(v, value * 0.5) and s == 1.0
    w = 0.5 * 2 / 1280
    k, v, s = scale_image_kv(key, value, 0.5, "K+V w/ C penalty")
    assert torch.allclose(k, key * w) and torch.allclose(v, value * w) and s == 1.0
    k, v, s = scale_image_kv(key, value, 0.5, "k+mean(v) w/ c penalty")  # names are case-insensitive
    mean = torch.tensor([[[2.0, 1.0]]])
    assert torch.allclose(k, key * w) and torch.allclose(v, value - mean + mean * w) and s == 1.0
    with pytest.raises(ValueError, match="unknown embeds scaling 'Q only'.*K\\+V"):
        scale_image_kv(key, value, 0.5, "Q only")


def test_noise_negatives_are_reproducible_by_seed():
    for kind in ("fade", "dissolve", "gaussian", "shuffle"):
        a = np.asarray(noise_image(kind, 0.7, 3, seed=1))
        assert a.shape == (224, 224, 3)
        assert np.array_equal(a, np.asarray(noise_image(kind, 0.7, 3, seed=1))), kind
        assert not np.array_equal(a, np.asarray(noise_image(kind, 0.7, 3, seed=2))), kind
    # fade over black at strength s: uniform noise times s, so nothing above 255 * s (+ rounding)
    assert np.asarray(noise_image("fade", 0.25)).max() <= 64
    assert np.asarray(noise_image("dissolve", 0.0)).max() == 0  # nothing dissolved: still black
    base = tm.reference_images(1, size=224)[0]
    assert not np.array_equal(np.asarray(noise_image("fade", 0.5, base=base)), np.asarray(noise_image("fade", 0.5)))
    assert NegativeNoise.parse("gaussian:0.3:5:9") == NegativeNoise("gaussian", 0.3, 5, 9)
    for bad, message in (("sparkle", "unknown noise type"), ("fade:2", "strength must be 0 to 1"),
                         ("fade:0.5:x", "TYPE\\[:STRENGTH"), ("fade:0.5:40", "blur")):
        with pytest.raises(ValueError, match=message):
            NegativeNoise.parse(bad)


def _request(**extra):
    return GenerateRequest(model="m", adapter=["a.safetensors"], image=["r0.png", "r1.png"], **extra)


def test_cli_flags_parse_into_options():
    (o,) = adapter_options(_request(weight_type=["style_and_composition"], composition_scale=["0.3"],
                                    embeds_scaling=["K+V w/ C penalty"], negative_noise=["dissolve:0.5:3"],
                                    combine=["norm_average"]))
    assert (o.weight_type, o.composition_scale, o.embeds_scaling, o.combine) == (
        "style and composition", 0.3, "K+V w/ C penalty", "norm average")
    assert o.negative_noise == NegativeNoise("dissolve", 0.5, 3, 0)
    info = o.describe()
    for part in ("Weight type: style and composition", "Composition weight: 0.3", "Embeds scaling: K+V w/ C penalty",
                 "Negative noise: dissolve:0.5:3:0", "Combine: norm average"):
        assert part in info
    (plain,) = adapter_options(_request())
    assert "Weight type" not in plain.describe() and "Embeds scaling" not in plain.describe()


@pytest.mark.parametrize("field, value, message", [
    ("weight_type", "0=heavy", "--weight-type '0=heavy': unknown weight type 'heavy'; choose one of: linear"),
    ("embeds_scaling", "K only", "--embeds-scaling 'K only': unknown embeds scaling"),
    ("negative_noise", "fade:1.5", "--negative-noise 'fade:1.5': noise strength must be 0 to 1"),
    ("composition_scale", "lots", "--composition-scale 'lots': expected a number"),
    ("weight_type", "3=linear", "names adapter 3, but 1 adapter"),
])
def test_cli_flags_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError) as err:
        adapter_options(_request(**{field: [value]}))
    assert message in str(err.value)


def test_subtract_needs_two_images():
    with pytest.raises(ValueError, match="subtract.*at least two"):
        adapter_options(GenerateRequest(model="m", adapter=["a"], image=["r0.png"], combine=["subtract"]))


def test_native_api_carries_the_controls():
    body = NativeRequest(image_prompts=[ImagePromptSpec(
        adapter="ip", images=["x"], weight_type="composition precise", composition_scale=0.25,
        embeds_scaling="K+V", negative_noise="shuffle:0.6")])
    request = native_to_request(body, "m", lambda name, kind: name, lambda ref, where, mode: ref)
    (o,) = adapter_options(request)
    assert (o.weight_type, o.composition_scale, o.embeds_scaling) == ("composition precise", 0.25, "K+V")
    assert o.negative_noise == NegativeNoise("shuffle", 0.6)


# --- through the tiny pipeline -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoder = tm.image_encoder()
    return pipe, tm.random_adapter(pipe.unet, "linear", encoder=encoder), ImageEncoder(encoder)


def _generate(pipe, attachment, prompts, encoder):
    settings = GenerationSettings(prompt="a green circle", steps=2, seed=0)
    return generate(pipe, attachment, settings, prompts, [encoder], output_type="np")


def test_v_only_linear_is_bit_identical_to_the_plain_path(world):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        tokens = torch.randn(2, 4, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
        before = attachment.layer_kv(0, tokens, scale=0.7, layer_scales=LayerScales())
        linear = layer_weights("linear", [layer.block for layer in attachment.layers], attachment.layout, 0.7)
        after = attachment.layer_kv(0, tokens, scale=99.0, layer_scales=LayerScales(), weights=linear,
                                    embeds_scaling="V only")
        for layer in attachment.layers:
            k, v = adapter.layer(layer.index)(tokens)
            heads = layer.attn.heads
            k = k.view(2, -1, heads, k.shape[-1] // heads).transpose(1, 2)
            assert torch.equal(before[layer.block].key, k)
            assert torch.equal(after[layer.block].key, before[layer.block].key)
            assert torch.equal(after[layer.block].value, before[layer.block].value)
            assert after[layer.block].scale == before[layer.block].scale == 0.7


def test_precise_layers_use_the_reference_as_unconditional(world):
    pipe, adapter, encoder = world
    layout = BatchLayout(guidance=True, images_per_prompt=1)
    ref = tm.reference_images(1)
    with attach(pipe.unet, adapter) as attachment:
        plain = prepare_image_prompt(ImagePrompt(ref, scale=1.0), attachment, encoder, layout, (8, 8))[0]
        precise = prepare_image_prompt(ImagePrompt(ref, scale=1.0, weight_type="composition precise"),
                                       attachment, encoder, layout, (8, 8))[0]
    # The tiny SD1.5 UNet has no down_blocks.2, so every layer is outside the composition blocks: all swap.
    assert set(precise) == set(plain)
    for block, kv in precise.items():
        uncond, cond = kv.key.chunk(2)
        assert torch.equal(uncond, plain[block].key.chunk(2)[1]), block  # the reference's keys as uncond
        assert not cond.any() and not kv.value.chunk(2)[1].any(), block  # zero tokens -> zero K and V
    mid = next(b for b in precise if b.startswith("mid_block"))
    assert precise[mid].scale == pytest.approx(0.1)


@pytest.fixture(scope="module")
def default_output(world):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        return _generate(pipe, attachment, [ImagePrompt(tm.reference_images(2), scale=0.8)], encoder)


def test_linear_v_only_generates_what_the_default_does(world, default_output):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        out = _generate(pipe, attachment, [ImagePrompt(tm.reference_images(2), scale=0.8, weight_type="linear",
                                                       embeds_scaling="V only")], encoder)
    assert np.array_equal(out, default_output)


@pytest.mark.parametrize("change", [
    dict(weight_type="ease in"), dict(weight_type="style transfer precise"), dict(combine="add"),
    dict(combine="subtract"), dict(combine="norm average"), dict(embeds_scaling="K+V"),
    dict(embeds_scaling="K+mean(V) w/ C penalty"), dict(negative_noise=NegativeNoise("fade", 1.0, 0, 0)),
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_each_control_changes_the_output(world, default_output, change):
    pipe, adapter, encoder = world
    with attach(pipe.unet, adapter) as attachment:
        out = _generate(pipe, attachment, [ImagePrompt(tm.reference_images(2), scale=0.8, **change)], encoder)
    assert np.abs(out - default_output).max() > 1e-4
