"""The classifier after the target layer, read from the ONNX graph (pure onnx + numpy, no ONNX Runtime).

Two things are read here:

- :func:`linear_head`: when the graph from the target tensor ``A`` [N,K,h,w] to the class output is
  global average pooling -> (flatten / reshape / squeeze) -> linear (Dropout and Identity allowed),
  the logits are ``f(A) = W @ mean_hw(A) + b`` with ``W`` [C,K] and ``b`` [C]; anything else gives
  None (a conv after the layer, a skip connection around it, a softmax at the end, ...).
- :func:`tail_graph`: the sub-graph computing the class output from the target tensor alone (any
  head), as its own model with input ``A`` [N,K,h,w]; None when the output also depends on the image
  by another path.
- :func:`masked_classifier`: the whole classifier with a mask input multiplied into what the layers
  after the target read: the target tensor and the tensors the rest of the network reads besides it (a
  transformer block's residual input, when the target is the block's first norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external
from .layout import NCHW, NHWC, NLC, Layout

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
                layout: Layout | None = None, base_dir=None) -> LinearHead | None:
    """W [C,K] and b [C] when ``output`` (default: the first graph output) = linear(global-avg-pool(target)).

    Accepted: ``GlobalAveragePool`` or ``ReduceMean`` over the grid's axes (keepdims or not), then any of
    Flatten / Reshape / Squeeze / Dropout / Identity, then ``Gemm`` (transA 0, transB, alpha, beta) or
    ``MatMul`` (+ ``Add`` of a constant bias). The grid's axes follow ``layout`` (default NCHW): {2,3} for
    NCHW, {1,2} for NHWC (or a ``Transpose`` to NCHW first), {1} for NLC tokens without auxiliary tokens
    (with them the mean is not over the grid). Every other graph gives None. ``base_dir``: the folder of
    the graph's external data files, if its weights are stored there (only ``W`` and ``b`` are read).
    """
    g = model.graph
    output = output or g.output[0].name
    consts = _Constants(g, base_dir)
    kind = (layout or Layout()).kind
    if kind == NLC and layout.aux_tokens:
        return None
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
            ndim = 3 if kind == NLC else 4
            if op == "Transpose" and kind == NHWC and list(a.get("perm", [])) == [0, 3, 1, 2]:
                kind = NCHW
            elif op == "GlobalAveragePool" and kind == NCHW:
                pooled, rank = True, 4
            elif op == "ReduceMean":
                axes = a.get("axes")
                if axes is None and len(n.input) > 1 and n.input[1]:
                    axes = consts[n.input[1]].tolist()
                grid_axes = {NCHW: [2, 3], NHWC: [1, 2], NLC: [1]}[kind]
                if axes is None or sorted(int(x) % ndim for x in axes) != grid_axes:
                    return None
                pooled, rank = True, ndim if a.get("keepdims", 1) else 2
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


def tail_inputs(model: onnx.ModelProto, target: str, output: str | None = None) -> list[str]:
    """The tensors the classifier after ``target`` reads: ``target`` and every tensor it is computed from that
    the rest reads too (the residual stream entering a block whose first norm is the target), in graph order.

    Walks back from ``output``, stopping at ``target`` and at ``target``'s ancestors."""
    g = model.graph
    output = output or g.output[0].name
    producer = {o: n for n in g.node for o in n.output}
    order = {o: i for i, n in enumerate(g.node) for o in n.output}
    before: set[str] = set()
    stack = [target]
    while stack:  # target's ancestors (itself excluded)
        t = stack.pop()
        n = producer.get(t)
        if n is None:
            continue
        for i in n.input:
            if i and i not in before and i in producer:
                before.add(i)
                stack.append(i)
    cut: set[str] = set()
    seen: set[str] = set()
    stack = [output]
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        if t == target or t in before:
            cut.add(t)
            continue
        stack.extend(i for i in producer[t].input if i)
    return sorted(cut, key=lambda t: order[t])


