"""Batch workflows (ComfyUI-style, run unattended): references x prompts x scales x control images x seeds,
from one YAML file, resumable, and split across processes / GPUs with accelerate.

A workflow is a YAML file of :class:`BatchConfig` fields: every ``imprompt generate`` option (model,
adapter, steps, ...) for what stays fixed, plus the lists the jobs are the product of. ``references`` and
``control_images`` entries may be folders (their images, sorted by name). Each job writes one PNG named by
``name`` (``{reference}``, ``{prompt}`` (index), ``{scale}``, ``{control}``, ``{seed}``) atomically, so a file
that exists is finished: a killed run started again skips what is there and does the rest. Under
``accelerate launch`` the job list is split by ``PartialState.split_between_processes``; every job has
its own seed and name, so the files are the same whatever the split.

``jobs_per_call`` > 1 runs consecutive jobs that share their scale and control image (in the job order,
the seeds of one reference and prompt, then the next) in one pipeline call
(:mod:`imprompt.generation.batched`), for text-to-image without ControlNet, init image, Reference-only
or LoRA tags (other jobs run alone). Their images equal one-job calls to float rounding, not bit for bit:
the UNet's kernels pick algorithms by batch size.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..adapter.attach import attach
from ..config import option
from ..files import atomic_write
from .cache import CachedLoader, EmbeddingCache, ModelCache
from .controls import split_target
from .pnginfo import save_png
from .outputs import infotext
from .loading import load_models
from .request import GenerateRequest, prepare, read_inputs, render

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_NAME = "{reference}-p{prompt}-s{scale}-c{control}-{seed}"


@dataclass
class BatchConfig(GenerateRequest):
    references: list[str] = field(default_factory=list, metadata=option(
        "reference images or folders of them (one job per image)", metavar="PATH"))
    prompts: list[str] = field(default_factory=list, metadata=option("prompts (default: --prompt)"))
    scales: list[float] = field(default_factory=list, metadata=option("image prompt scales (default: --scale)"))
    control_images: list[str] = field(default_factory=list, metadata=option(
        "ControlNet images or folders (with --controlnet; ControlNet 0's when there are several, the others "
        "keep their --control-image N=PATH)", metavar="PATH"))
    seeds: list[int] = field(default_factory=list, metadata=option("seeds (default: --seed, else 0)"))
    name: str = field(default=DEFAULT_NAME, metadata=option(
        "file name pattern: {reference} {prompt} {scale} {control} {seed}"))
    progress: bool = field(default=True, metadata=option("show a progress bar"))
    jobs_per_call: int = field(default=1, metadata=option(
        "jobs per pipeline call: consecutive jobs with the same scale and control image share one UNet batch "
        "(text-to-image only; images equal one-job runs to float rounding, not bit for bit)"))


@dataclass(frozen=True)
class BatchJob:
    reference: Path | None
    prompt_index: int
    prompt: str
    scale: float | None
    control: Path | None
    seed: int
    file_name: str


def _images(entries: list[str], what: str) -> list[Path]:
    found: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not inside:
                raise ValueError(f"{what} folder {entry!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{what} {entry!r} does not exist")
    return found


def batch_jobs(config: BatchConfig) -> list[BatchJob]:
    """Every job of the workflow, in a fixed order (the same in every process)."""
    references = _images(config.references, "reference") or [None]
    controls = _images(config.control_images, "control image") or [None]
    prompts = config.prompts or [config.prompt]
    scales = config.scales or [None]
    seeds = config.seeds or [config.seed if config.seed is not None else 0]
    jobs, names = [], {}
    for ref, (p, prompt), scale, control, seed in itertools.product(references, enumerate(prompts), scales, controls, seeds):
        values = {"reference": ref.stem if ref else "none", "prompt": p, "scale": f"{scale:g}" if scale is not None else "d",
                  "control": control.stem if control else "none", "seed": seed}
        try:
            stem = config.name.format(**values)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"name pattern {config.name!r}: {err}; use {{reference}} {{prompt}} {{scale}} "
                             "{control} {seed}") from None
        stem = re.sub(r"[^\w.+-]+", "_", stem)
        job = BatchJob(ref, p, prompt, scale, control, seed, f"{stem}.png")
        if job.file_name in names:
            raise ValueError(f"name pattern {config.name!r} gives {job.file_name} to two jobs; add the fields that "
                             "differ between them")
        names[job.file_name] = job
        jobs.append(job)
    return jobs


def job_request(base: GenerateRequest, job: BatchJob) -> GenerateRequest:
    changes: dict = {"prompt": job.prompt, "seed": job.seed, "num_images": 1, "batch_size": 1}
    if job.reference is not None:
        changes["image"] = [str(job.reference)]
    if job.scale is not None:
        changes["scale"] = [f"{job.scale!r}"]
    if job.control is not None:
        # The batch's control images are ControlNet 0's; other ControlNets keep the images given for them
        # as N=PATH (a plain --control-image would be ControlNet 0's, which the job replaces).
        others = [v for v in base.control_image if split_target(v)[0] not in (None, 0)]
        changes["control_image"] = [f"0={job.control}", *others]
    return dataclasses.replace(base, **changes)


def call_groups(jobs: list[BatchJob], size: int) -> list[list[BatchJob]]:
    """Consecutive jobs with the same scale and control image, at most ``size`` per group."""
    if size < 1:
        raise ValueError(f"jobs_per_call must be at least 1, got {size}")
    groups: list[list[BatchJob]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        if last and len(last) < size and (last[0].scale, last[0].control) == (job.scale, job.control):
            last.append(job)
        else:
            groups.append([job])
    return groups


@dataclass(frozen=True)
class Prepared:
    """One image's request, checked and with its inputs read, and its seed."""

    request: GenerateRequest
    options: list
    catalog: object
    inputs: object
    seed: int


