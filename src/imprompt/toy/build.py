"""``imprompt toy build``: regenerate the toy world's models from a seed, in resumable stages.

Stages run in order, each in its own folder of the work dir (default ``build/toy/``); a finished stage
writes ``<stage>/done.json`` (seconds, steps, scores) and is skipped on the next run, and a training
stage checkpoints every few minutes (written to a temporary file and renamed), so a killed build
resumes where it stopped::

    data       train / val / test / heldout folders (name.png + name.txt + metadata.jsonl) and .npy arrays
    tokenizer  CLIP BPE tokenizer of the caption words (imprompt.toy.tokenizer)
    clip       tiny CLIP, contrastive on (image, caption); zero-shot attribute accuracy on test
    vae        tiny AutoencoderKL; the attribute reader's accuracy on test reconstructions
    latents    VAE latents of the train images and text-encoder states of their captions, cached once
    unet       UNet, epsilon prediction, 10% caption dropout (classifier-free guidance), EMA weights
    pipeline   diffusers StableDiffusionPipeline folder + image_encoder/ (the CLIP vision tower)
    adapter    linear IP-Adapter trained with imprompt.training on the train split with partial captions
               (shapes.partial_caption; resumable, checkpoints every 200 steps)
    simple_adapter  the simple adapter (paper 4.4.1, shared attention) on the same data and budget
    quality    the issue's quality targets on the test split (imprompt.toy.quality)
    package    fp16 safetensors + tokenizer + configs + example references + MODEL_CARD.md -> toy/data/

Training runs on one thread by default: on a shared 2-core machine two processes with two OpenMP
threads each slow each other down ~10x (measured: 0.65 s vs 17 s per UNet step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import models, shapes
from . import tokenizer as toy_tokenizer

STAGES = ("data", "tokenizer", "clip", "vae", "latents", "unet", "pipeline", "adapter", "simple_adapter", "quality",
          "package")
PACKAGE_DIR = Path(__file__).parent / "data"


@dataclass
class BuildConfig:
    work: Path = Path("build/toy")
    seed: int = 0
    threads: int = 1
    train_size: int = 20000
    eval_size: int = 1000  # val and test
    heldout_size: int = 500
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 5e-4
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    unet_warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    adapter_steps: int = 3000
    adapter_lr: float = 5e-4
    adapter_caption_p: float = 0.5  # chance each content attribute is named in the adapter's captions
    # Share of train images that also give an edit sample (adapter_data). Off: at 0.5 and 3,000 steps the
    # text won more often where it contradicts the reference, but the reference's own attributes were kept
    # less often and image-only colour fell from 90.5% to 76% (build notes in the model card).
    adapter_edit_p: float = 0.0
    quality_samples: int = 200
    quality_steps: int = 20
    quality_multimodal_samples: int = 100
    checkpoint_seconds: float = 120.0
    max_minutes: dict = field(default_factory=lambda: {"clip": 10, "vae": 28, "unet": 40})  # training time caps
    progress: bool = True
    spec: models.ToySpec = field(default_factory=models.ToySpec)


# ------------------------------------------------------------------------------------------ plumbing

def _atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _atomic_torch(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def _done(cfg: BuildConfig, stage: str) -> dict | None:
    path = cfg.work / stage / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish(cfg: BuildConfig, stage: str, info: dict) -> dict:
    _atomic_json(cfg.work / stage / "done.json", info)
    print(f"[toy build] {stage}: done {json.dumps(info, default=str)[:600]}", flush=True)
    return info


def _bar(cfg: BuildConfig, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not cfg.progress, mininterval=5, file=sys.stdout)


def _batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Random batch for a step, derived from (seed, step) alone, so a resumed run draws the same."""
    return torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def _lr(step: int, total: int, warmup: int, base: float, cosine: bool) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if not cosine:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Loop:
    """A resumable training loop: step counting, time cap, periodic atomic checkpoints."""

    def __init__(self, cfg: BuildConfig, stage: str, total: int, state: dict):
        self.cfg, self.stage, self.total = cfg, stage, total
        self.path = cfg.work / stage / "checkpoint.pt"
        self.step, self.seconds = 0, 0.0
        self.state = state  # name -> object with state_dict / load_state_dict
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=False)
            for name, obj in state.items():
                obj.load_state_dict(saved[name])
            self.step, self.seconds = saved["step"], saved["seconds"]
            print(f"[toy build] {stage}: resumed at step {self.step} ({self.seconds:.0f} s so far)", flush=True)
        self.cap = 60.0 * cfg.max_minutes.get(stage, 1e9)

    def save(self) -> None:
        _atomic_torch(self.path, {"step": self.step, "seconds": self.seconds,
                                  **{n: o.state_dict() for n, o in self.state.items()}})

    def run(self, step_fn: Callable[[int], float]) -> dict:
        bar = _bar(self.cfg, self.total, self.step, self.stage)
        last_save = time.perf_counter()
        start, base = time.perf_counter(), self.seconds
        losses = []
        while self.step < self.total and self.seconds < self.cap:
            loss = step_fn(self.step)
            losses.append(loss)
            self.step += 1
            self.seconds = base + time.perf_counter() - start
            bar.update(1)
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", s_step=f"{self.seconds / max(1, self.step):.2f}")
            if time.perf_counter() - last_save > self.cfg.checkpoint_seconds:
                self.save()
                last_save = time.perf_counter()
        bar.close()
        self.save()
        stopped = "steps" if self.step >= self.total else "time cap"
        return {"steps": self.step, "planned_steps": self.total, "stopped_by": stopped, "train_seconds": round(self.seconds, 1),
                "final_loss": float(np.mean(losses[-100:])) if losses else None}


