"""The native ``/v1`` API's payloads, as :mod:`imprompt.server.a1111` holds A1111's: a JSON body with
every generation field and a list of image prompts, turned into a GenerateRequest."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from ..generation.controls import ControlOptions, request_values
from ..generation.request import GenerateRequest
from ..generation.schedulers import SCHEDULERS
from ..generation.text_diff import DEFAULT_STRENGTH
from ..training.tune import INITS, TuneConfig, TuneOptions
from .form import MAX_TUNE_STEPS


class ImagePromptSpec(BaseModel):
    """One adapter and its references (every field of :class:`~imprompt.generation.prompts.ImagePrompt`)."""

    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="adapter name, as GET /v1/models lists it")
    images: list[str] = Field(default_factory=list, description="base64 references (or multipart file names)")
    scale: float = 0.6
    combine: str | None = Field(None, description="concat, average, weighted, add, subtract or norm average")
    weights: list[float] | None = None
    layers: str | None = Field(None, description="style, composition, style_and_composition, all, or 'block=w,...'")
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    masks: list[str] | None = Field(None, description="one region mask per image (white = acts)")
    negative_images: list[str] = Field(default_factory=list)
    image_encoder: str | None = Field(None, description="default: the one the adapter needs")
    weight_type: str | None = Field(None, description="ComfyUI's weight types: linear, ease in, style transfer, ...")
    composition_scale: float | None = Field(None, description="composition blocks' weight (default: scale)")
    embeds_scaling: str | None = Field(None, description="V only, K+V, K+V w/ C penalty or K+mean(V) w/ C penalty")
    negative_noise: str | None = Field(None, description="noise negative image: TYPE[:STRENGTH[:BLUR[:SEED]]]")
    tiles: str | None = Field(None, description="cut references into encoder-sized tiles: on, masked, enhance, or "
                                                "words joined by commas (masked,enhance)")
    tile_overlap: float | None = Field(None, ge=0.0, le=0.9, description="least tile overlap, fraction of a tile")
    tile_sharpen: float | None = Field(None, ge=0.0, le=1.0, description="contrast-adaptive sharpening, 0 to 1")
    embeds: str | None = Field(None, description="base64 embeds file (imprompt encode / tune, diffusers or ComfyUI "
                                                 ".safetensors or .ipadpt; or a multipart file name) instead of "
                                                 "images")
    text_diff: str | None = Field(None, description="edit the image prompt with two texts, 'FROM -> TO' (DALL-E 2's "
                                                    "text diff; base adapters)")
    text_diff_strength: float | None = Field(None, ge=0.0, le=1.0, description="how far towards the text diff "
                                             f"(default {DEFAULT_STRENGTH})")


class ReferenceSpec(BaseModel):
    """Reference-only (:class:`~imprompt.generation.reference.ReferenceOptions`)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 reference (or a multipart file name)")
    mode: str = Field("reference_only", description="reference_only, reference_adain or reference_adain+attn")
    style_fidelity: float = Field(0.5, ge=0.0, le=1.0)
    weight: float = Field(1.0, ge=0.0, le=2.0)
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)


class ControlNetSpec(BaseModel):
    """One ControlNet of several (imprompt.generation.controls.ControlOptions' fields)."""

    model_config = ConfigDict(extra="forbid")
    controlnet: str = Field(description="ControlNet name, as GET /v1/models lists it")
    image: str = Field(description="base64 control image (or a multipart file name)")
    scale: float = 1.0
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    preprocess: str = Field("none", description="preprocessor (GET /controlnet/module_list)")
    resolution: int | None = Field(None, description="the image's short side before preprocessing")
    threshold_a: float | None = None
    threshold_b: float | None = None


class NativeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="checkpoint name (default: the server's)")
    prompt: str = ""
    negative_prompt: str = ""
    image_prompts: list[ImagePromptSpec] = Field(default_factory=list)
    reference: ReferenceSpec | None = None
    crop: str = "center"
    steps: int = Field(30, ge=1, le=500)
    guidance: float = 7.5
    image_guidance: float | None = Field(None, description="a guidance scale of its own for the image prompts "
                                         "(two-conditioning guidance); default: the guidance")
    seed: int | None = Field(None, ge=0)
    width: int | None = None
    height: int | None = None
    num_images: int = Field(1, ge=1, le=64)
    batch_size: int = Field(4, ge=1, le=64)
    scheduler: str | None = Field(None, description=", ".join(SCHEDULERS))
    init_image: str | None = None
    mask_image: str | None = None
    strength: float = Field(0.8, ge=0.0, le=1.0)
    controlnet: str | None = Field(None, description="one ControlNet (or give controlnets)")
    control_image: str | None = None
    controlnet_scale: float = 1.0
    controlnets: list[ControlNetSpec] = Field(default_factory=list, description="several ControlNets at once")
    save_control_map: bool = Field(False, description="also return the preprocessed control maps")
    accelerate: str | None = Field(None, description="opt-in step skipping: tgate:STEP or deepcache:N (default off)")
    text_diff_encoder: str | None = Field(None, description="the image encoder's CLIP text tower for text diffs, by "
                                          "name (default: the pipeline's or the image encoder folder's)")


def native_to_request(body: NativeRequest, model: str, lookup: Callable[[str, str], str],
                      image: Callable[[str, str, str], str],
                      embeds: Callable[[str, str], str] | None = None) -> GenerateRequest:
    """The GenerateRequest of a /v1 body. ``lookup(name, kind)`` -> a model path found by name;
    ``image(ref, field, mode)`` and ``embeds(ref, field)`` -> the name an uploaded image or embeds file
    is filed under."""
    values: dict[str, list[str]] = {k: [] for k in ("adapter", "image", "scale", "combine", "weights", "layers",
                                                    "start", "end", "mask", "negative_image", "image_encoder",
                                                    "weight_type", "composition_scale", "embeds_scaling",
                                                    "negative_noise", "embeds",
                                                    "tiles", "tile_overlap", "tile_sharpen", "text_diff",
                                                    "text_diff_strength")}
    any_masks = any(p.masks for p in body.image_prompts)
    for i, spec in enumerate(body.image_prompts):
        where = f"image_prompts[{i}]"
        values["adapter"].append(lookup(spec.adapter, "adapter"))
        if spec.masks is not None and len(spec.masks) != len(spec.images):
            raise ValueError(f"{where}.masks: {len(spec.masks)} masks for {len(spec.images)} images; give one per image")
        if any_masks and not spec.masks:
            raise ValueError(f"{where}: when one image prompt has masks, give every image prompt masks")
        for k, ref in enumerate(spec.images):
            values["image"].append(f"{i}={image(ref, f'{where}.images[{k}]', 'RGB')}")
            if spec.masks:
                values["mask"].append(image(spec.masks[k], f"{where}.masks[{k}]", "L"))
        if spec.embeds:
            if embeds is None:
                raise ValueError(f"{where}.embeds: this route takes no embeds files; send the references as images")
            values["embeds"].append(f"{i}={embeds(spec.embeds, f'{where}.embeds')}")
        for k, ref in enumerate(spec.negative_images):
            values["negative_image"].append(f"{i}={image(ref, f'{where}.negative_images[{k}]', 'RGB')}")
        values["scale"].append(f"{i}={spec.scale!r}")
        values["start"].append(f"{i}={spec.start!r}")
        values["end"].append(f"{i}={spec.end!r}")
        if spec.combine:
            values["combine"].append(f"{i}={spec.combine}")
        if spec.weights:
            values["weights"].append(f"{i}=" + ",".join(repr(w) for w in spec.weights))
        if spec.layers:
            values["layers"].append(f"{i}={spec.layers}")
        for name in ("weight_type", "composition_scale", "embeds_scaling", "negative_noise", "text_diff",
                     "text_diff_strength"):
            if getattr(spec, name) is not None:
                values[name].append(f"{i}={getattr(spec, name)!s}")
        if spec.tiles:
            values["tiles"].append(f"{i}={spec.tiles}")
        if spec.tile_overlap is not None:
            values["tile_overlap"].append(f"{i}={spec.tile_overlap!r}")
        if spec.tile_sharpen is not None:
            values["tile_sharpen"].append(f"{i}={spec.tile_sharpen!r}")
        if spec.image_encoder:
            values["image_encoder"].append(f"{i}={lookup(spec.image_encoder, 'image_encoder')}")
    return GenerateRequest(
        model=model, prompt=body.prompt, negative_prompt=body.negative_prompt, crop=body.crop, steps=body.steps,
        guidance=body.guidance, image_guidance=body.image_guidance, seed=body.seed, width=body.width,
        height=body.height, num_images=body.num_images,
        batch_size=body.batch_size, scheduler=body.scheduler, strength=body.strength,
        init_image=image(body.init_image, "init_image", "RGB") if body.init_image else None,
        mask_image=image(body.mask_image, "mask_image", "L") if body.mask_image else None,
        save_control_map=body.save_control_map, accelerate=body.accelerate,
        text_diff_encoder=lookup(body.text_diff_encoder, "image_encoder") if body.text_diff_encoder else None,
        **control_values(body, lookup, image), **values,
        **_reference_fields(body.reference, image))


