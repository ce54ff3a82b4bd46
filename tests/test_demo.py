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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One default demo run on one reference (about 10 s: five generations on the shipped toy models), and what
    it printed."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("demo"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(DemoConfig(output=str(out), references=1, steps=4)) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_adds_the_controlnet_column(demo_run):
    tmp_path, out = demo_run
    shipped = json.loads((toy_paths()["references"] / "attributes.json").read_text())
    partner = shipped[layout_partner(shipped, 0)]
    controlled = Image.open(tmp_path / "00-3.png").info["parameters"]
    assert controlled.startswith(f"a {partner['shape']}\n")
    assert 'ControlNet 0: "Model: toy, Weight: 1.5, Preprocessor: toy_silhouette"' in controlled
    assert "IP-Adapter 0: \"Model: toy, Weight: 1," in controlled  # the image prompt at the column's own scale
    assert "ControlNet" not in Image.open(tmp_path / "00-0.png").info["parameters"]
    assert f"+ control + 'a {partner['shape']}'" in out and "/16 attributes as asked" in out


@pytest.mark.slow  # plus about 8 s: the demo again without text diffs
def test_demo_image_and_text_columns_carry_the_text_diff(demo_run, tmp_path):
    out, _ = demo_run
    background = Image.open(out / "00-1.png").info["parameters"]
    text = background.split("\n")[0]
    assert text.endswith(" background")
    assert f"-> {text} (0.3)" in background and "Weight: 1," in background
    assert "Text diff" not in Image.open(out / "00-0.png").info["parameters"]  # the image alone
    assert run(DemoConfig(output=str(tmp_path / "off"), references=1, steps=4, text_diff=0.0, scale=0.5)) == 0
    assert "Text diff" not in Image.open(tmp_path / "off" / "00-1.png").info["parameters"]
