"""Tiny Score-CAM bundles built with ``onnx.helper`` alone (no torch, milliseconds to make).

The net: Conv(3->8, 3x3) ReLU Conv(8->K, 3x3, stride 2) ReLU = the features [N,K,H/2,W/2], then
GlobalAveragePool, Flatten, Gemm(K->C) = the logits [N,C]. Both graphs carry the bundle metadata
and each other's graph hash, exactly as the exporter writes them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.contract import (
    FEATURES_FILE,
    MODEL_FILE,
    BundleMeta,
    Preprocessing,
    graph_sha256,
    write_metadata,
)

LABELS = ("apple", "banana", "cherry", "date", "elderberry")


def _graphs(seed: int, size: int, channels: int, classes: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.3, (channels, 8, 3, 3)), "b2": rng.normal(0, 0.1, channels),
        "wf": rng.normal(0, 1.0, (classes, channels)), "bf": rng.normal(0, 0.1, classes),
    }
    tensors = {k: numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()}
    feat_nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["features"]),
    ]
    head_nodes = [
        helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", channels, size // 2, size // 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    opset = [helper.make_opsetid("", 17)]
    feat = helper.make_model(
        helper.make_graph(feat_nodes, "features", [x], [f], [tensors[k] for k in ("w1", "b1", "w2", "b2")]),
        opset_imports=opset)
    model = helper.make_model(
        helper.make_graph(feat_nodes + head_nodes, "classifier", [x], [y], list(tensors.values())),
        opset_imports=opset)
    for m in (feat, model):
        m.ir_version = 8
        onnx.checker.check_model(m)
    return model, feat


def save_bundle(directory: Path, model: onnx.ModelProto, feat: onnx.ModelProto, meta: BundleMeta) -> Path:
    """Write a hand-made bundle: ``meta`` into both graphs (each naming the other's sha256), then ``model.onnx`` and
    ``features.onnx`` into ``directory`` (made if missing); return it."""
    write_metadata(model, meta.with_role("classifier", graph_sha256(feat)))
    write_metadata(feat, meta.with_role("features", graph_sha256(model)))
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / MODEL_FILE))
    onnx.save(feat, str(directory / FEATURES_FILE))
    return directory


def make_bundle(directory: Path, seed: int = 0, size: int = 32, channels: int = 16,
                labels: tuple[str, ...] | None = LABELS) -> Path:
    """Write ``model.onnx`` + ``features.onnx`` of a tiny net into ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes = len(labels) if labels else 5
    model, feat = _graphs(seed, size, channels, classes)
    pre = Preprocessing((size, size), "RGB", 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    meta = BundleMeta("classifier", "body.3", pre, labels=labels, versions={"exporter": "tests"})
    return save_bundle(directory, model, feat, meta)


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB uint8 test picture (gradients + a bright blob), H x W x 3."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    cy, cx = h * (0.3 + 0.4 * (seed % 3) / 2), w * 0.6
    b = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.15 * max(h, w)) ** 2))
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).astype(np.uint8)


def bomb_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A ~100-byte PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path
