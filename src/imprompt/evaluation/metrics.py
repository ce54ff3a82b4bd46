"""The paper's metrics as pure functions on embeddings (Ye et al. 2023, section 4.2).

* CLIP-I: cosine similarity of the CLIP image embeddings of a generation and its reference.
* CLIP-T: CLIPScore (Hessel et al. 2021, arXiv 2104.08718) of a generation and the reference's
  caption, ``w * max(cos(image, text), 0)``. The paper's CLIP-T values (e.g. 0.588) are plain cosines,
  so reports use ``w = 1`` by default and CLIPScore's ``w = 2.5`` on request; every report says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (n, d) batches of embeddings."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_i(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """CLIP-I per pair: cos(image embedding of the generation, image embedding of the reference)."""
    return cosine(generated, reference)


def clip_t(generated: torch.Tensor, text: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """CLIP-T per pair: ``weight * max(cos(image, text), 0)``; ``weight=2.5`` is CLIPScore's."""
    return weight * cosine(generated, text).clamp(min=0)


@dataclass(frozen=True)
class Summary:
    mean: float
    low: float  # 95% confidence interval of the mean (normal approximation)
    high: float
    n: int


def summarize(values: Sequence[float] | torch.Tensor, z: float = 1.96) -> Summary:
    """Mean and a 95% confidence interval of the mean (``mean +- z * sd / sqrt(n)``)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        raise ValueError("no values to summarize")
    mean = x.mean().item()
    half = z * x.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return Summary(mean, mean - half, mean + half, n)


def proportion(hits: Sequence[bool], z: float = 1.96) -> Summary:
    """An accuracy with its Wilson score interval (sound also near 0 and 1, unlike the normal one)."""
    n = len(hits)
    if n == 0:
        raise ValueError("no values to summarize")
    p = sum(bool(h) for h in hits) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Summary(p, centre - half, centre + half, n)
