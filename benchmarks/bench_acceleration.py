"""Step skipping, measured: plain vs T-GATE vs DeepCache (``imprompt.generation.acceleration``).

Two parts, each run side by side and interleaved (every reference or round runs the three
contenders in a rotating order, so load from other processes on the machine hits all alike):

1. **The toy world** (``imprompt.toy``: the bundled toy model, its IP-Adapter and image encoder; 20
   steps of the model's own scheduler, guidance 3, as ``configs/toy-eval.yaml``): speed *and*
   attribute accuracy, read back from the pixels by the toy attribute reader (``imprompt.toy.judge``).
   ``--n`` test references, one generation each (seed = the reference's index, the same in every
   contender):

   * image only: empty text, IP-Adapter scale 1; accuracy per content attribute (shape, colour,
     background, style) against the reference, and their mean;
   * image + text: the reference and a text changing one attribute (``judge.edit_plan``), scale 0.5;
     per content attribute, whether the generation shows the asked value, and their mean.

   Time is seconds per whole generation (text and image encoding, the steps, VAE decode).

2. **The mid-size SD1.5-shaped model** of ``bench_generation.py`` (random weights, 384 x 384,
   ~1 s per step on 2 threads; ``--quick``: its tiny shape): speed only, with one image prompt.

    .venv/bin/python benchmarks/bench_acceleration.py [--n 200] [--tgate 8 ...] [--deepcache 3 ...]
        [--skip-toy] [--skip-mid] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate  # noqa: E402

CONTENT = ("shape", "color", "background", "style")


def contenders(gates: list[int], intervals: list[int]) -> dict[str, str | None]:
    """Name -> the ``acceleration`` argument: plain, then each gate step and each interval."""
    names = [f"tgate:{g}" for g in gates] + [f"deepcache:{n}" for n in intervals]
    return {"plain": None, **{name: name for name in names}}


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def toy(args) -> None:
    from imprompt.adapter.checkpoint import load_adapter
    from imprompt.generation.pipelines import load_pipeline
    from imprompt.toy import judge, toy_paths

    paths = toy_paths()
    pipe = load_pipeline(paths["model"])
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(paths["adapter"], torch.float32)
    encoder = ImageEncoder.load(paths["image_encoder"], torch.float32)
    pairs = judge.reference_set("test", args.n)
    runs = contenders(args.tgate, args.deepcache)
    names = list(runs)
    times = {name: [] for name in names}
    reads = {task: {name: [] for name in names} for task in ("image", "edit")}
    wall = time.perf_counter()
    with attach(pipe.unet, adapter) as attachment:
        for i, (sample, edit) in enumerate(pairs):
            for task, prompt, scale in (("image", "", 1.0), ("edit", edit.text, 0.5)):
                settings = GenerationSettings(prompt=prompt, steps=args.steps, guidance=args.guidance, seed=i)
                k = i % len(names)
                order = names[k:] + names[:k]  # rotate, so no contender always runs first
                for name in order:
                    image, seconds = timed(lambda: generate(
                        pipe, attachment, settings, [ImagePrompt([sample.image], scale=scale)], [encoder],
                        acceleration=runs[name])[0])
                    times[name].append(seconds)
                    reads[task][name].append(judge.read(image))
            if (i + 1) % 25 == 0 and i + 1 < args.n:  # partial tables, in case the run must be cut short
                report(args, pairs[:i + 1], names, times, reads, time.perf_counter() - wall)

    report(args, pairs, names, times, reads, time.perf_counter() - wall)


def report(args, pairs, names, times, reads, seconds: float) -> None:
    from imprompt.toy import judge

    n = len(pairs)
    truths = [s.attributes for s, _ in pairs]
    expected = [e.expected for _, e in pairs]
    print(f"\ntoy world: {n} test references x (image only, image + text), {args.steps} steps, guidance "
          f"{args.guidance:g}, {torch.get_num_threads()} thread(s), {seconds:.0f} s")
    header = ("contender", "s/gen", "speed-up", *[f"img {c}" for c in CONTENT], "img mean",
              *[f"edit {c}" for c in CONTENT], "edit mean", "edit both")
    print(" | ".join(header), flush=True)
    base = statistics.median(times["plain"])
    for name in names:
        image = {c: np.mean([getattr(r, c) == getattr(t, c) for r, t in zip(reads["image"][name], truths)])
                 for c in CONTENT}
        edit = {c: np.mean([getattr(r, c) == getattr(e, c) for r, e in zip(reads["edit"][name], expected)])
                for c in CONTENT}
        both = np.mean([judge.edit_hits(r, s.attributes, e.changed, e.expected)["both"]
                        for r, (s, e) in zip(reads["edit"][name], pairs)])
        t = statistics.median(times[name])
        print(" | ".join([name, f"{t:.3f}", f"{base / t:.2f}x", *[f"{image[c]:.1%}" for c in CONTENT],
                          f"{np.mean(list(image.values())):.1%}", *[f"{edit[c]:.1%}" for c in CONTENT],
                          f"{np.mean(list(edit.values())):.1%}", f"{both:.1%}"]))
    print("s/gen: median seconds per generation over all 2n generations; speed-up: plain's median / this one's.",
          flush=True)


def mid(args) -> None:
    import bench_generation as bg

    shape = bg.QUICK if args.quick else bg.FULL
    steps = 4 if args.quick else args.mid_steps
    pipe = bg.build_pipeline(shape)
    encoder = ImageEncoder(bg.build_image_encoder(shape), bg.processor(shape))
    adapter = bg.build_adapter(pipe.unet, "base", shape)
    ref = bg.reference_image()
    settings = GenerationSettings(prompt=bg.PROMPT, steps=steps, guidance=bg.GUIDANCE, seed=bg.SEED)
    runs = contenders([min(g, steps - 1) for g in args.mid_tgate], args.deepcache)
    side = shape.latent * pipe.vae_scale_factor
    print(f"\nmid-size model ({'quick' if args.quick else 'full'}): UNet {shape.unet_channels}, image {side}x{side}, "
          f"{steps} steps, guidance {bg.GUIDANCE}, base adapter, {args.repeats} repeats after one warm-up, "
          f"{torch.get_num_threads()} thread(s)")
    times = {name: [] for name in runs}
    images = {}
    with attach(pipe.unet, adapter) as attachment:
        def run(name):
            return generate(pipe, attachment, settings, [ImagePrompt([ref], scale=bg.SCALE)], [encoder],
                            output_type="np", acceleration=runs[name])
        for name in runs:
            images[name] = run(name)
        for r in range(args.repeats):
            names, k = list(runs), r % len(runs)
            for name in names[k:] + names[:k]:
                times[name].append(timed(lambda: run(name))[1])
    base = statistics.median(times["plain"])
    print("contender | s/gen (median) | best | speed-up (median) | mean |image - plain| (0..1)")
    for name, t in times.items():
        print(f"{name} | {statistics.median(t):.2f} | {min(t):.2f} | {base / statistics.median(t):.2f}x | "
              f"{float(np.abs(images[name] - images['plain']).mean()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="toy test references (default 200)")
    parser.add_argument("--steps", type=int, default=20, help="toy steps (default 20)")
    parser.add_argument("--guidance", type=float, default=3.0, help="toy guidance (default 3)")
    parser.add_argument("--tgate", type=int, action="append", help="T-GATE gate step for the toy world, repeatable "
                        "(default 8 of 20: T-GATE's suggestion of about 40%%)")
    parser.add_argument("--deepcache", type=int, action="append", help="DeepCache interval, repeatable (default 3)")
    parser.add_argument("--mid-steps", type=int, default=10, help="mid-size model steps (default 10)")
    parser.add_argument("--mid-tgate", type=int, action="append", help="mid-size model gate step, repeatable (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="mid-size timed rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="mid-size part on the tiny shape, 4 steps")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = parser.parse_args()
    args.tgate, args.deepcache, args.mid_tgate = args.tgate or [8], args.deepcache or [3], args.mid_tgate or [4]
    if args.n < 1 or min(args.tgate + args.mid_tgate) < 1 or min(args.deepcache) < 2:
        parser.error("--n and --tgate must be at least 1, --deepcache at least 2")
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    if not args.skip_toy:
        toy(args)
    if not args.skip_mid:
        mid(args)


if __name__ == "__main__":
    main()
