"""Generation with image prompts through diffusers' own pipelines.

We do not rewrite the denoising loop: the pipeline runs as it is, the image prompts are prepared
once before the loop and travel with the call in ``cross_attention_kwargs``, and the call's own step
callback tells them how far the schedule has come. Nothing per call is stored on the shared UNet or
pipeline, so generations can run side by side on one model. Works with any Stable Diffusion / SDXL pipeline whose UNet the adapters are attached to:
text-to-image, img2img, inpainting and their ControlNet forms (the ControlNet keeps its own,
untouched attention processors, so it never sees image-prompt tokens).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from PIL import Image

from ..adapter.attach import Attachment
from ..adapter.attention import ImagePromptCall
from ..encoding import ImageEncoder, ImageInputError
from . import image_guidance
from .acceleration import Acceleration, gate_applied
from .acceleration import start as start_acceleration
from .loras import loras_applied
from .networks import Networks, prompt_tags
from .prompts import BatchLayout, ImagePrompt, prepare_image_prompt
from .reference import ReferenceOptions, prepare_reference, reference_applied
from .schedulers import make_scheduler
from .settings import GenerationSettings
from .text_encoding import TextSchedule, towers


def uses_guidance(pipe, guidance: float) -> bool:
    # Same rule as the SD / SDXL pipelines' ``do_classifier_free_guidance``.
    return guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def latent_size(pipe, settings: GenerationSettings, init_image: Image.Image | None) -> tuple[int, int]:
    scale = pipe.vae_scale_factor
    if init_image is not None and settings.height is None:
        return init_image.height // scale, init_image.width // scale
    size = pipe.unet.config.sample_size * scale
    return (settings.height or size) // scale, (settings.width or size) // scale


def call_pipeline(pipe, scheduler: str | None = None):
    """A pipeline for one call: the same model components, a scheduler of its own.

    diffusers pipelines keep per-call state on themselves (the scheduler's timesteps and step index,
    ``_guidance_scale``, ``_cross_attention_kwargs``, ...), so two generations on one pipeline object
    would overwrite each other's. This view shares every model (no copy, a few milliseconds) and gets
    a fresh scheduler — the model's own, or the one named.
    """
    components = dict(pipe.components)
    config = pipe.scheduler.config
    components["scheduler"] = make_scheduler(scheduler, config) if scheduler else type(pipe.scheduler).from_config(config)
    # Non-model constructor arguments (requires_safety_checker, force_zeros_for_empty_prompt, ...)
    # are saved in the pipeline's config.
    params = inspect.signature(type(pipe).__init__).parameters
    options = {k: v for k, v in pipe.config.items() if k in params and k not in components}
    view = type(pipe)(**components, **options)
    view.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return view


def _call_arguments(pipe, settings: GenerationSettings, init_image, mask_image, control_image,
                    text: TextSchedule | None) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    prompts = text.call_arguments() if text is not None else dict(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt or None)
    kwargs: dict[str, Any] = dict(
        **prompts,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        num_images_per_prompt=settings.num_images,
    )
    if settings.seed is not None:
        # A CPU generator gives the same noise on every device, as diffusers' docs recommend.
        kwargs["generator"] = torch.Generator("cpu").manual_seed(settings.seed)
    if "height" in params:
        kwargs.update(height=settings.height, width=settings.width)
    takes_init = "strength" in params
    if takes_init:
        if init_image is None:
            raise ImageInputError(f"{type(pipe).__name__} needs an init image (img2img / inpainting)")
        kwargs.update(image=init_image, strength=settings.strength)
    elif init_image is not None:
        raise ImageInputError(f"an init image was given, but {type(pipe).__name__} is a text-to-image pipeline")
    if "mask_image" in params:
        if mask_image is None:
            raise ImageInputError("inpainting needs a mask image (white = repaint)")
        if init_image is not None and mask_image.size != init_image.size:
            raise ImageInputError(f"the inpainting mask is {mask_image.size[0]}x{mask_image.size[1]}, the image "
                                  f"{init_image.size[0]}x{init_image.size[1]}; they must be the same size")
        kwargs["mask_image"] = mask_image
    if getattr(pipe, "controlnet", None) is not None:
        if control_image is None:
            raise ImageInputError(f"{type(pipe).__name__} has a ControlNet and needs a control image")
        values = _control_arguments(pipe, settings, control_image)
        kwargs["control_image" if "control_image" in params else "image"] = values.pop("image")
        kwargs.update(values)
    elif control_image is not None:
        raise ImageInputError("a control image was given, but the pipeline has no ControlNet")
    kwargs.update(settings.extra)
    return kwargs


def _control_arguments(pipe, settings: GenerationSettings, control_image) -> dict[str, Any]:
    """The ControlNets' scale and steps as diffusers takes them: a list, one per ControlNet, for a
    MultiControlNetModel (checked against its count here, with a message, rather than in diffusers)."""
    nets = getattr(pipe.controlnet, "nets", None)
    values = {"controlnet_conditioning_scale": settings.controlnet_scale,
              "control_guidance_start": settings.control_guidance_start,
              "control_guidance_end": settings.control_guidance_end}
    if nets is None:
        if isinstance(control_image, (list, tuple)):
            if len(control_image) != 1:
                raise ImageInputError(f"the pipeline has one ControlNet but {len(control_image)} control images "
                                      "were given")
            control_image = control_image[0]
        for name, value in values.items():
            if isinstance(value, (list, tuple)):
                if len(value) != 1:
                    raise ValueError(f"{name}: {len(value)} values for one ControlNet")
                values[name] = value[0]
        return {**values, "image": control_image}
    if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
        found = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise ImageInputError(f"the pipeline has {len(nets)} ControlNets; give one control image each, found {found}")
    for name, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) != len(nets):
            raise ValueError(f"{name}: {len(value)} values for {len(nets)} ControlNets; give one each or one for all")
        values[name] = list(value) if isinstance(value, (list, tuple)) else [value] * len(nets)
    return {**values, "image": list(control_image)}


def generate(pipe, attachment: Attachment | None, settings: GenerationSettings,
             image_prompts: Sequence[ImagePrompt] = (), encoders: Sequence[ImageEncoder] = (), *,
             init_image: Image.Image | None = None, mask_image: Image.Image | None = None,
             control_image: Image.Image | Sequence[Image.Image] | None = None, output_type: str = "pil", callback=None,
             networks: Networks | None = None, reference: ReferenceOptions | None = None,
             acceleration: Acceleration | str | None = None):
    """Run ``pipe`` with image prompts; returns the pipeline's images (PIL by default).

    ``encoders[i]`` is the image encoder of ``attachment.adapters[i]``. ``callback`` is a diffusers
    ``callback_on_step_end`` of your own, chained after ours. The text prompts are read with
    AUTOMATIC1111's syntax (:mod:`imprompt.generation.text_encoding`); ``networks`` finds the LoRAs
    and embeddings they name. The LoRAs are loaded into the pipeline for this call only and removed
    after it (so, like attaching adapters, no other generation may use the same models meanwhile).
    ``reference``: Reference-only (:mod:`imprompt.generation.reference`), alone or with image prompts.
    ``acceleration``: opt-in step skipping, ``"tgate:STEP"`` or ``"deepcache:N"`` (or an
    :class:`~imprompt.generation.acceleration.Acceleration`); see :mod:`imprompt.generation.acceleration`.
    """
    settings.check()
    acceleration = Acceleration.parse(acceleration)
    if reference is not None:
        reference.check()
    tags = prompt_tags(settings.prompt, settings.negative_prompt)
    if tags and networks is None:
        raise ValueError(f"the prompt names LoRAs ({', '.join(t.written for t in tags)}) but no model folders "
                         "were given to find them in (--models-dir; Python: networks=Networks.from_catalog(...))")
    with loras_applied(pipe, networks.uses(tags) if tags else [],
                       networks.lora_cache if networks is not None else None):
        return _generate(pipe, attachment, settings, image_prompts, encoders, init_image, mask_image,
                         control_image, output_type, callback, networks, reference, acceleration)


def _generate(pipe, attachment, settings, image_prompts, encoders, init_image, mask_image, control_image,
              output_type, callback, networks, reference=None, acceleration=None):
    if image_prompts and attachment is None:
        raise ValueError("image prompts need adapters attached to the pipeline's UNet (imprompt.attach)")
    if attachment is not None:
        if attachment.unet is not pipe.unet:
            raise ValueError("the adapters are attached to a different UNet than this pipeline's")
        if len(encoders) != len(attachment.adapters):
            raise ValueError(f"give one image encoder per attached adapter: {len(attachment.adapters)} adapters, {len(encoders)} encoders")

    layout = BatchLayout(uses_guidance(pipe, settings.guidance), settings.num_images)
    size = latent_size(pipe, settings, init_image)
    prepared = []
    for prompt in image_prompts:
        prepared += prepare_image_prompt(prompt, attachment, encoders[prompt.adapter], layout, size,
                                         vae_scale_factor=pipe.vae_scale_factor)
    text = (TextSchedule.build(pipe, settings.prompt, settings.negative_prompt, settings.steps,
                               networks.embeddings if networks is not None else None) if towers(pipe) else None)
    kwargs = _call_arguments(pipe, settings, init_image, mask_image, control_image, text)
    view = call_pipeline(pipe, settings.scheduler)
    ref = prepare_reference(pipe, reference, layout.guidance, size) if reference is not None else None
    # This call's image prompts, reference and progress through the schedule travel with the call.
    state = attachment.prompt_call(prepared, num_steps=settings.steps) if attachment is not None else (
        ImagePromptCall({}, num_steps=settings.steps) if ref is not None else None)
    if ref is not None:
        if state.loras:
            # Reference-only takes over the self-attention layers, where FaceID's LoRA also acts; running
            # one without the other would change the picture silently.
            raise ValueError("Reference-only and a FaceID adapter's LoRA do not combine yet; drop the reference "
                             "image or use a FaceID adapter without LoRA (Portrait)")
        state.reference = ref
    edits = text is not None and text.changes  # prompt editing / alternation: new text embeddings per step
    accel = None
    if acceleration is not None:  # this call's caches live in ``accel`` and the view, never on ``pipe``
        accel, extra = start_acceleration(acceleration, view, guidance=layout.guidance, steps=settings.steps,
                                          edits=edits, reference=ref is not None)
        kwargs.update(extra)
        if accel.gate is not None:
            state = state if state is not None else ImagePromptCall({}, num_steps=settings.steps)
            state.gate = accel.gate

    def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
        if state is not None:
            state.step, state.num_steps = step + 1, pipeline.num_timesteps
        if edits:
            tensors.update(text.in_loop(step + 1, layout.images_per_prompt, layout.guidance))
        if accel is not None:
            tensors = accel.on_step_end(pipeline, step, tensors)
        return callback(pipeline, step, timestep, tensors) if callback is not None else tensors

    if image_guidance.check(settings.image_guidance, guidance=settings.guidance, uses_guidance=layout.guidance,
                            has_image_prompts=bool(prepared), acceleration=accel is not None,
                            reference=ref is not None):
        image_guidance.apply(view, state, settings.image_guidance, settings.guidance)
    if state is not None:
        kwargs["cross_attention_kwargs"] = state.cross_attention_kwargs(kwargs.get("cross_attention_kwargs"))
    if edits:
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents", *text.tensor_names()]
    chained = on_step_end if state is not None or edits or accel is not None else callback
    with reference_applied(pipe.unet, ref), gate_applied(pipe.unet, accel):
        return view(**kwargs, output_type=output_type, callback_on_step_end=chained).images
