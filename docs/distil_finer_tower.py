"""A 4-px-patch image tower distilled from the package's robust tower; the run of docs/drawn-references.md,
"Finer patches".

    PYTHONPATH=src python docs/distil_finer_tower.py DATA OUT STEPS [--lr 7e-4] [--patch 4] [--threads 2]

DATA is a toy build's ``data`` folder (its ``train.npy`` and ``train/``, ``test.npy``). The run is the build's
``robust_clip`` stage (:func:`imprompt.toy.robust_clip.stage_robust_clip`) with ``--robust-clip-patch``, in the
work folder OUT, with the package's scoring CLIP (its text tower and the package's image tower) in the place of
the clip stage's model: so the teacher is the tower the package ships, and the adapters' inputs stay where they
were for the renderer's pictures. It resumes from its checkpoints; the tower is written to ``OUT/image_encoder``
(a ``CLIPVisionModelWithProjection`` folder, as the package's ``image_encoder/``), and the stage's zero-shot
scores are printed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from imprompt.toy import models, robust_clip, toy_paths, workdir
from imprompt.toy.config import BuildConfig
from imprompt.toy.judge import load_scoring_clip


def prepare(data: Path, work: Path) -> None:
    """OUT as a build folder whose data, tokenizer and clip stages are the given data and the package."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        os.symlink(data.resolve(), work / "data")
    if not (work / "tokenizer").exists():
        os.symlink((toy_paths()["model"] / "tokenizer").resolve(), work / "tokenizer")
    if not (work / "clip" / "model").is_dir():
        load_scoring_clip(toy_paths()["clip"]).save_pretrained(work / "clip" / "model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    prepare(args.data, args.out)
    cfg = BuildConfig(work=args.out, robust_clip_patch=args.patch, robust_clip_steps=args.steps,
                      robust_clip_lr=args.lr, threads=args.threads)
    info = robust_clip.stage_robust_clip(cfg)
    workdir.mark_done(args.out, "robust_clip", info)
    from transformers import CLIPModel

    tower = models.vision_tower(CLIPModel.from_pretrained(args.out / "robust_clip" / "model"))
    tower.save_pretrained(args.out / "image_encoder")
    models.image_processor().save_pretrained(args.out / "image_encoder")
    print(json.dumps({k: info[k] for k in ("zero_shot", "robustness", "robustness_before") if k in info}, indent=1))


if __name__ == "__main__":
    main()
