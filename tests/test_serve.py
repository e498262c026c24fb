"""The explain service, end to end: a real ``python -m runtime.serve`` on a free loopback port.

Every route, the three saliency encodings, the raw-image/PNG path and the V2 tensors are compared
with ``Explainer(...).explain(...)`` in this process; every error status is provoked and the server
must still answer afterwards; then the load and fault behaviour: deadline (504, less work than a full
explanation), full queue (429 + Retry-After), a client that leaves, SIGTERM during a request.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from bundles import bomb_png, make_bundle, photo
from PIL import Image
from servers import ROOT, ServeProcess

from runtime import Explainer, images
from runtime.serve.protocol import decode_saliency

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder of two tiny bundles (one model per subfolder) and a slow one (512 channels at 160x160)."""
    root = tmp_path_factory.mktemp("serve")
    make_bundle(root / "zoo" / "fruit", seed=0)
    make_bundle(root / "zoo" / "fruit2", seed=1, size=40)
    make_bundle(root / "slow", size=160, channels=512)
    return root


@pytest.fixture(scope="module")
def server(models):
    # KServe's own flags, plus one this server does not know: it must start anyway
    with ServeProcess(models / "zoo", "--predictor_host", "predictor.default:80", "--enable_docs_url", "true",
                      "--max-body-mb", "1", "--max-pixels", "200000", "--max-instances", "3") as s:
        yield s


@pytest.fixture(scope="module")
def fruit(models):
    return Explainer(models / "zoo" / "fruit")


PHOTO = photo(48, 64, seed=1)
PHOTO_PNG = png_bytes(PHOTO)


def explain_json(server, model="fruit", instances=None, parameters=None, **kw):
    body = {"instances": instances if instances is not None else [{"image": {"b64": b64(PHOTO_PNG)}, "top_k": 2}]}
    if parameters is not None:
        body["parameters"] = parameters
    return httpx.post(f"{server.url}/v1/models/{model}:explain", json=body, timeout=60, **kw)


# ------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("encoding", ["b64", "list", "png16"])
def test_explain_equals_the_api(server, fruit, encoding):
    r = explain_json(server, parameters={"saliency_encoding": encoding})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "fruit"
    [exp] = body["explanations"]
    assert exp["image_size"] == [48, 64]
    want = fruit.explain(PHOTO, top_k=2)
    assert [x["class_index"] for x in exp["results"]] == [w.class_index for w in want]
    for got, w in zip(exp["results"], want, strict=True):
        assert got["label"] == w.label and got["preset"] == "paper" and got["provider"] == w.provider
        assert got["probability"] == pytest.approx(w.probability, abs=1e-6)
        assert got["score"] == pytest.approx(w.score, abs=1e-5)
        assert (got["channels_used"], got["channels_skipped"]) == (w.channels_used, w.channels_skipped)
        assert got["seconds"] >= 0 and "overlay" not in got
        sal = got["saliency"]
        assert sal["shape"] == [32, 32] and sal["dtype"] == "float32" and sal["encoding"] == encoding
        tol = 1e-6 if encoding != "png16" else 0.5 / 65535 + 1e-7
        np.testing.assert_allclose(decode_saliency(sal), w.saliency, atol=tol, rtol=0)


def test_b64_is_float32_little_endian_row_major(server, fruit):
    sal = explain_json(server).json()["explanations"][0]["results"][0]["saliency"]
    raw = np.frombuffer(base64.b64decode(sal["data"]), dtype="<f4").reshape(32, 32)
    np.testing.assert_allclose(raw, fruit.explain(PHOTO)[0].saliency, atol=1e-6, rtol=0)


