"""The toy build's last stage: the shipped package (``imprompt/toy/data``), in standard formats.

Layout (what :func:`imprompt.toy.toy_paths` names)::

    pipeline/                   StableDiffusionPipeline.from_pretrained folder (fp16 weights)
    image_encoder/              CLIPVisionModelWithProjection + CLIPImageProcessor, beside the adapters:
                                the official layout, where an adapter file finds its encoder next to it
    ip_adapter.safetensors      the linear IP-Adapter (official key format)
    controlnet/                 ControlNetModel.from_pretrained folder: the toy ControlNet (silhouette control,
                                fine-tuned beside the adapter: imprompt.toy.compose), fp8
    simple_adapter.safetensors  the simple adapter (paper 4.4.1), the evaluation's ablation
    clip/                       the scoring CLIP, sharing the pipeline's text tower and the image encoder
    references/                 example reference images and attributes.json
    build.json, MODEL_CARD.md   what every stage recorded; how the models were made and what they score
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from ..files import atomic_dir
from . import PACKAGE_DIR, models, workdir
from .card import model_card
from .config import STAGES, BuildConfig

REFERENCE_PICKS = 8  # example reference images shipped beside the models
MAX_BYTES = 25 * 2 ** 20  # the package ships inside the wheel


def _half_copy(component, folder: Path) -> None:
    """Save a diffusers/transformers model with fp16 weights (loaders cast back to the dtype asked for)."""
    component.to(torch.float16).save_pretrained(folder)
    component.to(torch.float32)


def save_controlnet(source: Path, folder: Path) -> None:
    """The toy ControlNet as a diffusers folder with float8 (e4m3fn) weights: 1.9 MB where fp16 takes 3.9 MB,
    which does not fit the package budget beside the rest. fp8 e4m3fn is how the field halves fp16 checkpoints
    (ComfyUI and diffusers read it and cast to the dtype asked for); ``ControlNetModel.from_pretrained`` loads
    it as fp32. Its 3 mantissa bits round each weight by up to 6%; docs/toy-controlnet.md measures the
    generations against the fp32 ControlNet's."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(source, dtype=torch.float32)
    net.register_to_config(_name_or_path="controlnet")  # not the work folder's absolute path
    net.to(torch.float8_e4m3fn).save_pretrained(folder)


def _pick_references(cfg: BuildConfig, folder: Path) -> list[dict]:
    """One test image per (shape, style), the last two from the held-out split; copied into ``folder``.
    Each image is copied from the split its metadata came from (an earlier version took the split from
    the pick's position and shipped two held-out images under test images' names)."""
    folder.mkdir()
    picked, seen = [], set()
    candidates = ([("test", item) for item in workdir.load_metadata(cfg.work, "test")],
                  [("heldout", item) for item in workdir.load_metadata(cfg.work, "heldout")])
    for wanted, pool in zip((REFERENCE_PICKS - 2, REFERENCE_PICKS), candidates):
        for split, (name, _, a) in pool:
            key = (a.shape, a.style)
            if key in seen or len(picked) >= wanted:
                continue
            source = cfg.work / "data" / split / name
            if not source.is_file():
                continue
            seen.add(key)
            target = f"{a.style}-{a.color}-{a.shape}-on-{a.background}.png"
            shutil.copy(source, folder / target)
            picked.append({"file": target, "split": split, **dataclasses.asdict(a)})
    (folder / "attributes.json").write_text(json.dumps(picked, indent=2, default=str))
    return picked


def stage_package(cfg: BuildConfig, dest: Path = PACKAGE_DIR) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from ..adapter.checkpoint import load_adapter, load_shared_adapter, save_adapter

    started = time.perf_counter()
    encoder_source = workdir.image_encoder(cfg.work)
    with atomic_dir(dest) as staging:  # the old package stays until the new one is complete
        pipe = StableDiffusionPipeline.from_pretrained(cfg.work / "pipeline", dtype=torch.float32)
        pipe.to(torch.float16).save_pretrained(staging / "pipeline")
        _half_copy(CLIPVisionModelWithProjection.from_pretrained(encoder_source), staging / "image_encoder")
        CLIPImageProcessor.from_pretrained(encoder_source).save_pretrained(staging / "image_encoder")
        save_adapter(load_adapter(workdir.adapter_file(cfg.work, "adapter"), dtype=torch.float16),
                     staging / "ip_adapter.safetensors")
        save_adapter(load_shared_adapter(workdir.adapter_file(cfg.work, "simple_adapter"), dtype=torch.float16),
                     staging / "simple_adapter.safetensors")
        save_controlnet(workdir.controlnet_folder(cfg.work, "controlnet_compose"), staging / "controlnet")
        # The scoring CLIP (imprompt eval's --clip-model) shares the pipeline's text tower and the image encoder.
        models.save_shared_tower_clip(CLIPModel.from_pretrained(cfg.work / "clip" / "model"), staging / "clip",
                                      dtype=torch.float16)
        CLIPTokenizer.from_pretrained(cfg.work / "pipeline" / "tokenizer").save_pretrained(staging / "clip")
        CLIPImageProcessor.from_pretrained(encoder_source).save_pretrained(staging / "clip")
        _pick_references(cfg, staging / "references")
        stages = {s: info for s in STAGES if (info := workdir.done_info(cfg.work, s)) is not None}
        (staging / "build.json").write_text(json.dumps(stages, indent=2))
        (staging / "MODEL_CARD.md").write_text(model_card(cfg, stages))
        sizes = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        total = sum(sizes.values())
        if total > MAX_BYTES:  # raised inside the block: the old package stays
            raise ValueError(f"packaged toy models are {total / 2 ** 20:.1f} MiB, over the {MAX_BYTES / 2 ** 20:.0f} MiB budget")
    return {"seconds": round(time.perf_counter() - started, 1), "total_bytes": total, "files": sizes}
