"""Reading an ONNX classifier's graph: tensor shapes, layouts, and where Score-CAM's target layer is.

Pure onnx (no ONNX Runtime, no torch). Used by :mod:`runtime.thirdparty` to derive a feature graph
from a classifier that no exporter of ours has seen.

The automatic target layer is the tensor a person would pick: walk back from the classifier output
along its data path (through Gemm/MatMul/Flatten/Reshape/GlobalAveragePool/ReduceMean/... whatever
the head is) to the first 4-D tensor whose spatial size is > 1 (the map that feeds the global
pooling or the flatten), then step back over layout-only and local pooling ops (Transpose, Identity,
Dropout, MaxPool, AveragePool) to the activation after the last conv.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import onnx
from onnx import TensorProto, numpy_helper

from . import external
from .contract import BundleError

NCHW = "NCHW"
NHWC = "NHWC"
OTHER = "other"  # a 4-D tensor transposed so that its batch or channel axis is not where a map has it

#: ops that only move or thin out a map: the automatic choice steps back over them to the activation
STEP_BACK_OPS = frozenset({"Transpose", "Identity", "Dropout", "MaxPool", "AveragePool", "Cast"})
#: ops whose 4-D output is NCHW by the ONNX spec
NCHW_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "LpPool",
                      "GlobalAveragePool", "GlobalMaxPool", "LRN", "InstanceNormalization", "QLinearConv",
                      "ConvInteger", "DepthToSpace", "SpaceToDepth"})

Shape = tuple  # of int | None


def dims_of(vi: onnx.ValueInfoProto) -> Shape | None:
    """The dims of a value info (None for a symbolic or unknown dim); None when the rank is unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference`` (lenient, with data propagation); the model itself if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort: some custom-domain graphs refuse it
        return model


def fixed_shapes(model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...],
                 base_dir=None) -> dict[str, Shape]:
    """Shapes of every tensor when ``input_name`` is ``input_shape`` (symbolic dims resolved).

    Inference runs on a copy whose input dims are fixed and whose stale value infos are dropped (the
    weights are not needed: a graph whose weights are external data is inferred without reading them;
    ``base_dir``, their folder, is for the ONNX Runtime run that resolves what inference could not).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.value_info[:]
    for vi in g.input:
        if vi.name == input_name:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shape:
                shape.dim.add().dim_value = int(d)
    declared = {vi.name: dims_of(vi) for vi in g.output}
    for vi in g.output:
        vi.type.tensor_type.ClearField("shape")
    m = infer(m)
    out: dict[str, Shape] = {}
    types: dict[str, int] = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
        d = dims_of(vi)
        if d is not None:
            out[vi.name] = d
    unknown = [o for n in m.graph.node if n.op_type != "Constant" for o in n.output
               if o and types.get(o) == TensorProto.FLOAT and (out.get(o) is None or None in out[o])]
    if unknown:
        out.update(_run_shapes(m, input_name, input_shape, unknown, base_dir))
    for name, dims in declared.items():  # what inference could not tell, the model's own declaration
        if name not in out and dims is not None:
            out[name] = dims
    for init in m.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _run_shapes(m: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...], names: list[str],
                base_dir=None) -> dict:
    """Shapes of ``names`` found by running the graph once on zeros (when shape inference gave up,
    e.g. on pads computed by a constant subgraph). {} if ONNX Runtime cannot run it."""
    import numpy as np
    import onnxruntime as ort

    run = onnx.ModelProto()
    run.CopyFrom(m)
    have = {o.name for o in run.graph.output}
    run.graph.output.extend(onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                            for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        external.point_to(opts, base_dir)
        sess = ort.InferenceSession(run.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        values = sess.run(names, {input_name: np.zeros(input_shape, np.float32)})
    except Exception:  # best effort: the caller reports what stays unknown
        return {}
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, values, strict=True)}


def module_path(node_name: str) -> str:
    """The torch module path of a node torch.onnx named ``/net/body/body.3/Relu``: ``net.body.3``."""
    parts = [p for p in node_name.split("/") if p][:-1]
    path, prev = "", ""
    for seg in parts:
        path = path + seg[len(prev):] if prev and seg.startswith(prev + ".") else (f"{path}.{seg}" if path else seg)
        prev = seg
    return path


def _in_module(node_name: str, module: str) -> bool:
    path = module_path(node_name)
    return bool(path) and (path == module or path.startswith(module + "."))


@dataclass(frozen=True)
class Candidate:
    """A 4-D tensor that could be Score-CAM's target layer."""

    name: str
    shape: Shape  # as the graph holds it (batch 1, the input size given)
    layout: str  # NCHW or NHWC
    op: str  # the op type that produces it
    auto: bool = False  # the automatic choice

    @property
    def channels(self) -> int | None:
        return self.shape[1] if self.layout == NCHW else self.shape[3]

    @property
    def spatial(self) -> tuple[int | None, int | None]:
        return (self.shape[2], self.shape[3]) if self.layout == NCHW else (self.shape[1], self.shape[2])

    def describe(self) -> str:
        dims = "x".join("?" if d is None else str(d) for d in self.shape)
        tag = f" {self.layout}" if self.layout != NCHW else ""
        return f"{self.name}  [{dims}]{tag}  ({self.op})"


