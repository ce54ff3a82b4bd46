"""The toy world's LoRA and textual-inversion embedding, built with imprompt's own code and measured.

* ``networks/toy-striped.safetensors``: the difference between the derivative model (``imprompt toy
  derive --style striped``: the UNet fine-tuned on striped pictures) and the base, extracted as a
  kohya LoRA (:mod:`imprompt.models.lora_extract`). ``<lora:toy-striped:W>`` moves the base toward
  the derivative by W.
* ``networks/tistripes.safetensors``: textual inversion (Gal et al. 2022): two new word vectors
  trained on the diffusion loss of striped train pictures whose captions name the style with the new
  word instead of "striped" (base model and text encoder frozen; only the vectors learn).

:func:`measure` reads generations with the attribute reader (the style rate: how many read as
striped) and writes ``docs/toy-extras.md``. ``imprompt toy extras`` runs all of it; seeded, so the
files and numbers come out the same.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import option
from ..files import write_bytes, write_text
from . import PACKAGE_DIR, models, shapes, toolbox, toy_paths
from .config import path_option
from .judge import read

MATRIX_GRID = "toy-matrix-grid.png"
NETWORKS = "networks"  # not "embeddings/": that name would make the package folder an A1111 tree when scanned
MEASURES = ("lora", "embedding", "merge", "matrix")
LORA_NAME = "toy-striped"
EMBEDDING_NAME = "tistripes"


@dataclass
class ExtrasConfig:
    derived: Path = field(default=Path("build/toy/derived-striped/pipeline"), metadata=path_option(
        "the derivative pipeline (imprompt toy derive --style striped)"))
    package: Path = field(default=PACKAGE_DIR, metadata=path_option("the toy package folder (written: networks/)"))
    skip_built: bool = field(default=True, metadata=option("keep a LoRA / embedding already in networks/"))
    rank: int = field(default=8, metadata=option("the LoRA's rank"))
    vectors: int = field(default=2, metadata=option("the embedding's vectors"))
    steps: int = field(default=150, metadata=option("textual-inversion steps"))
    batch: int = field(default=32, metadata=option("textual-inversion batch"))
    lr: float = field(default=5e-3, metadata=option("textual-inversion learning rate"))
    samples: int = field(default=64, metadata=option("generations per measured setting"))
    seed: int = field(default=0, metadata=option("seed"))
    threads: int = field(default=2, metadata=option("torch threads"))
    report: Path = field(default=Path("docs/toy-extras.md"), metadata=path_option("the measurements' page"))
    measure: str = field(default=",".join(MEASURES), metadata=option(
        f"what to measure, comma-separated ({', '.join(MEASURES)}); the others keep their numbers from the "
        "report's JSON"))


def build_lora(cfg: ExtrasConfig, log=print) -> Path:
    from ..models.lora_extract import ExtractConfig, extract_lora

    out = cfg.package / NETWORKS / f"{LORA_NAME}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    extract_lora(ExtractConfig(base=str(toy_paths(cfg.package)["model"]), tuned=str(cfg.derived), rank=cfg.rank,
                               output=str(out)), log=lambda m: log(f"[toy extras] {m}"))
    return out


def train_embedding(cfg: ExtrasConfig, log=print) -> Path:
    """Textual inversion on the toy model: captions of striped train pictures with "striped" replaced by
    the new name; the vectors start as the mean token embedding (no hint of the answer)."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save

    from ..generation.pipelines import load_pipeline
    from ..generation.prompt_syntax import build_chunks, parse_emphasis
    from .derivative import _encode
    from ..training.recipe import step_generator
    from .loop import diffusion_target, step_batch

    pipe = load_pipeline(toy_paths(cfg.package)["model"])
    samples = [s for s in shapes.sample("train", 8000, cfg.seed) if s.attributes.style == "striped"]
    latents, _, _ = _encode(pipe, samples)
    captions = [s.caption.replace("striped", EMBEDDING_NAME) for s in samples]
    table = pipe.text_encoder.get_input_embeddings()
    vectors = torch.nn.Parameter(table.weight.detach().float().mean(0, keepdim=True).repeat(cfg.vectors, 1).clone())
    # The prompt encoder's chunker places the vectors, so training and use agree on every position.
    tok = pipe.tokenizer
    name_ids = tok.convert_tokens_to_ids(tok.tokenize(EMBEDDING_NAME))

    def find(tokens, i):
        return (EMBEDDING_NAME, len(name_ids), cfg.vectors) if tokens[i:i + len(name_ids)] == name_ids else None

    def chunked(caption: str):
        return build_chunks(parse_emphasis(caption), lambda t: tok.convert_tokens_to_ids(tok.tokenize(t)),
                            start=tok.bos_token_id, end=tok.eos_token_id, comma=tok.get_vocab().get(",</w>"),
                            find_embedding=find, chunk_tokens=tok.model_max_length - 2)

    chunks = [chunked(c) for c in captions]
    if any(len(c) != 1 for c in chunks):
        raise ValueError("a toy caption with the embedding does not fit one chunk; use fewer vectors")
    ids = torch.tensor([c[0].tokens for c in chunks])
    where = [next(iter(c[0].embeddings)) for c in chunks]
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER_CONFIG)
    opt = torch.optim.AdamW([vectors], lr=cfg.lr, weight_decay=0.0)
    positions: list[int] = []

    def insert(module, inputs, output):
        output = output.clone()
        for row, p in enumerate(positions):
            output[row, p:p + cfg.vectors] = vectors.to(output)
        return output

    handle = table.register_forward_hook(insert)
    started, losses = time.perf_counter(), []
    try:
        for step in range(cfg.steps):
            idx = step_batch(len(latents), cfg.batch, cfg.seed, step)
            positions[:] = [where[i] for i in idx]
            generator = step_generator(cfg.seed, step, 0)
            batch = latents[idx].float()
            noise = torch.randn(batch.shape, generator=generator)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
            states = pipe.text_encoder(ids[idx]).last_hidden_state
            pred = pipe.unet(noise_scheduler.add_noise(batch, noise, timesteps), timesteps, states).sample
            loss = torch.nn.functional.mse_loss(pred.float(), diffusion_target(noise_scheduler, batch, noise, timesteps))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if step % 25 == 0 or step == cfg.steps - 1:
                log(f"[toy extras] embedding step {step + 1}/{cfg.steps}: loss {np.mean(losses[-25:]):.4f}")
    finally:
        handle.remove()
    out = cfg.package / NETWORKS / f"{EMBEDDING_NAME}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, save({"emb_params": vectors.detach().half().contiguous()},
                          metadata={"imprompt": f"textual inversion on the toy world, {cfg.steps} steps, "
                                                f"{time.perf_counter() - started:.0f} s"}))
    return out


