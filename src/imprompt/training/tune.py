"""One-image tuning: the adapter's prediction first, then a few steps on the references themselves.

E4T (Gal et al. 2023, arXiv 2302.12228, "Designing an Encoder for Fast Personalization of
Text-to-Image Models") predicts a word embedding with an encoder and then fine-tunes it for 5-15
steps on the one image, with a regulariser that keeps it near the prediction. IP-Adapter's image
features are such a prediction, made without any training step. Here they are the starting point
of the same few steps.

**What is tuned**: the image features the adapter's projection reads, one set per reference. For
base adapters these are the CLIP ``image_embeds``; for plus and full-face adapters, the penultimate
hidden states. The base model, the adapter and both encoders stay frozen. The features, rather than
the image tokens or ``to_k_ip`` / ``to_v_ip`` offsets, because the result is then an ordinary embeds
file (:mod:`imprompt.generation.embeds`). ``imprompt generate --embeds``, diffusers'
``ip_adapter_image_embeds`` and ComfyUI's embeds nodes take it with scale, layer weights, combine
modes and text as usual. docs/tuning.md measures it against tuning the image tokens and rank-4
``to_k_ip`` / ``to_v_ip`` offsets: all three as good on held-out combinations, the features the least
harmful on references drawn by other means.

**The loss of one step** (:func:`step_loss`) is the UNet's usual target (epsilon or v) on ``batch``
draws of (reference, timestep, noise), all from the step's own random stream, so a run is
deterministic by seed. The conditions are the references' image prompt (all units' tokens in one
sequence, as ``combine="concat"`` generates) and the prompt's text. An empty prompt asks the image
alone to explain the picture; a caption leaves to the text what it names. Added to it:
``regularise * |f - f0|^2 / |f0|^2``, which keeps the features f near the encoder's prediction f0
(E4T's role for its regulariser: the text must still steer). ``init="unconditional"`` starts from
the encoder's "no image" features instead, with no regulariser: tuning from scratch, the
Textual-Inversion-like baseline the paper compares against.

**The guard** (``guard`` > 0, off by default): tuning helps where the encoder misses something the picture
shows (held-out combinations) and harms references the model cannot draw as they are (pictures drawn by
other means: the descent leaves the region where the adapter keeps colour; docs/tuning.md). After tuning,
``guard`` previews from the tuned features and as many from the encoder's (same seeds) are compared with
the references in the image encoder's embedding space (cosine of ``image_embeds``); the tuned features are
kept only if their previews are the closer. One decision for the whole set of references, as they are
used together. Measured on the toy (n = 40, 2 previews): on drawn references it kept the encoder's
features for 35 of 40, colour 0.875 (encoder 0.925, always tuned 0.45); on held-out pairs it kept the
tuning for 26 of 40, shape 0.875 (encoder 0.575, always tuned 0.975).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..adapter.layers import LayerScales
from ..config import option
from ..encoding import CROP_MODES
from ..generation.embeds import SUFFIXES, ImageFeatures
from .recipe import diffusion_target, step_generator

INITS = ("encoder", "unconditional")
ALL_LAYERS = LayerScales()
GUARD_STEPS, GUARD_GUIDANCE = 20, 3.0  # the guard's previews (the toy measurement's generation settings)


@dataclass(frozen=True)
class TuneOptions:
    """How the features are tuned (see the module doc)."""

    steps: int = 15
    lr: float = 0.05  # per step, in units of the features' RMS
    batch: int = 8
    regularise: float = 0.03
    init: str = "encoder"
    seed: int = 0
    guard: int = 0  # previews per feature set for the guard (module doc); 0: always keep the tuning

    def check(self) -> None:
        if not 0 <= self.guard <= 16:
            raise ValueError(f"guard must be 0 (off) to 16 previews, got {self.guard}")
        if self.steps < 0:
            raise ValueError(f"steps must be 0 or more, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1 (noise draws per step), got {self.batch}")
        for name in ("lr", "regularise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass
class Conditions:
    """What every step shares: the references' latents, the text, the training noise schedule."""

    latents: torch.Tensor  # (references, C, h, w), scaled as the UNet reads them
    text: torch.Tensor  # (1, tokens, dim)
    added: dict | None  # SDXL: pooled text embedding and size conditioning, batch 1
    scheduler: object


