"""Every way an input can be wrong is refused with a message that says what and why.

Each case checks the error type and the message text: a refusal with the wrong words (or a bare
KeyError / IndexError from deep inside) counts as a failure.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.adapter.attach import adapter_for_unet, attach
from imprompt.adapter.checkpoint import load_adapter, nest, read_state, save_adapter
from imprompt.adapter.model import IPAdapter
from imprompt.adapter.variants import AdapterVariant, CheckpointError
from imprompt.encoding import ImageEncoder, ImageInputError, check_encoder, load_image
from imprompt.generation.prompts import ImagePrompt, mask_tensor, region_masks


@pytest.fixture(scope="module")
def sd15():
    return tm.sd15_unet()


@pytest.fixture(scope="module")
def linear_state(sd15):
    return dict(tm.random_adapter(sd15, "linear").state_dict())


@pytest.fixture(scope="module")
def plus_state(sd15):
    return dict(tm.random_adapter(sd15, "plus").state_dict())


@pytest.fixture(scope="module")
def mlp_state(sd15):
    return dict(tm.random_adapter(sd15, "full").state_dict())


def processors(unet) -> dict:
    return dict(unet.attn_processors)


# --------------------------------------------------------------------------------------------------
# Adapter for another UNet family
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "plus", "full"])
def test_sdxl_adapter_on_sd15_unet(kind):
    adapter = tm.random_adapter(tm.sdxl_unet(), kind)
    unet = tm.sd15_unet()
    before = processors(unet)
    with pytest.raises(CheckpointError, match=(
        r"its image tokens have width 64, but this UNet's cross-attention reads width 32; "
        r"it has weights for 8 cross-attention layers, but this UNet has 4\. "
    )):
        attach(unet, adapter)
    after = processors(unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # untouched


def test_sd15_adapter_on_sdxl_unet():
    adapter = tm.random_adapter(tm.sd15_unet(), "linear")
    with pytest.raises(CheckpointError, match=(
        r"its image tokens have width 32, but this UNet's cross-attention reads width 64; "
        r"it has weights for 4 cross-attention layers, but this UNet has 8\. "
    )):
        attach(tm.sdxl_unet(), adapter)


def _meta_unet(family: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        if family == "SD1.5":
            return UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, sample_size=64,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, attention_head_dim=(5, 10, 20), sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


@pytest.fixture(scope="module")
def full_size():
    unets = {family: _meta_unet(family) for family in ("SD1.5", "SDXL")}
    with torch.device("meta"):
        adapters = {
            "SD1.5": adapter_for_unet(unets["SD1.5"], AdapterVariant("linear", 1024, 768, 4), copy_text_kv=False),
            "SDXL": adapter_for_unet(unets["SDXL"], AdapterVariant("linear", 1280, 2048, 4), copy_text_kv=False),
        }
    return unets, adapters


def test_full_size_sdxl_adapter_on_sd15_names_both_families(full_size):
    unets, adapters = full_size
    with pytest.raises(CheckpointError, match=(
        r"the base \(SDXL, OpenCLIP ViT-bigG/14.*\) adapter does not fit this SD1\.5 UNet: its image tokens have "
        r"width 2048 \(SDXL\), but this UNet's cross-attention reads width 768 \(SD1\.5\); it has weights for 70 "
        r"cross-attention layers, but this UNet has 16\. Use an adapter made for SD1\.5, or an SDXL model\.$"
    )):
        attach(unets["SD1.5"], adapters["SDXL"])


def test_full_size_sd15_adapter_on_sdxl_names_both_families(full_size):
    unets, adapters = full_size
    with pytest.raises(CheckpointError, match=(
        r"the base \(SD1\.5, CLIP ViT-H/14.*\) adapter does not fit this SDXL UNet: its image tokens have "
        r"width 768 \(SD1\.5\), but this UNet's cross-attention reads width 2048 \(SDXL\); it has weights for 16 "
        r"cross-attention layers, but this UNet has 70\. Use an adapter made for SDXL, or an SD1\.5 model\.$"
    )):
        attach(unets["SDXL"], adapters["SD1.5"])


def test_adapter_for_unet_with_wrong_cross_attention_dim():
    with pytest.raises(CheckpointError, match="variant has cross_attention_dim 768, the UNet 32"):
        adapter_for_unet(tm.sd15_unet(), AdapterVariant("linear", 1024, 768, 4))


# --------------------------------------------------------------------------------------------------
# Adapter for another image encoder
# --------------------------------------------------------------------------------------------------


def test_linear_adapter_with_encoder_of_other_projection_dim(sd15):
    adapter = tm.random_adapter(sd15, "linear")  # reads image_embeds of width 24
    encoder = ImageEncoder(tm.image_encoder(projection=16))
    with pytest.raises(CheckpointError, match=(
        r"reads image_embeds of width 24 .*but this image encoder gives width 16 .*"
        r"use the image encoder the adapter was trained with"
    )):
        check_encoder(adapter.variant, encoder)
    check_encoder(adapter.variant, ImageEncoder(tm.image_encoder()))  # the matching one passes


def test_plus_adapter_with_encoder_of_other_hidden_size(sd15):
    adapter = tm.random_adapter(sd15, "plus")  # reads hidden states of width 32
    encoder = ImageEncoder(tm.image_encoder(hidden=48))
    with pytest.raises(CheckpointError, match=r"reads penultimate_hidden of width 32 .*but this image encoder gives width 48"):
        check_encoder(adapter.variant, encoder)
    # The projection width is irrelevant to a plus adapter: only hidden_size is checked.
    check_encoder(adapter.variant, ImageEncoder(tm.image_encoder(projection=16)))


def test_encoder_mismatch_names_the_official_encoders():
    variant = AdapterVariant("plus", 1280, 768, 16, resampler_width=768, resampler_depth=4, resampler_ff_mult=4)

    class FakeEncoder:  # only output_width is consulted
        def output_width(self, output):
            return 1664

    with pytest.raises(CheckpointError, match=r"width 1280 \(CLIP ViT-H/14.*width 1664 \(OpenCLIP ViT-bigG/14"):
        check_encoder(variant, FakeEncoder())


# --------------------------------------------------------------------------------------------------
# Unreadable files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0], ids=["half", "most", "one-byte"])
def test_truncated_file(linear_state, tmp_path, ext, keep):
    adapter = IPAdapter.from_state_dict(linear_state)
    good = save_adapter(adapter, tmp_path / f"good{ext}")
    data = good.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=rf"cannot read (adapter checkpoint )?cut\{ext}: .*truncated.*re-download"):
        load_adapter(cut)


def test_empty_file(tmp_path):
    for ext in (".safetensors", ".bin"):
        (tmp_path / f"empty{ext}").write_bytes(b"")
        with pytest.raises(CheckpointError, match=rf"empty\{ext} is empty \(0 bytes\)"):
            load_adapter(tmp_path / f"empty{ext}")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(tmp_path / "nope.safetensors")
    (tmp_path / "a.ckpt2").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint extension '\.ckpt2'"):
        load_adapter(tmp_path / "a.ckpt2")


def test_save_to_unknown_extension(linear_state, tmp_path):
    with pytest.raises(ValueError, match=r"use a \.safetensors or \.bin file name"):
        save_adapter(IPAdapter.from_state_dict(linear_state), tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


class Opaque:
    """An arbitrary object: weights-only loading must not build it."""

    def __init__(self):
        self.value = 1


class Payload:
    """Would create a file when unpickled, if the pickle were executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_custom_object_is_refused(linear_state, tmp_path):
    nested = nest(linear_state)
    nested["image_proj"]["extra"] = Opaque()
    torch.save(nested, tmp_path / "object.bin")
    with pytest.raises(CheckpointError, match=r"object\.bin holds more than tensors and was refused without running it"):
        load_adapter(tmp_path / "object.bin")


