"""AUTOMATIC1111 API payloads (``/sdapi/v1/txt2img``, ``img2img``) and the ControlNet extension's units, as
:class:`~imprompt.generation.request.GenerateRequest` s.

Field names and defaults follow A1111's ``StableDiffusionTxt2ImgProcessingAPI`` /
``StableDiffusionImg2ImgProcessingAPI`` and sd-webui-controlnet's ``ControlNetUnit`` (its API reads the
units from ``alwayson_scripts.controlnet.args``). Unknown fields are ignored, as A1111 ignores them;
declared fields of the wrong type get a 422 naming the field (pydantic).

An IP-Adapter unit is one whose ``module`` is an IP-Adapter preprocessor (A1111's ``ip-adapter_clip_*``,
``ip-adapter-auto``, Forge's ``CLIP-ViT-H (IPAdapter)``) or whose ``model`` is an adapter found in the
model folders; every other enabled unit is a ControlNet. The preprocessor names the image encoder; the
encoder itself is the one the adapter needs (:mod:`imprompt.models.pairing`), and a preprocessor that
contradicts the adapter is refused naming both. A unit whose ``module`` is ``reference_only``,
``reference_adain`` or ``reference_adain+attn`` is Reference-only (no model): its weight, its
``threshold_a`` as style fidelity (the extension's default 0.5), and its control mode as the extension
reads it (:func:`reference_fidelity`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from ..generation.controls import ControlOptions, request_values
from ..generation.preprocess import PREPROCESSORS
from ..generation.reference import REFERENCE_MODES
from ..generation.request import GenerateRequest
from ..generation.schedulers import SCHEDULERS

# Preprocessor -> the CLIP vision encoder it runs (None: whichever the adapter needs).
IP_ADAPTER_MODULES: dict[str, str | None] = {
    "ip-adapter_clip_sd15": "ViT-H", "ip-adapter_clip_h": "ViT-H", "ip-adapter_clip_sdxl_plus_vith": "ViT-H",
    "ip-adapter_clip_sdxl": "ViT-bigG", "ip-adapter_clip_g": "ViT-bigG", "ip-adapter-auto": None,
    "ip-adapter_clip_l": "ViT-L",
    "clip-vit-h (ipadapter)": "ViT-H", "clip-vit-bigg (ipadapter)": "ViT-bigG", "clip-vit-l (ipadapter)": "ViT-L",
}
FACEID_MODULES = ("ip-adapter_face_id", "ip-adapter_face_id_plus", "insightface", "faceid")
CONTROLNET_MODULES = tuple(PREPROCESSORS)  # imprompt.generation.preprocess: the weight-free ones, then controlnet_aux's
# resize_mode -> how the reference is fitted into CLIP's square: A1111's "Resize and Fill" pads.
RESIZE_MODES = {"just resize": "center", "crop and resize": "center", "resize and fill": "pad",
                "0": "center", "1": "center", "2": "pad"}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


def sampler_key(sampler_name: str | None, scheduler: str | None = None) -> str | None:
    """Our scheduler key for A1111's sampler name (and, in A1111 >= 1.9, its separate schedule type)."""
    if not sampler_name:
        return None
    name = sampler_name.strip()
    if scheduler and scheduler.strip().lower() == "karras" and "karras" not in name.lower():
        name += " Karras"
    for key, choice in SCHEDULERS.items():
        if choice.a1111.lower() == name.lower() or key == name.lower():
            return key
    known = ", ".join(sorted({c.a1111 for c in SCHEDULERS.values()}))
    raise ValueError(f"sampler_name {sampler_name!r} is not one imprompt has; choose one of {known}")


