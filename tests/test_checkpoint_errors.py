"""Checkpoints a user can get wrong, and the one-line message each must give (issue 10, defects 8,
18 and 21): FaceID files, files whose name lies about their format, empty files, non-finite weights,
adapters that do not fit the UNet, and the permissions of what is saved.

Each message is checked for its words: a refusal that says the wrong thing (\"truncated, re-download
it\" for a file that was only misnamed) counts as a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.adapter.checkpoint import load_adapter, nest, read_state
from imprompt.adapter.model import IPAdapter
from imprompt.adapter.variants import CheckpointError


@pytest.fixture(scope="module")
def sd15():
    return tm.sd15_unet()


@pytest.fixture(scope="module")
def linear_state(sd15):
    return dict(tm.random_adapter(sd15, "linear").state_dict())


def _ip_adapter_half(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("ip_adapter.")}


# --------------------------------------------------------------------------------------------------
# FaceID (defect 8; defect 21: a lone faceid_proj key)
# --------------------------------------------------------------------------------------------------


def faceid_portrait_image_proj(id_dim: int = 16, cross_attention_dim: int = 32, tokens: int = 16) -> dict:
    """tencent-ailab ip_adapter_faceid_separate.MLPProjModel (FaceID-Portrait; also FaceID's own
    projection): proj.0 Linear(id, 2 id), proj.1 GELU, proj.2 Linear(2 id, cross * tokens), norm
    LayerNorm(cross). FaceID-Portrait has no LoRA weights in its ip_adapter half."""
    return {
        "image_proj.proj.0.weight": torch.randn(2 * id_dim, id_dim),
        "image_proj.proj.0.bias": torch.randn(2 * id_dim),
        "image_proj.proj.2.weight": torch.randn(cross_attention_dim * tokens, 2 * id_dim),
        "image_proj.proj.2.bias": torch.randn(cross_attention_dim * tokens),
        "image_proj.norm.weight": torch.randn(cross_attention_dim),
        "image_proj.norm.bias": torch.randn(cross_attention_dim),
    }


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_faceid_portrait_without_lora_gets_the_faceid_message(linear_state, tmp_path, ext):
    state = {**faceid_portrait_image_proj(), **_ip_adapter_half(linear_state)}
    path = tmp_path / f"ip-adapter-faceid-portrait_sd15{ext}"
    if ext == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(nest(state), path)
    with pytest.raises(CheckpointError) as err:
        load_adapter(path)
    message = str(err.value)
    assert "unrecognised" not in message
    assert "IP-Adapter FaceID checkpoint (found 'image_proj.norm.weight' beside 'image_proj.proj.0.weight'" in message
    assert "insightface" in message and "\n" not in message


@pytest.mark.parametrize("where", ["image_proj", "top-level-flat", "top-level-nested"])
def test_a_lone_faceid_proj_key_is_recognised_as_faceid(linear_state, tmp_path, where):
    if where == "image_proj":
        state = {**_ip_adapter_half(linear_state), "image_proj.faceid_proj.weight": torch.zeros(4, 4)}
        path = tmp_path / "a.safetensors"
        save_file(state, str(path))
    elif where == "top-level-flat":
        path = tmp_path / "a.safetensors"
        save_file({"faceid_proj.weight": torch.zeros(4, 4)}, str(path))
    else:
        path = tmp_path / "a.bin"
        torch.save({"faceid_proj": {"weight": torch.zeros(4, 4)}}, path)
    with pytest.raises(CheckpointError, match=r"IP-Adapter FaceID checkpoint \(found '[a-z_.]*faceid_proj[a-z_.]*'\)"):
        load_adapter(path)