def _load_images(cfg: BuildConfig, split: str) -> np.ndarray:
    return np.load(cfg.work / "data" / f"{split}.npy")


def _load_meta(cfg: BuildConfig, split: str):
    return shapes.read_metadata(cfg.work / "data" / split)


def _tokenizer(cfg: BuildConfig):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(cfg.work / "tokenizer")


def _token_ids(tok, captions: list[str]) -> torch.Tensor:
    return torch.tensor(tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length)["input_ids"])


def _clip_pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _vae_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------- stages

def stage_data(cfg: BuildConfig) -> dict:
    sizes = {"train": cfg.train_size, "val": cfg.eval_size, "test": cfg.eval_size, "heldout": cfg.heldout_size}
    folder = cfg.work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for split, n in sizes.items():
        if (folder / f"{split}.npy").is_file():
            continue
        from tqdm.auto import tqdm

        samples = [s for s in tqdm(_sample_iter(split, n, cfg.seed), total=n, desc=f"data {split}",
                                   disable=not cfg.progress, mininterval=5, file=sys.stdout)]
        if (folder / split).exists():
            shutil.rmtree(folder / split)  # written by an interrupted run before its .npy
        shapes.write_folder(samples, folder / split)
        np.save(folder / f".{split}.npy", np.stack([np.asarray(s.image) for s in samples]))
        os.replace(folder / f".{split}.npy", folder / f"{split}.npy")
    return {"seconds": round(time.perf_counter() - started, 1), "sizes": sizes}


def _sample_iter(split: str, n: int, seed: int):
    yield from shapes.sample(split, n, seed)


def stage_tokenizer(cfg: BuildConfig) -> dict:
    started = time.perf_counter()
    captions = [c for split in ("train", "val", "test", "heldout") for _, c, _ in _load_meta(cfg, split)]
    vocabulary = toy_tokenizer.words(captions)
    tok = toy_tokenizer.build(vocabulary, cfg.spec.clip.max_length)
    longest = max(len(ids) for ids in tok(captions)["input_ids"])
    if longest > tok.model_max_length:
        raise ValueError(f"a caption has {longest} tokens, more than model_max_length={tok.model_max_length}")
    toy_tokenizer.save(tok, cfg.work / "tokenizer")
    return {"seconds": round(time.perf_counter() - started, 1), "vocab_size": len(tok), "words": len(vocabulary),
            "longest_caption_tokens": longest}


