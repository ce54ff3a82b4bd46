"""The training loop: frozen Stable Diffusion, trainable adapter, accelerate for devices and DDP.

Only the image projection and ``to_k_ip`` / ``to_v_ip`` train (paper section 3.3); ``to_k_ip`` /
``to_v_ip`` start as copies of each layer's ``to_k`` / ``to_v``. The adapter is attached with the same
decoupled-attention processors that generation uses, so what is trained is exactly what runs later.
Checkpoints hold the adapter, optimizer and LR scheduler and the step; data order, noise, timesteps and
dropout are derived from (seed, micro-step, process), so resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.attach import Attachment, adapter_for_unet, attach
from ..adapter.checkpoint import save_adapter
from ..adapter.layers import LayerScales
from ..adapter.model import IPAdapter
from ..adapter.variants import AdapterVariant
from ..encoding import ImageEncoder, load_image
from ..files import check_writable_folder, remove_debris, write_text
from ..models.catalog import Catalog, resolve_name, roots_from
from .checkpoint import adapter_settings, check_resume, checkpoints, find_resume, initial_adapter, load_checkpoint, save_checkpoint  # noqa: F401 (checkpoints: public here too)
from .config import TrainConfig
from .data import SkipCounter, data_fingerprint, open_source
from .features import CachedFeatures, FeatureCache, FrozenModels
from .frozen import denoiser_of, encoder_output_of, load_denoiser, load_frozen, release, source_key
from .recipe import apply_dropout, batch_indices, diffusion_target, dropout_masks, step_generator

log = logging.getLogger(__name__)
ALL_LAYERS = LayerScales()
EXPORT_NAME = "ip_adapter.safetensors"


def build_variant(config: TrainConfig, cross: int, width: int) -> AdapterVariant:
    """The adapter for a UNet of cross-attention width ``cross`` reading image features of width ``width``
    (the encoder's projection_dim for the linear kinds, its hidden_size for plus and full: the last
    dimension of the cached features, so a run with a complete cache needs no image encoder)."""
    if config.variant in ("linear", "shared"):
        return AdapterVariant("linear", width, cross, config.tokens)
    if config.variant == "full":
        return AdapterVariant("full", width, cross, None)
    resampler = config.resampler_width or max(64, min(cross, 1280) // 64 * 64)
    if resampler % 64:
        raise ValueError(f"resampler_width must be a multiple of 64 (64-wide heads), got {resampler}")
    return AdapterVariant("plus", width, cross, config.tokens, resampler_width=resampler,
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


# --- launching -------------------------------------------------------------------------------------

_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launch_warning(world: int, env: Mapping[str, str]) -> str | None:
    """A warning when the launcher asked for another number of processes than the ``world`` that runs.

    ``accelerate launch --num_processes N`` without ``--multi_gpu`` (and without an accelerate config
    that sets it) uses its simple launcher: one process, with ``MASTER_ADDR`` set but no
    ``WORLD_SIZE``. torchrun, ``--multi_gpu`` and mpirun export the world size they started.
    """
    for name in _WORLD_SIZE_VARIABLES:
        if env.get(name, "").strip().isdigit():
            requested = int(env[name])
            if requested != world:
                return (f"{requested} processes were launched ({name}={requested}) but training runs as {world}; "
                        "check the launcher's settings")
            return None
    if world == 1 and "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env:
        return ("accelerate launch was asked for several processes, but only this one runs: without an accelerate "
                "config that enables it, add --multi_gpu (it works on CPUs too): accelerate launch --multi_gpu "
                "--num_processes N -m imprompt train ...; or use torchrun --nproc_per_node N -m imprompt train ...")
    return None


# --- one step --------------------------------------------------------------------------------------

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


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds from set-up to export.

    No VAE, text encoder or image encoder: a cached step needs only the UNet (inside ``model``), and
    ``frozen`` holds the frozen models only when sample sheets are asked for.
    """

    config: TrainConfig
    accelerator: object
    variant: AdapterVariant
    model: TrainingModel  # wrapped by accelerate (DDP) when several processes run
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object
    scaling_factor: float  # the VAE's latent scale
    features: CachedFeatures
    uncond: dict[str, torch.Tensor]
    frozen: FrozenModels | None = None  # pipeline + image encoder, for the sample sheets only
    start_micro: int = 0
    before: dict = field(default_factory=lambda: {"seconds": 0.0, "images_seen": 0})  # earlier runs' totals
    log_with: str | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def trained(self) -> TrainingModel:
        return self.accelerator.unwrap_model(self.model)


