"""The toy build's ``robust_clip`` stage: the CLIP vision tower taught to read pictures drawn elsewhere.

The ``clip`` stage learns from the renderer's exact pixels, and its vision tower places a reference
drawn by other means (:mod:`.drawn`) far from where it places the same attributes rendered: zero-shot
shape 25% at strength 1. The image encoder is what every adapter sees, so that is where robustness
has to come from (issue 16).

This stage fine-tunes the vision tower by distillation from itself: the frozen tower's embedding of
each clean train image is the target both for the student's embedding of that image and for its
embedding of a loosened picture of the same attributes (:mod:`.augment`). So a picture drawn
elsewhere lands where its clean twin lands, and a clean one stays where it was: the text tower is
untouched (the UNet was trained on it, and it needs no retraining), and an adapter trained on the old
tower's features sees nearly the same features for the renderer's pictures. The target is the projected
embedding (``image_embeds``) the linear adapter reads; for clean pictures also the last hidden states,
which the hidden-state variants read.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path
from . import augment, drawn, models, workdir
from .config import BuildConfig
from .loop import learning_rate, set_learning_rate, step_batch
from .stages import clip_zero_shot, log, training_loop


def _embed(tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, last hidden states) of a CLIPModel's vision tower."""
    out = tower.vision_model(pixel_values=pixels)
    return tower.visual_projection(out.pooler_output), out.last_hidden_state


@torch.no_grad()
def _targets(teacher, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, hidden = zip(*(_embed(teacher, c) for c in pixels.split(500)))
    return torch.cat(embeds), torch.cat(hidden)


def _augmented_pixels(cfg: BuildConfig) -> np.ndarray:
    """One loosened picture per train image, drawn once (~7 ms each) and kept for a resumed run."""
    path = cfg.work / "robust_clip" / "augmented.npy"
    if path.is_file():
        return np.load(path)
    started = time.perf_counter()
    images = augment.augmented_array([a for _, _, a in workdir.load_metadata(cfg.work, "train")], cfg.seed)
    with atomic_path(path) as staging:
        with open(staging, "wb") as f:
            np.save(f, images)
    log(f"robust_clip: {len(images)} augmented pictures in {time.perf_counter() - started:.0f} s")
    return images


def drawn_test(n: int = 400, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """``n`` test pictures drawn by :mod:`.drawn` at strengths 0.5 and 1, with their attributes."""
    sets = {}
    for strength in (0.5, 1.0):
        samples = drawn.drawn_samples("test", n, seed=seed, strength=strength)
        sets[f"drawn_{strength}"] = np.stack([np.asarray(s.image) for s in samples]), [s.attributes for s in samples]
    return sets


@torch.no_grad()
def robustness(model, tok, sets: dict[str, tuple[np.ndarray, list]]) -> dict:
    """Zero-shot accuracy on each of :func:`drawn_test`'s sets."""
    return {name: clip_zero_shot(model, tok, images, truth) for name, (images, truth) in sets.items()}


def finer_patches(model, patch: int):
    """A copy of CLIPModel ``model`` whose vision tower reads ``patch``-px patches, ``patch`` a divisor of its own.

    Initialised to see what the old tower sees: each new patch kernel is the old kernel's response to the
    patch enlarged to the old size (the sum of each f x f block of the old kernel, f = old / new), and the
    position embeddings are the old grid's, bicubically interpolated to the finer grid (the class token's kept).
    For an image that is constant over each old patch, the patch embeddings are exactly the old ones.
    Everything after the embeddings is copied as it is.
    """
    from transformers import CLIPConfig, CLIPModel

    old = model.config.vision_config.patch_size
    if patch == old:
        return copy.deepcopy(model)
    if patch < 1 or old % patch:
        raise ValueError(f"the patch size must divide the tower's own ({old} px), got {patch}")
    config = CLIPConfig(**{**model.config.to_dict(), "vision_config": {**model.config.vision_config.to_dict(),
                                                                        "patch_size": patch}})
    finer = CLIPModel(config)
    state = model.state_dict()
    kernel = state["vision_model.embeddings.patch_embedding.weight"]  # (width, 3, old, old)
    f, width = old // patch, kernel.shape[0]
    state["vision_model.embeddings.patch_embedding.weight"] = kernel.reshape(width, 3, patch, f, patch, f).sum((3, 5))
    positions = state["vision_model.embeddings.position_embedding.weight"]  # (1 + g * g, width)
    g = math.isqrt(positions.shape[0] - 1)
    grid = positions[1:].reshape(g, g, width).permute(2, 0, 1)[None]
    fine = F.interpolate(grid, size=(g * f, g * f), mode="bicubic", align_corners=False)[0]
    state["vision_model.embeddings.position_embedding.weight"] = torch.cat(
        [positions[:1], fine.permute(1, 2, 0).reshape(-1, width)])
    finer.load_state_dict(state)
    return finer


def stage_robust_clip(cfg: BuildConfig) -> dict:
    """Distil the clip stage's vision tower into one that also reads loosened pictures; text tower kept.
    With ``robust_clip_patch`` below the clip stage's patch size the student reads finer patches
    (:func:`finer_patches`); its hidden states then have more tokens than the teacher's, so only the
    projected embedding is distilled."""
    from transformers import CLIPModel

    teacher = CLIPModel.from_pretrained(cfg.work / "clip" / "model").eval().requires_grad_(False)
    model = finer_patches(teacher, cfg.robust_clip_patch).requires_grad_(True)
    same_tokens = cfg.robust_clip_patch == teacher.config.vision_config.patch_size
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    clean = models.clip_pixels(workdir.load_images(cfg.work, "train"))
    loosened = models.clip_pixels(_augmented_pixels(cfg))
    target_embeds, target_hidden = _targets(teacher, clean)
    embed_scale, hidden_scale = target_embeds.square().mean(), target_hidden.square().mean()
    params = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.robust_clip_lr, weight_decay=0.0)
    loop = training_loop(cfg, "robust_clip", cfg.robust_clip_steps, {"model": model, "opt": opt})
    model.vision_model.train()

    def step(i: int) -> float:
        set_learning_rate(opt, learning_rate(i, cfg.robust_clip_steps, 50, cfg.robust_clip_lr, cosine=True))
        idx = step_batch(len(clean), cfg.robust_clip_batch, cfg.seed, i)
        embeds, hidden = _embed(model, torch.cat([clean[idx], loosened[idx]]))
        # The hidden states are kept for clean pictures only: token by token, a shifted picture's states
        # cannot be its clean twin's (the shape sits in other patches), and asking for them costs capacity.
        loss = F.mse_loss(embeds, target_embeds[idx].repeat(2, 1)) / embed_scale
        if same_tokens:
            loss = loss + F.mse_loss(hidden[:len(idx)], target_hidden[idx]) / hidden_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    info = loop.run(step)
    model.eval()
    model.save_pretrained(cfg.work / "robust_clip" / "model")
    tok = workdir.load_tokenizer(cfg.work)
    test = workdir.load_images(cfg.work, "test")
    truth = [a for _, _, a in workdir.load_metadata(cfg.work, "test")]
    info["zero_shot"] = clip_zero_shot(model, tok, test, truth)
    info["zero_shot_before"] = clip_zero_shot(teacher, tok, test, truth)
    sets = drawn_test(min(400, cfg.eval_size))
    info["robustness"] = robustness(model, tok, sets)
    info["robustness_before"] = robustness(teacher, tok, sets)
    return info
