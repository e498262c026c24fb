"""Export a torchvision object detector (SSD / SSDlite, RetinaNet, FCOS, Faster R-CNN) once, with or without NMS in
the graph, into a detector file that carries its preprocessing (:mod:`runtime.detect` reads it with no flags).

>>> export_torchvision_detector(model, "models/retinanet", input_size=(512, 512), nms=False)  # doctest: +SKIP

The graph takes one image ``[3, H, W]`` (RGB, pixel / 255: torchvision's detectors normalise and resize inside
their own ``transform``, so the metadata says scale 1/255, mean 0, std 1, stretched to H x W) and returns, in the
input's pixels:

- ``nms=True``: the model's own output, ``boxes [D,4]``, ``scores [D]``, ``labels [D]`` (after its score threshold
  and NMS; set ``model.score_thresh`` / ``model.box_score_thresh`` low to keep weak detections);
- ``nms=False``: every proposal before the score threshold and NMS, ``boxes [N,4]`` and its class-score vector
  ``scores [N,C]``. That is what the D-RISE similarity reads best (Petsiuk et al. 2021 use the proposals' full
  probability vectors): RetinaNet / FCOS per anchor (sigmoid scores, no background class), SSD per default box and
  Faster R-CNN per region proposal (softmax scores with the background class in column 0: recorded as
  ``background``; a Faster R-CNN proposal's box is its regression for its best foreground class). The region
  proposal network's own NMS stays: it is how Faster R-CNN chooses the regions it classifies.

The export is checked against torch on random and real images (relative error <= 1e-4 on every output) before it
is written, atomically, with an ``export.json`` report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from runtime.contract import MODEL_FILE
from runtime.detect.model import detection_props

from . import __version__
from .bundle import check_destination, make_preprocessing
from .detector import write_detector
from .errors import ExportError, first_line, root_cause
from .graphs import _quiet
from .verify import TOLERANCE, rel_error

INPUT = "images"
OPSET = 17


def family(model: nn.Module) -> str:
    """``ssd``, ``retinanet``, ``fcos`` or ``rcnn`` (Faster / Mask R-CNN's box branch); ExportError otherwise."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    for cls, name in ((SSD, "ssd"), (RetinaNet, "retinanet"), (FCOS, "fcos"), (GeneralizedRCNN, "rcnn")):
        if isinstance(model, cls):
            return name
    raise ExportError(f"{type(model).__name__} is not a torchvision detector this exporter knows (SSD, SSDlite, "
                      "RetinaNet, FCOS, Faster R-CNN)")


class WithNMS(nn.Module):
    """The model as torchvision runs it: ``[3,H,W]`` -> boxes, scores, labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model([x])[0]
        return out["boxes"], out["scores"], out["labels"]


class Proposals(nn.Module):
    """Every proposal before the score threshold and NMS: ``[3,H,W]`` -> boxes [N,4] (input pixels), scores [N,C]
    (module doc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kind = family(model)

    def forward(self, x: torch.Tensor):
        from torchvision.ops import boxes as box_ops

        m = self.model
        images, _ = m.transform([x])
        size = images.image_sizes[0]
        if self.kind == "rcnn":
            feats = m.backbone(images.tensors)
            proposals, _ = m.rpn(images, feats)
            rh = m.roi_heads
            pooled = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
            logits, regression = rh.box_predictor(pooled)
            per_class = rh.box_coder.decode(regression, proposals)  # [P, C, 4]
            scores = torch.softmax(logits, -1)
            best = scores[:, 1:].argmax(dim=1) + 1
            boxes = per_class[torch.arange(per_class.shape[0]), best]
        else:
            feats = m.backbone(images.tensors)
            feats = list(feats.values()) if isinstance(feats, dict) else [feats]
            if self.kind == "ssd":
                head = m.head(feats)
                anchors = m.anchor_generator(images, feats)
                boxes = m.box_coder.decode_single(head["bbox_regression"][0], anchors[0])
                scores = torch.softmax(head["cls_logits"][0], -1)
            else:
                head = m.head(feats)
                anchors = m.anchor_generator(images, feats)
                if self.kind == "fcos":
                    boxes = m.box_coder.decode(head["bbox_regression"][0], anchors[0])
                    scores = torch.sqrt(torch.sigmoid(head["cls_logits"][0]) * torch.sigmoid(head["bbox_ctrness"][0]))
                else:
                    boxes = m.box_coder.decode_single(head["bbox_regression"][0], anchors[0])
                    scores = torch.sigmoid(head["cls_logits"][0])
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        ratio = torch.tensor([x.shape[-1] / size[1], x.shape[-2] / size[0]] * 2, dtype=boxes.dtype)
        return boxes * ratio, scores


def nms_mismatch(got: list[np.ndarray], want: list[np.ndarray]) -> str | None:
    """Why ONNX Runtime's detections (boxes, scores, labels after NMS) are not torch's, or None when they are: the
    same count, the same scores (sorted, within :data:`TOLERANCE`), and every detection of torch whose score is not
    tied with another's paired with one of ONNX Runtime of the same label, score and box. Tied scores (an untrained
    model's: every score 1/C) leave the order in which NMS keeps boxes to float rounding, so those may differ."""
    gb, gs, gl = (np.asarray(a, np.float64) for a in got)
    wb, ws, wl = (np.asarray(a, np.float64) for a in want)
    if len(gb) != len(wb):
        return f"{len(gb)} detections against torch's {len(wb)}"
    if not len(wb):
        return None
    tol = TOLERANCE * max(1.0, float(np.abs(ws).max()))
    if np.abs(np.sort(gs) - np.sort(ws)).max() > tol:
        return "the scores differ"
    scale = TOLERANCE * max(1.0, float(np.abs(wb).max()))
    free = np.ones(len(gb), bool)
    for b, sc, lab in zip(wb, ws, wl, strict=True):
        if (np.abs(ws - sc) <= tol).sum() > 1:
            continue  # tied
        ok = free & (gl == lab) & (np.abs(gs - sc) <= tol) & (np.abs(gb - b).max(axis=1) <= scale)
        j = np.flatnonzero(ok)
        if not j.size:
            return f"torch's detection {lab:g} {np.round(b, 1).tolist()} score {sc:.4g} has no match"
        free[j[0]] = False
    return None


def export_torchvision_detector(model: nn.Module, out_dir, input_size: Sequence[int] = (320, 320), nms: bool = True,
                                labels: Sequence[str] | None = None, opset: int = OPSET, force: bool = False,
                                samples: np.ndarray | None = None) -> dict:
    """Export ``model`` (module doc) into ``out_dir``/model.onnx; return the export report.

    ``samples``: uint8 [N,H,W,3] photos at ``input_size`` to verify on besides random pixels."""
    out = Path(out_dir)
    check_destination(out, force)
    kind = family(model)
    pre = make_preprocessing(input_size, 1.0 / 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "RGB")
    h, w = pre.input_size
    model = model.eval()
    wrapper = (WithNMS(model) if nms else Proposals(model)).eval()
    names = ["boxes", "scores", "labels"] if nms else ["boxes", "scores"]
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
    path_tmp = Path(tempfile.mkdtemp(prefix=".tv-export-"))
    try:
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(wrapper, (example,), str(path_tmp / MODEL_FILE), input_names=[INPUT],
                                  output_names=names, opset_version=int(opset), dynamo=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
            cause = root_cause(e)
            raise ExportError(f"torch could not export the {kind} detector ({'with' if nms else 'without'} NMS): "
                              f"{type(cause).__name__}: {first_line(cause)}") from None
        proto = onnx.load(str(path_tmp / MODEL_FILE))
    finally:
        shutil.rmtree(path_tmp, ignore_errors=True)
    proto.producer_name = "scorecam-exporter"
    background = not nms and kind in ("ssd", "rcnn")
    for k, v in detection_props(pre, False, labels, "boxes", background).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = [("random", rng.random((2, 3, h, w), dtype=np.float32))]
    if samples is not None and len(samples):
        batches.append(("samples", np.stack([pre.apply(s) for s in samples])))
    checks = []
    for name, xs in batches:
        for i, x in enumerate(xs):
            with torch.no_grad():
                want = [t.numpy() for t in wrapper(torch.from_numpy(x))]
            got = sess.run(None, {INPUT: x})
            if nms:
                why = nms_mismatch(got, want)
                checks.append({"inputs": f"{name}[{i}]", "detections": len(want[0]), "agree": why is None})
                if why is not None:
                    raise ExportError(f"verification failed: ONNX Runtime and torch differ on the {name} inputs: "
                                      f"{why}; the detector was not written")
                continue
            for o, g, t in zip(names, got, want, strict=True):
                err = rel_error(g.astype(np.float64), t.astype(np.float64)) if g.shape == t.shape else float("inf")
                checks.append({"inputs": f"{name}[{i}]", "output": o, "shape": list(g.shape), "rel_error": err})
                if not err <= TOLERANCE:
                    raise ExportError(f"verification failed: ONNX Runtime and torch differ on output {o} for the "
                                      f"{name} inputs (shapes {list(g.shape)} and {list(t.shape)}, relative error "
                                      f"{err:.3g} > {TOLERANCE:g}); the detector was not written")
    report = {"task": "detect", "family": kind, "nms_in_graph": nms, "background": background,
              "head": "boxes", "input_size": [h, w], "letterbox": False, "labels": list(labels) if labels else None,
              "versions": {"exporter": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                           "opset": str(opset)},
              "verification": {"tolerance": TOLERANCE, "passed": True, "checks": checks}}
    write_detector(proto, report, out)
    return report
