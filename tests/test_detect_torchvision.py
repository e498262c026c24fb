"""torchvision's two-stage and anchor-based detectors (random weights: ``weights=None, weights_backbone=None``, small
inputs) exported by ``exporter.torchvision_detect`` and explained for a given box: Faster R-CNN without NMS in the
graph (every region's softmax vector, background column 0) and RetinaNet with NMS (boxes, scores, labels)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from runtime.detect import DetectionExplainer
from runtime.explain import main as explain_main

torch = pytest.importorskip("torch")
detection = pytest.importorskip("torchvision.models.detection")


def _export(tmp_path_factory, name: str, build, size: int, nms: bool):
    from exporter.torchvision_detect import export_torchvision_detector

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    out = tmp_path_factory.mktemp(name) / name
    report = export_torchvision_detector(model, out, (size, size), nms=nms)
    return out, report


@pytest.fixture(scope="module")
def faster_rcnn(tmp_path_factory):
    """Faster R-CNN (MobileNetV3-Large FPN, 320x320), every region before the score threshold and NMS."""
    return _export(tmp_path_factory, "frcnn", lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=320), 320, nms=False)


@pytest.fixture(scope="module")
def retinanet(tmp_path_factory):
    """RetinaNet (ResNet-50 FPN, 160x160) with its NMS in the graph; score threshold 0 (random weights score
    ~0.01) so that it keeps detections."""
    def build():
        m = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=160, max_size=160)
        m.score_thresh = 0.0
        return m

    return _export(tmp_path_factory, "retinanet", build, 160, nms=True)


def test_faster_rcnn_without_nms_explains_a_given_box(faster_rcnn, samples_dir, tmp_path, capsys):
    path, report = faster_rcnn
    assert report["family"] == "rcnn" and report["background"] and not report["nms_in_graph"]
    assert all(c["rel_error"] <= 1e-4 for c in report["verification"]["checks"])
    ex = DetectionExplainer(path, device="cpu", max_channels=16, score_threshold=0.0)
    det = ex.detector
    assert det.head.kind == "boxes" and det.head.background and not det.head.nms_in_graph and det.wrap_3d
    assert det.head.num_classes == 91 and det.input_size == (320, 320) and not det.letterbox
    # the levels are the FPN maps the regions are pooled from (RoiAlign), not the RPN's convolutions
    assert det.neck and all("/fpn/" in lv.name for lv in det.neck)
    r = ex.explain(samples_dir / "coffee.png", box=[100, 80, 400, 300], target=1)[0]
    assert r.fill == "kernel" and r.passes == 16 and 0 < r.similarity < 1
    assert not r.flat and np.isfinite(r.saliency).all() and r.saliency.max() == pytest.approx(1.0)
    out = tmp_path / "out"
    assert explain_main([str(path), str(samples_dir / "coffee.png"), "--box", "100", "80", "400", "300",
                         "--target", "1", "--max-channels", "8", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["box"] == [100, 80, 400, 300] and rec["class_index"] == 1 and rec["layers"][0].startswith("/backbone")
    assert np.load(out / "coffee.box.npy").shape[0] > 0
    assert explain_main([str(path), str(samples_dir / "coffee.png"), "--box", "100", "80", "700", "300",
                         "--target", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "outside the image" in capsys.readouterr().err


def test_retinanet_with_nms_explains_its_detection_and_a_box(retinanet, samples_dir):
    path, report = retinanet
    assert report["nms_in_graph"] and all(c["agree"] for c in report["verification"]["checks"])
    ex = DetectionExplainer(path, device="cpu", max_channels=8, score_threshold=0.0)
    det = ex.detector
    assert det.head.kind == "boxes" and det.head.nms_in_graph and det.input_size == (160, 160)
    fpn = [lv.stride for lv in det.neck if "/fpn/" in lv.name]
    assert fpn[:3] == [8, 16, 32] and len(fpn) == 5 and fpn == sorted(fpn)  # P3..P7 (P6, P7: 3x3 and 2x2 here)
    photo = samples_dir / "coffee.png"
    dets = ex.detect(photo)
    assert dets and dets[0].score > 0
    r = ex.explain(photo, detection=0)[0]
    assert r.detection == 0 and r.similarity == pytest.approx(1.0) and np.isfinite(r.saliency).all()
    assert not r.flat and r.note is None and r.saliency.max() == pytest.approx(1.0) and "/fpn/" in r.layers[0]
    # a box of a class the model never outputs: after NMS only a label and a score are left, so no masked image
    # is similar to it; the map is blank and says so
    other = next(c for c in range(1, 91) if c not in {d.class_index for d in dets})
    r = ex.explain(photo, box=[float(v) for v in dets[0].box], target=other)[0]
    assert r.similarity == 0 and r.flat and r.saliency.max() == 0 and r.note
