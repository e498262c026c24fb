"""The one-graph explainer on the CUDA provider: the CPU's map, and no per-iteration copies of the weights.

Skipped where onnxruntime has no working CUDA provider (CI, this project's CPU machines). Run on a GPU box
with onnxruntime-gpu: ``pytest tests/test_explainer_graph_cuda.py -s`` (prints what it measured).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_cuda import CHELSEA, EXACT, _cuda_works

from exporter.explainer_graph import CLASS_INDEX, PIXELS, Options, build_explainer
from runtime import images
from runtime.bundle import load_bundle

pytestmark = pytest.mark.skipif(not _cuda_works(), reason="no working CUDA provider in this onnxruntime")


def _session(data: bytes, providers: list, optimized: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 1  # ONNX Runtime says here how many Memcpy nodes it added, per graph
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(data, opts, providers=providers)


def _memcpy_of_weights(graph: onnx.GraphProto, weights: set[str]) -> list[str]:
    """Memcpy nodes (in ``graph`` and its subgraphs) whose input is one of ``weights``."""
    found = []
    for node in graph.node:
        if node.op_type.startswith("Memcpy") and set(node.input) & weights:
            found.append(f"{node.name}: {list(node.input)}")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _memcpy_of_weights(attr.g, weights)
    return found


@pytest.mark.parametrize("max_channels", [None, 64])
def test_explainer_graph_on_cuda_matches_cpu(lite0_bundle, tmp_path, max_channels):
    bundle = load_bundle(lite0_bundle)
    options = Options("paper", max_channels, fill="zero" if max_channels else None)
    data = build_explainer(bundle, options).SerializeToString()
    rgb = images.resize_rgb(images.load_image(CHELSEA), bundle.meta.preprocessing.input_size)
    feeds = {PIXELS: rgb[None], CLASS_INDEX: np.array([-1], np.int64)}
    cpu = _session(data, ["CPUExecutionProvider"]).run(None, feeds)
    cuda = _session(data, [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
                    str(tmp_path / "optimized.onnx"))
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    cuda.run(None, feeds)  # warm-up (cuDNN's algorithm search)
    t0 = time.perf_counter()
    out = cuda.run(None, feeds)
    seconds = time.perf_counter() - t0
    err = float(np.abs(out[0] - cpu[0]).max())
    print(f"\nexplainer graph, CUDA, max_channels={max_channels}: {seconds:.3f} s, |CUDA - CPU| = {err:.2e}")
    assert int(out[1][0]) == int(cpu[1][0])
    assert err <= EXACT
    weights = {i.name for i in bundle.model.graph.initializer}
    assert _memcpy_of_weights(onnx.load(str(tmp_path / "optimized.onnx")).graph, weights) == []