def test_targets_preset_max_channels_and_overlay(server, models):
    inst = [{"image": {"b64": b64(PHOTO_PNG)}, "targets": [4, "banana"]},
            {"image": {"b64": b64(png_bytes(photo(20, 30, seed=2)))}, "top_k": 1}]
    r = explain_json(server, instances=inst, parameters={"preset": "gradcam", "max_channels": 5, "overlay": True})
    assert r.status_code == 200, r.text
    first, second = r.json()["explanations"]
    want = Explainer(models / "zoo" / "fruit", preset="gradcam", max_channels=5).explain(PHOTO, targets=[4, "banana"])
    assert [x["class_index"] for x in first["results"]] == [4, 1]
    for got, w in zip(first["results"], want, strict=True):
        # max_channels alone: the kernel fill, on the server as in the API
        assert got["preset"] == "gradcam" and (got["select"], got["fill"]) == ("cover", "kernel") and got["passes"] <= 5
        assert (got["passes"], got["channels_used"]) == (w.passes, w.channels_used)
        np.testing.assert_allclose(decode_saliency(got["saliency"]), w.saliency, atol=1e-6, rtol=0)
        assert got["overlay"]["format"] == "png"  # the same map bit for bit (as below), so the same PNG
        np.testing.assert_array_equal(decode_png(base64.b64decode(got["overlay"]["b64"])),
                                      images.overlay(PHOTO, w.saliency, 0.5))
    assert second["image_size"] == [20, 30] and len(second["results"]) == 1
    # the server's defaults are untouched by a request's variant
    again = explain_json(server).json()["explanations"][0]["results"][0]
    assert again["preset"] == "paper" and again["channels_used"] == 16


def test_select_mode_and_fill_pass_through_to_the_explainer(server, models):
    bundle = models / "zoo" / "fruit"
    for params, kw in (({"max_channels": 5, "select": "std"}, {"max_channels": 5, "select": "std"}),
                       ({"max_channels": 5, "fill": "zero"}, {"max_channels": 5, "fill": "zero"}),
                       ({"max_channels": 5, "select": "relevance", "fill": "preview"},
                        {"max_channels": 5, "select": "relevance", "fill": "preview"}),
                       ({"mode": "preview"}, {"mode": "preview"}), ({"mode": "qrise"}, {"mode": "qrise"}),
                       ({"mode": "qrise-check"}, {"mode": "qrise-check"})):
        r = explain_json(server, parameters=params)
        assert r.status_code == 200, r.text
        got = r.json()["explanations"][0]["results"]
        want = Explainer(bundle, **kw).explain(PHOTO, top_k=2)
        for g, w in zip(got, want, strict=True):
            assert (g["class_index"], g["mode"], g["select"], g["fill"], g["passes"]) == \
                (w.class_index, w.mode, w.select, w.fill, w.passes)
            np.testing.assert_allclose(decode_saliency(g["saliency"]), w.saliency, atol=1e-6, rtol=0)
    bad = explain_json(server, parameters={"select": "loudest"})
    assert bad.status_code == 422 and "select must be one of" in bad.json()["error"]
    assert explain_json(server).json()["explanations"][0]["results"][0]["mode"] == "scorecam"