@dataclass
class TuneResult:
    features: ImageFeatures
    losses: list[float] = field(default_factory=list)  # the diffusion part of each step's loss
    seconds: float = 0.0
    guard: dict | None = None  # with the guard: each feature set's preview similarity, and which was kept


def fit_picture(image: Image.Image, height: int, width: int) -> Image.Image:
    """The reference as the model's picture: the largest centred crop of the output's aspect, resized
    (what the loss compares the UNet's prediction with)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.BICUBIC)


@torch.no_grad()
def reference_latents(pipe, images: Sequence[Image.Image]) -> torch.Tensor:
    """The references through the pipeline's VAE (its posterior's mean), scaled as the UNet reads latents."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    vae = pipe.vae
    param = next(vae.parameters())
    pixels = pipe.image_processor.preprocess([fit_picture(i, size, size) for i in images], height=size, width=size)
    latents = vae.encode(pixels.to(param)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def text_conditions(pipe, prompt: str) -> tuple[torch.Tensor, dict | None]:
    """The prompt's text states (and SDXL's pooled embedding and size conditioning), without guidance."""
    param = next(pipe.unet.parameters())
    encoded = pipe.encode_prompt(prompt=prompt, device=param.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    text = encoded[0].to(param.dtype)
    if len(encoded) == 2:  # SD 1.x / 2.x: (prompt_embeds, negative); SDXL adds the pooled embeddings
        return text, None
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # SDXL's micro-conditioning: original size, crop corner, target size (the pipeline's defaults).
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=param.device, dtype=param.dtype)
    return text, {"text_embeds": encoded[2].to(param.dtype), "time_ids": time_ids}


def conditions(pipe, images: Sequence[Image.Image], prompt: str = "") -> Conditions:
    from .trainer import _scheduler

    text, added = text_conditions(pipe, prompt)
    return Conditions(reference_latents(pipe, images), text, added, _scheduler(dict(pipe.scheduler.config)))


def _predict(attachment, adapter_index: int, features: torch.Tensor, cond: Conditions, noisy: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
    unet = attachment.unet
    param = next(unet.parameters())
    batch = noisy.shape[0]
    tokens = attachment.adapters[adapter_index].project(features.to(param.dtype))
    sequence = tokens.reshape(1, -1, tokens.shape[-1])  # every unit's tokens in one sequence (concat)
    kv = attachment.layer_kv(adapter_index, sequence, scale=1.0, layer_scales=ALL_LAYERS, batch_repeat=batch)
    call = attachment.prompt_call([kv])
    added = None if cond.added is None else {k: v.expand(batch, -1) for k, v in cond.added.items()}
    return unet(noisy, t, cond.text.expand(batch, -1, -1), added_cond_kwargs=added,
                cross_attention_kwargs=call.cross_attention_kwargs()).sample


def step_loss(attachment, adapter_index: int, features: torch.Tensor, cond: Conditions, generator: torch.Generator,
              batch: int) -> torch.Tensor:
    """The diffusion loss of ``features`` (conditional, (units, ...)) on ``batch`` draws from ``generator``:
    references in turn, uniform timesteps, Gaussian noise."""
    refs = cond.latents.shape[0]
    latents = cond.latents[torch.arange(batch) % refs]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = cond.scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (batch,), generator=generator).to(latents.device)
    noisy = cond.scheduler.add_noise(latents, noise, t)
    target = diffusion_target(cond.scheduler, latents, noise, t)
    pred = _predict(attachment, adapter_index, features, cond, noisy, t)
    return F.mse_loss(pred.float(), target.float())


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """No parameter of ``modules`` requires a gradient inside; each gets its own flag back after.

    The loaded UNet and adapter come with ``requires_grad`` on. Left on, every backward pass would also
    compute (and keep, on a model the server shares between requests) a gradient for each of their
    weights, which tuning never uses."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def distance(features: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """|f - f0|^2 / |f0|^2: the regulariser, the same for any feature width or scale."""
    return (features - anchor).pow(2).sum() / anchor.float().pow(2).sum().clamp_min(1e-12)


def tune_features(attachment, features: ImageFeatures, cond: Conditions, options: TuneOptions = TuneOptions(), *,
                  adapter_index: int = 0, progress: Callable[[int, float], None] | None = None) -> TuneResult:
    """Tune ``features`` (the encoder's, for the references behind ``cond``) for ``options.steps`` steps.

    Zero steps return ``features`` unchanged. ``progress(step, loss)`` is called after every step."""
    options.check()
    adapter = attachment.adapters[adapter_index]
    if adapter.variant.is_faceid:
        raise ValueError("FaceID adapters read face embeddings, not CLIP features; tuning takes CLIP-based adapters")
    if features.output != adapter.variant.encoder_output:
        raise ValueError(f"the features are {features.output}, the {adapter.variant.name} adapter reads "
                         f"{adapter.variant.encoder_output}; encode the references for this adapter")
    if features.regions is not None or features.units_per_reference is not None:
        raise ValueError("tuning takes one unit per reference; encode the references without tiles")
    if features.references != cond.latents.shape[0]:
        raise ValueError(f"{features.references} references' features but {cond.latents.shape[0]} reference images")
    started = time.perf_counter()
    if options.steps == 0:
        return TuneResult(features, [], 0.0)
    device = cond.latents.device
    anchor = features.conditional.detach().to(device, torch.float32)
    start = anchor if options.init == "encoder" else _unconditional(features, anchor)
    # Adam moves every parameter by about lr per step; in units of the features' RMS, one lr suits
    # every encoder (CLIP image_embeds and hidden states differ in scale by orders of magnitude).
    unit = anchor.pow(2).mean().sqrt().clamp_min(1e-12)
    delta = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=options.lr)
    regularise = options.regularise if options.init == "encoder" else 0.0
    losses = []
    with frozen(attachment.unet, *attachment.adapters):
        for step in range(options.steps):
            generator = step_generator(options.seed, step, 0)
            tuned = start + unit * delta
            loss = step_loss(attachment, adapter_index, tuned, cond, generator, options.batch)
            total = loss + regularise * distance(tuned, anchor) if regularise else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, losses[-1])
    note = {"steps": options.steps, "lr": options.lr, "batch": options.batch, "regularise": regularise,
            "init": options.init, "seed": options.seed, "final_loss": round(losses[-1], 6)}
    tuned = (start + unit * delta).detach()
    out = replace(features, conditional=tuned.to(features.conditional), tuning=json.dumps(note))
    return TuneResult(out, losses, time.perf_counter() - started)


def _unconditional(features: ImageFeatures, like: torch.Tensor) -> torch.Tensor:
    if features.unconditional is None:
        raise ValueError("tuning from the unconditional features needs them (encode the references first)")
    return features.unconditional.detach().to(like).expand_as(like).clone()


@torch.no_grad()
def held_out_loss(attachment, features: torch.Tensor, cond: Conditions, draws: int = 64, seed: int = 1_000_003,
                  batch: int = 16, adapter_index: int = 0) -> float:
    """The diffusion loss of ``features`` on ``draws`` fixed draws from a stream tuning never uses (its
    seed is not a tuning seed's first step): the same yardstick for the encoder's and a tuned prompt."""
    total = 0.0
    for i in range(0, draws, batch):
        n = min(batch, draws - i)
        total += step_loss(attachment, adapter_index, features, cond, step_generator(seed, i, 1), n).item() * n
    return total / draws


def tune(pipe, attachment, encoder, images: Sequence[Image.Image], prompt: str = "",
         options: TuneOptions = TuneOptions(), *, adapter_index: int = 0, crop: str = "center",
         progress: Callable[[int, float], None] | None = None) -> TuneResult:
    """References -> the adapter's features for them (:func:`~imprompt.generation.embeds.encode_references`)
    -> tuned on them with ``prompt`` as the text. ``attachment`` holds the adapter on ``pipe.unet``; save
    the result with :func:`~imprompt.generation.embeds.save_embeds` or pass it as ``ImagePrompt(embeds=...)``."""
    from ..generation.embeds import encode_references

    if attachment.unet is not pipe.unet:
        raise ValueError("the adapter is attached to a different UNet than this pipeline's")
    options.check()
    adapter = attachment.adapters[adapter_index]
    features = encode_references(list(images), encoder, adapter.variant.encoder_output, crop)
    features.adapter = adapter.variant.name
    result = tune_features(attachment, features, conditions(pipe, images, prompt), options,
                           adapter_index=adapter_index, progress=progress)
    if options.guard == 0 or options.steps == 0:
        return result
    started = time.perf_counter()
    similarity = {name: preview_similarity(pipe, attachment, encoder, images, prompt, f, options.guard, options.seed,
                                           adapter_index)
                  for name, f in (("encoder", features), ("tuned", result.features))}
    kept = "tuned" if similarity["tuned"] > similarity["encoder"] else "encoder"
    guard = {"previews": options.guard, "similarity": {k: round(v, 6) for k, v in similarity.items()}, "kept": kept}
    note = {**json.loads(result.features.tuning), "guard": guard}
    chosen = result.features if kept == "tuned" else features
    return TuneResult(replace(chosen, tuning=json.dumps(note)), result.losses,
                      result.seconds + time.perf_counter() - started, guard)


@torch.no_grad()
def preview_similarity(pipe, attachment, encoder, images: Sequence[Image.Image], prompt: str, features: ImageFeatures,
                       previews: int, seed: int, adapter_index: int = 0) -> float:
    """How much ``previews`` generations from ``features`` (seeds ``seed``, ``seed + 1``, ...; scale 1, the
    tuning prompt, GUARD_STEPS steps at guidance GUARD_GUIDANCE) look like the references: the mean cosine
    of their image encoder embeddings (``image_embeds``) with the references' mean embedding."""
    from ..generation.batched import BatchItem, generate_batch
    from ..generation.prompts import ImagePrompt
    from ..generation.settings import GenerationSettings

    encoders = [None] * len(attachment.adapters)
    encoders[adapter_index] = encoder
    item = BatchItem(seeds=[seed + k for k in range(previews)], prompt=prompt,
                     image_prompts=[ImagePrompt(embeds=features, adapter=adapter_index, scale=1.0)])
    made = generate_batch(pipe, attachment, GenerationSettings(steps=GUARD_STEPS, guidance=GUARD_GUIDANCE), [item],
                          encoders)[0]

    def embedded(pictures) -> torch.Tensor:
        return F.normalize(encoder.features(encoder.pixels(list(pictures)), "image_embeds").float(), dim=-1)

    target = F.normalize(embedded(images).mean(dim=0), dim=-1)
    return (embedded(made) @ target).mean().item()


@dataclass
class TuneConfig:
    """``imprompt tune``: the flags (the adapter's prediction, then ``steps`` steps on the references)."""

    image: list[str] = field(default_factory=list, metadata=option(
        "reference image; repeat for several views of one subject (one feature set each)", metavar="REF"))
    output: str = field(default="", metadata=option(
        f"the embeds file to write ({' or '.join(SUFFIXES)}), for `imprompt generate --embeds`", short="-o",
        metavar="FILE"))
    model: str = field(default="", metadata=option(
        "Stable Diffusion model (single file, diffusers folder, hub id or name); default: the bundled toy model"))
    adapter: str = field(default="", metadata=option(
        "IP-Adapter checkpoint or name (default with the toy model: its adapter)", metavar="FILE"))
    image_encoder: str | None = field(default=None, metadata=option(
        "image encoder (default: the one the adapter needs)", metavar="PATH"))
    prompt: str = field(default="", metadata=option(
        "the text the references are tuned with: empty asks the image alone to explain them; a caption leaves "
        "what it names to the text"))
    steps: int = field(default=TuneOptions.steps, metadata=option("tuning steps (0: the encoder's features)"))
    lr: float = field(default=TuneOptions.lr, metadata=option("Adam learning rate, in units of the features' RMS"))
    batch: int = field(default=TuneOptions.batch, metadata=option("noise draws per step"))
    regularise: float = field(default=TuneOptions.regularise, metadata=option(
        "weight of |f - f0|^2 / |f0|^2, which keeps the features near the encoder's prediction"))
    init: str = field(default="encoder", metadata=option(
        "start from the encoder's features, or from its 'no image' features (tuning from scratch)",
        choices=list(INITS)))
    seed: int = field(default=0, metadata=option("seed of the noise draws"))
    guard: int = field(default=0, metadata=option(
        "after tuning, make this many previews from the tuned features and from the encoder's, and keep the tuning "
        "only if its previews look more like the references (image encoder similarity); 0: always keep it"))
    crop: str = field(default="center", metadata=option("reference preprocessing for the encoder",
                                                        choices=list(CROP_MODES)))
    models_dir: list[str] = field(default_factory=list, metadata=option(
        "model folders where --model, --adapter and --image-encoder names are looked up", metavar="DIR"))
    model_config: str | None = field(default=None, metadata=option(
        "for a single-file --model: a diffusers folder whose configs to use", metavar="DIR"))
    device: str = field(default="auto", metadata=option("torch device: auto, cpu, cuda, cuda:N or mps"))
    progress: bool = field(default=True, metadata=option("show a progress bar"))

    @property
    def options(self) -> TuneOptions:
        return TuneOptions(self.steps, self.lr, self.batch, self.regularise, self.init, self.seed, self.guard)

    def check(self) -> None:
        if not self.image:
            raise ValueError("imprompt tune needs at least one --image (the subject's reference)")
        if not self.output or Path(self.output).suffix not in SUFFIXES:
            raise ValueError(f"--output must name a {' or '.join(SUFFIXES)} file, got {self.output!r}")
        self.options.check()


def prepare_tune(config: TuneConfig, log: Callable[[str], None] = print, catalog=None):
    """``imprompt.generation.request.prepare`` for a tuning run: the request, adapter options and catalog
    ``imprompt generate`` would have for the same flags, in float32, checked to hold one adapter."""
    from ..generation.request import GenerateRequest, prepare

    # float32 throughout: the gradient runs back through every UNet layer, and fp16 would need the loss
    # scaling that this short loop does not do.
    request = GenerateRequest(model=config.model, models_dir=config.models_dir, model_config=config.model_config,
                              adapter=[config.adapter] if config.adapter else [], image=list(config.image),
                              image_encoder=[config.image_encoder] if config.image_encoder else [],
                              device=config.device, dtype="float32", prompt=config.prompt, crop=config.crop)
    request, options, catalog = prepare(request, log, catalog=catalog)
    if len(options) != 1:
        raise ValueError(f"tuning takes one adapter, got {len(options)}")
    return request, options, catalog


def tune_loaded(models, images: Sequence[Image.Image], prompt: str, options: TuneOptions, *, crop: str = "center",
                progress: Callable[[int, float], None] | None = None) -> TuneResult:
    """:func:`tune` on models loaded for one adapter (``imprompt.generation.loading.load_models``)."""
    from ..adapter.attach import attach

    if len(models.adapters) != 1:
        raise ValueError(f"tuning takes one adapter, got {len(models.adapters)}")
    adapter, encoder = models.adapters[0], models.encoders[0]
    if encoder is None:
        raise ValueError(f"the {adapter.variant.name} adapter reads face embeddings; tuning takes CLIP-based adapters")
    with attach(models.pipe.unet, adapter) as attachment:
        return tune(models.pipe, attachment, encoder, images, prompt, options, crop=crop, progress=progress)


def run_tune(config: TuneConfig, log: Callable[[str], None] = print) -> Path:
    """Check, load the model, the adapter and its encoder (as ``imprompt generate`` does), tune, write."""
    from ..files import check_writable_folder
    from ..generation.embeds import save_embeds
    from ..generation.loading import load_models
    from ..generation.request import read_inputs

    config.check()
    check_writable_folder(Path(config.output).parent, "--output's folder")
    request, adapter_options, catalog = prepare_tune(config, log)
    inputs = read_inputs(request, adapter_options)
    models = load_models(request, adapter_options, catalog)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="tuning", unit="step")

    def progress(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = tune_loaded(models, inputs.prompts[0].images, config.prompt, config.options, crop=config.crop,
                             progress=progress)
    finally:
        if bar is not None:
            bar.close()
    path = save_embeds(config.output, result.features)
    losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
    guard = ""
    if result.guard is not None:
        similarity = result.guard["similarity"]
        guard = (f"; the guard kept the {result.guard['kept']} features (preview similarity: tuned "
                 f"{similarity['tuned']:.4f}, encoder {similarity['encoder']:.4f})")
    log(f"wrote {path}: {result.features.references} reference(s) tuned {config.steps} steps in "
        f"{result.seconds:.1f} s{losses}{guard}; use it with `imprompt generate --embeds {path}`")
    return path
