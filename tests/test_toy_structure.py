"""The toy package's layout and the toy commands' safety: the encoder beside the adapter (defect 11),
no pickle run from a work folder (defect 13), umask permissions, one-line errors."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from imprompt.cli import main
from imprompt.toy import toy_paths
from imprompt.toy.adapter_stages import adapter_data
from imprompt.toy.build import run
from imprompt.toy.config import BuildConfig, StageSelection
from imprompt.toy.derivative import DeriveConfig, derive

torch.set_flush_denormal(True)

TINY = ["--train-size", "24", "--eval-size", "8", "--heldout-size", "4", "--no-progress"]


@pytest.mark.parametrize("derived", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["toy", "derived"])
def test_toy_adapter_finds_its_encoder_without_image_encoder(derived, tmp_path):
    """Defect 11: the package puts image_encoder/ beside the adapter files, the layout it documents, so
    the toy adapter applies to the toy model or one derived from it with no --image-encoder."""
    paths = toy_paths()
    assert (paths["adapter"].parent / "image_encoder") == paths["image_encoder"]
    model = paths["model"]
    if derived:
        derive(DeriveConfig(out=tmp_path / "d", steps=1, world_size=40, batch=2, check_samples=1, progress=False),
               log=lambda m: None)
        model = tmp_path / "d" / "pipeline"
    reference = next(paths["references"].glob("*.png"))
    out = tmp_path / "out"
    assert main(["generate", "--model", str(model), "--adapter", str(paths["adapter"]), "--image", str(reference),
                 "--steps", "2", "--output", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1


class _Payload:
    """A pickle that creates a file when it is loaded: what a crafted checkpoint.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_in_a_work_dir_is_refused_and_never_runs(tmp_path, capsys):
    """Defect 13: `imprompt toy build --work DIR` loads DIR/clip/checkpoint.pt with weights only."""
    work = tmp_path / "work"
    # --jobs 1: two stages side by side would each start a fresh interpreter (spawn), ~15 s of imports
    assert main(["toy", "build", "--work", str(work), "--until", "tokenizer", "--jobs", "1", *TINY]) == 0
    marker = tmp_path / "pwned"
    (work / "clip").mkdir()
    (work / "clip" / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1, "seconds": 0.0, "model": _Payload(marker)}))
    capsys.readouterr()
    assert main(["toy", "build", "--work", str(work), "--stage", "clip", *TINY]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    # (torch may warn about the pickle protocol first; the error itself is one line, and no traceback)
    last = err.strip().splitlines()[-1]
    assert last.startswith("imprompt toy build: error: clip checkpoint") and "refused" in last, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    assert not (work / "clip" / "done.json").exists()


def test_build_writes_files_and_folders_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        cfg = BuildConfig(work=tmp_path / "work", train_size=24, eval_size=8, heldout_size=4, progress=False)
        run(cfg, StageSelection(stage="data"))
        listing = adapter_data(cfg).parent
    finally:
        os.umask(old)
    data = cfg.work / "data"
    for folder in (data / "train", data / "heldout", listing):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in (data / "train.npy", data / "done.json", data / "train" / "metadata.jsonl", listing / "train.jsonl"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


@pytest.mark.parametrize("argv, expected", [
    (["build", "--threads", "0"], "threads must be at least 1"),
    (["build", "--stage", "clip", "--until", "vae"], "not both"),
    (["derive", "--base", "no/such/folder"], "no/such/folder"),
    (["derive", "--lr", "nan"], "lr must be a finite number"),
    (["quality", "--test", "no/such/split"], "no metadata.jsonl"),
    (["control", "--test", "no/such/split"], "no metadata.jsonl"),
    (["control", "--control-scale", "nan"], "control_scale must be a finite number"),
])
def test_toy_command_errors_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["toy", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imprompt toy {argv[0]}: error: ") and err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_shipped_package_fits_its_budget_with_the_controlnet_in_fp8():
    """Issue 16: the toy ControlNet ships inside the 25 MiB budget, in fp8 (e4m3fn), and loads as fp32 for the
    shipped UNet (its residuals have the UNet's channels: one short generation through the ControlNet pipeline)."""
    from safetensors import safe_open

    from imprompt.generation.pipelines import load_controlnet, load_pipeline
    from imprompt.toy import PACKAGE_DIR
    from imprompt.toy.package import MAX_BYTES
    from imprompt.toy.reader import silhouette_of

    paths = toy_paths()
    assert sum(p.stat().st_size for p in PACKAGE_DIR.rglob("*") if p.is_file()) <= MAX_BYTES
    with safe_open(paths["controlnet"] / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F8_E4M3"}
    net = load_controlnet(paths["controlnet"], torch.float32, paths["model"] / "unet" / "config.json")
    assert net.dtype == torch.float32
    pipe = load_pipeline(paths["model"], controlnet=paths["controlnet"])
    control = silhouette_of(Image.open(next(paths["references"].glob("*.png"))))
    image = pipe("a circle", image=control, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
