"""What a generation run writes: numbered PNGs (``INDEX-SEED.png``, claimed exclusively so that two runs
sharing a folder never overwrite each other), their AUTOMATIC1111 parameters text, and the preprocessed
ControlNet maps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .controls import control_options
from .networks import parameters_of
from .pnginfo import format_parameters, save_png
from .schedulers import SCHEDULERS, sampler_name

if TYPE_CHECKING:
    from PIL import Image

    from .adapter_options import AdapterOptions
    from .loading import LoadedModels
    from .request import GenerateRequest, Inputs


def save_numbered_png(out_dir: Path, index: int, seed: int, image, text: str) -> tuple[Path, int]:
    """Write ``INDEX-SEED.png`` at the first free index from ``index`` on; returns (path, index used).

    Another run writing into the same folder (a second command, the server) may take a number
    between our listing and our write: the exclusive write refuses to overwrite its image, and we
    move on to the next free number.
    """
    while True:
        try:
            return save_png(image, out_dir / f"{index:05d}-{seed}.png", text, exclusive=True), index
        except FileExistsError:
            index = max(index + 1, next_index(out_dir))


def next_index(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


# Folder names that say nothing about the model (the toy package's "pipeline").
_GENERIC_NAMES = {"pipeline", "model", "diffusers"}


def model_name(model: str) -> str:
    """The model's name for PNG info: its folder's (or hub id's) name, the parent's if that is generic."""
    from .. import toy

    path = Path(model)
    if path == toy.toy_paths()["model"]:
        return "imprompt-toy"
    if path.name.lower() in _GENERIC_NAMES and path.parent.name:
        return path.parent.name
    return path.name or model


def infotext(request: GenerateRequest, options: Sequence[AdapterOptions], models: LoadedModels,
             inputs: Inputs) -> Callable[[int, "Image.Image"], str]:
    """(seed, image) -> the PNG parameters text (A1111's infotext) of one of the request's images."""
    sampling = {
        "Steps": request.steps,
        "Sampler": SCHEDULERS[request.scheduler].a1111 if request.scheduler else sampler_name(models.pipe.scheduler),
        "CFG scale": f"{request.guidance:g}",
        # A1111's name for InstructPix2Pix's image guidance; absent when one scale guides both
        "Image CFG scale": None if request.image_guidance is None else f"{request.image_guidance:g}",
    }  # then Seed and Size, per image, in A1111's order
    rest = {
        "Model": model_name(request.model),
        "Denoising strength": f"{request.strength:g}" if inputs.init is not None else None,
        **{f"ControlNet {c.index}": c.describe(model_name(c.file)) for c in control_options(request)},
        **{f"IP-Adapter {o.index}": o.describe() for o in options},
    }
    if inputs.reference is not None:
        rest["Reference"] = request.reference(inputs.reference).describe()
    if request.acceleration is not None:
        rest["Acceleration"] = request.acceleration.describe()
    networks = parameters_of(models.networks, models.pipe, request.prompt, request.negative_prompt, request.steps)
    return lambda seed, image: format_parameters(request.prompt, request.negative_prompt, {
        **sampling, "Seed": seed, "Size": f"{image.width}x{image.height}", **rest, **networks})


def save_control_maps(out_dir: Path, index: int, inputs: Inputs, log: Callable[[str], None] = print) -> list[Path]:
    """Write the preprocessed control maps as ``control-INDEX-N.png`` (N: the ControlNet), atomically;
    INDEX is the number of the run's first image, so the maps sort beside it."""
    written = []
    for n in inputs.preprocessed:
        path = out_dir / f"control-{index:05d}-{n}.png"
        try:
            written.append(save_png(inputs.controls[n], path, "", exclusive=True))
        except FileExistsError:  # another run took this number meanwhile: keep its map, not ours
            continue
        log(f"wrote {path}")
    return written