def masked_classifier(model: onnx.ModelProto, target: str, mask_name: str, mask_shape: list,
                      output: str | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """(the classifier with a mask, the tensors masked): every node after ``target`` that reads one of
    :func:`tail_inputs` reads ``t * mask`` instead (``mask`` an input of ``mask_shape``, broadcast: [B,T,1] for
    tokens). The image's own pass runs once per run at its batch; the B masked copies go through the rest.
    ValueError when a tensor to mask does not have the target's shape."""
    g = model.graph
    output = output or g.output[0].name
    cut = tail_inputs(model, target, output)
    shapes = _shapes(model)
    for t in cut:
        a, b = shapes.get(t), shapes.get(target)
        if t != target and a is not None and b is not None and (len(a) != len(b) or any(
                isinstance(x, int) and isinstance(y, int) and x and y and x != y
                for x, y in zip(a[1:], b[1:], strict=True))):
            raise ValueError(f"the classifier after the target layer also reads {t} {shapes.get(t)}, which has "
                             f"another shape than the target {shapes.get(target)}")
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    in_tail: set[int] = set()  # the nodes after the cut
    stack, seen = [output], set()
    while stack:
        t = stack.pop()
        if t in seen or t in cut or t not in producer:
            continue
        seen.add(t)
        in_tail.add(producer[t])
        stack.extend(i for i in nodes[producer[t]].input if i)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    og = out.graph
    masked = {t: f"{t}_scorecam_masked" for t in cut}
    after = set(masked.values())  # computed from the masked copies: their batch is the mask's
    for i, n in enumerate(og.node):
        if i in in_tail:
            n.input[:] = [masked.get(x, x) for x in n.input]
            if any(x in after for x in n.input):
                after.update(n.output)
    inputs = {vi.name for vi in g.input} - {x.name for x in g.initializer}
    image_path = set(inputs)  # tensors computed from the image (batch 1 in this graph)
    for n in nodes:
        if any(x in image_path for x in n.input):
            image_path.update(n.output)
    extra: list[onnx.NodeProto] = []
    for i, n in enumerate(og.node):
        # a shape the rest of the network reads off a tensor of the image's pass (torch.flatten(x, 1) exported
        # as Reshape(x, [Shape(input)[0], -1])): its batch must be the mask's
        if i in in_tail and n.op_type == "Shape" and n.input[0] in image_path and n.input[0] not in after:
            extra += _batch_from(n, mask_name, len(extra))
            n.output[0] = f"{n.output[0]}_scorecam_image_batch"
    og.node.extend(helper.make_node("Mul", [t, mask_name], [masked[t]], name=f"scorecam_mask_{k}")
                   for k, t in enumerate(cut))
    og.node.extend(extra)
    og.input.append(helper.make_tensor_value_info(mask_name, onnx.TensorProto.FLOAT, mask_shape))
    keep = [o for o in og.output if o.name == output]
    del og.output[:]
    og.output.extend(keep)
    for o in og.output:  # the batch of what follows the cut is the mask's, not the image's
        o.type.tensor_type.ClearField("shape")
    del og.value_info[:]
    sorted_nodes = _toposort(list(og.node))
    del og.node[:]
    og.node.extend(sorted_nodes)
    return out, cut


def _batch_from(shape_node: onnx.NodeProto, mask_name: str, k: int) -> list[onnx.NodeProto]:
    """Nodes giving what ``shape_node`` (Shape of a batch-first tensor X, optional start/end) gives, with
    the mask's batch in place of X's: Slice(Concat(Shape(mask)[:1], Shape(X)[1:]), start, end)."""
    from onnx import numpy_helper as nh

    p = f"scorecam_batch{k}/"
    attrs = {a.name: a.i for a in shape_node.attribute}

    def const(name, values):
        return helper.make_node("Constant", [], [p + name], value=nh.from_array(np.asarray(values, np.int64), p + name))

    return [
        const("zero", [0]), const("one", [1]), const("big", [2 ** 62]),
        const("start", [attrs.get("start", 0)]), const("end", [attrs.get("end", 2 ** 62)]),
        helper.make_node("Shape", [mask_name], [p + "mask_shape"]),
        helper.make_node("Slice", [p + "mask_shape", p + "zero", p + "one"], [p + "batch"]),
        helper.make_node("Shape", [shape_node.input[0]], [p + "x_shape"]),
        helper.make_node("Slice", [p + "x_shape", p + "one", p + "big"], [p + "rest"]),
        helper.make_node("Concat", [p + "batch", p + "rest"], [p + "full"], axis=0),
        helper.make_node("Slice", [p + "full", p + "start", p + "end"], [shape_node.output[0]]),
    ]


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    g = model.graph
    inferred = g.value_info
    if not len(inferred):
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
        except Exception:  # best effort
            inferred = []
    return {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in [*g.input, *inferred, *g.output]}


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is made before it is read (stable otherwise)."""
    made = {o for n in nodes for o in n.output}
    ready: set[str] = set()
    out: list[onnx.NodeProto] = []
    todo = list(nodes)
    while todo:
        left = []
        for n in todo:
            if all(not i or i not in made or i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                left.append(n)
        if len(left) == len(todo):
            return out + left  # a cycle cannot be: keep the rest as it is
        todo = left
    return out


__all__ = ["LinearHead", "linear_head", "masked_classifier", "tail_graph", "tail_inputs"]
