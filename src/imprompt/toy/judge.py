"""Judging toy generations: what was asked, what the image shows, and whether the two agree.

The one place that defines a hit in the toy world, used by the quality stage
(:mod:`imprompt.toy.quality`), ``imprompt eval`` (:mod:`imprompt.evaluation`, which reaches the toy
world through this module only) and the demo:

* :func:`read` / :func:`read_many` recover an image's attributes from its pixels (:mod:`.reader`).
* **Content** is shape, colour, background and style. Size and position are placement, which an image
  prompt may move without being wrong, so the image + text checks compare content only.
* An :class:`Edit` is the image + text task: the reference with one content attribute changed by a
  short text (``"<colour> background"`` or ``"a <colour> <shape>"``); :func:`edit_plan` gives each
  reference of an evaluation set its edit.
* :func:`attribute_hits`, :func:`edit_hits`, :func:`accuracy` and :func:`edit_accuracy` score
  generations against them.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .reader import read, read_many
from .shapes import BACKGROUNDS, COLORS, SPLITS, Attributes, Sample, sample

__all__ = ["ATTRIBUTE_NAMES", "CONTENT", "SPLITS", "Attributes", "Edit", "accuracy", "attribute_hits",
           "change_background", "change_color", "content_hits", "edit_accuracy", "edit_hits", "edit_plan",
           "is_shared_tower_clip", "load_scoring_clip", "read", "read_many", "reference_set"]

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Attributes))
CONTENT: tuple[str, ...] = ("shape", "color", "background", "style")


@dataclass(frozen=True)
class Edit:
    """Image + text: the text asks for ``changed`` to become ``expected``'s value; the rest stays.
    ``source``: the same words for the reference's own value (the FROM of a text diff, text -> source)."""

    changed: str
    text: str
    expected: Attributes
    source: str = ""


def change_background(reference: Attributes, rng: random.Random) -> Edit:
    """A text naming a new background (never the reference's own, nor its shape's colour)."""
    new = rng.choice([b for b in BACKGROUNDS if b not in (reference.background, reference.color)])
    return Edit("background", f"{new} background", dataclasses.replace(reference, background=new),
                f"{reference.background} background")


def change_color(reference: Attributes, rng: random.Random) -> Edit:
    """A text naming the reference's shape in a new colour (never its own, nor the background's)."""
    new = rng.choice([c for c in COLORS if c not in (reference.color, reference.background)])
    return Edit("color", f"a {new} {reference.shape}", dataclasses.replace(reference, color=new),
                f"a {reference.color} {reference.shape}")


EDITS: tuple[Callable[[Attributes, random.Random], Edit], ...] = (change_background, change_color)


def edit_plan(references: Sequence[Attributes], seed: int = 0) -> list[Edit]:
    """One edit per reference, alternating background and colour; the same references and seed give the
    same plan (its own random stream, so it does not depend on anything drawn before)."""
    rng = random.Random(f"imprompt-toy/edits/{seed}")
    return [EDITS[i % len(EDITS)](a, rng) for i, a in enumerate(references)]


def reference_set(split: str, n: int) -> list[tuple[Sample, Edit]]:
    """The first ``n`` samples of a split with seed 0 (the toy build's own split folder), each with its edit."""
    if split not in SPLITS:
        raise ValueError(f"toy split {split!r} is not one of {', '.join(SPLITS)}")
    samples = sample(split, n)
    return list(zip(samples, edit_plan([s.attributes for s in samples])))


def content_hits(read: Attributes, expected: Attributes) -> dict[str, bool]:
    """Per content attribute, whether the generation shows the expected value."""
    return {name: getattr(read, name) == getattr(expected, name) for name in CONTENT}


def attribute_hits(read: Attributes, truth: Attributes) -> dict[str, bool]:
    """Per attribute, whether the generation shows the reference's value; ``all``: every one does."""
    hits = {name: getattr(read, name) == getattr(truth, name) for name in ATTRIBUTE_NAMES}
    hits["all"] = all(hits.values())
    return hits


def edit_hits(read: Attributes, reference: Attributes, changed: str, expected: Attributes) -> dict[str, bool]:
    """Image + text: the changed attribute follows the text; the other content attributes the reference.

    ``expected`` is the reference with the text's change; ``<name>_as_asked`` says, per content
    attribute, whether the generation shows the expected value (the same keys whichever one changed).
    """
    follows = getattr(read, changed) == getattr(expected, changed)
    keeps = all(getattr(read, name) == getattr(reference, name) for name in CONTENT if name != changed)
    return {"follows_text": follows, "keeps_reference": keeps, "both": follows and keeps,
            **{f"{name}_as_asked": hit for name, hit in content_hits(read, expected).items()}}


def accuracy(predicted: Sequence[Attributes], truth: Sequence[Attributes]) -> dict[str, float]:
    """Fraction right per attribute, plus ``"all"``: the fraction with every attribute right."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many, and at least one, predictions and truths; "
                         f"got {len(predicted)} and {len(truth)}")
    hits = [attribute_hits(p, t) for p, t in zip(predicted, truth)]
    return {name: float(np.mean([h[name] for h in hits])) for name in ATTRIBUTE_NAMES + ("all",)}


def edit_accuracy(predicted: Sequence[Attributes], plan: Sequence[Edit]) -> dict[str, dict[str, float]]:
    """Per kind of edit: how often the changed attribute follows the text (``"<changed> (text)"``) and
    each other content attribute the reference (``"<name> (reference)"``), rounded to 4 places."""
    report = {}
    for changed in ("background", "color"):
        hits = [content_hits(p, e.expected) for p, e in zip(predicted, plan) if e.changed == changed]
        if not hits:
            continue
        names = [changed] + [name for name in CONTENT if name != changed]
        report[f"change {changed}"] = {
            f"{name} ({'text' if name == changed else 'reference'})": round(float(np.mean([h[name] for h in hits])), 4)
            for name in names}
    return report


# ------------------------------------------- the scoring CLIP, which shares the pipeline's towers

def is_shared_tower_clip(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the toy package's scoring CLIP (:func:`imprompt.toy.models.save_shared_tower_clip`)."""
    from .models import TOWERS_FILE

    return (Path(folder) / TOWERS_FILE).is_file()


def load_scoring_clip(folder: str | os.PathLike, dtype=None):
    """The toy package's scoring CLIP as a transformers ``CLIPModel`` (its towers are the pipeline's)."""
    from .models import load_shared_tower_clip

    return load_shared_tower_clip(folder, dtype)
