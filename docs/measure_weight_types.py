"""Measures weight types on the bundled toy model; the numbers in docs/weight-types.md come from it.

    PYTHONPATH=src python docs/measure_weight_types.py [REFERENCES] [SAMPLES]

Image alone (empty text), IP-Adapter scale 1, guidance 3, 20 steps: for each weight type, the share of
generations whose attributes (read by imprompt.toy.judge.read) equal the reference's. Sample j of
reference i uses seed i * SAMPLES + j for every weight type, so they differ only in the weights.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from imprompt.adapter.attach import attach
from imprompt.adapter.checkpoint import load_adapter
from imprompt.encoding import ImageEncoder
from imprompt.generation.generate import generate
from imprompt.generation.pipelines import load_pipeline
from imprompt.generation.prompts import ImagePrompt
from imprompt.generation.settings import GenerationSettings
from imprompt.toy import toy_paths
from imprompt.toy.judge import attribute_hits, read, reference_set

# (label, weight type, scale). The toy UNet has only down_blocks.2.attentions.0 of SD1.5's composition
# blocks, where "composition" gives 0.25 x the scale; scale 4 brings that block to weight 1.
KINDS = (("default (linear)", "linear", 1.0), ("style transfer", "style transfer", 1.0),
         ("composition", "composition", 1.0), ("composition, scale 4", "composition", 4.0),
         ("style transfer precise", "style transfer precise", 1.0), ("no image prompt", "linear", 0.0))
ATTRIBUTES = ("style", "color", "shape", "background", "size", "position")


def main(references: int = 12, samples: int = 1) -> dict:
    torch.set_num_threads(1)
    paths = toy_paths()
    pipe = load_pipeline(paths["model"])
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(paths["adapter"], torch.float32)
    encoder = ImageEncoder.load(paths["image_encoder"], torch.float32)
    refs = [s for s, _ in reference_set("test", references)]
    rates = {}
    started = time.perf_counter()
    with attach(pipe.unet, [adapter]) as attachment:
        for label, kind, scale in KINDS:
            hits = []
            for i, ref in enumerate(refs):
                settings = GenerationSettings(prompt="", steps=20, guidance=3.0, num_images=samples, extra={
                    "generator": [torch.Generator().manual_seed(i * samples + j) for j in range(samples)]})
                prompt = ImagePrompt([ref.image], scale=scale, weight_type=kind)
                for image in generate(pipe, attachment, settings, [prompt], [encoder]):
                    hits.append(attribute_hits(read(image), ref.attributes))
            rates[label] = {a: float(np.mean([h[a] for h in hits])) for a in ATTRIBUTES}
            print(label, {a: f"{r:.0%}" for a, r in rates[label].items()}, flush=True)
    print(f"{len(KINDS) * references * samples} generations in {time.perf_counter() - started:.0f} s")
    return rates


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:3]))))
