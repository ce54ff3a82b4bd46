"""The training loop: frozen Stable Diffusion, trainable adapter, accelerate for devices and DDP.

Only the image projection and ``to_k_ip`` / ``to_v_ip`` train (paper section 3.3); ``to_k_ip`` /
``to_v_ip`` start as copies of each layer's ``to_k`` / ``to_v``. The adapter is attached with the same
decoupled-attention processors that generation uses, so what is trained is exactly what runs later.
Checkpoints hold the adapter, optimizer and LR scheduler and the step; data order, noise, timesteps and
dropout are derived from (seed, micro-step, process), so resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.attach import Attachment, adapter_for_unet, attach
from ..adapter.checkpoint import save_adapter
from ..adapter.layers import LayerScales
from ..adapter.model import IPAdapter
from ..adapter.variants import AdapterVariant
from ..encoding import ImageEncoder, load_image
from ..generation.pipelines import load_pipeline, resolve_model
from .config import TrainConfig
from .data import SkipCounter, open_source
from .features import FeatureCache, FrozenModels
from .recipe import apply_dropout, batch_indices, diffusion_target, dropout_masks, step_generator

log = logging.getLogger(__name__)
ALL_LAYERS = LayerScales()
EXPORT_NAME = "ip_adapter.safetensors"


def build_variant(config: TrainConfig, unet, encoder: ImageEncoder) -> AdapterVariant:
    cross = unet.config.cross_attention_dim
    embeds = encoder.model.config.projection_dim
    hidden = encoder.model.config.hidden_size
    if config.variant in ("linear", "shared"):
        return AdapterVariant("linear", embeds, cross, config.tokens)
    if config.variant == "full":
        return AdapterVariant("mlp", hidden, cross, None)
    width = config.resampler_width or max(64, min(cross, 1280) // 64 * 64)
    if width % 64:
        raise ValueError(f"resampler_width must be a multiple of 64 (64-wide heads), got {width}")
    return AdapterVariant("resampler", hidden, cross, config.tokens, resampler_width=width,
                          resampler_depth=config.resampler_depth, resampler_ff_mult=4)


class TrainingModel(nn.Module):
    """Adapter (trainable) + UNet (frozen): noisy latents and conditions in, prediction out."""

    def __init__(self, adapter: IPAdapter, unet, shared: bool):
        super().__init__()
        self.adapter = adapter
        self.unet = unet.requires_grad_(False)
        self.shared = shared
        self.attachment: Attachment | None = None if shared else attach(unet, adapter)

    def forward(self, noisy, timesteps, text, image_features, added_cond=None):
        tokens = self.adapter.project(image_features)
        if self.shared:
            # The paper's simple adapter (4.4.1): image tokens join the text tokens in the frozen attention.
            return self.unet(noisy, timesteps, torch.cat([text, tokens.to(text.dtype)], dim=1),
                             added_cond_kwargs=added_cond).sample
        kv = self.attachment.layer_kv(0, tokens, scale=1.0, layer_scales=ALL_LAYERS)
        call = self.attachment.prompt_call([kv])
        return self.unet(noisy, timesteps, text, added_cond_kwargs=added_cond,
                         cross_attention_kwargs=call.cross_attention_kwargs()).sample


@dataclass
class TrainResult:
    adapter_file: Path
    steps: int
    images_seen: int
    skipped: list[str]
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds else 0.0


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / "state.json").is_file())


def find_resume(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = checkpoints(Path(config.output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "state.json").is_file():
        raise ValueError(f"--resume {config.resume!r}: not a checkpoint folder (no state.json)")
    return path


def save_checkpoint(folder: Path, step: int, micro_step: int, adapter: IPAdapter, optimizer, scheduler, keep: int,
                    totals: dict | None = None) -> Path:
    """Write ``step-N/`` atomically; ``totals`` (training seconds, images seen) carry over to a resumed run."""
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(adapter, tmp / "adapter.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "lr_scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "micro_step": micro_step, **(totals or {})}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint exists completely or not at all
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class StepInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    added: dict | None
    target: torch.Tensor


def step_inputs(batch: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], generator: torch.Generator,
                config: TrainConfig, noise_scheduler, scaling: float) -> StepInputs:
    """One micro-batch of features -> the UNet's inputs and target, all randomness from ``generator``."""
    device = batch["latent_mean"].device
    n = batch["latent_mean"].shape[0]
    # A fresh sample of the cached latent distribution, as ``latent_dist.sample()`` would draw.
    eps = torch.randn(batch["latent_mean"].shape, generator=generator).to(device)
    latents = (batch["latent_mean"] + batch["latent_std"] * eps) * scaling
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    drop_image, drop_text = (m.to(device) for m in dropout_masks(
        torch.rand(n, generator=generator), config.drop_image, config.drop_text, config.drop_both))
    added = None
    if "pooled" in batch:  # SDXL: pooled text embedding and size/crop conditioning
        added = {"text_embeds": apply_dropout(batch["pooled"], uncond["empty_pooled"], drop_text),
                 "time_ids": batch["time_ids"]}
    return StepInputs(
        noisy=noise_scheduler.add_noise(latents, noise, timesteps),
        timesteps=timesteps,
        text=apply_dropout(batch["text"], uncond["empty_text"], drop_text),
        image=apply_dropout(batch["image"], uncond["uncond_image"], drop_image),
        added=added,
        target=diffusion_target(noise_scheduler, latents, noise, timesteps),
    )


