"""``imprompt eval``: generate with every method on the same references and seeds, score, report.

Passes, each over every reference with ``samples`` generations per call:

* **image prompt** (paper Table 1): adapters and img2img get the reference with an empty text;
  text_only the reference's caption; unconditional nothing. CLIP-I against the reference, CLIP-T
  against the caption; in the toy world, each attribute read from the generation against the reference's.
* **image + text** (``multimodal``): every method but unconditional gets the reference's multimodal
  text (toy world: a text that changes one attribute; folders: the caption). CLIP-T against that text;
  in the toy world, whether the changed attribute follows the text and the others the reference.
* **scale sweep**: each ip_adapter method, image + text, at every scale of ``scales``.

Sample ``j`` of reference ``i`` uses seed ``seed + i * samples + j`` in every pass of every method.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..files import check_writable_folder
from ..generation.pipelines import load_pipeline, resolve_model
from ..generation.pipelines import pick_device, pick_dtype
from ..models.catalog import Catalog, resolve_name, roots_from
from ..generation.schedulers import make_scheduler
from . import metrics
from .config import EvalConfig, MethodSpec, with_toy_defaults
from .batched import Job, open_batched
from .methods import MethodModels, Sampling, load_method
from .references import Reference, load_references
from .scoring import ClipScorer, attribute_hits, edit_hits

@dataclass(frozen=True)
class Pass:
    key: str  # "image_prompt", "multimodal" or "sweep <scale>"
    multimodal: bool
    scale: float | None = None  # ip_adapter scale; None: the method's own
    same_as: str | None = None  # a pass with the very same prompts, scale and seeds: reuse its generations


@dataclass
class EvalResult:
    folder: Path
    results: dict
    # method -> pass key -> reference index -> images (only the references shown in the sheets)
    images: dict[str, dict[str, dict[int, list[Image.Image]]]] = field(default_factory=dict)


def plan(config: EvalConfig, spec: MethodSpec) -> list[Pass]:
    passes = [Pass("image_prompt", multimodal=False)]
    if config.multimodal and spec.kind != "unconditional":
        passes.append(Pass("multimodal", multimodal=True))
    if config.scale_sweep and spec.kind == "ip_adapter":
        for scale in config.scales:
            same = "multimodal" if config.multimodal and float(scale) == spec.ip_scale else None
            passes.append(Pass(f"sweep {scale:g}", multimodal=True, scale=float(scale), same_as=same))
    return passes


def prompt_text(kind: str, reference: Reference, multimodal: bool) -> str:
    if multimodal:
        return reference.multimodal_text
    return reference.caption if kind == "text_only" else ""


def sample_seeds(config: EvalConfig, index: int) -> list[int]:
    return [config.seed + index * config.samples + j for j in range(config.samples)]


def _summary(s: metrics.Summary) -> dict:
    return {"mean": s.mean, "low": s.low, "high": s.high, "n": s.n}


def summarize_samples(records: list[dict]) -> dict:
    """Means and 95% intervals of one pass.

    CLIP scores: mean over references of each reference's mean over its samples, with the interval
    over references (samples of one reference are not independent). Accuracies: Wilson intervals
    over all generations.
    """
    out: dict = {}
    by_reference: dict[int, list[dict]] = {}
    for r in records:
        by_reference.setdefault(r["reference"], []).append(r)
    for metric in ("clip_i", "clip_t"):
        per_reference = [sum(r[metric] for r in rs) / len(rs) for rs in by_reference.values()]
        out[metric] = _summary(metrics.summarize(per_reference))
    for group in ("hits", "edit_hits"):
        if records and group in records[0]:
            out[group] = {name: _summary(metrics.proportion([r[group][name] for r in records])) for name in records[0][group]}
    return out


@dataclass
class Scores:
    """Scores generations against their reference; the references' embeddings are computed once."""

    scorer: ClipScorer
    references: list[Reference]
    reference_embeds: torch.Tensor  # (references, d)
    text_embeds: dict[bool, torch.Tensor]  # multimodal? -> (references, d): captions / multimodal texts
    clip_t_weight: float
    toy: bool

    @classmethod
    def for_references(cls, scorer: ClipScorer, references: list[Reference], clip_t_weight: float, toy: bool) -> "Scores":
        return cls(scorer, references, scorer.image_embeds([r.image for r in references]),
                   {False: scorer.text_embeds([r.caption for r in references]),
                    True: scorer.text_embeds([r.multimodal_text for r in references])}, clip_t_weight, toy)

    def score(self, index: int, generated: list[Image.Image], seeds: list[int], multimodal: bool) -> list[dict]:
        """One record per generation of reference ``index``: CLIP-I, CLIP-T and (toy world) attribute hits."""
        from ..toy.judge import read_many

        embeds = self.scorer.image_embeds(generated)
        clip_i = metrics.clip_i(embeds, self.reference_embeds[index].expand_as(embeds))
        clip_t = metrics.clip_t(embeds, self.text_embeds[multimodal][index].expand_as(embeds), self.clip_t_weight)
        reference = self.references[index]
        read = read_many(generated) if self.toy else None
        records = []
        for j, seed in enumerate(seeds):
            record = {"reference": index, "sample": j, "seed": seed, "clip_i": clip_i[j].item(), "clip_t": clip_t[j].item()}
            if self.toy:
                record["read"] = dataclasses.asdict(read[j])
                if multimodal:
                    edit = reference.edit
                    record["edit_hits"] = edit_hits(read[j], reference.attributes, edit.changed, edit.expected)
                else:
                    record["hits"] = attribute_hits(read[j], reference.attributes)
            records.append(record)
        return records


