"""The export report (``export.json``) and its short human summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime

from runtime.contract import FEATURES_FILE, FORMAT_VERSION, INPUT_NAME, MODEL_FILE, Preprocessing
from runtime.external import check, has_external

from .graphs import dims


def build_report(classifier: onnx.ModelProto, features: onnx.ModelProto, folder: Path, layer: str,
                 pre: Preprocessing, kind: str, labels: Sequence[str] | None, versions: dict[str, str],
                 hashes: dict[str, str], checked: dict | None) -> dict:
    """Versions, shapes, K/h/w, classes, hashes and sizes of both graphs, and the verification result."""
    out_shape = dims(classifier.graph.output[0])
    feat_shape = dims(features.graph.output[0])
    return {
        "format": FORMAT_VERSION,
        "layer": layer,
        "input": {"name": INPUT_NAME, "shape": dims(classifier.graph.input[0])},
        "output": {"name": classifier.graph.output[0].name, "kind": kind, "shape": out_shape},
        "features": {"name": features.graph.output[0].name, "shape": feat_shape,
                     "K": feat_shape[1], "h": feat_shape[2], "w": feat_shape[3]},
        "num_classes": out_shape[1],
        "labels": len(labels) if labels is not None else None,
        "preprocessing": {"input_size": list(pre.input_size), "color_order": pre.color_order,
                          "scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std)},
        "files": {
            name: {"graph_sha256": hashes[name], "bytes": (folder / name).stat().st_size,
                   "nodes": len(g.graph.node),
                   **({"external_data": {loc: (folder / loc).stat().st_size for loc in check(g, folder)}}
                      if has_external(g) else {})}
            for name, g in ((MODEL_FILE, classifier), (FEATURES_FILE, features))
        },
        "versions": {**versions, "onnxruntime": onnxruntime.__version__},
        "verification": checked,
    }


def summarize(report: dict, out: str | Path) -> str:
    """A few lines for the terminal: what was written, how well it matched torch, top-1 per photo."""
    feat, output = report["features"], report["output"]
    files = report["files"]
    lines = [
        f"wrote {out}/ (layer {report['layer']}, opset {report['versions']['opset']}, "
        f"torch {report['versions']['torch']})",
        f"  model.onnx     input {_shape(report['input']['shape'])} -> {output['name']} "
        f"{_shape(output['shape'])}  graph sha256 {files['model.onnx']['graph_sha256'][:12]}",
        f"  features.onnx  input {_shape(report['input']['shape'])} -> {feat['name']} "
        f"{_shape(feat['shape'])}  graph sha256 {files['features.onnx']['graph_sha256'][:12]}",
    ]
    checked = report.get("verification")
    if not checked:
        lines.append("  not verified (--no-verify)")
        return "\n".join(lines)
    runs = ", ".join(f"{c['inputs']} x{c['batch']}" for c in checked["checks"])
    lines.append(f"  verified against torch: max relative error {checked['max_rel_error']:.2g} "
                 f"<= {checked['tolerance']:g} ({runs})")
    for t in checked["top1"]:
        lines.append(f"  top-1 {t['image']}: {t['index']} {t['label']} ({t['probability']:.2f})")
    return "\n".join(lines)


def _shape(shape: Sequence[int | str]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