class TuneRequest(BaseModel):
    """POST /v1/tune: ``imprompt tune``'s flags (:class:`~imprompt.training.tune.TuneConfig`), references as
    base64; the result is an embeds file for ``image_prompts[].embeds``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="checkpoint name (default: the server's)")
    adapter: str = Field(description="adapter name, as GET /v1/models lists it")
    images: list[str] = Field(min_length=1, description="base64 references (several views: one feature set each)")
    prompt: str = Field("", description="the text the references are tuned with (empty: the image alone)")
    image_encoder: str | None = Field(None, description="default: the one the adapter needs")
    crop: str = "center"
    steps: int = Field(TuneOptions.steps, ge=0, le=MAX_TUNE_STEPS)
    lr: float = Field(TuneOptions.lr, ge=0.0, description="Adam learning rate, in units of the features' RMS")
    batch: int = Field(TuneOptions.batch, ge=1, le=64, description="noise draws per step")
    regularise: float = Field(TuneOptions.regularise, ge=0.0, description="weight of |f - f0|^2 / |f0|^2")
    init: str = Field("encoder", description=" or ".join(INITS))
    seed: int = Field(0, ge=0)
    guard: int = Field(0, ge=0, le=16, description="previews per feature set: keep the tuning only if its previews "
                       "look more like the references than the encoder's (0: always keep it)")


def tune_to_config(body: TuneRequest, model: str, lookup: Callable[[str, str], str],
                   image: Callable[[str, str, str], str]) -> TuneConfig:
    """The TuneConfig of a /v1/tune body (``lookup`` and ``image`` as for :func:`native_to_request`)."""
    return TuneConfig(image=[image(ref, f"images[{k}]", "RGB") for k, ref in enumerate(body.images)], model=model,
                      adapter=lookup(body.adapter, "adapter"), prompt=body.prompt, crop=body.crop,
                      image_encoder=lookup(body.image_encoder, "image_encoder") if body.image_encoder else None,
                      steps=body.steps, lr=body.lr, batch=body.batch, regularise=body.regularise, init=body.init,
                      seed=body.seed, guard=body.guard, progress=False)


def _reference_fields(spec: ReferenceSpec | None, image: Callable[[str, str, str], str]) -> dict:
    if spec is None:
        return {}
    return dict(reference_image=image(spec.image, "reference.image", "RGB"), reference_mode=spec.mode,
                style_fidelity=spec.style_fidelity, reference_weight=spec.weight, reference_start=spec.start,
                reference_end=spec.end)


def control_values(body: NativeRequest, lookup: Callable[[str, str], str],
                   image: Callable[[str, str, str], str]) -> dict[str, list[str]]:
    """The request's per-ControlNet values: ``controlnet`` (the single form) first, then ``controlnets``."""
    specs = [(spec, f"controlnets[{i}].image") for i, spec in enumerate(body.controlnets)]
    if body.controlnet or body.control_image:
        if not (body.controlnet and body.control_image):
            raise ValueError("controlnet and control_image go together")
        specs.insert(0, (ControlNetSpec(controlnet=body.controlnet, image=body.control_image,
                                        scale=body.controlnet_scale), "control_image"))
    return request_values([ControlOptions(n, lookup(spec.controlnet, "controlnet"), image(spec.image, where, "RGB"),
                                          spec.scale, spec.start, spec.end, spec.preprocess, spec.resolution,
                                          spec.threshold_a, spec.threshold_b)
                           for n, (spec, where) in enumerate(specs)])
