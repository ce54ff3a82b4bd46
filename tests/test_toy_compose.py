"""The ControlNet's fine-tuning beside the adapter (imprompt.toy.compose): what its batches hold."""

import random

from imprompt.toy import shapes
from imprompt.toy.compose import MIXED_SHARE, combinations, draw_rows
from imprompt.toy.control_quality import mixed


def test_the_world_is_every_train_picture_and_no_held_out_pair():
    world = combinations("train")
    backgrounds = sum(len([b for b in shapes.BACKGROUNDS if b != color]) for _, color in shapes.allowed_pairs("train"))
    assert len(set(world)) == len(world) == backgrounds * len(shapes.STYLES) * len(shapes.placements()) > 2000
    assert not {(a.shape, a.color) for a in world} & set(shapes.HELDOUT_PAIRS)
    assert {(a.shape, a.color) for a in combinations("heldout")} == set(shapes.HELDOUT_PAIRS)


def test_rows_mix_another_shape_into_the_controls_layout_and_keep_the_rest_alone():
    world = combinations("train")
    index = {a: i for i, a in enumerate(world)}
    rows = draw_rows(random.Random(3), world, index, 64, with_adapter=True)
    assert draw_rows(random.Random(3), world, index, 64, with_adapter=True) == rows  # the step's stream decides
    mixed_rows = round(64 * MIXED_SHARE)
    named = set()
    for r, (control, target, reference, text) in enumerate(zip(rows.control, rows.target, rows.reference, rows.named)):
        a = world[control]
        if r < mixed_rows:
            b = world[reference]
            assert b.shape != a.shape and world[target] == mixed(a, b)
            assert (world[target].shape, world[target].size, world[target].position) == (a.shape, a.size, a.position)
            assert text in (None, a.shape)
            named.add(text)
        else:
            assert (target, reference, text) == (control, None, None)
    assert None in named and len(named) > 1  # both the empty text and a named shape occur
    alone = draw_rows(random.Random(3), world, index, 16, with_adapter=False)
    assert alone.target == alone.control and alone.reference == [None] * 16 and alone.named == [None] * 16