class ControlNetUnit(BaseModel):
    """One unit of ``alwayson_scripts.controlnet.args`` (sd-webui-controlnet's field names)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None  # base64 / data URL, {"image": ..., "mask": ...}, or a list of either
    input_image: Any = None  # older clients' name for image
    mask: str | None = None
    mask_image: str | None = None
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    resize_mode: str | int = "Crop and Resize"
    control_mode: str | int = "Balanced"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    save_detected_map: bool = True
    advanced_weighting: list[float] | None = None


class Txt2ImgPayload(BaseModel):
    """``/sdapi/v1/txt2img``. Size None: the model's own (A1111's clients send it; the toy model is 32 px)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=100)
    steps: int = Field(20, ge=1, le=500)
    cfg_scale: float = 7.0
    # A1111's guidance of the image conditioning (there for InstructPix2Pix models): here the image prompts'
    # own guidance scale (imprompt.generation.image_guidance); None: cfg_scale for both.
    image_cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Img2ImgPayload(Txt2ImgPayload):
    """``/sdapi/v1/img2img``: init_images, denoising_strength, and the inpainting fields."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None
    mask_blur: int = 4
    inpainting_mask_invert: int = 0
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    resize_mode: int = 0


def unit_images(unit: ControlNetUnit) -> list[tuple[str, str | None]]:
    """(image, mask) pairs of a unit, from any of the shapes clients send."""
    raw = unit.image if unit.image is not None else unit.input_image
    items = raw if isinstance(raw, list) else [raw] if raw is not None else []
    pairs = []
    for item in items:
        if isinstance(item, dict):
            pairs.append((item.get("image"), item.get("mask")))
        else:
            pairs.append((item, None))
    mask = unit.mask or unit.mask_image
    if mask and len(pairs) == 1 and pairs[0][1] is None:
        pairs = [(pairs[0][0], mask)]
    return [(image, mask) for image, mask in pairs if image]


def reference_fidelity(unit: ControlNetUnit) -> float:
    """A reference unit's style fidelity: ``threshold_a`` (default 0.5) clamped to 0..1, but 1 for "ControlNet
    is more important" and 0 for "My prompt is more important" (hook.py: cfg_injection / soft_injection)."""
    mode = str(unit.control_mode).strip().lower()
    if mode in ("controlnet is more important", "2"):
        return 1.0
    if mode in ("my prompt is more important", "1"):
        return 0.0
    return 0.5 if unit.threshold_a < 0 else max(0.0, min(1.0, unit.threshold_a))


def strip_hash(name: str) -> str:
    """``"ip-adapter_sd15 [a1b2c3d4]"`` -> ``"ip-adapter_sd15"``: the extension lists models so; the hash is
    ignored, as the extension ignores it."""
    return _HASH_SUFFIX.sub("", name.strip())


def is_ip_adapter_unit(unit: ControlNetUnit, is_adapter: Callable[[str], bool]) -> bool:
    module = unit.module.strip().lower()
    if module in IP_ADAPTER_MODULES or "ipadapter" in module or module.startswith("ip-adapter"):
        return True
    return module in ("none", "") and is_adapter(strip_hash(unit.model))


