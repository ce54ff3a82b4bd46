"""Several ControlNets at once: parity with diffusers' MultiControlNetModel pipeline on tiny models, per-ControlNet
scale and start / end as diffusers' controlnet_conditioning_scale / control_guidance_start / _end, the
per-ControlNet flags, PNG info, saved control maps, and the A1111 API's ControlNet units."""

from __future__ import annotations

import base64
import copy
import io
import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

import tiny_models as tm
from imprompt import GenerationSettings, generate
from imprompt.cli import main
from imprompt.encoding import ImageInputError
from imprompt.generation.controls import control_options
from imprompt.generation.pnginfo import parse_parameters, read_parameters
from imprompt.generation.request import GenerateRequest

torch.set_flush_denormal(True)
PROMPT = "a red star on a blue background"


def _maps():
    first = tm.reference_images(1, 64)[0].resize((64, 64))
    second = Image.fromarray(255 - np.asarray(first))
    return [first, second]


@pytest.fixture(scope="module")
def pipes():
    base = tm.sd15_pipeline()
    nets = [tm.controlnet(base.unet, seed=1), tm.controlnet(base.unet, seed=2)]
    ours = StableDiffusionControlNetPipeline(**base.components, controlnet=nets)
    ours.set_progress_bar_config(disable=True)
    return ours, copy.deepcopy(ours)


def _theirs(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0), **kwargs).images


def test_two_controlnets_match_diffusers_multicontrolnet(pipes):
    ours, theirs = pipes
    maps = _maps()
    settings = GenerationSettings(prompt=PROMPT, steps=4, seed=0, controlnet_scale=[0.7, 1.3],
                                  control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0])
    got = generate(ours, None, settings, control_image=maps, output_type="np")
    expected = _theirs(theirs, image=maps, controlnet_conditioning_scale=[0.7, 1.3],
                       control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0])
    assert np.abs(got - expected).max() <= 1e-5
    # One value for both is diffusers' list of it repeated; a single ControlNet gets plain values.
    from imprompt.generation.generate import _control_arguments

    values = _control_arguments(ours, GenerationSettings(controlnet_scale=0.7, control_guidance_end=[0.5, 1.0]), maps)
    assert values == {"controlnet_conditioning_scale": [0.7, 0.7], "control_guidance_start": [0.0, 0.0],
                      "control_guidance_end": [0.5, 1.0], "image": maps}
    single = StableDiffusionControlNetPipeline(**{**ours.components, "controlnet": ours.controlnet.nets[0]})
    assert _control_arguments(single, GenerationSettings(controlnet_scale=[0.7]), [maps[0]]) == {
        "controlnet_conditioning_scale": 0.7, "control_guidance_start": 0.0, "control_guidance_end": 1.0,
        "image": maps[0]}


def test_per_controlnet_steps_act_as_diffusers_control_guidance(pipes):
    ours, theirs = pipes
    maps = _maps()
    full = generate(ours, None, GenerationSettings(prompt=PROMPT, steps=4, seed=0), control_image=maps,
                    output_type="np")
    late = GenerationSettings(prompt=PROMPT, steps=4, seed=0, control_guidance_start=[0.0, 0.5],
                              control_guidance_end=[1.0, 1.0])
    got = generate(ours, None, late, control_image=maps, output_type="np")
    np.testing.assert_allclose(got, _theirs(theirs, image=maps, control_guidance_start=[0.0, 0.5],
                                            control_guidance_end=[1.0, 1.0]), atol=1e-5)
    assert np.abs(got - full).max() > 1e-3  # ControlNet 1 skipping the first half of the steps changes the image
    with pytest.raises(ImageInputError, match="2 ControlNets; give one control image each, found 1"):
        generate(ours, None, GenerationSettings(prompt=PROMPT, steps=1), control_image=maps[0])