def train(config: TrainConfig, log_fn: Callable[[str], None] = print) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    config.check()
    torch.set_flush_denormal(True)
    out = Path(config.output_dir)
    log_with = None
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        log_with = "tensorboard"
    # On a machine without an accelerator, say so to accelerate: that is what turns several
    # processes (torchrun / accelerate launch) into multi-CPU DDP over gloo.
    cpu = config.cpu or not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
                              log_with=log_with, project_dir=str(out / "logs"), cpu=cpu)
    rank, world = accelerator.process_index, accelerator.num_processes

    pipe = load_pipeline(config.model, "text2img", device=accelerator.device)
    encoder = ImageEncoder.from_pretrained(resolve_model(config.image_encoder, "image encoder"))
    encoder.model.to(accelerator.device)
    unet = pipe.unet
    variant = build_variant(config, unet, encoder)
    with torch.random.fork_rng():  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        adapter = IPAdapter(variant, {}) if config.variant == "shared" else adapter_for_unet(unet, variant)
    models = FrozenModels(pipe, encoder, variant.encoder_output)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    counter = SkipCounter()
    if not config.cache:
        raise ValueError("training without the feature cache is not supported yet; set cache: true")
    cache = FeatureCache(Path(config.cache_dir or out / "cache"), models.fingerprint(config.resolution, config.center_crop))
    if accelerator.is_main_process and not cache.complete:
        source = open_source(config.data, config.data_root, counter)
        cache.build(models, source, config.resolution, config.center_crop, config.seed, counter,
                    progress=config.progress)
    accelerator.wait_for_everyone()
    features = cache.open()
    if len(features) == 0:
        raise ValueError(f"no usable training images in {config.data} ({len(features.skipped)} skipped)")
    uncond = {k: v.to(accelerator.device) for k, v in features.unconditional.items()}

    resume = find_resume(config)
    start_micro, before = 0, {"seconds": 0.0, "images_seen": 0}  # before: what earlier runs did
    if resume is not None:
        adapter.load_state_dict(load_file(resume / "adapter.safetensors"))
        state = json.loads((resume / "state.json").read_text())
        start_micro = state["micro_step"]
        before = {k: state.get(k, v) for k, v in before.items()}
    model = TrainingModel(adapter, unet, shared=config.variant == "shared")
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    if resume is not None:
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(resume / "lr_scheduler.pt", weights_only=True))
        log_fn(f"resumed from {resume} (step {start_micro // config.gradient_accumulation})")
    # The LR scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it
    # once per process, making the warm-up depend on the number of processes.
    model, optimizer = accelerator.prepare(model, optimizer)
    if log_with:
        accelerator.init_trackers("imprompt", config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})

    total_micro = config.max_steps * config.gradient_accumulation
    scaling = pipe.vae.config.scaling_factor
    seen_keys: list[str] = []
    losses: list[float] = []
    bar = tqdm(total=config.max_steps, initial=start_micro // config.gradient_accumulation, desc="training",
               disable=not (config.progress and accelerator.is_main_process))
    started, images = time.perf_counter(), 0
    for micro in range(start_micro, total_micro):
        generator = step_generator(config.seed, micro, rank)
        indices = batch_indices(len(features), config.seed, micro, rank, world, config.batch_size)
        batch = {k: v.to(accelerator.device) for k, v in features.batch(indices).items()}
        if config.record_data:
            seen_keys += [features.keys[i] for i in indices]
        n = len(indices)
        inputs = step_inputs(batch, uncond, generator, config, noise_scheduler, scaling)

        with accelerator.accumulate(model):
            with accelerator.autocast():
                prediction = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.image, inputs.added)
            loss = F.mse_loss(prediction.float(), inputs.target.float())
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                lr_scheduler.step()
            optimizer.zero_grad()
        images += n * world
        losses.append(loss.item())
        if not accelerator.sync_gradients:
            continue
        step = (micro + 1) // config.gradient_accumulation
        rate = images / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
        if step % config.log_every == 0 and log_with:
            accelerator.log({"loss": losses[-1], "images_per_second": rate, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                totals = {"seconds": before["seconds"] + time.perf_counter() - started,
                          "images_seen": before["images_seen"] + images}
                save_checkpoint(out / "checkpoints", step, micro + 1, accelerator.unwrap_model(model).adapter,
                                optimizer, lr_scheduler, config.keep_checkpoints, totals)
        if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process:
            write_samples(config, pipe, accelerator.unwrap_model(model), encoder, out / "samples" / f"step-{step:08d}.png")
    bar.close()
    seconds = time.perf_counter() - started

    accelerator.wait_for_everyone()
    adapter_file = out / EXPORT_NAME
    if config.record_data:
        (out / f"seen-rank{rank}.json").write_text(json.dumps(seen_keys))
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).adapter
        save_adapter(final, adapter_file)
        (out / "ip_adapter.json").write_text(config.to_json())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        total_images, total_seconds = before["images_seen"] + images, before["seconds"] + seconds
        summary = {"steps": config.max_steps, "images_seen": total_images, "seconds": round(total_seconds, 2),
                   "seconds_this_run": round(seconds, 2),
                   "images_per_second": round(total_images / total_seconds, 3) if total_seconds else None,
                   "final_loss": losses[-1] if losses else None, "peak_rss_mb": round(peak, 1),
                   "skipped_images": len(features.skipped), "skipped": features.skipped, "variant": variant.name}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log_fn(f"exported {adapter_file} ({len(features.skipped)} unreadable images skipped)")
    trained = accelerator.unwrap_model(model)
    if trained.attachment is not None:
        trained.attachment.detach()  # leave the caller's UNet as it was
    accelerator.end_training()
    return TrainResult(adapter_file, config.max_steps, images, features.skipped, seconds, losses)


def write_samples(config: TrainConfig, pipe, model: TrainingModel, encoder: ImageEncoder, path: Path) -> None:
    """Generate from each sample reference with the adapter as it is now; one contact sheet."""
    from ..generation.generate import GenerationSettings, generate
    from ..generation.pnginfo import save_png
    from ..generation.prompts import ImagePrompt
    from ..sheets import contact_sheet

    if model.attachment is None or not config.sample_images:
        return  # the shared variant has no decoupled attention to generate with
    rows = []
    for ref_path in config.sample_images:
        reference = load_image(ref_path)
        settings = GenerationSettings(prompt="", steps=config.sample_steps, seed=0, num_images=2)
        with torch.no_grad():
            images = generate(pipe, model.attachment, settings, [ImagePrompt([reference], scale=1.0)], [encoder])
        rows.append([reference, *images])
    save_png(contact_sheet(rows, [Path(p).name for p in config.sample_images], ["reference", "sample 1", "sample 2"]),
             path, f"training samples\nSteps: {config.sample_steps}, Seed: 0, Size: {rows[0][1].width}x{rows[0][1].height}")
