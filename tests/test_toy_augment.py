"""Loosened training pictures (imprompt.toy.augment) and the robust_clip stage that learns from them."""

import random

import numpy as np
import pytest
import torch

from imprompt.toy import augment, shapes
from imprompt.toy.shapes import Attributes


def _centre(coverage: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]] + 0.5
    return np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / coverage.sum()


def test_unloosened_coverage_is_the_renderers_alpha():
    for shape in shapes.SHAPES:
        for size, position in shapes.placements():
            for style in shapes.STYLES:
                attrs = Attributes(shape, "red", "white", style, size, position)
                assert np.array_equal(augment.coverage(attrs), shapes.alpha(shape, size, position, style)), attrs


def test_shift_scale_and_period_do_what_they_say():
    solid = Attributes("square", "red", "white", "solid", "large", "center")
    base = augment.coverage(solid)
    moved = augment.coverage(solid, shift=(2.5, -1.25))
    assert np.allclose(_centre(moved) - _centre(base), [2.5, -1.25], atol=0.05)
    bigger = augment.coverage(solid, scale=1.15)
    assert bigger.sum() / base.sum() == pytest.approx(1.15 ** 2, rel=0.03)
    # Wider by aspect, narrower by as much in height; a turn keeps the area and moves the edges.
    wide = augment.coverage(solid, aspect=1.1, samples=8)
    cols, rows = (wide > 0.5).any(axis=0).sum(), (wide > 0.5).any(axis=1).sum()
    assert cols / rows == pytest.approx(1.1 ** 2, rel=0.1)
    turned = augment.coverage(solid, rotation=8.0, samples=8)
    assert turned.sum() == pytest.approx(base.sum(), rel=0.02) and np.abs(turned - base).max() > 0.5
    # Stripes at period 5: covered rows inside the shape repeat every 5 pixels, not the world's 4.
    striped = augment.coverage(Attributes("square", "red", "white", "striped", "large", "center"), period=5.0,
                               samples=1)
    rows = striped[8:24, 16] > 0.5
    starts = [y for y in range(1, len(rows)) if rows[y] and not rows[y - 1]]
    assert np.diff(starts).tolist() == [5] * (len(starts) - 1) and len(starts) >= 2
    # One sample per pixel: hard edges, nothing between 0 and 1.
    hard = augment.coverage(Attributes("circle", "red", "white", "solid", "large", "center"), shift=(0.3, 0.7),
                            samples=1)
    assert set(np.unique(hard)) == {0.0, 1.0}


def test_augmented_pictures_are_seeded_varied_and_keep_their_colours():
    attrs = Attributes("triangle", "blue", "white", "solid", "large", "center")
    a = augment.augmented(attrs, random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(augment.augmented(attrs, random.Random(3))))
    pictures = [np.asarray(augment.augmented(attrs, random.Random(i)), float) for i in range(30)]
    render = np.asarray(shapes.render(attrs), float)
    assert np.mean([np.abs(p - render).max(-1).mean() > 3 for p in pictures]) > 0.8  # not the renderer's pixels
    # Jitter, blur and JPEG move colours a little, never to another palette colour: the centre is the
    # shape's colour, the corner the background's.
    for p in pictures:
        assert np.abs(p[18, 16] - shapes.RGB["blue"]).max() < 60 and np.abs(p[1, 1] - shapes.RGB["white"]).max() < 60
    items = [attrs, Attributes("circle", "red", "white", "dotted", "small", "left")]
    array = augment.augmented_array(items, seed=0)
    assert array.shape == (2, 32, 32, 3) and array.dtype == np.uint8
    assert np.array_equal(array, augment.augmented_array(items, seed=0))
    assert not np.array_equal(array, augment.augmented_array(items, seed=1))


def test_augmentation_settings_are_validated():
    with pytest.raises(ValueError, match="scale"):
        augment.Augmentation(scale=0.7)
    with pytest.raises(ValueError, match="rotation"):
        augment.Augmentation(rotation=45.0)
    with pytest.raises(ValueError, match="periods"):
        augment.Augmentation(periods=(5.0, 3.0))
    with pytest.raises(ValueError, match="jpeg_p"):
        augment.Augmentation(jpeg_p=1.5)


def test_finer_patches_see_what_the_coarse_tower_sees():
    """robust_clip_patch 4: the 4-px tower starts where the 8-px one is. On a picture constant over each 8-px
    patch, every 4-px patch embedding equals its 8-px patch's, and the position embeddings of the finer grid
    interpolate the coarse ones; the text half is copied as it is."""
    from transformers import CLIPConfig, CLIPModel

    from imprompt.toy.robust_clip import finer_patches

    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    coarse = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    fine = finer_patches(coarse, 4).eval()
    assert fine.config.vision_config.patch_size == 4
    blocks = torch.randn(1, 3, 4, 4)
    picture = blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # constant over each 8-px patch
    with torch.no_grad():
        big = coarse.vision_model.embeddings.patch_embedding(picture)  # (1, width, 4, 4)
        small = fine.vision_model.embeddings.patch_embedding(picture)  # (1, width, 8, 8)
    assert torch.allclose(small, big.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), atol=1e-5)
    positions = fine.vision_model.embeddings.position_embedding.weight
    assert positions.shape == (65, 16)
    assert torch.equal(positions[0], coarse.vision_model.embeddings.position_embedding.weight[0])
    assert torch.equal(fine.text_projection.weight, coarse.text_projection.weight)
    with torch.no_grad():  # the finer tower runs on the same pixels and gives embeddings of the same width
        assert fine.get_image_features(pixel_values=picture).pooler_output.shape == (1, 8)
    with pytest.raises(ValueError, match="must divide the tower's own"):
        finer_patches(coarse, 3)
