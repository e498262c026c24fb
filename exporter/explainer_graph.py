"""The whole Score-CAM explainer as ONE ONNX graph (torch-free: onnx, numpy and ``runtime.*`` only).

``explainer(pixels uint8 [1,H,W,3], class_index int64 [1]) -> saliency [1,H,W], explained_class [1],
probabilities [1,C]`` computes in any ONNX Runtime exactly what ``Explainer(...).explain_tensor(x)``
computes in Python (DESIGN.md, "Score-CAM, exactly"):

1. ``x = (pixel * scale - mean) / std`` in the bundle's colour order, NCHW (main graph);
2. one ONNX ``Loop`` whose body is ``runtime.maskgraph.mask_nodes`` (the same masking nodes the Python
   engine runs) followed by the classifier. Iteration 0 runs the image itself (the zero map with offset 1,
   as the engine's main session: ``x * 1``) and gives the logits ``f(x)`` [1,C] and the target layer ``A``
   [K,h,w] (loop-carried). From ``A`` the body computes the schedule (:class:`_Schedule`), with no
   ``NonZero``: a channel is *constant* when ``max A_k == min A_k``; ``scored`` = all channels
   (``official``: the varying ones), then with ``max_channels=N`` (and ``fill="zero"``, asked explicitly: the
   channels left out weigh 0, Faster Score-CAM; the graph has no kernel fill) the selection rule (:data:`SELECTIONS`, as
   ``Explainer.channels_to_score`` for the ONE class explained, lower index first on ties): ``std``, the N
   of largest spatial std, or ``relevance``, the N of largest ``|W[c,k]| std(A_k)`` (normalised by its
   max, in float64) with ``W`` the linear head's weight read where the classifier keeps it in the body
   and ``c`` the class explained (``class_index``, or the top-1 class of iteration 0's logits); ``auto``
   is resolved when the graph is built, as ``Explainer.selection``: ``relevance`` where
   :func:`runtime.head.linear_head` finds a global-pooling -> linear head, else ``std``. The class and
   the scored channels are loop-carried, so the main graph never reads ``W``. The maps run are the scored
   varying channels plus ONE all-zero map shared by every scored constant channel (its mask is 0 in every
   preset), put first in channel order by ``TopK``; the loop stops after ``1 + ceil(n_run / B)``
   iterations. Iteration i >= 1 scores chunk i-1; the scan output is the logits padded to [B,C]: [T,B,C];
3. after the Loop: the same schedule from the same ``A`` and the body's scored channels; the masked logits
   [K,C] gathered back per channel (not scored: a zero row, weight 0), the class (``class_index`` < 0: the
   top-1 class), the preset's weights (``exp(-inf) = 0`` drops ignored channels out of the softmax),
   ``S = sum_k a_k A_k`` and the preset's finishing, the bilinear resize being the interpolation matrices of
   :func:`runtime.scorecam.upsample`.

The classifier's weights are initializers of the Loop body, stored once. Read from the outer scope instead
(the file size is the same), ONNX Runtime leaves those convolutions out of its CPU layout optimisation
(NCHWc) and Lite0 takes 2.75x the Python engine's time; inside the body they are optimised like any graph's.
The last chunk runs only the maps left (as the Python engine's last batch) and its logits are padded with
zero rows to [B,C], so every scan output has the same shape; with nothing to run, one fixed varying map is
scored and discarded, so no row is ever NaN. The graph keeps the classifier's IR version and opset.

A classifier whose weights are external data (torch's dynamo export, a model over 2 GB) gives a graph that
is self-contained again whenever it fits protobuf's 2 GB limit (its weights are read in, tensor by tensor);
one that does not fit, or ``Options.external_data``, keeps them external, relative to the bundle's
``data_dir``: write it with :func:`exporter.explainer_cli.save_explainer` (ONE data file beside the graph).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime import external
from runtime.bundle import Bundle, target_tensor
from runtime.contract import PREFIX, BundleError
from runtime.engine import CPU, batch_for
from runtime.head import linear_head
from runtime.maskgraph import EPS, IMAGE, MAPS, OFFSET, mask_nodes
from runtime.scorecam import GRADCAM_EPS, MASK_EPS, Preset, get_preset, interp_matrix
from runtime.thirdparty import model_sha256

PIXELS = "pixels"
CLASS_INDEX = "class_index"
SALIENCY = "saliency"
EXPLAINED_CLASS = "explained_class"  # an ONNX graph cannot have an input and an output of the same name
PROBABILITIES = "probabilities"
MIN_OPSET = 11  # CumSum, ScatterElements, TopK with a k input, Clip with min/max inputs
ROLE = "explainer"
FORMAT = "1"
_L = "scorecam_loop/"  # prefix of every tensor inside the Loop body
_G = "scorecam_x/"  # prefix of the explainer's own tensors in the main graph


class GraphBuildError(BundleError):
    """The explainer graph cannot be built for this model; the message says why."""


def default_chunk(input_size: tuple[int, int]) -> int:
    """The Python engine's CPU batch size: 16 masked inputs at 224 x 224, scaled by the input area."""
    return batch_for(CPU, input_size)


