"""Training throughput: the feature cache against recomputing every frozen feature each step.

The official training scripts run the VAE encoder, the text encoder and the CLIP image encoder on
every batch, at every step, although all three are frozen. imprompt computes those features once
(``imprompt.training.features``) and a step runs only the UNet with the adapter. This script times
both on the same models, the same batch and the same adapter, in one run, and prints images/s and
the ratio. Each mode runs in its own subprocess so that its peak memory (max RSS) is its own.

Two model sizes: a small SD-shaped model, and SD1.5's real architecture (860M-parameter UNet, a
ViT-H-sized image encoder) at reduced resolution (128 px -> 16x16 latents), random weights.
Run: ``python benchmarks/bench_training.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

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


def measure(size: str, modes: tuple[str, ...], batch: int, steps: int) -> dict:
    """Seconds per step of each mode, steps interleaved (so background load hits both alike)."""
    from PIL import Image

    from imprompt.adapter.attach import adapter_for_unet
    from imprompt.encoding import ImageEncoder
    from imprompt.training.config import TrainConfig
    from imprompt.training.data import Record, SkipCounter
    from imprompt.training.features import FrozenModels
    from imprompt.training.trainer import TrainingModel, build_variant, step_inputs

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    pipe, vision, processor, resolution = build(size)
    encoder = ImageEncoder(vision, processor)
    config = TrainConfig(model="-", image_encoder="-", data="-", resolution=resolution, batch_size=batch)
    adapter = adapter_for_unet(pipe.unet, build_variant(config, pipe.unet, encoder))
    models = FrozenModels(pipe, encoder, "image_embeds")
    model = TrainingModel(adapter, pipe.unet, shared=False)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)

    def png(i: int) -> bytes:
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (resolution + 16, resolution), (i * 40 % 256, 90, 200)).save(buffer, format="PNG")
        return buffer.getvalue()

    records = [Record(f"{i}", lambda i=i: png(i), f"a picture number {i}") for i in range(batch)]
    cached = models.encode(records, resolution, True, 0, SkipCounter()) if "cache" in modes else None
    uncond = models.unconditional()
    timings: dict[str, list[float]] = {m: [] for m in modes}
    for step in range(steps + 1):  # the first round warms up and is not counted
        for mode in modes:
            start = time.perf_counter()
            # "recompute" is what the official scripts do: every frozen encoder on every batch.
            features = models.encode(records, resolution, True, 0, SkipCounter()) if mode == "recompute" else cached
            inputs = step_inputs({k: v for k, v in features.items() if k != "_keys"}, uncond,
                                 torch.Generator().manual_seed(step), config, pipe.scheduler, pipe.vae.config.scaling_factor)
            prediction = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.image)
            torch.nn.functional.mse_loss(prediction, inputs.target).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:
                timings[mode].append(time.perf_counter() - start)
    median = {m: sorted(t)[len(t) // 2] for m, t in timings.items()}
    return {"seconds_per_step": median, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(size: str, modes: str, batch: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", size, modes, str(batch), str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model only, few steps")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, modes, batch, steps = args.child
        print(json.dumps(measure(size, tuple(modes.split(",")), int(batch), int(steps))))
        return
    cases = [("small", 32, args.steps)] if args.quick else [("small", 32, args.steps), ("sd15", 2, max(2, args.steps // 2))]
    print(f"{'model':6} {'batch':>5} {'mode':>9} {'img/s':>8} {'s/step':>8} {'peak RSS MB':>12}")
    for size, batch, steps in cases:
        timing = child(size, "recompute,cache", batch, steps)["seconds_per_step"]
        # Peak memory: each mode alone in its own process (one measured step is enough).
        peaks = {mode: child(size, mode, batch, 1)["peak_rss_mb"] for mode in ("recompute", "cache")}
        for mode in ("recompute", "cache"):
            print(f"{size:6} {batch:>5} {mode:>9} {batch / timing[mode]:8.2f} {timing[mode]:8.3f} {peaks[mode]:12.0f}")
        print(f"{size:6} cache / recompute throughput: {timing['recompute'] / timing['cache']:.2f}x")


if __name__ == "__main__":
    main()