PER_ROW_FIELDS = ("prompt", "negative_prompt", "seed", "image")  # what may differ between the rows of one call


def can_share_call(group: Sequence[Prepared], pipe) -> bool:
    """Whether these images can come from one pipeline call (:func:`render_together`): text-to-image
    without ControlNet, no init / mask / control image, Reference-only, step skipping (--accelerate) or LoRA
    tags, and requests that differ only in prompt, negative prompt, seed and reference images."""
    from .networks import prompt_tags

    def rest(request: GenerateRequest) -> GenerateRequest:
        return dataclasses.replace(request, **{name: getattr(GenerateRequest(), name) for name in PER_ROW_FIELDS})

    first = rest(group[0].request)
    return len(group) > 1 and getattr(pipe, "controlnet", None) is None and (
        "strength" not in inspect.signature(pipe.__call__).parameters) and all(
        p.inputs.init is None and p.inputs.mask is None and not p.inputs.controls and p.inputs.reference is None
        and p.request.accelerate is None and not prompt_tags(p.request.prompt, p.request.negative_prompt)
        and rest(p.request) == first for p in group)


def render_together(group: Sequence[Prepared], models) -> list[tuple["Image.Image", str]]:
    """One pipeline call for the group (see :func:`can_share_call`): each image with its PNG parameters."""
    from .batched import BatchItem, generate_batch

    items = [BatchItem([p.seed], p.request.prompt, p.request.negative_prompt, p.inputs.prompts) for p in group]
    settings = group[0].request.settings(prompt="", negative_prompt="", seed=None, num_images=1)
    pipe = models.pipe
    attachment = attach(pipe.unet, models.adapters) if models.adapters else None
    try:
        images = generate_batch(pipe, attachment, settings, items, models.encoders,
                                embeddings=models.networks.embeddings if models.networks is not None else None)
    finally:
        if attachment is not None:
            attachment.detach()
    return [(image, infotext(p.request, p.options, models, p.inputs)(p.seed, image)) for p, (image,) in zip(group, images)]


def render_group(group: Sequence[Prepared], loader: CachedLoader) -> list[tuple["Image.Image", str]]:
    """The group's images with their PNG parameters: in one call where they can share one, else one by one."""
    first = group[0]
    models = load_models(first.request, first.options, first.catalog, loader)
    if can_share_call(group, models.pipe):
        return render_together(group, models)
    out = []
    for p in group:
        models = load_models(p.request, p.options, p.catalog, loader)
        (item,) = next(iter(render(p.request, p.options, models, p.inputs, p.seed)))
        out.append((item.image, item.parameters))
    return out


def run_jobs(base: GenerateRequest, group: list[BatchJob], out: Path, loader: CachedLoader) -> int:
    """Generate and save a group of jobs, in one pipeline call where they can share one; returns the count."""
    prepared = []
    for job in group:
        request, options, catalog = prepare(job_request(base, job), lambda message: None)
        prepared.append(Prepared(request, options, catalog, read_inputs(request, options), job.seed))
    for job, (image, parameters) in zip(group, render_group(prepared, loader)):
        save_png(image, out / job.file_name, parameters)
    return len(group)


def run_batch(config: BatchConfig, log: Callable[[str], None] = print) -> dict:
    """Run this process's share of the jobs; returns (and writes) its summary."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    jobs = batch_jobs(config)
    # Without an accelerator, say so: that is what makes several launched processes gloo (multi-CPU) ranks.
    state = PartialState(cpu=not torch.accelerator.is_available())
    base = GenerateRequest(**{f.name: getattr(config, f.name) for f in dataclasses.fields(GenerateRequest)})
    if state.num_processes > 1:
        base = dataclasses.replace(base, device=str(state.device))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    loader = CachedLoader(ModelCache(32 * 2**30), EmbeddingCache(256))
    done = skipped = 0
    started = time.perf_counter()
    with state.split_between_processes(jobs) as mine:
        bar = tqdm(total=len(mine), desc=f"batch [{state.process_index}]" if state.num_processes > 1 else "batch",
                   disable=not config.progress)
        todo = []
        for job in mine:
            if (out / job.file_name).exists():  # written atomically: it exists only when finished
                skipped += 1
                bar.update(1)
            else:
                todo.append(job)
        for group in call_groups(todo, config.jobs_per_call):
            done += run_jobs(base, group, out, loader)
            bar.update(len(group))
        bar.close()
    summary = {"jobs": len(jobs), "process": state.process_index, "processes": state.num_processes,
               "generated": done, "skipped_existing": skipped, "seconds": round(time.perf_counter() - started, 2)}
    name = "summary.json" if state.num_processes == 1 else f"summary-{state.process_index}.json"
    with atomic_write(out / name, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log(f"batch: {done} generated, {skipped} already there, of {len(jobs)} jobs"
        + (f" (process {state.process_index} of {state.num_processes})" if state.num_processes > 1 else ""))
    return summary
