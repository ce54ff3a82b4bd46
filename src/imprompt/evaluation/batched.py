"""Methods that generate for several references in one pipeline call (:mod:`imprompt.generation.batched`).

The evaluation makes ``samples`` generations per reference; one reference per call keeps the UNet at
``2 * samples`` rows, where a small model on a CPU spends most of a call on overhead. Here a chunk of
references goes through one call: ``ip_adapter`` (without Reference-only), ``shared``, ``text_only``
and ``unconditional`` are batched; ``img2img`` and ``reference_only`` (per-call images) run the
references one by one through :func:`imprompt.evaluation.methods.open_method`'s sampler. Sample ``j``
of a reference still draws its noise from its own ``torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from ..adapter.attach import attach
from ..generation.batched import BatchItem, generate_batch
from ..generation.settings import GenerationSettings
from .methods import MethodModels, Sampling, generators, open_method, shared_prompt_embeds


@dataclass(frozen=True)
class Job:
    """One reference's generations: the reference, the text, one seed per sample."""

    reference: Image.Image
    text: str
    seeds: Sequence[int]


# (jobs, ip_adapter scale or None) -> per job, one image per seed
BatchSampler = Callable[[Sequence[Job], "float | None"], list[list[Image.Image]]]


def batchable(models: MethodModels) -> bool:
    """Whether the method's references can share a pipeline call (no per-call images)."""
    spec = models.spec
    return spec.kind in ("shared", "text_only", "unconditional") or (spec.kind == "ip_adapter" and spec.reference is None)


@contextmanager
def open_batched(models: MethodModels, pipe, img2img_pipe, sampling: Sampling,
                 batched: bool = True) -> Iterator[BatchSampler]:
    """A sampler for a chunk of references at once; an ip_adapter stays attached until the block ends.

    ``batched=False`` (or a method that cannot batch) runs the jobs one by one through the single-call
    sampler, exactly the unbatched path."""
    spec = models.spec
    if not batched or not batchable(models):
        with open_method(models, pipe, img2img_pipe, sampling) as one:
            yield lambda jobs, scale: [one(j.reference, j.text, j.seeds, scale) for j in jobs]
        return

    def settings(guidance: float | None = None, image_guidance: float | None = None) -> GenerationSettings:
        return GenerationSettings(steps=sampling.steps, guidance=sampling.guidance if guidance is None else guidance,
                                  image_guidance=image_guidance)

    if spec.kind == "ip_adapter":
        from ..generation.prompts import ImagePrompt

        with attach(pipe.unet, models.adapter) as attachment:
            def ip_adapter(jobs, scale):
                weight = spec.ip_scale if scale is None else scale
                items = [BatchItem(j.seeds, j.text,
                                   image_prompts=[ImagePrompt([j.reference], scale=weight, layers=spec.prompt_layers)])
                         for j in jobs]
                return generate_batch(pipe, attachment, settings(spec.guidance, spec.image_guidance), items,
                                      [models.encoder])
            yield ip_adapter
    elif spec.kind == "shared":
        def shared(jobs, scale):
            # Each reference's embeddings as the single-call path makes them, one row per seed.
            per_job = [shared_prompt_embeds(pipe, models.adapter, models.encoder, j.reference, j.text) for j in jobs]
            embeds = {name: torch.cat([e[name].repeat(len(j.seeds), *[1] * (e[name].ndim - 1))
                                       for e, j in zip(per_job, jobs)]) for name in per_job[0]}
            with torch.no_grad():
                images = pipe(**embeds, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                              num_images_per_prompt=1, generator=generators([s for j in jobs for s in j.seeds])).images
            return _split(images, jobs)
        yield shared
    elif spec.kind == "text_only":
        yield lambda jobs, scale: generate_batch(pipe, None, settings(), [BatchItem(j.seeds, j.text) for j in jobs])
    else:  # unconditional: guidance off, as open_method's (an empty prompt makes both branches equal)
        yield lambda jobs, scale: generate_batch(pipe, None, settings(1.0), [BatchItem(j.seeds) for j in jobs])


def _split(images: list[Image.Image], jobs: Sequence[Job]) -> list[list[Image.Image]]:
    out, start = [], 0
    for job in jobs:
        out.append(list(images[start:start + len(job.seeds)]))
        start += len(job.seeds)
    return out
