"""Image + text with image guidance, per-layer image-prompt weights and text diffs; the tables of
docs/toy-results.md, section 3.

    PYTHONPATH=src python docs/measure_image_guidance.py FOLDER N SETTINGS_JSON [--work W | --adapter FILE] [--threads T]

The first N references of FOLDER (a test split written by ``imprompt toy build``) each get the image +
text edit of ``imprompt.toy.judge.edit_plan`` (half "<colour> background", half "a <colour> <shape>"),
seed i, 20 steps. SETTINGS_JSON is a list of settings, each with ``scale`` and optionally ``layers``
(``ImagePrompt.layers``), ``guidance`` (default 3, the toy's), ``image_guidance`` and ``text_diff`` (a strength:
the edit's text diff from the reference's own words to the text's, ``Edit.source -> Edit.text``, with the
toy CLIP's text tower; :mod:`imprompt.generation.text_diff`). ``"image_only": true`` generates from the image
alone (empty text) and scores every attribute against the reference: the ceiling of "all four". The models are the
shipped package's, or with ``--work W`` a build folder's (pipeline, adapter, image encoder). One JSON
line per setting: per kind of edit, how often each attribute is right (the text's where it names it,
the reference's otherwise), and how often all four are right together, with 95% Wilson intervals.
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
from imprompt.generation.prompts import ImagePrompt
from imprompt.generation.settings import GenerationSettings
from imprompt.generation.text_diff import TextTower, text_diff
from imprompt.toy import shapes, toy_paths, workdir
from imprompt.toy.judge import content_hits, edit_plan, read_many
from imprompt.toy.quality import load


def summary(hits: list[bool]) -> list[float]:
    s = proportion(hits)
    return [round(s.mean, 3), round(s.low, 3), round(s.high, 3)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("settings")
    parser.add_argument("--work", type=Path, default=None, help="a toy build folder (default: the shipped package)")
    parser.add_argument("--adapter", type=Path, default=None, help="another adapter file on the shipped package's "
                        "pipeline and image encoder (e.g. one fine-tuned with imprompt train --init-adapter)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.work is None:
        paths = toy_paths()
        pipe, adapter, encoder = load(paths["model"], args.adapter or paths["adapter"], paths["image_encoder"])
    else:
        pipe, adapter, encoder = load(args.work / "pipeline", workdir.adapter_file(args.work, "adapter"),
                                      workdir.image_encoder(args.work))
    pipe.set_progress_bar_config(disable=True)
    rows = shapes.read_metadata(args.folder)[:args.n]
    refs = [Image.open(args.folder / name).convert("RGB") for name, _, _ in rows]
    plan = edit_plan([a for _, _, a in rows])
    # The package's CLIP is the shipped image encoder's partner; a build folder's text diffs would need its own.
    tower = TextTower.from_pretrained(toy_paths()["clip"]) if args.work is None else None
    with attach(pipe.unet, adapter) as attachment:
        for setting in json.loads(args.settings):
            started = time.perf_counter()
            settings = GenerationSettings(steps=20, guidance=setting.get("guidance", 3.0),
                                          image_guidance=setting.get("image_guidance"))
            alone, strength = setting.get("image_only", False), setting.get("text_diff")
            if strength and tower is None:
                raise SystemExit("text_diff settings measure the shipped package (no --work)")
            items = [BatchItem(seeds=[i], prompt="" if alone else e.text, image_prompts=[
                ImagePrompt([r], scale=setting["scale"], layers=setting.get("layers"),
                            text_diff=text_diff(tower, e.source, e.text, strength) if strength else None)])
                for i, (r, e) in enumerate(zip(refs, plan))]
            images = []
            for start in range(0, len(items), 50):
                for out in generate_batch(pipe, attachment, settings, items[start:start + 50], [encoder]):
                    images += [np.asarray(i.convert("RGB")) for i in out]
            truths = [a for _, _, a in rows] if alone else [e.expected for e in plan]
            hits = [content_hits(p, t) for p, t in zip(read_many(images), truths)]
            report = {"setting": setting, "n": len(hits), "seconds": round(time.perf_counter() - started, 1)}
            for changed in ("background", "color"):
                mine = [h for h, e in zip(hits, plan) if e.changed == changed]
                report[f"change {changed}"] = {name: summary([h[name] for h in mine]) for name in mine[0]}
                report[f"change {changed}"]["all"] = summary([all(h.values()) for h in mine])
            report["all"] = summary([all(h.values()) for h in hits])
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