def test_control_options_parse_per_controlnet_values():
    request = GenerateRequest(controlnet=["a", "b"], control_image=["1=y.png", "x.png"], controlnet_scale=["0.5", "1=0.8"],
                              control_start=["1=0.2"], control_end=["0.9"], control_preprocess=["1=canny"],
                              control_res=["1=256"], control_threshold_a=["1=50"])
    first, second = control_options(request)
    assert (first.file, first.image, first.scale, first.start, first.end, first.preprocess) == (
        "a", "x.png", 0.5, 0.0, 0.9, "none")
    assert (second.file, second.image, second.scale, second.start, second.end, second.preprocess) == (
        "b", "y.png", 0.8, 0.2, 0.9, "canny")
    assert (second.resolution, second.thresholds()) == (256, (50.0, 200.0))
    assert second.describe("b") == ("Module: canny, Model: b, Weight: 0.8, Image: y.png, Processor Res: 256, "
                                    "Threshold A: 50, Threshold B: 200, Guidance Start: 0.2, Guidance End: 0.9")
    settings = request.settings()
    assert (settings.controlnet_scale, settings.control_guidance_start) == ([0.5, 0.8], [0.0, 0.2])
    # The library's single-ControlNet form still works: a string and a float.
    single = GenerateRequest(controlnet="a", control_image="x.png", controlnet_scale=0.6)
    assert (single.controlnet, single.control_image, single.settings().controlnet_scale) == (["a"], ["x.png"], 0.6)
    for bad, message in [
        (dict(controlnet=["a", "b"], control_image=["x.png"]), "2 --controlnet need one --control-image each"),
        (dict(controlnet=["a"], control_image=["x.png"], controlnet_scale=["2=1"]), "names ControlNet 2, but 1"),
        (dict(controlnet=["a"], control_image=["x.png"], control_start=["0.6"], control_end=["0.4"]),
         "--control-start 0.6 must be below --control-end 0.4"),
        (dict(control_preprocess=["canny"]), "--control-preprocess applies to a ControlNet, but no --controlnet"),
        (dict(controlnet=["a"], control_image=["x.png"], control_preprocess=["sobel"]), "unknown ControlNet preprocessor"),
        (dict(control_image=["x.png"]), "--control-image needs a --controlnet"),
    ]:
        with pytest.raises(ValueError, match=message):
            control_options(GenerateRequest(**bad))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(root / "sd")
    for n in (1, 2):
        tm.controlnet(pipe.unet, seed=n).save_pretrained(root / f"cn{n}")
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square).save(root / "square.png")
    _maps()[0].save(root / "ref.png")
    return root


def test_cli_two_controlnets_with_canny_match_the_library(saved, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(saved / "sd"), "--prompt", PROMPT, "--steps", "3", "--seed", "0",
                 "--controlnet", str(saved / "cn1"), "--controlnet", str(saved / "cn2"),
                 "--control-image", str(saved / "ref.png"), "--control-image", f"1={saved / 'square.png'}",
                 "--controlnet-scale", "1=0.6", "--control-end", "0=0.5", "--control-preprocess", "1=canny",
                 "--control-threshold-a", "1=50", "--control-threshold-b", "1=150", "--save-control-map",
                 "--output", str(out), "--dtype", "float32", "--device", "cpu"]) == 0
    (png,) = out.glob("00000-*.png")
    (control_map,) = out.glob("control-*.png")
    assert control_map.name == "control-00000-1.png"
    edges = cv2.Canny(np.asarray(Image.open(saved / "square.png").convert("RGB")), 50, 150)
    np.testing.assert_array_equal(np.asarray(Image.open(control_map))[:, :, 0], edges)
    info = parse_parameters(read_parameters(png))
    assert info["ControlNet 0"] == ("Module: none, Model: cn1, Weight: 1, Image: ref.png, Guidance Start: 0, "
                                    "Guidance End: 0.5")
    assert info["ControlNet 1"] == ("Module: canny, Model: cn2, Weight: 0.6, Image: square.png, Threshold A: 50, "
                                    "Threshold B: 150, Guidance Start: 0, Guidance End: 1")

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        saved / "sd", controlnet=[ControlNetModel.from_pretrained(saved / f"cn{n}") for n in (1, 2)],
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type="pil",
                    generator=torch.Generator("cpu").manual_seed(0),
                    image=[Image.open(saved / "ref.png").convert("RGB"), Image.fromarray(np.repeat(edges[:, :, None], 3, 2))],
                    controlnet_conditioning_scale=[1.0, 0.6], control_guidance_start=[0.0, 0.0],
                    control_guidance_end=[0.5, 1.0]).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(expected))


