"""The classifier after the target layer, read from the ONNX graph (pure onnx + numpy, no ONNX Runtime).

Two things are read here:

- :func:`linear_head`: when the graph from the target tensor ``A`` [N,K,h,w] to the class output is
  global average pooling -> (flatten / reshape / squeeze) -> linear (Dropout and Identity allowed),
  the logits are ``f(A) = W @ mean_hw(A) + b`` with ``W`` [C,K] and ``b`` [C]; anything else gives
  None (a conv after the layer, a skip connection around it, a softmax at the end, ...).
- :func:`tail_graph`: the sub-graph computing the class output from the target tensor alone (any
  head), as its own model with input ``A`` [N,K,h,w]; None when the output also depends on the image
  by another path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external

PASS_OPS = frozenset({"Dropout", "Identity", "Flatten", "Reshape", "Squeeze"})


@dataclass(frozen=True)
class LinearHead:
    """``logits = W @ mean_hw(A) + b``: W float64 [C,K], b float64 [C].

    Where W is stored in the graph: ``W = weight_scale * T`` with ``T`` the tensor ``weight_name`` (an
    initializer or a Constant node's output), read as [C,K] (``weight_axis`` 0: Gemm with transB) or [K,C]
    (``weight_axis`` 1: the class is its axis 1; Gemm without transB, MatMul).
    """

    weight: np.ndarray
    bias: np.ndarray
    weight_name: str = ""
    weight_axis: int = 0
    weight_scale: float = 1.0

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])


class _Constants:
    """Initializers and Constant-node outputs by name, converted to numpy only when read (an external one:
    only its own bytes, from ``base_dir``, the model's folder, under ONNX Runtime's rules)."""

    def __init__(self, g: onnx.GraphProto, base_dir=None) -> None:
        self.base_dir = base_dir
        self._protos = {i.name: i for i in g.initializer}
        self._nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.attribute}

    def __contains__(self, name: str) -> bool:
        return name in self._protos or name in self._nodes

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._protos:
            return external.read_tensor(self._protos[name], self.base_dir)
        a = self._nodes[name].attribute[0]
        return numpy_helper.to_array(a.t) if a.name == "value" else np.asarray(helper.get_attribute_value(a))

    def get(self, name: str, default=None):
        return self[name] if name in self else default


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _consumers(g: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in g.node if name in n.input]


def linear_head(model: onnx.ModelProto, target: str, output: str | None = None,
                base_dir=None) -> LinearHead | None:
    """W [C,K] and b [C] when ``output`` (default: the first graph output) = linear(global-avg-pool(target)).

    Accepted: ``GlobalAveragePool`` or ``ReduceMean`` over axes {2,3} (keepdims or not), then any of
    Flatten / Reshape / Squeeze / Dropout / Identity, then ``Gemm`` (transA 0, transB, alpha, beta) or
    ``MatMul`` (+ ``Add`` of a constant bias). Every other graph gives None. ``base_dir``: the folder of
    the graph's external data files, if its weights are stored there (only ``W`` and ``b`` are read).
    """
    g = model.graph
    output = output or g.output[0].name
    consts = _Constants(g, base_dir)
    cur = target
    pooled = False
    weight = bias = None
    source: tuple[str, int, float] = ("", 0, 1.0)
    rank = 4
    for _ in range(32):
        if cur == output and weight is not None:
            break
        users = [n for n in _consumers(g, cur)]
        if len(users) != 1 or any(o.name == cur for o in g.output if cur != output):
            return None
        n = users[0]
        others = [i for i in n.input if i and i != cur]
        if n.input[0] != cur or any(i not in consts for i in others):
            return None
        a = _attrs(n)
        op = n.op_type
        if not pooled:
            if op == "GlobalAveragePool":
                pooled, rank = True, 4
            elif op == "ReduceMean":
                axes = a.get("axes")
                if axes is None and len(n.input) > 1 and n.input[1]:
                    axes = consts[n.input[1]].tolist()
                if axes is None or sorted(int(x) % 4 for x in axes) != [2, 3]:
                    return None
                pooled, rank = True, 4 if a.get("keepdims", 1) else 2
            elif op in ("Dropout", "Identity"):
                pass
            else:
                return None
        elif weight is None:
            if op in PASS_OPS:
                if op in ("Flatten", "Reshape", "Squeeze"):
                    rank = 2
            elif op == "Gemm" and rank == 2:
                w = consts[n.input[1]].astype(np.float64)
                if a.get("transA", 0):
                    return None
                w = w if a.get("transB", 0) else w.T
                weight = float(a.get("alpha", 1.0)) * w
                source = (n.input[1], 0 if a.get("transB", 0) else 1, float(a.get("alpha", 1.0)))
                c = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                bias = (float(a.get("beta", 1.0)) * np.broadcast_to(np.asarray(c, np.float64).reshape(-1),
                                                                    (w.shape[0],)) if c is not None
                        else np.zeros(w.shape[0]))
            elif op == "MatMul" and rank == 2:
                w = consts[n.input[1]].astype(np.float64)
                if w.ndim != 2:
                    return None
                weight, bias = w.T, np.zeros(w.shape[1])
                source = (n.input[1], 1, 1.0)
            else:
                return None
        else:
            if op == "Add" and bias is not None:
                c = np.asarray(consts[others[0]], np.float64).reshape(-1)
                if c.size not in (1, weight.shape[0]):
                    return None
                bias = bias + c
            elif op in ("Dropout", "Identity", "Flatten", "Reshape"):
                pass
            else:
                return None
        cur = n.output[0]
    else:
        return None
    if cur != output or weight is None:
        return None
    return LinearHead(np.ascontiguousarray(weight), np.ascontiguousarray(bias, np.float64), *source)


def tail_graph(model: onnx.ModelProto, target: str, output: str | None = None) -> onnx.ModelProto | None:
    """The classifier from ``target`` to ``output`` as its own model (input ``target`` [N,K,h,w]); None when
    ``output`` also depends on a graph input by a path that does not pass through ``target``."""
    g = model.graph
    output = output or g.output[0].name
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    inputs = {i.name for i in g.input if i.name not in inits}
    if target not in producer:
        return None
    needed: set[int] = set()
    stack = [output]
    seen: set[str] = set()
    index = {id(n): i for i, n in enumerate(g.node)}
    while stack:
        t = stack.pop()
        if t in seen or t == target or t in inits or not t:
            continue
        seen.add(t)
        if t in inputs:
            return None
        n = producer.get(t)
        if n is None:
            return None
        needed.add(index[id(n)])
        stack.extend(n.input)
    if not needed:
        return None
    nodes = [g.node[i] for i in sorted(needed)]
    used = {i for n in nodes for i in n.input}
    out_vi = next(o for o in g.output if o.name == output)
    elem = out_vi.type.tensor_type.elem_type
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info(target, elem, None)], [out_vi],
                              [i for i in g.initializer if i.name in used])
    tail = helper.make_model(graph, opset_imports=list(model.opset_import))
    tail.ir_version = model.ir_version
    return tail


__all__ = ["LinearHead", "linear_head", "tail_graph"]
