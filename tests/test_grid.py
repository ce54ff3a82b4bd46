"""imprompt grid: axes over generation fields, cells equal to single runs, one labelled grid per Z value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imprompt import toy
from imprompt.cli import main
from imprompt.generation.grid import apply, parse_axis
from imprompt.generation.pnginfo import parse_parameters
from imprompt.generation.request import GenerateRequest

torch.set_flush_denormal(True)
REF = sorted(toy.toy_paths()["references"].glob("*.png"))[0]


def test_axes_are_typed_as_their_fields():
    base = GenerateRequest(prompt="a red circle", negative_prompt="red")
    assert apply(base, parse_axis("scale=0,0.5"), "0.5").scale == ["0.5"]
    assert apply(base, parse_axis("steps=10,20"), "20").steps == 20
    assert apply(base, parse_axis("guidance=5"), "5").guidance == 5.0
    assert apply(base, parse_axis("scheduler=none,ddim"), "none").scheduler is None
    swapped = apply(base, parse_axis("prompt_sr=red,blue"), "blue")
    assert (swapped.prompt, swapped.negative_prompt) == ("a blue circle", "blue")
    with pytest.raises(ValueError, match="'colour' is not a generation field"):
        parse_axis("colour=red")
    with pytest.raises(ValueError, match="'many' is not a int"):
        apply(base, parse_axis("steps=many"), "many")
    with pytest.raises(ValueError, match="'green' is in neither"):
        apply(base, parse_axis("prompt_sr=green,blue"), "blue")


def test_grid_cells_equal_single_runs(tmp_path):
    common = ["--image", str(REF), "--prompt", "a circle", "--steps", "2"]
    out = tmp_path / "grid"
    assert main(["grid", *common, "--x", "scale=0,1", "--y", "seed=1,2", "--output", str(out)]) == 0
    cells = sorted(out.glob("0*.png"))
    (grid,) = out.glob("grid-*.png")
    assert len(cells) == 4
    settings = [parse_parameters(Image.open(c).info["parameters"]) for c in cells]
    assert [(s["Seed"], s["IP-Adapter 0"].split("Weight: ")[1].split(",")[0]) for s in settings] == [
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert "Grid: scale=0,1; seed=1,2" in Image.open(grid).info["parameters"]
    alone = tmp_path / "alone"
    assert main(["generate", *common, "--scale", "1", "--seed", "2", "--output", str(alone)]) == 0
    (single,) = alone.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(cells[3])))
    assert not np.array_equal(np.asarray(Image.open(cells[2])), np.asarray(Image.open(cells[3])))


def test_lora_axis_sets_or_adds_the_weight_of_that_lora_only():
    from imprompt.generation.grid import set_lora_weight

    base = GenerateRequest(prompt="a circle <lora:toy-striped:0.2:0.4>, <lora:other:1>")
    axis = parse_axis("lora:toy-striped=0,0.5,1")
    assert axis.values == ("0", "0.5", "1")
    assert apply(base, axis, "0.5").prompt == "a circle <lora:toy-striped:0.5>, <lora:other:1>"
    assert set_lora_weight("a circle", "toy-striped", "1") == "a circle <lora:toy-striped:1>"
    assert set_lora_weight("<LORA:x:1> <lyco:x:2>", "x", "0") == "<lora:x:0> <lora:x:0>"
    with pytest.raises(ValueError, match="LoRA weight 'heavy' is not a number"):
        parse_axis("lora:x=0,heavy")
    with pytest.raises(ValueError, match="expected lora:NAME="):
        parse_axis("lora:=0,1")


def test_lora_axis_cells_equal_the_prompt_written_out(tmp_path):
    out = tmp_path / "grid"
    common = ["--prompt", "a circle", "--steps", "2", "--guidance", "1", "--seed", "3"]
    assert main(["grid", *common, "--x", "lora:toy-striped=0,1", "--output", str(out)]) == 0
    cells = sorted(out.glob("0*.png"))
    assert [parse_parameters(Image.open(c).info["parameters"])["Prompt"] for c in cells] == [
        "a circle <lora:toy-striped:0>", "a circle <lora:toy-striped:1>"]
    alone = tmp_path / "alone"
    assert main(["generate", *common[2:], "--prompt", "a circle <lora:toy-striped:1>", "--output", str(alone)]) == 0
    (single,) = alone.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(cells[1])))
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))
