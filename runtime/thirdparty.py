"""Any ONNX image classifier as a Score-CAM bundle: the feature graph derived from the classifier itself.

:func:`derive_bundle` turns a model file without ``scorecam.*`` metadata into the same
:class:`~runtime.bundle.Bundle` the exporter's bundles give, so the engine and the algorithm stay
unchanged. The classifier is *normalised* to the bundle contract:

- one image input ``input`` float32 [N,3,H,W]: another input name gets an ``Identity`` in front, an
  NHWC input ([N,H,W,3]) a ``Transpose``; a batch dimension fixed to 1 is made dynamic (``Reshape``
  constants such as [1,-1] become [-1,...] / [0,...]) or, when that does not verify, kept at 1
  (scored one masked image at a time, with a warning);
- one 2-D output ``logits`` (``output=`` picks among several; default the first 2-D one, else the first
  [N,C,1,1] / [N,1,1,C] one, which old Caffe/Caffe2, SqueezeNet and TF heads give: it is flattened).
  A trailing ``Softmax``/``LogSoftmax`` over the class axis, reached over reshapes and transposes
  (torch's legacy Transpose-Softmax-Transpose included), is cut off so every preset scores logits as
  DESIGN.md says; the probabilities reported are the softmax of those logits, i.e. the model's own. A
  softmax over another axis is refused (its output carries no class scores);
- opset < 11 (IR 3, initializers listed as inputs, Dropout, LRN, ...) is converted to opset 13 first.

The feature graph is ``onnx.utils.Extractor`` on the normalised classifier, from ``input`` to the
target layer (see :mod:`runtime.graphinfo` for the automatic choice), renamed ``features`` (with a
``Transpose`` when that layer is NHWC). The normalised classifier is checked against the original
model on random inputs (batch 2) before anything is used.

Preprocessing comes from the arguments, else a sidecar JSON beside the model (``resnet.onnx`` ->
``resnet.json`` or ``resnet.onnx.json``; keys ``input_size``, ``mean``, ``std``, ``scale``,
``color_order``, ``labels``), else the defaults: input size from the model (dynamic H/W: 224),
ImageNet mean/std, scale 1/255, RGB.

Derived bundles are cached as ordinary bundle directories (both graphs, metadata, sibling hashes)
under ``$SCORECAM_CACHE`` (default ``~/.cache/scorecam``) ``/<sha256 of the model>/<options>/``,
written to a temporary directory and renamed into place, so concurrent runs never see half a bundle.

A model whose weights are external data (``model.onnx`` + ``model.onnx.data``, torch's default exporter,
any model over 2 GB, data files in a subfolder or split over several files) is read without them: the
graph work needs none, and ONNX Runtime reads them from the model's folder. Its cache entry holds a COPY of
its data files (streamed by the kernel, never read into Python), under the same relative names, so the
derived bundle stays whole and correct when the source is moved, changed or deleted; the cache key (the
"sha256 of the model") covers the data files too, so a changed ``model.onnx.data`` derives a new entry.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import external
from .bundle import (
    Bundle,
    bundle_paths,
    data_files,
    is_bundle_graph,
    load_bundle,
    load_onnx,
    open_bundle,
    opened_before,
    resolve_model_path,
)
from .contract import (
    FEATURES_FILE,
    FEATURES_NAME,
    LOGITS_NAME,
    MODEL_FILE,
    PROBABILITIES_NAME,
    BundleError,
    BundleMeta,
    Preprocessing,
    graph_sha256,
    parse_floats,
    write_metadata,
)
from .graphinfo import NHWC, Candidate, GraphInfo, dims_of, fixed_shapes

DERIVE_VERSION = "2"  # 2: [N,C,1,1] outputs flattened, initializer inputs dropped, IR >= 7
CACHE_ENV = "SCORECAM_CACHE"
DEFAULT_SIZE = 224
DERIVED_FILE = "derived.json"
SIDECAR_KEYS = ("input_size", "mean", "std", "scale", "color_order", "labels",
                "letterbox", "head")  # the last two: detectors only (runtime.detect)
MIN_OPSET = 11
CONVERT_TO_OPSET = 13
MIN_IR_VERSION = 7  # what opset 13 needs (onnx.helper.VERSION_TABLE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------- options


def cache_root() -> Path:
    """``$SCORECAM_CACHE``, else ``~/.cache/scorecam``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scorecam"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the graph file alone; :func:`model_sha256` adds its data files)."""
    return external.file_sha256(path)


def model_sha256(path: Path, proto: onnx.ModelProto | None = None) -> str:
    """sha256 of a model: its file's bytes, and its external data files' when it has some (``proto``:
    the graph read from ``path`` already, else it is read here)."""
    path = Path(path)
    if proto is None:
        proto = load_onnx(path, "model")
    return external.content_sha256(path, data_files(proto, path))