def _rate(images, style: str = "striped") -> float:
    return float(np.mean([read(image).style == style for image in images]))


def measure(cfg: ExtrasConfig, log=print, parts: tuple[str, ...] = MEASURES) -> dict:
    """Style rates, each over ``samples`` seeded generations (20 steps):

    * ``lora``: LoRA at 0 / 0.5 / 1, unprompted (empty text, guidance 1) and with an image prompt of a solid
      reference (scale 0.5): how far the LoRA pulls toward stripes, with and against a reference; the
      derivative model itself, for comparison;
    * ``embedding``: prompt "tistripes shape" vs "shape" vs "striped shape" (guidance 3);
    * ``merge`` and ``matrix``: :mod:`imprompt.toy.toolbox`."""
    from ..adapter.attach import attach
    from ..adapter.checkpoint import load_adapter
    from ..encoding import ImageEncoder, load_image
    from ..generation.generate import generate
    from ..generation.networks import Networks
    from ..generation.pipelines import load_pipeline
    from ..generation.prompts import ImagePrompt
    from ..generation.settings import GenerationSettings
    from ..models.catalog import Catalog

    paths = toy_paths(cfg.package)
    pipe = load_pipeline(paths["model"])
    networks = Networks.from_catalog(Catalog.scan([cfg.package]))
    adapter = load_adapter(paths["adapter"], torch.float32)
    image_encoder = ImageEncoder.load(paths["image_encoder"], torch.float32)
    reference = load_image(paths["references"] / "solid-blue-diamond-on-red.png")
    n, rows = cfg.samples, {}

    def images(prompt: str, guidance: float, image_prompt: bool = False, model=pipe):
        settings = GenerationSettings(prompt=prompt, steps=20, guidance=guidance, num_images=n,
                                      extra={"generator": [torch.Generator().manual_seed(cfg.seed + i) for i in range(n)]})
        if not image_prompt:
            return generate(model, None, settings, networks=networks)
        attachment = attach(model.unet, [adapter])
        try:
            return generate(model, attachment, settings, [ImagePrompt([reference], scale=0.5)], [image_encoder],
                            networks=networks)
        finally:
            attachment.detach()

    result: dict = {"samples": n}
    if "lora" in parts:
        for weight in (0, 0.5, 1):
            tag = f"<lora:{LORA_NAME}:{weight:g}>"
            rows[f"LoRA {weight:g}"] = {"unprompted": _rate(images(tag, 1.0)),
                                        "solid reference, scale 0.5": _rate(images(tag, 1.0, image_prompt=True))}
            log(f"[toy extras] LoRA {weight:g}: {rows[f'LoRA {weight:g}']}")
        derived = load_pipeline(cfg.derived)
        rows["derivative model"] = {"unprompted": _rate(images("", 1.0, model=derived)),
                                    "solid reference, scale 0.5": _rate(images("", 1.0, True, model=derived))}
        result["lora"] = rows
    if "embedding" in parts:
        result["embedding"] = {prompt: _rate(images(prompt, 3.0))
                               for prompt in ("shape", f"{EMBEDDING_NAME} shape", "striped shape")}
        log(f"[toy extras] embedding: {result['embedding']}")
    if "merge" in parts:
        result["merge"] = toolbox.measure_merge(cfg.derived, cfg.package, _rate, images, log)
    if "matrix" in parts:
        with tempfile.TemporaryDirectory() as folder:
            result["matrix"] = toolbox.measure_matrix(cfg.package, n, cfg.seed, Path(folder), log)
            toolbox.copy_grid(Path(result["matrix"].pop("grid")), cfg.report.parent / MATRIX_GRID)
    return result