def _new_clip(cfg: BuildConfig, tok):
    torch.manual_seed(cfg.seed)
    return models.clip(cfg.spec.clip, len(tok), tok.bos_token_id, tok.eos_token_id)


def stage_clip(cfg: BuildConfig) -> dict:
    tok = _tokenizer(cfg)
    meta = _load_meta(cfg, "train")
    ids = _token_ids(tok, [c for _, c, _ in meta])
    pixels = _clip_pixels(_load_images(cfg, "train"))
    model = _new_clip(cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    loop = _Loop(cfg, "clip", cfg.clip_steps, {"model": model, "opt": opt})

    def step(i: int) -> float:
        for g in opt.param_groups:
            g["lr"] = _lr(i, cfg.clip_steps, 100, cfg.clip_lr, cosine=True)
        idx = _batch_indices(len(ids), cfg.clip_batch, cfg.seed + 1, i)
        out = model(input_ids=ids[idx], pixel_values=pixels[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return out.loss.item()

    info = loop.run(step)
    model.eval()
    model.save_pretrained(cfg.work / "clip" / "model")
    info["zero_shot"] = clip_zero_shot(model, tok, _load_images(cfg, "test"), [a for _, _, a in _load_meta(cfg, "test")])
    return info


_STYLE_WORD = {"solid": "solid", "striped": "striped", "dotted": "dotted", "outline": "outlined"}


def canonical_caption(a: shapes.Attributes) -> str:
    return f"a {_STYLE_WORD[a.style]} {a.color} {a.shape} on a {a.background} background"


@torch.no_grad()
def clip_zero_shot(model, tok, images: np.ndarray, truth: list[shapes.Attributes]) -> dict[str, float]:
    """Per attribute: pick the prompt (others kept true, this one varied) closest to each image."""
    image_embeds = F.normalize(model.get_image_features(pixel_values=_clip_pixels(images)).pooler_output, dim=-1)
    choices = {"shape": shapes.SHAPES, "color": shapes.COLORS, "background": shapes.BACKGROUNDS, "style": shapes.STYLES}
    scores = {}
    for name, values in choices.items():
        prompts, valid = [], []
        for a in truth:
            for v in values:
                b = dataclasses.replace(a, **{name: v}) if _valid(a, name, v) else a
                prompts.append(canonical_caption(b))
                valid.append(_valid(a, name, v))
        text = []
        ids = _token_ids(tok, prompts)
        for chunk in ids.split(1024):
            text.append(model.get_text_features(input_ids=chunk).pooler_output)
        text_embeds = F.normalize(torch.cat(text), dim=-1).view(len(truth), len(values), -1)
        similarity = torch.einsum("nd,nkd->nk", image_embeds, text_embeds)
        similarity[~torch.tensor(valid).view(len(truth), len(values))] = -1e9
        predicted = similarity.argmax(dim=1)
        correct = [values[p] == getattr(a, name) for p, a in zip(predicted.tolist(), truth)]
        scores[name] = round(float(np.mean(correct)), 4)
    return scores


def _valid(a: shapes.Attributes, name: str, value: str) -> bool:
    try:
        dataclasses.replace(a, **{name: value})
        return True
    except ValueError:
        return False


def stage_vae(cfg: BuildConfig) -> dict:
    from .reader import accuracy, read_many

    pixels = _vae_pixels(_load_images(cfg, "train"))
    torch.manual_seed(cfg.seed)
    vae = models.vae(cfg.spec.vae).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    loop = _Loop(cfg, "vae", cfg.vae_steps, {"model": vae, "opt": opt})

    def step(i: int) -> float:
        for g in opt.param_groups:
            g["lr"] = _lr(i, cfg.vae_steps, 50, cfg.vae_lr, cosine=True)
        x = pixels[_batch_indices(len(pixels), cfg.vae_batch, cfg.seed + 2, i)]
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean, not a sample: with a KL weight this small the sampling noise only
        # blurs (measured: posterior std 0.3 against a latent spread of 1.6 after 1,400 sampled steps,
        # and the reader got 79% of shapes right on the reconstructions). The KL term still bounds the
        # latents' scale; the UNet is trained on the mean latents too.
        reconstruction = vae.decode(posterior.mode()).sample
        loss = F.mse_loss(reconstruction, x) + 0.1 * F.l1_loss(reconstruction, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    info = loop.run(step)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels[:4000].split(500)])
        scaling = float(1.0 / latents.std())
        test = _load_images(cfg, "test")
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in _vae_pixels(test).split(250)])
    make_deterministic(vae)
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(cfg.work / "vae" / "model")
    images = _to_uint8(recon)
    mse = float(np.mean((images.astype(np.float64) - test) ** 2))
    info.update(scaling_factor=round(scaling, 5), latent_mean=round(float(latents.mean()), 4),
                psnr_db=round(10 * math.log10(255 ** 2 / max(mse, 1e-9)), 2),
                reader_accuracy_on_reconstructions=accuracy(read_many(list(images)), [a for _, _, a in _load_meta(cfg, "test")]))
    return info


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


