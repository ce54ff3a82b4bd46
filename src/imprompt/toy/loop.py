"""The toy build's training loop: resumable, time-capped, checkpointing atomically; and its UNet step.

Why not :func:`imprompt.training.trainer.train`: that trains an adapter on a frozen UNet from cached
encoder features. The toy stages train whole models from scratch (a CLIP, a VAE, a UNet, and the
derivative's UNet fine-tune), with their own losses, an EMA copy and a wall-clock cap for a shared
CPU. What is the same computation is shared: the random stream of a step
(:func:`~imprompt.training.recipe.step_generator`), the batch of a step
(:func:`~imprompt.training.recipe.batch_indices`), the forward noising (the scheduler's ``add_noise``),
the target (:func:`~imprompt.training.recipe.diffusion_target`) and caption dropout
(:func:`~imprompt.training.recipe.apply_dropout`). All are derived from (seed, step) alone, so a
resumed run draws exactly what an uninterrupted one would, with no RNG state saved.

The shipped toy models were built before the stages used these streams (each stage seeded torch
generators with arithmetic of the seed and the step, and noised by hand); a rebuild draws different
random numbers, so its models and scores differ a little from the shipped ones (the model card says so).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path, load_torch_weights
from ..training.recipe import apply_dropout, batch_indices, diffusion_target, step_generator

T = TypeVar("T")


def seeded(seed: int, make: Callable[[], T]) -> T:
    """``make()`` with torch's default generator seeded (models draw their initial weights from it),
    leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def step_batch(num_items: int, batch: int, seed: int, step: int) -> list[int]:
    """The dataset indices of a step: the training recipe's epoch-shuffled stream (one process)."""
    return batch_indices(num_items, seed, step, rank=0, world=1, batch=batch)


def learning_rate(step: int, total: int, warmup: int, base: float, cosine: bool) -> float:
    """Linear warm-up to ``base``; then constant, or a cosine decay to a tenth of it at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not cosine:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def denoising_step(unet, optimizer: torch.optim.Optimizer, noise_scheduler, latents: torch.Tensor, text: torch.Tensor,
                   empty: torch.Tensor, caption_dropout: float, seed: int, step: int, controlnet=None,
                   control: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None) -> float:
    """One step of text-conditioned diffusion training (paper section 3.3's objective for the UNet itself).

    From the step's random stream: which captions are replaced by the empty one, the noise and uniform
    timesteps; the scheduler noises the latents. The gradient norm of what ``optimizer`` trains is
    clipped at 1.

    With a ``controlnet`` and its ``control`` images (N, 3, H, W in [0, 1], as diffusers' ControlNet
    pipelines feed them), the ControlNet's residuals are added to the UNet's blocks (Zhang et al. 2023,
    "Adding Conditional Control to Text-to-Image Diffusion Models", section 3.3: the same epsilon loss,
    the ControlNet seeing the same text and timestep); ``optimizer`` then holds the ControlNet's
    parameters and the UNet stays frozen. The random stream is the same either way.
    ``cross_attention_kwargs`` go to the UNet (an attached adapter's image prompts,
    :meth:`imprompt.adapter.attach.Attachment.prompt_call`; the ControlNet never sees them).
    """
    generator = step_generator(seed, step, 0)
    drop = torch.rand(len(latents), generator=generator) < caption_dropout
    text = apply_dropout(text.float(), empty, drop)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    residuals = {}
    if controlnet is not None:
        if control is None or len(control) != len(latents):
            found = "none" if control is None else len(control)
            raise ValueError(f"a ControlNet step needs one control image per latent ({len(latents)}), found {found}")
        down, mid = controlnet(noisy, timesteps, text, controlnet_cond=control, return_dict=False)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    prediction = unet(noisy, timesteps, text, cross_attention_kwargs=cross_attention_kwargs, **residuals).sample
    loss = F.mse_loss(prediction, diffusion_target(noise_scheduler, latents, noise, timesteps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return loss.item()


class TrainingLoop:
    """Counts steps up to ``total`` or a time cap, checkpointing ``state`` to ``folder/checkpoint.pt``.

    ``state`` maps names to objects with ``state_dict`` / ``load_state_dict`` (models, optimizers).
    The checkpoint holds only their state dicts and two numbers, so it loads with ``weights_only``
    (:func:`imprompt.files.load_torch_weights`): a crafted ``checkpoint.pt`` is refused, never run.
    """

    def __init__(self, folder: Path, total: int, state: dict, *, name: str, max_seconds: float = math.inf,
                 checkpoint_seconds: float = 120.0, progress: bool = True, log: Callable[[str], None] = print):
        self.path = Path(folder) / "checkpoint.pt"
        self.total, self.state, self.name, self.log = total, state, name, log
        self.max_seconds, self.checkpoint_seconds, self.progress = max_seconds, checkpoint_seconds, progress
        self.step, self.seconds = 0, 0.0
        if self.path.is_file():
            self._resume()

    def _resume(self) -> None:
        saved = load_torch_weights(self.path, f"{self.name} checkpoint")
        expected = {"step", "seconds", *self.state}
        if not isinstance(saved, dict) or not expected <= set(saved):
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{self.path} is not a checkpoint of this stage (expected entries {sorted(expected)}, "
                             f"found {found}); delete it to start the stage over")
        for key, obj in self.state.items():
            try:
                obj.load_state_dict(saved[key])
            except (RuntimeError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"{self.path}: its {key!r} does not fit this stage's ({first[:200]}); delete it to "
                                 "start the stage over") from None
        self.step, self.seconds = int(saved["step"]), float(saved["seconds"])
        self.log(f"{self.name}: resumed at step {self.step} ({self.seconds:.0f} s so far)")

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"step": self.step, "seconds": self.seconds,
                        **{key: obj.state_dict() for key, obj in self.state.items()}}, tmp)

    def run(self, step_fn: Callable[[int], float]) -> dict:
        """Call ``step_fn(step)`` (which returns the loss) until done; the stage's summary."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.step, desc=self.name, disable=not self.progress, mininterval=5,
                   file=sys.stdout)
        last_save = time.perf_counter()
        start, base = time.perf_counter(), self.seconds
        losses = []
        while self.step < self.total and self.seconds < self.max_seconds:
            losses.append(step_fn(self.step))
            self.step += 1
            self.seconds = base + time.perf_counter() - start
            bar.update(1)
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", s_step=f"{self.seconds / max(1, self.step):.2f}")
            if time.perf_counter() - last_save > self.checkpoint_seconds:
                self.save()
                last_save = time.perf_counter()
                if not self.progress:  # no bar (e.g. stages side by side): one line per checkpoint instead
                    self.log(f"{self.name}: step {self.step}/{self.total}, {self.seconds / self.step:.2f} s/step, "
                             f"loss {np.mean(losses[-50:]):.4f}")
        bar.close()
        self.save()
        return {"steps": self.step, "planned_steps": self.total,
                "stopped_by": "steps" if self.step >= self.total else "time cap",
                "train_seconds": round(self.seconds, 1),
                "final_loss": float(np.mean(losses[-100:])) if losses else None}
