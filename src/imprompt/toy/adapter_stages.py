"""The toy build's adapter stages: the adapters' training list, the two adapters, their quality.

Both adapters are trained by :func:`imprompt.training.trainer.train`, the same code a user runs,
on the toy pipeline built by the earlier stages.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from ..files import atomic_dir
from . import augment, shapes, workdir
from .config import BuildConfig
from .stages import log


def adapter_data(cfg: BuildConfig) -> Path:
    """The adapters' training list: ``train.jsonl`` in a folder of the train images (hard-linked) and edits.

    * every train image with a partial caption (``shapes.partial_caption``);
    * for a share ``adapter_loosened_p`` of them, the image prompt is a loosened picture of the same
      attributes (:mod:`.augment`: off the grid, rescaled, other patterns, colours a little off, blur,
      JPEG) in ``loosened/``, while the target stays the image itself: so the adapter learns to draw the
      world's picture from a reference drawn elsewhere (issue 16; off by default, see the config);
    * for a share ``adapter_edit_p`` of them, an *edit* sample: the image with one content attribute
      changed (``shapes.edited``) as the target, the original as the image prompt (``reference_file``),
      and a partial caption of the target that always names the changed attribute. In plain training
      text and image always agree, so nothing teaches the adapter which wins when a user's text
      contradicts the reference ("green background" for a red one); these samples do.

    Written once, atomically; captions and edits come from their own seeded streams, so a rebuild gives
    the same folder.
    """
    folder = cfg.work / "adapter" / "data"
    if (folder / "train.jsonl").is_file():
        return folder / "train.jsonl"
    captions = random.Random(f"imprompt-toy/adapter-captions/{cfg.seed}")
    edits = random.Random(f"imprompt-toy/adapter-edits/{cfg.seed}")
    loosen = random.Random(f"imprompt-toy/adapter-loosened/{cfg.seed}")
    source = cfg.work / "data" / "train"
    with atomic_dir(folder) as staging:  # replaces a folder an interrupted run left without its list
        (staging / "edits").mkdir()
        (staging / "loosened").mkdir()
        items = []
        for file_name, _, attrs in shapes.read_metadata(source):
            try:
                os.link(source / file_name, staging / file_name)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source / file_name, staging / file_name)
            text = shapes.partial_caption(attrs, captions, cfg.adapter_caption_p)
            (staging / file_name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            item = {"image_file": file_name, "text": text}
            if loosen.random() < cfg.adapter_loosened_p:
                stream = random.Random(f"imprompt-toy/adapter-loosened/{cfg.seed}/{file_name}")
                picture = augment.augmented(attrs, stream)
                picture.save(staging / "loosened" / file_name)
                item["reference_file"] = f"loosened/{file_name}"
            items.append(item)
            if edits.random() < cfg.adapter_edit_p:
                changed, target = shapes.edited(attrs, edits)
                shapes.render(target).save(staging / "edits" / file_name)
                items.append({"image_file": f"edits/{file_name}", "reference_file": file_name, "changed": changed,
                              "text": shapes.partial_caption(target, edits, cfg.adapter_caption_p, always=(changed,))})
        (staging / "train.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return folder / "train.jsonl"


def train_adapter(cfg: BuildConfig, stage: str, variant: str) -> dict:
    """Train an adapter of ``variant`` with imprompt.training into ``<stage>/run`` (resumable, every 200 steps)."""
    from ..training.config import TrainConfig
    from ..training.trainer import train

    config = TrainConfig(model=str(cfg.work / "pipeline"), image_encoder=str(workdir.image_encoder(cfg.work)),
                         data=str(adapter_data(cfg)), output_dir=str(cfg.work / stage / "run"), variant=variant,
                         resolution=shapes.IMAGE_SIZE, batch_size=64, max_steps=cfg.adapter_steps,
                         learning_rate=cfg.adapter_lr, checkpoint_every=200, resume="latest", seed=cfg.seed,
                         progress=cfg.progress, cpu=True)
    started = time.perf_counter()
    result = train(config, log_fn=lambda m: log(f"{stage}: {m}"))
    return {"steps": result.steps, "seconds_this_run": round(time.perf_counter() - started, 1),
            "train_seconds_this_run": round(result.seconds, 1), "final_loss": result.losses[-1] if result.losses else None,
            "adapter_file": str(result.adapter_file)}


def stage_adapter(cfg: BuildConfig) -> dict:
    """The linear IP-Adapter (the paper's base variant) on the train split with partial captions."""
    return train_adapter(cfg, "adapter", "linear")


def stage_simple_adapter(cfg: BuildConfig) -> dict:
    """The simple adapter of paper section 4.4.1 (image tokens appended to the text tokens, no new
    attention weights) with the decoupled adapter's data, steps, batch, learning rate and seed: the
    evaluation's ablation (docs/toy-results.md)."""
    return train_adapter(cfg, "simple_adapter", "shared")


def stage_quality(cfg: BuildConfig) -> dict:
    """The quality targets on the test split (:mod:`imprompt.toy.quality`)."""
    from . import quality

    started = time.perf_counter()
    report = quality.measure(cfg.work / "pipeline", workdir.adapter_file(cfg.work, "adapter"), cfg.work / "data" / "test",
                             image_encoder=workdir.image_encoder(cfg.work), n=cfg.quality_samples,
                             steps=cfg.quality_steps, multimodal_n=cfg.quality_multimodal_samples, progress=cfg.progress)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return report
