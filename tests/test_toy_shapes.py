"""The toy shapes world: a frozen, deterministic dataset, and a reader that recovers its attributes."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from imprompt.toy import judge, reader, shapes
from imprompt.toy.shapes import Attributes

VALUES = {"shape": shapes.SHAPES, "color": shapes.COLORS, "background": shapes.BACKGROUNDS,
          "style": shapes.STYLES, "size": shapes.SIZES, "position": shapes.POSITIONS}


def _fingerprint(samples) -> list[tuple[bytes, str, Attributes]]:
    return [(s.image.tobytes(), s.caption, s.attributes) for s in samples]


def test_same_split_and_seed_give_identical_samples():
    assert _fingerprint(shapes.sample("train", 40, seed=3)) == _fingerprint(shapes.sample("train", 40, seed=3))
    # The first k samples do not depend on n, so a dataset can be grown without changing its start.
    assert _fingerprint(shapes.sample("train", 10, seed=3)) == _fingerprint(shapes.sample("train", 40, seed=3))[:10]


def test_render_is_frozen():
    """Later stages cache latents of this dataset: any change to pixels or captions must be deliberate.

    Rendering is pure float64 numpy, so these digests hold on every machine; if you change the world
    on purpose, update them and say so (cached latents and trained toy models become stale).
    """
    digest = hashlib.sha256()
    for item in shapes.sample("train", 16, seed=0):
        digest.update(item.image.tobytes())
        digest.update(item.caption.encode())
    assert digest.hexdigest() == "fba23ca4b130df21cd8c8274ecfebe3a207210f5ebd730cf1440c554d3b7ad6c"
    attrs = Attributes("triangle", "red", "blue", "striped", "large", "center")
    assert shapes.render(attrs).tobytes() == shapes.render(attrs).tobytes()


def test_splits_and_seeds_differ():
    streams = {split: _fingerprint(shapes.sample(split, 20, seed=0)) for split in shapes.SPLITS}
    for a, b in itertools.combinations(shapes.SPLITS, 2):
        assert streams[a] != streams[b], (a, b)
    assert _fingerprint(shapes.sample("train", 20, seed=1)) != streams["train"]


def test_every_value_appears():
    samples = shapes.sample("train", 600, seed=0)
    for name, values in VALUES.items():
        assert {getattr(s.attributes, name) for s in samples} == set(values), name
    assert {(s.attributes.size, s.attributes.position) for s in samples} == set(shapes.placements())


def test_heldout_pairs_only_in_heldout_split():
    heldout = set(shapes.HELDOUT_PAIRS)
    for split in ("train", "val", "test"):
        pairs = {(s.attributes.shape, s.attributes.color) for s in shapes.sample(split, 2000, seed=0)}
        assert not pairs & heldout, split
    pairs = {(s.attributes.shape, s.attributes.color) for s in shapes.sample("heldout", 200, seed=0)}
    assert pairs == heldout
    # Every shape and every colour still occurs in training, just not in these combinations.
    train_pairs = set(shapes.allowed_pairs("train"))
    assert {s for s, _ in train_pairs} == set(shapes.SHAPES) and {c for _, c in train_pairs} == set(shapes.COLORS)


def test_attributes_are_validated():
    with pytest.raises(ValueError, match="invisible"):
        Attributes("circle", "red", "red", "solid", "small", "left")
    with pytest.raises(ValueError, match="centred"):
        Attributes("circle", "red", "white", "solid", "large", "left")
    with pytest.raises(ValueError, match="shape"):
        Attributes("star", "red", "white", "solid", "small", "left")
    with pytest.raises(ValueError, match="split"):
        shapes.sample("training", 1)


def test_shapes_never_touch_the_border():
    """The reader takes the background from the 2-pixel border, so no shape may reach it."""
    for shape, style, (size, position) in itertools.product(shapes.SHAPES, shapes.STYLES, shapes.placements()):
        a = shapes.alpha(shape, size, position, style)
        inner = a[reader.BORDER:-reader.BORDER, reader.BORDER:-reader.BORDER]
        assert a.sum() == inner.sum() > 0, (shape, style, size, position)


def test_colours_are_far_apart():
    rgb = {name: np.array(value, float) for name, value in shapes.RGB.items()}
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 110, (a, b)


def test_captions_name_the_attributes():
    samples = shapes.sample("train", 300, seed=0)
    for s in samples:
        a = s.attributes
        for word in (a.shape, a.color, a.background, a.style):
            assert word in s.caption, (word, s.caption)
    assert len({s.caption for s in samples}) > 150  # varied templates, not one sentence per attribute set


def test_articles_do_not_change_words():
    # "a magenta outlined ..." once became "a magentan outlined ..." (the article fix matched mid-word)
    captions = [s.caption for s in shapes.sample("train", 3000, seed=0)]
    words = {w for c in captions for w in re.findall("[a-z]+", c)}
    assert "magentan" not in words and "an" in words
    assert all(" a outlined" not in f" {c}" for c in captions)
    assert any("magenta outlined" in c for c in captions)


def test_partial_captions_name_only_true_attributes_in_caption_words():
    samples = shapes.sample("train", 400, seed=0)
    vocabulary = {w for s in samples for w in re.findall("[a-z]+", s.caption)}
    rng = random.Random(3)
    named = {a: 0 for a in shapes.PARTIAL_ATTRIBUTES}
    texts = []
    for s in samples:
        text = shapes.partial_caption(s.attributes, rng)
        texts.append(text)
        words = set(re.findall("[a-z]+", text))
        assert words <= vocabulary, text  # the toy tokenizer knows these words only
        a = s.attributes
        values = {"shape": a.shape, "color": a.color, "style": {"outline": "outlined"}.get(a.style, a.style),
                  "background": a.background}
        for attribute, value in values.items():
            named[attribute] += value in words
        others = {"shape": shapes.SHAPES, "color": shapes.COLORS}
        for attribute, options in others.items():  # never a wrong value (colour words are also backgrounds)
            wrong = [o for o in options if o != getattr(a, attribute) and o in words and o != a.background]
            assert not wrong, (text, a)
    assert "" in texts and len(set(texts)) > 200
    for attribute, count in named.items():  # each named about half the time
        assert 150 < count < 250, (attribute, count)
    assert shapes.partial_caption(samples[0].attributes, random.Random(0), p_name=1.0).count(samples[0].attributes.shape) == 1
    assert shapes.partial_caption(samples[0].attributes, random.Random(0), p_name=0.0) == ""


def test_write_folder(tmp_path):
    samples = shapes.sample("val", 5, seed=0)
    folder = shapes.write_folder(samples, tmp_path / "toy")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"{i:06d}.{ext}" for i in range(5) for ext in ("png", "txt")] + ["metadata.jsonl"])
    rows = shapes.read_metadata(folder)
    for s, (file_name, text, attrs) in zip(samples, rows, strict=True):
        assert np.array_equal(np.asarray(Image.open(folder / file_name)), np.asarray(s.image))
        assert (folder / file_name.replace(".png", ".txt")).read_text().strip() == text == s.caption
        assert attrs == s.attributes
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert first["file_name"] == "000000.png" and first["shape"] == samples[0].attributes.shape
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no staging folder left behind
    with pytest.raises(FileExistsError, match="already exists"):
        shapes.write_folder(samples, folder)


@pytest.mark.parametrize("perturbed", [False, True], ids=["clean", "blur-noise-jpeg"])
def test_reader_recovers_attributes(perturbed):
    samples = shapes.sample("test", 300, seed=0) + shapes.sample("heldout", 100, seed=0)
    images = [reader.perturb(s.image, seed=i) if perturbed else s.image for i, s in enumerate(samples)]
    scores = judge.accuracy(reader.read_many(images), [s.attributes for s in samples])
    for name in judge.ATTRIBUTE_NAMES:
        assert scores[name] >= 0.98, (name, scores)
    if not perturbed:
        assert scores["all"] == 1.0


def test_reader_tolerates_pale_and_shifted_shapes():
    """A generated shape a pixel off or a bit pale is still the same shape, style and position."""
    samples = shapes.sample("test", 100, seed=1)
    images = []
    for s in samples:
        pixels = np.asarray(s.image).astype(float)
        background = np.array(shapes.RGB[s.attributes.background], float)
        pale = background + 0.8 * (pixels - background)
        images.append(np.roll(np.rint(pale), (1, -1), axis=(0, 1)).astype(np.uint8))
    scores = judge.accuracy(reader.read_many(images), [s.attributes for s in samples])
    assert min(scores.values()) >= 0.98, scores


def test_reader_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="32x32"):
        reader.read(Image.new("RGB", (64, 64)))
    with pytest.raises(TypeError, match="uint8"):
        reader.read(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="equally many"):
        judge.accuracy([], [])


def test_edits_change_exactly_one_content_attribute_within_the_split():
    rng = random.Random(0)
    changed_counts = {a: 0 for a in shapes.PARTIAL_ATTRIBUTES}
    allowed = set(shapes.allowed_pairs("train"))
    for s in shapes.sample("train", 400, seed=1):
        changed, target = shapes.edited(s.attributes, rng)
        differs = [f for f in ("shape", "color", "background", "style", "size", "position")
                   if getattr(target, f) != getattr(s.attributes, f)]
        assert differs == [changed] and (target.shape, target.color) in allowed
        changed_counts[changed] += 1
        text = shapes.partial_caption(target, rng, always=(changed,))
        word = {"outline": "outlined"}.get(getattr(target, changed), getattr(target, changed))
        assert word in re.findall("[a-z]+", text), (changed, target, text)  # the change is always named
    assert all(70 < n < 130 for n in changed_counts.values()), changed_counts