def test_pickle_with_function_is_refused(linear_state, tmp_path):
    nested = nest(linear_state)
    nested["ip_adapter"]["hook"] = print
    torch.save(nested, tmp_path / "function.bin")
    with pytest.raises(CheckpointError, match=r"function\.bin holds more than tensors and was refused without running it"):
        load_adapter(tmp_path / "function.bin")


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"image_proj": {"x": Payload(marker)}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match=r"evil\.bin holds more than tensors and was refused without running it"):
        read_state(tmp_path / "evil.bin")
    assert not marker.exists()


def test_bin_holding_a_non_tensor_that_weights_only_allows(linear_state, tmp_path):
    """weights_only lets ints, strings and lists through; they must still be refused, by name."""
    nested = nest(linear_state)
    nested["image_proj"]["proj.weight"] = 3
    torch.save(nested, tmp_path / "int.bin")
    with pytest.raises(CheckpointError, match=r"proj\.weight.* int"):
        load_adapter(tmp_path / "int.bin")


def test_bin_flat_with_non_tensor(tmp_path):
    torch.save({"image_proj.proj.weight": "a string"}, tmp_path / "flat.bin")
    with pytest.raises(CheckpointError, match=r"entry 'image_proj\.proj\.weight' is a str, expected a tensor"):
        load_adapter(tmp_path / "flat.bin")


