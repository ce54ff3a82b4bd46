"""Batched generation: several prompts, each with its own text, image prompts and seeds, in one pipeline call.

A single call runs the UNet over ``2 * images`` rows per step (with guidance). On a small model on a
CPU the cost of a UNet call is mostly per-call overhead (the toy UNet: 12 ms per row at 4 rows, 5 ms
per row from about 40 rows), so an evaluation that makes hundreds of 2-image calls spends most of its
time there. :func:`generate_batch` gives the UNet all rows of many prompts at once.

Every row is laid out as diffusers lays out classifier-free guidance, item after item::

    [uncond rows of item 0, uncond rows of item 1, ..., cond rows of item 0, cond rows of item 1, ...]

with one row per seed. Everything per item is computed exactly as a single :func:`imprompt.generate`
call computes it, from the same functions: the text embeddings (A1111 syntax,
:class:`~imprompt.generation.text_encoding.TextSchedule`), the image prompts' per-layer keys and values
(:func:`~imprompt.generation.prompts.prepare_image_prompt`, for the item's own row count, then stacked
in the order above by :func:`stack_image_kv`), and each row's initial noise (its own
``torch.Generator("cpu")``, as diffusers draws a list of generators row by row). The scheduler step is
elementwise. What differs is only the batch size the UNet and VAE run at, and on the CPU oneDNN picks
convolution algorithms by batch size, as the small matrix products and some group norms do (measured
with torch 2.13: the toy UNet's outputs for the same rows agree bit for bit among batches of 4 to 12
rows and among batches of 16 rows or more, but differ by about 1e-6 between the two groups). So a batched image equals its single-call twin to float rounding,
and its uint8 pixels agree except where a value sits at a rounding boundary; ``tests/test_batched.py``
states what it asserts.

Not batched here (use :func:`imprompt.generate` per prompt): init / mask / control images,
Reference-only, LoRA tags, and prompt editing (text that changes during the run).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from PIL import Image

from ..adapter.attach import Attachment
from ..adapter.attention import ImageKV
from ..encoding import ImageEncoder
from . import image_guidance
from .generate import call_pipeline, latent_size, uses_guidance
from .networks import prompt_tags
from .prompts import BatchLayout, ImagePrompt, prepare_image_prompt
from .settings import MAX_SEED, GenerationSettings
from .text_encoding import EmbeddingLibrary, TextSchedule, towers


@dataclass
class BatchItem:
    """One prompt of a batched generation: one image per seed, all with this text and these image prompts."""

    seeds: Sequence[int]
    prompt: str = ""
    negative_prompt: str = ""
    image_prompts: Sequence[ImagePrompt] = field(default_factory=tuple)

    def check(self, where: str) -> None:
        if not self.seeds:
            raise ValueError(f"{where}: give at least one seed (one image per seed)")
        for seed in self.seeds:
            if not 0 <= int(seed) <= MAX_SEED:
                raise ValueError(f"{where}: seed must be 0 to 2**64-1, got {seed}")
        if prompt_tags(self.prompt, self.negative_prompt):
            raise ValueError(f"{where}: LoRA tags in the prompt are not supported in a batch; generate this "
                             "prompt alone (imprompt.generate)")


def stack_image_kv(per_item: Sequence[Mapping[str, ImageKV]], rows: Sequence[int], guidance: bool) -> dict[str, ImageKV]:
    """One image prompt's per-layer keys and values for a whole batch, from each item's own.

    ``per_item[i]`` was prepared for item ``i`` alone with ``rows[i]`` images: its keys are
    ``[uncond x rows[i], cond x rows[i]]`` (guidance) or ``[cond x rows[i]]``. The result is laid out
    ``[uncond of every item..., cond of every item...]``, diffusers' order for a list of prompts. Scale,
    step window and region masks are per image prompt, not per row, so they must agree across items.
    """
    if len(per_item) != len(rows):
        raise ValueError(f"{len(per_item)} prepared image prompts for {len(rows)} items")
    layers = list(per_item[0])
    out: dict[str, ImageKV] = {}
    for i, prepared in enumerate(per_item):
        if list(prepared) != layers:
            raise ValueError(f"item {i}'s image prompt acts in other layers than item 0's (a different weight type "
                             "or layer weights); such prompts cannot share a batch")
    for layer in layers:
        kvs = [prepared[layer] for prepared in per_item]
        first = kvs[0]
        for i, kv in enumerate(kvs[1:], start=1):
            if kv.scale != first.scale or kv.window != first.window:
                raise ValueError(f"{layer}: item {i}'s image prompt has scale {kv.scale} and window {kv.window}, item "
                                 f"0's {first.scale} and {first.window}; one batch takes one scale and window")
            if kv.key.shape[1:] != first.key.shape[1:]:
                raise ValueError(f"{layer}: item {i} has {kv.key.shape[2]} image tokens, item 0 {first.key.shape[2]}; "
                                 "one batch needs the same number of reference images and the same adapter")
            if (kv.masks is None) != (first.masks is None) or (kv.masks is not None and (
                    kv.masks.keys() != first.masks.keys()
                    or any(not torch.equal(kv.masks[n], first.masks[n]) for n in kv.masks))):
                raise ValueError(f"{layer}: item {i}'s region mask differs from item 0's; one batch takes one mask")

        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
            for t, n in zip(tensors, rows):
                if t.shape[0] != (2 * n if guidance else n):
                    raise ValueError(f"{layer}: keys for {t.shape[0]} rows, expected {2 * n if guidance else n}")
            if not guidance:
                return torch.cat(tensors)
            return torch.cat([t[:n] for t, n in zip(tensors, rows)] + [t[n:] for t, n in zip(tensors, rows)])

        out[layer] = ImageKV(stacked([kv.key for kv in kvs]), stacked([kv.value for kv in kvs]), first.scale,
                             first.window, first.masks)
    return out


def _text_arguments(pipe, items: Sequence[BatchItem], steps: int,
                    embeddings: EmbeddingLibrary | None = None) -> dict[str, torch.Tensor] | None:
    """prompt_embeds (and negative, pooled) for every row, each item's encoded on its own as a single call
    would, repeated once per seed; None where the pipeline has no text tower imprompt encodes for."""
    if not towers(pipe):
        return None
    per_item = []
    for i, item in enumerate(items):
        text = TextSchedule.build(pipe, item.prompt, item.negative_prompt, steps, embeddings)
        if text.changes:
            raise ValueError(f"item {i}: prompt editing / alternation changes the text during the run, which a "
                             "batch cannot follow per row; generate this prompt alone (imprompt.generate)")
        per_item.append(text.call_arguments())
    out = {}
    for name in per_item[0]:
        shapes = {tuple(args[name].shape[1:]) for args in per_item}
        if len(shapes) > 1:
            raise ValueError(f"the prompts encode to different lengths ({sorted(shapes)}: prompts longer than one "
                             "75-token chunk, or BREAK); batch prompts of the same length together")
        out[name] = torch.cat([args[name].repeat(len(item.seeds), *[1] * (args[name].ndim - 1))
                               for args, item in zip(per_item, items)])
    return out


def generate_batch(pipe, attachment: Attachment | None, settings: GenerationSettings, items: Sequence[BatchItem],
                   encoders: Sequence[ImageEncoder] = (), *, output_type: str = "pil",
                   embeddings: EmbeddingLibrary | None = None) -> list[list[Image.Image]]:
    """Generate every item's images in one pipeline call; returns one list of images per item.

    ``settings`` gives what all items share (steps, guidance, size, scheduler); its prompt, seed and
    num_images are the items' own here and must be left at their defaults. Item ``i`` image ``j``
    comes from ``torch.Generator("cpu").manual_seed(items[i].seeds[j])``, as
    ``imprompt.generate(..., extra={"generator": [...]})`` with one generator per image gives it.
    ``embeddings``: the textual-inversion embeddings the prompts may name (``Networks.embeddings``).
    """
    settings.check()
    if not items:
        raise ValueError("a batch needs at least one item")
    if settings.prompt or settings.negative_prompt or settings.seed is not None or settings.num_images != 1:
        raise ValueError("generate_batch: prompts and seeds are per item (BatchItem); leave settings.prompt, "
                         "negative_prompt, seed and num_images at their defaults")
    if "generator" in settings.extra:
        raise ValueError("generate_batch: the generators come from the items' seeds; do not pass settings.extra['generator']")
    params = inspect.signature(pipe.__call__).parameters
    if "strength" in params or getattr(pipe, "controlnet", None) is not None:
        raise ValueError(f"generate_batch runs text-to-image pipelines without ControlNet; {type(pipe).__name__} "
                         "needs per-call images, use imprompt.generate")
    for i, item in enumerate(items):
        item.check(f"item {i}")
    counts = {len(item.image_prompts) for item in items}
    if len(counts) > 1:
        raise ValueError(f"every item needs the same number of image prompts (found {sorted(counts)})")
    if counts != {0}:
        if attachment is None:
            raise ValueError("image prompts need adapters attached to the pipeline's UNet (imprompt.attach)")
        if attachment.unet is not pipe.unet:
            raise ValueError("the adapters are attached to a different UNet than this pipeline's")
        if len(encoders) != len(attachment.adapters):
            raise ValueError(f"give one image encoder per attached adapter: {len(attachment.adapters)} adapters, "
                             f"{len(encoders)} encoders")

    guidance = uses_guidance(pipe, settings.guidance)
    rows = [len(item.seeds) for item in items]
    size = latent_size(pipe, settings, None)
    prepared: list[dict[str, ImageKV]] = []
    for p in range(counts.pop()):
        # Each item's prompt prepared for its own rows (the very tensors a single call makes), then stacked.
        per_item = [prepare_image_prompt(item.image_prompts[p], attachment, encoders[item.image_prompts[p].adapter],
                                         BatchLayout(guidance, n), size, vae_scale_factor=pipe.vae_scale_factor)
                    for item, n in zip(items, rows)]
        groups = {len(entries) for entries in per_item}
        if len(groups) > 1:
            raise ValueError(f"image prompt {p}: the items have different numbers of masked regions")
        prepared += [stack_image_kv([entries[g] for entries in per_item], rows, guidance) for g in range(groups.pop())]

    kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, num_images_per_prompt=1,
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for item in items for s in item.seeds])
    if "height" in params:
        kwargs.update(height=settings.height, width=settings.width)
    text = _text_arguments(pipe, items, settings.steps, embeddings)
    if text is None:
        kwargs.update(prompt=[item.prompt for item in items for _ in item.seeds],
                      negative_prompt=[item.negative_prompt for item in items for _ in item.seeds])
    else:
        kwargs.update(text)
    kwargs.update(settings.extra)
    state = attachment.prompt_call(prepared, num_steps=settings.steps) if prepared else None

    def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
        state.step, state.num_steps = step + 1, pipeline.num_timesteps
        return tensors

    if state is not None:
        kwargs["cross_attention_kwargs"] = state.cross_attention_kwargs(kwargs.get("cross_attention_kwargs"))
        kwargs["callback_on_step_end"] = on_step_end
    view = call_pipeline(pipe, settings.scheduler)
    if image_guidance.check(settings.image_guidance, guidance=settings.guidance, uses_guidance=guidance,
                            has_image_prompts=bool(prepared)):
        image_guidance.apply(view, state, settings.image_guidance, settings.guidance)
    images = view(**kwargs, output_type=output_type).images
    out, start = [], 0
    for n in rows:
        out.append(list(images[start:start + n]))
        start += n
    return out

