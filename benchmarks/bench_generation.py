"""Generation speed: plain diffusers vs imprompt vs diffusers' own IP-Adapter, on one CPU model.

Measured, side by side in one run, on the same seeded model, adapter weights, prompt and seed:

* ``plain``     -- ``StableDiffusionPipeline`` with no adapter (the floor),
* ``ours``      -- ``imprompt.attach`` + ``imprompt.generate`` with one reference image,
* ``diffusers`` -- a copy of the pipeline with ``load_ip_adapter`` of the same weights (official
  nested format), ``set_ip_adapter_scale`` and ``ip_adapter_image=[[ref]]``,

for the base adapter (linear projection of the pooled CLIP embedding to 4 tokens) and the plus
adapter (Perceiver resampler over the 257 penultimate hidden states, 16 tokens, depth 4, width 768,
12 heads, ff_mult 4: the SD1.5 "plus" shape). Each time is seconds per whole generation (text and
image encoding, every denoising step with classifier-free guidance, VAE decode): one warm-up, then
the median of ``--repeats`` runs; contenders are interleaved round by round (in an order rotated each
round), so that load from other processes on the machine hits all of them alike. The ratios to quote
are the paired ones: each round's ours / plain and ours / diffusers, then their median; a slow spell
slows every contender of its round and cancels out of its ratio, where it would not out of a ratio of
medians. Ours is also checked against diffusers' images.

Why ours can be faster than diffusers: the image tokens and their keys/values do not depend on the
latents. Diffusers runs the image projection (``unet.encoder_hid_proj``, for plus a 4-layer
resampler over 257 tokens) inside every UNet call, i.e. at every step, and every IP attention
processor recomputes ``to_k_ip`` / ``to_v_ip`` of those tokens at every step. imprompt projects once
per generation and computes each layer's image K/V once per generation; per step, only the extra
attention over 4 or 16 image tokens remains. The gain is small for base (a linear map of one vector)
and grows with the projection's cost (plus) and with the number of steps.

The model is SD1.5-shaped but smaller (random weights, built in code, nothing is downloaded): UNet
block_out_channels (160, 320, 640) with cross-attention in down/mid/up blocks and
cross_attention_dim 768, a 4-layer CLIP text encoder of width 768, and a ViT-H-shaped CLIP vision
tower (width 1280, 16 heads, patch 14 at 224 px, projection 1024) cut to 4 layers.

    .venv/bin/python benchmarks/bench_generation.py [--steps 10] [--repeats 3] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)
from transformers.utils import logging as transformers_logging

from imprompt import AdapterVariant, GenerationSettings, ImageEncoder, ImagePrompt, adapter_for_unet, attach, generate
from imprompt.adapter.checkpoint import nest

PROMPT, SEED, SCALE, GUIDANCE = "a photo of a red star", 0, 0.6, 7.5


@dataclass(frozen=True)
class Shape:
    unet_channels: tuple[int, ...]
    layers_per_block: int
    latent: int  # latent side; the image side is latent * the VAE's scale factor
    vae_channels: tuple[int, ...]
    dim: int  # cross_attention_dim = text encoder width
    text_layers: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int
    embed_dim: int  # CLIP projection_dim: what the base adapter reads
    resampler_width: int
    resampler_depth: int


# ~1 s per denoising step (batch 2) on 2 CPU threads; image 384 x 384.
FULL = Shape((160, 320, 640), 2, 48, (32, 64, 128, 128), 768, 4, 1280, 4, 16, 224, 14, 1024, 768, 4)
QUICK = Shape((32, 64), 1, 8, (32, 32), 64, 1, 64, 1, 4, 32, 8, 32, 64, 4)  # depth 4: diffusers assumes it


def tokenizer() -> CLIPTokenizer:
    # Character-level CLIP tokenizer built in memory (no vocabulary download).
    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_pipeline(s: Shape) -> StableDiffusionPipeline:
    n = len(s.unet_channels)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=s.unet_channels, layers_per_block=s.layers_per_block, sample_size=s.latent,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=s.dim, attention_head_dim=8,
    ).eval()
    k = len(s.vae_channels)
    vae = AutoencoderKL(block_out_channels=s.vae_channels, down_block_types=("DownEncoderBlock2D",) * k,
                        up_block_types=("UpDecoderBlock2D",) * k, latent_channels=4,
                        sample_size=s.latent * 2 ** (k - 1)).eval()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=190, hidden_size=s.dim, intermediate_size=4 * s.dim, num_hidden_layers=s.text_layers,
        num_attention_heads=max(1, s.dim // 64), max_position_embeddings=77, bos_token_id=188, eos_token_id=189,
        pad_token_id=189)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=processor(s), image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def processor(s: Shape) -> CLIPImageProcessor:
    return CLIPImageProcessor(size=s.image_size, crop_size=s.image_size)


def build_image_encoder(s: Shape) -> CLIPVisionModelWithProjection:
    torch.manual_seed(SEED + 1)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=s.vision_width, intermediate_size=4 * s.vision_width, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch,
        projection_dim=s.embed_dim)).eval()


def build_adapter(unet, kind: str, s: Shape):
    if kind == "base":
        variant = AdapterVariant("linear", s.embed_dim, s.dim, 4)
    else:
        variant = AdapterVariant("plus", s.vision_width, s.dim, 16, resampler_width=s.resampler_width,
                                 resampler_depth=s.resampler_depth, resampler_ff_mult=4)
    torch.manual_seed(SEED + 2)  # random (PyTorch default init) to_k_ip / to_v_ip and projection
    return adapter_for_unet(unet, variant, copy_text_kv=False).eval()


def reference_image(size: int = 256) -> Image.Image:
    generator = torch.Generator().manual_seed(123)
    return Image.fromarray((torch.rand(size, size + 64, 3, generator=generator) * 255).to(torch.uint8).numpy())


def with_diffusers_adapter(pipe, adapter, encoder_model) -> StableDiffusionPipeline:
    """A copy of ``pipe`` with diffusers' own IP-Adapter loaded from the same weights."""
    other = copy.deepcopy(pipe)
    other.image_encoder = encoder_model
    state = nest({k: v.detach().clone() for k, v in adapter.state_dict().items()})
    other.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    other.set_ip_adapter_scale(SCALE)
    other.set_progress_bar_config(disable=True)
    return other