def write_report(cfg: ExtrasConfig, result: dict) -> None:
    n = result["samples"]
    lines = ["# The toolbox in the toy world: LoRA, embedding, merge, prompt matrix", "",
             f"Made and measured by `imprompt toy extras` (module `imprompt.toy.extras`); each rate is the share of "
             f"{n} seeded generations (20 steps) the attribute reader reads as striped (95% interval about "
             f"±{1.96 * (0.25 / n) ** 0.5:.0%} at 50%).", "",
             "## LoRA `toy-striped` (the derivative's difference, rank 8)", "",
             "| setting | unprompted (guidance 1) | solid reference, IP-Adapter scale 0.5 |", "|---|---|---|"]
    for name, row in result["lora"].items():
        lines.append(f"| {name} | {row['unprompted']:.0%} | {row['solid reference, scale 0.5']:.0%} |")
    lines += ["", f"## Embedding `{EMBEDDING_NAME}` (textual inversion, {cfg.vectors} vectors, {cfg.steps} steps)", "",
              "| prompt (guidance 3) | striped |", "|---|---|"]
    for prompt, rate in result["embedding"].items():
        lines.append(f"| `{prompt}` | {rate:.0%} |")
    lines += ["", "![LoRA weight 0 / 0.5 / 1 (columns) by seed (rows), prompt \"a circle\", guidance 1](toy-lora-grid.png)",
              "", f"`imprompt grid --prompt \"a circle\" --x lora:{LORA_NAME}=0,0.5,1 --y seed=1,2,3,4 --steps 20 "
              "--guidance 1`"]
    if "merge" in result:
        lines += toolbox.merge_lines(result["merge"], n)
    if "matrix" in result:
        lines += toolbox.matrix_lines(result["matrix"], n, MATRIX_GRID)
    lines += ["", "Raw numbers: `docs/toy-extras.json`.", ""]
    write_text(cfg.report, "\n".join(lines))
    write_text(cfg.report.with_suffix(".json"), json.dumps(result, indent=2))


def run(cfg: ExtrasConfig, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    for name, build in ((LORA_NAME, build_lora), (EMBEDDING_NAME, train_embedding)):
        if not (cfg.skip_built and (cfg.package / NETWORKS / f"{name}.safetensors").is_file()):
            build(cfg, log)
    parts = tuple(p.strip() for p in cfg.measure.split(",") if p.strip())
    unknown = sorted(set(parts) - set(MEASURES))
    if unknown:
        raise ValueError(f"--measure {cfg.measure!r}: unknown {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    earlier = cfg.report.with_suffix(".json")
    result = json.loads(earlier.read_text()) if earlier.is_file() else {}
    result.update(measure(cfg, log, parts))
    write_report(cfg, result)
    return result