def save_images(folder: Path, name: str, images: list[Image.Image]) -> None:
    from .report import write_png

    for j, image in enumerate(images):
        write_png(image, folder / f"{name}-{j}.png")


def resolve_names(config: EvalConfig, catalog: Catalog | None) -> EvalConfig:
    """``config`` with the model and the methods' adapter / image_encoder names looked up in the catalog."""
    if catalog is None:
        return config
    methods = [dataclasses.replace(m, adapter=resolve_name(m.adapter, "adapter", catalog) if m.adapter else m.adapter,
                                   image_encoder=resolve_name(m.image_encoder, "image_encoder", catalog)
                                   if m.image_encoder else m.image_encoder) for m in config.methods]
    model = resolve_name(config.model, "checkpoint", catalog) if config.model else config.model
    return dataclasses.replace(config, model=model, methods=methods)


def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> EvalResult:
    """Run the evaluation ``config`` describes and write its report folder; returns the results."""
    from tqdm.auto import tqdm

    from .report import write_report

    started = time.perf_counter()
    roots = roots_from(config.models_dir)
    catalog = Catalog.scan(roots) if roots else None
    config = with_toy_defaults(resolve_names(config, catalog))
    config.check()
    check_writable_folder(config.output_dir, "--output-dir")
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    toy = config.toy_split is not None
    # Small inputs first, so a bad path fails before the big model loads.
    references = load_references(config.data, config.references)
    loaded: list[MethodModels] = [load_method(m, config.model, dtype, device, catalog) for m in config.methods]
    scorer = ClipScorer.from_pretrained(resolve_model(config.clip_model, "scoring CLIP"), device, dtype)
    pipe = load_pipeline(config.model, "text2img", dtype=dtype, device=device, model_config=config.model_config)
    if config.scheduler:
        pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler.config)
    img2img_pipe = None
    if any(m.kind == "img2img" for m in config.methods):
        from ..generation.pipelines import pipeline_class

        # from_pipe shares the components: no second copy of the model.
        img2img_pipe = pipeline_class(type(pipe).__name__, "img2img").from_pipe(pipe)
        img2img_pipe.set_progress_bar_config(disable=True)
    sampling = Sampling(config.steps, config.guidance, pipe.unet.config.sample_size * pipe.vae_scale_factor)

    scores = Scores.for_references(scorer, references, config.clip_t_weight, toy)
    load_seconds = time.perf_counter() - started

    out = Path(config.output_dir)
    keep = min(config.sheet_references, len(references))
    plans = {m.spec.name: plan(config, m.spec) for m in loaded}
    calls = sum(1 for p in plans.values() for step in p if step.same_as is None) * len(references)
    per_call = max(1, config.batch_images // config.samples)  # references per pipeline call
    bar = tqdm(total=calls, desc="eval", unit="reference",
               disable=not config.progress)
    methods: dict[str, dict] = {}
    images: dict[str, dict[str, dict[int, list[Image.Image]]]] = {}
    for models in loaded:
        spec = models.spec
        entry = {"kind": spec.kind, "description": spec.describe(), **dataclasses.asdict(spec),
                 "adapter_file": str(models.adapter_file) if models.adapter_file else None,
                 "image_encoder_dir": str(models.encoder_dir) if models.encoder_dir else None, "passes": {}}
        images[spec.name] = {}
        with open_batched(models, pipe, img2img_pipe, sampling, batched=per_call > 1) as sampler:
            for step in plans[spec.name]:
                if step.same_as is not None:
                    entry["passes"][step.key] = {**entry["passes"][step.same_as], "same_as": step.same_as,
                                                 "seconds": 0.0, "images_per_second": None}
                    images[spec.name][step.key] = images[spec.name][step.same_as]
                    continue
                bar.set_description(f"{spec.name}: {step.key}")
                pass_started = time.perf_counter()
                records, kept = [], {}
                for first in range(0, len(references), per_call):
                    chunk = range(first, min(first + per_call, len(references)))
                    jobs = [Job(references[i].image, prompt_text(spec.kind, references[i], step.multimodal),
                                sample_seeds(config, i)) for i in chunk]
                    for i, job, generated in zip(chunk, jobs, sampler(jobs, step.scale)):
                        records += scores.score(i, generated, list(job.seeds), step.multimodal)
                        if i < keep:
                            kept[i] = generated
                        if config.save_images:
                            save_images(out / "images" / spec.name / step.key.replace(" ", "-"), references[i].name,
                                        generated)
                        bar.update(1)
                seconds = time.perf_counter() - pass_started
                entry["passes"][step.key] = {"scale": step.scale if step.scale is not None else (
                    spec.ip_scale if spec.kind == "ip_adapter" else None), "multimodal": step.multimodal,
                    "seconds": round(seconds, 3), "images_per_second": round(len(records) / seconds, 3) if seconds else None,
                    "summary": summarize_samples(records), "samples": records}
                images[spec.name][step.key] = kept
        methods[spec.name] = entry
    bar.close()

    results = {
        "settings": {**config.to_dict(), "toy_world": toy, "output_size": sampling.size,
                     "seed_rule": "sample j of reference i: seed + i * samples + j, the same in every method and pass",
                     "clip_t": f"{config.clip_t_weight:g} * max(cos(image, text), 0)"
                               + (" (plain cosine, as the paper's CLIP-T)" if config.clip_t_weight == 1 else "")},
        "references": [r.to_dict() for r in references],
        "methods": methods,
        "timing": {"load_seconds": round(load_seconds, 3)},
    }
    result = EvalResult(out, results, images)
    results["timing"]["wall_seconds"] = round(time.perf_counter() - started, 3)  # before writing the report
    write_report(result, references)
    log(f"wrote {out / 'report.md'} ({results['timing']['wall_seconds']:.1f} s)")
    return result
