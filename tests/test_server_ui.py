"""The web UI: the form -> request mapping and one generation without a browser, and the page itself in
headless Chromium (Debian's, driven by Playwright; never `playwright install`)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from imprompt import toy
from imprompt.generation.pnginfo import parse_parameters
from imprompt.server.form import ControlForm, unit_tune_config
from imprompt.training.tune import TuneConfig
from imprompt.server.ui import Form, Session, UnitForm, add_network, form_request, painted_mask, send_back

torch.set_flush_denormal(True)
REFS = sorted(toy.toy_paths()["references"].glob("*.png"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


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
                                        UnitForm(False, "unused", [str(REFS[0])]),
                                        UnitForm(True, "other", [str(REFS[2])], 0.8, "custom", "up_blocks.1=1,default=0", mask=stroke)],
                seed=-1, sampler="euler_a", width=0)
    request, images = _mapping(form)
    # The enabled units are adapters 0 and 1, whatever their place on the page.
    assert request.adapter == ["/models/adapter/ip_adapter", "/models/adapter/other"]
    assert request.image == [f"0={REFS[0].name}", f"0={REFS[1].name}", f"1={REFS[2].name}"]
    assert request.scale == ["0=0.5", "1=0.8"] and request.layers == ["0=style", "1=up_blocks.1=1,default=0"]
    assert request.weights == ["0=0.7,0.3"] and request.image_encoder == ["0=/models/image_encoder/enc"]
    assert request.start[0] == "0=0.1" and request.end[0] == "0=0.9"
    assert len(request.mask) == 3 and images[request.mask[2]] is stroke  # the masked unit's painted region
    assert images[request.mask[0]].getextrema() == (255, 255)  # the unmasked unit acts everywhere
    assert request.seed is None and request.scheduler == "euler_a" and request.width is None
    assert request.init_image is None and request.mask_image is None
    assert _mapping(Form(seed=42, steps=3))[0].seed == 42
    assert request.image_guidance is None and _mapping(Form(image_guidance=2))[0].image_guidance == 2.0


def test_form_controlnet_units_become_controlnets_with_their_preprocessors():
    form = Form(controls=[ControlForm(None, str(REFS[2])),  # no ControlNet chosen: left out
                          ControlForm("canny_net", str(REFS[0]), "canny", 0.8, 0.1, 0.9, 256, 40, -1),
                          ControlForm("tile_net", str(REFS[1]), "tile_resample", threshold_a=2)])
    request, images = _mapping(form)
    assert request.controlnet == ["/models/controlnet/canny_net", "/models/controlnet/tile_net"]
    assert request.control_image == [f"0={REFS[0].name}", f"1={REFS[1].name}"]
    assert request.control_preprocess == ["0=canny", "1=tile_resample"]
    assert request.controlnet_scale == ["0=0.8", "1=1.0"] and request.control_start == ["0=0.1", "1=0.0"]
    assert request.control_res == ["0=256"] and request.control_threshold_a == ["0=40.0", "1=2.0"]
    assert request.control_threshold_b == []  # -1: the preprocessor's default


def test_form_errors_name_the_unit_as_the_page_numbers_it():
    with pytest.raises(ValueError, match="unit 1: custom layers need"):
        _mapping(Form(units=[UnitForm(True, "ip_adapter", [str(REFS[0])], layers="custom")]))
    with pytest.raises(ValueError, match="unit 2 has no reference image"):  # unit 1 is off: still "unit 2"
        _mapping(Form(units=[UnitForm(False), UnitForm(True, "ip_adapter", [])]))
    with pytest.raises(ValueError, match="ControlNet unit has a model but no control image"):
        _mapping(Form(controls=[ControlForm(controlnet="canny")]))


def test_a_unit_with_saved_embeds_maps_to_embeds_not_images():
    features = object()  # what read_embeds gives back, filed as is
    images = {}

    def add(item, name):
        images[name] = item
        return name

    form = Form(units=[UnitForm(True, "ip_adapter", [], embeds="/uploads/subject.safetensors")])
    request = form_request(form, lambda name, kind: name, lambda p: None, add, lambda p: features)
    assert request.embeds == ["0=subject.safetensors"] and request.image == []
    assert images["subject.safetensors"] is features
    with pytest.raises(ValueError, match="unit 1 has reference images and saved embeds"):
        form_request(Form(units=[UnitForm(True, "ip_adapter", [str(REFS[0])], embeds="e.safetensors")]),
                     lambda name, kind: name, lambda p: None, add, lambda p: features)


def test_painted_strokes_become_the_mask_and_png_info_goes_back():
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 2:4, 3] = 255
    mask = painted_mask({"background": np.zeros((8, 8, 3)), "layers": [layer], "composite": np.ones((8, 8, 3))})
    assert np.asarray(mask).sum() == 4 * 255  # the strokes, not the composite that differs everywhere
    flattened = np.zeros((8, 8, 3), np.uint8)
    flattened[0, 0] = 255
    assert np.asarray(painted_mask({"background": np.zeros((8, 8, 3), np.uint8), "layers": [],
                                    "composite": flattened})).sum() == 255
    assert painted_mask({"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)], "composite": None}) is None
    text = "a cat\nNegative prompt: dog\nSteps: 7, Sampler: Euler a, CFG scale: 5.5, Seed: 42, Size: 32x32"
    assert send_back(text) == ["a cat", "dog", 7, 5.5, None, 42, "euler_a", 32, 32]
    assert send_back(text.replace("CFG scale: 5.5,", "CFG scale: 5.5, Image CFG scale: 2,"))[3:5] == [5.5, 2.0]


@pytest.fixture(scope="module")
def session():
    from imprompt.server.app import make_engine
    from imprompt.server.config import ServerConfig

    engine = make_engine(ServerConfig())
    yield Session(engine)
    engine.close()


def test_generate_round_trip_on_the_toy_model(session):
    form = Form(prompt="a red circle", units=[UnitForm(True, "ip_adapter", [str(REFS[0]), str(REFS[0])])],
                steps=2, seed=7, sampler="euler")
    updates = list(session.run(form))
    text, paths, info, job = updates[-1]
    assert text.startswith("done: 1 image(s)") and job.seed == 7 and len(paths) == 1
    assert all(u[1] is None for u in updates[:-1])  # progress only, until the images exist
    assert Path(paths[0]).parent == session.folder  # the UI's own temporary folder
    with Image.open(paths[0]) as image:
        assert image.format == "PNG" and image.size == (32, 32)
        parameters = parse_parameters(image.info["parameters"])
    assert parameters == parse_parameters(info) and parameters["Seed"] == "7" and parameters["Sampler"] == "Euler"
    # Two uploads of one file: both reach the engine, under unique names.
    assert f"{REFS[0].stem}-2.png" in parameters["IP-Adapter 0"] and REFS[0].name in parameters["IP-Adapter 0"]


def test_image_guidance_reaches_the_engine(session):
    def run(**extra):
        form = Form(prompt="a red circle", units=[UnitForm(True, "ip_adapter", [str(REFS[0])])], steps=2, seed=7,
                    guidance=5, **extra)
        text, paths, info, _ = list(session.run(form))[-1]
        with Image.open(paths[0]) as image:
            return parse_parameters(info), np.asarray(image.convert("RGB"), dtype=int)

    (split, split_pixels), (plain, plain_pixels) = run(image_guidance=2), run()
    assert split["Image CFG scale"] == "2" and "Image CFG scale" not in plain
    assert np.abs(split_pixels - plain_pixels).max() > 0


def test_saved_embeds_generate_the_pixels_of_their_reference(session, tmp_path):
    from imprompt.cli import main

    embeds = tmp_path / "ref.safetensors"
    assert main(["encode", str(REFS[0]), "--adapter", str(toy.toy_paths()["adapter"]), "-o", str(embeds)]) == 0
    pixels = []
    for unit in (UnitForm(True, "ip_adapter", [str(REFS[0])]), UnitForm(True, "ip_adapter", [], embeds=str(embeds))):
        text, paths, info, job = list(session.run(Form(prompt="a star", units=[unit], steps=2, seed=7)))[-1]
        assert text.startswith("done: 1 image(s)"), text
        pixels.append(np.asarray(Image.open(paths[0]).convert("RGB")))
    assert "Embeds: ref.safetensors" in info
    np.testing.assert_array_equal(*pixels)
    (tmp_path / "not-embeds.safetensors").write_bytes(REFS[0].read_bytes())
    wrong = UnitForm(True, "ip_adapter", [], embeds=str(tmp_path / "not-embeds.safetensors"))
    updates = session.run(Form(units=[wrong]))
    with pytest.raises(gr.Error, match="not-embeds.safetensors: neither a .safetensors file nor a torch-saved"):
        list(updates)


def test_a_units_tune_settings_and_what_is_refused():
    names = []
    unit = UnitForm(True, "ip_adapter", [str(REFS[0]), str(REFS[1])], image_encoder="enc")
    config = unit_tune_config("toy", unit, 2, "  a red circle ", 7, lambda name, kind: f"/models/{kind}/{name}",
                              lambda p: Image.open(p).convert("RGB"), lambda image, name: names.append(name) or name)
    assert (config.model, config.adapter, config.image_encoder) == ("/models/checkpoint/toy", "/models/adapter/ip_adapter",
                                                                    "/models/image_encoder/enc")
    assert config.image == names == [REFS[0].name, REFS[1].name] and config.prompt == "a red circle"
    assert config.steps == 7 and config.progress is False and config.lr == TuneConfig().lr
    lookup = lambda name, kind: name  # noqa: E731
    for bad, steps, message in ((UnitForm(True, None, [str(REFS[0])]), 5, "unit 2: choose an adapter"),
                                (UnitForm(True, "ip_adapter", [], embeds="x.safetensors"), 5, "unit 2: tuning starts"),
                                (UnitForm(True, "ip_adapter", [str(REFS[0])]), 0, "steps must be 1 to 500, got 0")):
        with pytest.raises(ValueError, match=message):
            unit_tune_config(None, bad, 2, "", steps, lookup, lambda p: p, lambda image, name: name)


def test_the_tune_button_gives_imprompt_tunes_file_for_the_unit(session, tmp_path):
    from imprompt.cli import main
    from imprompt.generation.embeds import load_embeds

    unit = UnitForm(True, "ip_adapter", [str(REFS[0])])
    updates = list(session.tune(None, unit, 1, "", 3))
    text, path = updates[-1]
    assert text.startswith("tuned 3 steps, loss") and Path(path).parent == session.folder, text
    assert all(u[1] is None for u in updates[:-1])
    cli = tmp_path / "cli.safetensors"
    assert main(["tune", "--image", str(REFS[0]), "--steps", "3", "-o", str(cli), "--no-progress"]) == 0
    ours, theirs = load_embeds(path), load_embeds(cli)
    assert torch.equal(ours.conditional, theirs.conditional) and ours.tuning == theirs.tuning  # the CLI's, bit for bit
    # The file goes in the unit's saved embeds: a generation from it is `generate --embeds`'s.
    text, paths, info, job = list(session.run(Form(units=[UnitForm(True, "ip_adapter", [], embeds=path)], steps=2,
                                                   seed=3)))[-1]
    assert text.startswith("done: 1 image(s)") and f"Embeds: {Path(path).name}" in info, text
    with pytest.raises(gr.Error, match="unit 1: tuning starts from reference images"):
        list(session.tune(None, UnitForm(True, "ip_adapter", []), 1, "", 3))
    # With the guard: the file says which features it kept, and the page says so too.
    text, path = list(session.tune(None, unit, 1, "", 3, guard=1))[-1]
    kept = json.loads(load_embeds(path).tuning)["guard"]["kept"]
    assert f"the guard kept the {kept} features" in text, text


def test_a_refused_form_shows_the_message_not_a_traceback(session):
    updates = session.run(Form(units=[UnitForm(True, "ip_adapter", [])]))
    text, paths, _, job = next(updates)
    assert text == "**Error:** IP-Adapter unit 1 has no reference image; drop one in, or disable the unit"
    assert paths is None and job is None
    with pytest.raises(gr.Error, match="unit 1 has no reference image"):
        next(updates)
    updates = session.run(Form(steps=2, width=33))  # refused by the engine's checks, in the CLI's words
    assert next(updates)[0].startswith("**Error:** ") and "33" in _first_error(updates)


def _first_error(updates) -> str:
    with pytest.raises(gr.Error) as caught:
        next(updates)
    return caught.value.message


# --- the page in a browser --------------------------------------------------------------------------------


def chromium() -> str:
    """Debian's Chromium; installed with apt when missing, else the test is skipped, loudly."""
    if not Path(CHROMIUM).exists():
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=600,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"LOUD SKIP: Debian's chromium is missing and `apt-get install chromium` failed ({err}); "
                        "the browser test needs it")
    return CHROMIUM


