"""imprompt's cost per UNet call: plain calls and adapted calls alternated one by one, paired ratios.

    .venv/bin/python benchmarks/bench_step_overhead.py [--kind base|plus] [--pairs 12] [--threads 1]

Whole generations on this machine vary by up to 30% between runs of the same contender (docs/benchmarks.md),
which hides a 2% difference. One UNet call (bench_generation's mid-size model, batch 2 as with guidance) is
short enough that the machine's speed barely moves between the two calls of a pair: each pair's ratio,
then their median and quartiles. The adapted UNet has the image keys/values computed once, as in a
generation, so the ratio is the decoupled attention's per-step cost alone.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_generation import FULL, build_adapter, build_pipeline
from imprompt import attach
from imprompt.adapter.layers import LayerScales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("base", "plus"), default="base")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    shape = FULL
    plain = build_pipeline(shape).unet
    adapted = copy.deepcopy(plain)
    adapter = build_adapter(adapted, args.kind, shape)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, shape.latent, shape.latent, generator=generator)
    text = torch.randn(2, 77, shape.dim, generator=generator)
    tokens = torch.randn(2, adapter.variant.num_tokens, shape.dim, generator=generator)
    t = torch.tensor(500)
    with attach(adapted, adapter) as attachment, torch.no_grad():
        kwargs = attachment.prompt_call([attachment.layer_kv(0, tokens, scale=0.6, layer_scales=LayerScales())]
                                        ).cross_attention_kwargs()
        calls = {"plain": lambda: plain(latents, t, text), "imprompt": lambda: adapted(latents, t, text,
                                                                                      cross_attention_kwargs=kwargs)}
        for call in calls.values():  # warm-up
            call()
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for pair in range(args.pairs):
            for name in (list(calls) if pair % 2 == 0 else list(calls)[::-1]):
                start = time.perf_counter()
                calls[name]()
                seconds[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds["imprompt"], seconds["plain"])]
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"{args.kind} adapter, mid-size UNet, batch 2, {args.threads} thread(s), {args.pairs} pairs:")
    plain, ours = (statistics.median(seconds[name]) for name in ("plain", "imprompt"))
    print(f"  plain {plain:.3f} s, imprompt {ours:.3f} s per call (medians)")
    print(f"  imprompt / plain per call: median {statistics.median(ratios):.3f}, "
          f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}")


if __name__ == "__main__":
    main()
