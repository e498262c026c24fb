"""Object detectors (runtime.detect): heads, the D-RISE similarity, the toy detector's known answer, real
exports (Ultralytics YOLOv8n, torchvision SSDlite), the CLI, D-RISE, evaluation and the fast mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from PIL import Image

from runtime.detect import DetectionExplainer
from runtime.detect.geometry import place
from runtime.detect.heads import (
    Head,
    Proposals,
    Target,
    decode_batch,
    detections,
    iou,
    similarity,
    target_of,
    with_background,
)
from runtime.explain import main as explain_main
from runtime.metrics import energy_pointing_game

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ pure numpy


def test_iou_and_similarity_by_hand():
    assert iou(np.array([0, 0, 10, 10]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])) == \
        pytest.approx([1.0, 50 / 150, 0.0])
    # v5: IoU x cos x objectness; the best proposal wins
    props = Proposals(boxes=np.array([[0, 0, 10, 10], [0, 0, 10, 10.0]]), vectors=np.array([[1.0, 0], [0.6, 0.8]]),
                      objectness=np.array([0.5, 1.0]), labels=np.array([0, 1]), scores=np.array([0.5, 0.8]))
    t = Target(np.array([0, 0, 10, 10.0]), 0, np.array([1.0, 0.0]))
    assert similarity([t], props)[0] == pytest.approx(max(0.5, 0.6))
    # without objectness, a proposal that sees nothing (all scores ~0) is not similar: the background component
    v = with_background(np.array([[0.9, 0.0], [0.001, 0.0]]))
    assert v[1, 2] == pytest.approx(0.999)
    props = Proposals(np.array([[0, 0, 10, 10.0]] * 2), v, None, np.array([0, 0]), np.array([0.9, 0.001]))
    onehot = Target(np.array([0, 0, 10, 10.0]), 0, None)
    cos = similarity([onehot], props)[0]
    assert cos == pytest.approx(0.9 / np.linalg.norm([0.9, 0, 0.1]))
    # after NMS (label + score): different label -> only the background agreement
    nms = Proposals(np.array([[0, 0, 10, 10.0]]), None, None, np.array([3]), np.array([0.8]))
    assert similarity([Target(np.array([0, 0, 10, 10.0]), 2, None)], nms)[0] == pytest.approx(0.0)
    assert similarity([Target(np.array([0, 0, 10, 10.0]), 3, None)], nms)[0] == \
        pytest.approx(0.8 / np.hypot(0.8, 0.2))


def test_decode_yolo_heads_and_nms():
    c = 3
    out = np.zeros((1, 4 + c, 3), np.float32)
    out[0, :4, 0] = [20, 20, 10, 10]
    out[0, :4, 1] = [21, 20, 10, 10]  # a duplicate of the first, lower score
    out[0, :4, 2] = [50, 50, 8, 6]
    out[0, 4:, 0] = [0.9, 0.1, 0.0]
    out[0, 4:, 1] = [0.7, 0.0, 0.0]
    out[0, 4:, 2] = [0.0, 0.0, 0.6]
    head = Head("yolo8", ("o",), c)
    props = decode_batch(head, [out])[0]
    assert props.boxes[0] == pytest.approx([15, 15, 25, 25])
    assert detections(head, props, 0.25, 0.5).tolist() == [0, 2]
    v5 = np.concatenate([out.transpose(0, 2, 1)[..., :4], np.full((1, 3, 1), 0.5, np.float32),
                         out.transpose(0, 2, 1)[..., 4:]], axis=-1)
    p5 = decode_batch(Head("yolo5", ("o",), c), [v5])[0]
    assert p5.scores == pytest.approx([0.45, 0.35, 0.3])
    assert target_of(p5, 2).class_index == 2


def test_letterbox_geometry_round_trip():
    rgb = np.zeros((300, 451, 3), np.uint8)
    out, geo = place(rgb, (320, 320), letterbox=True)
    assert out.shape == (320, 320, 3) and out[0, 0, 0] == 114  # grey padding above and below
    box = np.array([50, 40, 300, 250.0])
    assert geo.to_photo(geo.to_network(box)) == pytest.approx(box, abs=1e-9)
    top, left, h, w = geo.content
    assert left == 0 and w == 320 and top > 0


# ------------------------------------------------------------------------------------ the toy detector


@pytest.fixture(scope="module")
def toy_detector(tmp_path_factory) -> Path:
    """The committed toy detector, exported through our exporter (verified against torch)."""
    from exporter.detector import export_toy_detector

    out = tmp_path_factory.mktemp("det") / "toy_detector"
    export_toy_detector(out)
    return out


@pytest.fixture(scope="module")
def scenes():
    from exporter.toy_detect import make_scenes

    return make_scenes(16, seed=123)  # held out: training used seed 20000


def test_toy_detector_finds_the_shapes(scenes):
    from exporter.toy_detect import pretrained, recall

    images, objects = scenes
    assert recall(pretrained(), images, objects) >= 0.95


def test_toy_pointing_game_and_two_objects(toy_detector, scenes):
    """The known answer: each detection's map lies in its box (energy pointing game >= 0.9 on average) and the
    map of one object leaves the other dark."""
    images, objects = scenes
    ex = DetectionExplainer(toy_detector, device="cpu")
    inside, other = [], []
    for rgb, objs in zip(images, objects, strict=True):
        for r in ex.explain(rgb, top_k=len(objs)):
            sal = r.saliency_on_image()
            inside.append(energy_pointing_game(sal, [r.box]))
            for _, b in objs:
                if iou(np.asarray(b, float), r.box[None])[0] < 0.3:
                    other.append(energy_pointing_game(sal, [b]))
    assert len(inside) >= len(images) and len(other) >= 5
    print(f"pointing game {np.mean(inside):.3f} (min {np.min(inside):.3f}); other object {np.mean(other):.4f}")
    assert np.mean(inside) >= 0.9
    assert np.max(other) <= 0.1 and np.mean(other) <= 0.02


def test_toy_kernel_fill_and_fuse(toy_detector, scenes):
    """The fast mode (a few channels scored, the rest filled by kernel regression) stays on the box."""
    images, _ = scenes
    exact = DetectionExplainer(toy_detector, device="cpu")
    fast = DetectionExplainer(toy_detector, device="cpu", max_channels=8, fill="kernel")
    for rgb in images[:4]:
        r, f = exact.explain(rgb, detection=0)[0], fast.explain(rgb, detection=0)[0]
        assert f.fill == "kernel" and f.passes < r.passes
        assert energy_pointing_game(f.saliency, [f.box_network]) >= 0.6
        assert np.corrcoef(r.saliency.ravel(), f.saliency.ravel())[0, 1] > 0.7


def test_drise_reference_on_the_engine(toy_detector, scenes):
    from runtime.detect.evaluate import box_curves
    from runtime.methods import METHODS, parse_method

    assert METHODS["drise"].task == "detect"
    images, _ = scenes
    ex = DetectionExplainer(toy_detector, device="cpu")
    _, x, _ = ex.prepare(images[0])
    props, _ = ex.run(x)
    t = target_of(props, int(detections(ex.head, props, 0.25, 0.5)[0]))
    m, p = parse_method("drise:n=400")
    sal = m.fn(ex, x, t, **p)
    assert sal.shape == ex.input_size and np.isfinite(sal).all()
    c = box_curves(ex, x, t, sal, steps=20)
    assert c.insertion_auc > 0.5 and c.deletion_auc < c.insertion_auc


def test_cli_detector_outputs_and_bad_boxes(toy_detector, scenes, tmp_path, capsys):
    images, _ = scenes
    photo = tmp_path / "scene.png"
    Image.fromarray(images[0]).save(photo)
    out = tmp_path / "out"
    assert explain_main([str(toy_detector), str(photo), "--top-k", "2", "--out", str(out), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 1
    rec = json.loads(lines[0])
    assert rec["detection"] == 0 and len(rec["box"]) == 4 and rec["label"] in ("square", "ring", "cross")
    assert np.load(out / "scene.det0.npy").shape == (64, 64)
    assert json.loads((out / "scene.det0.json").read_text())["box"] == rec["box"]
    assert Image.open(out / "scene.det0.png").size == (64, 64)
    bad = [["--box", "0", "0", "80", "20", "--target", "ring"],  # outside the image
           ["--box", "10", "10", "10", "20", "--target", "ring"],  # empty
           ["--box", "10", "10", "30", "20", "--target", "hexagon"],  # unknown class
           ["--box", "10", "10", "30", "20", "--target", "9"],
           ["--box", "10", "10", "30", "20"],  # no class
           ["--detection", "40"]]
    for extra in bad:
        dest = tmp_path / "bad"
        assert explain_main([str(toy_detector), str(photo), "--out", str(dest), *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (extra, err)
        assert not dest.exists() or not any(dest.iterdir())
    assert explain_main([str(toy_detector), "--list-layers"]) == 0
    assert "stride 2" in capsys.readouterr().out


def test_evaluate_routes_detectors(toy_detector, scenes, tmp_path):
    from runtime.evaluate import main as evaluate_main

    images, _ = scenes
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"s{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    out = tmp_path / "ev"
    assert evaluate_main([str(toy_detector), *map(str, paths), "--methods", "scorecam", "drise:n=200", "random",
                          "--steps", "10", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| scorecam |" in text and "| drise:n=200 |" in text
    rows = (out / "boxes.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3


def test_detection_runtime_does_not_import_torch(toy_detector, scenes, tmp_path):
    photo = tmp_path / "p.png"
    Image.fromarray(scenes[0][0]).save(photo)
    code = ("import sys; from runtime.explain import main; rc = main([sys.argv[1], sys.argv[2], '--out', sys.argv[3]]);"
            "assert rc == 0; assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]")
    proc = subprocess.run([sys.executable, "-c", code, str(toy_detector), str(photo), str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------ real detectors


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def yolov8n(tmp_path_factory) -> Path:
    """Ultralytics YOLOv8n with random weights, exported by Ultralytics itself (offline: nothing downloaded)."""
    require_tool(_have("ultralytics"), "ultralytics (pip install --no-deps ultralytics)")
    out = tmp_path_factory.mktemp("yolo")
    env = dict(os.environ, YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(out / "cfg"))
    code = ("from ultralytics import YOLO; import shutil; p = YOLO('yolov8n.yaml').export(format='onnx', imgsz=256); "
            "shutil.move(p, 'yolov8n.onnx')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "yolov8n.onnx"


def test_yolov8n_explains_a_given_box(yolov8n, samples_dir, tmp_path, capsys):
    """Random weights detect nothing: a box and a class are given. The YOLO head, letterbox, labels and three
    neck levels are read from the Ultralytics export; the map is finite and not flat."""
    ex = DetectionExplainer(yolov8n, device="cpu", max_channels=16, fill="kernel")
    det = ex.detector
    assert det.head.kind == "yolo8" and det.head.num_classes == 80 and det.letterbox
    assert [lv.stride for lv in det.neck] == [8, 16, 32]
    assert det.labels is not None and len(det.labels) == 80
    photo = samples_dir / "chelsea.png"
    r = ex.explain(photo, box=[40, 30, 300, 280], target=15)[0]
    assert r.layers == [det.neck[-1].name]  # the deepest level that resolves a 250 px box
    assert np.isfinite(r.saliency).all() and 0 <= r.saliency.min() and r.saliency.max() <= 1
    assert r.saliency_on_image().shape == (300, 451) and r.passes == 16
    # random weights: the head's output hardly depends on the image (every masked image is as similar as the
    # image itself), so there is no evidence to show and the map is honestly all 0 rather than noise
    assert 0 < r.similarity < 1
    out = tmp_path / "o"
    assert explain_main([str(yolov8n), str(photo), "--box", "40", "30", "300", "280", "--target", "15",
                         "--layer", "fuse", "--max-channels", "8", "--fill", "kernel", "--out", str(out)]) == 0
    assert (out / "chelsea.box.png").is_file() and (out / "chelsea.box.json").is_file()
    assert explain_main([str(yolov8n), str(photo), "--box", "-5", "30", "300", "280", "--target", "15",
                         "--out", str(out / "bad")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: the box")


@pytest.fixture(scope="module")
def ssdlite(tmp_path_factory) -> Path:
    """torchvision SSDlite320 (random weights), exported by torch with NMS in the graph: boxes, scores, labels."""
    out = tmp_path_factory.mktemp("ssd") / "ssdlite.onnx"
    code = ("import torch, sys, warnings; warnings.simplefilter('ignore');"
            "from torchvision.models.detection import ssdlite320_mobilenet_v3_large as f;"
            "torch.manual_seed(0); m = f(weights=None, weights_backbone=None).eval();"
            "torch.onnx.export(m, ([torch.rand(3, 320, 320)],), sys.argv[1], opset_version=17, dynamo=False,"
            " input_names=['images'], output_names=['boxes', 'scores', 'labels'])")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_ssdlite_explains_a_given_box(ssdlite, samples_dir):
    ex = DetectionExplainer(ssdlite, device="cpu", max_channels=12, fill="kernel", score_threshold=0.0)
    det = ex.detector
    assert det.head.kind == "boxes" and det.head.nms_in_graph and det.wrap_3d and det.batch == 1
    assert len(det.neck) >= 3 and det.input_size == (320, 320)
    dets = ex.detect(samples_dir / "coffee.png")
    assert dets and all(d.score >= 0 for d in dets)  # random weights: every score is about 1/91
    r = ex.explain(samples_dir / "coffee.png", box=[100, 80, 300, 250], target=1)[0]
    assert np.isfinite(r.saliency).all() and 0 <= r.similarity <= 1


def test_a_detector_with_external_data_explains_as_one_file(toy_detector, scenes, tmp_path):
    """The toy detector with its weights in a data file beside it (every tensor over 16 bytes, in a
    subfolder): the same detections and maps as the one-file model; a data path escaping its folder is one line."""
    import onnx

    from runtime.contract import BundleError

    src = toy_detector / "model.onnx"
    (tmp_path / "ext" / "w").mkdir(parents=True)
    onnx.save_model(onnx.load(str(src)), str(tmp_path / "ext" / "model.onnx"), save_as_external_data=True,
                    location="w/weights.bin", size_threshold=16)
    images, _ = scenes
    one, ext = DetectionExplainer(toy_detector, device="cpu"), DetectionExplainer(tmp_path / "ext", device="cpu")
    assert ext.detector.data_dir is not None and ext.detector.sha256 != one.detector.sha256
    for a, b in zip(one.explain(images[0], top_k=2), ext.explain(images[0], top_k=2), strict=True):
        assert a.class_index == b.class_index and np.allclose(a.box, b.box, atol=1e-4)
        np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-6, rtol=0)  # one graph, same weights
    m = onnx.load(str(tmp_path / "ext" / "model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../secret.bin"
    onnx.save_model(m, str(tmp_path / "ext" / "model.onnx"))
    with pytest.raises(BundleError, match="escapes the model's folder"):
        DetectionExplainer(tmp_path / "ext", device="cpu")
