"""The toy build's base-model stages: data, tokenizer, CLIP, VAE, latents, UNet, pipeline.

Each takes the :class:`~imprompt.toy.config.BuildConfig`, reads what earlier stages wrote to the work
folder (:mod:`imprompt.toy.workdir`), writes into its own folder and returns what it did and scored
(the build records it in ``<stage>/done.json``). The training stages run in a
:class:`~imprompt.toy.loop.TrainingLoop`, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_dir, atomic_path, atomic_write, load_torch_weights
from . import models, shapes, workdir
from . import tokenizer as toy_tokenizer
from .config import BuildConfig
from .judge import accuracy, read_many
from .loop import TrainingLoop, denoising_step, learning_rate, seeded, set_learning_rate, step_batch
from .models import SPEC


def log(message: str) -> None:
    print(f"[toy build] {message}", flush=True)


def training_loop(cfg: BuildConfig, stage: str, total: int, state: dict) -> TrainingLoop:
    return TrainingLoop(cfg.work / stage, total, state, name=stage, max_seconds=cfg.max_seconds(stage),
                        checkpoint_seconds=cfg.checkpoint_seconds, progress=cfg.progress, log=log)


def stage_data(cfg: BuildConfig) -> dict:
    """The four splits as image folders (for the adapter trainer and people) and .npy arrays (for the stages)."""
    sizes = {"train": cfg.train_size, "val": cfg.eval_size, "test": cfg.eval_size, "heldout": cfg.heldout_size}
    folder = cfg.work / "data"
    started = time.perf_counter()
    for split, n in sizes.items():
        if (folder / f"{split}.npy").is_file():
            continue
        samples = shapes.sample(split, n, cfg.seed)
        if (folder / split).exists():
            shutil.rmtree(folder / split)  # written by an interrupted run before its .npy
        shapes.write_folder(samples, folder / split)
        with atomic_write(folder / f"{split}.npy") as f:
            np.save(f, np.stack([np.asarray(s.image) for s in samples]))
    return {"seconds": round(time.perf_counter() - started, 1), "sizes": sizes}


def stage_tokenizer(cfg: BuildConfig) -> dict:
    started = time.perf_counter()
    captions = [c for split in shapes.SPLITS for _, c, _ in workdir.load_metadata(cfg.work, split)]
    vocabulary = toy_tokenizer.words(captions)
    tok = toy_tokenizer.build(vocabulary, SPEC.clip.max_length)
    longest = max(len(ids) for ids in tok(captions)["input_ids"])
    if longest > tok.model_max_length:
        raise ValueError(f"a caption has {longest} tokens, more than model_max_length={tok.model_max_length}")
    toy_tokenizer.save(tok, cfg.work / "tokenizer")
    return {"seconds": round(time.perf_counter() - started, 1), "vocab_size": len(tok), "words": len(vocabulary),
            "longest_caption_tokens": longest}


def stage_clip(cfg: BuildConfig) -> dict:
    """A tiny CLIP, contrastive on (image, caption) pairs; its zero-shot attribute accuracy on test."""
    tok = workdir.load_tokenizer(cfg.work)
    ids = models.token_ids(tok, [c for _, c, _ in workdir.load_metadata(cfg.work, "train")])
    pixels = models.clip_pixels(workdir.load_images(cfg.work, "train"))
    model = seeded(cfg.seed, lambda: models.clip(SPEC.clip, len(tok), tok.bos_token_id, tok.eos_token_id)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    loop = training_loop(cfg, "clip", cfg.clip_steps, {"model": model, "opt": opt})

    def step(i: int) -> float:
        set_learning_rate(opt, learning_rate(i, cfg.clip_steps, 100, cfg.clip_lr, cosine=True))
        idx = step_batch(len(ids), cfg.clip_batch, cfg.seed, i)
        out = model(input_ids=ids[idx], pixel_values=pixels[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        return out.loss.item()

    info = loop.run(step)
    model.eval()
    model.save_pretrained(cfg.work / "clip" / "model")
    info["zero_shot"] = clip_zero_shot(model, tok, workdir.load_images(cfg.work, "test"),
                                       [a for _, _, a in workdir.load_metadata(cfg.work, "test")])
    return info


def canonical_caption(a: shapes.Attributes) -> str:
    return f"a {shapes.STYLE_WORDS[a.style]} {a.color} {a.shape} on a {a.background} background"


def _valid(a: shapes.Attributes, name: str, value: str) -> bool:
    try:
        dataclasses.replace(a, **{name: value})
        return True
    except ValueError:
        return False


@torch.no_grad()
def clip_zero_shot(model, tok, images: np.ndarray, truth: list[shapes.Attributes]) -> dict[str, float]:
    """Per attribute: pick the prompt (others kept true, this one varied) closest to each image."""
    image_embeds = F.normalize(model.get_image_features(pixel_values=models.clip_pixels(images)).pooler_output, dim=-1)
    choices = {"shape": shapes.SHAPES, "color": shapes.COLORS, "background": shapes.BACKGROUNDS, "style": shapes.STYLES}
    scores = {}
    for name, values in choices.items():
        prompts, valid = [], []
        for a in truth:
            for v in values:
                ok = _valid(a, name, v)
                prompts.append(canonical_caption(dataclasses.replace(a, **{name: v}) if ok else a))
                valid.append(ok)
        ids = models.token_ids(tok, prompts)
        text = [model.get_text_features(input_ids=chunk).pooler_output for chunk in ids.split(1024)]
        text_embeds = F.normalize(torch.cat(text), dim=-1).view(len(truth), len(values), -1)
        similarity = torch.einsum("nd,nkd->nk", image_embeds, text_embeds)
        similarity[~torch.tensor(valid).view(len(truth), len(values))] = -1e9
        predicted = similarity.argmax(dim=1)
        correct = [values[p] == getattr(a, name) for p, a in zip(predicted.tolist(), truth)]
        scores[name] = round(float(np.mean(correct)), 4)
    return scores


def stage_vae(cfg: BuildConfig) -> dict:
    """A tiny AutoencoderKL; PSNR and the attribute reader's accuracy on test reconstructions."""
    pixels = models.vae_pixels(workdir.load_images(cfg.work, "train"))
    weights = None
    if cfg.vae_shape_weight:
        coverage = np.stack([shapes.alpha(a.shape, a.size, a.position, "solid")
                             for _, _, a in workdir.load_metadata(cfg.work, "train")])
        weights = 1.0 + cfg.vae_shape_weight * torch.from_numpy(coverage).float()[:, None]
    vae = seeded(cfg.seed, lambda: models.vae(SPEC.vae)).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    loop = training_loop(cfg, "vae", cfg.vae_steps, {"model": vae, "opt": opt})

    def step(i: int) -> float:
        set_learning_rate(opt, learning_rate(i, cfg.vae_steps, 50, cfg.vae_lr, cosine=True))
        idx = step_batch(len(pixels), cfg.vae_batch, cfg.seed, i)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean, not a sample: with a KL weight this small the sampling noise only
        # blurs (measured: posterior std 0.3 against a latent spread of 1.6 after 1,400 sampled steps,
        # and the reader got 79% of shapes right on the reconstructions). The KL term still bounds the
        # latents' scale; the UNet is trained on the mean latents too.
        reconstruction = vae.decode(posterior.mode()).sample
        loss = (reconstruction_loss(reconstruction, x, None if weights is None else weights[idx])
                + cfg.vae_kl * posterior.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    info = loop.run(step)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels[:4000].split(500)])
        scaling = float(1.0 / latents.std())
        test = workdir.load_images(cfg.work, "test")
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample
                           for c in models.vae_pixels(test).split(250)])
    make_deterministic(vae)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(cfg.work / "vae" / "model")
    images = models.to_uint8(recon)
    mse = float(np.mean((images.astype(np.float64) - test) ** 2))
    truth = [a for _, _, a in workdir.load_metadata(cfg.work, "test")]
    info.update(scaling_factor=round(scaling, 5), latent_mean=round(float(latents.mean()), 4),
                psnr_db=round(10 * math.log10(255 ** 2 / max(mse, 1e-9)), 2),
                reader_accuracy_on_reconstructions=accuracy(read_many(list(images)), truth))
    return info


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE + 0.1 L1; with ``weights`` (broadcast over the channels), each pixel's errors weighted and the
    sum normalised by the mean weight, so the loss keeps its scale. The shape covers a small share of a
    32x32 picture, so its colour was the last thing the VAE learned (docs/benchmarks.md, issue 15 target 5)."""
    if weights is None:
        return F.mse_loss(reconstruction, target) + 0.1 * F.l1_loss(reconstruction, target)
    error = reconstruction - target
    weights = weights.expand_as(error)
    return ((weights * error.square()).mean() + 0.1 * (weights * error.abs()).mean()) / weights.mean()


@torch.no_grad()
def make_deterministic(vae) -> None:
    """Fix the posterior's log-variance at -30 (std 3e-7), so ``latent_dist.sample()`` is its mean.

    The decoder is trained on the mean, so nothing trains the log-variance but the KL term, which pulls
    the std towards 1: left alone, every consumer that samples the posterior (the adapter trainer's
    feature cache, as SD training does) would get latents buried in noise. The mean is unchanged.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0.0
    vae.quant_conv.bias[channels:] = -30.0