def test_bin_holding_a_list(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="list.bin holds a list, expected a dict of tensors"):
        load_adapter(tmp_path / "list.bin")


def test_training_checkpoint_is_recognised(linear_state, tmp_path):
    torch.save({"state_dict": linear_state, "step": 10}, tmp_path / "train.bin")
    with pytest.raises(CheckpointError, match="looks like a training checkpoint"):
        load_adapter(tmp_path / "train.bin")


def test_nested_bin_with_extra_top_level_entry(linear_state, tmp_path):
    nested = nest(linear_state)
    nested["optimizer"] = {}
    torch.save(nested, tmp_path / "extra.bin")
    with pytest.raises(CheckpointError, match="unexpected top-level entry 'optimizer'"):
        load_adapter(tmp_path / "extra.bin")


# --------------------------------------------------------------------------------------------------
# Incomplete or malformed states
# --------------------------------------------------------------------------------------------------


def _without(state: dict, *keys: str) -> dict:
    for key in keys:
        assert key in state, key  # the case really removes something
    return {k: v for k, v in state.items() if k not in keys}


def test_missing_to_v_ip_of_one_layer(linear_state, tmp_path):
    save_file(_without(linear_state, "ip_adapter.5.to_v_ip.weight"), str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"layer 5 is incomplete: 'ip_adapter\.5\.to_v_ip\.weight' is missing"):
        load_adapter(tmp_path / "a.safetensors")


def test_missing_to_k_ip_of_one_layer(plus_state):
    with pytest.raises(CheckpointError, match=r"layer 1 is incomplete: 'ip_adapter\.1\.to_k_ip\.weight' is missing"):
        IPAdapter.from_state_dict(_without(plus_state, "ip_adapter.1.to_k_ip.weight"))


@pytest.mark.parametrize("state_name, key, message", [
    ("linear_state", "image_proj.norm.weight", r"image projection is incomplete: missing 'image_proj\.norm\.weight'"),
    ("linear_state", "image_proj.proj.bias", r"missing 'image_proj\.proj\.bias' \(1 keys missing\)"),
    ("plus_state", "image_proj.proj_out.weight", r"image projection is incomplete: missing 'image_proj\.proj_out\.weight'"),
    ("plus_state", "image_proj.layers.0.1.1.weight", r"missing 'image_proj\.layers\.0\.1\.1\.weight'"),
    ("plus_state", "image_proj.layers.2.0.to_kv.weight", r"plus .* checkpoint is missing 'image_proj\.layers\.2\.0\.to_kv\.weight'"),
    ("plus_state", "image_proj.norm_out.bias", r"missing 'image_proj\.norm_out\.bias'"),
    ("mlp_state", "image_proj.proj.2.weight", r"image projection is incomplete: missing 'image_proj\.proj\.2\.weight'"),
    ("mlp_state", "image_proj.proj.3.weight", r"image projection is incomplete: missing 'image_proj\.proj\.3\.weight'"),
])
def test_missing_projection_key(request, state_name, key, message):
    state = request.getfixturevalue(state_name)
    with pytest.raises(CheckpointError, match=message):
        IPAdapter.from_state_dict(_without(state, key))


def test_resampler_without_any_layers(plus_state):
    """A plus checkpoint cut before its layers: must be a CheckpointError, not max() of nothing."""
    state = {k: v for k, v in plus_state.items() if not k.startswith("image_proj.layers.")}
    with pytest.raises(CheckpointError, match=r"image projection is incomplete: missing 'image_proj\.layers\."):
        IPAdapter.from_state_dict(state)