def _frozen_text_encoder(cfg: BuildConfig):
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(cfg.work / "clip" / "model")
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPTextModel is the transformer itself
    return text.eval()


def stage_latents(cfg: BuildConfig) -> dict:
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(cfg.work / "vae" / "model").eval()
    text = _frozen_text_encoder(cfg)
    tok = _tokenizer(cfg)
    meta = _load_meta(cfg, "train")
    with torch.no_grad():
        pixels = _vae_pixels(_load_images(cfg, "train"))
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels.split(500)]) * vae.config.scaling_factor
        ids = _token_ids(tok, [c for _, c, _ in meta] + [""])
        states = torch.cat([text(input_ids=c).last_hidden_state for c in ids.split(1000)])
    _atomic_torch(cfg.work / "latents" / "cache.pt", {"latents": latents, "text": states[:-1].half(), "empty": states[-1:]})
    return {"seconds": round(time.perf_counter() - started, 1), "latent_std": round(float(latents.std()), 4),
            "latent_mean": round(float(latents.mean()), 4), "n": len(latents)}


def denoising_step(unet, opt, x0: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor, g: torch.Generator) -> float:
    """One epsilon-prediction step (DDPM noising at uniform timesteps, gradient norm clipped at 1)."""
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, len(alphas), (len(x0),), generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return loss.item()


def stage_unet(cfg: BuildConfig) -> dict:
    from diffusers import DDPMScheduler

    cache = torch.load(cfg.work / "latents" / "cache.pt")
    latents, text, empty = cache["latents"], cache["text"], cache["empty"]
    noise_scheduler = DDPMScheduler.from_config(models.SCHEDULER_CONFIG)
    torch.manual_seed(cfg.seed)
    unet = models.unet(cfg.spec.unet, cfg.spec.clip.width).train()
    ema = models.unet(cfg.spec.unet, cfg.spec.clip.width).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    loop = _Loop(cfg, "unet", cfg.unet_steps, {"model": unet, "ema": ema, "opt": opt})
    alphas = noise_scheduler.alphas_cumprod

    def step(i: int) -> float:
        for g in opt.param_groups:
            g["lr"] = _lr(i, cfg.unet_steps, cfg.unet_warmup, cfg.unet_lr, cosine=False)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + i)
        idx = _batch_indices(len(latents), cfg.unet_batch, cfg.seed + 3, i)
        x0 = latents[idx]
        cond = text[idx].float()
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        cond[drop] = empty
        loss = denoising_step(unet, opt, x0, cond, alphas, g)
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        return loss

    info = loop.run(step)
    ema.save_pretrained(cfg.work / "unet" / "model")
    return info