def stage_latents(cfg: BuildConfig) -> dict:
    """VAE latents of the train images and text states of their captions (and of ""), computed once."""
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(cfg.work / "vae" / "model").eval()
    text = workdir.frozen_text_encoder(cfg.work)
    tok = workdir.load_tokenizer(cfg.work)
    captions = [c for _, c, _ in workdir.load_metadata(cfg.work, "train")]
    with torch.no_grad():
        pixels = models.vae_pixels(workdir.load_images(cfg.work, "train"))
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels.split(500)]) * vae.config.scaling_factor
        ids = models.token_ids(tok, captions + [""])
        states = torch.cat([text(input_ids=c).last_hidden_state for c in ids.split(1000)])
    with atomic_path(cfg.work / "latents" / "cache.pt") as tmp:
        torch.save({"latents": latents, "text": states[:-1].half(), "empty": states[-1:]}, tmp)
    return {"seconds": round(time.perf_counter() - started, 1), "latent_std": round(float(latents.std()), 4),
            "latent_mean": round(float(latents.mean()), 4), "n": len(latents)}


def stage_unet(cfg: BuildConfig) -> dict:
    """The UNet: epsilon prediction with caption dropout (for classifier-free guidance); EMA weights saved."""
    from diffusers import DDPMScheduler

    cache = load_torch_weights(cfg.work / "latents" / "cache.pt", "latent cache")
    latents, text, empty = cache["latents"], cache["text"], cache["empty"]
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER_CONFIG)
    unet, ema = seeded(cfg.seed, lambda: (models.unet(SPEC.unet, SPEC.clip.width), models.unet(SPEC.unet, SPEC.clip.width)))
    unet.train()
    ema.eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    loop = training_loop(cfg, "unet", cfg.unet_steps, {"model": unet, "ema": ema, "opt": opt})

    def step(i: int) -> float:
        set_learning_rate(opt, learning_rate(i, cfg.unet_steps, cfg.unet_warmup, cfg.unet_lr, cosine=False))
        idx = step_batch(len(latents), cfg.unet_batch, cfg.seed, i)
        loss = denoising_step(unet, opt, noise_scheduler, latents[idx], text[idx], empty, cfg.caption_dropout,
                              cfg.seed, i)
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))  # the usual EMA warm-up: early weights fade fast
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        return loss

    info = loop.run(step)
    ema.save_pretrained(cfg.work / "unet" / "model")
    return info


def stage_pipeline(cfg: BuildConfig) -> dict:
    """A diffusers StableDiffusionPipeline folder, and robust_clip's vision tower as its image encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel

    started = time.perf_counter()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(cfg.work / "vae" / "model"), text_encoder=workdir.frozen_text_encoder(cfg.work),
        tokenizer=workdir.load_tokenizer(cfg.work), unet=UNet2DConditionModel.from_pretrained(cfg.work / "unet" / "model"),
        scheduler=models.scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    vision = models.vision_tower(CLIPModel.from_pretrained(cfg.work / "robust_clip" / "model"))
    # The stage's folder is the pipeline itself: it replaces the folder whole (done.json is written after).
    with atomic_dir(cfg.work / "pipeline") as staging:
        pipe.save_pretrained(staging)
        vision.save_pretrained(staging / "image_encoder")  # = workdir.image_encoder(cfg.work)
        models.image_processor().save_pretrained(staging / "image_encoder")
    return {"seconds": round(time.perf_counter() - started, 1)}
