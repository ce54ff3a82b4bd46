"""Models as users keep them: A1111 and ComfyUI trees, single-file checkpoints, names, adapter <-> encoder pairing."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.adapter.checkpoint import save_adapter
from imprompt.adapter.variants import AdapterVariant, CheckpointError
from imprompt.cli import main
from imprompt.models.catalog import Catalog, ModelLookupError, roots_from
from imprompt.models.hashes import sha256_file
from imprompt.models.ldm import pipeline_to_ldm
from imprompt.models.pairing import find_encoder


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One tiny SD1.5 model, adapter and encoder, laid out as diffusers folders, an A1111 tree and a
    ComfyUI tree whose checkpoint lives in a folder named by extra_model_paths.yaml."""
    torch.set_flush_denormal(True)
    root = tmp_path_factory.mktemp("trees")
    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(root / "diffusers" / "sd")
    encoder = tm.image_encoder()
    encoder.save_pretrained(root / "diffusers" / "image_encoder")
    adapter = tm.random_adapter(pipe.unet, "linear", encoder=encoder)
    save_adapter(adapter, root / "diffusers" / "ip-adapter_sd15.safetensors")
    single = {k: v.contiguous() for k, v in pipeline_to_ldm(pipe, "sd15").items()}

    a1111 = root / "a1111"
    (a1111 / "models" / "Stable-diffusion" / "sd15").mkdir(parents=True)
    save_file(single, a1111 / "models" / "Stable-diffusion" / "sd15" / "Tiny-SD15.safetensors")
    ext = a1111 / "extensions" / "sd-webui-controlnet"
    save_adapter(adapter, ext / "models" / "ip-adapter_sd15.safetensors")
    encoder.save_pretrained(ext / "annotator" / "downloads" / "clip_vision" / "tiny-clip")
    (a1111 / "models" / "Lora").mkdir(parents=True)
    (a1111 / "models" / "Lora" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")

    comfy = root / "comfy"
    (comfy / "models" / "ipadapter").mkdir(parents=True)
    save_adapter(adapter, comfy / "models" / "ipadapter" / "ip-adapter_sd15.safetensors")
    encoder.save_pretrained(comfy / "models" / "clip_vision" / "tiny-clip")
    (root / "elsewhere" / "ckpts").mkdir(parents=True)
    save_file(single, root / "elsewhere" / "ckpts" / "tiny-sd15.safetensors")
    (comfy / "extra_model_paths.yaml").write_text(
        f"shared:\n  base_path: {root / 'elsewhere'}\n  checkpoints: |\n    ckpts\n  upscale_models: up\n")
    for i, image in enumerate(tm.reference_images(1)):
        image.save(root / f"ref{i}.png")
    return root


def _pixels(folder) -> np.ndarray:
    (png,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(png))


def _generate(trees, out, *args) -> np.ndarray:
    code = main(["generate", "--image", str(trees / "ref0.png"), "--prompt", "a red star", "--steps", "2",
                 "--seed", "3", "--output", str(out), *args])
    assert code == 0
    return _pixels(out)


def test_names_in_a1111_and_comfyui_trees_give_the_diffusers_pixels(trees, tmp_path):
    d = trees / "diffusers"
    reference = _generate(trees, tmp_path / "ref", "--model", str(d / "sd"), "--adapter",
                          str(d / "ip-adapter_sd15.safetensors"), "--image-encoder", str(d / "image_encoder"))
    # A1111: the checkpoint by stem (any case) in a sub-folder, the adapter in the ControlNet extension's
    # folder, its encoder found by pairing in annotator/downloads/clip_vision.
    a1111 = _generate(trees, tmp_path / "a1111", "--models-dir", str(trees / "a1111"), "--model", "tiny-sd15",
                      "--model-config", str(d / "sd"), "--adapter", "ip-adapter_sd15")
    np.testing.assert_array_equal(a1111, reference)
    # ComfyUI: the checkpoint comes from the folder extra_model_paths.yaml names; A1111's "name [hash]".
    short = sha256_file(trees / "elsewhere" / "ckpts" / "tiny-sd15.safetensors")[:10]
    comfy = _generate(trees, tmp_path / "comfy", "--models-dir", str(trees / "comfy"), "--model",
                      f"tiny-sd15 [{short}]", "--model-config", str(d / "sd"), "--adapter", "ip-adapter_sd15")
    np.testing.assert_array_equal(comfy, reference)


def test_lookup_errors_name_what_was_found(trees, capsys):
    catalog = Catalog.scan(roots_from([trees / "a1111"]))
    assert catalog.find("sd15/tiny-sd15", "checkpoint").path.name == "Tiny-SD15.safetensors"
    with pytest.raises(ModelLookupError, match=r"no checkpoint named 'nope' .*\(found: sd15/Tiny-SD15\)"):
        catalog.find("nope", "checkpoint")
    with pytest.raises(ModelLookupError, match=r"asks for hash 0123456789 but the file's is"):
        catalog.find("tiny-sd15 [0123456789]", "checkpoint")
    with pytest.raises(ModelLookupError, match=r"lora broken .*cannot be used"):
        catalog.find("broken", "lora")
    # Names never reach outside the folders found.
    with pytest.raises(ModelLookupError):
        catalog.find("../../diffusers/ip-adapter_sd15", "adapter")
    assert main(["generate", "--models-dir", str(trees / "a1111"), "--model", "missing-model", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint named 'missing-model'" in err and err.count("\n") == 1


def test_models_lists_exactly_what_the_tree_holds(trees, capsys):
    assert main(["models", "--models-dir", str(trees / "a1111"), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    found = sorted((m["kind"], m["name"]) for m in listing["models"])
    assert found == [("adapter", "ip-adapter_sd15"), ("checkpoint", "sd15/Tiny-SD15"),
                     ("image_encoder", "tiny-clip"), ("lora", "broken")]
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["broken"]["problem"] and by_name["broken"]["hash"] is None
    assert by_name["ip-adapter_sd15"]["details"]
    digest = sha256_file(trees / "a1111" / "models" / "Stable-diffusion" / "sd15" / "Tiny-SD15.safetensors")
    assert by_name["sd15/Tiny-SD15"]["hash"] == digest[:10]
    # The plain listing says what is unusable and why.
    assert main(["models", "--models-dir", str(trees / "a1111"), "--no-hashes"]) == 0
    text = capsys.readouterr().out
    assert "Checkpoints (1):" in text and "Not usable (1):" in text and "broken.safetensors" in text


def test_models_command_starts_without_torch(trees):
    code = ("import sys\nfrom imprompt.cli import main\nmain(sys.argv[1:])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, "models", "--models-dir", str(trees / "comfy"), "--no-hashes"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "NO-TORCH", done.stderr
    assert "tiny-sd15" in done.stdout


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/imprompt-evil-marker", "w"))


def test_a_ckpt_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = "/tmp/imprompt-evil-marker"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    with open(folder / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f, protocol=2)
    assert main(["models", "--models-dir", str(tmp_path), "--json", "--no-hashes"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [(m["kind"], m["name"]) for m in listed] == [("checkpoint", "evil")]  # listed unopened, by its folder
    assert main(["generate", "--models-dir", str(tmp_path), "--model", "evil", "--steps", "1",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "imprompt generate: error:" in err and err.count("\n") == 1, err
    assert not os.path.exists(marker)


def _encoder_file(path, hidden: int, projection: int) -> None:
    """A header-true stand-in for a CLIP vision file: pairing reads only the header's shapes."""
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(hidden, dtype=torch.float16),
               "vision_model.post_layernorm.weight": torch.zeros(hidden, dtype=torch.float16),
               "visual_projection.weight": torch.zeros(projection, hidden, dtype=torch.float16)}, path)


def test_each_adapter_kind_pairs_with_the_encoder_it_needs(tmp_path):
    folder = tmp_path / "models" / "clip_vision"
    folder.mkdir(parents=True)
    _encoder_file(folder / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", 1280, 1024)
    _encoder_file(folder / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", 1664, 1280)
    catalog = Catalog.scan([tmp_path])
    adapter = tmp_path / "ip-adapter.safetensors"
    cases = {  # (variant as the official files' shapes make it) -> the encoder it needs
        AdapterVariant("linear", 1024, 768, 4): "ViT-H",  # ip-adapter_sd15 / _light
        AdapterVariant("linear", 1280, 768, 4): "ViT-bigG",  # ip-adapter_sd15_vit-G
        AdapterVariant("linear", 1280, 2048, 4): "ViT-bigG",  # ip-adapter_sdxl
        AdapterVariant("linear", 1024, 2048, 4): "ViT-H",  # ip-adapter_sdxl_vit-h
        AdapterVariant("plus", 1280, 768, 16, 768, 4, 4): "ViT-H",  # ip-adapter-plus(-face)_sd15
        AdapterVariant("plus", 1280, 2048, 16, 1280, 4, 4): "ViT-H",  # ip-adapter-plus_sdxl_vit-h
        AdapterVariant("full", 1280, 768, None): "ViT-H",  # ip-adapter-full-face_sd15
    }
    for variant, family in cases.items():
        assert find_encoder(adapter, variant, catalog).name.startswith(f"CLIP-{family}-"), variant
    # The official sdxl_models/ip-adapter_sdxl_vit-h sits beside the bigG encoder; the ViT-H is in models/.
    official = tmp_path / "official"
    for sub, (hidden, projection) in {"models": (1280, 1024), "sdxl_models": (1664, 1280)}.items():
        (official / sub / "image_encoder").mkdir(parents=True)
        (official / sub / "image_encoder" / "config.json").write_text(json.dumps(
            {"model_type": "clip_vision_model", "hidden_size": hidden, "projection_dim": projection}))
    vit_h = find_encoder(official / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors", cases_key := AdapterVariant(
        "linear", 1024, 2048, 4))
    assert vit_h == official / "models" / "image_encoder", cases_key
    # No matching encoder: the message names the one needed and where the tools keep it, never a size mismatch.
    only_g = tmp_path / "only-g"
    (only_g / "models" / "clip_vision").mkdir(parents=True)
    _encoder_file(only_g / "models" / "clip_vision" / "clip_g.safetensors", 1664, 1280)
    with pytest.raises(CheckpointError, match=r"needs a ViT-H image encoder and none was found; found only .*clip_g"
                                              r".*CLIP-ViT-H-14-laion2B-s32B-b79K\.safetensors"):
        find_encoder(adapter, AdapterVariant("linear", 1024, 768, 4), Catalog.scan([only_g]))


def _controlnet(unet, seed: int = 0, hint=(4, 8)):
    """A ControlNet made from ``unet``; two hint widths downsample the hint 2x, the tiny VAE's factor."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # from_unet zero-initialises the outputs; make them act
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return net.eval()


def test_a_single_file_controlnet_by_name_gives_the_folder_controlnets_pixels(trees, tmp_path, capsys):
    """Its config comes from the UNet it steers (no shipped config fits a tiny model), its hint encoder's
    sizes from its own shapes (in diffusers keys here: the original layout's four hint widths downsample
    8x, more than the tiny VAE does; that layout's conversion is checked in test_ldm_layout)."""
    from imprompt.models.inspect import classify_shapes
    from imprompt.models.ldm import controlnet_to_ldm

    d = trees / "diffusers"
    net = _controlnet(tm.sd15_pipeline().unet)
    net.save_pretrained(tmp_path / "controlnet")
    root = tmp_path / "a1111"
    (root / "models" / "ControlNet").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              root / "models" / "ControlNet" / "control_tiny_canny.safetensors")
    original = _controlnet(tm.sd15_pipeline().unet, hint=(4, 8, 12, 16))
    shapes = {k: tuple(v.shape) for k, v in controlnet_to_ldm(original.state_dict(), original.config).items()}
    hint = classify_shapes(shapes, "control_v11p_sd15_canny.pth").details
    assert (hint["conditioning_channels"], hint["conditioning_embedding_out_channels"], hint["in_channels"]) == (
        3, [4, 8, 12, 16], 4)
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "Stable-diffusion" / "tiny.safetensors").symlink_to(
        trees / "a1111" / "models" / "Stable-diffusion" / "sd15" / "Tiny-SD15.safetensors")
    tm.reference_images(2)[1].save(tmp_path / "edges.png")
    common = ("--adapter", str(d / "ip-adapter_sd15.safetensors"), "--image-encoder", str(d / "image_encoder"),
              "--control-image", str(tmp_path / "edges.png"))
    folder = _generate(trees, tmp_path / "folder", "--model", str(d / "sd"), "--controlnet", str(tmp_path / "controlnet"),
                       *common)
    named = _generate(trees, tmp_path / "named", "--models-dir", str(root), "--model", "tiny", "--model-config",
                      str(d / "sd"), "--controlnet", "control_tiny_canny", *common)
    np.testing.assert_array_equal(named, folder)
    plain = _generate(trees, tmp_path / "plain", "--model", str(d / "sd"), *common[:4])
    assert not np.array_equal(plain, folder)  # the ControlNet did steer the image

    other = _controlnet(tm.sdxl_unet())  # cross-attention width 64, not the SD1.5 model's 32
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, root / "models" / "ControlNet" / "xl.safetensors")
    assert main(["generate", "--models-dir", str(root), "--model", str(d / "sd"), "--controlnet", "xl", *common,
                 "--image", str(trees / "ref0.png"), "--steps", "1", "--output", str(tmp_path / "xl")]) == 2
    err = capsys.readouterr().err
    assert "the ControlNet xl.safetensors is for SDXL (cross-attention width 64)" in err, err
    assert "UNet has width 32" in err and err.count("\n") == 1
