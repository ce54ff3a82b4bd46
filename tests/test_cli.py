"""The command line end to end on tiny models saved as real folders, as a user would have them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm
from imprompt.cli import main
from imprompt.generation.pnginfo import parse_parameters, read_parameters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # The official layout: models/ip-adapter_*.safetensors beside models/image_encoder/.
    return tm.official_tree(tmp_path_factory.mktemp("world"))


def _args(files, out, *extra):
    return ["generate", "--model", str(files / "sd"), "--adapter", str(files / "models" / "ip-base.safetensors"),
            "--image", str(files / "ref0.png"), "--prompt", "a red star, big", "--steps", "3", "--seed", "7",
            "--output", str(out), *extra]


def test_generate_writes_pngs_that_match_diffusers(files, tmp_path):
    assert main(_args(files, tmp_path, "--scale", "0.5", "--num-images", "2", "--negative-prompt", "blurry")) == 0
    written = sorted(tmp_path.glob("*.png"))
    # Image i uses seed S+i (as A1111 does), so it does not depend on how the run was batched.
    assert [p.name for p in written] == ["00000-7.png", "00001-8.png"]

    # Image i is what diffusers gives with torch.Generator("cpu").manual_seed(S + i).
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(files / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(files / "models" / "image_encoder")
    pipe.feature_extractor = tm.feature_extractor()
    pipe.load_ip_adapter(str(files / "models"), subfolder="", weight_name="ip-base.safetensors",
                         image_encoder_folder=None, local_files_only=True)
    pipe.set_ip_adapter_scale(0.5)
    expected = pipe("a red star, big", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5,
                    num_images_per_prompt=2, ip_adapter_image=[[Image.open(files / "ref0.png").convert("RGB")]],
                    generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)]).images
    for path, image in zip(written, expected):
        got = np.asarray(Image.open(path), dtype=np.int16)
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1


def test_png_parameters_in_a1111_format(files, tmp_path, capsys):
    assert main(_args(files, tmp_path, "--scale", "0.5", "--negative-prompt", "blurry", "--scheduler", "euler",
                      "--layers", "style")) == 0
    png = next(tmp_path.glob("*.png"))
    text = read_parameters(png)
    lines = text.split("\n")
    assert lines[0] == "a red star, big"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 16x16, Model: sd")
    params = parse_parameters(text)
    assert params["Prompt"] == "a red star, big"
    assert params["IP-Adapter 0"] == ("Model: ip-base, Weight: 0.5, Images: ref0.png, Combine: concat, "
                                      "Layers: style, Start: 0, End: 1, Crop: center")
    capsys.readouterr()
    assert main(["info", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == params


def test_several_adapters_and_per_adapter_options(files, tmp_path):
    args = _args(files, tmp_path, "--adapter", str(files / "models" / "ip-plus.bin"), "--image", f"1={files / 'ref1.png'}",
                 "--image", str(files / "ref1.png"), "--scale", "0.4", "--scale", "1=0.9", "--combine", "0=average",
                 "--start", "1=0.5")
    assert main(args) == 0
    params = parse_parameters(read_parameters(next(tmp_path.glob("*.png"))))
    assert params["IP-Adapter 0"].startswith("Model: ip-base, Weight: 0.4, Images: ref0.png+ref1.png, Combine: average")
    assert params["IP-Adapter 1"].startswith("Model: ip-plus, Weight: 0.9, Images: ref1.png, Combine: concat")
    assert "Start: 0.5" in params["IP-Adapter 1"]


def test_img2img_and_inpainting_from_the_command_line(files, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    assert main(_args(files, tmp_path / "i2i", "--init-image", str(tmp_path / "init.png"), "--strength", "0.5")) == 0
    assert main(_args(files, tmp_path / "inp", "--init-image", str(tmp_path / "init.png"),
                      "--mask-image", str(tmp_path / "mask.png"))) == 0
    params = parse_parameters(read_parameters(next((tmp_path / "i2i").glob("*.png"))))
    assert params["Denoising strength"] == "0.5"
    assert len(list((tmp_path / "inp").glob("*.png"))) == 1


def test_hub_ids_resolve_offline_from_the_cache(files, tmp_path, monkeypatch):
    # The huggingface_hub cache layout: models--org--name/snapshots/<commit>/ and refs/main.
    repo = tmp_path / "cache" / "models--toy--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files / "sd", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = _args(files, tmp_path / "out")
    args[args.index("--model") + 1] = "toy/tiny-sd"
    assert main(args) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "does not exist"),
    (["--mask-image", "x.png"], "needs --init-image"),
    (["--scale", "3=0.5"], "names adapter 3, but 1 adapter"),
    (["--layers", "up_blocks.9=1"], "not a cross-attention block"),
    (["--combine", "weighted"], "one weight per image"),
])
def test_bad_input_gives_one_clear_line(files, tmp_path, capsys, extra, message):
    assert main(_args(files, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_reference_and_wrong_encoder(files, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(_args(files, tmp_path, "--image", str(tmp_path / "bad.png"))) == 2
    assert "cannot read image bad.png" in capsys.readouterr().err
    tm.image_encoder(projection=40).save_pretrained(tmp_path / "other_encoder")
    assert main(_args(files, tmp_path, "--image-encoder", str(tmp_path / "other_encoder"))) == 2
    assert "reads image_embeds of width 24" in capsys.readouterr().err


def test_info_on_a_png_without_parameters(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 1
    assert "no generation parameters" in capsys.readouterr().err


def test_without_model_the_bundled_toy_world_is_used(files, tmp_path, monkeypatch, capsys):
    import imprompt.toy as toy

    # A stand-in for the shipped toy package: the same layout, tiny random models.
    package = tmp_path / "package"
    shutil.copytree(files / "sd", package / "pipeline")
    shutil.copytree(files / "models" / "image_encoder", toy.toy_paths(package)["image_encoder"])
    shutil.copy(files / "models" / "ip-base.safetensors", package / "ip_adapter.safetensors")
    monkeypatch.setattr(toy, "PACKAGE_DIR", package)
    assert main(["generate", "--image", str(files / "ref0.png"), "--steps", "2", "--seed", "1",
                 "--output", str(tmp_path / "out")]) == 0
    assert "bundled toy model" in capsys.readouterr().out
    params = parse_parameters(read_parameters(next((tmp_path / "out").glob("*.png"))))
    assert params["Model"] == "imprompt-toy" and params["IP-Adapter 0"].startswith("Model: ip_adapter, Weight: 0.6")
    monkeypatch.setattr(toy, "PACKAGE_DIR", tmp_path / "nowhere")
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "out")]) == 2
    assert "pass --model" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "does not exist"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "cannot read notes.png as an image"),
])
def test_info_on_what_is_not_an_image_gives_one_line(tmp_path, capsys, make, message):
    assert main(["info", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imprompt info: error: ") and message in err


def test_info_reads_jpeg_caps_long_text_and_escapes_control_characters(tmp_path, capsys):
    from PIL import ExifTags

    exif = Image.Exif()
    text = "a cat\x1b[2J\nSteps: 20, Sampler: Euler, Seed: 3, Size: 8x8"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\x00" + text.encode("utf_16_be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    assert main(["info", str(tmp_path / "a.jpg")]) == 0
    out = capsys.readouterr().out
    assert "Prompt: a cat\\x1b[2J\n" in out and "\x1b" not in out and "Seed: 3\n" in out

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "y" * 1_000_000 + "\nSteps: 1, Seed: 2, Size: 4x4")
    Image.new("RGB", (4, 4)).save(tmp_path / "long.png", pnginfo=info)
    assert main(["info", str(tmp_path / "long.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "only the first 65536 were read" in captured.err
    assert len(json.loads(captured.out)["Prompt"]) == 65536


@pytest.mark.parametrize("argv", [["--help"], ["info", "/nonexistent.png"], ["info", "--help"]])
def test_commands_that_need_no_model_start_without_torch(argv):
    """`imprompt --help` and `imprompt info` build no model parser and import no torch (a fast start)."""
    code = ("import sys, runpy; sys.argv = ['imprompt', *sys.argv[1:]]\n"
            "from imprompt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().splitlines()[-1] == "NO-TORCH", done.stderr
    assert "Traceback" not in done.stderr


def test_demo_and_subcommand_errors_are_one_escaped_line(tmp_path, capsys):
    from imprompt.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["demo", "--output", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imprompt demo: error: ") and err.count("\n") == 1, err
    # Control characters in a user's value are escaped on the terminal, in delegated commands too.
    assert main(["eval", "--data", "toy:no\x1b[31msuch", "--references", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imprompt eval: error: ") and "\x1b" not in err and err.count("\n") == 1, err
