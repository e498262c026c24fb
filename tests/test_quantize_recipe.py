"""The int8 recipe's fp32 layers (exporter.quantize): which weighted nodes stay fp32, and that the file says so.

Fidelity on a real network (r >= 0.97 on every photo) is measured by ``python -m bench --plan memory-int8
--check-targets``, not here: it takes minutes of EfficientNet-Lite0 passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize import KEEP_FIRST, KEEP_FP32, RECIPE, fp32_weighted_nodes, main
from runtime import Explainer
from runtime.contract import INT8_FILE, BundleMeta, read_props
from tests.bundles import make_bundle, photo

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def chain(n: int) -> onnx.ModelProto:
    """``n`` 1x1 convolutions, each followed by a Relu (named c0.. and r0..)."""
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}_out"], name=f"c{i}"),
                  helper.make_node("Relu", [f"c{i}_out"], [f"r{i}_out"], name=f"r{i}")]
        prev = f"r{i}_out"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(graph)


def test_default_recipe_keeps_the_first_block_and_the_head_in_fp32():
    assert KEEP_FIRST == 3 and KEEP_FP32 == 2
    assert "first3" in RECIPE and "keep2" in RECIPE
    names = fp32_weighted_nodes(chain(20), KEEP_FIRST, KEEP_FP32)
    assert names == ["c0", "c1", "c2", "c18", "c19"]


def test_fp32_first_layers_leave_at_least_one_node_quantized():
    assert fp32_weighted_nodes(chain(3), 3, 2) == ["c1", "c2"]  # the toy bundles: as before, the first is int8
    assert fp32_weighted_nodes(chain(5), 3, 2) == ["c0", "c1", "c3", "c4"]  # c2 stays int8
    assert fp32_weighted_nodes(chain(6), 3, 2) == ["c0", "c1", "c2", "c4", "c5"]
    assert fp32_weighted_nodes(chain(4), 0, 0) == []
    assert fp32_weighted_nodes(chain(4), 2, 0) == ["c0", "c1"]
    assert fp32_weighted_nodes(chain(2), 5, 5) == ["c0", "c1"]  # the last N win: nothing is double-counted


def test_keep_first_leaves_the_input_and_first_layer_unrounded(tmp_path):
    b = make_bundle(tmp_path / "b", channels=8)
    assert main([str(b), str(SAMPLES / "chelsea.png"), "--masked-per-image", "1", "--no-augment",
                 "--keep-first", "1", "--keep-fp32", "0"]) == 0
    q = onnx.load(str(b / INT8_FILE))
    meta = BundleMeta.from_props(read_props(q))
    assert meta.versions["quantization_recipe"] == RECIPE
    assert "1 weighted nodes fp32" in meta.versions["quantization"]
    first = meta.versions["quantization_fp32_nodes"].split(",")
    assert len(first) == 1
    producers = {o: n for n in q.graph.node for o in n.output}
    node = next(n for n in q.graph.node if n.name == first[0])
    assert node.op_type == "Conv" and node is next(n for n in q.graph.node if n.op_type == "Conv")
    # neither its weight nor its input goes through a DequantizeLinear: no rounding before the first layer
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    assert node.input[0] == q.graph.input[0].name
    dq_weights = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm") and n is not node
                  and producers.get(n.input[1]) is not None and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert dq_weights, "the later weighted layers are int8"
    r = Explainer(b, device="cpu", precision="int8").explain(photo())[0]
    assert np.isfinite(r.saliency).all()


def test_precomputed_calibration_inputs_are_used_as_given(tmp_path):
    from exporter.quantize import quantize_bundle

    b = make_bundle(tmp_path / "b", channels=8)
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    quantize_bundle(b, SAMPLES / "chelsea.png", inputs=inputs)
    meta = BundleMeta.from_props(read_props(onnx.load(str(b / INT8_FILE))))
    assert meta.versions["calibration_inputs"] == "4" and meta.versions["calibration_images"] == "1"
    assert meta.versions["quantization_fp32_nodes"].count(",") == 1  # the toy's last two weighted nodes only