def test_no_image_proj_at_all(linear_state):
    with pytest.raises(CheckpointError, match="no 'image_proj' weights; is this an IP-Adapter file"):
        IPAdapter.from_state_dict({k: v for k, v in linear_state.items() if k.startswith("ip_adapter.")})


def test_unrecognised_projection(linear_state):
    state = {k: v for k, v in linear_state.items() if k.startswith("ip_adapter.")}
    state["image_proj.mystery.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"unrecognised image projection: .*found \['mystery\.weight'\]"):
        IPAdapter.from_state_dict(state)


@pytest.mark.parametrize("key, shape, message", [
    ("image_proj.norm.bias", (7,), r"'image_proj\.norm\.bias' has shape \(7,\), expected \(32,\) for a base"),
    ("image_proj.proj.weight", (100, 24), r"image_proj\.proj\.weight has 100 rows, not a multiple of the token width 32"),
    ("ip_adapter.3.to_k_ip.weight", (16, 5), r"'ip_adapter\.3\.to_k_ip\.weight' has shape \(16, 5\); expected \(width, 32\)"),
    ("ip_adapter.3.to_v_ip.weight", (15, 32), r"'ip_adapter\.3\.to_v_ip\.weight' has shape \(15, 32\), expected \(16, 32\)"),
    ("ip_adapter.3.to_v_ip.weight", (16, 32, 1), r"'ip_adapter\.3\.to_v_ip\.weight' has shape \(16, 32, 1\); expected \(width, 32\)"),
])
def test_wrong_shape(linear_state, key, shape, message):
    state = dict(linear_state)
    assert key in state
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=message):
        IPAdapter.from_state_dict(state)


def test_one_dimensional_first_ip_adapter_tensor(linear_state):
    """The first ip_adapter tensor is 1-D: a CheckpointError naming it, not an IndexError."""
    state = dict(linear_state)
    first = next(k for k in state if k.startswith("ip_adapter."))
    state[first] = torch.zeros(16)
    with pytest.raises(CheckpointError, match=rf"'{first.replace('.', '[.]')}' has shape \(16,\)"):
        IPAdapter.from_state_dict(state)


def test_wrong_resampler_shape(plus_state):
    state = dict(plus_state)
    state["image_proj.layers.1.0.to_q.weight"] = torch.zeros(64, 63)
    with pytest.raises(CheckpointError, match=r"'image_proj\.layers\.1\.0\.to_q\.weight' has shape \(64, 63\), expected \(64, 64\)"):
        IPAdapter.from_state_dict(state)


def test_unexpected_top_level_key(linear_state):
    state = {**linear_state, "text_encoder.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'text_encoder\.weight': an IP-Adapter holds only"):
        IPAdapter.from_state_dict(state)


