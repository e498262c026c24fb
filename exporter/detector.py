"""Export a torch object detector once into a detection bundle: ``model.onnx`` that carries its preprocessing.

>>> export_detector(model, "models/toy_detector", input_size=(64, 64))  # doctest: +SKIP

The detector must return one raw head tensor (``head="yolo8"``: [N, 4+C, A]; ``"yolo5"``: [N, A, 5+C]).
The graph is exported with a dynamic batch, stamped with the ``scorecam.task = detect`` metadata that
:mod:`runtime.detect` reads (input size, colour order, scale, mean, std, letterbox, labels, head), checked
against torch on random and real images (relative error <= 1e-4), and written atomically with an
``export.json`` report. The runtime needs no feature graph: it takes the feature maps from the detector graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from runtime.contract import MODEL_FILE, REPORT_FILE
from runtime.detect.model import detection_props

from . import __version__
from .bundle import _move_into_place, check_destination, make_preprocessing
from .errors import ExportError, first_line, root_cause
from .graphs import MIN_OPSET, _quiet
from .verify import TOLERANCE, random_images, rel_error

INPUT = "images"
OUTPUT = "output0"


def export_detector(model: nn.Module, out_dir: str | os.PathLike, input_size: tuple[int, int] = (640, 640),
                    scale: float = 1.0 / 255.0, mean: Sequence[float] = (0.0, 0.0, 0.0),
                    std: Sequence[float] = (1.0, 1.0, 1.0), color_order: str = "RGB", letterbox: bool = False,
                    labels: Sequence[str] | None = None, head: str = "yolo8", opset: int = MIN_OPSET,
                    force: bool = False, samples: np.ndarray | None = None) -> dict:
    """Export ``model`` (module doc) into ``out_dir``/model.onnx; return the export report.

    ``samples``: uint8 [N,H,W,3] photos to verify on besides random pixels (e.g. the toy's scenes)."""
    out = Path(out_dir)
    check_destination(out, force)
    pre = make_preprocessing(input_size, scale, mean, std, color_order)
    model = model.eval()
    example = torch.from_numpy(random_images(2, pre))
    try:
        with _quiet():
            program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        opset_version=int(opset), dynamo=True, external_data=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), optimize=True,
                                        verbose=False)
            proto = program.model_proto
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        cause = root_cause(e)
        raise ExportError(f"torch could not export the detector: {type(cause).__name__}: {first_line(cause)}") \
            from None
    proto.producer_name = "scorecam-exporter"
    for k, v in detection_props(pre, letterbox, labels, head).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    batches = [("random", random_images(2, pre))]
    if samples is not None and len(samples):
        batches.append(("samples", np.stack([pre.apply(s) for s in samples])))
        batches.append(("samples[0]", batches[-1][1][:1]))
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    checks = []
    for name, x in batches:
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = sess.run(None, {INPUT: x})[0]
        err = rel_error(got, want)
        checks.append({"inputs": name, "batch": len(x), "output_rel_error": err})
        if not err <= TOLERANCE:
            raise ExportError(f"verification failed: ONNX Runtime and torch differ on the {name} inputs (relative "
                              f"error {err:.3g} > {TOLERANCE:g}); the detector was not written")
    report = {"task": "detect", "head": head, "input_size": list(pre.input_size), "letterbox": letterbox,
              "labels": list(labels) if labels else None, "versions": {"exporter": __version__, "torch":
              torch.__version__, "onnx": onnx.__version__, "opset": str(opset)},
              "verification": {"tolerance": TOLERANCE, "passed": True, "checks": checks}}
    write_detector(proto, report, out)
    return report


def write_detector(proto: onnx.ModelProto, report: dict, out: Path) -> None:
    """``out/model.onnx`` and ``out/export.json``, written into a temporary sibling folder and moved into place:
    nothing half-written is left behind (ExportError when the folder cannot be written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        onnx.save_model(proto, tmp / MODEL_FILE)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write the detector {out}: {e.strerror or e}") from None
        raise


def export_toy_detector(out_dir: str | os.PathLike, force: bool = False) -> dict:
    """The committed toy detector (:mod:`exporter.toy_detect`), exported and verified on its own scenes."""
    from . import toy_detect as td

    scenes, _ = td.make_scenes(4, seed=7)
    return export_detector(td.pretrained(), out_dir, input_size=(td.SIZE, td.SIZE), scale=td.SCALE, mean=td.MEAN,
                           std=td.STD, labels=list(td.CLASSES), head="yolo8", force=force, samples=scenes)


#: detector recipes for ``python -m exporter NAME --out DIR``
DETECTOR_RECIPES = {"toy_detector": export_toy_detector}
