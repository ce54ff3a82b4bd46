"""One training step of the toy UNet (batch 64, 8x8x4 latents, forward + backward + AdamW) in the ways
a CPU build could run it: eager float32 (what the toy build does), channels_last memory format, and
``torch.compile`` (inductor; its first step includes compilation), at 1 and 2 threads.

Each variant runs in its own process (torch's thread pool and compile caches are per process), one
after the other, warm-up step excluded from the median. Issue 15 asked whether channels_last or
torch.compile shortens the toy build on this CPU.

    .venv/bin/python benchmarks/bench_toy_step.py [--steps 8] [--variants eager,channels_last,compile] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(variant: str, threads: int, steps: int) -> dict:
    import torch

    from imprompt.toy import models
    from imprompt.toy.models import SPEC

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = models.unet(SPEC.unet, SPEC.clip.width).train()
    x, t = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,))
    text = torch.randn(64, 24, SPEC.clip.width)
    if variant == "channels_last":
        unet, x = unet.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    forward = torch.compile(unet.forward) if variant == "compile" else unet.forward
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = (forward(x, t, text).sample - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(steps)]
    return {"first": first, "median": statistics.median(times), "best": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default="eager,channels_last,compile")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps)))
        return
    rows = {}
    for threads in (int(t) for t in args.threads.split(",")):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", variant, str(threads)],
                                 capture_output=True, text=True, check=True).stdout
            rows[variant, threads] = json.loads(out.strip().splitlines()[-1])
            r = rows[variant, threads]
            print(f"{variant:14} {threads} thread(s): first step {r['first']:7.2f} s, then median {r['median']:.3f} s "
                  f"(best {r['best']:.3f}); vs eager at {threads}: "
                  f"{rows[('eager', threads)]['median'] / r['median'] if ('eager', threads) in rows else float('nan'):.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