def test_raw_image_body_answers_json_or_the_png_itself(server, fruit):
    url = f"{server.url}/v1/models/fruit:explain"
    want = fruit.explain(PHOTO, targets=["cherry"])[0]
    r = httpx.post(url, content=PHOTO_PNG, params={"targets": "cherry"}, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    got = r.json()["explanations"][0]["results"][0]
    assert got["class_index"] == want.class_index
    np.testing.assert_allclose(decode_saliency(got["saliency"]), want.saliency, atol=1e-6, rtol=0)

    r = httpx.post(url, content=PHOTO_PNG, params={"targets": "cherry", "alpha": "0.3"},
                   headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-class-index"] == str(want.class_index) and r.headers["x-label"] == "cherry"
    # the server runs the same model with the same settings, shapes and threads on this machine: the same map bit for
    # bit, so the same PNG (by construction)
    np.testing.assert_array_equal(decode_png(r.content), images.overlay(PHOTO, want.saliency, 0.3))

    r = httpx.post(url, content=PHOTO_PNG, params={"top_k": "3", "saliency_encoding": "list"},
                   headers={"Content-Type": "image/png"})
    assert [x["class_index"] for x in r.json()["explanations"][0]["results"]] == \
        [w.class_index for w in fruit.explain(PHOTO, top_k=3)]


def test_curl_example_from_the_readme(server, tmp_path):
    src = tmp_path / "cat.png"
    src.write_bytes(PHOTO_PNG)
    out = subprocess.run(["curl", "-sf", "--data-binary", f"@{src}", "-H", "Content-Type: image/png",
                          "-H", "Accept: image/png", f"{server.url}/v1/models/fruit:explain"],
                         capture_output=True, timeout=60)
    if out.returncode == 127:
        pytest.skip("curl is not installed")
    assert out.returncode == 0 and out.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    assert decode_png(out.stdout).shape == PHOTO.shape


def test_predict_and_model_routes(server, fruit):
    r = httpx.post(f"{server.url}/v1/models/fruit:predict", json={"instances": [{"image": {"b64": b64(PHOTO_PNG)}},
                                                                              b64(PHOTO_PNG)]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = fruit.predict(PHOTO)
    assert len(preds) == 2 and preds[0] == preds[1] and len(preds[0]) == 5
    assert [p["class_index"] for p in preds[0]] == list(np.argsort(-probs, kind="stable")[:5])
    for p in preds[0]:
        assert p["probability"] == pytest.approx(probs[p["class_index"]], abs=1e-6)
        assert p["label"] == fruit.label_of(p["class_index"])
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": ["fruit", "fruit2"]}
    assert httpx.get(f"{server.url}/v1/models/fruit2").json() == {"name": "fruit2", "ready": True}


def test_v2_routes(server, fruit, models):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/fruit/ready").json() == {"name": "fruit", "ready": True}
    meta = httpx.get(f"{server.url}/v2/models/fruit2").json()
    assert meta["name"] == "fruit2" and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["saliency"] == [-1, -1, 40, 40]
    assert meta["labels"] == 5 and meta["target_layer"] == "body.3"
    assert meta["preprocessing"]["input_size"] == [40, 40] and meta["preprocessing"]["mean"] == [0.5] * 3

    second = png_bytes(photo(30, 30, seed=0))
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(PHOTO_PNG), b64(second)]}],
            "parameters": {"top_k": 3}}
    r = httpx.post(f"{server.url}/v2/models/fruit/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["saliency"]["shape"] == [2, 3, 32, 32] and out["saliency"]["datatype"] == "FP32"
    assert out["class_index"]["shape"] == [2, 3] and out["class_index"]["datatype"] == "INT64"
    sal = np.asarray(out["saliency"]["data"], np.float32).reshape(2, 3, 32, 32)
    idx = np.asarray(out["class_index"]["data"]).reshape(2, 3)
    prob = np.asarray(out["probability"]["data"]).reshape(2, 3)
    labels = np.asarray(out["label"]["data"]).reshape(2, 3)
    for n, rgb in enumerate([PHOTO, decode_png(second)]):
        for k, w in enumerate(fruit.explain(rgb, top_k=3)):
            assert idx[n, k] == w.class_index and labels[n, k] == w.label
            assert prob[n, k] == pytest.approx(w.probability, abs=1e-6)
            np.testing.assert_allclose(sal[n, k], w.saliency, atol=1e-6, rtol=0)
    body["parameters"] = {"targets": ["date", 0]}
    out = {o["name"]: o for o in httpx.post(f"{server.url}/v2/models/fruit/infer", json=body).json()["outputs"]}
    assert out["class_index"]["data"] == [3, 0, 3, 0]


def test_metrics_and_the_page(server):
    explain_json(server)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("scorecam_requests_total", "scorecam_explanation_seconds_bucket", "scorecam_queue_depth",
                 "scorecam_in_flight", "scorecam_model_load_seconds", "scorecam_scored_chunks_total"):
        assert name in text
    assert 'route="/v1/models/{name}:explain",status="200"' in text
    assert server.metric("scorecam_model_load_seconds", model="fruit") > 0
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("app.js", "style.css"):
        assert f"/static/{asset}" in page.text
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


# ------------------------------------------------------------------------------------------- errors


def _bad_requests(models):
    url = "/v1/models/fruit:explain"
    img = {"image": {"b64": b64(PHOTO_PNG)}}
    truncated = b64(PHOTO_PNG[: len(PHOTO_PNG) // 2])
    bomb = b64(bomb_png(models / "bomb.png").read_bytes())
    return [
        (400, url, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        (400, url, {"content": b"", "headers": {"Content-Type": "application/json"}}),
        (400, url, {"json": [1, 2]}),
        (400, url, {"json": {"instances": "x"}}),
        (400, url, {"json": {"instances": [{"image": {"b64": "not base64!"}}]}}),
        (400, url, {"json": {"instances": [{"image": {"b64": b64(b"hello, not an image")}}]}}),
        (400, url, {"content": b"hello", "headers": {"Content-Type": "image/jpeg"}}),
        (400, url, {"json": {"instances": [{"image": {"b64": truncated}}]}}),
        (400, "/v2/models/fruit/infer", {"json": {"inputs": [{"name": "x", "data": []}]}}),
        (404, "/v1/models/nope:explain", {"json": {"instances": [img]}}),
        (404, "/v2/models/nope/infer", {"json": {}}),
        (413, url, {"content": b"x" * (1 << 20 | 1), "headers": {"Content-Type": "image/png"}}),
        (413, url, {"json": {"instances": [{"image": {"b64": bomb}}]}}),
        (413, url, {"json": {"instances": [{"image": {"b64": b64(png_bytes(photo(500, 500)))}}]}}),
        (413, url, {"json": {"instances": [img] * 4}}),
        (422, url, {"json": {"instances": [{**img, "targets": ["kiwi"]}]}}),
        (422, url, {"json": {"instances": [{**img, "targets": [99]}]}}),
        (422, url, {"json": {"instances": [{**img, "top_k": 0}]}}),
        (422, url, {"json": {"instances": [img], "parameters": {"saliency_encoding": "jpeg"}}}),
        (422, url, {"json": {"instances": [img], "parameters": {"preset": "nope"}}}),
        (422, url, {"json": {"instances": [img], "parameters": {"max_channels": -3}}}),
        (422, url, {"content": PHOTO_PNG, "headers": {"Content-Type": "image/png"}, "params": {"top_k": "many"}}),
        (422, "/v2/models/fruit/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES",
                                                              "data": [b64(PHOTO_PNG)]}],
                                                  "parameters": {"targets": ["kiwi"]}}}),
    ]