def stage_pipeline(cfg: BuildConfig) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    started = time.perf_counter()
    out = cfg.work / "pipeline"
    tmp = cfg.work / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(cfg.work / "vae" / "model"), text_encoder=_frozen_text_encoder(cfg),
        tokenizer=_tokenizer(cfg), unet=UNet2DConditionModel.from_pretrained(cfg.work / "unet" / "model"),
        scheduler=models.scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    clip = CLIPModel.from_pretrained(cfg.work / "clip" / "model")
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    vision.save_pretrained(tmp / "image_encoder")
    models.image_processor().save_pretrained(tmp / "image_encoder")
    done_marker = out / "done.json"
    saved_done = done_marker.read_text() if done_marker.is_file() else None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if saved_done:
        done_marker.write_text(saved_done)
    return {"seconds": round(time.perf_counter() - started, 1)}


def adapter_data(cfg: BuildConfig) -> Path:
    """The adapters' training list: ``train.jsonl`` in a folder of the train images (hard-linked) and edits.

    * every train image with a partial caption (``shapes.partial_caption``);
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
    source = cfg.work / "data" / "train"
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its list is from an interrupted run
    staging = Path(tempfile.mkdtemp(prefix=".data.", dir=folder.parent))
    (staging / "edits").mkdir()
    items = []
    try:
        for file_name, _, attrs in shapes.read_metadata(source):
            try:
                os.link(source / file_name, staging / file_name)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source / file_name, staging / file_name)
            text = shapes.partial_caption(attrs, captions, cfg.adapter_caption_p)
            (staging / file_name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
            items.append({"image_file": file_name, "text": text})
            if edits.random() < cfg.adapter_edit_p:
                changed, target = shapes.edited(attrs, edits)
                shapes.render(target).save(staging / "edits" / file_name)
                items.append({"image_file": f"edits/{file_name}", "reference_file": file_name, "changed": changed,
                              "text": shapes.partial_caption(target, edits, cfg.adapter_caption_p, always=(changed,))})
        (staging / "train.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder / "train.jsonl"


def _train_adapter(cfg: BuildConfig, stage: str, variant: str) -> dict:
    from ..training.config import TrainConfig
    from ..training.trainer import train

    pipeline = cfg.work / "pipeline"
    config = TrainConfig(model=str(pipeline), image_encoder=str(pipeline / "image_encoder"), data=str(adapter_data(cfg)),
                         output_dir=str(cfg.work / stage / "run"), variant=variant, resolution=shapes.IMAGE_SIZE,
                         batch_size=64, max_steps=cfg.adapter_steps, learning_rate=cfg.adapter_lr,
                         checkpoint_every=200, resume="latest", seed=cfg.seed, progress=cfg.progress, cpu=True)
    started = time.perf_counter()
    result = train(config, log_fn=lambda m: print(f"[toy build] {stage}: {m}", flush=True))
    return {"steps": result.steps, "seconds_this_run": round(time.perf_counter() - started, 1),
            "train_seconds_this_run": round(result.seconds, 1), "final_loss": result.losses[-1] if result.losses else None,
            "adapter_file": str(result.adapter_file)}


def stage_adapter(cfg: BuildConfig) -> dict:
    return _train_adapter(cfg, "adapter", "linear")


def stage_simple_adapter(cfg: BuildConfig) -> dict:
    """The simple adapter of paper section 4.4.1 (image tokens appended to the text tokens, no new
    attention weights) with the decoupled adapter's data, steps, batch, learning rate and seed: the
    evaluation's ablation (docs/toy-results.md)."""
    return _train_adapter(cfg, "simple_adapter", "shared")


