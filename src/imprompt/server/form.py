"""The web UI's form as plain data: what the page's widgets hold (:class:`Form`, :class:`UnitForm`) and
the pure functions from it to a GenerateRequest, so all of it is tested without Gradio or a browser."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..generation.controls import ControlOptions, request_values
from ..generation.request import GenerateRequest
from ..generation.text_diff import DEFAULT_STRENGTH
from ..training.tune import TuneConfig

MODEL_DEFAULT = "model default"
CANVAS = 256  # blank mask canvases; the engine scales a mask to the output size
MAX_TUNE_STEPS = 500  # as the API's /v1/tune


@dataclass
class UnitForm:
    """One IP-Adapter unit of the form."""

    enabled: bool = False
    adapter: str | None = None  # a catalog name
    images: list[str] = field(default_factory=list)  # uploaded file paths
    scale: float = 0.6
    layers: str = "all"  # a preset, or "custom" with custom_layers
    custom_layers: str = ""  # 'block=w,...,default=w' (imprompt.adapter.layers)
    weights: str = ""  # one weight per reference, comma-separated: combine them weighted
    image_encoder: str | None = None  # a catalog name; None: the one the adapter needs
    start: float = 0.0
    end: float = 1.0
    mask: Image.Image | None = None  # painted in the page: white = this unit acts there
    negative_image: str | None = None
    embeds: str | None = None  # an uploaded embeds file (imprompt encode / tune) used instead of images
    text_diff: str = ""  # 'FROM -> TO' (imprompt.generation.text_diff); empty: none
    text_diff_strength: float = DEFAULT_STRENGTH


@dataclass
class ControlForm:
    """One ControlNet unit of the form: several run at once, each with its preprocessor."""

    controlnet: str | None = None  # a catalog name; None: the unit is off
    image: str | None = None  # an uploaded file path
    preprocess: str = "none"  # a key of imprompt.generation.preprocess.PREPROCESSORS
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resolution: int = -1  # the preprocessor's short side; -1: as given
    threshold_a: float = -1  # -1: the preprocessor's default
    threshold_b: float = -1


@dataclass
class Form:
    model: str | None = None  # a catalog name; None: the server's default model
    prompt: str = ""
    negative_prompt: str = ""
    units: list[UnitForm] = field(default_factory=list)
    crop: str = "center"
    controls: list[ControlForm] = field(default_factory=list)
    init_image: str | None = None  # set: img2img, and inpainting where inpaint_mask is painted
    inpaint_mask: Image.Image | None = None
    strength: float = 0.75
    sampler: str = MODEL_DEFAULT
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1  # -1: random
    width: int = 0  # 0: the model's own
    height: int = 0
    num_images: int = 1
    image_guidance: float | None = None  # None / empty: the CFG scale guides the image prompts too


def form_request(form: Form, lookup: Callable[[str, str], str], read_image: Callable[[str], Image.Image],
                 add_image: Callable[[Any, str], str], read_embeds: Callable[[str], Any] | None = None
                 ) -> GenerateRequest:
    """The GenerateRequest of a filled form. ``lookup(name, kind)`` -> a model path found by name;
    ``read_image(path) -> image`` and ``read_embeds(path) -> ImageFeatures``; ``add_image(item, name) ->
    reference name`` files an image (or features) for the engine (the name is what PNG info shows).
    Enabled units become adapters 0, 1, ... (``N=`` values); messages name the unit as the page numbers it."""
    values: dict[str, list[str]] = {k: [] for k in ("adapter", "image", "scale", "layers", "start", "end", "mask",
                                                    "negative_image", "weights", "image_encoder", "embeds",
                                                    "text_diff", "text_diff_strength")}
    units = [(number, u) for number, u in enumerate(form.units, 1) if u.enabled]
    masked = any(u.mask is not None for _, u in units)
    for i, (number, unit) in enumerate(units):
        if not unit.adapter:
            raise ValueError(f"IP-Adapter unit {number} is enabled but has no adapter chosen")
        if unit.embeds and unit.images:
            raise ValueError(f"IP-Adapter unit {number} has reference images and saved embeds; the embeds already "
                             "hold encoded references: remove one or the other")
        if not unit.images and not unit.embeds:
            raise ValueError(f"IP-Adapter unit {number} has no reference image; drop one in, or disable the unit")
        values["adapter"].append(lookup(unit.adapter, "adapter"))
        if unit.embeds:
            if read_embeds is None:
                raise ValueError(f"IP-Adapter unit {number}: saved embeds are not read here; give reference images")
            values["embeds"].append(f"{i}={add_image(read_embeds(unit.embeds), Path(unit.embeds).name)}")
        for path in unit.images:
            values["image"].append(f"{i}={add_image(read_image(path), Path(path).name)}")
            if masked:  # masks go one per reference, so once one unit is masked every unit needs one: white = all
                mask = unit.mask if unit.mask is not None else Image.new("L", (CANVAS, CANVAS), 255)
                values["mask"].append(add_image(mask, f"unit{number}-mask.png"))
        values["scale"].append(f"{i}={unit.scale:g}")
        if unit.layers == "custom":
            if not unit.custom_layers.strip():
                raise ValueError(f"IP-Adapter unit {number}: custom layers need 'block=weight,...', e.g. "
                                 "'up_blocks.1=1,default=0'")
            values["layers"].append(f"{i}={unit.custom_layers.strip()}")
        else:
            values["layers"].append(f"{i}={unit.layers}")
        if unit.weights.strip():
            values["weights"].append(f"{i}={unit.weights.strip()}")
        if unit.image_encoder:
            values["image_encoder"].append(f"{i}={lookup(unit.image_encoder, 'image_encoder')}")
        values["start"].append(f"{i}={unit.start:g}")
        values["end"].append(f"{i}={unit.end:g}")
        if unit.text_diff.strip():
            values["text_diff"].append(f"{i}={unit.text_diff.strip()}")
            values["text_diff_strength"].append(f"{i}={unit.text_diff_strength:g}")
        if unit.negative_image:
            values["negative_image"].append(f"{i}={add_image(read_image(unit.negative_image), 'negative.png')}")
    init = add_image(read_image(form.init_image), Path(form.init_image).name) if form.init_image else None
    inpaint = add_image(form.inpaint_mask, "inpaint-mask.png") if init and form.inpaint_mask is not None else None
    controls = control_values(form.controls, lookup, read_image, add_image)
    return GenerateRequest(
        model=lookup(form.model, "checkpoint") if form.model else "", prompt=form.prompt,
        negative_prompt=form.negative_prompt, crop=form.crop, steps=int(form.steps), guidance=float(form.guidance),
        image_guidance=None if form.image_guidance is None else float(form.image_guidance),
        seed=None if form.seed is None or int(form.seed) < 0 else int(form.seed),
        width=int(form.width) or None, height=int(form.height) or None, num_images=int(form.num_images),
        scheduler=None if form.sampler in (None, MODEL_DEFAULT) else form.sampler,
        init_image=init, mask_image=inpaint, strength=float(form.strength), **controls, **values)


def unit_tune_config(form_model: str | None, unit: UnitForm, number: int, caption: str, steps: int,
                     lookup: Callable[[str, str], str], read_image: Callable[[str], Image.Image],
                     add_image: Callable[[Any, str], str], guard: int = 0) -> TuneConfig:
    """``imprompt tune``'s settings for one unit's "Tune" button: its adapter, encoder and references, the
    page's checkpoint (empty: the server's default, filled in by the engine's caller), ``caption`` as the
    tuning text, ``guard`` previews (0: off) and the other settings at their defaults. Messages name the
    unit as the page numbers it."""
    if not unit.adapter:
        raise ValueError(f"IP-Adapter unit {number}: choose an adapter before tuning")
    if not unit.images:
        raise ValueError(f"IP-Adapter unit {number}: tuning starts from reference images; drop one in "
                         "(saved embeds are already a result)")
    if not 1 <= int(steps) <= MAX_TUNE_STEPS:
        raise ValueError(f"IP-Adapter unit {number}: tuning steps must be 1 to {MAX_TUNE_STEPS}, got {steps}")
    return TuneConfig(image=[add_image(read_image(path), Path(path).name) for path in unit.images],
                      model=lookup(form_model, "checkpoint") if form_model else "",
                      adapter=lookup(unit.adapter, "adapter"), prompt=caption.strip(),
                      image_encoder=lookup(unit.image_encoder, "image_encoder") if unit.image_encoder else None,
                      steps=int(steps), guard=int(guard), progress=False)


def control_values(units: list[ControlForm], lookup: Callable[[str, str], str],
                   read_image: Callable[[str], Image.Image], add_image: Callable[[Image.Image, str], str]
                   ) -> dict[str, list[str]]:
    """The request's per-ControlNet values of the units with a ControlNet chosen, numbered 0, 1, ... in page
    order; an image without a ControlNet is ignored, as the page shows it unused."""
    controls = []
    for number, unit in enumerate(units, 1):
        if not unit.controlnet:
            continue
        if not unit.image:
            raise ValueError(f"ControlNet unit {number}: the ControlNet unit has a model but no control image")
        controls.append(ControlOptions(len(controls), lookup(unit.controlnet, "controlnet"),
                                       add_image(read_image(unit.image), Path(unit.image).name), unit.scale,
                                       unit.start, unit.end, unit.preprocess, unit.resolution, unit.threshold_a,
                                       unit.threshold_b))
    return request_values(controls)


def painted_mask(value: Any) -> Image.Image | None:
    """What was painted on an ImageEditor, as a white-on-black mask: the strokes of its layers (alpha), or,
    where Gradio flattened them into the composite, the pixels where it differs from the background
    (only then: a browser's re-encoded composite may differ everywhere by a shade). None: nothing painted."""
    if not isinstance(value, dict):
        return None
    painted = None
    for layer in value.get("layers") or []:
        array = np.asarray(layer) if layer is not None else None
        if array is not None and array.ndim == 3 and array.shape[2] == 4:
            painted = array[:, :, 3] > 0 if painted is None else painted | (array[:, :, 3] > 0)
    background, composite = value.get("background"), value.get("composite")
    if (painted is None or not painted.any()) and background is not None and composite is not None:
        b, c = np.asarray(background), np.asarray(composite)
        if b.shape[:2] == c.shape[:2]:
            channels = min(b.shape[2] if b.ndim == 3 else 1, c.shape[2] if c.ndim == 3 else 1, 3)
            painted = np.any(b.reshape(*b.shape[:2], -1)[:, :, :channels] != c.reshape(*c.shape[:2], -1)[:, :, :channels],
                             axis=2)
    if painted is None or not painted.any():
        return None
    return Image.fromarray((painted * 255).astype(np.uint8), "L")


def add_network(text: str, kind: str, name: str | None) -> str:
    """The prompt with a LoRA tag (``<lora:NAME:1>``, A1111's default multiplier) or an embedding's name
    appended, comma-separated as A1111's extra-networks cards add them."""
    if not name:
        return text
    item = f"<lora:{name}:1>" if kind == "lora" else name
    text = text.rstrip()
    return f"{text}, {item}" if text and not text.endswith(",") else f"{text} {item}".strip()
