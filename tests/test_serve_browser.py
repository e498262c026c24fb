"""The service's web page in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium).

Upload a sample photo, wait for the overlay, and compare the class the page shows with the API's
answer for the same photo; the opacity slider must change the picture; the "fine" toggle must ask for the
multi-layer map (3 layers) and show it, the "qRISE" toggle for mode qrise (unchecking "fine"); the page must
fetch nothing from outside the server.
``SCORECAM_SCREENSHOT=PATH`` also saves the screenshot there (the README's
docs/serve-page.png was made so).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
from conftest import require_tool
from servers import ServeProcess

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


def test_page_explains_an_uploaded_photo(lite0_bundle, samples_dir, tmp_path):
    require_tool(Path(CHROMIUM).exists() or shutil.which("chromium") is not None, "Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_tool(False, "the playwright Python package")
    photo = samples_dir / "chelsea.png"
    with ServeProcess(lite0_bundle, "--max-channels", "256") as server:
        api = httpx.post(f"{server.url}/v1/models/efficientnet_lite0:explain", timeout=120,
                         json={"instances": [{"image": {"b64": base64.b64encode(photo.read_bytes()).decode()}}]})
        assert api.status_code == 200, api.text
        want = api.json()["explanations"][0]["results"][0]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                         else shutil.which("chromium"), args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                requested: list[str] = []
                page.on("request", lambda r: requested.append(r.url))
                bodies: list[dict] = []
                page.on("request", lambda r: bodies.append(r.post_data_json) if ":explain" in r.url else None)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(server.url + "/")
                page.wait_for_selector("#model option", state="attached")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#shown:not([hidden])", timeout=120_000)
                page.wait_for_function("state.heat !== null")

                shown = int(page.get_attribute("#shown-class", "data-class-index"))
                assert shown == want["class_index"]
                assert want["label"] in page.inner_text("#shown-class")
                assert page.input_value("#target") == str(want["class_index"])  # the top-1 class, pre-selected
                assert "CPUExecutionProvider" in page.inner_text("#info")
                assert len(page.query_selector_all("#probs li")) == 5
                assert page.inner_text("#error") == ""

                def canvas_sum() -> int:
                    return page.evaluate("""() => { const c = document.getElementById('view');
                        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + 3 * d[i + 2]; return s; }""")

                page.fill("#opacity", "0")
                page.dispatch_event("#opacity", "input")
                plain = canvas_sum()
                page.fill("#opacity", "60")
                page.dispatch_event("#opacity", "input")
                assert canvas_sum() != plain  # the heat map is drawn over the photo, by the slider's amount
                assert not page.is_checked("#fine") and bodies[-1]["parameters"]["layers"] == 1
                before = canvas_sum()

                page.check("#fine")  # multi-layer Score-CAM: the request asks for 3 layers, the page shows it
                page.wait_for_function("document.getElementById('info').textContent.includes('3 layers')",
                                       timeout=120_000)
                assert bodies[-1]["parameters"]["layers"] == 3 and page.inner_text("#error") == ""
                assert canvas_sum() != before

                page.check("#qrise")  # qRISE: mode qrise on one layer; "fine" is unchecked by it
                page.wait_for_function("document.getElementById('info').textContent.includes('qRISE')",
                                       timeout=120_000)
                assert bodies[-1]["parameters"]["mode"] == "qrise" and bodies[-1]["parameters"]["layers"] == 1
                assert not page.is_checked("#fine") and page.inner_text("#error") == ""
                page.uncheck("#qrise")

                # the fast mode: 64 channels with the kernel fill, as the page says (the info line tells)
                page.uncheck("#fine")  # one layer again: the info line counts the target layer's masks
                page.check("#fast")
                page.wait_for_function("""() => /(\\d+) masks scored \\(cover \\+ kernel fill\\)/.test(
                    document.getElementById('info').textContent) && Number(document.getElementById('info')
                    .textContent.match(/(\\d+) masks scored/)[1]) <= 64""", timeout=120_000)
                assert "kernel fill" in page.inner_text("label.check")
                page.uncheck("#fast")  # back to the server's default (--max-channels 256: kernel fill too)
                page.wait_for_function("""() => { const m = document.getElementById('info').textContent
                    .match(/(\\d+) masks scored/); return m && Number(m[1]) > 64; }""", timeout=120_000)

                shot = tmp_path / "serve-page.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get("SCORECAM_SCREENSHOT"):
                    shutil.copyfile(shot, os.environ["SCORECAM_SCREENSHOT"])
            finally:
                browser.close()
        assert errors == []
        outside = [u for u in requested if not u.startswith((server.url, "data:", "blob:"))]
        assert outside == []  # nothing from a CDN


def test_page_explains_a_detection_and_a_drawn_box(toy_detector, toy_scenes, tmp_path):
    """A detector on the page: its detections are listed (the best one explained first), then a box dragged on the
    photo and a typed class are explained; the page shows what the API answers."""
    require_tool(Path(CHROMIUM).exists() or shutil.which("chromium") is not None, "Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_tool(False, "the playwright Python package")
    from PIL import Image

    images, objects = toy_scenes
    i = next(i for i, o in enumerate(objects) if len(o) == 2)
    photo = tmp_path / "scene.png"
    Image.fromarray(images[i]).resize((256, 256), Image.NEAREST).save(photo)  # big enough to drag on
    with ServeProcess(toy_detector, "--device", "cpu") as server:
        data = base64.b64encode(photo.read_bytes()).decode()
        dets = httpx.post(f"{server.url}/v1/models/toy_detector:predict", timeout=120,
                          json={"instances": [{"image": {"b64": data}}]}).json()["predictions"][0]
        assert len(dets) == 2
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                         else shutil.which("chromium"), args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(server.url + "/")
                page.wait_for_selector("#model option", state="attached")
                assert not page.is_hidden("#detect-hint") and page.inner_text("#target-label") == "Detection"
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#shown:not([hidden])", timeout=120_000)
                assert dets[0]["label"] in page.inner_text("#shown-class")
                assert len(page.query_selector_all("#target option")) == 2
                assert len(page.query_selector_all("#probs li")) == 2
                # drag a box around an object (its 64-px scene box -> canvas pixels), type its class, Enter
                cls, (x0, y0, x1, y1) = objects[i][1]
                r = page.eval_on_selector("#view", "c => { const r = c.getBoundingClientRect(); "
                                                   "return [r.left, r.top, r.width / 64]; }")
                page.mouse.move(r[0] + x0 * r[2], r[1] + y0 * r[2])
                page.mouse.down()
                page.mouse.move(r[0] + x1 * r[2], r[1] + y1 * r[2], steps=5)
                page.mouse.up()
                page.fill("#label", ["square", "ring", "cross"][cls])
                page.wait_for_function("state.box !== null")
                page.press("#label", "Enter")
                page.wait_for_function("document.getElementById('shown-class').textContent.includes('[')"
                                       " && !document.getElementById('go').disabled", timeout=120_000)
                page.wait_for_function(f"document.getElementById('shown-class').textContent.startsWith("
                                       f"'{['square', 'ring', 'cross'][cls]}')", timeout=120_000)
                assert page.inner_text("#error") == ""
            finally:
                browser.close()
        assert errors == []
