"""Evaluation: CLIP-I, CLIP-T and attribute accuracy for adapters and baselines (paper Table 1)."""
