"""Batched vs unbatched evaluation, side by side, on a subset of the toy evaluation.

The toy world's one-adapter evaluation (docs/toy-results.md: the IP-Adapter with the text-only and
unconditional baselines, 50 references x 2 samples, image alone and image + text, 20 steps, guidance 3:
500 generations) runs here on the first ``--references`` test references, twice per round:

* ``unbatched`` -- ``batch_images=1``: one pipeline call per reference (2 images, 4 UNet rows with guidance),
  on the first ``--unbatched-references``,
* ``batched``   -- ``batch_images=--batch-images``: the samples of many references in one call
  (:mod:`imprompt.generation.batched`), on the first ``--references`` (default 32: one call of 64 images, as
  the full run's calls are),

rounds interleaved (unbatched, batched, unbatched, batched, ...) so that load from other processes hits
both alike; the median of ``--repeats`` rounds is reported. Times are seconds per generation of the
generation passes (generation, scoring and attribute reading; model loading excluded): unbatched, every
call is one reference, so its rate does not depend on how many are run. The 500-generation figure is
that time x 500 plus the median model-loading time. The two runs' results are compared on the
references both ran: every saved PNG pixel by pixel, the scores, the attributes read.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_batched_eval.py [--references 32] [--unbatched-references 8] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

import numpy as np
import torch
from PIL import Image

from imprompt.evaluation.config import load_config
from imprompt.evaluation.run import evaluate

FULL_GENERATIONS = 500  # 50 references x 2 samples x (ip image, ip image + text, text image, text image + text, uncond)


def run(out: Path, references: int, batch_images: int) -> dict:
    config = load_config(None, dict(
        data="toy:test", references=references, samples=2, steps=20, guidance=3.0, scale_sweep=False,
        methods=["ip:ip_adapter", "text:text_only", "uncond:unconditional"], output_dir=str(out),
        batch_images=batch_images, save_images=True, progress=False, sheet_references=1))
    results = evaluate(config, log=lambda m: None).results
    passes = [p for m in results["methods"].values() for p in m["passes"].values()]
    return {"seconds": sum(p["seconds"] for p in passes), "generations": sum(len(p["samples"]) for p in passes),
            "load": results["timing"]["load_seconds"], "results": results, "folder": out, "references": references}


def compare(a: dict, b: dict) -> dict:
    """Pixels and scores of two runs of the same evaluation."""
    pixels = differing = images = differing_images = 0
    max_diff = 0
    for path in sorted((a["folder"] / "images").rglob("*.png")):
        x = np.asarray(Image.open(path)).astype(int)
        y = np.asarray(Image.open(b["folder"] / path.relative_to(a["folder"]))).astype(int)
        diff = np.abs(x - y)
        pixels, differing = pixels + diff.size, differing + int((diff > 0).sum())
        images, differing_images = images + 1, differing_images + int(diff.max() > 0)
        max_diff = max(max_diff, int(diff.max()))
    score_diff, reads_differ, samples = 0.0, 0, 0
    for name, method in a["results"]["methods"].items():
        for key, p in method["passes"].items():
            for r, s in zip(p["samples"], b["results"]["methods"][name]["passes"][key]["samples"]):
                samples += 1
                score_diff = max(score_diff, abs(r["clip_i"] - s["clip_i"]), abs(r["clip_t"] - s["clip_t"]))
                reads_differ += int(r.get("read") != s.get("read"))
    return {"images": images, "images_differing": differing_images, "pixel_values": pixels,
            "pixel_values_differing": differing, "max_pixel_diff": max_diff, "max_clip_score_diff": score_diff,
            "samples": samples, "attribute_reads_differing": reads_differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--references", type=int, default=32, help="references of the batched run (32: one call "
                        "of 64 images, the size of the full run's calls)")
    parser.add_argument("--unbatched-references", type=int, default=8, help="references of the unbatched run: its "
                        "time per generation does not depend on how many (every call is one reference); fewer saves time")
    parser.add_argument("--batch-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    times: dict[str, list[float]] = {"unbatched": [], "batched": []}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        last = {}
        for round_ in range(args.repeats):
            for name, batch, count in (("unbatched", 1, args.unbatched_references),
                                       ("batched", args.batch_images, args.references)):
                r = run(Path(tmp) / f"{name}-{round_}", count, batch)
                times[name].append(r["seconds"] / r["generations"])
                loads.append(r["load"])
                last[name] = r
                print(f"round {round_ + 1} {name}: {r['seconds']:.1f} s for {r['generations']} generations", flush=True)
        same = compare(last["unbatched"], last["batched"])
    median = {k: statistics.median(v) for k, v in times.items()}  # seconds per generation
    load = statistics.median(loads)
    print(f"\ntoy one-adapter evaluation, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| mode | references | generations | s / generation (median) | extrapolated to 500 generations (s, + load) |")
    print("|---|---|---|---|---|")
    for name in ("unbatched", "batched"):
        per = median[name]
        print(f"| {name} | {last[name]['references']} | {last[name]['generations']} | {per:.3f} | "
              f"{per * FULL_GENERATIONS + load:.0f} |")
    print(f"\nbatched / unbatched speed-up: {median['unbatched'] / median['batched']:.2f}x "
          f"(model loading {load:.1f} s not included in the per-generation times)")
    print("results compared on the common references (last round):", json.dumps(same))


if __name__ == "__main__":
    main()
