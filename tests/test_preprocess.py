"""ControlNet preprocessors on hand-made images: each against a property checked by hand (edges where the
square's border is, shuffle reproducible by seed, tile = the block means), canny against cv2.Canny."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
from PIL import Image

from imprompt.generation.controls import control_options
from imprompt.generation.preprocess import PREPROCESSORS, module_key, preprocess
from imprompt.generation.request import GenerateRequest

HAS_AUX = importlib.util.find_spec("controlnet_aux") is not None


def square(size: int = 32, lo: int = 8, hi: int = 24, fg: int = 255, bg: int = 0) -> Image.Image:
    """A ``fg`` square [lo, hi) on ``bg``: its border runs along rows/columns lo-1..lo and hi-1..hi."""
    pixels = np.full((size, size, 3), bg, np.uint8)
    pixels[lo:hi, lo:hi] = fg
    return Image.fromarray(pixels)


def near_border(size: int = 32, lo: int = 8, hi: int = 24, reach: int = 2) -> np.ndarray:
    """True within ``reach`` pixels of the square's border."""
    y, x = np.mgrid[:size, :size]
    inside_outer = (x >= lo - reach) & (x < hi + reach) & (y >= lo - reach) & (y < hi + reach)
    inside_inner = (x >= lo + reach) & (x < hi - reach) & (y >= lo + reach) & (y < hi - reach)
    return inside_outer & ~inside_inner


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_canny_is_cv2_canny_with_the_thresholds():
    image = square()
    for low, high in ((100, 200), (20, 60)):
        got = arr(preprocess(image, "canny", threshold_a=low, threshold_b=high))
        expected = cv2.Canny(arr(image), low, high)
        np.testing.assert_array_equal(got[:, :, 0], expected)
        assert (got[:, :, 0] == got[:, :, 2]).all()
    # -1 (the extension's "unset") and None are the defaults 100 / 200.
    np.testing.assert_array_equal(arr(preprocess(image, "canny", threshold_a=-1, threshold_b=-1))[:, :, 0],
                                  cv2.Canny(arr(image), 100, 200))
    edges = arr(preprocess(image, "canny"))[:, :, 0] > 0
    assert edges.any() and not (edges & ~near_border()).any()  # only on the square's border
    for line in (8, 23):  # every side has edge pixels
        assert edges[line - 1:line + 2, 10:22].any() and edges[10:22, line - 1:line + 2].any()


def test_processor_resolution_sets_the_short_side():
    wide = Image.fromarray(np.zeros((32, 64, 3), np.uint8))
    assert preprocess(wide, "canny", resolution=16).size == (32, 16)
    assert preprocess(wide, "canny", resolution=-1).size == (64, 32)


def test_edge_preprocessors_put_their_edges_on_the_border():
    image = square()
    for module in ("scribble_xdog", "softedge_sobel"):
        out = arr(preprocess(image, module))[:, :, 0].astype(int)
        assert out[near_border(reach=3)].max() == 255, module
        # Far from the border (the centre and the corners) there is no edge.
        assert out[14:18, 14:18].max() == 0 and out[:3, :3].max() == 0 and out[-3:, -3:].max() == 0, module
    assert set(np.unique(arr(preprocess(image, "scribble_xdog")))) <= {0, 255}  # binary strokes
    # softedge is graded: by hand, the 3x3 Sobel of a 255 step is 4 * 255 on the two pixels astride a side and
    # 765 * sqrt(2) at the square's corner pixel (the peak, scaled to 255); beyond them it is 0.
    soft = arr(preprocess(image, "softedge_sobel"))[:, :, 0]
    side = round(255 * 4 * 255 / (765 * np.sqrt(2)))
    assert soft[16, 7] == soft[16, 8] == soft[7, 16] == side == 240 and soft[8, 8] == 255 and soft[16, 6] == 0
    # A higher XDoG threshold draws fewer stroke pixels.
    thin = arr(preprocess(image, "scribble_xdog", threshold_a=200)) > 0
    assert thin.sum() < (arr(preprocess(image, "scribble_xdog", threshold_a=10)) > 0).sum()


def test_lineart_standard_turns_dark_lines_on_white_into_white_lines():
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[16, 4:28] = 0  # one black line
    out = arr(preprocess(Image.fromarray(pixels), "lineart_standard"))[:, :, 0]
    assert out[16, 6:26].min() > 100  # the line is bright
    assert out[:8].max() == 0 and out[24:].max() == 0  # far from it: nothing


def test_shuffle_is_reproducible_by_seed_and_keeps_the_colours():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, 32:] = (200, 40, 10)
    image = Image.fromarray(pixels)
    one, again, other = (arr(preprocess(image, "shuffle", seed=s)) for s in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other) and not np.array_equal(one, pixels)
    # A warp reads pixels of the image (interpolated between its two colours): red stays 5x green.
    assert np.abs(one[:, :, 0].astype(int) - 5 * one[:, :, 1].astype(int)).max() <= 5


def test_tile_resample_is_the_block_means_and_blur_is_gaussian():
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:2, :2] = 40
    pixels[:2, 2:] = [[0], [80]]  # rows 0 and 1 of the right block: mean 40
    pixels[2:, :2, 0] = 200
    image = Image.fromarray(pixels)
    half = arr(preprocess(image, "tile_resample", threshold_a=2))
    expected = np.zeros((2, 2, 3), np.uint8)
    expected[0, 0] = expected[0, 1] = 40
    expected[1, 0, 0] = 200
    np.testing.assert_array_equal(half, expected)
    np.testing.assert_array_equal(arr(preprocess(image, "tile_resample")), pixels)  # rate 1: unchanged
    flat = Image.fromarray(np.full((16, 16, 3), 77, np.uint8))
    np.testing.assert_array_equal(arr(preprocess(flat, "blur_gaussian", threshold_a=3)), arr(flat))
    blurred = arr(preprocess(square(), "blur_gaussian", threshold_a=2))
    np.testing.assert_array_equal(blurred, cv2.GaussianBlur(arr(square()), (0, 0), 2))
    assert 0 < blurred[16, 7, 0] < 255  # the edge is softened


def test_invert_and_none():
    image = square(fg=200, bg=30)
    np.testing.assert_array_equal(arr(preprocess(image, "invert")), 255 - arr(image))
    assert preprocess(image, "none") is image


def test_module_names_and_unknown_ones():
    assert module_key("Canny") == "canny" and module_key("lineart_realistic") == "lineart"
    assert module_key("invert (from white bg & black line)") == "invert" and module_key("") == "none"
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'sobel'; choose one of none, canny"):
        module_key("sobel")
    assert all(PREPROCESSORS[k].run is not None for k in ("canny", "shuffle", "tile_resample", "invert"))


@pytest.mark.skipif(HAS_AUX, reason="controlnet_aux is installed here")
def test_model_based_preprocessors_without_controlnet_aux_name_the_install():
    with pytest.raises(ImportError, match=r"pip install controlnet_aux.*lllyasviel/Annotators"):
        preprocess(square(), "depth_midas")
    request = GenerateRequest(controlnet=["cn"], control_image=["c.png"], control_preprocess=["openpose"])
    with pytest.raises(ValueError, match="--control-preprocess 'openpose': the openpose preprocessor runs the "
                                         "OpenposeDetector model of controlnet_aux: pip install controlnet_aux"):
        control_options(request)
