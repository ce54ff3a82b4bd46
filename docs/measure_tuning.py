"""Measures one-image tuning (imprompt tune) on the toy world; the numbers in docs/tuning.md come from it.

    PYTHONPATH=src python docs/measure_tuning.py FOLDER N STEPS[,STEPS...] [--init unconditional]
        [--lr LR] [--regularise R] [--image-encoder DIR] [--text] [--threads T]

FOLDER is a split folder of references with metadata.jsonl (a toy build's data/heldout, or the drawn
references of imprompt.toy.drawn). For each reference i: its features from the image encoder, tuned for
STEPS steps with an empty prompt (TuneOptions defaults unless given), then one generation with seed i, image
alone at scale 1, guidance 3, 20 steps, read by the toy reader. ``--text``: also the image + text check at
scale 0.5 (the toy quality stage's edits: the text names a new colour or background). One JSON line per
STEPS with each attribute's accuracy and its 95% Wilson interval, and the seconds one tuning took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imprompt.adapter.attach import attach
from imprompt.evaluation.metrics import proportion
from imprompt.generation.batched import BatchItem, generate_batch
from imprompt.generation.embeds import encode_references
from imprompt.generation.prompts import ImagePrompt
from imprompt.generation.settings import GenerationSettings
from imprompt.toy import shapes, toy_paths
from imprompt.toy.judge import attribute_hits, content_hits, edit_plan, read_many
from imprompt.toy.quality import load
from imprompt.training.tune import TuneOptions, conditions, tune_features

ATTRIBUTES = ("shape", "color", "background", "style")


def summary(hits: list[bool]) -> list[float]:
    s = proportion(hits)
    return [round(s.mean, 3), round(s.low, 3), round(s.high, 3)]


def generated(pipe, attachment, encoder, features, texts, scale):
    settings = GenerationSettings(steps=20, guidance=3.0)
    items = [BatchItem(seeds=[i], prompt=t, image_prompts=[ImagePrompt(embeds=f, scale=scale)])
             for i, (f, t) in enumerate(zip(features, texts))]
    out = []
    for images in generate_batch(pipe, attachment, settings, items, [encoder]):
        out += [np.asarray(i.convert("RGB")) for i in images]
    return out


def setup(args):
    """The shipped toy pipeline and adapter (``args.image_encoder`` or its own), and the first ``args.n``
    references of ``args.folder`` with their attributes."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    paths = toy_paths()
    pipe, adapter, encoder = load(paths["model"], paths["adapter"], args.image_encoder)
    pipe.set_progress_bar_config(disable=True)
    rows = shapes.read_metadata(args.folder)[:args.n]
    refs = [Image.open(args.folder / name).convert("RGB") for name, _, _ in rows]
    return pipe, adapter, encoder, refs, [a for _, _, a in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("steps")
    parser.add_argument("--init", default="encoder")
    parser.add_argument("--lr", type=float, default=TuneOptions.lr)
    parser.add_argument("--regularise", type=float, default=TuneOptions.regularise)
    parser.add_argument("--image-encoder", default=None)
    parser.add_argument("--text", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pipe, adapter, encoder, refs, truth = setup(args)
    plan = edit_plan(truth)
    with attach(pipe.unet, adapter) as attachment:
        encoded = [encode_references([r], encoder, adapter.variant.encoder_output) for r in refs]
        for steps in (int(s) for s in args.steps.split(",")):
            options = TuneOptions(steps=steps, init=args.init, lr=args.lr, regularise=args.regularise)
            started = time.perf_counter()
            tuned = [tune_features(attachment, f, conditions(pipe, [r]), options).features
                     for f, r in zip(encoded, refs)]
            seconds = (time.perf_counter() - started) / len(refs)
            read = read_many(generated(pipe, attachment, encoder, tuned, [""] * len(refs), 1.0))
            hits = [attribute_hits(p, t) for p, t in zip(read, truth)]
            line = {"folder": args.folder.name, "n": len(refs), "steps": steps, "init": args.init, "lr": args.lr,
                    "regularise": args.regularise,
                    "seconds_per_tune": round(seconds, 2),
                    "image_only": {a: summary([h[a] for h in hits]) for a in ATTRIBUTES}}
            if args.text:
                read = read_many(generated(pipe, attachment, encoder, tuned, [e.text for e in plan], 0.5))
                hits = [content_hits(p, e.expected) for p, e in zip(read, plan)]
                changed = [h[e.changed] for h, e in zip(hits, plan)]
                line["image_text_0.5"] = {"text_attribute": summary(changed),
                                          "all_together": summary([all(h.values()) for h in hits])}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
