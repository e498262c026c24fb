"""The one-graph explainer with no Python: examples/node (onnxruntime-node) and examples/web (onnxruntime-web,
wasm, in headless Chromium), each checked against ``Explainer.explain_tensor`` on the same pixels."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from PIL import Image

from exporter.explainer_graph import Options, build_explainer
from runtime import Explainer, images
from runtime.bundle import load_bundle

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
WEB_DIR = ROOT / "examples" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
CASES = [("paper", None, False), ("official", 12, True)]  # preset, max channels, explicit (second-ranked) class


def reference(bundle_dir: Path, tmp: Path, preset: str, max_channels: int | None, explicit: bool) -> dict:
    """Write the explainer, the photo at the network's size (PNG) and Python's map; return the reference."""
    bundle = load_bundle(bundle_dir)
    model = build_explainer(bundle, Options(preset, max_channels, fill="zero" if max_channels else None))
    name = f"{preset}-{max_channels or 'all'}"
    (tmp / f"{name}.onnx").write_bytes(model.SerializeToString())
    rgb = images.resize_rgb(images.load_image(ROOT / "samples" / "chelsea.png"), bundle.meta.preprocessing.input_size)
    Image.fromarray(rgb).save(tmp / "photo.png")
    ex = Explainer(bundle_dir, device="cpu", preset=preset, max_channels=max_channels, fill="zero")  # the graph's
    x = ex.pre.apply(rgb)[None]
    ranked = [int(i) for i in np.argsort(-ex.engine.classify(x)[0], kind="stable")]
    cls = ranked[1] if explicit else ranked[0]
    result = ex.explain_tensor(x, targets=cls)[0]
    result.saliency.astype("<f4").tofile(tmp / f"{name}.f32")
    ref = {"model": f"{name}.onnx", "image": "photo.png", "saliency": f"{name}.f32",
           "class_index": cls if explicit else -1, "expected_class": cls, "tolerance": 1e-4}
    (tmp / f"{name}.json").write_text(json.dumps(ref))
    return {**ref, "rgb": rgb, "want": result.saliency, "json": tmp / f"{name}.json"}


def node_ready() -> bool:
    return bool(shutil.which("node")) and (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir() \
        and (NODE_DIR / "node_modules" / "pngjs").is_dir()


@pytest.mark.parametrize("preset, max_channels, explicit", CASES)
def test_node_example_matches_python(toy_bundle, tmp_path, preset, max_channels, explicit):
    require_tool(node_ready(), "node with examples/node/node_modules (scripts/install-test-deps.sh)")
    ref = reference(toy_bundle, tmp_path, preset, max_channels, explicit)
    proc = subprocess.run(["node", "explain.mjs", "--check", str(ref["json"])], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["class_index"] == ref["expected_class"]
    assert report["max_abs_diff"] <= 1e-4


def test_node_example_writes_an_overlay(toy_bundle, tmp_path):
    require_tool(node_ready(), "node with examples/node/node_modules (scripts/install-test-deps.sh)")
    ref = reference(toy_bundle, tmp_path, "paper", None, False)
    photo = tmp_path / "big.png"
    Image.open(ROOT / "samples" / "chelsea.png").convert("RGB").save(photo)  # any size: resized in JS
    out = tmp_path / "overlay.png"
    proc = subprocess.run(["node", "explain.mjs", str(tmp_path / ref["model"]), str(photo), "--out", str(out)],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "overlay written" in proc.stdout and proc.stdout.startswith("class ")
    with Image.open(out) as im:
        assert im.size == Image.open(photo).size
    bad = subprocess.run(["node", "explain.mjs", str(tmp_path / "missing.onnx"), str(photo)], cwd=NODE_DIR,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: explainer not found")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """examples/web/ at /, the test's files at /model/."""

    model_dir: Path = Path(".")

    def translate_path(self, path: str) -> str:
        if path.startswith("/model/"):
            return str(self.model_dir / Path(path.split("?")[0]).name)
        return super().translate_path(path)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web_server(tmp_path):
    handler = type("H", (_Handler,), {"model_dir": tmp_path})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(WEB_DIR)))
    server.extensions_map = {**handler.extensions_map, ".mjs": "text/javascript", ".wasm": "application/wasm"}
    handler.extensions_map = server.extensions_map
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_web_example_in_headless_chromium(toy_bundle, tmp_path, web_server):
    require_tool(CHROMIUM.is_file(), "Debian's chromium (/usr/bin/chromium)")
    require_tool((WEB_DIR / "node_modules" / "onnxruntime-web").is_dir(),
                 "examples/web/node_modules (scripts/install-test-deps.sh)")
    playwright = pytest.importorskip("playwright.sync_api")
    refs = [reference(toy_bundle, tmp_path, *case) for case in CASES]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for ref in refs:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.goto(f"{web_server}/index.html?model=/model/{ref['model']}")
                page.wait_for_function("document.body.dataset.ready", timeout=120_000)
                assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#status")
                got = page.evaluate("""async ([rgb, cls]) => {
                    const r = await window.scorecam.explainPixels(rgb, cls);
                    return {classIndex: r.classIndex, saliency: Array.from(r.saliency)};
                }""", [ref["rgb"].reshape(-1).tolist(), ref["class_index"]])
                assert got["classIndex"] == ref["expected_class"]
                sal = np.asarray(got["saliency"], np.float32).reshape(ref["want"].shape)
                err = float(np.abs(sal - ref["want"]).max())
                assert err <= 1e-3, err
                # the page itself: pick the photo (already at the network's size), the map is drawn over it
                page.fill("#class", str(ref["class_index"]))
                page.set_input_files("#photo", str(tmp_path / "photo.png"))
                page.wait_for_function("document.body.dataset.classIndex !== undefined", timeout=120_000)
                assert int(page.evaluate("document.body.dataset.classIndex")) == ref["expected_class"]
                assert "ms in the browser" in page.inner_text("#status")
                assert errors == []
                page.close()
        finally:
            browser.close()