# ------------------------------------------------------------------------------------ node helpers


class _Builder:
    """Appends nodes to one graph, with fresh names and opset-aware spellings of the ops that changed."""

    def __init__(self, opset: int, prefix: str) -> None:
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def fresh(self, tag: str) -> str:
        self._n += 1
        return f"{self.prefix}{tag}_{self._n}"

    def const(self, values, dtype, tag: str = "c") -> str:
        name = self.fresh(tag)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], tag: str | None = None, n_out: int = 1,
           **attrs) -> str | list[str]:
        outs = [self.fresh(tag or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMin/Max/Mean/Sum over ``axes`` (an input from opset 18, ReduceSum from 13)."""
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.op(op_type, [x, self.const(axes, np.int64, "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(axes, np.int64, "axes")])
        return self.op("Unsqueeze", [x], axes=axes)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", [x, self.const(shape, np.int64, "shape")])

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def minmax(self, m: str, eps: float = 0.0) -> str:
        """``(m - min m) / (max m - min m + eps)`` over all of ``m``; a constant ``m`` becomes all zeros."""
        axes = [0, 1]
        lo = self.reduce("ReduceMin", m, axes)
        hi = self.reduce("ReduceMax", m, axes)
        rng = self.op("Add", [self.op("Sub", [hi, lo]), self.const(eps, np.float32)])
        pos = self.op("Greater", [rng, self.const(0.0, np.float32)])
        safe = self.op("Where", [pos, rng, self.const(1.0, np.float32)])
        return self.op("Where", [pos, self.op("Div", [self.op("Sub", [m, lo]), safe]), self.const(0.0, np.float32)])

    def shift_scale(self, m: str, eps: float, add_eps_first: bool) -> str:
        """``m -= min m; m /= (eps + max m)`` (pytorch-grad-cam, torchcam); ``add_eps_first`` only orders the sum."""
        m = self.op("Sub", [m, self.reduce("ReduceMin", m, [0, 1])])
        hi = self.reduce("ReduceMax", m, [0, 1])
        e = self.const(eps, np.float32)
        return self.op("Div", [m, self.op("Add", [e, hi] if add_eps_first else [hi, e])])


# ------------------------------------------------------------------------------------ selection


Selection = Callable[[_Builder, str, str, int, "str | None"], str]


def _spread(b: _Builder, flat: str) -> str:
    """``std_hw(A_k)`` [K] of ``flat`` [K,hw] (population std, in ``flat``'s type)."""
    mean = b.reduce("ReduceMean", flat, [1], keepdims=1)
    d = b.op("Sub", [flat, mean])
    return b.op("Sqrt", [b.reduce("ReduceMean", b.op("Mul", [d, d]), [1], keepdims=0)])


def _top(b: _Builder, rank: str, scored: str, n: int, dtype) -> str:
    """``runtime.selection.top_channels``: of the ``scored`` channels the N of largest ``rank`` (TopK: the lower
    index first on ties, as the runtime's stable argsort). -> bool [K]."""
    key = b.op("Where", [scored, rank, b.const(-np.inf, dtype)])
    _, idx = b.op("TopK", [key, b.const([n], np.int64)], n_out=2, axis=0, largest=1, sorted=1)
    ones = b.op("Expand", [b.const(1.0, np.float32), b.const([n], np.int64)])
    zeros = b.op("ConstantOfShape", [b.op("Shape", [rank])], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    picked = b.op("ScatterElements", [zeros, idx, ones], axis=0)
    return b.op("And", [b.op("Greater", [picked, b.const(0.5, np.float32)]), scored])


def select_std(b: _Builder, flat: str, scored: str, n: int, row: str | None = None) -> str:
    """``max_channels=N`` by spatial std: of the ``scored`` channels keep the N of largest ``std(A_k)``
    (class-blind; ``row`` unused). -> bool [K]."""
    return _top(b, _spread(b, flat), scored, n, np.float32)


def select_relevance(b: _Builder, flat: str, scored: str, n: int, row: str | None = None) -> str:
    """``max_channels=N`` by class relevance (``runtime.selection.relevance`` for the one class explained):
    ``r_k = |W[c,k]| std(A_k) / max_j |W[c,j]| std(A_j)`` in float64, ``row`` [K] being ``|W[c,:]|`` (float64,
    read from the classifier's own weight in the Loop body). -> bool [K]."""
    if row is None:
        raise GraphBuildError("select 'relevance' needs the class's row of the linear head's weight")
    rel = b.op("Mul", [row, _spread(b, b.cast(flat, TensorProto.DOUBLE))])
    top = b.reduce("ReduceMax", rel, [0], keepdims=1)
    pos = b.op("Greater", [top, b.const(0.0, np.float64)])
    rel = b.op("Where", [pos, b.op("Div", [rel, b.op("Where", [pos, top, b.const(1.0, np.float64)])]),
                         b.const(0.0, np.float64)])
    return _top(b, rel, scored, n, np.float64)


#: the ``max_channels`` selection rules, by name (the rule's name is recorded in the metadata); ``auto``, the
#: default, is resolved when the graph is built: ``relevance`` where the head after the target layer is
#: global pooling -> linear (``runtime.head.linear_head``, as ``Explainer.selection``), else ``std``
SELECTIONS: dict[str, Selection] = {"std": select_std, "relevance": select_relevance}
SELECTS = ("auto", *SELECTIONS)


# ------------------------------------------------------------------------------------ the graph


@dataclass(frozen=True)
class Options:
    """What the graph computes: the preset, the channel cap (None: exact) and its selection rule, the chunk.

    ``fill``: what the channels ``max_channels`` leaves out weigh. The graph has only ``zero`` (Faster
    Score-CAM, weight 0), not the Python ``Explainer``'s default ``kernel`` fill, so a cap must come with
    ``fill="zero"`` asked for explicitly (:func:`check_fill`).
    """

    preset: str = "paper"
    max_channels: int | None = None
    chunk: int | None = None
    select: str = "auto"
    external_data: bool = False  # keep a classifier's external weights external even when one file would do
    fill: str | None = None


def check_fill(max_channels: int | None, fill: str | None, flags: bool = False) -> None:
    """Refuse (one line) a channel cap without an explicit ``fill="zero"``, and any other fill: the graph has
    no kernel (or preview) fill, and a cap alone means the kernel fill everywhere else in the project.
    ``flags``: word the message with the command line's flags."""
    cap, zero = ("--max-channels", "--fill zero") if flags else ("max_channels", "fill='zero'")
    if fill not in (None, "zero"):
        raise GraphBuildError(f"the one-graph explainer has no {fill!r} fill (only the Python Explainer has); "
                              f"use {zero} with {cap} (Faster Score-CAM: the channels left out weigh 0), or no "
                              f"{cap} (exact)")
    if max_channels is not None and fill is None:
        raise GraphBuildError(f"{cap} needs {zero} here: the one-graph explainer has no kernel fill (the "
                              f"Python Explainer's default with a channel cap), so the channels left out weigh 0; "
                              f"add {zero} to accept that, or drop {cap} for exact Score-CAM")


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise GraphBuildError("the classifier imports no default-domain opset")


def _probe(classifier: onnx.ModelProto, input_name: str, outputs: list[str],
           size: tuple[int, int], base_dir=None) -> list[tuple[int, ...]]:
    """Shapes of ``outputs`` for one zero image, from ONNX Runtime (the target layer's K, h, w; C)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(classifier)
    have = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    external.point_to(opts, base_dir)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        res = sess.run(outputs, {input_name: np.zeros((1, 3, *size), np.float32)})
    except Exception as e:  # onnxruntime raises its own exception types
        raise GraphBuildError(f"ONNX Runtime cannot run the classifier: {str(e).splitlines()[0]}") from None
    return [tuple(r.shape) for r in res]


def _rename_graph(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors referenced in ``g`` (and its nested subgraphs) per ``mapping``."""
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_graph(attr.g, mapping)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_graph(sub, mapping)


def _body_classifier(g: onnx.GraphProto, input_name: str) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """The classifier's nodes with every computed tensor (and the input) prefixed, for the Loop body."""
    produced = {o for n in g.node for o in n.output if o}
    mapping = {name: _L + name for name in produced | {input_name}}
    body = onnx.GraphProto()
    body.node.extend(g.node)
    for node in body.node:
        if node.name:
            node.name = _L + node.name
    _rename_graph(body, mapping)
    return list(body.node), mapping


class _Schedule:
    """Which maps the Loop runs, from the activations alone (computed in the body and again after the Loop).

    ``scored`` [K]: the channels whose score enters the weights (all; ``official``: the varying ones; then
    the ``max_channels`` selection rule). ``run_varying``/``run_constant``: scored and (not) constant.
    ``sel`` [K+1] (float 0/1): the maps run, slot K being the zero map of the constant channels; ``perm``
    [K+1+B]: their indices first, in channel order (TopK), then the padding map; ``trips``: ceil(n_run / B),
    at least 1. The map source is ``A`` [K,h,w], then the zero map (index K), then the padding map (K+1),
    a fixed varying ramp whose rows are discarded.
    """

    def __init__(self, k: int, h: int, w: int, chunk: int, preset: Preset, budget: int | None, select: str):
        self.k, self.h, self.w, self.chunk = k, h, w, chunk
        self.preset, self.budget, self.select = preset, budget, select

    def maps(self, b: _Builder, acts: str) -> str:
        h, w = self.h, self.w
        ramp = (np.arange(h * w, dtype=np.float32) / max(h * w - 1, 1)).reshape(1, h, w)
        return b.op("Concat", [acts, b.const(np.zeros((1, h, w)), np.float32, "zero_map"),
                               b.const(ramp, np.float32, "pad_map")], axis=0)  # [K+2,h,w]

    def plan(self, b: _Builder, flat: str, row: str | None = None, scored: str | None = None) -> dict[str, str]:
        """The schedule from ``flat`` [K,hw]; ``row``: ``|W[c,:]|`` for ``relevance``; ``scored``: the scored
        channels when already known (after the Loop: the body's, carried out)."""
        k, chunk = self.k, self.chunk
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        constant = b.op("Equal", [b.reduce("ReduceMax", flat, [1], 0), b.reduce("ReduceMin", flat, [1], 0)])
        varying = b.op("Not", [constant])
        if scored is None:
            scored = varying if self.preset.skip_constant else b.const(np.ones(k, bool), np.bool_, "all")
            if self.budget is not None and self.budget < k:
                scored = SELECTIONS[self.select](b, flat, scored, self.budget, row)
        run_varying = b.op("And", [scored, varying])
        run_constant = b.op("And", [scored, constant])
        any_constant = b.reduce("ReduceMax", b.cast(run_constant, f32), [0], keepdims=1)  # [1], 0 or 1
        sel = b.op("Concat", [b.cast(run_varying, f32), any_constant], axis=0)
        n_run = b.cast(b.reduce("ReduceSum", sel, [0], keepdims=0), i64)
        order_key = b.op("Mul", [sel, b.const(np.arange(k + 1, 0, -1), np.float32)])
        _, perm = b.op("TopK", [order_key, b.const([k + 1], np.int64)], n_out=2, axis=0, largest=1, sorted=1)
        ran = b.op("Less", [b.const(np.arange(k + 1), np.int64), n_run])  # the padding map after the maps run
        perm = b.op("Where", [ran, perm, b.const(k + 1, np.int64)])
        perm = b.op("Concat", [perm, b.const(np.full(chunk, k + 1), np.int64, "pad")], axis=0)
        trips = b.op("Div", [b.op("Add", [n_run, b.const(chunk - 1, np.int64)]), b.const(chunk, np.int64)])
        trips = b.op("Max", [trips, b.const(1, np.int64)])  # at least one (discarded) chunk: never an empty scan
        return {"scored": scored, "run_varying": run_varying, "run_constant": run_constant, "sel": sel,
                "perm": perm, "trips": trips, "n_run": n_run}


def build_explainer(bundle: Bundle, options: Options = Options(), source: Path | None = None) -> onnx.ModelProto:
    """The explainer graph of ``bundle`` (see the module docstring); checked with ``full_check``."""
    preset = get_preset(options.preset)
    if options.select not in SELECTS:
        raise GraphBuildError(f"unknown channel selection {options.select!r}; choose one of {', '.join(SELECTS)}")
    if options.max_channels is not None and int(options.max_channels) < 1:
        raise GraphBuildError(f"max channels must be >= 1, got {options.max_channels}")
    if options.chunk is not None and int(options.chunk) < 1:
        raise GraphBuildError(f"chunk size must be >= 1, got {options.chunk}")
    check_fill(options.max_channels, options.fill)
    classifier, meta = bundle.model, bundle.meta
    pre = meta.preprocessing
    size = (int(pre.input_size[0]), int(pre.input_size[1]))
    opset = _opset(classifier)
    if opset < MIN_OPSET:
        raise GraphBuildError(f"the classifier's opset is {opset}; the explainer graph needs >= {MIN_OPSET}")
    if bundle.max_batch:
        raise GraphBuildError(f"the classifier's batch size is fixed at {bundle.max_batch}: the explainer graph "
                              "scores chunks of masks and needs a dynamic batch dimension")
    g0 = classifier.graph
    inits = {i.name for i in g0.initializer}
    inputs = [i for i in g0.input if i.name not in inits]
    if len(inputs) != 1:
        raise GraphBuildError(f"the classifier has {len(inputs)} inputs; the explainer graph needs exactly one")
    input_name = inputs[0].name
    class_output = g0.output[0].name
    features_output = target_tensor(bundle.features.graph, {o for n in g0.node for o in n.output})
    if features_output not in {o for n in g0.node for o in n.output}:
        raise GraphBuildError(f"the target layer {features_output!r} is not a tensor of the classifier graph")
    data_dir = bundle.data_dir
    c_shape, feat_shape = _probe(classifier, input_name, [class_output, features_output], size, data_dir)
    if len(c_shape) != 2 or len(feat_shape) != 4:
        raise GraphBuildError(f"the classifier must give [1,C] scores and a [1,K,h,w] target layer, got "
                              f"{list(c_shape)} and {list(feat_shape)}")
    n_classes = int(c_shape[1])
    k, h, w = (int(v) for v in feat_shape[1:])
    chunk = int(options.chunk or default_chunk(size))
    budget = int(options.max_channels) if options.max_channels else None
    # the selection rule, resolved as Explainer.selection: relevance needs a global-pooling -> linear head
    head = linear_head(classifier, features_output, class_output, base_dir=data_dir)
    if meta.output_kind == "probabilities":
        head = None  # a softmax after the linear layer (as the runtime: no closed form)
    select = options.select if options.select != "auto" else "relevance" if head is not None else "std"
    if select == "relevance" and (head is None or not head.weight_name):
        raise GraphBuildError(f"select 'relevance' needs a global-pooling -> linear head after the target layer "
                              f"({meta.layer!r}), and this model has another head; use select 'std'")

    b = _Builder(opset, _G)
    f32, i64, boolean = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    sched = _Schedule(k, h, w, chunk, preset, budget, select)

    # 1. preprocessing: uint8 [1,H,W,3] RGB -> float32 [1,3,H,W]
    pix = b.cast(PIXELS, f32)
    if pre.color_order == "BGR":
        pix = b.op("Gather", [pix, b.const([2, 1, 0], np.int64)], axis=3)
    pix = b.op("Mul", [pix, b.const(pre.scale, np.float32)])
    pix = b.op("Sub", [pix, b.const(pre.mean, np.float32)])
    pix = b.op("Div", [pix, b.const(pre.std, np.float32)])
    b.nodes.append(helper.make_node("Transpose", [pix], [IMAGE], name=_G + "nchw", perm=[0, 3, 1, 2]))

    # 2. the Loop. Iteration 0 runs the image itself (the zero map with offset 1: x * 1) and gives the logits
    # f(x) and the activations A, from which the schedule (which maps, in which order, how many chunks) is
    # computed; iteration i >= 1 runs chunk i-1 of B maps. Loop-carried: A [K,h,w], the schedule perm, the
    # number of maps run, the class explained and the scored channels (the main graph's schedule takes them
    # from the body, which alone reads the head's weight W).
    lb = _Builder(opset, _L + "x/")
    it, cond, acts_in, perm_in, nrun_in, cls_in, scored_in = (
        _L + t for t in ("iter", "cond", "acts_in", "perm_in", "nrun_in", "cls_in", "scored_in"))
    first = lb.op("Equal", [it, lb.const(0, np.int64)])
    start = lb.op("Where", [first, lb.const(0, np.int64),
                            lb.op("Mul", [lb.op("Sub", [it, lb.const(1, np.int64)]), lb.const(chunk, np.int64)])])
    # this chunk's size: B, less in the last chunk (never 0: with nothing to run, one discarded padding map)
    left = lb.op("Max", [lb.op("Min", [lb.op("Sub", [nrun_in, start]), lb.const(chunk, np.int64)]),
                         lb.const(1, np.int64)])
    n = lb.op("Where", [first, lb.const(1, np.int64), left])
    start = lb.unsqueeze(start, [0])
    idx = lb.op("Slice", [perm_in, start, lb.op("Add", [start, lb.unsqueeze(n, [0])]), lb.const([0], np.int64)])
    chunk_maps = lb.op("Gather", [sched.maps(lb, acts_in), idx], axis=0)  # [n,h,w]
    lb.nodes += [
        helper.make_node("Unsqueeze", [chunk_maps, *([lb.const([1], np.int64)] if opset >= 13 else [])], [MAPS],
                         name=_L + "maps", **({} if opset >= 13 else {"axes": [1]})),
        helper.make_node("Where", [first, lb.const(1.0, np.float32), lb.const(preset.mask.eps, np.float32)], [EPS],
                         name=_L + "eps"),  # eps 1 for the image: norm(0) = 0 / (0 + 1) in every preset
        helper.make_node("Reshape", [lb.op("Where", [first, lb.const(1.0, np.float32), lb.const(0.0, np.float32)]),
                                     lb.const([1, 1, 1, 1], np.int64)], [OFFSET], name=_L + "offset"),
    ]
    lb.nodes += mask_nodes(preset.mask, size, opset, _L + input_name, offset=True)
    body_nodes, renamed = _body_classifier(g0, input_name)
    lb.nodes += body_nodes
    feats = lb.op("Gather", [renamed[features_output], lb.const(0, np.int64)], axis=0)  # [K,h,w] of row 0
    acts_out = lb.op("Where", [first, lb.reshape(feats, [k, h, w]), acts_in])
    # the class: class_index, or (negative) the top-1 class of iteration 0's logits f(x); then carried
    top1 = lb.op("Slice", [lb.op("ArgMax", [renamed[class_output]], axis=1, keepdims=0), lb.const([0], np.int64),
                           lb.const([1], np.int64)])
    cls_now = lb.op("Where", [lb.op("Less", [CLASS_INDEX, lb.const([0], np.int64)]), top1, CLASS_INDEX])
    cls_out = lb.op("Where", [first, cls_now, cls_in])
    row = None
    if select == "relevance" and budget is not None and budget < k:  # |W[c,:]| [K] float64, W = scale * T
        axis = int(head.weight_axis)
        row = lb.reshape(lb.op("Gather", [renamed.get(head.weight_name, head.weight_name), cls_out], axis=axis), [k])
        row = lb.cast(row, TensorProto.DOUBLE)
        if head.weight_scale != 1.0:
            row = lb.op("Mul", [row, lb.const(head.weight_scale, np.float64)])
        row = lb.op("Abs", [row])
    plan = sched.plan(lb, lb.reshape(acts_out, [k, h * w]), row)
    lb.nodes.append(helper.make_node("Identity", [acts_out], [_L + "acts_out"], name=_L + "acts_out"))
    lb.nodes.append(helper.make_node("Identity", [plan["perm"]], [_L + "perm_out"], name=_L + "perm_out"))
    lb.nodes.append(helper.make_node("Identity", [plan["n_run"]], [_L + "nrun_out"], name=_L + "nrun_out"))
    lb.nodes.append(helper.make_node("Identity", [cls_out], [_L + "cls_out"], name=_L + "cls_out"))
    lb.nodes.append(helper.make_node("Identity", [plan["scored"]], [_L + "scored_out"], name=_L + "scored_out"))
    lb.nodes.append(helper.make_node("Less", [it, plan["trips"]], [_L + "cond_out"], name=_L + "cond_out"))
    pads = lb.op("Concat", [lb.const([0, 0], np.int64), lb.unsqueeze(lb.op("Sub", [lb.const(chunk, np.int64), n]), [0]),
                            lb.const([0], np.int64)], axis=0)
    lb.nodes.append(helper.make_node("Pad", [renamed[class_output], pads], [_L + "scores"], name=_L + "scores"))
    body = helper.make_graph(
        lb.nodes, "scorecam_chunk",
        [helper.make_tensor_value_info(it, i64, []), helper.make_tensor_value_info(cond, boolean, []),
         helper.make_tensor_value_info(acts_in, f32, [k, h, w]),
         helper.make_tensor_value_info(perm_in, i64, [k + 1 + chunk]), helper.make_tensor_value_info(nrun_in, i64, []),
         helper.make_tensor_value_info(cls_in, i64, [1]), helper.make_tensor_value_info(scored_in, boolean, [k])],
        [helper.make_tensor_value_info(_L + "cond_out", boolean, []),
         helper.make_tensor_value_info(_L + "acts_out", f32, [k, h, w]),
         helper.make_tensor_value_info(_L + "perm_out", i64, [k + 1 + chunk]),
         helper.make_tensor_value_info(_L + "nrun_out", i64, []),
         helper.make_tensor_value_info(_L + "cls_out", i64, [1]),
         helper.make_tensor_value_info(_L + "scored_out", boolean, [k]),
         helper.make_tensor_value_info(_L + "scores", f32, [chunk, n_classes])],
        list(g0.initializer) + lb.inits)  # the weights live in the body: stored once, and ONNX Runtime's layout
    # optimisations (NCHWc on CPU) apply to them, which they do not to weights read from an outer scope
    acts0 = b.op("ConstantOfShape", [b.const([k, h, w], np.int64)], value=numpy_helper.from_array(
        np.zeros(1, np.float32)))
    perm0 = b.const(np.full(k + 1 + chunk, k), np.int64, "perm0")  # iteration 0 reads slot K, the zero map
    acts, _, _, _, loop_scored, scan = b.op(
        "Loop", [b.const(1 + -(-(k + 1) // chunk), np.int64, "max_trips"), b.const(True, np.bool_, "true"), acts0,
                 perm0, b.const(1, np.int64, "nrun0"), b.const([0], np.int64, "cls0"),
                 b.const(np.zeros(k, bool), np.bool_, "scored0")], n_out=6, tag="loop", body=body)
    base = b.reshape(b.op("Slice", [scan, b.const([0, 0], np.int64), b.const([1, 1], np.int64),
                                    b.const([0, 1], np.int64)]), [1, n_classes])  # f(x)
    scores = b.reshape(b.op("Slice", [scan, b.const([1], np.int64), b.const([2 ** 62], np.int64),
                                      b.const([0], np.int64)]), [-1, n_classes])  # [T*B, C]
    dummy = b.op("Shape", [scores], start=0, end=1) if opset >= 15 else \
        b.op("Slice", [b.op("Shape", [scores]), b.const([0], np.int64), b.const([1], np.int64)])
    scores = b.op("Concat", [scores, b.const(np.zeros((1, n_classes)), np.float32, "zero_row")], axis=0)

    # 3. back to channels: the same schedule from the same A; the row of channel k in the scores (a scored
    # constant channel: the zero map's row; a channel not scored: a zero row)
    flat = b.reshape(acts, [k, h * w])
    plan = sched.plan(b, flat, scored=loop_scored)
    pos = b.cast(b.op("Sub", [b.op("CumSum", [plan["sel"], b.const(0, np.int64)]), b.const(1.0, np.float32)]), i64)
    pos_k = b.op("Slice", [pos, b.const([0], np.int64), b.const([k], np.int64)])
    pos_zero = b.op("Slice", [pos, b.const([k], np.int64), b.const([k + 1], np.int64)])
    rows = b.op("Where", [plan["run_varying"], pos_k, b.op("Where", [plan["run_constant"], pos_zero, dummy])])
    masked = b.op("Gather", [scores, rows], axis=0)  # [K,C]
    scored = plan["scored"]
    class_output = base

    # the class
    top = b.op("ArgMax", [class_output], axis=1, keepdims=0)  # [1], first maximum
    cls = b.op("Where", [b.op("Less", [CLASS_INDEX, b.const([0], np.int64)]), top, CLASS_INDEX])
    b.nodes.append(helper.make_node("Identity", [cls], [EXPLAINED_CLASS], name=_G + "class"))

    # the weights a [1,K]
    ignore = b.op("Not", [scored])
    if preset.name == "official":
        peak = b.reduce("ReduceMax", masked, [1])
        e = b.op("Exp", [b.op("Sub", [masked, peak])])
        probs = b.op("Div", [e, b.reduce("ReduceSum", e, [1])])
        pc = b.reshape(b.op("Gather", [probs, cls], axis=1), [1, k])
        alpha = b.op("Where", [ignore, b.const(0.0, np.float32), pc])
    else:
        s = b.reshape(b.op("Gather", [masked, cls], axis=1), [1, k])
        if preset.name == "torchcam":
            s = b.op("Sub", [s, b.op("Gather", [class_output, cls], axis=1)])
        z = b.op("Where", [ignore, b.const(-np.inf, np.float32), s])
        e = b.op("Exp", [b.op("Sub", [z, b.reduce("ReduceMax", z, [1])])])
        alpha = b.op("Div", [e, b.reduce("ReduceSum", e, [1])])

    # the map: S = sum_k a_k A_k [h,w], then the preset's finishing at H x W
    s_map = b.reshape(b.op("MatMul", [alpha, flat]), [h, w])
    sal = _finish(b, preset, s_map, (h, w), size)
    sal = b.op("Where", [b.op("IsNaN", [sal]), b.const(0.0, np.float32), sal])
    sal = b.op("Clip", [sal, b.const(0.0, np.float32), b.const(1.0, np.float32)])
    b.nodes.append(helper.make_node("Reshape", [sal, b.const([1, *size], np.int64)], [SALIENCY], name=_G + "saliency"))
    if meta.output_kind == "probabilities":
        b.nodes.append(helper.make_node("Identity", [class_output], [PROBABILITIES], name=_G + "probabilities"))
    else:
        b.nodes.append(helper.make_node("Softmax", [class_output], [PROBABILITIES], name=_G + "probabilities",
                                        axis=1))

    graph = helper.make_graph(
        b.nodes, "scorecam_explainer",
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [1, *size, 3]),
         helper.make_tensor_value_info(CLASS_INDEX, i64, [1])],
        [helper.make_tensor_value_info(SALIENCY, f32, [1, *size]),
         helper.make_tensor_value_info(EXPLAINED_CLASS, i64, [1]),
         helper.make_tensor_value_info(PROBABILITIES, f32, [1, n_classes])],
        b.inits)
    model = helper.make_model(graph, opset_imports=list(classifier.opset_import),
                              producer_name="scorecam-onnx exporter explainer")
    model.ir_version = classifier.ir_version  # onnx writes its newest IR; older runtimes refuse it
    source = Path(source or bundle.source or bundle.model_path)
    props = explainer_metadata(bundle, preset, budget, select, chunk, k, (h, w), n_classes,
                               model_sha256(source) if source.is_file() else "")
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if data_dir is not None and external.has_external(model):
        if options.external_data or not external.fits_one_file(model):
            return model  # its tensors point into the bundle's data files: save_explainer relocates and checks
        external.inline(model, data_dir)  # one self-contained file, as for any classifier under 2 GB
    _check(model)
    return model


def _check(model: onnx.ModelProto | str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError and InferenceError
        raise GraphBuildError(f"the explainer graph does not pass onnx.checker: {str(e).splitlines()[0]}") from None


def _finish(b: _Builder, preset: Preset, s: str, low: tuple[int, int], size: tuple[int, int]) -> str:
    """The preset's map at H x W from ``S`` [h,w] (see ``runtime.scorecam._finish_*``)."""
    wy = b.const(interp_matrix(low[0], size[0], False).astype(np.float32), np.float32, "wy")
    wxt = b.const(interp_matrix(low[1], size[1], False).astype(np.float32).T, np.float32, "wxt")

    def up(m: str) -> str:  # Wy @ m @ Wx^T, as runtime.scorecam.upsample
        return b.op("MatMul", [b.op("MatMul", [wy, m]), wxt])

    if preset.name == "paper":
        return b.minmax(up(b.op("Relu", [s])))
    if preset.name == "gradcam":  # c = ReLU(S); c -= min; c /= 1e-7 + max; resize; ReLU, -min, /(1e-7+max)
        cam = b.shift_scale(b.op("Relu", [s]), GRADCAM_EPS, add_eps_first=True)
        return b.shift_scale(b.op("Relu", [up(cam)]), GRADCAM_EPS, add_eps_first=True)
    if preset.name == "torchcam":  # cam = ReLU(S); cam -= min; cam /= max + 1e-8; saliency = minmax(up(cam))
        cam = b.shift_scale(b.op("Relu", [s]), MASK_EPS, add_eps_first=False)
        return b.minmax(up(cam))
    if preset.name == "official":  # minmax(ReLU(up(S)))
        return b.minmax(b.op("Relu", [up(s)]))
    raise GraphBuildError(f"preset {preset.name!r} has no explainer-graph finishing")


def explainer_metadata(bundle: Bundle, preset: Preset, budget: int | None, select: str, chunk: int, k: int,
                       low: tuple[int, int], n_classes: int, source_sha256: str) -> dict[str, str]:
    """The ``metadata_props`` of an explainer graph: the bundle's (role ``explainer``) plus what it computes."""
    meta = bundle.meta
    pre = meta.preprocessing
    props = {
        "format": FORMAT,
        "role": ROLE,
        "layer": meta.layer,
        "input_size": json.dumps([int(pre.input_size[0]), int(pre.input_size[1])]),
        "color_order": pre.color_order,
        "scale": repr(float(pre.scale)),
        "mean": json.dumps([float(v) for v in pre.mean]),
        "std": json.dumps([float(v) for v in pre.std]),
        "output_kind": meta.output_kind,
        "preset": preset.name,
        "max_channels": str(budget) if budget else "all",
        "select": select,
        "fill": "zero",  # the channels a budget leaves out weigh 0 (the graph has no kernel fill)
        "chunk": str(chunk),
        "channels": str(k),
        "feature_size": json.dumps([int(low[0]), int(low[1])]),
        "classes": str(n_classes),
        "source_sha256": source_sha256,
        "inputs": json.dumps({PIXELS: "uint8 [1,H,W,3] RGB at input_size", CLASS_INDEX: "int64 [1], -1: top-1"}),
        "outputs": json.dumps({SALIENCY: "float32 [1,H,W] in [0,1]", EXPLAINED_CLASS: "int64 [1]",
                               PROBABILITIES: "float32 [1,C]"}),
    }
    if meta.labels is not None:
        props["labels"] = json.dumps(list(meta.labels))
    for key, value in meta.versions.items():
        props[f"version.{key}"] = str(value)
    from . import __version__

    props["version.explainer"] = __version__
    return {PREFIX + key: value for key, value in props.items()}
