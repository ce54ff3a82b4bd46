"""References drawn by other means (imprompt.toy.drawn) and the reader on them."""

import numpy as np
import pytest

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


@pytest.mark.slow  # about 9 s: 400 drawings and 200 renders read twice
def test_drawn_reading_of_references_drawn_by_other_means():
    # Measured on 600 test drawings (docs/drawn-references.md): at strength 1 the drawn reading gets
    # shape 0.942 (the default reading 0.72), style 0.862 (0.832); at 0.5 shape 0.975, style 0.972.
    # Thresholds sit 4-5 points below that, for n = 200.
    samples = drawn.drawn_samples("test", 200, seed=0, strength=1.0)
    images, truth = [s.image for s in samples], [s.attributes for s in samples]
    loose = judge.accuracy(reader.read_many(images, drawn=True), truth)
    default = judge.accuracy(reader.read_many(images), truth)
    assert loose["shape"] >= 0.89 and loose["style"] >= 0.80 and loose["color"] >= 0.97, loose
    assert loose["size"] >= 0.97 and loose["position"] >= 0.97, loose
    assert loose["shape"] >= default["shape"] + 0.1, (loose, default)
    half = drawn.drawn_samples("test", 200, seed=0, strength=0.5)
    scores = judge.accuracy(reader.read_many([s.image for s in half], drawn=True), [s.attributes for s in half])
    assert scores["shape"] >= 0.93 and scores["style"] >= 0.92, scores
    # The renderer's own pictures, clean or blurred, noisy and JPEG'd, read as by default.
    world = shapes.sample("test", 100, seed=3)
    pictures = [s.image for s in world] + [reader.perturb(s.image, i) for i, s in enumerate(world)]
    both = reader.read_many(pictures, drawn=True), reader.read_many(pictures)
    assert both[0][:100] == both[1][:100] == [s.attributes for s in world]
    assert np.mean([a == b for a, b in zip(*both)]) >= 0.97
    # A user's drawing becomes the ControlNet's control image through the drawn reading.
    wrong = [i for i, (r, t) in enumerate(zip(reader.read_many(images), truth)) if r.shape != t.shape]
    fixed = [i for i in wrong if reader.read(images[i], drawn=True).shape == truth[i].shape]
    assert fixed and all(np.array_equal(np.asarray(reader.silhouette_of(images[i])),
                                        np.asarray(shapes.silhouette(truth[i]))) for i in fixed)


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
