"""`imprompt generate` inputs: every argument checked before anything loads, typed per-adapter options,
what the PNG info records, seeds and batches, the output folder, devices, encoders and schedulers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from imprompt.adapter.layers import LayerScales
from imprompt.cli import main
from imprompt.encoding import CheckpointError, ImageEncoder, load_image
from imprompt.generation.generate import generate
from imprompt.generation.pipelines import ModelNotFoundError, check_device, resolve_model
from imprompt.generation.pnginfo import parse_parameters, read_parameters
from imprompt.generation.outputs import model_name
from imprompt.generation.request import GenerateRequest, adapter_options
from imprompt.generation.schedulers import SCHEDULERS, sampler_name
from imprompt.generation.settings import GenerationSettings

torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tm.cli_world(tmp_path_factory.mktemp("world"), references=2)


def _args(world, out, *extra, model=None, adapter=None):
    return ["generate", "--model", str(model or world / "sd"),
            "--adapter", str(adapter or world / "models" / "ip-base.safetensors"),
            "--image", str(world / "ref0.png"), "--prompt", "a red star", "--steps", "2", "--seed", "7",
            "--output", str(out), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("imprompt generate: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _info(folder) -> list[dict]:
    return [parse_parameters(read_parameters(p)) for p in sorted(folder.glob("*.png"))]


# --------------------------------------------------------------------------------------------------
# Every argument is checked before anything is loaded
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "steps must be 1 to 1000"),
    (["--width", "30"], "width must be a positive multiple of 8"),
    (["--num-images", "100000"], "num_images must be 1 to 1000"),
    (["--batch-size", "0"], "batch_size must be 1 to 64"),
    (["--start", "0.8", "--end", "0.2"], "--start 0.8 must be below --end 0.2"),
    (["--end", "1.5"], "expected a fraction of the steps"),
    (["--seed", "-1"], "seed must be 0 to 2**64-1"),
    (["--seed", str(2**64)], "seed must be 0 to 2**64-1"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], "runs past 2**64-1"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--strength", "inf", "--init-image", "x.png"], "strength must be a finite number"),
    (["--controlnet-scale", "nan"], "controlnet_scale must be a finite number"),
    (["--scale", "nan"], "--scale 'nan': expected a finite number"),
    (["--scale", "1e30"], "only overflows"),
    (["--weights", "nan,1", "--image", "ref1.png"], "--weights 'nan,1': expected a finite number"),
    (["--start", "inf"], "expected a finite number"),
    (["--weights", "0.7,0.3", "--combine", "average", "--image", "ref1.png"], "--weights is for --combine weighted"),
    (["--weights", "0.7,0.3"], "2 weights for 1 images"),
    (["--combine", "sum"], "--combine 'sum': expected one of concat, average, weighted"),
    (["--layers", "stlye"], "unknown preset"),
    (["--adapter", "other.safetensors"], "adapter 1 (other.safetensors) has no reference image"),
    (["--init-image", "x.png", "--steps", "2", "--strength", "0.2"], "leaves no denoising step"),
    (["--device", "tpu9"], "unknown device 'tpu9'"),
    (["--dtype", "float32", "--device", "cuda:x"], "unknown device"),
])
def test_bad_arguments_fail_before_anything_loads(world, tmp_path, capsys, extra, message):
    # The model and adapter do not exist: had anything been loaded first, the error would be about them.
    args = _args(world, tmp_path / "out", *extra, model=tmp_path / "no-model", adapter=tmp_path / "no-adapter.bin")
    assert main(args) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, available", [("cuda", torch.cuda.is_available),
                                                ("mps", torch.backends.mps.is_available)])
def test_unavailable_devices_are_refused_before_loading(world, tmp_path, capsys, device, available):
    if available():
        pytest.skip(f"{device} is available here")
    assert main(_args(world, tmp_path, "--device", device, model=tmp_path / "no-model")) == 2
    assert f"device '{device}' is not available here" in _error(capsys)
    with pytest.raises(ValueError, match="not available"):
        check_device(device)


def test_output_must_be_a_writable_folder_before_generating(world, tmp_path, capsys):
    (tmp_path / "taken.png").write_bytes(b"x")
    assert main(_args(world, tmp_path / "taken.png", model=tmp_path / "no-model")) == 2
    assert "--output" in (line := _error(capsys)) and "is a file" in line
    assert main(_args(world, tmp_path / "taken.png" / "sub", model=tmp_path / "no-model")) == 2
    assert "cannot be made" in _error(capsys)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(_args(world, locked, model=tmp_path / "no-model")) == 2
        assert "no permission to write" in _error(capsys)


def test_per_adapter_options_become_typed_objects():
    request = GenerateRequest(adapter=["a.bin", "b.bin"], image=["r0.png", "r1.png", "1=r2.png"],
                              scale=["0.4", "1=0.9"], weights=["0=0.7,0.3"], layers=["1=up_blocks.1=1,default=0"],
                              start=["1=0.25"], image_encoder=["1=enc"], negative_image=["1=neg.png"])
    first, second = adapter_options(request)
    assert (first.images, first.scale, first.combine, first.weights) == (("r0.png", "r1.png"), 0.4, "weighted", (0.7, 0.3))
    assert first.layers is None and first.image_encoder is None and first.start == 0.0
    assert (second.images, second.scale, second.combine, second.weights) == (("r2.png",), 0.9, "concat", None)
    assert second.layers == LayerScales({"up_blocks.1": 1.0}, default=0.0)
    assert (second.start, second.end, second.image_encoder, second.negative_images) == (0.25, 1.0, "enc", ("neg.png",))


def test_options_without_an_adapter_are_refused():
    with pytest.raises(ValueError, match="--scale applies to an image prompt, but no --adapter was given"):
        adapter_options(GenerateRequest(scale=["0.5"]))


# --------------------------------------------------------------------------------------------------
# What is recorded acted, and what acts is recorded
# --------------------------------------------------------------------------------------------------


def test_weights_imply_weighted_combination(world, tmp_path):
    two = ["--image", str(world / "ref1.png"), "--weights", "0.9,0.1"]
    assert main(_args(world, tmp_path / "implied", *two)) == 0
    assert main(_args(world, tmp_path / "explicit", *two, "--combine", "weighted")) == 0
    assert main(_args(world, tmp_path / "concat", "--image", str(world / "ref1.png"))) == 0
    implied, explicit, concat = (next((tmp_path / d).glob("*.png")) for d in ("implied", "explicit", "concat"))
    assert np.array_equal(_pixels(implied), _pixels(explicit))
    assert not np.array_equal(_pixels(implied), _pixels(concat))  # the weights acted
    assert "Combine: weighted, Weights: 0.9,0.1" in parse_parameters(read_parameters(implied))["IP-Adapter 0"]


def test_batches_and_per_image_seeds(world, tmp_path):
    assert main(_args(world, tmp_path / "run", "--num-images", "3", "--batch-size", "2", "--seed", "5")) == 0
    written = sorted((tmp_path / "run").glob("*.png"))
    assert [p.name for p in written] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert [p["Seed"] for p in _info(tmp_path / "run")] == ["5", "6", "7"]
    assert all("Batch size" not in p for p in _info(tmp_path / "run"))  # batching does not change an image
    # Image i is --seed SEED+i alone, whatever batch it was generated in.
    assert main(_args(world, tmp_path / "alone", "--seed", "7")) == 0
    alone = next((tmp_path / "alone").glob("*.png"))
    assert np.abs(_pixels(written[2]) - _pixels(alone)).max() <= 1
    assert not np.array_equal(_pixels(written[0]), _pixels(written[1]))


def test_debris_of_a_killed_run_is_removed_and_pngs_follow_the_umask(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".00000-7.png.k2j3.tmp").write_bytes(b"half a png")
    (out / "notes.txt").write_text("mine")
    old = os.umask(0o022)
    try:
        assert main(_args(world, out)) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "notes.txt"]
    assert (out / "00000-7.png").stat().st_mode & 0o777 == 0o644


def test_model_names_in_png_info(world, tmp_path):
    assert model_name(str(world / "sd")) == "sd"
    assert model_name("/models/my-model/pipeline") == "my-model"
    assert model_name("org/some-model") == "some-model"


def test_sixteen_bit_reference_gives_what_its_eight_bit_version_gives(world, tmp_path):
    grey = np.asarray(Image.open(world / "ref0.png").convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "ref16.png")  # full 16-bit range, mode I;16
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "ref8.png")
    assert Image.open(tmp_path / "ref16.png").mode in ("I;16", "I")
    assert np.array_equal(np.asarray(load_image(tmp_path / "ref16.png")), np.asarray(load_image(tmp_path / "ref8.png")))
    for name in ("ref16", "ref8"):
        args = _args(world, tmp_path / name)
        args[args.index("--image") + 1] = str(tmp_path / f"{name}.png")
        assert main(args) == 0
    sixteen, eight = (next((tmp_path / n).glob("*.png")) for n in ("ref16", "ref8"))
    assert np.array_equal(_pixels(sixteen), _pixels(eight))


# --------------------------------------------------------------------------------------------------
# Models and encoders: what is missing, and what is the wrong kind
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_missing_relative_path_is_reported_as_a_missing_path(world, tmp_path, monkeypatch, capsys, offline_hub):
    monkeypatch.chdir(tmp_path)
    # No ./models: 'models/image_encoder' could be a hub id; the local path is named first.
    assert main(_args(world, tmp_path / "out", "--image-encoder", "models/image_encoder")) == 2
    line = _error(capsys)
    assert "image encoder 'models/image_encoder' does not exist" in line
    assert line.index("does not exist") < line.index("hub")
    # With ./models there, it is a local path that is missing: no hub at all.
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("models/image_encoder", "image encoder")
    assert "does not exist" in str(err.value) and "hub" not in str(err.value)


def test_image_encoder_of_another_kind_is_refused(world, tmp_path, capsys):
    tm.vae(0).save_pretrained(tmp_path / "vae")
    tm.text_encoder(0).save_pretrained(tmp_path / "text_encoder")
    for folder, holds in (("vae", "holds a VAE"), ("text_encoder", "holds a CLIP text encoder")):
        assert main(_args(world, tmp_path / "out", "--image-encoder", str(tmp_path / folder))) == 2
        line = _error(capsys)
        assert holds in line and "expected a CLIP vision model folder" in line
    with pytest.raises(CheckpointError, match="it is a diffusers pipeline folder"):
        ImageEncoder.from_pretrained(world / "sd")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="cannot load the image encoder"):
        ImageEncoder.from_pretrained(tmp_path / "broken")


def test_missing_encoder_beside_the_adapter(world, tmp_path, capsys):
    lonely = tmp_path / "ip.safetensors"
    lonely.write_bytes((world / "models" / "ip-base.safetensors").read_bytes())
    assert main(_args(world, tmp_path / "out", adapter=lonely)) == 2
    err = _error(capsys)
    assert "adapter ip.safetensors needs an image encoder with image_embeds width 24 and none was found" in err, err
    assert "--image-encoder PATH" in err


# --------------------------------------------------------------------------------------------------
# Every offered scheduler generates
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    return tm.sd15_pipeline()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_offered_scheduler_generates(tiny_pipe, name):
    # LMS needs scipy (a declared dependency); a missing one would fail here, as it did for users.
    settings = GenerationSettings(prompt="a star", steps=2, seed=0, scheduler=name, width=8, height=8)
    images = generate(tiny_pipe, None, settings, output_type="np")
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
    scheduler = getattr(__import__("diffusers"), SCHEDULERS[name].cls).from_config(
        tiny_pipe.scheduler.config, **SCHEDULERS[name].options)
    assert sampler_name(scheduler) == SCHEDULERS[name].a1111


# --------------------------------------------------------------------------------------------------
# The CLI's error handling
# --------------------------------------------------------------------------------------------------


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    import imprompt.generation.request as request

    def fails(error):
        def run(*args, **kwargs):
            raise error
        return run

    monkeypatch.setattr(request, "run", fails(ValueError("first line\nsecond line \x1b[31mred")))
    assert main(["generate", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "imprompt generate: error: first line second line \\x1b[31mred\n"
    monkeypatch.setattr(request, "run", fails(ModelNotFoundError("model 'x' does not exist")))
    assert main(["generate"]) == 2
    monkeypatch.setattr(request, "run", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate"])


def test_library_only_settings_are_not_flags(capsys):
    # GenerationSettings.extra (passed to the pipeline as is) has no option() metadata: no --extra.
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--extra" not in capsys.readouterr().out