def wants_samples(config: TrainConfig) -> bool:
    """Sample sheets need the whole pipeline and the image encoder (the shared variant draws none)."""
    return bool(config.sample_every and config.sample_images) and config.variant != "shared"


def open_features(cache: FeatureCache, config: TrainConfig) -> CachedFeatures:
    features = cache.open()
    if len(features) == 0:
        raise ValueError(f"no usable training images in {config.data} ({len(features.skipped)} skipped; the log "
                         "says why each was)")
    return features


def prepare_features(config: TrainConfig, models: FrozenModels, accelerator, log_fn: Callable[[str], None],
                     data: tuple | None = None, source: str | None = None) -> CachedFeatures:
    """The feature cache of this data and these frozen models, built by the main process if missing.

    ``data``: (records, skip counter, data fingerprint) if already opened; ``source``: this run's
    :func:`~imprompt.training.frozen.source_key`, remembered by the cache so later runs skip the models."""
    records, counter, data_key = data or _open_data(config)
    key = models.fingerprint(config.resolution, config.center_crop, data=data_key, crop_seed=config.seed)
    cache = FeatureCache(cache_root(config), key)
    if accelerator.is_main_process:
        if cache.complete:
            log_fn(f"reusing the feature cache {cache.folder} (same models, resolution, crop and data)")
        else:
            cache.build(models, records, config.resolution, config.center_crop, config.seed, counter,
                        progress=config.progress)
        cache.remember(source)
    accelerator.wait_for_everyone()
    return open_features(cache, config)


def cache_root(config: TrainConfig) -> Path:
    return Path(config.cache_dir or Path(config.output_dir) / "cache")


def _open_data(config: TrainConfig) -> tuple:
    counter = SkipCounter()
    records = open_source(config.data, config.data_root, counter)
    return records, counter, data_fingerprint(config.data, config.data_root, records)


def _scheduler(config: dict):
    """The DDPM noise schedule of a pipeline's scheduler config, read as the pipeline reads it (through the
    config's own scheduler class, whose defaults fill what the file leaves out)."""
    import diffusers

    own = getattr(diffusers, str(config.get("_class_name", "")), None)
    if own is not None and hasattr(own, "from_config"):
        config = own.from_config(config).config
    return diffusers.DDPMScheduler.from_config(config)


