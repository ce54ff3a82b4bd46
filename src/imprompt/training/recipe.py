"""The training recipe's math as pure functions (paper section 3.3; official training scripts)."""

from __future__ import annotations

import functools

import numpy as np
import torch


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The random stream of one micro-step on one process.

    Noise, timesteps, latent samples and dropout all come from here, so a resumed run draws exactly
    what an uninterrupted one would, with no RNG state to save, and processes never share noise.
    """
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def dropout_masks(u: torch.Tensor, p_image: float, p_text: float, p_both: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample conditioning dropout from uniforms ``u`` in [0, 1) (official scripts' rule).

    [0, p_image): drop the image; [p_image, +p_text): drop the text; [.., +p_both): drop both.
    Returns boolean masks (drop_image, drop_text). Training with dropped conditions is what makes
    classifier-free guidance over the image prompt possible at inference.
    """
    drop_image = (u < p_image) | ((u >= p_image + p_text) & (u < p_image + p_text + p_both))
    drop_text = (u >= p_image) & (u < p_image + p_text + p_both)
    return drop_image, drop_text


def apply_dropout(features: torch.Tensor, unconditional: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the dropped rows of ``features`` by the unconditional features."""
    shape = (-1,) + (1,) * (features.ndim - 1)
    return torch.where(drop.view(shape), unconditional.to(features).expand_as(features), features)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), or the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")


@functools.lru_cache(maxsize=4)
def sample_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the dataset in one epoch (the same on every process)."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def batch_indices(num_items: int, seed: int, micro_step: int, rank: int, world: int, batch: int) -> list[int]:
    """Dataset indices of one process's micro-batch: a global stream, split across processes.

    Position ``p`` in the stream is item ``order(epoch)[p % N]`` with ``epoch = p // N``; micro-step m
    on process r reads positions ``(m * world + r) * batch + j``. Derived from the step alone, so
    resuming needs no saved data-loader state.
    """
    out = []
    for j in range(batch):
        position = (micro_step * world + rank) * batch + j
        epoch, offset = divmod(position, num_items)
        out.append(int(sample_order(num_items, seed, epoch)[offset]))
    return out
