"""``imprompt toy build``: regenerate the toy world's models from a seed, in resumable stages.

Stages run in order, each in its own folder of the work dir (default ``build/toy/``,
:mod:`imprompt.toy.workdir`); a finished stage writes ``<stage>/done.json`` (seconds, steps, scores)
and is skipped on the next run, and a training stage checkpoints every few minutes (atomically), so a
killed build resumes where it stopped::

    data       train / val / test / heldout folders (name.png + name.txt + metadata.jsonl) and .npy arrays
    tokenizer  CLIP BPE tokenizer of the caption words (imprompt.toy.tokenizer)
    clip       tiny CLIP, contrastive on (image, caption); zero-shot attribute accuracy on test
    vae        tiny AutoencoderKL; the attribute reader's accuracy on test reconstructions
    latents    VAE latents of the train images and text-encoder states of their captions, cached once
    unet       UNet, epsilon prediction, 10% caption dropout (classifier-free guidance), EMA weights
    pipeline   diffusers StableDiffusionPipeline folder + image_encoder/ (the CLIP vision tower)
    adapter    linear IP-Adapter trained with imprompt.training on the train split with partial captions
               (shapes.partial_caption; resumable, checkpoints every 200 steps)
    simple_adapter  the simple adapter (paper 4.4.1, shared attention) on the same data and budget
    quality    the quality targets on the test split (imprompt.toy.quality)
    package    fp16 safetensors + tokenizer + configs + example references + MODEL_CARD.md -> toy/data/

The stages live in :mod:`~imprompt.toy.stages` (base models), :mod:`~imprompt.toy.adapter_stages` and
:mod:`~imprompt.toy.package`; their settings are :class:`~imprompt.toy.config.BuildConfig`.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch

from . import adapter_stages, package, stages, workdir
from .config import STAGES, BuildConfig, StageSelection

RUNNERS: dict[str, Callable[[BuildConfig], dict]] = {
    "data": stages.stage_data, "tokenizer": stages.stage_tokenizer, "clip": stages.stage_clip,
    "vae": stages.stage_vae, "latents": stages.stage_latents, "unet": stages.stage_unet,
    "pipeline": stages.stage_pipeline, "adapter": adapter_stages.stage_adapter,
    "simple_adapter": adapter_stages.stage_simple_adapter, "quality": adapter_stages.stage_quality,
    "package": package.stage_package,
}
assert tuple(RUNNERS) == STAGES


def run(cfg: BuildConfig, selection: StageSelection | None = None) -> dict[str, dict]:
    """Run the selected stages (default: all) in order, skipping finished ones unless
    ``selection.force``; returns what each recorded."""
    selection = selection or StageSelection()
    # One thread by default: on a shared 2-core machine, processes with two OpenMP threads each slow
    # each other down ~10x (measured: 0.65 s vs 17 s per UNet step).
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    results = {}
    for stage in selection.stages():
        done = workdir.done_info(cfg.work, stage)
        if done is not None and not selection.force:
            stages.log(f"{stage}: already done, skipping")
            results[stage] = done
            continue
        (cfg.work / stage).mkdir(parents=True, exist_ok=True)
        stages.log(f"{stage}: starting")
        started = time.perf_counter()
        info = RUNNERS[stage](cfg)
        info.setdefault("wall_seconds_last_run", round(time.perf_counter() - started, 1))
        workdir.mark_done(cfg.work, stage, info)
        stages.log(f"{stage}: done {json.dumps(info, default=str)[:600]}")
        results[stage] = info
    return results

