"""Separate guidance scales for the text and the image prompts (two-conditioning guidance).

Plain classifier-free guidance with an image prompt moves from the unconditional prediction (no text,
the adapter's "no image" tokens) towards the prediction with both conditions, by one scale::

    eps = e(0, 0) + s * (e(T, I) - e(0, 0))

so text and image are amplified together, and where they disagree (a reference on a red background,
"blue background" in the text) the stronger one wins everything. InstructPix2Pix (Brooks et al. 2023,
arXiv 2211.09800, section 3.4, eq. 3) splits the step into an image direction and a text direction
taken *from the image-conditioned prediction*, each with its own scale::

    eps = e(0, 0) + s_I * (e(0, I) - e(0, 0)) + s_T * (e(T, I) - e(0, I))

``s_T`` is the usual guidance (``--guidance``), ``s_I`` is ``--image-guidance``. With ``s_I == s_T``
this is plain guidance exactly, and nothing here runs (bit-identical). A larger ``s_T`` lets the text
change what it names with less of the reference lost; in the toy world it helps together with per-layer
image-prompt weights on one build and not on another (docs/toy-results.md, section 3).

How: the pipeline runs its loop as usual, with its [unconditional; conditional] batch. This call's
pipeline view (:func:`imprompt.generation.generate.call_pipeline`) gets an :class:`ImageGuidanceUNet`
in place of the UNet, which runs one UNet call over *three* row groups instead of two:

* text-side inputs (the latents, the text states, SDXL's pooled text and size ids, ControlNet
  residuals): [unconditional, unconditional, conditional];
* the image prompts' keys and values: [no-image tokens, image tokens, image tokens];

and hands the pipeline back ``[e(0, 0); c]`` with ``c`` chosen so that the pipeline's own
``e(0, 0) + s_T * (c - e(0, 0))`` is the equation above. So it costs 1.5x the UNet rows of plain
guidance, works with every pipeline (img2img, inpainting, ControlNet, batched generation), and keeps
nothing on the shared UNet. diffusers' ``guidance_rescale`` then rescales the combined prediction.

Not combined (a ValueError says so): step skipping (T-GATE halves the batch, DeepCache wraps the UNet
too) and Reference-only (its extra UNet pass).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..adapter.attention import IMAGE_PROMPTS_KWARG, ImagePromptCall


def _text_side(value: Any, rows: int) -> Any:
    """[uncond; cond] -> [uncond; uncond; cond] for a tensor laid out over the guidance batch (else as is)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
        half = rows // 2
        return torch.cat([value[:half], value[:half], value[half:]])
    if isinstance(value, dict):
        return {k: _text_side(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_text_side(v, rows) for v in value)
    return value


def _image_side(value: torch.Tensor, rows: int) -> torch.Tensor:
    """[no image; image] -> [no image; image; image] (a mask shared by all rows stays as it is)."""
    if value.shape[0] != rows:
        return value
    half = rows // 2
    return torch.cat([value[:half], value[half:], value[half:]])


def three_way(call: ImagePromptCall, rows: int) -> ImagePromptCall:
    """``call``'s image prompts laid out for the three row groups (computed once per generation)."""
    layers = {
        layer: [dataclasses.replace(
            kv, key=_image_side(kv.key, rows), value=_image_side(kv.value, rows),
            masks=None if kv.masks is None else {n: _image_side(m, rows) for n, m in kv.masks.items()})
            for kv in entries]
        for layer, entries in call.layers.items()
    }
    return dataclasses.replace(call, layers=layers)


def combine(uncond: torch.Tensor, image: torch.Tensor, both: torch.Tensor, image_guidance: float,
            text_guidance: float) -> torch.Tensor:
    """The conditional prediction ``c`` for which ``uncond + text_guidance * (c - uncond)`` is
    ``uncond + image_guidance * (image - uncond) + text_guidance * (both - image)``."""
    return uncond + (image_guidance / text_guidance) * (image - uncond) + (both - image)


class ImageGuidanceUNet:
    """This call's view of the shared UNet: three row groups per step, returned as the pipeline's two.

    Looks like the UNet to the pipeline (every other attribute is the UNet's); holds only this call's
    settings and its three-group image prompts. Not an ``nn.Module``, so it adds nothing to any state dict.
    """

    def __init__(self, unet, call: ImagePromptCall, image_guidance: float, text_guidance: float):
        self._unet = unet
        self.call = call
        self.image_guidance = image_guidance
        self.text_guidance = text_guidance
        self._three: tuple[int, ImagePromptCall] | None = None  # (rows, call) laid out for them

    def __getattr__(self, name: str) -> Any:
        if name == "_unet":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._unet, name)

    def _prompts_for(self, rows: int) -> ImagePromptCall:
        if self._three is None or self._three[0] != rows:
            self._three = (rows, three_way(self.call, rows))
        three = self._three[1]
        three.step, three.num_steps = self.call.step, self.call.num_steps  # advanced by the call's callback
        return three

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        if args:
            raise ValueError("image guidance: call the UNet with keyword arguments after encoder_hidden_states")
        rows = sample.shape[0]
        if rows % 2:
            raise ValueError(f"image guidance needs the guidance batch [unconditional; conditional], got {rows} rows")
        extra = dict(kwargs.get("cross_attention_kwargs") or {})
        if extra.get(IMAGE_PROMPTS_KWARG) is not self.call:
            raise ValueError("image guidance: the UNet was called without this generation's image prompts")
        extra[IMAGE_PROMPTS_KWARG] = self._prompts_for(rows)
        kwargs = {k: _text_side(v, rows) for k, v in kwargs.items() if k != "cross_attention_kwargs"}
        out = self._unet(_text_side(sample, rows), _text_side(timestep, rows), _text_side(encoder_hidden_states, rows),
                         cross_attention_kwargs=extra, return_dict=False, **kwargs)[0]
        uncond, image, both = out.chunk(3)
        result = torch.cat([uncond, combine(uncond, image, both, self.image_guidance, self.text_guidance)])
        if not return_dict:
            return (result,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=result)


def check(image_guidance: float | None, *, guidance: float, uses_guidance: bool, has_image_prompts: bool,
          acceleration: bool = False, reference: bool = False) -> bool:
    """Whether this call needs the three-group UNet; ValueError where the settings cannot combine."""
    if image_guidance is None or image_guidance == guidance:
        return False  # plain guidance is the same equation
    what = f"image guidance {image_guidance:g}"
    if not has_image_prompts:
        raise ValueError(f"{what} scales the image prompts' direction, but this generation has none; "
                         "give an image prompt or leave image guidance out")
    if not uses_guidance:
        raise ValueError(f"{what} needs classifier-free guidance: set the (text) guidance above 1, got {guidance:g}")
    if acceleration:
        raise ValueError(f"{what} does not combine with --accelerate (both change the UNet's guidance batch); "
                         "leave one of them out")
    if reference:
        raise ValueError(f"{what} does not combine with Reference-only yet; leave one of them out")
    return True


def apply(view, call: ImagePromptCall, image_guidance: float, text_guidance: float) -> ImageGuidanceUNet:
    """Give this call's pipeline ``view`` (its own, from ``call_pipeline``) the three-group UNet."""
    wrapper = ImageGuidanceUNet(view.unet, call, image_guidance, text_guidance)
    # As DeepCache's wrapper: only this view sees it; object.__setattr__ skips the pipeline's config
    # bookkeeping of a new component (the view is thrown away after the call).
    object.__setattr__(view, "unet", wrapper)
    return wrapper
