"""``imprompt toy build``: regenerate the toy world's models from a seed, in resumable stages.

Stages run in dependency order (:data:`DEPENDS`), each in its own folder of the work dir (default ``build/toy/``,
:mod:`imprompt.toy.workdir`); a finished stage writes ``<stage>/done.json`` (seconds, steps, scores)
and is skipped on the next run, and a training stage checkpoints every few minutes (atomically), so a
killed build resumes where it stopped::

    data       train / val / test / heldout folders (name.png + name.txt + metadata.jsonl) and .npy arrays
    tokenizer  CLIP BPE tokenizer of the caption words (imprompt.toy.tokenizer)
    clip       tiny CLIP, contrastive on (image, caption); zero-shot attribute accuracy on test
    robust_clip  its vision tower distilled onto loosened pictures (imprompt.toy.augment), text tower kept;
               zero-shot accuracy on pictures drawn by another rasteriser (imprompt.toy.drawn)
    vae        tiny AutoencoderKL; the attribute reader's accuracy on test reconstructions
    latents    VAE latents of the train images and text-encoder states of their captions, cached once
    unet       UNet, epsilon prediction, 10% caption dropout (classifier-free guidance), EMA weights
    pipeline   diffusers StableDiffusionPipeline folder + image_encoder/ (robust_clip's vision tower)
    adapter    linear IP-Adapter trained with imprompt.training on the train split with partial captions
               (shapes.partial_caption; resumable, checkpoints every 200 steps)
    simple_adapter  the simple adapter (paper 4.4.1, shared attention) on the same data and budget
    quality    the quality targets on the test split (imprompt.toy.quality)
    controlnet a ControlNet on the shapes' silhouettes, UNet frozen (imprompt.toy.controlnet); how well
               generations follow the control (imprompt.toy.control_quality)
    controlnet_compose  the ControlNet fine-tuned with the adapter in the loop (imprompt.toy.compose), so
               that its layout holds beside an image prompt of another shape; measured alone and beside it
    package    fp16 safetensors + tokenizer + configs + example references + MODEL_CARD.md -> toy/data/

With ``jobs`` > 1 (the default is 2, one per core of the development machine), stages that do not
depend on each other run side by side, each in its own process with ``threads`` torch threads: CLIP
beside the VAE, the simple adapter beside the adapter, then the ControlNet beside the rest of the adapter
and the quality stage. A stage that runs alone gets ``jobs * threads`` threads. Small models use one
core far better than two (a two-thread toy UNet step is not twice as fast), so two stages on one core
each beat the same stages one after the other with two threads each.

The stages live in :mod:`~imprompt.toy.stages` (base models), :mod:`~imprompt.toy.adapter_stages`,
:mod:`~imprompt.toy.controlnet`, :mod:`~imprompt.toy.compose` and :mod:`~imprompt.toy.package`; their settings are
:class:`~imprompt.toy.config.BuildConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import time
from typing import Callable

import torch

from . import adapter_stages, compose, controlnet, package, robust_clip, stages, workdir
from .config import STAGES, BuildConfig, StageSelection

RUNNERS: dict[str, Callable[[BuildConfig], dict]] = {
    "data": stages.stage_data, "tokenizer": stages.stage_tokenizer, "clip": stages.stage_clip,
    "robust_clip": robust_clip.stage_robust_clip, "vae": stages.stage_vae, "latents": stages.stage_latents,
    "unet": stages.stage_unet, "pipeline": stages.stage_pipeline, "adapter": adapter_stages.stage_adapter,
    "simple_adapter": adapter_stages.stage_simple_adapter, "quality": adapter_stages.stage_quality,
    "controlnet": controlnet.stage_controlnet, "controlnet_compose": compose.stage_controlnet_compose,
    "package": package.stage_package,
}
assert tuple(RUNNERS) == STAGES

# What each stage reads from earlier ones (the work folder's layout, imprompt.toy.workdir).
DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (), "tokenizer": ("data",), "clip": ("tokenizer",), "robust_clip": ("clip",), "vae": ("data",),
    "latents": ("clip", "vae"), "unet": ("latents",), "pipeline": ("unet", "robust_clip"), "adapter": ("pipeline",),
    "simple_adapter": ("pipeline",), "quality": ("adapter",), "controlnet": ("pipeline",),
    "controlnet_compose": ("controlnet", "adapter"), "package": ("quality", "simple_adapter", "controlnet_compose"),
}
assert tuple(DEPENDS) == STAGES and all(STAGES.index(d) < STAGES.index(s) for s in STAGES for d in DEPENDS[s])


def _run_stage(cfg: BuildConfig, stage: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    (cfg.work / stage).mkdir(parents=True, exist_ok=True)
    stages.log(f"{stage}: starting ({threads} thread{'s' if threads > 1 else ''})")
    started = time.perf_counter()
    info = RUNNERS[stage](cfg)
    info.setdefault("wall_seconds_last_run", round(time.perf_counter() - started, 1))
    info["threads"] = threads
    workdir.mark_done(cfg.work, stage, info)
    stages.log(f"{stage}: done {json.dumps(info, default=str)[:600]}")
    return info


def schedule(waiting: list[str], running: set[str], finished: set[str], jobs: int,
             threads: int) -> list[tuple[str, int]]:
    """The stages to start now, with their thread counts: those of ``waiting`` whose dependencies are
    ``finished`` (or not part of this build: not waiting and not running), in stage order, up to
    ``jobs`` running at once. One that starts alone (nothing running, nothing else ready) gets every
    thread of the build, ``jobs * threads``."""
    unfinished = set(waiting) | running
    ready = [s for s in STAGES if s in waiting and all(d in finished or d not in unfinished for d in DEPENDS[s])]
    starting = ready[: max(0, jobs - len(running))]
    alone = not running and len(ready) == 1
    return [(s, threads * jobs if alone else threads) for s in starting]


def run(cfg: BuildConfig, selection: StageSelection | None = None) -> dict[str, dict]:
    """Run the selected stages (default: all), finished ones skipped unless ``selection.force``; with
    ``cfg.jobs`` > 1 independent stages run side by side in child processes. Returns what each
    recorded. A stage outside the selection counts as done (its stage code says what is missing)."""
    selection = selection or StageSelection()
    selected = selection.stages()
    results: dict[str, dict] = {}
    pending = []
    for stage in selected:
        done = workdir.done_info(cfg.work, stage)
        if done is not None and not selection.force:
            stages.log(f"{stage}: already done, skipping")
            results[stage] = done
        else:
            pending.append(stage)
    if cfg.jobs == 1 or len(pending) <= 1:  # in this process, one stage after the other
        for stage in pending:
            results[stage] = _run_stage(cfg, stage, cfg.threads * (cfg.jobs if len(pending) == 1 else 1))
        return {s: results[s] for s in selected}
    _run_side_by_side(cfg, pending, results)
    return {s: results[s] for s in selected}


def _run_side_by_side(cfg: BuildConfig, pending: list[str], results: dict[str, dict]) -> None:
    """Start every stage whose dependencies are done, up to ``cfg.jobs`` at once, each in a spawned
    process (torch's thread pools are per process, and a killed child loses nothing: its stage
    checkpoints and resumes). If one fails, the others are stopped and the build raises."""
    context = multiprocessing.get_context("spawn")
    # Progress bars of two processes would overwrite each other's lines; the stages still log.
    child_cfg = dataclasses.replace(cfg, progress=False)
    running: dict[str, multiprocessing.process.BaseProcess] = {}
    waiting = list(pending)
    while waiting or running:
        for stage, threads in schedule(waiting, set(running), set(results), cfg.jobs, cfg.threads):
            process = context.Process(target=_run_stage, args=(child_cfg, stage, threads), name=f"toy-{stage}")
            process.start()
            running[stage] = process
            waiting.remove(stage)
        multiprocessing.connection.wait([p.sentinel for p in running.values()])  # until one ends
        for stage, process in list(running.items()):
            if process.is_alive():
                continue
            process.join()
            del running[stage]
            info = workdir.done_info(cfg.work, stage)
            if process.exitcode != 0 or info is None:
                for other in running.values():
                    other.terminate()
                for other in running.values():
                    other.join()
                raise RuntimeError(f"toy build: stage {stage!r} failed (exit code {process.exitcode}; its log is "
                                   f"above); finished stages are kept, run the build again to resume")
            results[stage] = info

