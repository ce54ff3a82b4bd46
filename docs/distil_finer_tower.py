"""A 4-px-patch image tower distilled from the package's robust tower; the run of docs/drawn-references.md,
"Finer patches".

    PYTHONPATH=src python docs/distil_finer_tower.py TRAIN_SPLIT OUT STEPS [--lr 7e-4] [--patch 4] [--threads 2]
        [--limit N]

TRAIN_SPLIT is the toy build's train folder (``build/toy/data/train``, with ``train.npy`` beside it). The
student is :func:`imprompt.toy.robust_clip.finer_patches` of the package's image encoder (its vision tower and
projection, the scoring CLIP's text half only along for the ride), trained as the ``robust_clip`` stage trains
with a finer patch: batch 128 clean + 128 loosened pictures (:mod:`imprompt.toy.augment`, seed 0), both asked
for the teacher's projected embedding of the clean picture; lr warm-up 50 steps, then cosine. The teacher is
the package's tower itself, so that the adapters' inputs stay where they were for the renderer's pictures.
Checkpoints every 5 minutes (``OUT/ckpt.pt``) and resumes from them; the tower is saved to ``OUT/model``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection

from imprompt.files import atomic_path
from imprompt.toy import augment, models, shapes, toy_paths
from imprompt.toy.judge import load_scoring_clip
from imprompt.toy.loop import learning_rate, set_learning_rate, step_batch
from imprompt.toy.robust_clip import finer_patches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("train", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="the first N train pictures only (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = toy_paths()
    teacher = load_scoring_clip(paths["clip"]).eval().requires_grad_(False)  # its vision half: the package's tower
    student = finer_patches(teacher, args.patch)
    rows = shapes.read_metadata(args.train)[:args.limit]
    clean = models.clip_pixels(np.load(args.train.with_suffix(".npy"))[:args.limit])
    loosened = models.clip_pixels(augment.augmented_array([a for _, _, a in rows], 0))
    with torch.no_grad():
        target = torch.cat([teacher.get_image_features(pixel_values=c).pooler_output for c in clean.split(500)])
    scale = target.square().mean()
    params = list(student.vision_model.parameters()) + list(student.visual_projection.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    checkpoint, start = args.out / "ckpt.pt", 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    student.vision_model.train()
    started = saved = time.perf_counter()
    for i in range(start, args.steps):
        set_learning_rate(opt, learning_rate(i, args.steps, 50, args.lr, cosine=True))
        idx = step_batch(len(clean), 128, 0, i)
        embeds = student.get_image_features(pixel_values=torch.cat([clean[idx], loosened[idx]])).pooler_output
        loss = F.mse_loss(embeds, target[idx].repeat(2, 1)) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 100 == 0:
            print(f"step {i} loss {loss.item():.4f} {(time.perf_counter() - started) / (i - start + 1):.2f} s/step",
                  flush=True)
        if time.perf_counter() - saved > 300 or i == args.steps - 1:
            with atomic_path(checkpoint) as staging:
                torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "step": i + 1}, staging)
            saved = time.perf_counter()
    student.eval()
    config = copy.deepcopy(student.config.vision_config)
    config.projection_dim = student.config.projection_dim
    tower = CLIPVisionModelWithProjection(config)
    tower.vision_model.load_state_dict(student.vision_model.state_dict())
    tower.visual_projection.load_state_dict(student.visual_projection.state_dict())
    tower.save_pretrained(args.out / "model")
    print(f"saved {args.out / 'model'}", flush=True)


if __name__ == "__main__":
    main()