def paint(page, editor: str) -> None:
    """Drag one white stroke across the middle of an ImageEditor's canvas."""
    page.locator(f"{editor} [aria-label=Brush]").first.click()
    box = page.locator(f"{editor} canvas").first.bounding_box()  # the image sits in its middle
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
    page.mouse.down()
    for k in range(12):  # a stroke the editor sees as one: small moves, a little apart
        page.mouse.move(box["x"] + box["width"] * (0.45 + 0.01 * k), box["y"] + box["height"] * (0.45 + 0.01 * k))
        page.wait_for_timeout(30)
    page.mouse.up()


def wait_value(page, selector: str, condition: str) -> None:
    """Wait until ``value`` (an input's value, else the element's text) satisfies the JS ``condition``."""
    page.wait_for_function(f"() => {{ const e = document.querySelector('{selector}'); if (!e) return false; "
                           f"const value = e.matches('input, textarea') ? e.value : e.textContent; "
                           f"return {condition}; }}")


def fetch(url: str, src: str) -> bytes:
    return httpx.get(url + src if src.startswith("/") else src, timeout=30).content


@pytest.mark.slow
def test_the_page_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    from imprompt.server.app import create_app
    from imprompt.server.config import ServerConfig
    from server_util import running

    executable = chromium()
    app = create_app(ServerConfig())
    try:
        with running(app) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True,
                                        timeout=TIMEOUT_MS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            assert page.locator("#checkpoint input").input_value() == "pipeline"  # the default model, shown

            page.locator("#unit0_refs input[type=file]").set_input_files(str(REFS[0]))

            # A refused form: the message in the page, in the CLI's words.
            page.get_by_text("IP-Adapter unit 2", exact=True).click()  # a closed accordion renders nothing
            page.locator("#unit1_enabled input").check()
            page.locator("#generate").click()
            wait_value(page, "#status", "value.includes('IP-Adapter unit 2 has no reference image')")
            page.locator("#unit1_enabled input").uncheck()

            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#steps input[type=number]").fill("4")
            page.locator("#image_guidance input").fill("3")
            page.locator("#generate").click()
            image = page.locator("#gallery img").first
            image.wait_for()
            first = tmp_path / "first.png"
            first.write_bytes(fetch(url, image.get_attribute("src")))
            with Image.open(first) as png:
                assert png.format == "PNG" and png.size == (32, 32)
                parameters = parse_parameters(png.info["parameters"])
            assert REFS[0].name in parameters["IP-Adapter 0"] and parameters["Prompt"] == "a red circle"
            assert parameters["Image CFG scale"] == "3"
            wait_value(page, "#status", "value.includes('step 4 of 4')")
            page.screenshot(path=str(tmp_path / "generated.png"), full_page=True)
            page.locator("#reuse_seed").click()  # this tab's last seed back into the form
            wait_value(page, "#seed input", f"value === '{parameters['Seed']}'")
            page.locator("#random_seed").click()
            wait_value(page, "#seed input", "value === '-1'")

            # Paint a region mask, then generate again: the unit is masked now.
            paint(page, "#unit0_mask")
            page.screenshot(path=str(tmp_path / "painted.png"), full_page=True)
            page.locator("#generate").click()
            wait_value(page, "#info textarea", "value.includes('Masked: yes')")

            # Cancel a long job: it stops between steps and says so.
            page.locator("#steps input[type=number]").fill("150")
            page.locator("#generate").click()
            wait_value(page, "#status", "value.includes('(running)')")
            page.locator("#cancel").click()
            wait_value(page, "#status", "value.includes('cancelled at step')")
            page.locator("#steps input[type=number]").fill("4")

            # img2img / inpainting: the first result as init image, a painted region repainted.
            page.get_by_role("tab", name="img2img").click()
            page.locator("#init_image input[type=file]").set_input_files(str(first))
            # The mask editor takes the init image as its background (a server event that also clears its
            # layers): paint only after the upload shows and the event has had time to land, even on a busy CPU.
            page.locator("#init_image img").first.wait_for(state="visible")
            page.wait_for_timeout(2000)
            paint(page, "#inpaint")
            page.locator("#img2img_generate").click()
            wait_value(page, "#img2img_info textarea", "value.includes('Denoising strength: 0.75')")
            with Image.open(io.BytesIO(fetch(url, page.locator("#img2img_gallery img").first.get_attribute("src")))) as png:
                assert png.size == (32, 32)
            inpainted = app.state.engine.jobs()[-1].request  # the engine's record: an inpainting job
            assert inpainted.task == "inpaint" and inpainted.init_image == first.name
            page.screenshot(path=str(tmp_path / "img2img.png"), full_page=True)

            # PNG info: drop the first image, send its settings back to the form.
            page.get_by_role("tab", name="PNG info").click()
            page.locator("#png_drop input[type=file]").set_input_files(str(first))
            wait_value(page, "#png_parameters textarea", "value.includes('Seed')")
            page.locator("#prompt textarea").evaluate("e => { e.value = ''; e.dispatchEvent(new Event('input')); }")
            page.locator("#send_to_txt2img").click()
            wait_value(page, "button[role=tab][aria-selected=true]", "value.trim() === 'txt2img'")
            wait_value(page, "#prompt textarea", "value === 'a red circle'")
            wait_value(page, "#seed input", f"value === '{parameters['Seed']}'")

            # Tune unit 1 on its reference: the tuned embeds land in its saved embeds, which then replace the
            # reference (a generation with both is refused, in the form's words).
            page.get_by_text("More: custom layers", exact=False).first.click()
            page.locator("#unit0_tune_steps input").fill("2")
            page.locator("#unit0_tune").click()
            wait_value(page, "#unit0_tune_status", "value.includes('tuned 2 steps, loss')")
            assert app.state.engine.jobs()[-1].tuning.steps == 2
            page.locator("#generate").click()
            wait_value(page, "#status", "value.includes('has reference images and saved embeds')")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
    finally:
        app.state.engine.close()
    assert Image.open(tmp_path / "page.png").size[0] == 1400


def test_pickers_write_the_prompt_syntax():
    assert add_network("a cat", "lora", "toy-striped") == "a cat, <lora:toy-striped:1>"
    assert add_network("a cat,", "lora", "x") == "a cat, <lora:x:1>"
    assert add_network("", "embedding", "tistripes") == "tistripes"
    assert add_network("blurry", "embedding", None) == "blurry"
