"""Tiled references on wide images, measured in the toy world; writes docs/tiled-references.md.

Each reference is 64x32: two toy shapes side by side (two 32x32 renders, different shape and colour,
one background). The toy encoder sees 32x32, so the usual centre crop keeps the right half of the
first shape and the left half of the second. Each setting generates from the wide reference alone
(empty text) with the shipped toy model and IP-Adapter, and the attribute reader
(:func:`imprompt.toy.judge.read_many`) says which shape, colour and background each picture shows.

    PYTHONPATH=src python benchmarks/tiled_references.py [--pairs 24] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imprompt import toy
from imprompt.adapter.attach import attach
from imprompt.adapter.checkpoint import load_adapter
from imprompt.encoding import ImageEncoder
from imprompt.files import write_text
from imprompt.generation.generate import generate
from imprompt.generation.pipelines import load_pipeline
from imprompt.generation.prompts import ImagePrompt
from imprompt.generation.settings import GenerationSettings
from imprompt.generation.tiles import TileOptions
from imprompt.toy import shapes
from imprompt.toy.judge import read_many

# name -> (ImagePrompt options, output width)
SETTINGS = {
    "centre crop (untiled)": ({}, 32),
    "pad to square (untiled)": ({"crop": "pad"}, 32),
    "tiles": ({"tiles": TileOptions()}, 32),
    "tiles + enhance": ({"tiles": TileOptions(enhance=True)}, 32),
    "centre crop, 64x32 output": ({}, 64),
    "tiles, 64x32 output": ({"tiles": TileOptions()}, 64),
    "masked tiles, 64x32 output": ({"tiles": TileOptions(masks=True)}, 64),
}


def pairs(n: int, seed: int) -> list[tuple[shapes.Attributes, shapes.Attributes]]:
    rng = random.Random(f"tiled-{seed}")
    out = []
    while len(out) < n:
        sa, sb = rng.sample(shapes.SHAPES, 2)
        ca, cb = rng.sample(shapes.COLORS, 2)
        backgrounds = [b for b in shapes.BACKGROUNDS if b not in (ca, cb)]
        bg = rng.choice(backgrounds)
        out.append((shapes.Attributes(sa, ca, bg, "solid", "large", "center"),
                    shapes.Attributes(sb, cb, bg, "solid", "large", "center")))
    return out


def wide(a: shapes.Attributes, b: shapes.Attributes) -> Image.Image:
    image = Image.new("RGB", (64, 32))
    image.paste(shapes.render(a), (0, 0))
    image.paste(shapes.render(b), (32, 0))
    return image


def same(read: shapes.Attributes, truth: shapes.Attributes) -> bool:
    return read.shape == truth.shape and read.color == truth.color


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", type=Path, default=Path("docs/tiled-references.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    paths = toy.toy_paths()
    pipe = load_pipeline(paths["model"])
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(paths["adapter"], torch.float32)
    encoder = ImageEncoder.load(paths["image_encoder"], torch.float32)
    references = pairs(args.pairs, 0)
    results, started = {}, time.perf_counter()
    with attach(pipe.unet, [adapter]) as attachment:
        for name, (options, width) in SETTINGS.items():
            counts = {"first": 0, "second": 0, "either": 0, "background": 0, "left first": 0, "right second": 0,
                      "both in place": 0}
            for i, (a, b) in enumerate(references):
                settings = GenerationSettings(
                    prompt="", steps=args.steps, guidance=args.guidance, num_images=args.samples, width=width,
                    height=32, extra={"generator": [torch.Generator().manual_seed(i * args.samples + j)
                                                    for j in range(args.samples)]})
                images = generate(pipe, attachment, settings, [ImagePrompt([wide(a, b)], scale=args.scale, **options)],
                                  [encoder])
                if width == 32:
                    for r in read_many(images):
                        counts["first"] += same(r, a)
                        counts["second"] += same(r, b)
                        counts["either"] += same(r, a) or same(r, b)
                        counts["background"] += r.background == a.background
                else:
                    lefts = read_many([im.crop((0, 0, 32, 32)) for im in images])
                    rights = read_many([im.crop((32, 0, 64, 32)) for im in images])
                    for left, right in zip(lefts, rights):
                        counts["left first"] += same(left, a)
                        counts["right second"] += same(right, b)
                        counts["both in place"] += same(left, a) and same(right, b)
                        counts["background"] += left.background == a.background and right.background == a.background
            total = args.pairs * args.samples
            results[name] = {k: v / total for k, v in counts.items()}
            print(name, {k: f"{v:.0%}" for k, v in results[name].items()}, f"{time.perf_counter() - started:.0f} s",
                  flush=True)
    seconds = time.perf_counter() - started
    write_report(args, results, seconds)


def write_report(args, results: dict, seconds: float) -> None:
    n = args.pairs * args.samples
    pct = lambda v: f"{v:.0%}"  # noqa: E731
    lines = [
        "# Tiled references, measured in the toy world", "",
        "A reference wider than the image encoder's square loses its sides to the centre crop. Tiling "
        "(`--tiles`, `ImagePrompt(tiles=TileOptions(...))`, module `imprompt.generation.tiles`) resizes it so "
        "its short side is the encoder's size and encodes each encoder-sized tile on its own; the tiles' "
        "tokens are concatenated (one softmax over all of them), and with `masked` each tile acts only on its "
        "own part of the output.", "",
        f"**Setting.** {args.pairs} wide references, each two toy shapes side by side (64x32: two 32x32 renders, "
        "large, solid, different shape and colour, one background), drawn with `imprompt.toy.shapes.render`. "
        f"{args.samples} generations each ({n} per row), empty text, IP-Adapter scale {args.scale:g}, guidance "
        f"{args.guidance:g}, {args.steps} steps, the shipped toy model and adapter; the toy encoder sees 32x32, "
        "so the centre crop keeps the right half of the first shape and the left half of the second. The "
        "attribute reader (`imprompt.toy.judge.read_many`) reads each 32x32 picture (each half of a 64x32 one); "
        "a shape counts when both its silhouette and its colour are read. 95% intervals are about "
        f"±{1.96 * (0.25 / n) ** 0.5:.0%} at 50%. Made by `benchmarks/tiled_references.py` in {seconds:.0f} s "
        "on a shared 2-core CPU.", "",
        "## 32x32 output: which of the two shapes is drawn", "",
        "| reference as | first shape | second shape | either | background |", "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "first" in r and "64x32" not in name:
            lines.append(f"| {name} | {pct(r['first'])} | {pct(r['second'])} | {pct(r['either'])} | "
                         f"{pct(r['background'])} |")
    lines += ["", "## 64x32 output: each shape in its place", "",
              "| reference as | left = first | right = second | both | background (both halves) |",
              "|---|---|---|---|---|"]
    for name, r in results.items():
        if "64x32" in name:
            lines.append(f"| {name.replace(', 64x32 output', '')} | {pct(r['left first'])} | {pct(r['right second'])} | "
                         f"{pct(r['both in place'])} | {pct(r['background'])} |")
    lines += ["", "Raw numbers: `docs/tiled-references.json`.", ""]
    write_text(args.report, "\n".join(lines))
    write_text(args.report.with_suffix(".json"), json.dumps({"results": results, "pairs": args.pairs,
                                                               "samples": args.samples, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