def to_request(payload: Txt2ImgPayload, model: str, lookup: Callable[[str, str], str],
               add_image: Callable[[str, str, str], str], encoder_family: Callable[[str], str | None]) -> GenerateRequest:
    """The GenerateRequest of an A1111 payload.

    ``lookup(name, kind)`` -> the path of a model found by name (raises if none); ``add_image(base64,
    field, mode)`` decodes an image and returns the reference name it is filed under; ``encoder_family
    (adapter path)`` -> "ViT-H" / "ViT-bigG" / "ViT-L" or None.
    """
    units = payload.alwayson_scripts.get("controlnet", {}).get("args", []) if isinstance(
        payload.alwayson_scripts.get("controlnet"), dict) else []
    if not isinstance(units, list):
        raise ValueError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    parsed = [ControlNetUnit.model_validate(u) for u in units if isinstance(u, dict)]
    values: dict[str, Any] = {"adapter": [], "image": [], "scale": [], "start": [], "end": [], "mask": [], "crop": "center"}
    masks_given = False
    controls: list[ControlOptions] = []
    save_maps = False
    reference: dict[str, Any] = {}

    def is_adapter(name: str) -> bool:
        try:
            lookup(name, "adapter")
            return True
        except (ValueError, FileNotFoundError):
            return False

    for number, unit in enumerate(parsed):
        if not unit.enabled:
            continue
        where = f"alwayson_scripts.controlnet.args[{number}]"
        module = unit.module.strip().lower()
        if any(mark in module for mark in FACEID_MODULES):
            raise ValueError(f"{where}: module {unit.module!r} is IP-Adapter FaceID, which the server does not run "
                             "yet (it needs a face embedding); use `imprompt generate --adapter FACEID.bin "
                             "--face-embedding FACE.npy` or the Python API, or ip-adapter-plus-face here")
        pairs = unit_images(unit)
        if module in REFERENCE_MODES:
            if reference:
                raise ValueError(f"{where}: imprompt runs one reference unit at a time")
            if not pairs:
                raise ValueError(f"{where}: the reference unit has no image")
            reference = dict(reference_image=add_image(pairs[0][0], f"{where}.image", "RGB"), reference_mode=module,
                             reference_weight=unit.weight, style_fidelity=reference_fidelity(unit),
                             reference_start=unit.guidance_start, reference_end=unit.guidance_end)
        elif is_ip_adapter_unit(unit, is_adapter):
            adapter = lookup(strip_hash(unit.model), "adapter")
            wanted = IP_ADAPTER_MODULES.get(module)
            needed = encoder_family(adapter)
            if wanted and needed and wanted != needed:
                raise ValueError(f"{where}: module {unit.module!r} runs a {wanted} image encoder, but the adapter "
                                 f"{strip_hash(unit.model)!r} needs {needed}; pick the matching module or ip-adapter-auto")
            if not pairs:
                raise ValueError(f"{where}: the IP-Adapter unit has no image")
            index = len(values["adapter"])
            values["adapter"].append(adapter)
            for k, (image, mask) in enumerate(pairs):
                values["image"].append(f"{index}={add_image(image, f'{where}.image', 'RGB')}")
                values["mask"].append(add_image(mask, f"{where}.mask", "L") if mask else None)
                masks_given |= mask is not None
            values["scale"].append(f"{index}={unit.weight:g}")
            values["start"].append(f"{index}={unit.guidance_start:g}")
            values["end"].append(f"{index}={unit.guidance_end:g}")
            if RESIZE_MODES.get(str(unit.resize_mode).strip().lower()) == "pad":
                values["crop"] = "pad"
        else:
            # Every other unit is one ControlNet of several (MultiControlNetModel), N in unit order.
            if not pairs:
                raise ValueError(f"{where}: the ControlNet unit has no image")
            controlnet = lookup(strip_hash(unit.model), "controlnet")
            controls.append(ControlOptions(len(controls), controlnet, add_image(pairs[0][0], f"{where}.image", "RGB"),
                                           unit.weight, unit.guidance_start, unit.guidance_end, unit.module,
                                           unit.processor_res, unit.threshold_a, unit.threshold_b))
            save_maps |= unit.save_detected_map and unit.module.strip().lower() not in ("none", "")
    if masks_given:
        if None in values["mask"]:
            raise ValueError("when one IP-Adapter image has a mask, every IP-Adapter image needs one")
    else:
        values["mask"] = []

    scheduler = sampler_key(payload.sampler_name or payload.sampler_index, payload.scheduler)
    request = dict(
        model=model, prompt=payload.prompt, negative_prompt=payload.negative_prompt, steps=payload.steps,
        guidance=payload.cfg_scale, image_guidance=payload.image_cfg_scale,
        seed=None if payload.seed < 0 else payload.seed, width=payload.width,
        height=payload.height, num_images=payload.batch_size * payload.n_iter, batch_size=payload.batch_size,
        scheduler=scheduler, save_control_map=save_maps, **request_values(controls), **values, **reference)
    if isinstance(payload, Img2ImgPayload):
        if not payload.init_images:
            raise ValueError("init_images: img2img needs one init image")
        request["init_image"] = add_image(payload.init_images[0], "init_images[0]", "RGB")
        request["strength"] = payload.denoising_strength
        if payload.mask:
            request["mask_image"] = add_image(payload.mask, "mask", "L")
    return GenerateRequest(**request)


def info_json(payload: Txt2ImgPayload, seeds: list[int], infotexts: list[str], width: int, height: int,
              sampler: str) -> dict:
    """What A1111 puts in a response's ``info`` (a JSON string of this)."""
    return {"prompt": payload.prompt, "all_prompts": [payload.prompt] * len(seeds),
            "negative_prompt": payload.negative_prompt, "all_negative_prompts": [payload.negative_prompt] * len(seeds),
            "seed": seeds[0] if seeds else -1, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "width": width, "height": height, "sampler_name": sampler, "cfg_scale": payload.cfg_scale,
            "image_cfg_scale": payload.image_cfg_scale,
            "steps": payload.steps, "batch_size": payload.batch_size, "n_iter": payload.n_iter,
            "infotexts": infotexts, "job_timestamp": "", "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "version": "imprompt"}
