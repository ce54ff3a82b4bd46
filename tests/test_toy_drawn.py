"""References drawn by other means (imprompt.toy.drawn) and the reader on them."""

import numpy as np

from imprompt.toy import drawn, judge, reader, shapes


def _centroid(image, background):
    distance = np.abs(np.asarray(image, float) - np.array(shapes.RGB[background], float)).sum(-1)
    weight = distance > 60
    ys, xs = np.nonzero(weight)
    return np.array([ys.mean(), xs.mean()])


def test_drawings_are_seeded_and_not_the_renderer():
    a = drawn.drawn_samples("test", 40, seed=0)
    b = drawn.drawn_samples("test", 20, seed=0)
    world = shapes.sample("test", 40, seed=0)
    # Same seed, same pixels; the first k do not depend on n; attributes and captions are the split's.
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.attributes for s in a] == [s.attributes for s in world]
    assert [s.caption for s in a] == [s.caption for s in world]
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(drawn.drawn_samples("test", 1, seed=1)[0].image))
    # Not a copy of shapes.render: most images differ in many pixels, and shapes moved off the grid.
    mismatch = [np.mean(np.abs(np.asarray(d.image, int) - np.asarray(w.image, int)).max(-1) > 24)
                for d, w in zip(a, world)]
    assert np.median(mismatch) > 0.05, mismatch
    moved = [np.abs(_centroid(d.image, d.attributes.background) - _centroid(w.image, w.attributes.background)).max()
             for d, w in zip(a, world)]
    assert np.mean(np.array(moved) > 0.75) > 0.5, moved


def test_nominal_drawings_read_as_their_attributes():
    samples = drawn.drawn_samples("test", 100, seed=2, strength=0.0)
    scores = judge.accuracy(reader.read_many([s.image for s in samples]), [s.attributes for s in samples])
    assert scores["all"] >= 0.98, scores
    # Strength 0 is still PIL's drawing, not the renderer's pixels.
    assert any(not np.array_equal(np.asarray(s.image), np.asarray(shapes.render(s.attributes))) for s in samples)


def test_reader_on_drawn_references_at_half_strength():
    # Measured on 600 test-split drawings at strength 0.5: shape 0.962, colour 0.997, background 1.0,
    # style 0.968 (at strength 1 the shipped reader reads only 72% of shapes: docs/drawn-references.md,
    # issue 16). Thresholds sit 3-5 points below what n = 200 gives so that the test does not flake.
    samples = drawn.drawn_samples("test", 200, seed=0, strength=0.5)
    scores = judge.accuracy(reader.read_many([s.image for s in samples]), [s.attributes for s in samples])
    assert scores["shape"] >= 0.92 and scores["color"] >= 0.97 and scores["background"] >= 0.97, scores
    assert scores["style"] >= 0.92, scores


def test_drawn_folder_has_the_split_layout(tmp_path):
    folder = drawn.write_drawn_folder("test", 3, tmp_path / "drawn")
    rows = shapes.read_metadata(folder)
    samples = drawn.drawn_samples("test", 3)
    assert [a for _, _, a in rows] == [s.attributes for s in samples]
    assert (folder / "000000.txt").read_text().strip() == samples[0].caption


def test_strength_is_checked():
    import random
    import pytest
    with pytest.raises(ValueError, match="strength"):
        drawn.draw_plan(shapes.sample("test", 1)[0].attributes, random.Random(0), strength=2.0)
