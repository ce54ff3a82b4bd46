"""Tuning the features (what imprompt tune does) against tuning the image tokens or low-rank offsets of
``to_k_ip`` / ``to_v_ip``; docs/tuning.md's table.

    PYTHONPATH=src python docs/measure_tuning_tokens.py FOLDER N MODE[,MODE...] [--image-encoder DIR] [--threads T]
        [--rank R] [--offset-lr LR] [--offset-regularise R]

MODE is ``none`` (the encoder's features), ``features``, ``tokens`` or ``offsets``. The tuned modes run the
same loop (TuneOptions defaults: 15 steps, batch 8, the same noise draws). ``tokens`` tunes the (1, 4, dim)
tokens the adapter's projection makes of the features, E4T's predicted word embedding's analogue, with
lr and regulariser in units of the tokens. ``offsets`` tunes E4T's weight offsets: W + rms(W) * B A on
every layer's ``to_k_ip`` and ``to_v_ip`` (rank ``--rank``, B from zero, A seeded), with the regulariser
``--offset-regularise`` * sum |rms(W) B A|^2 / |W|^2 in place of the features' distance. Every mode then
generates the same way, straight through the pipeline with the image keys/values of (unconditional,
conditional) tokens: seed i, 20 steps, guidance 3, scale 1, no text. One JSON line per mode with the toy
reader's accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from measure_tuning import setup  # this folder's script: the same models and references

from imprompt.adapter.attach import attach
from imprompt.adapter.layers import LayerScales
from imprompt.generation.embeds import encode_references
from imprompt.toy.judge import accuracy, read_many
from imprompt.training.recipe import diffusion_target, step_generator
from imprompt.training.tune import TuneOptions, conditions, distance, frozen, tune_features

ALL = LayerScales()


def token_loss(attachment, tokens, cond, generator, batch):
    """imprompt.training.tune.step_loss with the tokens given instead of the features."""
    latents = cond.latents[torch.arange(batch) % cond.latents.shape[0]]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, cond.scheduler.config.num_train_timesteps, (batch,), generator=generator)
    target = diffusion_target(cond.scheduler, latents, noise, t)
    kv = attachment.layer_kv(0, tokens.reshape(1, -1, tokens.shape[-1]), scale=1.0, layer_scales=ALL,
                             batch_repeat=batch)
    call = attachment.prompt_call([kv])
    pred = attachment.unet(cond.scheduler.add_noise(latents, noise, t), t, cond.text.expand(batch, -1, -1),
                           cross_attention_kwargs=call.cross_attention_kwargs()).sample
    return F.mse_loss(pred, target)


def tune_tokens(attachment, start, cond, options: TuneOptions):
    unit = start.pow(2).mean().sqrt()
    delta = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=options.lr)
    with frozen(attachment.unet, *attachment.adapters):
        for step in range(options.steps):
            tokens = start + unit * delta
            loss = token_loss(attachment, tokens, cond, step_generator(options.seed, step, 0), options.batch)
            opt.zero_grad(set_to_none=True)
            (loss + options.regularise * distance(tokens, start)).backward()
            opt.step()
    return (start + unit * delta).detach()


class LowRankOffset(torch.nn.Module):
    """A parametrisation of a Linear's weight: W + rms(W) * B @ A. A and B are plain tensors, not module
    parameters, so that ``frozen`` (which freezes the adapter's parameters) leaves them trainable."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.unit = weight.detach().pow(2).mean().sqrt().item()
        self.a = (torch.randn(rank, in_features, generator=generator) / in_features ** 0.5).requires_grad_()
        self.b = torch.zeros(out_features, rank, requires_grad=True)

    def delta(self) -> torch.Tensor:
        return self.unit * (self.b @ self.a)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


def tune_offsets(attachment, tokens, cond, options: TuneOptions, rank: int, lr: float, regularise: float):
    """Low-rank offsets of every layer's to_k_ip / to_v_ip tuned on the reference; they stay attached
    (as parametrisations) for the generation that follows; :func:`remove_offsets` takes them off."""
    adapter = attachment.adapters[0]
    generator = torch.Generator().manual_seed(options.seed)
    offsets = []
    for layer in attachment.layers:
        for linear in (adapter.layer(layer.index).to_k_ip, adapter.layer(layer.index).to_v_ip):
            offset = LowRankOffset(linear.weight, rank, generator)
            parametrize.register_parametrization(linear, "weight", offset)
            offsets.append((linear, offset))
    opt = torch.optim.Adam([t for _, o in offsets for t in (o.a, o.b)], lr=lr)
    with frozen(attachment.unet, *attachment.adapters):
        for step in range(options.steps):
            loss = token_loss(attachment, tokens, cond, step_generator(options.seed, step, 0), options.batch)
            penalty = sum(o.delta().pow(2).sum() / linear.parametrizations.weight.original.pow(2).sum()
                          for linear, o in offsets)
            opt.zero_grad(set_to_none=True)
            (loss + regularise * penalty).backward()
            opt.step()
    return offsets


def remove_offsets(offsets) -> None:
    for linear, _ in offsets:
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("modes")
    parser.add_argument("--image-encoder", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--offset-lr", type=float, default=0.01)
    parser.add_argument("--offset-regularise", type=float, default=0.03)
    args = parser.parse_args()
    pipe, adapter, encoder, refs, truth = setup(args)
    with attach(pipe.unet, adapter) as attachment:
        encoded = [encode_references([r], encoder, adapter.variant.encoder_output) for r in refs]
        for mode in args.modes.split(","):
            started, images = time.perf_counter(), []
            for i, (ref, features) in enumerate(zip(refs, encoded)):
                with torch.no_grad():
                    unconditional, tokens = (adapter.project(f) for f in (features.unconditional, features.conditional))
                if mode == "features":
                    tuned = tune_features(attachment, features, conditions(pipe, [ref]), TuneOptions()).features
                    with torch.no_grad():
                        tokens = adapter.project(tuned.conditional)
                elif mode == "tokens":
                    tokens = tune_tokens(attachment, tokens, conditions(pipe, [ref]), TuneOptions())
                offsets = []
                if mode == "offsets":
                    offsets = tune_offsets(attachment, tokens, conditions(pipe, [ref]), TuneOptions(), args.rank,
                                           args.offset_lr, args.offset_regularise)
                with torch.no_grad():
                    kv = attachment.layer_kv(0, torch.cat([unconditional, tokens]), scale=1.0, layer_scales=ALL)
                    out = pipe(prompt="", num_inference_steps=20, guidance_scale=3.0, output_type="np",
                               generator=torch.Generator().manual_seed(i),
                               cross_attention_kwargs=attachment.prompt_call([kv]).cross_attention_kwargs()).images[0]
                remove_offsets(offsets)
                images.append((out * 255).round().clip(0, 255).astype(np.uint8))
            scores = accuracy(read_many(images), truth)
            settings = {"rank": args.rank, "lr": args.offset_lr, "regularise": args.offset_regularise} \
                if mode == "offsets" else {}
            print(json.dumps({"folder": args.folder.name, "n": len(refs), "mode": mode, **settings,
                              "seconds_per_reference": round((time.perf_counter() - started) / len(refs), 2),
                              **{k: round(v, 3) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
