"""Every form explains a transformer: the CLI, the service (V1, V2, the page), the batch job (local and Ray) and
the one-graph explainer, on a DeiT written by torch's exporter with no metadata and no layer given (the
automatic token layer: the last block's first norm, 7 x 7 grid + CLS) and on the DeiT bundle of our exporter.

Each answer must equal ``Explainer(...).explain`` on the same file (the forms are thin edges over it).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import RAY_TEST_TOKEN, require_tool
from PIL import Image
from servers import ServeProcess

pytest.importorskip("torch")
pytest.importorskip("timm")

import transformer_models as tm  # noqa: E402

from runtime import Explainer, images  # noqa: E402

# another process (the service, the batch workers) runs ONNX Runtime with its own thread count: a transformer's
# reductions (MatMul, LayerNorm, Softmax) split otherwise over threads round otherwise in float32 (~1e-6)
ATOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(cache, monkeypatch):
    monkeypatch.setenv("SCORECAM_CACHE", str(cache))


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory) -> Path:
    """DeiT (2 blocks, 112 x 112) as a user's torch.onnx.export writes it: no metadata, no layer recorded."""
    return tm.onnx_file(tm.deit(), tmp_path_factory.mktemp("vit") / "deit.onnx")


@pytest.fixture(scope="module")
def data(tmp_path_factory, samples_dir) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("chelsea.png", "rocket.jpg"):
        shutil.copy(samples_dir / name, root / name)
    return root


def test_cli_explains_with_the_automatic_token_layer(deit_file, data, tmp_path, capsys, monkeypatch, cache):
    from runtime.explain import main

    monkeypatch.setenv("SCORECAM_CACHE", str(cache))
    out = tmp_path / "out"
    assert main([str(deit_file), str(data / "chelsea.png"), "--out", str(out), "--json", "--max-channels", "16",
                 "--fill", "kernel"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    want = Explainer(deit_file, device="cpu", max_channels=16, fill="kernel").explain(data / "chelsea.png")[0]
    assert row["class_index"] == want.class_index and row["passes"] == want.passes <= 16
    np.testing.assert_allclose(np.load(row["outputs"]["saliency"]), want.saliency, atol=1e-6)
    assert main([str(deit_file), "--list-layers"]) == 0
    assert "NLC 50 tokens = 1 aux (first) + 7x7" in capsys.readouterr().out


def _page(server, photo: Path) -> int:
    """The service's page in Debian's chromium: upload ``photo``, wait for the overlay; the class shown."""
    chromium = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
    require_tool(chromium is not None, "Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_tool(False, "the playwright Python package")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector("#model option", state="attached")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#shown:not([hidden])", timeout=120_000)
            page.wait_for_function("state.heat !== null")
            assert page.inner_text("#error") == "" and errors == []
            return int(page.get_attribute("#shown-class", "data-class-index"))
        finally:
            browser.close()


def test_service_v1_v2_and_the_page(deit_file, data, cache):
    photo = data / "rocket.jpg"
    want = Explainer(deit_file, device="cpu").explain(photo, top_k=2)
    with ServeProcess(deit_file, env={"SCORECAM_CACHE": str(cache)}) as server:
        body = {"instances": [{"image": {"b64": base64.b64encode(photo.read_bytes()).decode()}, "top_k": 2}]}
        r = httpx.post(f"{server.url}/v1/models/deit:explain", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()["explanations"][0]["results"]
        assert [g["class_index"] for g in got] == [w.class_index for w in want]
        for g, w in zip(got, want, strict=True):
            sal = np.frombuffer(base64.b64decode(g["saliency"]["data"]), "<f4").reshape(g["saliency"]["shape"])
            np.testing.assert_allclose(sal, w.saliency, atol=ATOL)
        meta = httpx.get(f"{server.url}/v2/models/deit").json()
        assert "norm1" in meta["target_layer"] and meta["layout"] == "NLC 50 tokens = 1 aux (first) + 7x7"
        v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "data": [base64.b64encode(photo.read_bytes()).decode()]}]}
        out = {o["name"]: o for o in httpx.post(f"{server.url}/v2/models/deit/infer", json=v2, timeout=120)
               .json()["outputs"]}
        assert out["class_index"]["data"] == [want[0].class_index]
        np.testing.assert_allclose(np.asarray(out["saliency"]["data"], np.float32).reshape(want[0].saliency.shape),
                                   want[0].saliency, atol=ATOL)
        assert _page(server, photo) == want[0].class_index


def _batch_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    from runtime.batch import job

    return pq.read_table(out / job.RESULTS).to_pylist()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_batch_job(deit_file, data, tmp_path, capsys, monkeypatch, engine):
    from runtime.batch.cli import main

    if engine == "ray":
        require_tool(importlib.util.find_spec("ray") is not None, "ray[data] (pip install 'scorecam-onnx[ray]')")
        monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TEST_TOKEN)  # one per session: Ray keeps the first in the process
    out = tmp_path / "out"
    args = [str(deit_file), str(data), "--out", str(out), "--engine", engine, "--workers", "1", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    rows = _batch_rows(out)
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    ex = Explainer(deit_file, device="cpu")
    for r in rows:
        (w,) = ex.explain(r["source"])
        assert r["class_index"] == w.class_index
        np.testing.assert_allclose(np.load(out / r["map"]), w.saliency, atol=ATOL)


@pytest.mark.parametrize("which, flags", [("file", []), ("bundle", ["--max-channels", "24", "--fill", "zero",
                                                                          "--preset", "gradcam"])])
def test_one_graph_explainer_on_a_vit(deit_file, transformer_bundle, data, tmp_path, which, flags):
    """``python -m exporter explainer`` on a ViT: the token layer sliced and reshaped inside the graph."""
    from exporter.explainer_cli import main
    from exporter.explainer_graph import CLASS_INDEX, PIXELS

    model = deit_file if which == "file" else transformer_bundle("deit")
    out = tmp_path / "explainer.onnx"
    assert main([str(model), "--out", str(out), *flags]) == 0
    kw = {"max_channels": 24, "preset": "gradcam", "select": "std", "fill": "zero"} if flags else {}
    ex = Explainer(model, device="cpu", **kw)
    rgb = images.resize_rgb(images.load_image(data / "chelsea.png"), ex.input_size)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    sal, cls, _ = sess.run(None, {PIXELS: rgb[None], CLASS_INDEX: np.array([-1], np.int64)})
    (want,) = ex.explain_tensor(ex.pre.apply(rgb)[None])
    assert int(cls[0]) == want.class_index
    assert float(np.abs(sal[0] - want.saliency).max()) <= 1e-4
    Image.fromarray((sal[0] * 255).astype(np.uint8))  # a plain [H,W] map
