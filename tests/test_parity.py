"""Parity with diffusers' own IP-Adapter: same official-format weights, same seed, same images.

diffusers loads the weights through ``load_ip_adapter`` (its converter from the official layout), we
load them through our own modules; outputs must agree to 1e-4.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.checkpoint import nest

PROMPT = "a red star on a blue background"


def _pipelines(family: str, control: bool):
    pipe = tm.sd15_pipeline() if family == "sd15" else tm.sdxl_pipeline()
    if control:
        net = tm.controlnet(pipe.unet)
        cls = StableDiffusionControlNetPipeline if family == "sd15" else StableDiffusionXLControlNetPipeline
        pipe = cls(**pipe.components, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy(pipe)


def _run(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0), **kwargs).images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["linear", "plus"])
@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("control", [False, True], ids=["txt2img", "controlnet"])
def test_matches_diffusers(family, kind, num_images, control):
    ours, theirs = _pipelines(family, control)
    encoder = tm.image_encoder()
    adapter = tm.random_adapter(ours.unet, kind, encoder=encoder)
    references = tm.reference_images(num_images)
    extra = {"image": tm.reference_images(1, 64)[0].resize((64, 64))} if control else {}

    theirs.image_encoder = copy.deepcopy(encoder)
    theirs.load_ip_adapter(nest({k: v.clone() for k, v in adapter.state_dict().items()}),
                           subfolder="", weight_name="", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.5)
    expected = _run(theirs, ip_adapter_image=[references], **extra)

    with attach(ours.unet, adapter) as attachment:
        settings = GenerationSettings(prompt=PROMPT, steps=3, guidance=7.5, seed=0)
        got = generate(ours, attachment, settings, [ImagePrompt(references, scale=0.5)], [ImageEncoder(encoder)],
                       control_image=extra.get("image"), output_type="np")
    plain = _run(ours, **extra)

    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-2  # the adapter really acts


def test_two_adapters_match_diffusers():
    ours, theirs = _pipelines("sd15", control=False)
    encoder = tm.image_encoder()
    base = tm.random_adapter(ours.unet, "linear", seed=1, encoder=encoder)
    plus = tm.random_adapter(ours.unet, "plus", seed=2, encoder=encoder)
    refs = tm.reference_images(2)

    theirs.image_encoder = copy.deepcopy(encoder)
    theirs.load_ip_adapter([nest(dict(base.state_dict())), nest(dict(plus.state_dict()))],
                           subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None)
    theirs.set_ip_adapter_scale([0.5, 0.7])
    expected = _run(theirs, ip_adapter_image=[[refs[0]], [refs[1]]])

    with attach(ours.unet, [base, plus]) as attachment:
        got = generate(ours, attachment, GenerationSettings(prompt=PROMPT, steps=3, seed=0),
                       [ImagePrompt([refs[0]], adapter=0, scale=0.5), ImagePrompt([refs[1]], adapter=1, scale=0.7)],
                       [ImageEncoder(encoder)] * 2, output_type="np")
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpainting_match_diffusers(family, task):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    base, base_copy = _pipelines(family, control=False)
    ours, theirs = auto.from_pipe(base), auto.from_pipe(base_copy)
    encoder = tm.image_encoder()
    adapter = tm.random_adapter(ours.unet, "plus", encoder=encoder)
    refs = tm.reference_images(1)
    init = tm.reference_images(1, 64)[0].resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    extra = {"image": init, "strength": 0.7, **({"mask_image": mask} if task == "inpaint" else {})}

    theirs.image_encoder = copy.deepcopy(encoder)
    theirs.feature_extractor = tm.feature_extractor()
    theirs.load_ip_adapter(nest(dict(adapter.state_dict())), subfolder="", weight_name="", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.5)
    expected = _run(theirs, ip_adapter_image=[refs], **extra)

    with attach(ours.unet, adapter) as attachment:
        settings = GenerationSettings(prompt=PROMPT, steps=3, seed=0, strength=0.7)
        got = generate(ours, attachment, settings, [ImagePrompt(refs, scale=0.5)], [ImageEncoder(encoder)],
                       init_image=init, mask_image=mask if task == "inpaint" else None, output_type="np")
    plain = _run(ours, **extra)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-3