def set_up(config: TrainConfig, log_fn: Callable[[str], None]) -> Run:
    """Check a checkpoint to resume, build or reuse the cache, keep the UNet and the adapter.

    The VAE, text and image encoders are loaded only to build the cache (or for sample sheets), and
    dropped once it is built; with a complete cache they are not loaded at all (:mod:`.frozen`)."""
    from accelerate import Accelerator

    log_with = None
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        log_with = "tensorboard"
    if not config.cache:
        raise ValueError("training without the feature cache is not supported yet; set cache: true")
    out = Path(config.output_dir)
    check_writable_folder(out, "--output-dir")  # before the models load and the cache is built
    # On a machine without an accelerator, say so to accelerate: that is what turns several
    # processes (torchrun / accelerate launch --multi_gpu) into multi-CPU DDP over gloo.
    cpu = config.cpu or not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
                              log_with=log_with, project_dir=str(out / "logs"), cpu=cpu)
    warning = launch_warning(accelerator.num_processes, os.environ)
    if warning and accelerator.is_main_process:
        log.warning(warning)
        log_fn(f"warning: {warning}")

    resume = find_resume(config)
    state = json.loads((resume / "state.json").read_text()) if resume is not None else None
    data = _open_data(config)
    source = source_key(config, data[2])
    known = FeatureCache.recall(cache_root(config), source)
    frozen: FrozenModels | None = None
    if known is not None and not wants_samples(config):
        if accelerator.is_main_process:
            log_fn(f"reusing the feature cache {known.folder} (same models, resolution, crop and data; "
                   "the VAE, text and image encoders are not loaded)")
        features = open_features(known, config)
        denoiser = load_denoiser(config, accelerator.device)
        width = features.unconditional["uncond_image"].shape[-1]
        variant = build_variant(config, denoiser.unet.config.cross_attention_dim, width)
        if resume is not None:
            check_resume(resume, state, config, variant)
        initial = initial_adapter(config, variant) if resume is None else None  # resumed: its own weights
    else:
        frozen = load_frozen(config, accelerator.device)
        denoiser = denoiser_of(frozen)
        encoder_config = frozen.encoder.model.config
        width = encoder_config.projection_dim if frozen.encoder_output == "image_embeds" else encoder_config.hidden_size
        variant = build_variant(config, denoiser.unet.config.cross_attention_dim, width)
        if resume is not None:
            check_resume(resume, state, config, variant)  # before hours of caching, not after
        initial = initial_adapter(config, variant) if resume is None else None  # resumed: its own weights
        features = prepare_features(config, frozen, accelerator, log_fn, data, source)
        if not wants_samples(config):
            denoiser, frozen = release(frozen), None  # only the UNet trains on from here
    assert variant.encoder_output == encoder_output_of(config.variant)
    unet = denoiser.unet
    with torch.random.fork_rng():  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        adapter = IPAdapter(variant, {}) if config.variant == "shared" else adapter_for_unet(unet, variant)
    if initial is not None:
        adapter.load_state_dict(initial.state_dict())
        log_fn(f"starting from the adapter {config.init_adapter}")
    if accelerator.is_main_process:
        remove_debris(out / "checkpoints")  # what a kill during a checkpoint write left
    uncond = {k: v.to(accelerator.device) for k, v in features.unconditional.items()}

    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    run = Run(config, accelerator, variant, None, optimizer, lr_scheduler, _scheduler(denoiser.scheduler_config),
              denoiser.scaling_factor, features, uncond, frozen=frozen, log_with=log_with)
    del denoiser
    if resume is not None:
        load_checkpoint(resume, adapter, optimizer, lr_scheduler)
        # From the step, not the saved micro-step, so a changed gradient_accumulation counts steps right.
        run.start_micro = int(state["step"]) * config.gradient_accumulation
        run.before = {k: state.get(k, v) for k, v in run.before.items()}
        log_fn(f"resumed from {resume} (step {state['step']})")
    model = TrainingModel(adapter, unet, shared=config.variant == "shared")
    # The LR scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it
    # once per process, making the warm-up depend on the number of processes.
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    if log_with:
        accelerator.init_trackers("imprompt", config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})
    return run


def train_step(run: Run, micro: int) -> tuple[float, list[int]]:
    """One micro-step on this process; returns its loss and the dataset indices it trained on."""
    config, accelerator = run.config, run.accelerator
    generator = step_generator(config.seed, micro, accelerator.process_index)
    indices = batch_indices(len(run.features), config.seed, micro, accelerator.process_index,
                            accelerator.num_processes, config.batch_size)
    batch = {k: v.to(accelerator.device) for k, v in run.features.batch(indices).items()}
    inputs = step_inputs(batch, run.uncond, generator, config, run.noise_scheduler, run.scaling_factor)
    with accelerator.accumulate(run.model):
        with accelerator.autocast():
            prediction = run.model(inputs.noisy, inputs.timesteps, inputs.text, inputs.image, inputs.added)
        loss = F.mse_loss(prediction.float(), inputs.target.float())
        accelerator.backward(loss)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return loss.item(), indices