def measure(runners: dict[str, Callable[[], np.ndarray]], repeats: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Warm each runner up once (its images are kept), then ``repeats`` interleaved rounds of timings.
    Round r runs the contenders in an order rotated by r, so that no contender always runs first (or
    right after the same one); ``times[name][r]`` is round r's time, for paired ratios."""
    images = {name: run() for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times, images


def paired(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """``a / b`` round by round: a slow spell of the machine slows both in the same round and cancels."""
    return [x / y for x, y in zip(times[a], times[b])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generation (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 steps: a smoke run of a few seconds")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--steps and --repeats must be at least 1")
    steps = 2 if args.quick else args.steps
    shape = QUICK if args.quick else FULL

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    wall = time.perf_counter()

    pipe = build_pipeline(shape)
    encoder_model = build_image_encoder(shape)
    encoder = ImageEncoder(encoder_model, processor(shape))
    ref = reference_image()
    side = shape.latent * pipe.vae_scale_factor
    print(f"{'quick' if args.quick else 'full'} model: UNet {shape.unet_channels} "
          f"({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M params), image {side}x{side}, "
          f"image encoder {shape.vision_layers} x {shape.vision_width} wide, {steps} steps, guidance {GUIDANCE}, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads")

    call = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np")
    settings = GenerationSettings(prompt=PROMPT, steps=steps, guidance=GUIDANCE, seed=SEED)

    def plain_run() -> np.ndarray:
        return pipe(**call, generator=torch.Generator("cpu").manual_seed(SEED)).images

    rows = []
    for kind in ("base", "plus"):
        ours_pipe = copy.deepcopy(pipe)  # same weights; keeps `pipe` a plain, never-attached pipeline
        adapter = build_adapter(ours_pipe.unet, kind, shape)
        theirs = with_diffusers_adapter(pipe, adapter, encoder_model)
        with attach(ours_pipe.unet, adapter) as attachment:
            runners = {
                "plain": plain_run,
                "ours": lambda: generate(ours_pipe, attachment, settings, [ImagePrompt([ref], scale=SCALE)],
                                         [encoder], output_type="np"),
                "diffusers": lambda: theirs(**call, ip_adapter_image=[[ref]],
                                            generator=torch.Generator("cpu").manual_seed(SEED)).images,
            }
            times, images = measure(runners, args.repeats)
        del ours_pipe, theirs
        rows.append((kind, times, float(np.abs(images["ours"] - images["diffusers"]).max()),
                     float(np.abs(images["ours"] - images["plain"]).max())))
        print(f"  {kind} done ({time.perf_counter() - wall:.0f} s so far)", flush=True)

    for title, stat in ((f"median of {args.repeats}", statistics.median), (f"best of {args.repeats}", min)):
        print(f"\nseconds per generation ({title}, after one warm-up)")
        print(f"{'adapter':8} {'plain':>8} {'ours':>8} {'diffusers':>10} {'ours/plain':>11} {'ours/diffusers':>15}"
              f" {'max|ours-diffusers|':>20} {'max|ours-plain|':>16} {'noise':>6}")
        for kind, times, diff, effect in rows:
            s = {name: stat(t) for name, t in times.items()}
            noise = max((max(t) - min(t)) / statistics.median(t) for t in times.values())
            print(f"{kind:8} {s['plain']:8.3f} {s['ours']:8.3f} {s['diffusers']:10.3f} {s['ours'] / s['plain']:11.3f}"
                  f" {s['ours'] / s['diffusers']:15.3f} {diff:20.2e} {effect:16.3f} {noise:6.0%}")
    print("noise: the largest (max - min) / median among the three contenders' timed runs. Other load on the\n"
          "machine shows up there; the best-of-N times are the least disturbed by it.")
    print(f"\npaired ratios (each round's own ratio; median [min, max] over {args.repeats} rounds): "
          "the figures to quote")
    for kind, times, _, _ in rows:
        cells = []
        for a, b in (("ours", "plain"), ("ours", "diffusers")):
            r = paired(times, a, b)
            cells.append(f"{a}/{b} {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
        print(f"{kind:8} " + "   ".join(cells))
    worst = max(diff for _, _, diff, _ in rows)
    print(f"\nparity with diffusers' IP-Adapter: max abs difference {worst:.2e} "
          f"({'OK' if worst < 1e-4 else 'FAILED'}: threshold 1e-4; images in [0, 1])")
    print(f"total wall time {time.perf_counter() - wall:.1f} s")
    if worst >= 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
