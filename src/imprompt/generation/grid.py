"""X/Y/Z plots (A1111's ``xyz_grid.py`` script): one generation per combination of axis values, each cell
written with its own PNG info, and one labelled grid per Z value.

An axis is ``FIELD=V1,V2,...`` over any :class:`~imprompt.generation.request.GenerateRequest` field
(``scale=0,0.5,1``, ``layers=all,style,composition``, ``seed=1,2,3``, ``steps=10,20``, ``scheduler=ddim,euler``,
``model=a,b``, ``adapter=x,y``, ``start=0,0.3``); per-adapter fields take ``N=VALUE`` values too. The special
axis ``prompt_sr=FIND,REPLACEMENT,...`` is A1111's Prompt S/R: the first value is searched in the prompt
and negative prompt and each value (the first included) replaces it; ``lora:NAME=0,0.5,1`` sets the weight
of the LoRA NAME (its ``<lora:NAME:...>`` tag in the prompt, text encoder and UNet alike, or a tag added at
the end of the prompt when there is none). Unless seed is an axis, every cell
uses the same seed. Models are loaded once and kept (:mod:`imprompt.generation.cache`) while only other
fields change, and a repeated reference is encoded once.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import option
from ..sheets import contact_sheet
from .cache import CachedLoader, EmbeddingCache, ModelCache
from .adapter_options import finite
from .pnginfo import save_png
from .prompt_syntax import LORA_KINDS, NETWORK_TAG
from .batch import Prepared, render_group
from .outputs import next_index, save_numbered_png
from .request import GenerateRequest, pick_seed, prepare, read_inputs

PROMPT_SR = "prompt_sr"
LORA_AXIS = "lora:"  # lora:NAME=W1,W2,...
MAX_CELLS = 400


@dataclass(frozen=True)
class Axis:
    name: str | None  # None: a single cell along this axis
    values: tuple[str, ...] = ("",)

    def label(self, value: str) -> str:
        return f"{self.name}: {value}" if self.name else ""


def parse_axis(text: str | None) -> Axis:
    if not text:
        return Axis(None)
    name, sep, values = text.partition("=")
    name = name.strip()
    if not name.startswith(LORA_AXIS):  # a LoRA's name keeps its dashes; field names take either
        name = name.replace("-", "_")
    fields = {f.name for f in dataclasses.fields(GenerateRequest)} - {"output", "extra", "prompt_matrix"}
    if not sep or not values.strip():
        raise ValueError(f"axis {text!r}: expected FIELD=V1,V2,... (e.g. scale=0,0.5,1)")
    if name.startswith(LORA_AXIS):
        lora = name[len(LORA_AXIS):]
        if not re.fullmatch(r"[^<>:\s]+", lora):
            raise ValueError(f"axis {text!r}: expected lora:NAME=W1,W2,... with the LoRA's name, e.g. lora:style=0,0.5,1")
        for value in values.split(","):
            try:
                finite(value)
            except ValueError:
                raise ValueError(f"axis {text!r}: LoRA weight {value.strip()!r} is not a number") from None
    elif name != PROMPT_SR and name not in fields:
        raise ValueError(f"axis {text!r}: {name!r} is not a generation field; use one of {PROMPT_SR}, "
                         + ", ".join(sorted(fields)))
    return Axis(name, tuple(v.strip() for v in values.split(",")))


def apply(request: GenerateRequest, axis: Axis, value: str, first: str | None = None) -> GenerateRequest:
    """``request`` with ``axis`` set to ``value`` (typed as the field is)."""
    if axis.name is None:
        return request
    if axis.name.startswith(LORA_AXIS):
        return dataclasses.replace(request, prompt=set_lora_weight(request.prompt, axis.name[len(LORA_AXIS):], value))
    if axis.name == PROMPT_SR:
        find = axis.values[0]
        if find not in request.prompt and find not in request.negative_prompt:
            raise ValueError(f"prompt_sr: {find!r} is in neither the prompt nor the negative prompt")
        return dataclasses.replace(request, prompt=request.prompt.replace(find, value),
                                   negative_prompt=request.negative_prompt.replace(find, value))
    hint = typing.get_type_hints(GenerateRequest)[axis.name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        typed: object = [value]
    elif value.lower() == "none" and type(None) in args:
        typed = None
    else:
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        try:
            typed = {bool: lambda v: v.lower() in ("1", "true", "yes"), int: int, float: float}.get(base, str)(value)
        except ValueError:
            raise ValueError(f"axis {axis.name}: {value!r} is not a {getattr(base, '__name__', base)}") from None
    return dataclasses.replace(request, **{axis.name: typed})


def set_lora_weight(prompt: str, name: str, weight: str) -> str:
    """``prompt`` with every ``<lora:NAME:...>`` tag set to ``<lora:NAME:WEIGHT>`` (one weight for the text
    encoder and the UNet, A1111's short form), or with that tag appended when the prompt has none."""
    tag = f"<lora:{name}:{weight}>"
    found = False

    def replace(match: re.Match) -> str:
        nonlocal found
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in LORA_KINDS or args.split(":")[0] != name:
            return match.group(0)
        found = True
        return tag

    out = NETWORK_TAG.sub(replace, prompt)
    return out if found else f"{prompt} {tag}".strip()


@dataclass
class GridConfig(GenerateRequest):
    x: str | None = field(default=None, metadata=option(
        "X axis: FIELD=V1,V2,... (columns); also prompt_sr=FIND,REPL,... and lora:NAME=W1,W2,...", metavar="AXIS"))
    y: str | None = field(default=None, metadata=option("Y axis: FIELD=V1,V2,... (rows)", metavar="AXIS"))
    z: str | None = field(default=None, metadata=option("Z axis: one grid per value", metavar="AXIS"))
    cell: int = field(default=128, metadata=option("grid cell size in pixels"))
    cells_per_call: int = field(default=1, metadata=option(
        "cells per pipeline call: consecutive cells that differ only in seed, prompt or reference share one UNet "
        "batch (text-to-image only; images equal one-cell calls to float rounding, not bit for bit)"))


def run_grid(config: GridConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Generate every cell and write the grids; returns the grid paths."""
    x, y, z = (parse_axis(t) for t in (config.x, config.y, config.z))
    if x.name is None and y.name is None:
        raise ValueError("imprompt grid needs at least --x or --y (FIELD=V1,V2,...)")
    if config.prompt_matrix:
        raise ValueError("imprompt grid and --prompt-matrix do not combine; use a prompt_sr axis instead")
    cells = len(x.values) * len(y.values) * len(z.values)
    if cells > MAX_CELLS:
        raise ValueError(f"{cells} cells is over the {MAX_CELLS} a grid takes; use fewer values")
    base = GenerateRequest(**{f.name: getattr(config, f.name) for f in dataclasses.fields(GenerateRequest)})
    base = dataclasses.replace(base, num_images=1, batch_size=1)
    seed = pick_seed(base)
    loader = CachedLoader(ModelCache(32 * 2**30), EmbeddingCache(256))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    index, grids = next_index(out), []
    if config.cells_per_call < 1:
        raise ValueError(f"cells_per_call must be at least 1, got {config.cells_per_call}")
    for zv in z.values:
        cells = []  # (label, Prepared) in grid order
        for yv in y.values:
            for xv in x.values:
                request = apply(apply(apply(base, x, xv), y, yv), z, zv)
                if "seed" not in (x.name, y.name, z.name):
                    request = dataclasses.replace(request, seed=seed)
                request, options, catalog = prepare(request, log)
                label = ", ".join(filter(None, (x.label(xv), y.label(yv), z.label(zv))))
                cells.append((label, Prepared(request, options, catalog, read_inputs(request, options),
                                              pick_seed(request))))
        images, first_text = [], None
        for first in range(0, len(cells), config.cells_per_call):
            group = cells[first:first + config.cells_per_call]
            for (label, cell), (image, parameters) in zip(group, render_group([c for _, c in group], loader)):
                path, index = save_numbered_png(out, index, cell.seed, image, parameters)
                index += 1
                log(f"wrote {path} ({label})")
                first_text = first_text or parameters
                images.append(image)
        rows = [images[i:i + len(x.values)] for i in range(0, len(images), len(x.values))]
        sheet = contact_sheet(rows, [y.label(v) for v in y.values] if y.name else None,
                              [x.label(v) for v in x.values] if x.name else None, cell=config.cell)
        text = first_text + "\nGrid: " + "; ".join(f"{a.name}={','.join(a.values)}" for a in (x, y, z) if a.name)
        stem = f"grid-{index:05d}" + (f"-{z.name}-{zv}" if z.name else "")
        grids.append(save_png(sheet, out / f"{stem}.png", text, exclusive=True))
        log(f"wrote {grids[-1]}")
    return grids