class GraphInfo:
    """Producers, consumers, constants and shapes of one graph (its image input named ``input_name``)."""

    def __init__(self, model: onnx.ModelProto, input_name: str, shapes: dict[str, Shape], base_dir=None) -> None:
        g = model.graph
        self.model = model
        self.base_dir = base_dir  # the folder of the graph's external data files, if it has some
        self.input_name = input_name
        self.shapes = shapes
        self.nodes = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.order: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = n
                    self.order[o] = i
        self.initializers = {i.name: i for i in g.initializer}
        # tensors that depend on the image input (the rest is constant: weights, folded shapes)
        self.dynamic: set[str] = {input_name}
        for n in self.nodes:
            if any(i in self.dynamic for i in n.input if i):
                self.dynamic.update(o for o in n.output if o)
        self._layouts: dict[str, str] = {input_name: NCHW}
        # the input itself under other names (the Identity / Transpose put in front of a model)
        self.aliases: set[str] = {input_name}
        for n in self.nodes:
            if n.op_type in ("Identity", "Transpose", "Cast") and n.input and n.input[0] in self.aliases:
                self.aliases.update(n.output)

    # ------------------------------------------------------------------------------ tensors
    def tensor_names(self) -> list[str]:
        return [o for n in self.nodes for o in n.output if o]

    def data_input(self, node: onnx.NodeProto) -> str | None:
        """The first input of ``node`` that depends on the image (its data path), if any."""
        return next((i for i in node.input if i and i in self.dynamic), None)

    def ancestors(self, name: str) -> set[str]:
        """Every dynamic tensor ``name`` is computed from (itself included)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in seen or t not in self.dynamic:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return seen

    def constant_value(self, name: str):
        """The numpy value of an initializer or a ``Constant`` node's output, else None (an external one is
        read from ``base_dir``: only its own bytes)."""
        if name in self.initializers:
            init = self.initializers[name]
            if external.is_external(init) and self.base_dir is None:
                return None
            return external.read_tensor(init, self.base_dir)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_ints":
                    import numpy as np

                    return np.asarray(list(a.ints), np.int64)
        return None

    # ------------------------------------------------------------------------------ layouts
    def layout(self, name: str) -> str:
        """NCHW, NHWC or OTHER for a 4-D tensor: from the op that made it (Conv & co. are NCHW), carried
        through elementwise ops and moved by a ``Transpose`` (wherever its perm puts the channel axis:
        axis 1 NCHW, axis 3 NHWC, else OTHER, e.g. the (0,3,2,1) torch's legacy exporter writes
        around a 4-D softmax)."""
        if name in self._layouts:
            return self._layouts[name]
        path = []
        t = name
        result = NCHW
        while True:
            if t in self._layouts:
                result = self._layouts[t]
                break
            node = self.producer.get(t)
            if node is None:
                break
            if node.op_type in NCHW_OPS:
                result = NCHW
                break
            path.append((t, node))
            src = self.data_input(node)
            if src is None:
                break
            if len(self.shapes.get(src) or ()) != 4:
                break  # a reshape into 4-D: no way to tell, assume NCHW
            t = src
        for t, node in reversed(path):
            if node.op_type == "Transpose" and result != OTHER:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [3, 2, 1, 0])
                channel = 1 if result == NCHW else 3  # where the channel axis lands: new axis i is old perm[i]
                moved = perm.index(channel) if channel in perm and perm[0] == 0 else None
                result = NCHW if moved == 1 else NHWC if moved == 3 else OTHER
            self._layouts[t] = result
        return self._layouts.get(name, result)

    def is_map(self, name: str) -> bool:
        """A 4-D floating tensor with a known spatial size > 1."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) != 4 or name not in self.dynamic or name in self.aliases:
            return False
        if self.layout(name) == OTHER:
            return False
        h, w = (shape[2], shape[3]) if self.layout(name) == NCHW else (shape[1], shape[2])
        return h is not None and w is not None and h * w > 1

    def candidate(self, name: str, auto: bool = False) -> Candidate:
        node = self.producer.get(name)
        return Candidate(name, self.shapes[name], self.layout(name), node.op_type if node else "input", auto)

    # ---------------------------------------------------------------------------- target layer
    def auto_layer(self, output: str) -> str:
        """The automatic target layer for classifier output ``output`` (see the module docstring)."""
        t: str | None = output
        seen = set()
        while t is not None and t not in self.aliases and t not in seen:
            seen.add(t)
            if self.is_map(t):
                break
            node = self.producer.get(t)
            t = self.data_input(node) if node is not None else None
        else:
            t = None
        if t is None:
            maps = self.candidates(output)
            if not maps:
                raise BundleError("the classifier has no 4-D feature map with a spatial size > 1 "
                                  "(is it a convolutional image classifier?)")
            return maps[-1].name
        while True:
            node = self.producer.get(t)
            if node is None or node.op_type not in STEP_BACK_OPS:
                break
            src = self.data_input(node)
            if src is None or not self.is_map(src):
                break
            t = src
        return t

    def candidates(self, output: str, auto: str | None = None) -> list[Candidate]:
        """Every 4-D map (spatial size > 1) the output is computed from, in graph order."""
        anc = self.ancestors(output)
        names = [t for t in self.tensor_names() if t in anc and self.is_map(t)]
        return [self.candidate(t, auto=(t == auto)) for t in names]

    def resolve_layer(self, layer: str, output: str) -> str:
        """A user's layer name -> a tensor name: a tensor, a node's name (its first output) or a torch
        module path (``body.3`` matches the one node named ``/body/body.3/...``)."""
        tensors = self.tensor_names()
        if layer in self.producer or layer == self.input_name:
            name = layer
        else:
            by_node = [n.output[0] for n in self.nodes if n.name == layer and n.output]
            scoped = sorted({n.output[0] for n in self.nodes if n.output and self.is_map(n.output[0]) and
                             (_in_module(n.name, layer) or f"/{layer.strip('/')}/" in f"{n.name}/")},
                            key=lambda o: self.order[o])
            if by_node:
                name = by_node[0]
            elif scoped:
                name = scoped[-1]  # the module's output: its last map
            else:
                pool = tensors + [n.name for n in self.nodes if n.name]
                close = difflib.get_close_matches(layer, pool, n=3, cutoff=0.4)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise BundleError(f"layer {layer!r} is not a tensor of this model{hint} (see --list-layers)")
        if name in self.aliases:
            raise BundleError(f"layer {layer!r} is the model input, not a feature map")
        shape = self.shapes.get(name)
        if shape is None or len(shape) != 4:
            what = "of unknown shape" if shape is None else f"{len(shape)}-D {list(shape)}"
            raise BundleError(f"layer {layer!r} ({name}) is {what}; Score-CAM needs a 4-D [N,K,h,w] feature map")
        if name not in self.ancestors(output):
            raise BundleError(f"layer {layer!r} ({name}) does not feed the classifier output {output!r}")
        return name
