"""Reading an ONNX classifier's graph: tensor shapes, layouts, and where Score-CAM's target layer is.

Pure onnx (no ONNX Runtime, no torch). Used by :mod:`runtime.thirdparty` to derive a feature graph
from a classifier that no exporter of ours has seen.

What holds maps. A 4-D tensor is a map only when its spatial axes are one of the image's grids: the
input's, a convolution's or a pooling's output, or one reached from them by halving (patch merging,
stride-2 stages); that rejects an attention product [1,12,197,64] or a [1,heads,16,16] attention matrix.
Its layout (NCHW or channels-last NHWC) is where that grid is. A 3-D tensor [1,T,D] holds tokens when
T = aux + h*w, the grid h x w the nearest map's upstream (the patch embedding's output) and the aux
auxiliary tokens (CLS, distillation, registers) put there by a ``Concat`` over the token axis (which
says whether they come first or last); see :mod:`runtime.layout`.

The automatic target layer is the tensor a person would pick: walk back from the classifier output
along its data path (through Gemm/MatMul/Flatten/Reshape/GlobalAveragePool/ReduceMean/... whatever
the head is) to the first tensor that holds maps.

- A 4-D map (a CNN; hybrids whose last stage is a map; Swin's final channels-last norm): step back over
  layout-only and local pooling ops (Transpose, Identity, Dropout, MaxPool, AveragePool) to the activation
  after the last conv (the map that feeds the global pooling or the flatten).
- Tokens pooled by the head (a mean over the tokens: LeViT, Swin-style heads): those tokens.
- Tokens of which the head takes some (the CLS token: ViT, DeiT and its distillation token, HuggingFace's
  ``ViTForImageClassification``): the patch tokens there do not reach the class score, so the layer is the
  one pytorch-grad-cam's tutorial names, the output of the last block's first norm (``blocks[-1].norm1``: a
  ``LayerNormalization`` node or its decomposed ReduceMean/Sub/Pow/Sqrt/Div pattern), else the residual
  stream entering the last block. The last block is the last residual ``Add`` (skip + branch) whose branch
  holds an attention (``Softmax``).

When the head reads two different token streams (two branches), the choice is refused naming them.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass

import onnx
from onnx import TensorProto, numpy_helper

from . import external
from .contract import BundleError
from .layout import NLC, Layout, grid_family, is_grid, split_tokens

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


def node_module(node: onnx.NodeProto) -> str:
    """The torch module path of a node: from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata
    (``['', 'blocks', 'blocks.1', 'blocks.1.norm1', 'layer_norm_2']``: ``blocks.1.norm1``), else from the
    legacy exporter's node name (:func:`module_path`)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and all(isinstance(v, str) for v in scopes):
                return scopes[-2]
    return module_path(node.name)


def _in_scope(path: str, module: str) -> bool:
    return bool(path) and (path == module or path.startswith(module + "."))


#: ops that only move tokens or maps around (walked over between a layer and a pooling head)
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze", "Dropout"})
#: ops of a head that pools over the grid
POOL_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool", "AveragePool"})
#: ops of an attention (a transformer block's branch holds one)
ATTENTION_OPS = frozenset({"Softmax", "Attention", "MultiHeadAttention"})
#: ops of a decomposed normalisation (LayerNorm, RMSNorm) as converters write it
NORM_OPS = frozenset({"ReduceMean", "Sub", "Pow", "Mul", "Div", "Add", "Sqrt", "Reciprocal", "Cast", "Identity"})


