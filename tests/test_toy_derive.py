"""`imprompt toy derive`: a fine-tuned copy of the toy pipeline whose UNet alone changed; resumable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from imprompt.toy import toy_paths
from imprompt.toy.derivative import DeriveConfig, derive


def _weights(folder):
    return load_file(next(folder.glob("*.safetensors")))


@pytest.mark.slow  # over 10 s
def test_derive_changes_only_the_unet_and_resumes(tmp_path):
    base = toy_paths()["model"]
    logs = []
    cfg = DeriveConfig(out=tmp_path / "d", steps=2, world_size=120, batch=8, check_samples=2, progress=False)
    first = derive(cfg, log=logs.append)
    pipeline = tmp_path / "d" / "pipeline"
    assert first["steps"] == 2 and 0 < first["images"] < 120  # only the style's share of the drawn samples
    for part in ("vae", "text_encoder"):
        assert all(torch.equal(v, _weights(base / part)[k]) for k, v in _weights(pipeline / part).items()), part
    tuned, original = _weights(pipeline / "unet"), _weights(base / "unet")
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k].float()) for k in tuned)

    from diffusers import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True).unet.config.sample_size == 8
    report = json.loads((tmp_path / "d" / "derive.json").read_text())
    assert set(report["unprompted striped rate"]) == {"base", "derived"}

    second = derive(DeriveConfig(**{**cfg.__dict__, "steps": 3}), log=logs.append)
    assert any(m.startswith("[toy derive] training: resumed at step 2 ") for m in logs) and second["steps"] == 3
