"""The service's web page in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium).

Upload a sample photo, wait for the overlay, and compare the class the page shows with the API's
answer for the same photo; the opacity slider must change the picture; the page must fetch nothing
from outside the server. ``SCORECAM_SCREENSHOT=PATH`` also saves the screenshot there (the README's
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

                # the fast mode: 64 channels with the kernel fill, as the page says (the info line tells)
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