@dataclass(frozen=True)
class Candidate:
    """A tensor that could be Score-CAM's target layer: a 4-D map, channels-last map or tokens."""

    name: str
    shape: Shape  # as the graph holds it (batch 1, the input size given)
    layout: str  # NCHW, NHWC or NLC
    op: str  # the op type that produces it
    auto: bool = False  # the automatic choice
    grid: tuple[int, int] | None = None  # NLC: the grid of the tokens
    aux: int = 0  # NLC: auxiliary tokens
    aux_position: str = "first"
    module: str = ""  # the torch module that made it, when the graph says (dynamo metadata, node names)

    @property
    def channels(self) -> int | None:
        return self.shape[{NCHW: 1, NHWC: 3, NLC: 2}[self.layout]]

    @property
    def spatial(self) -> tuple[int | None, int | None]:
        if self.layout == NLC:
            return self.grid
        return (self.shape[2], self.shape[3]) if self.layout == NCHW else (self.shape[1], self.shape[2])

    def as_layout(self) -> Layout:
        """The bundle contract's :class:`~runtime.layout.Layout` of this tensor."""
        if self.layout == NLC:
            return Layout(NLC, self.grid, self.aux, self.aux_position)
        return Layout(NHWC, tuple(self.spatial)) if self.layout == NHWC else Layout()

    def describe(self) -> str:
        dims = "x".join("?" if d is None else str(d) for d in self.shape)
        tag = f" {self.as_layout().describe()}" if self.layout != NCHW else ""
        scope = f" in {self.module}" if self.module and self.module.split(".")[-1] not in self.name else ""
        return f"{self.name}  [{dims}]{tag}  ({self.op}{scope})"


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
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = n
                    self.order[o] = i
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(n)
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
        hw = (shapes.get(input_name) or (None, None, None, None))[2:]
        self.input_hw = (int(hw[0]), int(hw[1])) if None not in hw else None
        grids = [tuple(shapes[o][2:]) for n in self.nodes if n.op_type in NCHW_OPS for o in n.output[:1]
                 if len(shapes.get(o) or ()) == 4 and None not in shapes[o][2:]]
        self.family = grid_family(grids, self.input_hw) if self.input_hw else set()
        self._near: dict[str, tuple] | None = None
        self._tokens: dict[str, Layout | None] = {}
        self._concats: list[tuple[int, int, str]] | None = None

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

    def module_of(self, name: str) -> str:
        """The torch module path of the node that makes tensor ``name`` ('' when not known)."""
        node = self.producer.get(name)
        return node_module(node) if node is not None else ""

    # ------------------------------------------------------------------------------ layouts
    def layout(self, name: str) -> str:
        """NCHW, NHWC or OTHER for a 4-D tensor: from the op that made it (Conv & co. are NCHW), carried
        through elementwise ops and moved by a ``Transpose`` (wherever its perm puts the channel axis:
        axis 1 NCHW, axis 3 NHWC, else OTHER, e.g. the (0,3,2,1) torch's legacy exporter writes
        around a 4-D softmax). A tensor reshaped into 4-D reads as NCHW unless only its axes 1 and 2 are
        one of the image's grids (channels last: Swin's window-reverse reshapes)."""
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
            if len(self.shapes.get(src) or ()) != 4:  # a reshape into 4-D: where is the grid?
                shape = self.shapes.get(t) or ()
                if len(shape) == 4 and self.family and not is_grid(shape[2:], self.family) \
                        and is_grid(shape[1:3], self.family):
                    result = NHWC
                break
            t = src
        for t, node in reversed(path):
            if node.op_type == "Transpose" and result != OTHER:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [3, 2, 1, 0])
                channel = 1 if result == NCHW else 3  # where the channel axis lands: new axis i is old perm[i]
                moved = perm.index(channel) if channel in perm and perm[0] == 0 else None
                result = NCHW if moved == 1 else NHWC if moved == 3 else OTHER
            self._layouts[t] = result
        return self._layouts.get(name, result)

    def is_map(self, name: str, strict: bool = True) -> bool:
        """A 4-D floating tensor of batch 1 with a spatial size > 1 that is one of the image's grids (with
        ``strict=False``: any spatial size > 1, the rule before grids were checked)."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) != 4 or name not in self.dynamic or name in self.aliases:
            return False
        if self.layout(name) == OTHER:
            return False
        h, w = (shape[2], shape[3]) if self.layout(name) == NCHW else (shape[1], shape[2])
        if not strict:
            return h is not None and w is not None and h * w > 1
        return shape[0] in (1, None) and (is_grid((h, w), self.family) if self.family else
                                          h is not None and w is not None and h * w > 1)

    def tokens(self, name: str) -> Layout | None:
        """The token layout of a [1,T,D] tensor (see the module docstring), or None."""
        if name in self._tokens:
            return self._tokens[name]
        shape = self.shapes.get(name)
        lay = None
        if shape is not None and len(shape) == 3 and None not in shape and shape[0] == 1 and shape[1] > 1 \
                and shape[2] > 1 and name in self.dynamic and self.input_hw:
            grids = list(dict.fromkeys(g for _, g in self.near_grids(name)))
            split = split_tokens(int(shape[1]), grids, self.family, self.input_hw, fallback=not grids)
            if split is not None:
                (h, w), aux = split
                position = "first" if not aux else self._aux_position(int(shape[1]), h * w)
                if position is not None:
                    lay = Layout(NLC, (h, w), aux, position)
        self._tokens[name] = lay
        return lay

    def holds_maps(self, name: str) -> bool:
        return self.is_map(name) or self.tokens(name) is not None

    def near_grids(self, name: str) -> tuple:
        """((order, grid), ...): the grids of the maps nearest upstream of ``name`` (at most 4, latest first)."""
        if self._near is None:
            near: dict[str, tuple] = {}
            for i, n in enumerate(self.nodes):
                inherited = sorted({e for t in n.input if t in near for e in near[t]}, reverse=True)
                for o in n.output:
                    if not o or o not in self.dynamic:
                        continue
                    own = [(i, tuple(self.candidate_spatial(o)))] if self.is_map(o) else []
                    near[o] = tuple(sorted(set(own + inherited), reverse=True)[:4])
            self._near = near
        return self._near.get(name, ())

    def candidate_spatial(self, name: str) -> tuple[int, int]:
        shape = self.shapes[name]
        return (shape[2], shape[3]) if self.layout(name) == NCHW else (shape[1], shape[2])

    def _aux_position(self, tokens: int, cells: int) -> str | None:
        """Where a ``Concat`` over the token axis that makes ``tokens`` tokens from ``cells`` grid tokens put
        the others: ``first`` or ``last``; None when no such Concat exists or it puts them on both sides."""
        if self._concats is None:
            found = []
            for n in self.nodes:
                if n.op_type != "Concat" or not n.output or n.output[0] not in self.dynamic:
                    continue
                out = self.shapes.get(n.output[0]) or ()
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                if len(out) != 3 or axis % 3 != 1 or out[1] is None:
                    continue
                sizes = [(self.shapes.get(i) or (None, None))[1] for i in n.input]
                for j, (inp, size) in enumerate(zip(n.input, sizes, strict=True)):
                    if inp in self.dynamic and size is not None:
                        where = "first" if j == len(sizes) - 1 else "last" if j == 0 else None
                        found.append((int(out[1]), int(size), where))
            self._concats = found
        where = {pos for t, size, pos in self._concats if t == tokens and size == cells}
        return where.pop() if len(where) == 1 else None

    def candidate(self, name: str, auto: bool = False) -> Candidate:
        node = self.producer.get(name)
        op = node.op_type if node else "input"
        tok = self.tokens(name) if len(self.shapes.get(name) or ()) == 3 else None
        module = self.module_of(name)
        if tok is not None:
            return Candidate(name, self.shapes[name], NLC, op, auto, tok.grid, tok.aux_tokens, tok.aux_position,
                             module)
        return Candidate(name, self.shapes[name], self.layout(name), op, auto, module=module)

    # ---------------------------------------------------------------------------- target layer
    def auto_layer(self, output: str) -> str:
        """The automatic target layer for classifier output ``output`` (see the module docstring)."""
        t: str | None = output
        seen = set()
        path: list[onnx.NodeProto] = []  # the nodes walked back over, output first
        while t is not None and t not in self.aliases and t not in seen:
            seen.add(t)
            if self.is_map(t) or self.tokens(t) is not None:
                break
            node = self.producer.get(t)
            if node is not None:
                path.append(node)
            t = self.data_input(node) if node is not None else None
        else:
            t = None
        if t is None:
            maps = self.candidates(output) or [self.candidate(n) for n in self.tensor_names()
                                               if n in self.ancestors(output) and self.is_map(n, strict=False)]
            if not maps:
                raise BundleError("the classifier has no 4-D feature map with a spatial size > 1 (nor a token layer) "
                                  "on the image's grid (is it an image classifier?)")
            return maps[-1].name
        if self.tokens(t) is not None:
            return self._token_layer(t, path, output)
        while True:
            node = self.producer.get(t)
            if node is None or node.op_type not in STEP_BACK_OPS:
                break
            src = self.data_input(node)
            if src is None or not self.is_map(src):
                break
            t = src
        return t

    def _token_layer(self, t: str, path: list[onnx.NodeProto], output: str) -> str:
        """The target among tokens: ``t`` itself when the head pools it, else the last block's first norm."""
        streams = self._streams(output)
        if len(streams) > 1:
            names = ", ".join(f"{s} {list(self.shapes[s])}" for s in streams)
            raise BundleError(f"several token streams feed the class scores ({names}); pick the target layer "
                              "with --layer NAME (see --list-layers)")
        head = [n.op_type for n in reversed(path) if n.op_type not in LAYOUT_OPS and not self._keeps_shape(n)]
        if head and head[0] in POOL_OPS:
            while True:  # step back over identities to the norm or the residual sum
                node = self.producer.get(t)
                if node is None or node.op_type not in ("Identity", "Dropout", "Cast"):
                    return t
                src = self.data_input(node)
                if src is None or self.tokens(src) != self.tokens(t):
                    return t
                t = src
        block = self.last_block_input(t)
        if block is None:
            return t
        r, branch = block
        return self._norm_output(r, branch) or r

    def _keeps_shape(self, n: onnx.NodeProto) -> bool:
        """A Slice / Gather that takes every token (``x[:, 0:]``): no selection."""
        src = self.data_input(n)
        return n.op_type in ("Slice", "Gather") and src is not None and bool(n.output) \
            and self.shapes.get(src) is not None and self.shapes.get(src) == self.shapes.get(n.output[0])

    def _streams(self, output: str) -> list[str]:
        """The token tensors the head reads (walking back over every input until a tensor holds maps)."""
        found: list[str] = []
        stack, seen = [output], set()
        while stack:
            t = stack.pop()
            if t in seen or t not in self.dynamic or t in self.aliases:
                continue
            seen.add(t)
            if self.is_map(t):
                continue
            if self.tokens(t) is not None:
                found.append(t)
                continue
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return sorted(set(found), key=lambda n: self.order.get(n, -1))

    def _between(self, skip: str, out: str) -> set[str] | None:
        """The tensors on the paths from ``skip`` to ``out`` (walking back from ``out``, never before ``skip``);
        None when ``out`` is not computed from ``skip``."""
        floor = self.order.get(skip, -1)
        seen: set[str] = set()
        stack, reached = [out], False
        while stack:
            t = stack.pop()
            if t in seen or t not in self.dynamic:
                continue
            if t == skip:
                reached = True
                continue
            if self.order.get(t, -1) <= floor:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return seen if reached else None

    def last_block_input(self, t: str) -> tuple[str, set[str]] | None:
        """(r, branch): the residual stream entering the last transformer block before ``t`` (the skip input of
        the last ``Add(r, f(r))`` whose branch f holds an attention) and the branch's tensors; None if none."""
        shape = self.shapes.get(t)
        end = self.order.get(t, len(self.nodes))
        for i in range(min(end, len(self.nodes) - 1), -1, -1):
            n = self.nodes[i]
            if n.op_type not in ("Add", "Sum") or len(n.input) != 2 or not all(x in self.dynamic for x in n.input):
                continue
            if any(self.shapes.get(x) != shape for x in n.input):
                continue
            a, b = sorted(n.input, key=lambda x: self.order.get(x, -1))
            branch = self._between(a, b)
            if branch is None:
                continue
            if any(self.producer[x].op_type in ATTENTION_OPS for x in branch if x in self.producer):
                return a, branch
        return None

    def _norm_output(self, r: str, branch: set[str]) -> str | None:
        """The output of the normalisation the branch applies to ``r`` first: a ``LayerNormalization`` node, or
        the decomposed pattern (ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add: one region with one way out, of
        ``r``'s shape); None when the branch starts otherwise."""
        users = [n for n in self.consumers.get(r, []) if any(o in branch for o in n.output)]
        for n in users:
            if n.op_type in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
                return n.output[0]
        region: list[onnx.NodeProto] = []
        todo = [n for n in users if n.op_type in NORM_OPS]
        while todo and len(region) <= 24:
            n = todo.pop()
            if any(n is m for m in region):
                continue
            region.append(n)
            for o in n.output:
                todo += [c for c in self.consumers.get(o, []) if c.op_type in NORM_OPS
                         and any(x in branch for x in c.output)]
        ops = {n.op_type for n in region}
        if "ReduceMean" not in ops or not ops & {"Sqrt", "Reciprocal", "Div", "Pow"}:
            return None
        inside = {id(n) for n in region}
        exits = {o for n in region for o in n.output
                 if any(id(c) not in inside for c in self.consumers.get(o, [])) and o in branch}
        if len(exits) != 1:
            return None
        out = exits.pop()
        return out if self.shapes.get(out) == self.shapes.get(r) else None

    def layer_layout(self, name: str, grid: tuple[int, int] | None = None, aux: int | None = None) -> Layout:
        """The layout of target tensor ``name``: a 4-D tensor's (NCHW, or NHWC where its grid is), a token
        tensor's (:meth:`tokens`, or as ``grid``/``aux`` say: T must be aux + h*w); BundleError otherwise."""
        shape = self.shapes.get(name) or ()
        if len(shape) == 4:
            if aux:
                raise BundleError(f"--aux-tokens applies to token layers [N,T,D]; {name} is {list(shape)}")
            kind = self.layout(name)
            if kind == OTHER:
                raise BundleError(f"{name} {list(shape)} has its channels neither on axis 1 nor 3")
            spatial = (shape[2], shape[3]) if kind == NCHW else (shape[1], shape[2])
            if grid is not None and tuple(grid) != tuple(spatial):
                other = (shape[1], shape[2]) if kind == NCHW else (shape[2], shape[3])
                if tuple(grid) != tuple(other):
                    raise BundleError(f"--grid {grid[0]} {grid[1]} does not fit {name} {list(shape)}")
                kind = NHWC if kind == NCHW else NCHW
                spatial = other
            if None in spatial or spatial[0] * spatial[1] < 2:
                raise BundleError(f"{name} {list(shape)} has no spatial extent")
            return Layout(NHWC, tuple(int(v) for v in spatial)) if kind == NHWC else Layout()
        t = shape[1] if len(shape) == 3 else None
        if t is None:
            raise BundleError(f"{name} {list(shape)} is not a map [N,K,h,w] / [N,h,w,K] nor tokens [N,T,D]")
        if grid is None and aux is None:
            found = self.tokens(name)
            if found is None:
                raise BundleError(f"{name} {list(shape)}: no grid of the image fits its {t} tokens (T = aux + h*w); "
                                  "give --grid H W (and --aux-tokens N)")
            return found
        grids = list(dict.fromkeys(g for _, g in self.near_grids(name)))
        split = split_tokens(int(t), grids, self.family, self.input_hw or (1, 1), grid, aux)
        if split is None:
            need = f"{aux or 0} aux + {grid[0]}x{grid[1]} = {(aux or 0) + grid[0] * grid[1]}" if grid else \
                f"{aux} aux + a grid of the image"
            raise BundleError(f"{name} has {t} tokens, and {need} (T must be aux + H*W)")
        (h, w), extra = split
        position = "first" if not extra else (self._aux_position(int(t), h * w) or "first")
        return Layout(NLC, (h, w), extra, position)

    def candidates(self, output: str, auto: str | None = None) -> list[Candidate]:
        """Every tensor holding maps (4-D maps on the image's grid, tokens) the output is computed from, in
        graph order."""
        anc = self.ancestors(output)
        names = [t for t in self.tensor_names() if t in anc and self.holds_maps(t)]
        if auto is not None and auto not in names and auto in anc:
            names = sorted([*names, auto], key=lambda n: self.order.get(n, -1))
        return [self.candidate(t, auto=(t == auto)) for t in names]

    def resolve_layer(self, layer: str, output: str) -> str:
        """A user's layer name -> a tensor name: a tensor, a node's name (its first output) or a torch
        module path (``body.3`` matches the nodes named ``/body/body.3/...``, or scoped so by the dynamo
        exporter's metadata; the module's output is its last tensor holding maps)."""
        tensors = self.tensor_names()
        if layer in self.producer or layer == self.input_name:
            name = layer
        else:
            by_node = [n.output[0] for n in self.nodes if n.name == layer and n.output]
            scoped = sorted({n.output[0] for n in self.nodes if n.output and self.holds_maps(n.output[0]) and
                             (_in_scope(node_module(n), layer) or f"/{layer.strip('/')}/" in f"{n.name}/")},
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
        if shape is None or len(shape) not in (3, 4):
            what = "of unknown shape" if shape is None else f"{len(shape)}-D {list(shape)}"
            raise BundleError(f"layer {layer!r} ({name}) is {what}; Score-CAM needs maps [N,K,h,w] or "
                              "[N,h,w,K], or tokens [N,T,K]")
        if name not in self.ancestors(output):
            raise BundleError(f"layer {layer!r} ({name}) does not feed the classifier output {output!r}")
        return name

    # ------------------------------------------------------------------------------ stages
    def cut_tensors(self, output: str) -> list[str]:
        """The tensors every path from the image to ``output`` passes through, in graph order.

        Over the nodes on those paths (shape computations left out: ``Shape``/``Size`` outputs carry no
        pixels), a tensor ``t`` made by node ``i`` is a cut when it is the only tensor alive between node
        ``i`` and node ``i + 1``: born at or before ``i`` and read after it. Any topological order gives the
        same cuts (everything before a cut is its ancestor, everything after it its descendant).
        """
        data: set[str] = {self.input_name}
        for n in self.nodes:
            if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input if i):
                data.update(o for o in n.output if o)
        keep = self.ancestors(output) & data
        path = [i for i, n in enumerate(self.nodes) if any(o in keep for o in n.output)]
        birth = {t: self.order.get(t, -1) for t in keep}
        death = {t: -1 for t in keep}
        death[output] = len(self.nodes)
        for i in path:
            for name in self.nodes[i].input:
                if name in death:
                    death[name] = max(death[name], i)
        live = [0] * (len(self.nodes) + 2)  # live[i + 1]: tensors alive after node i (index 0: after the input)
        for t in keep:
            if death[t] > birth[t]:
                live[birth[t] + 1] += 1
                live[min(death[t], len(self.nodes)) + 1] -= 1
        for i in range(1, len(live)):
            live[i] += live[i - 1]
        cuts = [t for t in keep if t != self.input_name and death[t] > birth[t] and live[birth[t] + 1] == 1]
        return sorted(cuts, key=lambda t: self.order[t])

    def stage_layers(self, output: str, deepest: str, count: int) -> list[str]:
        """The ``count`` stage outputs next finer than the ``deepest`` map, coarsest first (Poly-CAM's layers).

        Candidates are the cut maps (:meth:`cut_tensors`; a stage's output is one, a tensor inside a residual
        block is not) of a spatial size strictly finer than ``deepest``'s, less the outputs of layout-only and
        pooling ops (a pooled map is the stage before it, thinned out). For each grid, from the next finer one
        on: walk back from its last cut map while the channel count does not grow (an inverted-residual
        block's expansion, ReLU after conv) and take the latest of the narrowest maps walked over: on
        EfficientNet-Lite0 the 112-channel output at 14 x 14 rather than the 672-channel expansion after it,
        on ResNet-50 ``layer3``'s output, on VGG ``relu4_3``.
        """
        h0, w0 = self.candidate(deepest).spatial if self.is_map(deepest) else (None, None)
        if h0 is None or w0 is None:
            raise BundleError(f"layer {deepest!r} is not a feature map of known size")
        grids: dict[tuple[int, int], list[str]] = {}
        for t in self.cut_tensors(output):
            node = self.producer.get(t)
            if not self.is_map(t) or node is None or node.op_type in STEP_BACK_OPS:
                continue
            h, w = self.candidate(t).spatial
            if h >= h0 and w >= w0 and h * w > h0 * w0:
                grids.setdefault((h, w), []).append(t)
        out = []
        for grid in sorted(grids, key=lambda g: g[0] * g[1])[:count]:
            maps = grids[grid]
            channels = [self.candidate(t).channels or 0 for t in maps]
            i = len(maps) - 1
            while i > 0 and channels[i - 1] <= channels[i]:
                i -= 1
            walked = range(len(maps) - 1, i - 1, -1)
            narrow = min(channels[j] for j in walked)
            out.append(maps[next(j for j in walked if channels[j] == narrow)])
        return out
