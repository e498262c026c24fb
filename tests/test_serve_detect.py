"""The explain service with an object detector: a real ``python -m runtime.serve`` serving the toy detector (and a
classifier beside it), every answer compared with ``DetectionExplainer`` in this process; bad boxes, bad
detections and a task that does not fit the model are 422 JSON errors naming the cause, and the server survives.
"""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from bundles import make_bundle
from PIL import Image
from servers import ServeProcess

from runtime.detect import DetectionExplainer
from runtime.serve.protocol import decode_saliency

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CAP = 8  # the server's channel cap: every answer below is the kernel-filled fast mode


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, toy_detector):
    """A folder of two models: the toy detector and a tiny classifier."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(toy_detector, root / "shapes")
    make_bundle(root / "fruit", seed=0)
    return root


@pytest.fixture(scope="module")
def server(zoo):
    with ServeProcess(zoo, "--device", "cpu", "--max-channels", str(CAP), "--fill", "kernel") as s:
        yield s


@pytest.fixture(scope="module")
def local(zoo):
    return DetectionExplainer(zoo / "shapes", device="cpu", max_channels=CAP, fill="kernel")


@pytest.fixture(scope="module")
def scene(toy_scenes):
    images, objects = toy_scenes
    i = next(i for i, objs in enumerate(objects) if len(objs) == 2)
    return images[i], objects[i]


def explain(server, instance: dict, parameters: dict | None = None, model: str = "shapes") -> httpx.Response:
    body = {"instances": [instance]}
    if parameters is not None:
        body["parameters"] = parameters
    return httpx.post(f"{server.url}/v1/models/{model}:explain", json=body, timeout=120)


def test_detections_explained_as_the_api_does(server, local, scene):
    rgb, _ = scene
    r = explain(server, {"image": {"b64": b64(png_bytes(rgb))}, "top_k": 2}, {"overlay": True, "alpha": 0.4})
    assert r.status_code == 200, r.text
    [exp] = r.json()["explanations"]
    assert exp["task"] == "detect" and exp["image_size"] == [64, 64]
    want = local.explain(rgb, top_k=2)
    assert len(exp["results"]) == len(want) == 2
    for got, w in zip(exp["results"], want, strict=True):
        assert got["detection"] == w.detection and got["class_index"] == w.class_index and got["label"] == w.label
        assert got["box"] == pytest.approx(w.box, abs=1e-3) and got["score"] == pytest.approx(w.score, abs=1e-6)
        assert got["similarity"] == pytest.approx(w.similarity, abs=1e-6) and got["flat"] is False
        assert (got["fill"], got["passes"], got["layers"]) == ("kernel", w.passes, w.layers)
        np.testing.assert_allclose(decode_saliency(got["saliency"]), w.saliency_cropped(), atol=1e-6, rtol=0)
        overlay = decode_png(base64.b64decode(got["overlay"]["b64"]))
        np.testing.assert_array_equal(overlay, w.overlay(rgb, 0.4))  # the box is drawn on it


def test_a_given_box_and_a_chosen_detection(server, local, scene):
    rgb, objects = scene
    cls, box = objects[1]
    r = explain(server, {"image": {"b64": b64(png_bytes(rgb))}, "box": list(box), "targets": [local.labels[cls]]})
    assert r.status_code == 200, r.text
    [got] = r.json()["explanations"][0]["results"]
    [w] = local.explain(rgb, box=box, target=cls)
    assert got["detection"] is None and got["class_index"] == cls and got["box"] == pytest.approx(box)
    np.testing.assert_allclose(decode_saliency(got["saliency"]), w.saliency_cropped(), atol=1e-6, rtol=0)
    # the second detection only, exact (max_channels off for this request), as a list
    r = explain(server, {"image": {"b64": b64(png_bytes(rgb))}, "detection": [1]}, {"max_channels": "all"})
    [got] = r.json()["explanations"][0]["results"]
    [w] = DetectionExplainer(local.detector.path, device="cpu").explain(rgb, detection=1)
    assert got["detection"] == 1 and got["fill"] == "zero" and got["passes"] == w.passes
    np.testing.assert_allclose(decode_saliency(got["saliency"]), w.saliency_cropped(), atol=1e-6, rtol=0)


def test_raw_image_body_answers_the_overlay_png(server, local, scene):
    rgb, objects = scene
    cls, box = objects[0]
    r = httpx.post(f"{server.url}/v1/models/shapes:explain", content=png_bytes(rgb), timeout=120,
                   params={"box": ",".join(map(str, box)), "targets": str(cls)},
                   headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert r.status_code == 200, r.text
    [w] = local.explain(rgb, box=box, target=cls)
    np.testing.assert_array_equal(decode_png(r.content), w.overlay(rgb, 0.5))
    assert r.headers["x-class-index"] == str(cls) and r.headers["x-detection"] == ""
    assert [float(v) for v in r.headers["x-box"].split(",")] == pytest.approx(box)
    r = httpx.post(f"{server.url}/v1/models/shapes:explain?detection=0", content=png_bytes(rgb), timeout=120,
                   headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["explanations"][0]["results"][0]["detection"] == 0


def test_predict_gives_the_detections(server, local, scene):
    rgb, objects = scene
    r = httpx.post(f"{server.url}/v1/models/shapes:predict", timeout=60,
                   json={"instances": [{"image": {"b64": b64(png_bytes(rgb))}}]})
    assert r.status_code == 200, r.text
    [dets] = r.json()["predictions"]
    want = local.detect(rgb)
    assert [d["detection"] for d in dets] == list(range(len(want))) and len(want) == len(objects)
    for d, w in zip(dets, want, strict=True):
        assert (d["class_index"], d["label"]) == (w.class_index, w.label)
        assert d["box"] == pytest.approx(w.box, abs=1e-3) and d["score"] == pytest.approx(w.score, abs=1e-6)


def test_v2_infer_and_metadata(server, local, toy_scenes):
    images, objects = toy_scenes
    two = [i for i, o in enumerate(objects) if len(o) == 2][0]
    one = [i for i, o in enumerate(objects) if len(o) == 1][0]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [b64(png_bytes(images[two])), b64(png_bytes(images[one]))]}],
            "parameters": {"top_k": 2}}
    r = httpx.post(f"{server.url}/v2/models/shapes/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["image_index"]["data"] == [0, 0, 1]  # images with different numbers of boxes: one flat list
    assert out["saliency"]["shape"] == [3, 64, 64] and out["box"]["shape"] == [3, 4]
    sal = np.asarray(out["saliency"]["data"], np.float32).reshape(3, 64, 64)
    want = local.explain(images[two], top_k=2) + local.explain(images[one], top_k=2)
    for j, w in enumerate(want):
        np.testing.assert_allclose(sal[j], w.saliency, atol=1e-6, rtol=0)
        assert out["detection"]["data"][j] == w.detection and out["label"]["data"][j] == w.label
        assert out["content"]["data"][4 * j:4 * j + 4] == [0, 0, 64, 64]
    meta = httpx.get(f"{server.url}/v2/models/shapes").json()
    assert meta["task"] == "detect" and meta["head"] == "yolo8" and meta["fill"] == "kernel"
    assert {o["name"] for o in meta["outputs"]} == set(out)
    ui = {m["name"]: m["task"] for m in httpx.get(f"{server.url}/ui/models").json()["models"]}
    assert ui == {"shapes": "detect", "fruit": "classify"}


def _bad(scene) -> list[tuple[str, dict, dict | None, str]]:
    """(model, instance, parameters, part of the error) of requests refused with 422."""
    rgb, _ = scene
    img = {"b64": b64(png_bytes(rgb))}
    return [
        ("shapes", {"image": img, "box": [0, 0, 80, 20], "targets": ["ring"]}, None, "is outside the image"),
        ("shapes", {"image": img, "box": [-1, 0, 20, 20], "targets": ["ring"]}, None, "is outside the image"),
        ("shapes", {"image": img, "box": [10, 10, 10, 20], "targets": ["ring"]}, None, "is empty"),
        ("shapes", {"image": img, "box": [30, 10, 10, 20], "targets": ["ring"]}, None, "is empty"),
        ("shapes", {"image": img, "box": [10, 10, 30, 20], "targets": ["hexagon"]}, None, "unknown class label"),
        ("shapes", {"image": img, "box": [10, 10, 30, 20], "targets": [7]}, None, "out of range"),
        ("shapes", {"image": img, "box": [10, 10, 30, 20]}, None, "a box needs its class"),
        ("shapes", {"image": img, "box": [10, 10, 30, 20], "targets": [0, 1]}, None, "exactly one target"),
        ("shapes", {"image": img, "box": [10, 10, 30], "targets": [0]}, None, "four numbers"),
        ("shapes", {"image": img, "box": [10, "x", 30, 20], "targets": [0]}, None, "four finite numbers"),
        ("shapes", {"image": img, "box": [10, 10, 30, 20], "targets": [0], "detection": 0}, None, "not both"),
        ("shapes", {"image": img, "detection": 40}, None, "detection 40 does not exist"),
        ("shapes", {"image": img, "detection": -1}, None, "detection must be in"),
        ("shapes", {"image": img}, {"task": "classify"}, "it is an object detector"),
        ("shapes", {"image": img}, {"task": "segment"}, "task must be one of"),
        ("shapes", {"image": img}, {"mode": "preview"}, "does not apply to detectors"),
        ("shapes", {"image": img}, {"score_threshold": 2}, "score_threshold must be"),
        ("shapes", {"image": img}, {"score_threshold": 1.0}, "finds nothing on this image"),
        ("fruit", {"image": img}, {"task": "detect"}, "it is a classifier"),
        ("fruit", {"image": img, "box": [1, 1, 9, 9], "targets": [0]}, None, "apply to object detectors"),
        ("fruit", {"image": img, "detection": 0}, None, "apply to object detectors"),
    ]


def test_bad_boxes_and_tasks_are_422_json_and_the_server_survives(server, scene):
    for model, inst, params, why in _bad(scene):
        r = explain(server, inst, params, model)
        assert r.status_code == 422, (inst, params, r.status_code, r.text)
        body = r.json()
        assert list(body) == ["error"] and why in body["error"] and "\n" not in body["error"], (why, body)
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    bad_v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "data": [b64(png_bytes(scene[0]))]}],
              "parameters": {"box": [0, 0, 100, 100], "targets": [0]}}
    r = httpx.post(f"{server.url}/v2/models/shapes/infer", json=bad_v2, timeout=60)
    assert r.status_code == 422 and "outside the image" in r.json()["error"]
    assert explain(server, {"image": {"b64": b64(png_bytes(scene[0]))}}).status_code == 200
    assert "Traceback" not in server.log