def checkpoint(run: Run, step: int, micro_step: int, images: int, seconds: float) -> None:
    """Every process waits; the main one writes ``step-N/`` with the totals so far."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        state = {"micro_step": micro_step, "seconds": run.before["seconds"] + seconds,
                 "images_seen": run.before["images_seen"] + images, "settings": adapter_settings(run.config, run.variant)}
        save_checkpoint(run.out / "checkpoints", step, run.trained.adapter, run.optimizer, run.lr_scheduler,
                        run.config.keep_checkpoints, state)


def export(run: Run, images: int, seconds: float, losses: list[float], seen_keys: list[str],
           log_fn: Callable[[str], None]) -> TrainResult:
    """Write the adapter in the official format, its config and ``summary.json``; detach from the UNet."""
    config, accelerator, out = run.config, run.accelerator, run.out
    accelerator.wait_for_everyone()
    adapter_file = out / EXPORT_NAME
    skipped = run.features.skipped
    if config.record_data:
        write_text(out / f"seen-rank{accelerator.process_index}.json", json.dumps(seen_keys))
    if accelerator.is_main_process:
        save_adapter(run.trained.adapter, adapter_file)
        write_text(out / "ip_adapter.json", config.to_json())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        total_images, total_seconds = run.before["images_seen"] + images, run.before["seconds"] + seconds
        summary = {"steps": config.max_steps, "images_seen": total_images, "seconds": round(total_seconds, 2),
                   "seconds_this_run": round(seconds, 2),
                   "images_per_second": round(total_images / total_seconds, 3) if total_seconds else None,
                   "final_loss": losses[-1] if losses else None, "peak_rss_mb": round(peak, 1),
                   "skipped_images": len(skipped), "skipped": skipped, "variant": run.variant.name}
        write_text(out / "summary.json", json.dumps(summary, indent=2))
        log_fn(f"exported {adapter_file} ({len(skipped)} unreadable images skipped)")
    if run.trained.attachment is not None:
        run.trained.attachment.detach()  # leave the caller's UNet as it was
    accelerator.end_training()
    return TrainResult(adapter_file, config.max_steps, images, skipped, seconds, losses)


def resolve_names(config: TrainConfig) -> TrainConfig:
    """``config`` with --model and --image-encoder names looked up in the --models-dir roots."""
    roots = roots_from(config.models_dir)
    if not roots:
        return config
    catalog = Catalog.scan(roots)
    return dataclasses.replace(
        config, model=resolve_name(config.model, "checkpoint", catalog) if config.model else config.model,
        image_encoder=resolve_name(config.image_encoder, "image_encoder", catalog) if config.image_encoder else "")


def train(config: TrainConfig, log_fn: Callable[[str], None] = print) -> TrainResult:
    """Train an adapter as ``config`` says (resuming a checkpoint if asked) and export it."""
    from tqdm.auto import tqdm

    config = resolve_names(config)
    config.check()
    torch.set_flush_denormal(True)
    run = set_up(config, log_fn)
    accelerator, accumulation = run.accelerator, config.gradient_accumulation
    losses: list[float] = []
    seen_keys: list[str] = []
    bar = tqdm(total=config.max_steps, initial=run.start_micro // accumulation, desc="training",
               disable=not (config.progress and accelerator.is_main_process))
    started, images = time.perf_counter(), 0
    for micro in range(run.start_micro, config.max_steps * accumulation):
        loss, indices = train_step(run, micro)
        images += len(indices) * accelerator.num_processes
        losses.append(loss)
        if config.record_data:
            seen_keys += [run.features.keys[i] for i in indices]
        if not accelerator.sync_gradients:
            continue
        step = (micro + 1) // accumulation
        rate = images / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
        if step % config.log_every == 0 and run.log_with:
            accelerator.log({"loss": loss, "images_per_second": rate, "lr": run.lr_scheduler.get_last_lr()[0]}, step=step)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            checkpoint(run, step, micro + 1, images, time.perf_counter() - started)
        if wants_samples(config) and step % config.sample_every == 0 and accelerator.is_main_process:
            write_samples(config, run.frozen.pipe, run.trained, run.frozen.encoder, run.out / "samples" / f"step-{step:08d}.png")
    bar.close()
    return export(run, images, time.perf_counter() - started, losses, seen_keys, log_fn)


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
