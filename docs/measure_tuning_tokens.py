"""Tuning the features (what imprompt tune does) against tuning the image tokens; docs/tuning.md's table.

    PYTHONPATH=src python docs/measure_tuning_tokens.py FOLDER N MODE[,MODE...] [--image-encoder DIR] [--threads T]

MODE is ``none`` (the encoder's features), ``features`` or ``tokens``. Both tuned modes run the same
loop (TuneOptions defaults: 15 steps, lr and regulariser in units of the tuned numbers), the tokens
mode on the (1, 4, dim) tokens the adapter's projection makes of the features, E4T's predicted word
embedding's analogue. Every mode then generates the same way, straight through the pipeline with the
image keys/values of (unconditional, conditional) tokens: seed i, 20 steps, guidance 3, scale 1, no text.
One JSON line per mode with the toy reader's accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("modes")
    parser.add_argument("--image-encoder", default=None)
    parser.add_argument("--threads", type=int, default=1)
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
                with torch.no_grad():
                    kv = attachment.layer_kv(0, torch.cat([unconditional, tokens]), scale=1.0, layer_scales=ALL)
                    out = pipe(prompt="", num_inference_steps=20, guidance_scale=3.0, output_type="np",
                               generator=torch.Generator().manual_seed(i),
                               cross_attention_kwargs=attachment.prompt_call([kv]).cross_attention_kwargs()).images[0]
                images.append((out * 255).round().clip(0, 255).astype(np.uint8))
            scores = accuracy(read_many(images), truth)
            print(json.dumps({"folder": args.folder.name, "n": len(refs), "mode": mode,
                              "seconds_per_reference": round((time.perf_counter() - started) / len(refs), 2),
                              **{k: round(v, 3) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
