"""A whole generation job as one typed request: load everything, generate, write PNGs with metadata.

The command line (``imprompt generate``), and later the web UI and the API, build a
:class:`GenerateRequest` and call :func:`run`; they hold no logic of their own.

Per-adapter options (``scale``, ``layers``, ...) accept ``VALUE`` for every adapter or ``N=VALUE``
for adapter N (0-based, in ``--adapter`` order); ``image`` and ``negative_image`` accept ``PATH`` (adapter 0) or
``N=PATH``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from ..adapter.attach import attach
from ..adapter.checkpoint import load_adapter
from ..adapter.layers import PRESETS
from ..config import option as _m
from ..encoding import CROP_MODES, ImageEncoder, check_encoder, load_image
from .generate import GenerationSettings, generate
from .pipelines import load_pipeline, resolve_file, resolve_model
from .pnginfo import format_parameters, save_png
from .prompts import COMBINE_MODES, DEFAULT_SCALE, ImagePrompt
from .schedulers import SCHEDULERS, sampler_name

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateRequest:
    model: str = field(default="", metadata=_m("Stable Diffusion model: a diffusers folder or a hub id (cached hub ids work "
                                                "offline); default: imprompt's bundled toy model"))
    prompt: str = field(default="", metadata=_m("text prompt"))
    adapter: list[str] = field(default_factory=list, metadata=_m("IP-Adapter checkpoint (.safetensors or .bin, official format); repeat for several", metavar="FILE"))
    image: list[str] = field(default_factory=list, metadata=_m("reference image, PATH or N=PATH for adapter N; repeat for several", metavar="REF"))
    negative_prompt: str = field(default="", metadata=_m("negative text prompt"))
    scale: list[str] = field(default_factory=list, metadata=_m(f"image prompt scale, VALUE or N=VALUE (default {DEFAULT_SCALE})"))
    steps: int = field(default=30, metadata=_m("denoising steps"))
    guidance: float = field(default=7.5, metadata=_m("classifier-free guidance scale"))
    seed: int | None = field(default=None, metadata=_m("random seed (same images as diffusers with torch.Generator('cpu').manual_seed(seed)); random if not given"))
    width: int | None = field(default=None, metadata=_m("image width (default: the model's)"))
    height: int | None = field(default=None, metadata=_m("image height (default: the model's)"))
    num_images: int = field(default=1, metadata=_m("images to generate"))
    image_encoder: list[str] = field(default_factory=list, metadata=_m("image encoder folder, PATH or N=PATH (default: image_encoder/ beside the adapter file)", metavar="PATH"))
    output: str = field(default="outputs", metadata=_m("folder for the PNGs"))
    scheduler: str | None = field(default=None, metadata=_m("scheduler (default: the model's own)", choices=list(SCHEDULERS)))
    combine: list[str] = field(default_factory=list, metadata=_m(f"how several images of one adapter combine: {'|'.join(COMBINE_MODES)}, or N=MODE"))
    weights: list[str] = field(default_factory=list, metadata=_m("weights for combine=weighted, 'W1,W2,...' or N=W1,W2"))
    layers: list[str] = field(default_factory=list, metadata=_m(f"layer weights: a preset ({'|'.join(PRESETS)}) or 'block=w,...,default=w'; or N=..."))
    start: list[str] = field(default_factory=list, metadata=_m("first fraction of the steps the image prompt acts in (default 0), or N=VALUE"))
    end: list[str] = field(default_factory=list, metadata=_m("fraction of the steps where the image prompt stops (default 1), or N=VALUE"))
    mask: list[str] = field(default_factory=list, metadata=_m("region mask per reference image (white = acts), in --image order", metavar="PATH"))
    negative_image: list[str] = field(default_factory=list, metadata=_m("negative image prompt (replaces the unconditional image), PATH or N=PATH", metavar="PATH"))
    crop: str = field(default="center", metadata=_m("reference preprocessing: center crop (CLIP) or pad to square", choices=list(CROP_MODES)))
    init_image: str | None = field(default=None, metadata=_m("img2img / inpainting start image", metavar="PATH"))
    strength: float = field(default=0.8, metadata=_m("img2img / inpainting strength"))
    mask_image: str | None = field(default=None, metadata=_m("inpainting mask (white = repaint); needs --init-image", metavar="PATH"))
    controlnet: str | None = field(default=None, metadata=_m("ControlNet model folder or hub id", metavar="PATH"))
    control_image: str | None = field(default=None, metadata=_m("ControlNet conditioning image", metavar="PATH"))
    controlnet_scale: float = field(default=1.0, metadata=_m("ControlNet conditioning scale"))
    dtype: str = field(default="float32", metadata=_m("weights dtype", choices=list(DTYPES)))
    device: str = field(default="cpu", metadata=_m("torch device, e.g. cpu or cuda"))

    @property
    def task(self) -> str:
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text2img"

    def check(self) -> None:
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("--mask-image (inpainting) needs --init-image")
        if (self.controlnet is None) != (self.control_image is None):
            raise ValueError("--controlnet and --control-image go together")
        if self.image and not self.adapter:
            raise ValueError("--image needs an --adapter to read it")
        if self.adapter and not self.image:
            raise ValueError("give at least one --image for the adapter(s)")


_TARGETED = re.compile(r"^(\d+)=(.*)$", re.S)


def split_target(value: str) -> tuple[int | None, str]:
    """'2=foo' -> (2, 'foo'); 'foo' -> (None, 'foo')."""
    match = _TARGETED.match(value)
    return (int(match.group(1)), match.group(2)) if match else (None, value)


def per_adapter(values: Sequence[str], count: int, convert: Callable[[str], T], default: T, name: str) -> list[T]:
    """One value per adapter from 'VALUE' (all adapters) and 'N=VALUE' (adapter N) entries."""
    out = [default] * count
    targeted = set()
    for raw in values:
        index, text = split_target(raw)
        try:
            value = convert(text)
        except ValueError as err:
            raise ValueError(f"--{name.replace('_', '-')} {raw!r}: {err}") from None
        if index is None:
            out = [value if i not in targeted else out[i] for i in range(count)]
        elif index >= count:
            raise ValueError(f"--{name.replace('_', '-')} {raw!r} names adapter {index}, but {count} adapter(s) were given")
        else:
            out[index] = value
            targeted.add(index)
    return out


def grouped(values: Sequence[str], count: int, name: str) -> list[list[str]]:
    """Repeatable per-adapter lists: every 'PATH' goes to adapter 0, 'N=PATH' to adapter N."""
    groups: list[list[str]] = [[] for _ in range(count)]
    for raw in values:
        index, text = split_target(raw)
        index = 0 if index is None else index
        if index >= count:
            raise ValueError(f"--{name.replace('_', '-')} {raw!r} names adapter {index}, but {count} adapter(s) were given")
        groups[index].append(text)
    return groups


def default_encoder_path(adapter_file: Path) -> Path:
    # Official layout: models/ip-adapter_sd15.safetensors beside models/image_encoder/.
    return adapter_file.parent / "image_encoder"


def build_image_prompts(request: GenerateRequest, count: int) -> list[ImagePrompt]:
    images = grouped(request.image, count, "image")
    negatives = grouped(request.negative_image, count, "negative_image")
    scales = per_adapter(request.scale, count, float, DEFAULT_SCALE, "scale")
    combines = per_adapter(request.combine, count, str, "concat", "combine")
    weights = per_adapter(request.weights, count, lambda s: [float(w) for w in s.split(",")], None, "weights")
    layers = per_adapter(request.layers, count, str, None, "layers")
    starts = per_adapter(request.start, count, float, 0.0, "start")
    ends = per_adapter(request.end, count, float, 1.0, "end")
    if request.mask and len(request.mask) != len(request.image):
        raise ValueError(f"give one --mask per --image: {len(request.image)} images, {len(request.mask)} masks")
    # Masks pair with --image in command-line order, whichever adapter each image goes to.
    masks = grouped([f"{split_target(i)[0] or 0}={m}" for i, m in zip(request.image, request.mask)], count, "mask")
    prompts = []
    for i in range(count):
        if not images[i]:
            continue  # an adapter with no image is attached but idle
        prompts.append(ImagePrompt(
            images=[load_image(p) for p in images[i]], adapter=i, scale=scales[i], combine=combines[i],
            weights=weights[i], layers=layers[i], start=starts[i], end=ends[i],
            masks=[load_image(m, "L") for m in masks[i]] if request.mask else None,
            negative_images=[load_image(p) for p in negatives[i]] or None, crop=request.crop,
        ))
    return prompts


def describe_prompt(prompt: ImagePrompt, adapter_name: str, image_names: Sequence[str]) -> str:
    parts = {
        "Model": adapter_name, "Weight": f"{prompt.scale:g}", "Images": "+".join(image_names),
        "Combine": prompt.combine, "Weights": ",".join(f"{w:g}" for w in prompt.weights) if prompt.weights else None,
        "Layers": prompt.layers if isinstance(prompt.layers, str) else (prompt.layers.describe() if prompt.layers else None),
        "Start": f"{prompt.start:g}", "End": f"{prompt.end:g}", "Crop": prompt.crop,
        "Masked": "yes" if prompt.masks else None, "Negative images": "yes" if prompt.negative_images else None,
    }
    return ", ".join(f"{k}: {v}" for k, v in parts.items() if v is not None)


def next_index(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def with_toy_defaults(request: GenerateRequest, log: Callable[[str], None]) -> GenerateRequest:
    """No --model: the bundled toy world (tiny SD, its CLIP image encoder and IP-Adapter)."""
    if request.model:
        return request
    from .. import toy

    if not toy.toy_available():
        raise ValueError(f"no --model given and the bundled toy model is missing from {toy.PACKAGE_DIR}; "
                         "pass --model PATH_OR_HUB_ID, or build the toy world with `imprompt toy build`")
    paths = toy.toy_paths()
    log("note: no --model given, using imprompt's bundled toy model (32x32 shapes world); "
        "pass --model PATH_OR_HUB_ID (and --adapter) for Stable Diffusion")
    adapters = request.adapter or ([str(paths["adapter"])] if request.image else [])
    encoders = request.image_encoder or ([str(paths["image_encoder"])] if not request.adapter else [])
    return dataclasses.replace(request, model=str(paths["model"]), adapter=adapters, image_encoder=encoders)


def run(request: GenerateRequest, log: Callable[[str], None] = print) -> list[Path]:
    """Load the model, adapters and encoders; generate; write PNGs with A1111 parameters."""
    request = with_toy_defaults(request, log)
    request.check()
    dtype = DTYPES[request.dtype]
    adapter_files = [resolve_file(a) for a in request.adapter]
    adapters = [load_adapter(f, dtype) for f in adapter_files]  # validate checkpoints before the big load
    encoder_dirs = per_adapter(request.image_encoder, len(adapters), str, None, "image_encoder")
    encoder_dirs = [Path(d) if d else default_encoder_path(f) for d, f in zip(encoder_dirs, adapter_files)]
    encoders_by_dir: dict[Path, ImageEncoder] = {}
    for folder in encoder_dirs:
        if folder not in encoders_by_dir:
            encoders_by_dir[folder] = ImageEncoder.from_pretrained(resolve_model(folder, "image encoder"), dtype)
            encoders_by_dir[folder].model.to(request.device)
    encoders = [encoders_by_dir[d] for d in encoder_dirs]
    for adapter, encoder in zip(adapters, encoders):
        check_encoder(adapter.variant, encoder)

    # Every small input is read and checked before the large model is loaded.
    prompts = build_image_prompts(request, len(adapters))
    init = load_image(request.init_image) if request.init_image else None
    mask = load_image(request.mask_image, "L") if request.mask_image else None
    control = load_image(request.control_image) if request.control_image else None
    pipe = load_pipeline(request.model, request.task, controlnet=request.controlnet, dtype=dtype, device=request.device)
    seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**32)
    settings = GenerationSettings(
        prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
        guidance=request.guidance, seed=seed, width=request.width, height=request.height,
        num_images=request.num_images, scheduler=request.scheduler, strength=request.strength,
        controlnet_scale=request.controlnet_scale,
    )

    attachment = attach(pipe.unet, adapters) if adapters else None
    try:
        images = generate(pipe, attachment, settings, prompts, encoders,
                          init_image=init, mask_image=mask, control_image=control)
    finally:
        if attachment is not None:
            attachment.detach()

    names = grouped(request.image, len(adapters), "image") if adapters else []
    info = {
        "Steps": settings.steps,
        "Sampler": SCHEDULERS[settings.scheduler].a1111 if settings.scheduler else sampler_name(pipe.scheduler),
        "CFG scale": f"{settings.guidance:g}", "Seed": seed,
        "Size": f"{images[0].width}x{images[0].height}", "Model": Path(str(request.model)).name,
        "Batch size": settings.num_images if settings.num_images > 1 else None,
        "Denoising strength": f"{settings.strength:g}" if init is not None else None,
        "ControlNet": f"{Path(request.controlnet).name} ({settings.controlnet_scale:g})" if request.controlnet else None,
    }
    for prompt in prompts:
        info[f"IP-Adapter {prompt.adapter}"] = describe_prompt(
            prompt, adapter_files[prompt.adapter].stem, [Path(p).name for p in names[prompt.adapter]]
        )
    out_dir = Path(request.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = next_index(out_dir)
    written = []
    for i, image in enumerate(images):
        extra = {"Batch pos": i} if settings.num_images > 1 else {}
        text = format_parameters(settings.prompt, settings.negative_prompt, {**info, **extra})
        written.append(save_png(image, out_dir / f"{start + i:05d}-{seed}.png", text))
        log(f"wrote {written[-1]}")
    return written