def pixels_of(data) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a1111_canny_unit_equals_the_cli(tmp_path):
    """A ControlNet made from the toy model's UNet, found by name in a models folder: an A1111 unit with
    module canny gives the pixels of `imprompt generate --control-preprocess canny`."""
    from fastapi.testclient import TestClient

    from imprompt import toy
    from imprompt.server.app import create_app
    from imprompt.server.config import ServerConfig
    from imprompt.generation.pipelines import load_pipeline

    paths = toy.toy_paths()
    unet = load_pipeline(paths["model"]).unet
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8))  # the VAE's 4x
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    root = tmp_path / "models"
    net.save_pretrained(root / "models" / "ControlNet" / "toy_canny")
    reference = sorted(paths["references"].glob("*.png"))[0]

    saved = tmp_path / "saved"
    app = create_app(ServerConfig(ui=False, models_dir=[str(root)], device="cpu", dtype="float32", save_dir=str(saved)))
    try:
        with TestClient(app) as client:
            assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
            unit = {"enabled": True, "module": "canny", "model": "toy_canny [abcdef12]", "weight": 0.8,
                    "image": _b64(reference), "threshold_a": 40, "threshold_b": 120, "guidance_end": 0.5,
                    "processor_res": 64}
            body = {"prompt": "a red circle", "steps": 3, "seed": 3, "cfg_scale": 7,
                    "alwayson_scripts": {"controlnet": {"args": [unit]}}}
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 200, response.text
            images = response.json()["images"]
            assert len(images) == 2  # the image, then the detected map (save_detected_map defaults to true)
            assert sorted(p.name for p in saved.glob("*.png"))[0] == "00000-3.png"
            np.testing.assert_array_equal(np.asarray(Image.open(saved / "control-00000-0.png")),
                                          pixels_of(images[1]))  # --save-dir: written beside the image
            info = json.loads(response.json()["info"])["infotexts"][0]
            assert "ControlNet 0: \"Module: canny, Model: toy_canny, Weight: 0.8" in info
            unit["save_detected_map"] = False
            assert len(client.post("/sdapi/v1/txt2img", json=body).json()["images"]) == 1
            # The native API's controlnets are the same ControlNets.
            native = client.post("/v1/generate", json={
                "prompt": "a red circle", "steps": 3, "seed": 3, "guidance": 7, "save_control_map": True,
                "controlnets": [{"controlnet": "toy_canny", "image": _b64(reference), "scale": 0.8, "end": 0.5,
                                 "preprocess": "canny", "resolution": 64, "threshold_a": 40, "threshold_b": 120}]})
            assert native.status_code == 200, native.text
            native_png, native_map = native.json()["images"][0]["png"], native.json()["control_maps"][0]["png"]
    finally:
        app.state.engine.close()
    out = tmp_path / "cli"
    assert main(["generate", "--prompt", "a red circle", "--steps", "3", "--seed", "3", "--guidance", "7",
                 "--models-dir", str(root), "--controlnet", "toy_canny", "--control-image", str(reference),
                 "--controlnet-scale", "0.8", "--control-end", "0.5", "--control-preprocess", "canny",
                 "--control-res", "64", "--control-threshold-a", "40", "--control-threshold-b", "120",
                 "--save-control-map", "--output", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    (png,) = out.glob("0*.png")
    (control_map,) = out.glob("control-*.png")

    np.testing.assert_array_equal(pixels_of(images[0]), np.asarray(Image.open(png).convert("RGB")))
    np.testing.assert_array_equal(pixels_of(images[1]), np.asarray(Image.open(control_map).convert("RGB")))
    np.testing.assert_array_equal(pixels_of(native_png), pixels_of(images[0]))
    np.testing.assert_array_equal(pixels_of(native_map), pixels_of(images[1]))
    assert np.asarray(Image.open(control_map)).shape[:2] == (64, 64)  # processor_res: the short side


def test_batch_control_images_are_controlnet_0s():
    from pathlib import Path

    from imprompt.generation.batch import BatchJob, job_request

    base = GenerateRequest(controlnet=["a", "b"], control_image=["x.png", "1=y.png"])
    job = job_request(base, BatchJob(None, 0, "p", None, Path("c.png"), 1, "out.png"))
    assert job.control_image == ["0=c.png", "1=y.png"]
    assert [c.image for c in control_options(job)] == ["c.png", "y.png"]