def stage_quality(cfg: BuildConfig) -> dict:
    from . import quality

    started = time.perf_counter()
    report = quality.measure(cfg.work / "pipeline", cfg.work / "adapter" / "run" / "ip_adapter.safetensors",
                             cfg.work / "data" / "test", n=cfg.quality_samples, steps=cfg.quality_steps,
                             multimodal_n=cfg.quality_multimodal_samples,
                             progress=cfg.progress)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return report


REFERENCE_PICKS = 8  # example reference images shipped beside the models


def _half_copy(component, folder: Path) -> None:
    """Save a diffusers/transformers model with fp16 weights (loaders cast back to the dtype asked for)."""
    component.to(torch.float16).save_pretrained(folder)
    component.to(torch.float32)


def _package_clip(cfg: BuildConfig, folder: Path) -> None:
    """The scoring CLIP (imprompt eval's --clip-model), sharing the pipeline's text and vision towers."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    models.save_shared_tower_clip(CLIPModel.from_pretrained(cfg.work / "clip" / "model"), folder, dtype=torch.float16)
    CLIPTokenizer.from_pretrained(cfg.work / "pipeline" / "tokenizer").save_pretrained(folder)
    CLIPImageProcessor.from_pretrained(cfg.work / "pipeline" / "image_encoder").save_pretrained(folder)


def stage_package(cfg: BuildConfig, dest: Path = PACKAGE_DIR) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..adapter.checkpoint import load_adapter, load_shared_adapter, save_adapter

    started = time.perf_counter()
    staging = dest.with_name(".data.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.work / "pipeline", torch_dtype=torch.float32)
    pipe.to(torch.float16).save_pretrained(staging / "pipeline")
    vision = CLIPVisionModelWithProjection.from_pretrained(cfg.work / "pipeline" / "image_encoder")
    _half_copy(vision, staging / "pipeline" / "image_encoder")
    CLIPImageProcessor.from_pretrained(cfg.work / "pipeline" / "image_encoder").save_pretrained(staging / "pipeline" / "image_encoder")
    save_adapter(load_adapter(cfg.work / "adapter" / "run" / "ip_adapter.safetensors", dtype=torch.float16),
                 staging / "ip_adapter.safetensors")
    save_adapter(load_shared_adapter(cfg.work / "simple_adapter" / "run" / "ip_adapter.safetensors", dtype=torch.float16),
                 staging / "simple_adapter.safetensors")
    _package_clip(cfg, staging / "clip")
    (staging / "references").mkdir()
    picked, seen = [], set()
    for name, _, a in _load_meta(cfg, "test") + _load_meta(cfg, "heldout"):
        key = (a.shape, a.style)
        if key in seen or len(picked) >= REFERENCE_PICKS:
            continue
        seen.add(key)
        split = "test" if len(picked) < REFERENCE_PICKS - 2 else "heldout"
        source = cfg.work / "data" / split / name
        if not source.is_file():
            continue
        target = f"{a.style}-{a.color}-{a.shape}-on-{a.background}.png"
        shutil.copy(source, staging / "references" / target)
        picked.append({"file": target, "split": split, **dataclasses.asdict(a)})
    _atomic_json(staging / "references" / "attributes.json", picked)
    stages = {s: _done(cfg, s) for s in STAGES if _done(cfg, s) is not None}
    (staging / "build.json").write_text(json.dumps(stages, indent=2))
    (staging / "MODEL_CARD.md").write_text(model_card(cfg, stages))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    sizes = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    if total > 25 * 2 ** 20:
        raise ValueError(f"packaged toy models are {total / 2 ** 20:.1f} MiB, over the 25 MiB budget")
    return {"seconds": round(time.perf_counter() - started, 1), "total_bytes": total, "files": sizes}


def model_card(cfg: BuildConfig, stages: dict) -> str:
    """The model card: how the shipped models were made (stages, steps, times) and what they score."""
    def get(stage, *keys):
        value = stages.get(stage) or {}
        for k in keys:
            value = value.get(k, {}) if isinstance(value, dict) else {}
        return value if value != {} else "n/a"

    spec = json.dumps(cfg.spec.to_dict())
    lines = [
        "# imprompt toy models", "",
        "A tiny CLIP, a tiny Stable Diffusion (SD1.5 layout) and a linear IP-Adapter, trained from scratch on the toy",
        "shapes world (`imprompt.toy.shapes`, 32x32 images) by `imprompt toy build` on a 2-core CPU. Standard formats:",
        "`StableDiffusionPipeline.from_pretrained(\"pipeline\")`, `CLIPVisionModelWithProjection` in",
        "`pipeline/image_encoder`, the adapter in the official IP-Adapter format (`ip_adapter.safetensors`).",
        "`simple_adapter.safetensors` is the evaluation's ablation (paper 4.4.1). `clip/` is the scoring CLIP of",
        "`imprompt eval`: its config, tokenizer, image processor and the two weights the towers lack; the towers are",
        "`pipeline/text_encoder` and `pipeline/image_encoder` (`towers.json`; loaded by",
        "`imprompt.toy.models.load_shared_tower_clip`).",
        "Weights are stored in fp16 (loaders cast them to the dtype asked for; imprompt loads fp32).", "",
        "## How they were made", "",
        f"Seed {cfg.seed}; train split {cfg.train_size} images. Model sizes: `{spec}`.", "",
        "| stage | steps | batch | train time (s) | notes |", "|---|---|---|---|---|",
        f"| CLIP (contrastive) | {get('clip', 'steps')} | {cfg.clip_batch} | {get('clip', 'train_seconds')} | lr {cfg.clip_lr}, cosine |",
        f"| VAE (MSE + 0.1 L1 + {cfg.vae_kl} KL) | {get('vae', 'steps')} | {cfg.vae_batch} | {get('vae', 'train_seconds')} | scaling_factor {get('vae', 'scaling_factor')} |",
        f"| UNet (epsilon, 10% caption dropout, EMA {cfg.ema_decay}) | {get('unet', 'steps')} | {cfg.unet_batch} | {get('unet', 'train_seconds')} | lr {cfg.unet_lr} |",
        f"| IP-Adapter linear (`imprompt.training`) | {get('adapter', 'steps')} | 64 | {get('adapter', 'train_seconds_this_run')} | lr {cfg.adapter_lr}, partial captions; resumed runs count only the last |",
        f"| simple adapter (paper 4.4.1, `--variant shared`) | {get('simple_adapter', 'steps')} | 64 | {get('simple_adapter', 'train_seconds_this_run')} | same data, lr and seed |",
        "",
        "The adapters train on `adapter/data/train.jsonl` (`build.adapter_data`): the train images with *partial*",
        "captions (`shapes.partial_caption`: each of shape, colour, style and background named with probability",
        f"{cfg.adapter_caption_p}), not the full ones the UNet saw. With captions that name everything, the text leaves the",
        "image prompt nothing to add except on the 5% of steps whose text is dropped (measured: image-only colour 65%",
        "after 4,000 steps on full captions, 72% after 600 on partial ones; 60 test references each).",
        f"Edit samples (one attribute changed, the original as the image prompt) are in the list for {cfg.adapter_edit_p:.0%}",
        "of the images (`BuildConfig.adapter_edit_p`; see the build notes for what they did at 50%).",
        "", "## Scores", "",
        f"- CLIP zero-shot attribute accuracy (test): `{json.dumps(get('clip', 'zero_shot'))}`",
        f"- VAE: attribute reader on test reconstructions: `{json.dumps(get('vae', 'reader_accuracy_on_reconstructions'))}`, "
        f"PSNR {get('vae', 'psnr_db')} dB",
        f"- Text-to-image (caption as prompt): `{json.dumps(get('quality', 'text_to_image'))}`",
        f"- Image prompt alone (empty text, scale 1.0): `{json.dumps(get('quality', 'image_only'))}`",
        f"- Unconditional (no text, no image) vs the same references: `{json.dumps(get('quality', 'unconditional'))}`",
        f"- Image + text (multimodal), by scale: `{json.dumps(get('quality', 'multimodal'))}`",
        "", f"Quality settings: `{json.dumps({k: get('quality', k) for k in ('n', 'steps', 'guidance')})}` "
        "(test split, DPM-Solver++; see `imprompt.toy.quality`). Targets (issue 4): text-to-image and image-only colour and",
        "background >= 90%, shape >= 80%; multimodal >= 75% each.", "",
        "`references/` holds example reference images (the last two from held-out shape/colour pairs) and their attributes.",
    ]
    notes = cfg.work / "NOTES.md"  # what happened during this build (restarts, changed settings), written by hand
    if notes.is_file():
        lines += ["", "## Build notes", "", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


RUNNERS: dict[str, Callable[[BuildConfig], dict]] = {
    "data": stage_data, "tokenizer": stage_tokenizer, "clip": stage_clip, "vae": stage_vae, "latents": stage_latents,
    "unet": stage_unet, "pipeline": stage_pipeline, "adapter": stage_adapter,
    "simple_adapter": stage_simple_adapter, "quality": stage_quality,
    "package": stage_package,
}


def run(cfg: BuildConfig, only: str | None = None, until: str | None = None, force: bool = False) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    for name in (only, until):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    selected = [only] if only else list(STAGES[: STAGES.index(until) + 1] if until else STAGES)
    results = {}
    for stage in selected:
        done = _done(cfg, stage)
        if done is not None and not force:
            print(f"[toy build] {stage}: already done, skipping", flush=True)
            results[stage] = done
            continue
        (cfg.work / stage).mkdir(parents=True, exist_ok=True)
        print(f"[toy build] {stage}: starting", flush=True)
        started = time.perf_counter()
        info = RUNNERS[stage](cfg)
        info.setdefault("wall_seconds_last_run", round(time.perf_counter() - started, 1))
        results[stage] = _finish(cfg, stage, info)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["derive"]:
        from .derivative import main as derive_main

        return derive_main(argv[1:])
    parser = argparse.ArgumentParser(prog="imprompt toy", description="Build the toy world's models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("derive", help="fine-tune the toy UNet on one style: a derivative model (imprompt toy derive --help)")
    build = sub.add_parser("build", help="regenerate the toy models in resumable stages")
    build.add_argument("--work", type=Path, default=BuildConfig.work, help="work folder (default: build/toy)")
    build.add_argument("--stage", choices=STAGES, help="run only this stage")
    build.add_argument("--until", choices=STAGES, help="run the stages up to and including this one")
    build.add_argument("--force", action="store_true", help="rerun stages even if they are done")
    build.add_argument("--threads", type=int, default=BuildConfig.threads, help="torch threads (default 1)")
    for name in ("train_size", "clip_steps", "vae_steps", "vae_batch", "unet_steps", "adapter_steps", "quality_samples"):
        build.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(BuildConfig, name))
    build.add_argument("--max-minutes", action="append", default=[], metavar="STAGE=MINUTES",
                       help="cap a training stage's time (default clip=10, vae=28, unet=40)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    caps = dict(BuildConfig().max_minutes)
    for item in args.max_minutes:
        stage, _, minutes = item.partition("=")
        if stage not in ("clip", "vae", "unet") or not minutes:
            raise SystemExit(f"--max-minutes {item!r}: expected clip=N, vae=N or unet=N")
        caps[stage] = float(minutes)
    cfg = BuildConfig(work=args.work, threads=args.threads, train_size=args.train_size, clip_steps=args.clip_steps,
                      vae_steps=args.vae_steps, vae_batch=args.vae_batch, unet_steps=args.unet_steps, adapter_steps=args.adapter_steps,
                      quality_samples=args.quality_samples, progress=not args.no_progress, max_minutes=caps)
    run(cfg, only=args.stage, until=args.until, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
