"""Training throughput and memory: the feature cache against recomputing every frozen feature each step.

The official training scripts run the VAE encoder, the text encoder and the CLIP image encoder on
every batch, at every step, although all three are frozen; they do it in fp16 (weights cast to the
mixed-precision dtype, autocast on). imprompt computes those features once
(``imprompt.training.features``); a step then runs only the UNet with the adapter, and the frozen
encoders are not even loaded (``imprompt.training.frozen``). Three modes, each in its own subprocess
so that its peak memory (max RSS) is its own:

- ``recompute``: every frozen encoder on every batch, float32 (the official recipe at our precision);
- ``official``: the same in the official scripts' mixed precision: frozen models cast to bf16 with bf16
  autocast on a CPU (fp16 on CUDA, as the scripts), the adapter in float32;
- ``cache``: imprompt's trainer itself (``set_up`` on a complete cache, then ``train_step``), the
  models saved to and loaded from a diffusers folder as a user's would be.

Two model sizes: a small SD-shaped model, and SD1.5's real architecture (860M-parameter UNet, a
ViT-H-sized image encoder) at reduced resolution (128 px -> 16x16 latents), random weights.
Run: ``python benchmarks/bench_training.py [--quick] [--steps N] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(size: str):
    """Frozen pipeline pieces and an adapter of the given size, random weights, fixed seed."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 defaults
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
        text = CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77)
        vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                  image_size=224, patch_size=14, projection_dim=1024)
        resolution = 128
    else:
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8)
        text = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4, projection_dim=32)
        resolution = 32
    vocab = {chr(i): i - 33 for i in range(33, 127)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(list(vocab))})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=CLIPTextModel(text).eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDPMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    encoder = CLIPVisionModelWithProjection(vision).eval()
    return pipe, encoder, CLIPImageProcessor(size=vision.image_size, crop_size=vision.image_size), resolution


