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


def faceid_portrait_image_proj(id_dim: int = 512, cross_attention_dim: int = 32, tokens: int = 16) -> dict:
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
def test_faceid_portrait_without_lora_loads_as_portrait(linear_state, tmp_path, ext):
    state = {**faceid_portrait_image_proj(), **_ip_adapter_half(linear_state)}
    path = tmp_path / f"ip-adapter-faceid-portrait_sd15{ext}"
    if ext == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(nest(state), path)
    variant = load_adapter(path).variant
    assert (variant.projection, variant.num_tokens, variant.lora_rank, variant.display_name) == ("faceid", 16, 0, "faceid-portrait")


def test_a_face_embedding_of_another_width_is_not_read_as_faceid(linear_state):
    state = {**faceid_portrait_image_proj(id_dim=16), **_ip_adapter_half(linear_state)}
    with pytest.raises(CheckpointError) as err:
        IPAdapter.from_state_dict(state)
    message = str(err.value)
    assert "unrecognised" not in message and "\n" not in message
    assert "reads a face embedding of width 16; every FaceID release reads insightface's 512-wide embedding" in message


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


# --------------------------------------------------------------------------------------------------
# Files whose name lies about what they hold (defect 21)
# --------------------------------------------------------------------------------------------------


def _message(path) -> str:
    with pytest.raises(CheckpointError) as err:
        read_state(path)
    message = str(err.value)
    assert "\n" not in message and "weights_only=False" not in message
    return message


def test_text_file_named_safetensors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_text("This is not a model.\nIt is a note someone saved with the wrong name.\n")
    message = _message(path)
    assert "adapter.safetensors is a text file, not a safetensors file" in message
    assert "truncated" not in message and "re-download" not in message


def test_git_lfs_pointer_named_safetensors(tmp_path):
    path = tmp_path / "ip-adapter_sd15.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 44642768\n")
    assert "is a Git LFS pointer, not the weights" in _message(path)


def test_html_page_named_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n")
    assert "a.safetensors is an HTML page, not a safetensors file" in _message(path)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_torch_file_named_safetensors(linear_state, tmp_path, zipped):
    path = tmp_path / "adapter.safetensors"
    torch.save(nest(linear_state), path, _use_new_zipfile_serialization=zipped)
    message = _message(path)
    assert "adapter.safetensors is a PyTorch pickle (torch.save), not a safetensors file" in message
    assert "rename it to adapter.bin" in message
    assert "truncated" not in message and "re-download" not in message


def test_safetensors_file_named_bin(linear_state, tmp_path):
    path = tmp_path / "adapter.bin"
    save_file(linear_state, str(path))
    message = _message(path)
    assert "adapter.bin is a safetensors file, not a PyTorch pickle: rename it to adapter.safetensors" in message


def test_text_file_named_bin(tmp_path):
    path = tmp_path / "adapter.bin"
    path.write_text("hello, this is plain text and nothing else\n")
    message = _message(path)
    assert "adapter.bin is a text file, not a PyTorch checkpoint" in message
    assert "more than tensors" not in message


@pytest.mark.parametrize("ext", [".bin", ".safetensors", ".pt"])
def test_zero_byte_file(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_bytes(b"")
    message = _message(path)
    assert f"empty{ext} is empty (0 bytes)" in message
    assert "EOFError" not in message and not message.rstrip().endswith(":")


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_truncated_file_says_truncated(linear_state, tmp_path, ext):
    from imprompt.adapter.checkpoint import save_adapter

    good = save_adapter(IPAdapter.from_state_dict(linear_state), tmp_path / f"good{ext}")
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _message(cut)
    assert "cut" + ext in message and "truncated" in message and "re-download" in message
    assert not message.rstrip().endswith(":")


# --------------------------------------------------------------------------------------------------
# An adapter that does not fit the UNet: one clear clause per mismatch (defect 21)
# --------------------------------------------------------------------------------------------------


def _compat_message(adapter, unet) -> str:
    from imprompt.adapter.attach import check_compatible, cross_attention_layers, unet_family_of

    with pytest.raises(CheckpointError) as err:
        check_compatible(adapter, cross_attention_layers(unet), unet_family_of(unet))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_adapter_with_a_layer_removed_names_the_missing_layer(sd15, linear_state):
    state = {k: v for k, v in linear_state.items() if not k.startswith("ip_adapter.5.")}
    message = _compat_message(IPAdapter.from_state_dict(state), sd15)
    assert "has weights for 3 cross-attention layers, but this UNet has 4" in message
    assert "it lacks ip_adapter.5 (up_blocks.1.attentions.1.transformer_blocks.0.attn2)" in message
    assert "The file has lost layers" in message and "re-download" in message
    assert "cross_attention_dim 32 and" not in message  # the old garbled sentence


def test_sdxl_adapter_on_a_tiny_sd15_unet_names_each_mismatch(sd15):
    adapter = tm.random_adapter(tm.sdxl_unet(), "linear")
    message = _compat_message(adapter, sd15)
    assert "its image tokens have width 64, but this UNet's cross-attention reads width 32" in message
    assert "it has weights for 8 cross-attention layers, but this UNet has 4" in message
    assert "Use an adapter made for this model (cross_attention_dim 32), or a model with cross_attention_dim 64" in message
    assert "and 4." not in message and "32 and 4" not in message  # "...cross_attention_dim 32 and 4": garbled


def test_full_size_family_mismatch_names_the_families():
    from test_errors import _meta_unet
    from imprompt.adapter.attach import adapter_for_unet
    from imprompt.adapter.variants import AdapterVariant

    sd15, sdxl = _meta_unet("SD1.5"), _meta_unet("SDXL")
    with torch.device("meta"):
        adapter = adapter_for_unet(sdxl, AdapterVariant("linear", 1280, 2048, 4), copy_text_kv=False)
    message = _compat_message(adapter, sd15)
    assert message.startswith("the base (SDXL, OpenCLIP ViT-bigG/14 (official sdxl_models/image_encoder)) adapter "
                              "does not fit this SD1.5 UNet: ")
    assert "its image tokens have width 2048 (SDXL), but this UNet's cross-attention reads width 768 (SD1.5)" in message
    assert "it has weights for 70 cross-attention layers, but this UNet has 16" in message
    assert message.endswith("Use an adapter made for SD1.5, or an SDXL model.")


def test_layer_at_a_position_the_unet_does_not_have(sd15, linear_state):
    state = {(k.replace("ip_adapter.7.", "ip_adapter.9.")): v for k, v in linear_state.items()}
    message = _compat_message(IPAdapter.from_state_dict(state), sd15)
    assert "its ip_adapter.9 is not a cross-attention position of this UNet (those are 1, 3, 5, 7)" in message
    assert "it lacks ip_adapter.7 (mid_block.attentions.0.transformer_blocks.0.attn2)" in message
    assert "made for a differently built UNet" in message


def test_layer_of_another_width(sd15, linear_state):
    state = dict(linear_state)
    for name in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.3.{name}.weight"] = torch.randn(24, 32)
    message = _compat_message(IPAdapter.from_state_dict(state), sd15)
    assert ("ip_adapter.3 has width 24, but this UNet's up_blocks.1.attentions.0.transformer_blocks.0.attn2 "
            "has width 16") in message
    assert "made for a differently built UNet" in message


# --------------------------------------------------------------------------------------------------
# Non-finite weights (defect 18): refused at load, naming the first bad tensor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, key", [
    (float("nan"), "ip_adapter.3.to_v_ip.weight"),
    (float("inf"), "image_proj.proj.weight"),
    (float("-inf"), "image_proj.norm.bias"),
])
@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_non_finite_weights_are_refused_naming_the_tensor(linear_state, tmp_path, bad, key, ext):
    state = {k: v.clone() for k, v in linear_state.items()}
    state[key].view(-1)[1] = bad
    path = tmp_path / f"a{ext}"
    save_file(state, str(path)) if ext == ".safetensors" else torch.save(nest(state), path)
    with pytest.raises(CheckpointError, match=(
        rf"'{key.replace('.', '[.]')}' holds NaN or infinite values \(1 of {state[key].numel()}\).*re-download"
    )):
        load_adapter(path)