def sidecar_path(model_path: Path) -> Path | None:
    """``<stem>.json`` or ``<name>.json`` beside the model, if there is one."""
    for p in (model_path.with_suffix(".json"), model_path.with_name(model_path.name + ".json")):
        if p.is_file():
            return p
    return None


def read_sidecar(model_path: Path) -> dict:
    """The sidecar JSON's preprocessing (keys :data:`SIDECAR_KEYS`); {} when there is none."""
    p = sidecar_path(Path(model_path))
    if p is None:
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"sidecar {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"sidecar {p} must hold a JSON object with keys {', '.join(SIDECAR_KEYS)}")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise BundleError(f"sidecar {p}: unknown key(s) {', '.join(map(repr, unknown))[:80]}; "
                          f"allowed: {', '.join(SIDECAR_KEYS)}")
    if isinstance(data.get("labels"), str):
        data["labels"] = str((p.parent / data["labels"]).resolve())
    return data


def read_labels(labels) -> tuple[str, ...] | None:
    """Class labels from a list, or from a file: JSON (a list, or {index: name}) or text (one per line)."""
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)):
        return tuple(str(s) for s in labels)
    if not isinstance(labels, (str, os.PathLike)):
        raise BundleError(f"labels must be a list of class names or a file name, got {labels!r}"[:120])
    p = Path(labels)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise BundleError(f"cannot read labels file {p} ({e.strerror or e})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BundleError(f"labels file {p} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            try:
                items = sorted((int(k), str(v)) for k, v in data.items())
            except ValueError:
                raise BundleError(f"labels file {p}: keys must be class indices") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise BundleError(f"labels file {p}: class indices must run 0..{len(items) - 1}")
            return tuple(v for _, v in items)
        if isinstance(data, list):
            return tuple(str(s) for s in data)
        raise BundleError(f"labels file {p} must hold a JSON list or an {{index: name}} object")
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return tuple(lines)


def _size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        vals = [value, value] if isinstance(value, (int, float)) else list(value)
        if len(vals) == 1:
            vals = vals * 2
        if any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in vals):
            raise TypeError
        h, w = (int(v) for v in vals)
    except (TypeError, ValueError, OverflowError):
        raise BundleError(f"input size must be one or two whole numbers (H W), got {value!r}"[:120]) from None
    if h < 1 or w < 1 or len(vals) != 2:
        raise BundleError(f"input size must be two positive whole numbers (H W), got {value!r}")
    return h, w


@dataclass(frozen=True)
class Options:
    """What a user may say about a third-party model (flags over sidecar; None: not said)."""

    layer: str | None = None
    output: str | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    scale: float | None = None
    color_order: str | None = None
    labels: tuple[str, ...] | None = None

    @classmethod
    def make(cls, model_path: Path | None = None, layer=None, output=None, input_size=None, mean=None,
             std=None, scale=None, bgr=None, labels=None, color_order=None) -> Options:
        side = read_sidecar(model_path) if model_path is not None else {}

        def pick(flag, key):
            return flag if flag is not None else side.get(key)

        m, s = pick(mean, "mean"), pick(std, "std")
        order = "BGR" if bgr else (color_order or side.get("color_order"))
        if order is not None and str(order).upper() not in ("RGB", "BGR"):
            raise BundleError(f"colour order must be RGB or BGR, got {order!r}")
        sc = pick(scale, "scale")
        try:
            if isinstance(sc, bool) or not isinstance(sc, (int, float, str, type(None))):
                raise TypeError
            sc = None if sc is None else float(sc)
        except (TypeError, ValueError):
            raise BundleError(f"scale must be a number, got {sc!r}"[:120]) from None
        if sc is not None and (not np.isfinite(sc) or sc == 0):
            raise BundleError(f"scale must be a finite non-zero number, got {sc}")
        opts = cls(layer=layer, output=output, input_size=_size(pick(input_size, "input_size")),
                   mean=None if m is None else parse_floats(m, 3, "mean"),
                   std=None if s is None else parse_floats(s, 3, "std"),
                   scale=sc, color_order=None if order is None else str(order).upper(),
                   labels=read_labels(pick(labels, "labels")))
        opts.preprocessing(opts.input_size or (DEFAULT_SIZE, DEFAULT_SIZE))  # mean, std and scale agree: fail now
        return opts

    def key(self) -> str:
        """A short stable hash of the options (the cache directory under the model's sha256)."""
        text = json.dumps([DERIVE_VERSION, onnx.__version__, self.layer, self.output, self.input_size,
                           self.mean, self.std, self.scale, self.color_order, self.labels])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def preprocessing(self, input_size: tuple[int, int]) -> Preprocessing:
        return Preprocessing(input_size=input_size, color_order=self.color_order or "RGB",
                             scale=1.0 / 255.0 if self.scale is None else self.scale,
                             mean=self.mean or IMAGENET_MEAN, std=self.std or IMAGENET_STD)


