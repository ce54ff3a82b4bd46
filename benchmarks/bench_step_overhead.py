"""imprompt's cost per UNet call: plain, imprompt and diffusers' IP-Adapter calls alternated one by one, paired ratios.

    .venv/bin/python benchmarks/bench_step_overhead.py [--kind base|plus] [--rounds 12] [--threads 1]

Whole generations on this machine vary by up to 30% between runs of the same contender (docs/benchmarks.md),
which hides a 2% difference. One UNet call (bench_generation's mid-size model, batch 2 as with guidance) is
short enough that the machine's speed barely moves between the calls of a round: each round's ratios,
then their median and quartiles. The adapted UNet has the image keys/values computed once, as in a
generation, so the ratio is the decoupled attention's per-step cost alone. The diffusers UNet has
``load_ip_adapter`` of the same weights and gets the same features as ``image_embeds``, as its pipeline
passes them at every step: it projects them and computes their keys/values inside each call. Ours and
theirs give the same output (checked).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_generation import FULL, SCALE, build_adapter, build_pipeline, with_diffusers_adapter
from imprompt import attach
from imprompt.adapter.layers import LayerScales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("base", "plus"), default="base")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    shape = FULL
    pipe = build_pipeline(shape)
    plain = pipe.unet
    adapted = copy.deepcopy(plain)
    adapter = build_adapter(adapted, args.kind, shape)
    theirs = with_diffusers_adapter(pipe, adapter, None).unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, shape.latent, shape.latent, generator=generator)
    text = torch.randn(2, 77, shape.dim, generator=generator)
    # (unconditional, conditional) features: CLIP image_embeds for base, penultimate patch states for plus
    features = (torch.randn(2, shape.embed_dim, generator=generator) if args.kind == "base" else
                torch.randn(2, (shape.image_size // shape.patch) ** 2 + 1, shape.vision_width, generator=generator))
    t = torch.tensor(500)
    with attach(adapted, adapter) as attachment, torch.no_grad():
        tokens = adapter.project(features)
        kwargs = attachment.prompt_call([attachment.layer_kv(0, tokens, scale=SCALE, layer_scales=LayerScales())]
                                        ).cross_attention_kwargs()
        image_embeds = {"image_embeds": [features.unsqueeze(1)]}  # (batch, images, ...) per adapter
        calls = {"plain": lambda: plain(latents, t, text),
                 "imprompt": lambda: adapted(latents, t, text, cross_attention_kwargs=kwargs),
                 "diffusers": lambda: theirs(latents, t, text, added_cond_kwargs=image_embeds)}
        outputs = {name: call().sample for name, call in calls.items()}  # warm-up, and the parity check
        parity = (outputs["imprompt"] - outputs["diffusers"]).abs().max().item()
        effect = (outputs["imprompt"] - outputs["plain"]).abs().max().item()
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for pair in range(args.rounds):
            names = list(calls)
            for name in names[pair % 3:] + names[:pair % 3]:  # each contender first, second, third in turn
                start = time.perf_counter()
                calls[name]()
                seconds[name].append(time.perf_counter() - start)
    print(f"{args.kind} adapter, mid-size UNet, batch 2, {args.threads} thread(s), {args.rounds} rounds:")
    medians = ", ".join(f"{name} {statistics.median(seconds[name]):.3f} s" for name in calls)
    print(f"  {medians} per call (medians)")
    print(f"  max |imprompt - diffusers| {parity:.2e} (the adapter's effect: max |imprompt - plain| {effect:.3f})")
    for other in ("plain", "diffusers"):
        ratios = [a / b for a, b in zip(seconds["imprompt"], seconds[other])]
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"  imprompt / {other} per call: median {statistics.median(ratios):.3f}, "
              f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}")


if __name__ == "__main__":
    main()