def test_unexpected_ip_adapter_key(linear_state):
    state = {**linear_state, "ip_adapter.1.to_out_ip.weight": torch.zeros(16, 32)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'ip_adapter\.1\.to_out_ip\.weight'"):
        IPAdapter.from_state_dict(state)


@pytest.mark.parametrize("state_name, key", [
    ("linear_state", "image_proj.extra.weight"),
    ("plus_state", "image_proj.layers.0.0.to_q.bias"),
    ("plus_state", "image_proj.proj_in.scale"),
])
def test_unexpected_image_proj_key(request, state_name, key):
    """An extra key inside image_proj is named in a CheckpointError (not torch's RuntimeError)."""
    state = {**request.getfixturevalue(state_name), key: torch.zeros(3)}
    with pytest.raises(CheckpointError, match=rf"unexpected key '{key.replace('.', '[.]')}'"):
        IPAdapter.from_state_dict(state)


def test_empty_ip_adapter(linear_state, tmp_path):
    image_proj_only = {k: v for k, v in linear_state.items() if k.startswith("image_proj.")}
    with pytest.raises(CheckpointError, match="the checkpoint has no 'ip_adapter' weights"):
        IPAdapter.from_state_dict(image_proj_only)
    nested = nest(image_proj_only)
    assert nested["ip_adapter"] == {}
    torch.save(nested, tmp_path / "empty_ip.bin")
    with pytest.raises(CheckpointError, match="the checkpoint has no 'ip_adapter' weights"):
        load_adapter(tmp_path / "empty_ip.bin")


def test_empty_safetensors(tmp_path):
    save_file({}, str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="no 'image_proj' weights"):
        load_adapter(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------------------------------
# FaceID
# --------------------------------------------------------------------------------------------------


def test_faceid_lora_keys_beside_a_plain_projection_are_refused(linear_state):
    # FaceID files load (tests/test_faceid.py); its LoRA keys on a linear adapter mean a mixed-up file
    state = {**linear_state, "ip_adapter.1.to_q_lora.down.weight": torch.zeros(128, 32),
             "ip_adapter.1.to_q_lora.up.weight": torch.zeros(32, 128)}
    with pytest.raises(CheckpointError, match=(
        r"'ip_adapter\.1\.to_q_lora\.down\.weight' is a FaceID LoRA weight, but the image projection is not "
        r"FaceID's .*the file mixes two adapters; re-download it"
    )):
        IPAdapter.from_state_dict(state)


def test_faceid_plus_perceiver_without_its_projection_is_refused(linear_state, tmp_path):
    state = {**linear_state, "image_proj.perceiver_resampler.latents": torch.zeros(1, 4, 32),
             "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(32, 32)}
    save_file(state, str(tmp_path / "faceid-plus.safetensors"))
    with pytest.raises(CheckpointError, match=r"image projection is incomplete: missing 'image_proj\.proj\.0\.weight'"):
        load_adapter(tmp_path / "faceid-plus.safetensors")


# --------------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------------


def test_bytes_that_are_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is a text file, not a picture\n" * 20)
    with pytest.raises(ImageInputError, match=r"cannot read image notes\.png: .*is it a complete PNG/JPEG/WebP file"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    buffer = io.BytesIO()
    tm.reference_images(1, size=64)[0].save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match=rf"cannot read image cut\.{fmt.lower()}: "):
        load_image(path)
    (tmp_path / f"whole.{fmt.lower()}").write_bytes(data)
    assert load_image(tmp_path / f"whole.{fmt.lower()}").size == (72, 64)  # the untruncated file loads


def test_missing_image(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_mask_of_wrong_aspect_ratio():
    with pytest.raises(ImageInputError, match=r"mask is 16x8 \(width x height\) but the image is 64x64"):
        region_masks(torch.ones(8, 16), 8, 8)
    with pytest.raises(ImageInputError, match=r"mask is 64x64 \(width x height\) but the image is 96x64"):
        region_masks(mask_tensor(Image.new("L", (64, 64), 255)), 8, 12)
    assert set(region_masks(torch.ones(16, 24), 8, 12)) == {96, 24, 6, 2, 1}  # same ratio: fine


@pytest.mark.parametrize("mask", [
    np.zeros((8, 8, 3), dtype=np.uint8),
    torch.zeros(3, 8, 8),
    torch.zeros(2, 1, 8, 8),
    np.zeros(8),
], ids=["hwc-array", "chw-tensor", "batched", "1d"])
def test_mask_with_wrong_channels(mask):
    with pytest.raises(ImageInputError, match=r"a region mask must be one channel \(H, W\); got shape"):
        mask_tensor(mask)


def test_rgb_mask_image_is_converted_not_refused():
    m = mask_tensor(Image.new("RGB", (6, 4), (255, 255, 255)))
    assert m.shape == (4, 6) and float(m.min()) == 1.0


# --------------------------------------------------------------------------------------------------
# ImagePrompt.check
# --------------------------------------------------------------------------------------------------


IMAGES = tm.reference_images(2, size=16)


@pytest.mark.parametrize("kwargs, num_adapters, message", [
    (dict(combine="weighted"), 1, r"combine='weighted' needs one weight per image: 2 images, 0 weights"),
    (dict(combine="weighted", weights=[1.0]), 1, r"2 images, 1 weights"),
    (dict(combine="weighted", weights=[0.0, 0.0]), 1, r"weights sum to zero"),
    (dict(start=0.5, end=0.5), 1, r"need 0 <= start < end <= 1 .*start=0\.5, end=0\.5"),
    (dict(start=0.8, end=0.2), 1, r"start=0\.8, end=0\.2"),
    (dict(end=1.5), 1, r"need 0 <= start < end <= 1"),
    (dict(masks=[None]), 1, r"give one mask per reference image \(or None\): 2 images, 1 masks"),
    (dict(masks=[None, None], combine="average"), 1, r"use combine='concat' with masks"),
    (dict(adapter=1), 1, r"image prompt refers to adapter 1, but 1 adapter\(s\) are attached"),
    (dict(adapter=-1), 2, r"refers to adapter -1, but 2 adapter\(s\)"),
    (dict(combine="sum"), 1, r"combine must be one of"),
    (dict(scale=float("nan")), 1, r"scale must be a finite number"),
])
def test_image_prompt_check(kwargs, num_adapters, message):
    with pytest.raises(ValueError, match=message):
        ImagePrompt(images=IMAGES, **kwargs).check(num_adapters)


def test_image_prompt_without_images():
    with pytest.raises(ValueError, match="needs at least one reference image"):
        ImagePrompt(images=[]).check(1)


def test_valid_image_prompts_pass_and_weights_act_as_given():
    ImagePrompt(images=IMAGES, masks=[None, np.ones((8, 8))]).check(1)
    prompt = ImagePrompt(images=IMAGES, combine="weighted", weights=[1.0, 0.0], start=0.0, end=1.0, adapter=1)
    prompt.check(2)
    from imprompt.generation.prompts import combine_features

    features = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(combine_features(features, prompt.combine, prompt.weights), features[:1])
    assert torch.allclose(combine_features(features, "weighted", [2.0, 2.0]), features.mean(0, keepdim=True))


# --------------------------------------------------------------------------------------------------
# Attaching
# --------------------------------------------------------------------------------------------------


def test_two_attachments_share_a_unet_and_the_last_detach_restores_it():
    unet = tm.sd15_unet()
    original = processors(unet)
    first = attach(unet, tm.random_adapter(unet, "linear"))
    second = attach(unet, tm.random_adapter(unet, "linear", seed=1))
    first.detach()
    assert second.attached and not first.attached
    assert all(processors(unet)[k] is not original[k] for k in original)  # still wrapped for the second
    second.detach()
    after = processors(unet)
    assert all(after[k] is original[k] for k in original)
    attach(unet, tm.random_adapter(unet, "linear")).detach()  # after detaching, attaching works again


def test_processors_replaced_behind_an_attachment_are_reported():
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tm.sd15_unet()
    first = attach(unet, tm.random_adapter(unet, "linear"))
    name = next(iter(processors(unet)))
    unet.set_attn_processor({**processors(unet), name: AttnProcessor2_0()})
    with pytest.raises(RuntimeError, match="replaced while imprompt adapters were attached"):
        attach(unet, tm.random_adapter(unet, "linear", seed=1))
    first.detach()


def test_attach_needs_an_adapter():
    with pytest.raises(ValueError, match="attach needs at least one adapter"):
        attach(tm.sd15_unet(), [])


def test_attach_over_diffusers_ip_adapter_raises():
    pipe = tm.sd15_pipeline()
    adapter = tm.random_adapter(pipe.unet, "linear")
    pipe.load_ip_adapter(nest(adapter.state_dict()), subfolder="", weight_name="", image_encoder_folder=None)
    assert pipe.unet.encoder_hid_proj is not None
    before = processors(pipe.unet)
    with pytest.raises(RuntimeError, match=r"diffusers' own IP-Adapter .*call pipe\.unload_ip_adapter\(\) before"):
        attach(pipe.unet, adapter)
    after = processors(pipe.unet)
    assert all(after[k] is before[k] for k in before)  # diffusers' processors are left in place
    pipe.unload_ip_adapter()
    attach(pipe.unet, adapter).detach()  # and once unloaded, attaching works


def test_mask_message_uses_the_pipelines_vae_factor(tmp_path, capsys):
    """The toy VAE has 4 pixels per latent: a 32x32 output is reported as 32x32, not 64x64 (factor 8)."""
    from imprompt.cli import main
    from imprompt.toy import toy_paths

    reference = sorted(toy_paths()["references"].glob("*.png"))[0]
    Image.new("L", (64, 16), 255).save(tmp_path / "wide.png")
    code = main(["generate", "--image", str(reference), "--mask", str(tmp_path / "wide.png"), "--steps", "1",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "mask is 64x16 (width x height) but the image is 32x32" in err, err
    assert not list(tmp_path.glob("out/*.png"))