def test_first_non_finite_tensor_is_named(linear_state):
    state = {k: v.clone() for k, v in linear_state.items()}
    keys = list(state)
    for key in (keys[-1], keys[2]):
        state[key].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"^'{keys[2].replace('.', '[.]')}' holds NaN"):
        IPAdapter.from_state_dict(state)


def test_non_finite_shared_adapter_is_refused(tmp_path):
    from imprompt.adapter.checkpoint import load_shared_adapter

    state = {"image_proj.proj.weight": torch.randn(64, 8), "image_proj.proj.bias": torch.randn(64),
             "image_proj.norm.weight": torch.ones(16), "image_proj.norm.bias": torch.zeros(16)}
    load_shared_adapter(_save(state, tmp_path / "ok.safetensors"))  # the finite file loads
    state["image_proj.proj.bias"][5] = float("nan")
    with pytest.raises(CheckpointError, match=r"'image_proj\.proj\.bias' holds NaN or infinite values"):
        load_shared_adapter(_save(state, tmp_path / "nan.safetensors"))


def _save(state, path):
    save_file(state, str(path))
    return path


def test_shared_adapter_of_wrong_shape_is_a_checkpoint_error(tmp_path):
    from imprompt.adapter.checkpoint import load_shared_adapter

    state = {"image_proj.proj.weight": torch.randn(64, 8), "image_proj.proj.bias": torch.randn(63),
             "image_proj.norm.weight": torch.ones(16), "image_proj.norm.bias": torch.zeros(16)}
    with pytest.raises(CheckpointError, match=r"'image_proj\.proj\.bias' has shape \(63,\), expected \(64,\)"):
        load_shared_adapter(_save(state, tmp_path / "a.safetensors"))


# --------------------------------------------------------------------------------------------------
# Saved files follow the umask (defect 4), and a failed save leaves nothing behind
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_saved_adapter_mode_follows_the_umask(linear_state, tmp_path, ext, umask, mode):
    from imprompt.adapter.checkpoint import save_adapter

    old = os.umask(umask)
    try:
        path = save_adapter(IPAdapter.from_state_dict(linear_state), tmp_path / f"a{ext}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_failed_save_leaves_the_old_file_and_no_debris(linear_state, tmp_path, monkeypatch):
    from imprompt.adapter import checkpoint

    path = checkpoint.save_adapter(IPAdapter.from_state_dict(linear_state), tmp_path / "a.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_adapter(IPAdapter.from_state_dict(linear_state), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_fifo_or_folder_named_like_a_checkpoint(tmp_path, ext):
    """Said for what it is (not 'does not exist'), and a FIFO is never opened for a blocking read."""
    os.mkfifo(tmp_path / f"pipe{ext}")
    with pytest.raises(CheckpointError, match=rf"pipe\{ext}' is not a regular file"):
        read_state(tmp_path / f"pipe{ext}")
    (tmp_path / f"folder{ext}").mkdir()
    with pytest.raises(CheckpointError, match=rf"folder\{ext}' is a directory"):
        read_state(tmp_path / f"folder{ext}")
