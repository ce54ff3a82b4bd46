"""A1111's prompt matrix: the prompts, their order, the grid, and the images against single runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imprompt.cli import main
from imprompt.generation.matrix import grid_shape, matrix_grid, matrix_prompts
from imprompt.generation.pnginfo import parse_parameters

torch.set_flush_denormal(True)


def test_prompts_follow_a1111s_bit_order():
    assert matrix_prompts("a cat|in the snow|at night,") == [
        "a cat", "a cat, in the snow", "a cat, at night", "a cat, in the snow, at night"]
    assert matrix_prompts("|red|blue") == ["", "red", "blue", "red, blue"]
    assert [grid_shape(k) for k in (1, 2, 3, 4)] == [(1, 2), (2, 2), (2, 4), (4, 4)]
    with pytest.raises(ValueError, match="needs a prompt with parts separated by '\\|'"):
        matrix_prompts("no parts")
    with pytest.raises(ValueError, match="at most 8"):
        matrix_prompts("x" + "|y" * 9)


def test_grid_places_each_combination():
    colours = [Image.new("RGB", (8, 8), (30 * i, 0, 0)) for i in range(8)]
    grid = np.asarray(matrix_grid("x|a|b|c", colours, cell=16))
    rows, columns = grid_shape(3)
    assert (rows, columns) == (2, 4)
    # Cell (row r, column c) holds combination r * columns + c: its red level is 30 * (r * 4 + c).
    def centre(i):  # where combination i's colour is (green and blue 0, not the white page or black text)
        ys, xs = np.nonzero((grid[..., 0] == 30 * i) & (grid[..., 1] == 0) & (grid[..., 2] == 0))
        return ys.mean(), xs.mean()

    (y0, x0), (y1, x1), (y3, x3), (y4, x4) = centre(1), centre(2), centre(3), centre(5)
    assert abs(y0 - y1) < 1 and x1 > x0 and x3 > x1  # combinations 1, 2, 3 side by side in row 0
    assert y4 > y0 + 8 and abs(x4 - x0) < 1  # combination 5 is below 1: row 1, column 1


def test_matrix_images_equal_single_runs(tmp_path, capsys):
    out = tmp_path / "matrix"
    assert main(["generate", "--prompt", "a circle|red|big", "--prompt-matrix", "--steps", "2", "--seed", "5",
                 "--output", str(out)]) == 0
    singles = sorted(out.glob("0*.png"))
    grids = sorted(out.glob("grid-*.png"))
    assert len(singles) == 4 and len(grids) == 1
    prompts = [parse_parameters(Image.open(p).info["parameters"])["Prompt"] for p in singles]
    assert prompts == ["a circle", "a circle, red", "a circle, big", "a circle, red, big"]
    alone = tmp_path / "alone"
    assert main(["generate", "--prompt", "a circle, big", "--steps", "2", "--seed", "5", "--output", str(alone)]) == 0
    (single,) = alone.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(singles[2])))
    assert main(["generate", "--prompt", "plain", "--prompt-matrix", "--output", str(tmp_path / "x")]) == 2
    assert "--prompt-matrix needs a prompt with parts" in capsys.readouterr().err
