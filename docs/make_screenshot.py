"""Make docs/ui.png: the web UI with a realistic form, after one generation on the bundled toy model.

    .venv/bin/python docs/make_screenshot.py [OUTPUT]

Serves the app on 127.0.0.1 (a free port) as the browser test does, drives Debian's headless Chromium
(/usr/bin/chromium) with Playwright, and stops the server at the end. Nothing else is written. Emoji on
the buttons need a colour emoji font (Debian: fonts-noto-color-emoji), else they show as boxes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # server_util and the browser test's helpers

import torch  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from imprompt import toy  # noqa: E402
from imprompt.server.app import create_app  # noqa: E402
from imprompt.server.config import ServerConfig  # noqa: E402
from server_util import running  # noqa: E402
from test_server_ui import CHROMIUM, CHROMIUM_ARGS, paint, wait_value  # noqa: E402

REFERENCES = toy.toy_paths()["references"]


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill_and_generate(page) -> None:
    page.locator("#prompt textarea").fill("a striped green square on a soft gray background, flat vector art, "
                                          "clean edges")
    page.locator("#negative_prompt textarea").fill("blurry, lowres, jpeg artifacts, text, watermark")
    # Unit 1: the style of two references, everywhere.
    page.locator("#unit0_refs input[type=file]").set_input_files(
        [str(REFERENCES / "striped-green-square-on-gray.png"), str(REFERENCES / "striped-yellow-cross-on-green.png")])
    page.locator("#unit0_weight input[type=number]").fill("0.8")
    pick(page, "#unit0_layers", "style")
    # Unit 2: a composition reference, only in the painted region.
    page.get_by_text("IP-Adapter unit 2", exact=True).click()
    page.locator("#unit1_enabled input").check()
    page.locator("#unit1_refs input[type=file]").set_input_files(str(REFERENCES / "outline-green-circle-on-white.png"))
    pick(page, "#unit1_layers", "composition")
    paint(page, "#unit1_mask")
    pick(page, "#sampler", "DPM++ 2M Karras")
    page.locator("#steps input[type=number]").fill("12")
    page.locator("#num_images input[type=number]").fill("2")
    page.locator("#seed input").fill("1234")
    page.locator("#generate").click()
    wait_value(page, "#status", "value.includes('done: 2 image(s)')")
    page.locator("#gallery img").nth(1).wait_for()
    page.wait_for_timeout(500)  # the gallery's images finish loading


def main(output: Path) -> None:
    if not Path(CHROMIUM).exists():
        sys.exit(f"make_screenshot: {CHROMIUM} is missing; install Debian's chromium (apt-get install chromium)")
    torch.set_flush_denormal(True)
    app = create_app(ServerConfig())
    try:
        with running(app) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            fill_and_generate(page)
            page.screenshot(path=str(output), full_page=True)
            browser.close()
    finally:
        app.state.engine.close()
    print(f"wrote {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "ui.png")
