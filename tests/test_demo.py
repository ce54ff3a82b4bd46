"""``make demo``'s plan: the image-only and image + text prompts, and the ControlNet column (issue 16: image
prompt + text + ControlNet) that takes its layout from another shipped picture."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imprompt.demo import DemoConfig, layout_partner, run
from imprompt.toy import toy_paths

torch.set_flush_denormal(True)


def test_layout_partner_is_the_next_picture_with_another_shape():
    catalogue = [{"shape": "circle"}, {"shape": "circle"}, {"shape": "square"}, {"shape": "circle"}]
    assert [layout_partner(catalogue, i) for i in range(4)] == [2, 2, 3, 2]
    with pytest.raises(ValueError, match="all have one shape"):
        layout_partner(catalogue[:2], 0)


@pytest.mark.slow  # about 10 s: five generations on the shipped toy models
def test_demo_adds_the_controlnet_column(tmp_path, capsys):
    assert run(DemoConfig(output=str(tmp_path), references=1, steps=4)) == 0
    shipped = json.loads((toy_paths()["references"] / "attributes.json").read_text())
    partner = shipped[layout_partner(shipped, 0)]
    controlled = Image.open(tmp_path / "00-3.png").info["parameters"]
    assert controlled.startswith(f"a {partner['shape']}\n")
    assert 'ControlNet 0: "Model: toy, Weight: 1.5, Preprocessor: toy_silhouette"' in controlled
    assert "IP-Adapter 0: \"Model: toy, Weight: 1," in controlled  # the image prompt at the column's own scale
    assert "ControlNet" not in Image.open(tmp_path / "00-0.png").info["parameters"]
    out = capsys.readouterr().out
    assert f"+ control + 'a {partner['shape']}'" in out and "/16 attributes as asked" in out
