"""imprompt merge against hand-computed tensors, on tiny single-file checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_models as tm
from imprompt.cli import main
from imprompt.models.ldm import pipeline_to_ldm
from imprompt.models.merge import block_index
from imprompt.models.safetensors_stream import TensorSpec, write_stream

torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        state = {k: v.contiguous() for k, v in pipeline_to_ldm(tm.sd15_pipeline(seed), "sd15").items()}
        save_file(state, root / f"{name}.safetensors")
    return root


def load(ckpts, name):
    return load_file(ckpts / f"{name}.safetensors")


def merged(ckpts, tmp_path, *args) -> dict[str, torch.Tensor]:
    out = tmp_path / "out.safetensors"
    assert main(["merge", *[str(ckpts / f"{m}.safetensors") for m in args[0]], *args[1:], "--output", str(out)]) == 0
    return load_file(out)


def test_weighted_sum_and_add_difference_are_a1111s_formulas(ckpts, tmp_path):
    a, b, c = load(ckpts, "a"), load(ckpts, "b"), load(ckpts, "c")
    ws = merged(ckpts, tmp_path, ["a", "b"], "--alpha", "0.3")
    assert sorted(ws) == sorted(a)
    for key in a:
        if key.endswith("position_ids"):
            assert torch.equal(ws[key], a[key]), key  # copied from A, never merged
        else:
            assert torch.equal(ws[key], a[key] * (1 - 0.3) + b[key] * 0.3), key
    ad = merged(ckpts, tmp_path, ["a", "b", "c"], "--method", "add_difference", "--alpha", "0.7")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(ad[key], a[key] + (b[key] - c[key]) * 0.7)
    half = merged(ckpts, tmp_path, ["a", "b"], "--alpha", "1", "--half")
    assert half[key].dtype == torch.float16 and torch.equal(half[key], b[key].half())


def test_block_weights_follow_the_mbw_layout(ckpts, tmp_path):
    a, b = load(ckpts, "a"), load(ckpts, "b")
    inputs = 1 + max(int(k.split(".")[3]) for k in a if k.startswith("model.diffusion_model.input_blocks."))
    weights = [round(0.05 * i, 2) for i in range(2 * inputs + 1)]
    out = merged(ckpts, tmp_path, ["a", "b"], "--alpha", "0.9", "--blocks", ",".join(map(str, weights)))
    expect = {  # key -> the weight it takes
        "model.diffusion_model.time_embed.0.weight": weights[0],
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": weights[1],
        "model.diffusion_model.middle_block.0.in_layers.2.weight": weights[inputs],
        "model.diffusion_model.output_blocks.0.0.in_layers.2.weight": weights[inputs + 1],
        "model.diffusion_model.out.2.weight": weights[2 * inputs],
        "first_stage_model.decoder.conv_in.weight": 0.9,  # outside the UNet: alpha
    }
    text_key = next(k for k in a if k.startswith("cond_stage_model.") and "position_ids" not in k)
    expect[text_key] = 0.9
    for key, m in expect.items():
        assert key in a, key
        assert torch.equal(out[key], a[key] * (1 - m) + b[key] * m), key
    assert block_index("model.diffusion_model.output_blocks.2.1.proj_out.weight", 3) == 6
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["block_weights"] == weights


def test_refusals_name_the_problem(ckpts, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["merge", str(ckpts / "a.safetensors"), str(ckpts / "b.safetensors"), "--blocks", "1,2,3",
                 "--output", out]) == 2
    assert "--blocks has 3 weights, but A's UNet has" in capsys.readouterr().err
    assert main(["merge", str(ckpts / "a.safetensors"), str(ckpts / "b.safetensors"), "--method", "add_difference",
                 "--output", out]) == 2
    assert "add_difference needs a third model C" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((ckpts / "b.safetensors").read_bytes()[:1000])
    assert main(["merge", str(ckpts / "a.safetensors"), str(broken), "--output", out]) == 2
    assert "model B (broken.safetensors): not a usable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_inpainting_a_merges_its_latent_channels(tmp_path):
    a = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 9, 3, 3)}
    b = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    out = merged(tmp_path, tmp_path, ["a", "b"], "--alpha", "0.5")["model.diffusion_model.input_blocks.0.0.weight"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(out[:, :4], a[key][:, :4] * 0.5 + b[key] * 0.5) and torch.equal(out[:, 4:], a[key][:, 4:])
    assert main(["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "a.safetensors"),
                 "--output", str(tmp_path / "y.safetensors")]) == 2


def test_stream_writer_matches_the_library(tmp_path):
    tensors = {"x": torch.randn(3, 5), "y": torch.arange(7, dtype=torch.int64), "z": torch.randn(2).bfloat16(),
               "flag": torch.tensor([True, False])}
    specs = [TensorSpec(k, {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16", torch.bool: "BOOL"}[v.dtype],
                        tuple(v.shape)) for k, v in tensors.items()]
    write_stream(tmp_path / "s.safetensors", specs, tensors.__getitem__, {"note": "hi"})
    back = load_file(tmp_path / "s.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="produced torch.float32"):
        write_stream(tmp_path / "t.safetensors", [TensorSpec("x", "F16", (3, 5))], tensors.__getitem__)
    assert not (tmp_path / "t.safetensors").exists()


def test_a_baked_in_vae_replaces_the_first_stage(ckpts, tmp_path):
    c = load(ckpts, "c")
    vae = {k.removeprefix("first_stage_model."): v for k, v in c.items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")
    out = merged(ckpts, tmp_path, ["a", "b"], "--vae", str(tmp_path / "vae.safetensors"))
    assert all(torch.equal(out[k], c[k]) for k in c if k.startswith("first_stage_model."))
    assert sorted(out) == sorted(load(ckpts, "a"))


def test_toy_merged_unet_is_the_weighted_sum_of_every_tensor():
    """imprompt.toy.toolbox merges the toy UNets in memory with the function `imprompt merge` streams."""
    from diffusers import UNet2DConditionModel

    from imprompt.toy.toolbox import merged_unet

    def unet(seed):
        torch.manual_seed(seed)
        return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=4, attention_head_dim=2)

    base, derived = unet(0), unet(1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    half = merged_unet(base, derived, 0.5).state_dict()
    for key, value in before.items():
        assert torch.allclose(half[key], 0.5 * value + 0.5 * derived.state_dict()[key], atol=1e-6), key
        assert torch.equal(base.state_dict()[key], value)  # the base is left as it was
    assert all(torch.equal(v, before[k]) for k, v in merged_unet(base, derived, 0.0).state_dict().items())