def png(i: int, resolution: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (resolution + 16, resolution), (i * 40 % 256, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def train_config(work: Path, size: str, batch: int, resolution: int):
    from imprompt.training.config import TrainConfig

    return TrainConfig(model=str(work / size / "sd"), image_encoder=str(work / size / "encoder"), data=str(work / size / "data"),
                       output_dir=str(work / size / "run"), cache_dir=str(work / size / "cache"), resolution=resolution,
                       batch_size=batch, max_steps=10_000, checkpoint_every=10_000, progress=False, seed=0)


def prepare(size: str, batch: int, work: Path) -> dict:
    """Save the models as a diffusers folder and a transformers folder, write the data, build the cache."""
    from imprompt.training.trainer import set_up

    folder = work / size
    if not (folder / "ready").is_file():
        pipe, vision, processor, resolution = build(size)
        pipe.save_pretrained(folder / "sd")
        vision.save_pretrained(folder / "encoder")
        processor.save_pretrained(folder / "encoder")
        del pipe, vision
        (folder / "data").mkdir(parents=True, exist_ok=True)
        for i in range(batch):
            (folder / "data" / f"{i:03d}.png").write_bytes(png(i, resolution))
            (folder / "data" / f"{i:03d}.txt").write_text(f"a picture number {i}")
        set_up(train_config(work, size, batch, resolution), log_fn=lambda m: None)
        (folder / "ready").write_text(str(resolution))
    return {"resolution": int((folder / "ready").read_text())}


def measure(size: str, modes: str, batch: int, steps: int, work: Path) -> dict:
    """Median seconds per step of each mode, steps interleaved when several run here (so that background
    load hits them alike; the first step warms up and is not counted), and this process's peak RSS."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    step_fns = {m: cache_steps(size, batch, work) if m == "cache" else recompute_steps(size, m, batch)
                for m in modes.split(",")}
    seconds: dict[str, list[float]] = {m: [] for m in step_fns}
    for step in range(steps + 1):
        for mode, fn in step_fns.items():
            start = time.perf_counter()
            fn(step)
            if step:
                seconds[mode].append(time.perf_counter() - start)
    median = {m: sorted(t)[len(t) // 2] for m, t in seconds.items()}
    return {"seconds_per_step": median, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cache_steps(size: str, batch: int, work: Path):
    """imprompt's trainer as it runs: the cache is complete, so only the UNet (and the adapter) load."""
    from imprompt.training.trainer import set_up, train_step

    resolution = int((work / size / "ready").read_text())
    messages: list[str] = []
    run = set_up(train_config(work, size, batch, resolution), log_fn=messages.append)
    assert run.frozen is None and any("are not loaded" in m for m in messages), messages  # the UNet alone
    return lambda step: train_step(run, step)


def recompute_steps(size: str, mode: str, batch: int):
    """The official scripts' step: every frozen encoder on every batch; ``official``: in mixed precision."""
    from imprompt.adapter.attach import adapter_for_unet
    from imprompt.encoding import ImageEncoder
    from imprompt.training.config import TrainConfig
    from imprompt.training.data import Record, SkipCounter
    from imprompt.training.features import FrozenModels
    from imprompt.training.trainer import TrainingModel, build_variant, step_inputs

    pipe, vision, processor, resolution = build(size)
    encoder = ImageEncoder(vision, processor)
    config = TrainConfig(model="-", image_encoder="-", data="-", resolution=resolution, batch_size=batch)
    adapter = adapter_for_unet(pipe.unet, build_variant(config, pipe.unet.config.cross_attention_dim,
                                                        vision.config.projection_dim))
    autocast = contextlib.nullcontext()
    if mode == "official":
        # tutorial_train.py: vae, text_encoder, image_encoder and unet .to(weight_dtype); the adapter
        # stays float32 and accelerate's autocast runs the step. bf16 is the CPU's half type.
        half = torch.float16 if torch.cuda.is_available() else torch.bfloat16
        pipe.to(dtype=half)
        vision.to(dtype=half)
        autocast = torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=half)
    models = FrozenModels(pipe, encoder, "image_embeds")
    model = TrainingModel(adapter, pipe.unet, shared=False)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
    records = [Record(f"{i}", lambda i=i: png(i, resolution), f"a picture number {i}") for i in range(batch)]
    with autocast:
        uncond = models.unconditional()

    def step_fn(step: int) -> None:
        with autocast:
            features = models.encode(records, resolution, True, 0, SkipCounter())
            inputs = step_inputs({k: v for k, v in features.items() if k != "_keys"}, uncond,
                                 torch.Generator().manual_seed(step), config, pipe.scheduler, pipe.vae.config.scaling_factor)
            prediction = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.image)
        torch.nn.functional.mse_loss(prediction.float(), inputs.target.float()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return step_fn


def child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model only")
    parser.add_argument("--sd15-only", action="store_true", help="SD1.5 architecture only")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per mode (SD1.5: half, at least 1)")
    parser.add_argument("--modes", default="recompute,official,cache")
    parser.add_argument("--interleave", action="store_true", help="also time recompute and cache steps interleaved "
                        "in one process (fairer under changing load; its memory holds both, so no RSS from it)")
    parser.add_argument("--work", default=None, help="folder for the saved models and caches (default: a temporary one)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, size, batch, *rest = args.child
        work = Path(rest[-1])
        if kind == "prepare":
            print(json.dumps(prepare(size, int(batch), work)))
        else:
            print(json.dumps(measure(size, kind, int(batch), int(rest[0]), work)))  # kind: comma-separated modes
        return
    cases = [("small", 32, args.steps), ("sd15", 2, max(1, args.steps // 2))]
    cases = cases[:1] if args.quick else cases[1:] if args.sd15_only else cases
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        print(f"{'model':6} {'batch':>5} {'mode':>9} {'img/s':>8} {'s/step':>8} {'peak RSS MB':>12}  load")
        for size, batch, steps in cases:
            child("prepare", size, batch, work)
            results = {}
            for mode in modes:
                r = child(mode, size, batch, steps, work)
                results[mode] = {"seconds_per_step": r["seconds_per_step"][mode], "peak_rss_mb": r["peak_rss_mb"]}
                r = results[mode]
                print(f"{size:6} {batch:>5} {mode:>9} {batch / r['seconds_per_step']:8.3f} {r['seconds_per_step']:8.3f} "
                      f"{r['peak_rss_mb']:12.0f}  {os.getloadavg()[0]:.1f}", flush=True)
            if "cache" in results:
                for mode in (m for m in modes if m != "cache"):
                    speed = results[mode]["seconds_per_step"] / results["cache"]["seconds_per_step"]
                    memory = results["cache"]["peak_rss_mb"] / results[mode]["peak_rss_mb"]
                    print(f"{size:6} cache vs {mode}: {speed:.2f}x throughput, {memory:.0%} of its peak RSS")
            if args.interleave:
                timing = child("recompute,cache", size, batch, steps, work)["seconds_per_step"]
                print(f"{size:6} interleaved in one process: recompute {timing['recompute']:.3f} s/step, cache "
                      f"{timing['cache']:.3f} s/step: {timing['recompute'] / timing['cache']:.2f}x  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