def test_every_error_is_json_with_its_status_and_the_server_survives(server, models):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for status, url, kw in _bad_requests(models):
            r = c.post(url, **kw)
            assert r.status_code == status, (url, kw.get("json"), r.status_code, r.text)
            body = r.json()
            assert list(body) == ["error"] and body["error"], body
            assert "Traceback" not in r.text and "\n" not in body["error"]
            assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/nowhere").json() == {"error": "no route GET /nowhere"}
        assert c.delete("/v1/models/fruit").status_code == 405
        assert explain_json(server).status_code == 200
    assert "Traceback" not in server.log


def test_not_ready_answers_503_while_models_load_and_a_request_waits_for_the_load(models):
    """In-process uvicorn with a loader that waits: liveness 200, readiness 503; an explain request (and the
    page's model list) waits for the load within ``--timeout`` (503 "still loading" past it), then answers 200
    once the models are in."""
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from runtime.serve.app import ServeConfig, create_app
    from runtime.serve.models import find_models, load_models

    gate = threading.Event()

    def loader():
        gate.wait(30)
        return load_models(find_models([str(models / "zoo" / "fruit")]), {}, {}, log=lambda m: None)

    from servers import free_port

    port = free_port()
    app = create_app(ServeConfig(models=[str(models / "zoo" / "fruit")], timeout=3.0), loader=loader)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def explain() -> httpx.Response:
        return httpx.post(url + "/v1/models/fruit:explain", json={"instances": [b64(PHOTO_PNG)]}, timeout=60)

    try:
        for _ in range(200):
            try:
                httpx.get(url + "/v2/health/live")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert httpx.get(url + "/v2/health/live").status_code == 200
        assert httpx.get(url + "/v2/health/ready").status_code == 503
        t0 = time.monotonic()
        r = explain()
        assert r.status_code == 503 and "still loading" in r.json()["error"], r.text
        assert time.monotonic() - t0 >= 2.5  # it waited for the load, up to the timeout
        assert httpx.get(url + "/v2/health/ready").status_code == 503
        with ThreadPoolExecutor(3) as pool:
            pending = pool.submit(explain)
            page = pool.submit(httpx.get, url + "/ui/models", timeout=60)  # the page opened early
            v1 = pool.submit(httpx.get, url + "/v1/models", timeout=60)
            time.sleep(0.5)
            assert not pending.done() and not page.done() and not v1.done()
            gate.set()
            r = pending.result(60)
            listed = page.result(60)
            models_v1 = v1.result(60)
        assert r.status_code == 200, r.text
        assert listed.status_code == 200 and [m["name"] for m in listed.json()["models"]] == ["fruit"], listed.text
        assert models_v1.json() == {"models": ["fruit"]}
        assert httpx.get(url + "/v2/health/ready").status_code == 200
        assert explain().status_code == 200
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(30)


