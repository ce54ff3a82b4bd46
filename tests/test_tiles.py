"""Tiled references: geometry against hand-computed boxes, sharpening against hand-computed pixels,
and what tiling does to the encoder features and the generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.generation.embeds import encode_references
from imprompt.generation.tiles import (TileOptions, contrast_adaptive_sharpening, cut_tiles, region_mask, resized_size,
                                       tile_boxes, tile_regions, tile_starts)


@pytest.mark.parametrize("size, expected", [
    ((64, 32), (64, 32)),     # already short side 32
    ((100, 50), (64, 32)),
    ((50, 100), (32, 64)),
    ((45, 40), (36, 32)),     # int(32 * 45 / 40) = int(36.0)
    ((47, 40), (37, 32)),     # int(37.6)
    ((48, 48), (32, 32)),
])
def test_resize_puts_the_short_side_at_the_encoder_size(size, expected):
    assert resized_size(*size, 32) == expected


@pytest.mark.parametrize("length, overlap, expected", [
    (32, 0.0, [0]),
    (64, 0.0, [0, 32]),                 # two tiles side by side, no overlap
    (36, 0.0, [0, 4]),                  # ceil(36/32) = 2 tiles, the second ends at 36
    (100, 0.0, [0, 22, 45, 68]),        # 4 tiles, stride 68/3 = 22.67, rounded down
    (64, 0.25, [0, 16, 32]),            # n = ceil((64 - 8) / 24) = 3, stride 16: overlap 16 >= 8
    (100, 0.5, [0, 13, 27, 40, 54, 68]),  # n = ceil((100 - 16) / 16) = 6, stride 13.6
])
def test_tile_starts(length, overlap, expected):
    assert tile_starts(length, 32, overlap) == expected


def test_tile_boxes_and_regions_wide_and_tall():
    assert tile_boxes(64, 32, 32) == [(0, 0, 32, 32), (32, 0, 64, 32)]
    # Tall: ceil(80/32) = 3 tiles at 0, 24, 48 (stride 48/2).
    assert tile_boxes(32, 80, 32) == [(0, 0, 32, 32), (0, 24, 32, 56), (0, 48, 32, 80)]
    assert tile_regions([(0, 0, 32, 32), (32, 0, 64, 32)], 64, 32) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    with pytest.raises(ValueError, match="shorter than one 32 px tile"):
        tile_starts(20, 32)


def test_region_mask_covers_its_fraction_of_the_frame():
    mask = region_mask((0.5, 0.0, 1.0, 1.0), 4, 8)
    expected = torch.zeros(4, 8)
    expected[:, 4:] = 1
    assert torch.equal(mask, expected)
    # 0.375..0.625 of 8 columns: 3..5
    assert region_mask((0.375, 0.0, 0.625, 0.5), 2, 8).nonzero().tolist() == [[0, 3], [0, 4]]


def test_contrast_adaptive_sharpening_by_hand():
    flat = np.full((3, 3, 1), 0.4)
    assert np.allclose(contrast_adaptive_sharpening(flat, 1.0), flat)  # nothing to sharpen
    image = np.full((3, 3, 1), 0.5)
    image[1, 1] = 0.6
    # Centre: cross min/max 0.5/0.6, diagonal 0.5/0.5 -> mn 1.0, mx 1.1; amp = sqrt(min(1.0, 0.9)/1.1)
    # = 0.904534; amount 0: w = -amp/8 = -0.113067; out = (4*0.5*w + 0.6) / (1 + 4w) = 0.682568.
    out = contrast_adaptive_sharpening(image, 0.0)
    assert out[1, 1, 0] == pytest.approx(0.682568, abs=1e-5)
    # amount 1: w = -amp/5 = -0.180907; out = (0.6 - 0.361814) / (1 - 0.723627) = 0.861826
    assert contrast_adaptive_sharpening(image, 1.0)[1, 1, 0] == pytest.approx(0.861826, abs=1e-5)


def test_tile_options_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        TileOptions(overlap=0.95).check()
    with pytest.raises(ValueError, match="sharpening"):
        TileOptions(sharpen=2).check()
    assert TileOptions(overlap=0.25, masks=True).describe() == "tiles (overlap 0.25, masked)"


def _two_halves() -> Image.Image:
    """A 64x32 reference whose halves are two different 32x32 images."""
    left, right = tm.reference_images(2, 32)
    wide = Image.new("RGB", (64, 32))
    wide.paste(left.crop((0, 0, 32, 32)), (0, 0))
    wide.paste(right.crop((0, 0, 32, 32)), (32, 0))
    return wide


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder(tm.image_encoder())


@pytest.mark.parametrize("output", ["image_embeds", "penultimate_hidden"])
def test_a_wide_reference_gives_one_tile_per_part(encoder, output):
    wide = _two_halves()
    tiled = encode_references([wide], encoder, output, tiles=TileOptions())
    halves = [wide.crop((0, 0, 32, 32)), wide.crop((32, 0, 64, 32))]
    separate = encoder.features(encoder.pixels(halves), output)
    assert tiled.units == 2 and tiled.units_per_reference == (2,)
    assert torch.equal(tiled.conditional, separate)
    # The untiled path centre-crops: neither half survives whole.
    cropped = encode_references([wide], encoder, output)
    assert cropped.units == 1
    assert all((cropped.conditional[0] - s).abs().max() > 1e-3 for s in separate)
    enhanced = encode_references([wide], encoder, output, tiles=TileOptions(enhance=True, masks=True))
    # (batches of another size round differently in the last bits)
    assert enhanced.units == 3 and torch.allclose(enhanced.conditional[0], cropped.conditional[0], atol=1e-5)
    assert torch.allclose(enhanced.conditional[1:], separate, atol=1e-5)
    assert enhanced.regions == (None, (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))


def test_sharpened_tiles_differ_and_cut_tiles_are_crops():
    wide = _two_halves()
    plain = cut_tiles(wide, 32, TileOptions())
    assert [np.array_equal(np.asarray(t), np.asarray(wide.crop(b))) for t, b in zip(plain.images, plain.boxes)] == [True] * 2
    sharp = cut_tiles(wide, 32, TileOptions(sharpen=0.8))
    assert not np.array_equal(np.asarray(sharp.images[0]), np.asarray(plain.images[0]))


def _generate(pipe, attachment, prompt, encoder, **settings):
    settings = GenerationSettings(**{"prompt": "a star", "steps": 2, "seed": 0, **settings})
    return generate(pipe, attachment, settings, [prompt], [encoder], output_type="np")


@pytest.fixture(scope="module")
def world(encoder):
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, tm.random_adapter(pipe.unet, "linear", encoder=encoder.model)


def test_tiling_a_square_reference_is_the_untiled_path_bit_for_bit(world, encoder):
    pipe, adapter = world
    square = tm.reference_images(1, 48)[0].crop((0, 0, 48, 48))
    with attach(pipe.unet, adapter) as attachment:
        untiled = _generate(pipe, attachment, ImagePrompt([square], scale=0.8), encoder)
        tiled = _generate(pipe, attachment, ImagePrompt([square], scale=0.8, tiles=TileOptions()), encoder)
    assert np.array_equal(untiled, tiled)


@pytest.mark.slow
def test_tiling_a_wide_reference_changes_the_picture(world, encoder):
    pipe, adapter = world
    wide = _two_halves()
    with attach(pipe.unet, adapter) as attachment:
        wide_untiled = _generate(pipe, attachment, ImagePrompt([wide], scale=0.8), encoder)
        wide_tiled = _generate(pipe, attachment, ImagePrompt([wide], scale=0.8, tiles=TileOptions()), encoder)
        wide_masked = _generate(pipe, attachment, ImagePrompt([wide], scale=0.8, tiles=TileOptions(masks=True)),
                                encoder, width=64, height=32)
        with pytest.raises(ValueError, match="combine='concat' with masked tiles"):
            _generate(pipe, attachment, ImagePrompt([wide], combine="average", tiles=TileOptions(masks=True)), encoder)
    assert np.abs(wide_tiled - wide_untiled).max() > 1e-3
    assert wide_masked.shape == (1, 32, 64, 3) and np.isfinite(wide_masked).all()


def test_tiles_from_the_native_api_and_the_flags_become_tile_options():
    from imprompt.generation.adapter_options import adapter_options
    from imprompt.server.native import NativeRequest, native_to_request

    body = NativeRequest(image_prompts=[{"adapter": "a", "images": ["x"]},
                                        {"adapter": "b", "images": ["y"], "tiles": "masked,enhance",
                                         "tile_overlap": 0.25, "tile_sharpen": 0.5}])
    request = native_to_request(body, "model", lambda name, kind: name, lambda ref, where, mode: ref)
    assert request.tiles == ["1=masked,enhance"]
    options = adapter_options(request)
    assert options[0].tiles is None
    assert options[1].tiles == TileOptions(overlap=0.25, sharpen=0.5, masks=True, enhance=True)
    assert options[1].describe().endswith("Tiles: tiles (overlap 0.25, sharpen 0.5, masked, enhance)")
