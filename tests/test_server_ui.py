"""The web UI: the form -> request mapping without a browser, and the page itself in headless Chromium
(Debian's, driven by Playwright; never `playwright install`)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from imprompt import toy
from imprompt.generation.pnginfo import parse_parameters
from imprompt.server.ui import Form, UnitForm, form_request, painted_mask, send_back

torch.set_flush_denormal(True)
REFS = sorted(toy.toy_paths()["references"].glob("*.png"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _mapping(form: Form):
    images = {}

    def add(image, name):
        images[name if name not in images else f"{len(images)}-{name}"] = image
        return list(images)[-1]

    request = form_request(form, lambda name, kind: f"/models/{kind}/{name}", lambda p: Image.open(p).convert("RGB"), add)
    return request, images


def test_form_maps_units_masks_and_seed():
    stroke = Image.new("L", (256, 256), 0)
    form = Form(prompt="a star", units=[UnitForm(True, "ip_adapter", [str(REFS[0]), str(REFS[1])], 0.5, "style", start=0.1,
                                                 end=0.9, weights="0.7,0.3", image_encoder="enc"),
                                        UnitForm(True, "other", [str(REFS[2])], 0.8, "custom", "up_blocks.1=1,default=0", mask=stroke),
                                        UnitForm(False, "unused", [str(REFS[0])])],
                seed=-1, sampler="euler_a", width=0)
    request, images = _mapping(form)
    assert request.adapter == ["/models/adapter/ip_adapter", "/models/adapter/other"]
    assert request.image == [f"0={REFS[0].name}", f"0={REFS[1].name}", f"1={REFS[2].name}"]
    assert request.scale == ["0=0.5", "1=0.8"] and request.layers == ["0=style", "1=up_blocks.1=1,default=0"]
    assert request.weights == ["0=0.7,0.3"] and request.image_encoder == ["0=/models/image_encoder/enc"]
    assert request.start[0] == "0=0.1" and request.end[0] == "0=0.9"
    assert len(request.mask) == 3 and images[request.mask[2]] is stroke  # unit 1's painted mask
    assert images[request.mask[0]].getextrema() == (255, 255)  # unit 0 unmasked: acts everywhere
    assert request.seed is None and request.scheduler == "euler_a" and request.width is None
    with pytest.raises(ValueError, match="unit 1: custom layers need"):
        _mapping(Form(units=[UnitForm(True, "ip_adapter", [str(REFS[0])], layers="custom")]))
    with pytest.raises(ValueError, match="unit 1 has no reference image"):
        _mapping(Form(units=[UnitForm(True, "ip_adapter", [])]))


def test_painted_strokes_become_the_mask_and_png_info_goes_back():
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 2:4, 3] = 255
    mask = painted_mask({"background": np.zeros((8, 8, 3)), "layers": [layer], "composite": None})
    assert np.asarray(mask).sum() == 4 * 255
    assert painted_mask({"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)], "composite": None}) is None
    text = "a cat\nNegative prompt: dog\nSteps: 7, Sampler: Euler a, CFG scale: 5.5, Seed: 42, Size: 32x32"
    assert send_back(text) == ["a cat", "dog", 7, 5.5, 42, "euler_a", 32, 32]


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=600,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"LOUD SKIP: Debian's chromium is missing and `apt-get install chromium` failed ({err}); "
                        "the browser test needs it")
    return CHROMIUM


@pytest.mark.slow
def test_the_page_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    from imprompt.server.app import create_app
    from imprompt.server.config import ServerConfig
    from server_util import running

    executable = _chromium()
    app = create_app(ServerConfig())
    try:
        with running(app) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.locator("#unit0_refs input[type=file]").set_input_files(str(REFS[0]))
            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#steps input[type=number]").fill("4")
            page.locator("#generate").click()
            image = page.locator("#gallery img").first
            image.wait_for()
            first = _fetch(url, image.get_attribute("src"))
            assert first.format == "PNG" and first.size == (32, 32)
            parameters = parse_parameters(first.info["parameters"])
            assert REFS[0].name in parameters["IP-Adapter 0"] and parameters["Prompt"] == "a red circle"
            page.screenshot(path=str(tmp_path / "generated.png"), full_page=True)
            page.locator("#reuse_seed").click()  # this tab's last seed back into the form
            page.wait_for_function(f"() => document.querySelector('#seed input').value === '{parameters['Seed']}'")

            # Paint a region mask, then generate again: the unit is masked now.
            page.locator("#unit0_mask [aria-label=Brush]").first.click()
            box = page.locator("#unit0_mask canvas").first.bounding_box()  # the image sits in its middle
            page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
            page.mouse.down()
            for k in range(12):  # a stroke the editor sees as one: small moves, a little apart
                page.mouse.move(box["x"] + box["width"] * (0.45 + 0.01 * k), box["y"] + box["height"] * (0.45 + 0.01 * k))
                page.wait_for_timeout(30)
            page.mouse.up()
            page.screenshot(path=str(tmp_path / "painted.png"), full_page=True)
            page.locator("#generate").click()
            page.wait_for_function("() => document.querySelector('#info textarea').value.includes('Masked: yes')")

            # PNG info: drop the first image, send its settings back to the form.
            saved = tmp_path / "first.png"
            first.save(saved, pnginfo=_pnginfo(first.info["parameters"]))
            page.get_by_role("tab", name="PNG info").click()
            page.locator("#png_drop input[type=file]").set_input_files(str(saved))
            page.wait_for_function("() => document.querySelector('#png_parameters textarea').value.includes('Seed')")
            page.locator("#prompt textarea").evaluate("e => { e.value = ''; e.dispatchEvent(new Event('input')); }")
            page.locator("#send_to_txt2img").click()
            page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a red circle'")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
    finally:
        app.state.engine.close()
    assert Image.open(tmp_path / "page.png").size[0] == 1400
    if target := os.environ.get("IMPROMPT_UI_SCREENSHOT"):  # how docs/ui.png is made
        shutil.copyfile(tmp_path / "page.png", target)


def _fetch(url: str, src: str) -> Image.Image:
    if src.startswith("/"):
        src = url + src
    data = httpx.get(src, timeout=30).content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _pnginfo(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info