# ------------------------------------------------------------------------------- load and faults

SLOW_PHOTO = png_bytes(photo(64, 64, seed=0))


def _raw_request(port: int, path: str, body: bytes) -> socket.socket:
    """Send a JSON POST on a raw socket (so the test can hang up without reading the answer)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def _slow_body(**params) -> bytes:
    return json.dumps({"instances": [{"image": {"b64": b64(SLOW_PHOTO)}}], "parameters": params}).encode()


def _full_chunks(bundle) -> int:
    """Chunks a full explanation of SLOW_PHOTO scores at batch size 1: one per varying channel, plus the
    one all-zero mask shared by the constant channels."""
    from runtime.scorecam import constant_channels

    ex = Explainer(bundle, batch_size=1)
    acts = ex.engine.activations(images.preprocess(decode_png(SLOW_PHOTO), ex.pre))
    constant = constant_channels(acts)
    return int((~constant).sum()) + int(constant.any())


def test_timeout_answers_504_and_stops_the_work(models):
    """512 masks, one per chunk: far more than 1 s of work. The deadline stops it mid-way."""
    with ServeProcess(models / "slow", "--batch-size", "1", "--timeout", "1") as s:
        r = httpx.post(f"{s.url}/v1/models/slow:explain", content=_slow_body(), timeout=60,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 504, r.text
        assert "timeout" in r.json()["error"]
        s.wait_metric("scorecam_in_flight", lambda v: v == 0)  # the worker stopped at its next chunk
        chunks = s.metric("scorecam_scored_chunks_total", model="slow")
        assert 0 < chunks < _full_chunks(models / "slow")  # less work than a full explanation
        time.sleep(0.5)
        assert s.metric("scorecam_scored_chunks_total", model="slow") == chunks  # nothing ran on
        assert s.metric("scorecam_cancelled_total", reason="timeout") == 1
        assert httpx.get(s.url + "/v2/health/ready").status_code == 200


def test_full_queue_429_disconnects_cancel_and_health_stays_responsive(models):
    with ServeProcess(models / "slow", "--batch-size", "1", "--max-concurrency", "1", "--queue-size", "1",
                      "--timeout", "60") as s:
        path = "/v1/models/slow:explain"
        running = _raw_request(s.port, path, _slow_body())
        s.wait_metric("scorecam_in_flight", lambda v: v == 1)
        # explanations run off the event loop: health, metrics and the page answer while one runs
        assert httpx.get(s.url + "/v2/health/live", timeout=5).status_code == 200
        assert httpx.get(s.url + "/", timeout=5).status_code == 200
        queued = _raw_request(s.port, path, _slow_body())
        s.wait_metric("scorecam_queue_depth", lambda v: v == 1)
        r = httpx.post(s.url + path, content=_slow_body(), headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 429 and "busy" in r.json()["error"]
        assert int(r.headers["Retry-After"]) >= 1
        assert s.metric("scorecam_in_flight") == 1  # the refused request took no worker

        queued.close()  # a client that leaves: its queued work is dropped...
        s.wait_metric("scorecam_queue_depth", lambda v: v == 0)
        running.close()  # ...and its running work stops at the next chunk
        s.wait_metric("scorecam_in_flight", lambda v: v == 0, timeout=20)
        assert s.metric("scorecam_cancelled_total", reason="disconnected") == 2
        assert s.metric("scorecam_scored_chunks_total", model="slow") < 512
        ok = httpx.post(s.url + path, content=_slow_body(max_channels=4), timeout=60,
                        headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_sigterm_during_a_request_finishes_it_and_exits_0(models):
    s = ServeProcess(models / "slow", "--batch-size", "1", "--timeout", "60")
    try:
        result: dict = {}

        def call():
            result["r"] = httpx.post(f"{s.url}/v1/models/slow:explain", content=_slow_body(max_channels=64),
                                     headers={"Content-Type": "application/json"}, timeout=120)

        t = threading.Thread(target=call)
        t.start()
        s.wait_metric("scorecam_in_flight", lambda v: v == 1)
        s.terminate()
        t.join(120)
        code = s.proc.wait(60)
    finally:
        log = s.log
        s.stop()
    r = result["r"]
    assert r.status_code == 200, r.text
    res = r.json()["explanations"][0]["results"][0]  # finished with its own settings: 64 channels, kernel fill
    assert (res["select"], res["fill"]) == ("cover", "kernel") and 0 < res["passes"] <= 64
    assert code == 0, log


# ------------------------------------------------------------------------------------------- the CLI


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "runtime.serve", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_help_and_bad_models(models, tmp_path):
    h = _cli("--help")
    assert h.returncode == 0 and "--max-concurrency" in h.stdout and "--predictor_host" in h.stdout
    for args, text in [((tmp_path / "missing",), "model not found"),
                       ((tmp_path,), "neither a bundle"),
                       ((models / "zoo", "--model_name", "x"), "names ONE model"),
                       ((models / "slow", "--timeout", "0"), "--timeout")]:
        out = _cli(*args)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and text in lines[-1], out.stderr
        assert "Traceback" not in out.stderr
    with socket.socket() as taken:  # the port is in use: one line, exit 2, no abort from a half-built session
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = _cli(models / "zoo", "--port", taken.getsockname()[1])
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: cannot listen"), out.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"not onnx")
    (bad / "features.onnx").write_bytes(b"not onnx")
    out = _cli(bad, "--port", "0")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr


def test_workers_processes_serve_and_stop_on_sigterm(models):
    """``--workers 2``: uvicorn worker processes, each loading the model once; SIGTERM -> exit 0. The readiness
    probe answers from whichever process it reaches: a request that reaches the other one while it still
    loads waits for its load (no 503)."""
    s = ServeProcess(models / "zoo" / "fruit", "--workers", "2")
    try:
        for _ in range(4):
            r = explain_json(s)
            assert r.status_code == 200, r.text
        assert httpx.get(s.url + "/v1/models").json() == {"models": ["fruit"]}
        s.terminate()
        code = s.proc.wait(60)
    finally:
        log = s.log
        s.stop()
    assert code == 0, log
    assert log.count("loaded model 'fruit'") == 2, log