# ------------------------------------------------------------------------------ normalising


def _opset(model: onnx.ModelProto) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def _all_names(g: onnx.GraphProto) -> set[str]:
    names = {i.name for i in g.input} | {i.name for i in g.initializer}
    for n in g.node:
        names.update(n.input)
        names.update(n.output)
    return names


def _fresh(name: str, taken: set[str]) -> str:
    return name if name not in taken else next(f"scorecam_{name}{i or ''}" for i in range(1000)
                                                if f"scorecam_{name}{i or ''}" not in taken)


def _shape_text(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


@dataclass
class Prepared:
    """A classifier normalised to the contract's input and output, before a layer is chosen."""

    model: onnx.ModelProto  # the whole normalised graph (output: ``output_name``)
    info: GraphInfo  # on shapes at batch 1 and ``input_size``
    input_name: str
    output_name: str  # the graph output: logits (or probabilities)
    source_input: str  # the original image input
    source_output: str  # the original output picked
    nhwc: bool
    input_size: tuple[int, int]
    output_kind: str
    softmax_cut: str = ""  # "Softmax" / "LogSoftmax" when a trailing one was cut off
    batch: int | None = None  # fixed batch of the normalised graph (None: dynamic)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        shape = self.info.shapes.get(self.output_name)
        return shape[1] if shape and len(shape) == 2 else None


def _image_input(g: onnx.GraphProto) -> tuple[onnx.ValueInfoProto, bool]:
    """The image input and whether it is NHWC; BundleError when there is none."""
    inits = {i.name for i in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    if not real:
        raise BundleError("the model has no input")

    def rank(vi):
        d = dims_of(vi)
        return None if d is None else len(d)

    four = [vi for vi in real if rank(vi) in (4, None)]
    if len(four) != 1:
        desc = ", ".join(f"{vi.name} {_shape_text(dims_of(vi) or ())}" for vi in real)
        raise BundleError(f"the model input is not one image tensor [N,3,H,W] or [N,H,W,3] (inputs: {desc})")
    vi = four[0]
    if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
        t = TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
        raise BundleError(f"the model input {vi.name!r} is {t}; only float32 image inputs are supported")
    d = dims_of(vi)
    if d is None or d[1] == 3 or (d[1] is None and d[3] != 3):
        return vi, False
    if d[3] == 3:
        return vi, True
    raise BundleError(f"the model input {vi.name!r} has shape {_shape_text(d)}: not a 3-channel image "
                      "[N,3,H,W] or [N,H,W,3]")


def prepare(source: onnx.ModelProto, input_size: tuple[int, int] | None = None, output: str | None = None,
            rewrite_batch: bool = True, base_dir=None) -> Prepared:
    """Normalise ``source`` (not modified) to one NCHW ``input`` and one 2-D ``logits`` output (``base_dir``:
    the folder of its external data files, if it has some)."""
    m = onnx.ModelProto()
    m.CopyFrom(source)
    del m.metadata_props[:]
    if base_dir is not None:  # tiny external tensors (shapes, axes) into the graph: ONNX Runtime needs them there
        external.inline_small(m, base_dir)
    warnings: list[str] = []
    opset = _opset(m)
    if opset < MIN_OPSET:
        try:
            m = onnx.version_converter.convert_version(m, CONVERT_TO_OPSET)
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BundleError(f"the model uses opset {opset} and cannot be converted to opset {CONVERT_TO_OPSET} "
                              f"({why})") from None
        opset = _opset(m)
    g = m.graph
    # IR < 4 lists every initializer as a graph input too; a normalised graph has the image as its only
    # input and the IR version its opset needs (IR 7 for opset 13), so it is valid ONNX for any consumer
    inits = {i.name for i in g.initializer}
    for vi_init in [i for i in g.input if i.name in inits]:
        g.input.remove(vi_init)
    m.ir_version = max(m.ir_version, MIN_IR_VERSION)
    vi, nhwc = _image_input(g)
    d = dims_of(vi) or (None, None, None, None)
    model_hw = (d[1], d[2]) if nhwc else (d[2], d[3])
    if input_size is not None:
        for have, want, what in zip(model_hw, input_size, ("height", "width"), strict=True):
            if have is not None and have != want:
                raise BundleError(f"the model takes a fixed {what} of {have}; input size "
                                  f"{input_size[0]}x{input_size[1]} does not fit (use {model_hw[0]}x{model_hw[1]})")
        size = input_size
    elif None not in model_hw:
        size = (int(model_hw[0]), int(model_hw[1]))
    else:
        size = (DEFAULT_SIZE, DEFAULT_SIZE)
        warnings.append(f"the model's input size is dynamic and none was given: using {DEFAULT_SIZE}x{DEFAULT_SIZE} "
                        "(set it with --size H W or the sidecar's input_size)")
    fixed_batch = d[0]
    batch = None if fixed_batch is None or rewrite_batch else int(fixed_batch)
    rewrite = fixed_batch is not None and rewrite_batch

    # ---- the input: ``input`` [N,3,H,W] float32 (Identity / Transpose in front of the old name)
    taken = _all_names(g)
    old = vi.name
    new = "input" if old == "input" and not nhwc else _fresh("input", taken)
    hw = [size[0] if model_hw[0] is not None else "H", size[1] if model_hw[1] is not None else "W"]
    new_vi = helper.make_tensor_value_info(new, TensorProto.FLOAT, [batch or "N", 3, *hw])
    position = [i.name for i in g.input].index(old)
    g.input.remove(g.input[position])
    g.input.insert(0, new_vi)
    if nhwc:
        g.node.insert(0, helper.make_node("Transpose", [new], [old], perm=[0, 2, 3, 1], name="scorecam_nchw_to_nhwc"))
    elif new != old:
        g.node.insert(0, helper.make_node("Identity", [new], [old], name="scorecam_input"))
    if rewrite:
        del g.value_info[:]  # stale batch-1 shapes; ONNX Runtime would hold the graph to them

    shapes = fixed_shapes(m, new, (1, 3, *size), base_dir)
    info = GraphInfo(m, new, shapes, base_dir)

    # ---- the output: class scores [N,C] (or [N,C,1,1], [N,1,1,C]: flattened); a trailing Softmax is cut off
    outs = [o.name for o in g.output]
    if output is None:
        flat = [o for o in outs if _classes_of(shapes.get(o)) is not None]
        if not flat:
            desc = ", ".join(f"{o} {_shape_text(shapes.get(o) or ())}" for o in outs)
            raise BundleError(f"the model has no class-score output [N,C] (or [N,C,1,1]) (outputs: {desc}); "
                              "it does not look like an image classifier")
        out = next((o for o in flat if len(shapes[o]) == 2), flat[0])
    else:
        if output not in info.producer:
            close = difflib.get_close_matches(output, outs + info.tensor_names(), n=3, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else f"; outputs: {', '.join(outs)}"
            raise BundleError(f"output {output!r} is not a tensor of this model{hint}")
        out = output
        if _classes_of(shapes.get(out)) is None:
            raise BundleError(f"output {out!r} has shape {_shape_text(shapes.get(out) or ())}; "
                              "the class scores must be a 2-D [N,C] tensor (or [N,C,1,1], [N,1,1,C])")
    if out not in info.dynamic:
        raise BundleError(f"output {out!r} does not depend on the image input")
    classes = _classes_of(shapes[out])
    scores, kind, cut = _cut_softmax(info, out, classes, opset)
    if not cut:
        t, hops = out, 0
        while hops < 8 and t in info.producer:
            n = info.producer[t]
            if n.op_type in ("Softmax", "Sigmoid"):
                if n.op_type == "Softmax":
                    kind = "probabilities"
                    warnings.append(f"the output {out!r} is a softmax that cannot be cut off; masked inputs are "
                                    "scored by probabilities, so the logit-based presets differ from DESIGN.md")
                break
            if n.op_type not in SHAPE_OPS:
                break
            t, hops = n.input[0], hops + 1
    final = scores if scores == (LOGITS_NAME if kind == "logits" else PROBABILITIES_NAME) and \
        len(shapes[scores]) == 2 else _fresh(LOGITS_NAME if kind == "logits" else PROBABILITIES_NAME, _all_names(g))
    if len(shapes[scores]) != 2:  # [N,C,1,1], [N,1,1,C], ...: one non-1 dim besides the batch, so order is kept
        g.node.append(helper.make_node("Flatten", [scores], [final], axis=1, name="scorecam_flatten"))
    elif final != scores:
        g.node.append(helper.make_node("Identity", [scores], [final], name="scorecam_output"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, [batch or "N", classes]))
    shapes[final] = (shapes[scores][0], classes)

    if rewrite:
        _free_batch(m, GraphInfo(m, new, shapes, base_dir))
    info = GraphInfo(m, new, shapes, base_dir)
    return Prepared(m, info, new, final, old, out, nhwc, size, kind, cut, batch, warnings)


#: ops that only reshape or reorder a tensor (walked over between the class scores and a trailing softmax)
SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose")


def _classes_of(shape) -> int | None:
    """C when ``shape`` holds class scores: [N,C], or a batch dim and one dim > 1 among 1s ([N,C,1,1],
    [N,1,1,C]: old Caffe/Caffe2, SqueezeNet and TF heads); else None."""
    if not shape or len(shape) < 2 or shape[0] not in (1, None) or any(d is None for d in shape[1:]):
        return None
    if len(shape) == 2:
        return int(shape[1])
    big = [int(d) for d in shape[1:] if d != 1]
    return big[0] if len(big) == 1 else None


def _cut_softmax(info: GraphInfo, out: str, classes: int, opset: int) -> tuple[str, str, str]:
    """(scores, kind, cut): the tensor before a trailing Softmax / LogSoftmax over the class axis, reached
    from ``out`` over reshapes and transposes only, else ``out`` itself. A softmax over another axis is
    refused: its output carries no class scores."""
    t, hops = out, 0
    while hops < 8 and t in info.producer:
        node = info.producer[t]
        if node.op_type in ("Softmax", "LogSoftmax"):
            src = node.input[0]
            shape = info.shapes.get(src) or ()
            if _classes_of(shape) != classes:
                return out, "logits", ""
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            axis = axis + len(shape) if axis < 0 else axis
            # opset < 13 flattens to [prod(d[:axis]), prod(d[axis:])]: class scores iff d[1:axis] are all 1
            over_classes = 0 < axis < len(shape) and \
                (shape[axis] == classes if opset >= 13 else all(d == 1 for d in shape[1:axis]))
            if not over_classes:
                raise BundleError(f"the model's {node.op_type} runs over axis {axis} of {_shape_text(shape)}, "
                                  "not over the classes: its output carries no class scores")
            return src, "logits", node.op_type
        if node.op_type not in SHAPE_OPS or not node.input:
            break
        t, hops = node.input[0], hops + 1
    return out, "logits", ""


def _free_batch(m: onnx.ModelProto, info: GraphInfo) -> None:
    """Make ``Reshape`` targets that spell out batch 1 ([1,-1], [1,C,h,w]) batch-agnostic: -1 or 0 (copy)."""
    g = m.graph
    taken = _all_names(g)
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in info.dynamic:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)  # torch's dynamo exporter sets it
        value = info.constant_value(node.input[1])
        data_shape = info.shapes.get(node.input[0]) or ()
        if value is None or value.ndim != 1 or value.size < 1 or int(value[0]) != 1 or \
                not data_shape or data_shape[0] != 1:
            continue
        fixed = np.asarray(value, np.int64).copy()
        if allowzero and ((fixed[1:] == -1).any() or (fixed == 0).any()):
            continue  # a 0 is a literal zero there: no way to copy the batch dim, and two -1 are not allowed
        fixed[0] = 0 if (fixed[1:] == -1).any() else -1
        name = _fresh(node.input[1] + "_anybatch", taken)
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(fixed, name))
        node.input[1] = name


# --------------------------------------------------------------------------------- deriving


@dataclass
class Derived:
    """A normalised classifier and its feature graph, ready to become a bundle."""

    classifier: onnx.ModelProto
    features: onnx.ModelProto
    layer: str
    prepared: Prepared

    @property
    def max_batch(self) -> int | None:
        return self.prepared.batch


def list_layers(model, input_size: tuple[int, int] | None = None, output: str | None = None,
                base_dir=None) -> list[Candidate]:
    """Every candidate target layer (4-D maps the output is computed from), the automatic one marked.

    ``model`` is a path or a ModelProto (``base_dir``: the folder of its external data, if it has some).
    Shapes are at batch 1 and ``input_size``.
    """
    if not isinstance(model, onnx.ModelProto):
        base_dir = Path(model).parent
        model = load_onnx(Path(model), "model")
    p = prepare(model, _size(input_size), output, rewrite_batch=False, base_dir=base_dir)
    try:
        auto = p.info.auto_layer(p.output_name)
    except BundleError:
        auto = None
    return p.info.candidates(p.output_name, auto)


def format_layers(cands: Sequence[Candidate]) -> str:
    """The ``--list-layers`` text: one candidate per line, ``*`` on the automatic choice."""
    if not cands:
        return "no 4-D feature map with a spatial size > 1 feeds the output"
    lines = [("* " if c.auto else "  ") + c.describe() for c in cands]
    return "\n".join(lines + ["(* = the automatic choice; pick another with --layer NAME)"])


def _extract(m: onnx.ModelProto, input_name: str, output_name: str, what: str) -> onnx.ModelProto:
    try:
        out = onnx.utils.Extractor(m).extract_model([input_name], [output_name])
    except Exception as e:
        raise BundleError(f"cannot extract the {what} from the model ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    known = {i.name for i in out.graph.input} | {i.name for i in out.graph.initializer}
    for n in out.graph.node:
        known.update(n.output)
    missing = sorted({i for n in out.graph.node for i in n.input if i and i not in known})
    if missing:
        raise BundleError(f"the {what} needs inputs other than the image ({', '.join(missing[:3])}); "
                          "only single-input image classifiers are supported")
    return out


def derive(source: onnx.ModelProto, layer: str | None = None, output: str | None = None,
           input_size: tuple[int, int] | None = None, rewrite_batch: bool = True, base_dir=None) -> Derived:
    """Normalise ``source`` and extract its feature graph at ``layer`` (None: the automatic choice).
    External tensors stay external (the same locations: both graphs read the data files under ``base_dir``)."""
    p = prepare(source, input_size, output, rewrite_batch, base_dir)
    info = p.info
    name = info.resolve_layer(layer, p.output_name) if layer else info.auto_layer(p.output_name)
    cand = info.candidate(name)
    m = p.model
    g = m.graph
    feat = _fresh(FEATURES_NAME, _all_names(g)) if name != FEATURES_NAME or cand.layout == NHWC else name
    if cand.layout == NHWC:
        g.node.append(helper.make_node("Transpose", [name], [feat], perm=[0, 3, 1, 2], name="scorecam_features"))
    elif feat != name:
        g.node.append(helper.make_node("Identity", [name], [feat], name="scorecam_features"))
    dynamic_hw = any(isinstance(d.dim_param, str) and d.dim_param for d in g.input[0].type.tensor_type.shape.dim[2:])
    h, w = cand.spatial
    g.output.append(helper.make_tensor_value_info(
        feat, TensorProto.FLOAT, [p.batch or "N", cand.channels, "h" if dynamic_hw else h, "w" if dynamic_hw else w]))
    classifier = _extract(m, p.input_name, p.output_name, "classifier")
    features = _extract(m, p.input_name, feat, "feature graph")
    for proto in (classifier, features):
        proto.producer_name = "scorecam-derive"
        proto.producer_version = DERIVE_VERSION
    return Derived(classifier, features, name, p)


def _session(proto: onnx.ModelProto, what: str, base_dir=None):
    """A CPU session for checking a derived graph (no Engine exists yet at this point); its external data,
    if any, read by ONNX Runtime from ``base_dir``."""
    import onnxruntime as ort

    from .engine import CPU, session_options

    opts = session_options()
    opts.log_severity_level = 4  # a graph that fails to run is reported by verify() in one line, not logged
    external.point_to(opts, base_dir)
    if base_dir is not None and any(external.nbytes(t) is not None and external.nbytes(t) <= external.SMALL
                                    for t in external.external_tensors(proto)):
        light = onnx.ModelProto()
        light.CopyFrom(proto)
        external.inline_small(light, base_dir)
        proto = light
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=[CPU])
    except Exception as e:
        raise BundleError(f"ONNX Runtime cannot load the {what}: {str(e).splitlines()[0]}") from None


def verify(source: onnx.ModelProto, d: Derived, seed: int = 0, base_dir=None) -> str | None:
    """Check the normalised classifier on random images, at batch 2 when its batch is dynamic, against
    ``source`` (or, when the output picked is an inner tensor, against itself at batch 1).

    None when they agree, else why not.
    """
    p = d.prepared
    h, w = p.input_size
    rng = np.random.default_rng(seed)
    n = 1 if p.batch == 1 else 2
    x = rng.standard_normal((n, 3, h, w)).astype(np.float32)
    ours = _session(d.classifier, "normalised classifier", base_dir)
    try:
        got_all = ours.run(None, {p.input_name: x})[0].astype(np.float64)
    except Exception as e:
        return f"it does not run at batch {n} ({str(e).splitlines()[0]})"
    src = _session(source, "model", base_dir)
    src_out = next((o.name for o in src.get_outputs() if o.name == p.source_output), None)
    for i in range(n):
        got = got_all[i:i + 1]
        if src_out is None:
            want = ours.run(None, {p.input_name: x[i:i + 1]})[0].astype(np.float64)
        else:
            xi = x[i:i + 1].transpose(0, 2, 3, 1) if p.nhwc else x[i:i + 1]
            want = np.asarray(src.run([src_out], {p.source_input: np.ascontiguousarray(xi)})[0], np.float64)
            if p.softmax_cut:
                z = got - got.max(axis=-1, keepdims=True)
                z = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
                got = np.exp(z) if p.softmax_cut == "Softmax" else z
        if want.size != got.size:
            return f"its output has {got.size} values per image, the model's {want.size}"
        want = want.reshape(got.shape)
        if not np.allclose(got, want, rtol=1e-3, atol=1e-4, equal_nan=True):  # the same NaN is a faithful copy
            return f"its outputs differ from the model's (max |diff| {np.abs(got - want).max():.3g})"
    return None


def derive_checked(source: onnx.ModelProto, layer: str | None = None, output: str | None = None,
                   input_size: tuple[int, int] | None = None, base_dir=None) -> Derived:
    """:func:`derive` + :func:`verify`; a fixed batch that does not become dynamic stays fixed (a warning)."""
    d = derive(source, layer, output, input_size, base_dir=base_dir)
    why = verify(source, d, base_dir=base_dir)
    if why is None:
        return d
    if (dims_of(_image_input(source.graph)[0]) or (None,))[0] is not None:
        d1 = derive(source, layer, output, input_size, rewrite_batch=False, base_dir=base_dir)
        if verify(source, d1, base_dir=base_dir) is None:
            d1.prepared.warnings.append(f"the model's batch size is fixed to {d1.max_batch} and could not be made "
                                        "dynamic; masked images are scored one at a time (slower)")
            return d1
    raise BundleError(f"the normalised classifier does not reproduce the model: {why}")


def make_meta(d: Derived, opts: Options, source_sha: str = "") -> BundleMeta:
    """Bundle metadata for a derived pair (preprocessing from ``opts`` and the resolved input size)."""
    p = d.prepared
    labels = opts.labels
    if labels is not None and p.num_classes is not None and len(labels) != p.num_classes:
        raise BundleError(f"{len(labels)} labels given for a model with {p.num_classes} classes")
    versions = {"scorecam_derive": DERIVE_VERSION, "onnx": onnx.__version__, "opset": str(_opset(d.classifier))}
    if source_sha:
        versions["source_sha256"] = source_sha
    return BundleMeta("classifier", d.layer, opts.preprocessing(p.input_size), p.output_kind, labels,
                      versions=versions)


def write_pair(d: Derived, meta: BundleMeta, model_path: Path, features_path: Path) -> None:
    """Write both graphs with each other's hash (the bundle contract); their external data files, if any,
    must be in the folder already (the hashes cover them)."""
    folder = Path(model_path).parent
    write_metadata(d.classifier, meta.with_role("classifier", graph_sha256(d.features, folder)))
    write_metadata(d.features, meta.with_role("features", graph_sha256(d.classifier, folder)))
    onnx.save(d.classifier, str(model_path))
    onnx.save(d.features, str(features_path))


def _record(d: Derived, source: Path) -> dict:
    p = d.prepared
    return {"source": str(source), "layer": d.layer, "output": p.source_output, "output_kind": p.output_kind,
            "softmax_cut": p.softmax_cut, "input": p.source_input, "nhwc": p.nhwc, "max_batch": d.max_batch,
            "input_size": list(p.input_size), "warnings": p.warnings}


def _staging(target: Path, source: Path, data: list[str]) -> Path | None:
    """A temporary directory beside ``target`` holding a copy of the source's external data files (under
    their relative names); None, with a warning, when the cache cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError as e:
        _warn(f"cannot write the cache {target.parent} ({e.strerror or e}); deriving again next time")
        return None
    try:
        if data:
            size = sum(os.path.getsize(source.parent / loc) for loc in data)
            if size > 256 << 20:
                print(f"copying {size / 1e9:.2f} GB of external data of {source.name} into the cache {target}",
                      file=sys.stderr)
            external.copy_data(data, source.parent, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _warn(f"cannot copy the external data of {source} into the cache {target.parent} ({e.strerror or e}); "
              "deriving again next time")
        return None
    return tmp


def _write_cache(d: Derived, meta: BundleMeta, target: Path, source: Path, tmp: Path) -> bool:
    """Write the bundle into ``target`` atomically (``tmp``, a :func:`_staging` dir, renamed); False when the
    cache is unwritable. ``tmp`` is gone afterwards either way."""
    try:
        write_pair(d, meta, tmp / MODEL_FILE, tmp / FEATURES_FILE)
        (tmp / DERIVED_FILE).write_text(json.dumps(_record(d, source), indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote it first: theirs is as good as ours
            if not (target / MODEL_FILE).is_file():
                raise
        return True
    except OSError as e:
        _warn(f"cannot write the cache {target} ({e.strerror or e}); deriving again next time")
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_model(model, **derive) -> Bundle:
    """A :class:`Bundle` for any model: a bundle (directory, ``model.onnx`` or name) is opened as it is;
    a classifier without bundle metadata gets its feature graph derived (:func:`derive_bundle`, which
    takes ``derive``: layer, output, input_size, mean, std, scale, bgr, labels)."""
    directory, model_path = bundle_paths(model)
    seen = opened_before(directory, model_path, **derive)  # a bundle this process opened: nothing parsed again
    if seen is not None:
        return seen
    proto = load_onnx(model_path, "classifier graph")
    if is_bundle_graph(proto):
        return open_bundle(directory, model_path, proto, **derive)
    return derive_bundle(model_path, source=proto, **derive)


def derive_bundle(path, layer: str | None = None, output: str | None = None, input_size=None, mean=None,
                  std=None, scale=None, bgr: bool | None = None, labels=None, cache: bool = True,
                  source: onnx.ModelProto | None = None) -> Bundle:
    """A :class:`Bundle` for a model file with no bundle metadata (see the module docstring).

    Args:
        path: the ONNX classifier.
        layer: target tensor (a tensor name, a node name or a torch module path); None: automatic.
        output: the class-score output when the model has several; None: the first 2-D one.
        input_size, mean, std, scale, bgr, labels: preprocessing; None: the sidecar's, else defaults.
        cache: reuse / write the derived bundle under :func:`cache_root`.
        source: the model file's graph, when the caller has read it already.
    """
    path = Path(path)
    opts = Options.make(path, layer, output, input_size, mean, std, scale, bgr, labels)
    if source is None:
        source = load_onnx(path, "model")
    data = data_files(source, path)  # checked: inside the model's folder, present, long enough
    sha = external.content_sha256(path, data)
    target = cache_root() / sha / opts.key()
    if cache and (target / MODEL_FILE).is_file():
        try:
            bundle = load_bundle(target)
            record = json.loads((target / DERIVED_FILE).read_text())
        except (BundleError, OSError, ValueError):
            pass  # a damaged cache entry: derive again
        else:
            for w in record.get("warnings", []):
                _warn(w)
            bundle.source = path
            bundle.max_batch = record.get("max_batch")
            return bundle
    # with external data, the cache entry's own copy of the data files is what every graph reads from now on
    # (the derivation's checks included), so the entry never depends on the source folder's layout
    tmp = _staging(target, path, data) if cache else None
    base = (tmp if tmp is not None else path.parent) if data else None
    try:
        d = derive_checked(source, opts.layer, opts.output, opts.input_size, base_dir=base)
        meta = make_meta(d, opts, sha)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for w in d.prepared.warnings:
        _warn(w)
    if tmp is not None and _write_cache(d, meta, target, path, tmp):
        bundle = load_bundle(target)
    else:
        base = path.parent if data else None  # the staging copy is gone: the source's own files
        write_metadata(d.classifier, meta.with_role("classifier", graph_sha256(d.features, base)))
        write_metadata(d.features, meta.with_role("features", graph_sha256(d.classifier, base)))
        bundle = Bundle(path.parent, path, path, d.classifier, d.features, meta, data_dir=base,
                        data_files=tuple(data))
    bundle.source = path
    bundle.max_batch = d.max_batch
    return bundle


# --------------------------------------------------------------------------------------- the CLI


def add_arguments(parser) -> None:
    """The ``runtime.explain`` flags for models without bundle metadata (an argparse parser or group)."""
    g = parser.add_argument_group("models without bundle metadata (any ONNX image classifier)")
    g.add_argument("--layer", metavar="NAME", default=None,
                   help="target layer: a tensor, node or torch module name (default: the map feeding the "
                        "global pooling; see --list-layers)")
    g.add_argument("--model-output", metavar="NAME", default=None,
                   help="the class-score output of a model with several (default: the first 2-D one)")
    g.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="input size (default: the sidecar MODEL.json's, else the model's, else 224 224)")
    g.add_argument("--mean", nargs=3, metavar="M", default=None, help="x = (pixel*scale - mean)/std "
                   "(default: the sidecar's, else ImageNet 0.485 0.456 0.406)")
    g.add_argument("--std", nargs=3, metavar="S", default=None,
                   help="(default: the sidecar's, else ImageNet 0.229 0.224 0.225)")
    g.add_argument("--scale", type=float, metavar="S", default=None, help="pixel scale (default 1/255)")
    g.add_argument("--bgr", action="store_true", help="the model takes BGR pixels (default RGB)")
    g.add_argument("--labels", metavar="FILE", default=None,
                   help="class labels: text, one per line, or JSON (list or {index: name})")
    g.add_argument("--list-layers", action="store_true",
                   help="print the candidate target layers of MODEL (the automatic one marked *) and exit")


def cli_kwargs(args) -> dict:
    """``Explainer`` keyword arguments from the flags of :func:`add_arguments`."""
    return {"layer": args.layer, "output": args.model_output, "input_size": args.size, "mean": args.mean,
            "std": args.std, "scale": args.scale, "bgr": args.bgr, "labels": args.labels}


def layers_report(model, input_size=None, output: str | None = None) -> str:
    """The ``--list-layers`` text for a model file, a bundle directory or a bundle name."""
    from .contract import PREFIX, read_props

    path = resolve_model_path(model)
    if path.is_dir():
        path = path / MODEL_FILE
    proto = load_onnx(path, "model")
    props = read_props(proto)
    opts = Options.make(path, input_size=input_size) if not any(k.startswith(PREFIX) for k in props) \
        else Options(input_size=_size(input_size))
    text = format_layers(list_layers(proto, opts.input_size, output, base_dir=path.parent))
    if any(k.startswith(PREFIX) for k in props):
        text += f"\n(a bundle: its feature graph is fixed at export, layer {props.get(PREFIX + 'layer', '?')!r})"
    return text
