"""The toolbox around image prompts, measured in the toy world: a checkpoint merge and a prompt matrix.

* **Merge.** The base UNet and the derivative one (``imprompt toy derive --style striped``) merged by
  A1111's weighted sum, ``base * (1 - alpha) + derivative * alpha``, tensor by tensor with the very function
  ``imprompt merge`` streams (:func:`imprompt.models.merge.merge_tensor`). The toy model is a diffusers folder,
  not an LDM single file, so the state dicts are merged in memory (the toy UNet is 9 MB); the math is the one
  ``imprompt merge`` writes. Read: the striped rate, unprompted and against a solid reference (IP scale 0.5).
* **Prompt matrix.** ``--prompt-matrix`` over colours with a fixed image prompt, run through
  :func:`imprompt.generation.request.run` exactly as the command line runs it: does the style (and shape,
  background) stay the reference's while the colour follows the text?
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import toy_paths
from .judge import read

MATRIX_REFERENCE = "striped-green-square-on-gray.png"
# Colour words go with the shape ("a red square"): the toy captions read "a square, red ..." as a red
# background ("{thing}, {background} background"), so a bare "|red" part would ask for a background.
MATRIX_PROMPT = "|a red square|a yellow square"
MATRIX_SCALE = 0.5


def merged_unet(base, derived, alpha: float):
    """A copy of ``base`` (a UNet) whose every tensor is ``base * (1 - alpha) + derived * alpha``."""
    from ..models.merge import merge_tensor

    theirs = derived.state_dict()
    merged = {k: merge_tensor(v, theirs[k], None, "weighted_sum", alpha) for k, v in base.state_dict().items()}
    out = copy.deepcopy(base)
    out.load_state_dict(merged)
    return out


def measure_merge(derived_folder: Path, package: Path, rate: Callable[[list], float], images: Callable,
                  log=print) -> dict:
    """Striped rate of the merged model at alpha 0 / 0.5 / 1, unprompted and with the solid reference."""
    from ..generation.pipelines import load_pipeline

    base = load_pipeline(toy_paths(package)["model"])
    derived = load_pipeline(derived_folder)
    rows = {}
    for alpha in (0.0, 0.5, 1.0):
        pipe = type(base)(**{**base.components, "unet": merged_unet(base.unet, derived.unet, alpha)})
        pipe.set_progress_bar_config(disable=True)
        rows[f"alpha {alpha:g}"] = {"unprompted": rate(images("", 1.0, model=pipe)),
                                    "solid reference, scale 0.5": rate(images("", 1.0, True, model=pipe))}
        log(f"[toy extras] merge alpha {alpha:g}: {rows[f'alpha {alpha:g}']}")
    return rows


def measure_matrix(package: Path, samples: int, seed: int, out_dir: Path, log=print) -> dict:
    """The prompt matrix ``|a red square|a yellow square`` (the first part empty: the image prompt alone) with the striped green square on gray as the image prompt
    (scale 0.5): per prompt, how often colour, style, shape and background read as what text and
    reference ask for. The colour asked for is the text's when it names one colour, else the reference's."""
    from ..generation.request import GenerateRequest, run
    from ..generation.matrix import matrix_prompts

    paths = toy_paths(package)
    reference = paths["references"] / MATRIX_REFERENCE
    wanted = read(Image.open(reference).convert("RGB"))
    request = GenerateRequest(prompt=MATRIX_PROMPT, prompt_matrix=True, image=[str(reference)],
                              scale=[str(MATRIX_SCALE)], steps=20, guidance=3.0, num_images=samples,
                              batch_size=16, seed=seed, output=str(out_dir))
    written = run(request, log=lambda m: None)
    prompts = matrix_prompts(MATRIX_PROMPT)
    cells = [p for p in written if not p.name.startswith("grid-")]
    grid = next(p for p in written if p.name.startswith("grid-"))
    rows = {}
    for k, prompt in enumerate(prompts):
        named = [c for c in ("red", "yellow") if c in prompt.split()]
        colour = named[0] if len(named) == 1 else None if named else wanted.color
        reads = [read(Image.open(p).convert("RGB")) for p in cells[k * samples:(k + 1) * samples]]
        row = {"colour asked": colour or "red and yellow (both named)",
               "style kept (striped)": float(np.mean([r.style == wanted.style for r in reads])),
               "shape kept": float(np.mean([r.shape == wanted.shape for r in reads])),
               "background kept": float(np.mean([r.background == wanted.background for r in reads]))}
        if colour is not None:
            row["colour as asked"] = float(np.mean([r.color == colour for r in reads]))
        else:
            row["colour red / yellow"] = [float(np.mean([r.color == c for r in reads])) for c in ("red", "yellow")]
        rows[prompt] = row
        log(f"[toy extras] matrix {prompt!r}: {row}")
    return {"reference": MATRIX_REFERENCE, "prompt": MATRIX_PROMPT, "scale": MATRIX_SCALE, "rows": rows,
            "grid": str(grid)}


def matrix_lines(result: dict, samples: int, grid_name: str) -> list[str]:
    lines = ["", "## Prompt matrix over colours with a fixed image prompt", "",
             f"`imprompt generate --prompt \"{result['prompt']}\" --prompt-matrix --image {result['reference']} "
             f"--scale {result['scale']:g} --guidance 3 --steps 20 --num-images {samples}` (the toy model): the "
             f"reference is a striped green square on gray. Share of the {samples} images of each prompt that read "
             "as asked:", "",
             "| prompt | colour asked | colour as asked | style kept | shape kept | background kept |",
             "|---|---|---|---|---|---|"]
    for prompt, row in result["rows"].items():
        colour = (f"{row['colour as asked']:.0%}" if "colour as asked" in row else
                  "red {:.0%} / yellow {:.0%}".format(*row["colour red / yellow"]))
        shown = f"`{prompt}`" if prompt else "(empty: the image prompt alone)"
        lines.append(f"| {shown} | {row['colour asked']} | {colour} | {row['style kept (striped)']:.0%} | "
                     f"{row['shape kept']:.0%} | {row['background kept']:.0%} |")
    lines += ["", f"![the matrix's grid: the first image of each prompt]({grid_name})", "",
              "Reading: the matrix runs as A1111's does (every combination, one seed, one grid). What it shows "
              "about the toy model is its known image + text weakness (docs/toy-results.md, claim 3: at scale 0.5 "
              "the text's attribute and the reference's others hold together in 19% of generations): when the "
              "text names a colour, the colour follows the text but the reference's stripes mostly do not survive, "
              "and \"red\" also leaks into the background. Toy world 2 (issue 16) is where this gets fixed."]
    return lines


def merge_lines(rows: dict, samples: int) -> list[str]:
    lines = ["", "## Merge: base UNet and the striped derivative (weighted sum)", "",
             "`imprompt merge`'s weighted sum, `base * (1 - alpha) + derivative * alpha` on every UNet tensor "
             f"(`imprompt.toy.toolbox.merged_unet`); striped rate of {samples} generations each:", "",
             "| alpha | unprompted (guidance 1) | solid reference, IP-Adapter scale 0.5 |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name.removeprefix('alpha ')} | {row['unprompted']:.0%} | "
                     f"{row['solid reference, scale 0.5']:.0%} |")
    lines += ["", "Alpha 0 is the base model and alpha 1 the derivative, so those rows repeat the LoRA table's "
              "\"LoRA 0\" and \"derivative model\" rows (same seeds); the half-way merge keeps most of the "
              "derivative's stripes unprompted, and an image prompt pulls the rate down at every alpha."]
    return lines


def copy_grid(grid: Path, target: Path) -> None:
    from ..files import write_bytes

    write_bytes(target, grid.read_bytes())
