import math

import pytest
import torch

from imprompt.evaluation.metrics import clip_i, clip_t, cosine, proportion, summarize


def test_clip_i_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, -1.0]])
    assert torch.allclose(clip_i(a, b), torch.tensor([1.0, 0.0, -1.0]))


def test_clip_t_clamps_negatives_and_applies_the_weight():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    assert torch.allclose(clip_t(image, text), torch.tensor([1.0, 0.0]))
    assert torch.allclose(clip_t(image, text, weight=2.5), torch.tensor([2.5, 0.0]))
    half = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, math.sqrt(3.0)]])
    assert clip_t(*half).item() == pytest.approx(0.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"same shape, got \(1, 2\) and \(1, 3\)"):
        cosine(torch.zeros(1, 2), torch.zeros(1, 3))


def test_summaries():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.high - s.mean == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    p = proportion([True] * 9 + [False])
    assert p.mean == 0.9 and 0.5 < p.low < 0.9 < p.high < 1.0
    assert proportion([True] * 20).high == pytest.approx(1.0)
    with pytest.raises(ValueError):
        summarize([])
