"""Opening an ONNX object detector: its image input, its head, its feature levels and its preprocessing.

Pure onnx (plus one ONNX Runtime run when shape inference cannot tell a shape). What is read:

- the image input: [N,3,H,W] (batch dynamic or fixed), or [3,H,W] (torchvision detection exports): a
  ``Squeeze`` goes in front so the graph takes [1,3,H,W] like every other;
- the head (:mod:`.heads`): from ``--head`` / the sidecar's ``head`` / the bundle metadata, else from the
  output shapes: one [1,A,N] output with A < N is ``yolo8`` (C = A - 4), one [1,N,A] with N > A ``yolo5``
  (C = A - 5), outputs ``boxes`` [N,4] + ``scores`` (+ ``labels``) are ``boxes``;
- the candidate feature maps: every 4-D map (spatial size > 1) the head's outputs are computed from, with
  its stride (input height / map height); the *levels* are the neck outputs, per stride the last map that
  feeds two or more convolutions (the box and class branches, the next stage); without such maps, the last
  map of each stride;
- the preprocessing: flags, else the sidecar ``<model>.json`` (the classifier keys plus ``letterbox``,
  ``head``), else the bundle metadata written by ``python -m exporter annotate``, else what the model says
  about itself (Ultralytics: RGB, 1/255, letterbox to ``imgsz`` with grey 114 padding, class names), else
  RGB, scale 1/255, mean 0, std 1, stretched to the input size.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import external
from ..bundle import data_files, load_onnx, resolve_model_path
from ..contract import MODEL_FILE, PREFIX, BundleError, Preprocessing, parse_floats, read_props
from ..graphinfo import NCHW, GraphInfo, dims_of, fixed_shapes
from ..thirdparty import _free_batch, _size, read_labels, read_sidecar
from .heads import KINDS, Head

DEFAULT_SIZE = 640
TASK_KEY = PREFIX + "task"
#: a level resolves a box when its cells are this many times smaller than the box's shorter side
RESOLVE_CELLS = 2.0
INPUT = "scorecam_detect_input"


@dataclass(frozen=True)
class Level:
    """A candidate feature map: tensor name, channels, grid and stride (input pixels per cell)."""

    name: str
    channels: int
    grid: tuple[int, int]
    stride: float
    op: str
    level: bool = False  # a neck output (what the automatic choice picks from)
    branch: bool = False  # feeds two or more nodes (a block's output, not a step inside one)

    def describe(self) -> str:
        tag = "  level" if self.level else ""
        return f"{self.name}  [{self.channels}x{self.grid[0]}x{self.grid[1]}]  stride {self.stride:g}  ({self.op}){tag}"


@dataclass
class Detector:
    """An opened detector (the graph itself is read again by :meth:`load` when needed)."""

    path: Path
    sha256: str
    input_name: str  # the normalised graph's image input
    input_size: tuple[int, int]
    batch: int | None  # fixed batch (None: dynamic)
    head: Head
    levels: list[Level]  # every candidate map, graph order
    preprocessing: Preprocessing
    letterbox: bool
    labels: tuple[str, ...] | None
    wrap_3d: bool  # the model takes [3,H,W]: a Squeeze was put in front
    original_input: str
    free_batch: bool = False  # a batch fixed to 1 made dynamic (checked against the model)
    warnings: list[str] = field(default_factory=list)
    data_dir: Path | None = None  # the folder of its external data files (weights beside the graph), if any

    @property
    def neck(self) -> list[Level]:
        """The levels (neck outputs), finest first."""
        out = [lv for lv in self.levels if lv.level]
        return sorted(out, key=lambda lv: lv.stride)

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        import difflib

        close = difflib.get_close_matches(name, [lv.name for lv in self.levels], n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise BundleError(f"layer {name!r} is not a feature map of this detector{hint} (see --list-layers)")

    def load(self) -> onnx.ModelProto:
        """The normalised graph (input ``[1|N,3,H,W]``), read from the file again."""
        return normalise(load_onnx(self.path, "detector graph"), self.original_input, self.wrap_3d,
                         self.input_size, self.free_batch, self.data_dir)[0]

    def label_of(self, index: int) -> str:
        labels = self.labels
        i = index - self.head.label_offset
        return labels[i] if labels and 0 <= i < len(labels) else str(index)


def _image_input(g: onnx.GraphProto) -> tuple[onnx.ValueInfoProto, bool]:
    """(the image input, whether it is [3,H,W])."""
    inits = {i.name for i in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    images = [vi for vi in real if (dims_of(vi) is None or len(dims_of(vi)) in (3, 4))]
    if len(images) != 1 or len(real) != 1:
        desc = ", ".join(f"{vi.name} {list(dims_of(vi) or ())}" for vi in real)
        raise BundleError(f"the detector must have one image input [N,3,H,W] or [3,H,W] (inputs: {desc})")
    vi = images[0]
    if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise BundleError(f"the detector input {vi.name!r} is not float32")
    d = dims_of(vi)
    if d is not None and len(d) == 4 and d[1] not in (3, None):
        raise BundleError(f"the detector input {vi.name!r} has shape {list(d)}: only NCHW [N,3,H,W] images are "
                          "supported")
    return vi, d is not None and len(d) == 3


def normalise(m: onnx.ModelProto, input_name: str, wrap_3d: bool,
              size: tuple[int, int], free_batch: bool = False, base_dir=None) -> tuple[onnx.ModelProto, str]:
    """``m`` with a [1,3,H,W] input in front of a [3,H,W] one (``Squeeze``), or with its batch of 1 made
    dynamic (``free_batch``: ``Reshape`` constants that spell out the batch become -1 / 0, as
    :func:`runtime.thirdparty.prepare` does for classifiers); (model, image input name). ``base_dir``: the
    folder of its external data (tiny external tensors are read in: ONNX Runtime needs shapes in the graph)."""
    if base_dir is not None:
        external.inline_small(m, base_dir)
    if free_batch:
        g = m.graph
        for vi in [*(i for i in g.input if i.name == input_name), *g.output]:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
        del g.value_info[:]
        _free_batch(m, GraphInfo(m, input_name, fixed_shapes(m, input_name, (1, 3, *size), base_dir), base_dir))
    if not wrap_3d:
        return m, input_name
    g = m.graph
    vi = next(i for i in g.input if i.name == input_name)
    g.input.remove(vi)
    g.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, size[0], size[1]]))
    axes = helper.make_tensor("scorecam_detect_axes", TensorProto.INT64, [1], [0])
    g.initializer.append(axes)
    g.node.insert(0, helper.make_node("Squeeze", [INPUT, "scorecam_detect_axes"], [input_name],
                                      name="scorecam_detect_squeeze"))
    return m, INPUT


def _ultralytics(props: dict) -> dict:
    """What an Ultralytics export says about itself (metadata_props): size, labels, task."""
    if props.get("author", "").lower() != "ultralytics":
        return {}
    out: dict = {"letterbox": True}
    try:
        imgsz = ast.literal_eval(props.get("imgsz", "None"))
        if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2:
            out["input_size"] = (int(imgsz[0]), int(imgsz[1]))
        names = ast.literal_eval(props.get("names", "None"))
        if isinstance(names, dict):
            out["labels"] = tuple(str(names[k]) for k in sorted(names))
    except (ValueError, SyntaxError, TypeError):
        pass
    out["task"] = props.get("task", "")
    return out


def _ours(props: dict) -> dict:
    """The detection bundle metadata (``exporter annotate`` / the toy detector's export)."""
    if props.get(TASK_KEY) != "detect":
        return {}
    out: dict = {}
    try:
        if PREFIX + "input_size" in props:
            out["input_size"] = tuple(json.loads(props[PREFIX + "input_size"]))
        for key in ("mean", "std"):
            if PREFIX + key in props:
                out[key] = tuple(json.loads(props[PREFIX + key]))
        if PREFIX + "scale" in props:
            out["scale"] = float(props[PREFIX + "scale"])
        if PREFIX + "color_order" in props:
            out["color_order"] = props[PREFIX + "color_order"]
        if PREFIX + "labels" in props:
            out["labels"] = tuple(json.loads(props[PREFIX + "labels"]))
        if PREFIX + "letterbox" in props:
            out["letterbox"] = props[PREFIX + "letterbox"] == "true"
        if PREFIX + "head" in props:
            out["head"] = props[PREFIX + "head"]
    except (ValueError, TypeError) as e:
        raise BundleError(f"the detector's scorecam metadata is damaged ({e})") from None
    return out


def is_detection_bundle(props: dict) -> bool:
    return props.get(TASK_KEY) == "detect"


def detection_props(pre: Preprocessing, letterbox: bool, labels, head: str | None) -> dict[str, str]:
    """The metadata_props that make a detector file carry its preprocessing (``exporter annotate``)."""
    props = {TASK_KEY: "detect", PREFIX + "input_size": json.dumps(list(pre.input_size)),
             PREFIX + "color_order": pre.color_order, PREFIX + "scale": repr(float(pre.scale)),
             PREFIX + "mean": json.dumps([float(v) for v in pre.mean]),
             PREFIX + "std": json.dumps([float(v) for v in pre.std]),
             PREFIX + "letterbox": "true" if letterbox else "false"}
    if labels:
        props[PREFIX + "labels"] = json.dumps(list(labels))
    if head:
        props[PREFIX + "head"] = head
    return props


def _shape(shapes: dict, name: str) -> tuple:
    return tuple(shapes.get(name) or ())


def find_head(g: onnx.GraphProto, shapes: dict, kind: str | None = None) -> Head:
    """The head of a detector graph (module doc); BundleError when the outputs mean nothing we know."""
    outs = [o.name for o in g.output]
    desc = ", ".join(f"{o} {list(_shape(shapes, o))}" for o in outs)
    if kind is not None and kind not in KINDS:
        raise BundleError(f"unknown head {kind!r}; choose one of {', '.join(KINDS)}")
    three = [o for o in outs if len(_shape(shapes, o)) == 3 and _shape(shapes, o)[0] in (1, None)]
    if kind in (None, "yolo8", "yolo5") and len(outs) >= 1 and three:
        o = three[0]
        _, a, n = _shape(shapes, o)
        if a is not None and n is not None:
            if kind == "yolo8" or (kind is None and a < n and a >= 5):
                if a < 5:
                    raise BundleError(f"output {o} {[1, a, n]} is too small for a [1,4+C,N] head")
                return Head("yolo8", (o,), int(a) - 4)
            if kind == "yolo5" or (kind is None and n < a and n >= 6):
                if n < 6:
                    raise BundleError(f"output {o} {[1, a, n]} is too small for a [1,N,5+C] head")
                return Head("yolo5", (o,), int(n) - 5)
    if kind in (None, "boxes"):
        def rank(o):
            s = _shape(shapes, o)
            return len(s) - (1 if len(s) and s[0] == 1 and len(s) >= 2 else 0)

        boxes = [o for o in outs if rank(o) == 2 and _shape(shapes, o)[-1] == 4]
        if boxes:
            rest = [o for o in outs if o != boxes[0]]
            by_name = {o.lower(): o for o in rest}
            scores = by_name.get("scores") or next((o for o in rest if "score" in o.lower()), None)
            labels = by_name.get("labels") or next((o for o in rest if "label" in o.lower() or "class" in o.lower()),
                                                   None)
            if scores is None:
                scores = next((o for o in rest if o != labels), None)
            if scores is not None:
                if rank(scores) == 2:  # every proposal's class scores: NMS is not in the graph
                    c = _shape(shapes, scores)[-1]
                    return Head("boxes", (boxes[0], scores), int(c) if c else None)
                if labels is not None:
                    return Head("boxes", (boxes[0], scores, labels), None)
    raise BundleError(f"the model's outputs ({desc}) are not a detection head this explainer reads: "
                      "[1,4+C,N] (YOLOv8/v11), [1,N,5+C] (YOLOv5) or boxes [N,4] + scores (+ labels); "
                      "name the kind with --head if it is one of them")


def _consumers(g: onnx.GraphProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n.op_type)
    return out


def feature_levels(m: onnx.ModelProto, info: GraphInfo, head: Head, size: tuple[int, int]) -> list[Level]:
    """Every candidate map the head's outputs are computed from, graph order, with strides and the levels."""
    anc: set[str] = set()
    for o in head.outputs:
        anc |= info.ancestors(o)
    cons = _consumers(m.graph)
    found: list[Level] = []
    for t in info.tensor_names():
        if t not in anc or not info.is_map(t) or info.layout(t) != NCHW:
            continue
        shape = info.shapes[t]
        k, h, w = int(shape[1]), int(shape[2]), int(shape[3])
        sy, sx = size[0] / h, size[1] / w
        if abs(sy - sx) > 0.5 * max(sy, sx) or min(sy, sx) < 1:  # not an image grid (a reshaped head tensor)
            continue
        node = info.producer.get(t)
        found.append(Level(t, k, (h, w), round(float(np.sqrt(sy * sx)), 2), node.op_type if node else "input"))
    picked: dict[float, str] = {}
    for lv in found:
        if cons.get(lv.name, []).count("Conv") >= 2:
            picked[round(lv.stride)] = lv.name
    if not picked:
        for lv in found:
            picked[round(lv.stride)] = lv.name
    names = set(picked.values())
    return [Level(lv.name, lv.channels, lv.grid, lv.stride, lv.op, lv.name in names, len(cons.get(lv.name, [])) >= 2)
            for lv in found]


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def model_path_of(model) -> Path:
    path = resolve_model_path(model)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise BundleError(f"model not found: {model}")
    return path


def open_detector(model, *, input_size=None, mean=None, std=None, scale=None, bgr: bool | None = None,
                  labels=None, letterbox: bool | None = None, head: str | None = None) -> Detector:
    """Read a detector (a ``.onnx`` file, or a folder holding ``model.onnx``); flags win over the sidecar,
    the sidecar over the model's own metadata (module doc)."""
    path = model_path_of(model)
    proto = load_onnx(path, "detector graph")
    data = data_files(proto, path)
    data_dir = path.parent if data else None
    props = read_props(proto)
    own = _ours(props) or _ultralytics(props)
    side = read_sidecar(path)
    vi, wrap = _image_input(proto.graph)
    d = dims_of(vi) or ()
    model_hw = (d[1], d[2]) if wrap else (d[2], d[3]) if len(d) == 4 else (None, None)

    def pick(flag, key):
        return flag if flag is not None else side.get(key, own.get(key))

    warnings: list[str] = []
    size = _size(pick(input_size, "input_size"))
    if size is None:
        if None not in model_hw:
            size = (int(model_hw[0]), int(model_hw[1]))
        else:
            size = (DEFAULT_SIZE, DEFAULT_SIZE)
            warnings.append(f"the detector's input size is dynamic and none was given: using {DEFAULT_SIZE}x"
                            f"{DEFAULT_SIZE} (set it with --size H W or the sidecar's input_size)")
    for have, want, what in zip(model_hw, size, ("height", "width"), strict=True):
        if have is not None and have != want:
            raise BundleError(f"the detector takes a fixed {what} of {have}; input size {size[0]}x{size[1]} does "
                              f"not fit (use {model_hw[0]}x{model_hw[1]})")
    batch = 1 if wrap else (d[0] if d and d[0] is not None else None)
    sha = external.content_sha256(path, data)  # the data files too: other weights are another detector
    free = batch == 1 and not wrap and _batch_frees(path, sha, vi.name, size, data_dir)
    if free:
        batch = None
    m, name = normalise(proto, vi.name, wrap, size, free, data_dir)
    shapes = fixed_shapes(m, name, (1, 3, *size), data_dir)
    info = GraphInfo(m, name, shapes, data_dir)
    h = find_head(m.graph, shapes, pick(head, "head"))
    if h.kind == "boxes" and wrap:  # torchvision: label 0 is the background class
        h = Head(h.kind, h.outputs, h.num_classes, label_offset=0)
    levels = feature_levels(m, info, h, size)
    if not levels:
        raise BundleError("the detector has no 4-D feature map with a spatial size > 1 feeding its outputs")
    order = pick("BGR" if bgr else None, "color_order") or "RGB"
    m_, s_ = pick(mean, "mean"), pick(std, "std")
    sc = pick(scale, "scale")
    pre = Preprocessing(input_size=size, color_order=str(order).upper(),
                        scale=1.0 / 255.0 if sc is None else float(sc),
                        mean=(0.0, 0.0, 0.0) if m_ is None else parse_floats(m_, 3, "mean"),
                        std=(1.0, 1.0, 1.0) if s_ is None else parse_floats(s_, 3, "std"))
    lb = pick(letterbox, "letterbox")
    names = read_labels(pick(labels, "labels"))
    if names is not None and h.num_classes is not None and len(names) != h.num_classes:
        raise BundleError(f"{len(names)} labels given for a detector with {h.num_classes} classes")
    for w in warnings:
        _warn(w)
    return Detector(path, sha, name, size, batch, h, levels, pre, bool(lb), names, wrap, vi.name, free, warnings,
                    data_dir)


_FREED: dict[tuple, bool] = {}


def _batch_frees(path: Path, sha: str, input_name: str, size: tuple[int, int], data_dir=None) -> bool:
    """Whether the graph, its batch of 1 made dynamic, gives at batch 2 what it gives image by image (once per
    file and size in a process): masked images are then scored in batches, not one at a time."""
    key = (sha, input_name, tuple(size))
    if key not in _FREED:
        import onnxruntime as ort

        from ..engine import CPU, session_options

        ok = False
        try:
            freed, _ = normalise(load_onnx(path, "detector graph"), input_name, False, size, True, data_dir)
            x = np.random.default_rng(0).random((2, 3, *size), dtype=np.float32)
            opts = session_options()
            external.point_to(opts, data_dir)
            a = ort.InferenceSession(freed.SerializeToString(), opts, providers=[CPU])
            del freed
            got = a.run(None, {input_name: x})
            b = ort.InferenceSession(str(path), session_options(), providers=[CPU])
            singles = [b.run(None, {input_name: x[i:i + 1]}) for i in range(2)]
            ok = all(g.shape[0] == 2 and np.allclose(g, np.concatenate([s[j] for s in singles]), rtol=1e-4, atol=1e-4)
                     for j, g in enumerate(got))
        except Exception:  # any failure: the batch stays fixed (scored one image at a time)
            ok = False
        _FREED[key] = ok
    return _FREED[key]


def looks_like_detector(model) -> bool:
    """Cheap test for the CLIs: bundle/Ultralytics metadata saying ``detect``, or outputs a classifier never has
    (one 3-D output, or a [N,4] boxes output). False for anything unreadable (the caller reports it)."""
    try:
        path = model_path_of(model)
        proto = load_onnx(path, "model")
    except (BundleError, OSError):
        return False
    props = read_props(proto)
    if is_detection_bundle(props) or (_ultralytics(props).get("task") == "detect"):
        return True
    if any(k.startswith(PREFIX) for k in props):
        return False  # a classifier bundle
    outs = [dims_of(o) for o in proto.graph.output]
    if any(o is not None and len(o) == 3 and o[0] in (1, None) and None not in o[1:] and min(o[1:]) >= 5
           for o in outs):
        return True
    return any(o is not None and len(o) in (2, 3) and o[-1] == 4 for o in outs) and len(outs) >= 2


def key_of(det: Detector) -> str:
    """Names the normalised graph (the engine shares sessions by it)."""
    text = json.dumps([det.sha256, det.input_size, det.wrap_3d, det.original_input, "detect-1"])
    return hashlib.sha256(text.encode()).hexdigest()


def format_levels(det: Detector, auto: str | None = None) -> str:
    """The ``--list-layers`` text of a detector."""
    shown = [lv for lv in det.levels if lv.level or lv.branch]
    lines = [("* " if lv.name == auto else "  ") + lv.describe() for lv in shown]
    if len(shown) < len(det.levels):
        lines.append(f"  ({len(det.levels) - len(shown)} more maps inside blocks: any 4-D tensor name works "
                     "with --layer)")
    return "\n".join([f"detector head {det.head.kind} ({det.head.num_classes or '?'} classes), input "
                      f"{det.input_size[0]}x{det.input_size[1]}; candidate feature maps:", *lines,
                      "(level = a neck output; the automatic choice per box is the deepest level whose stride "
                      f"is at most 1/{RESOLVE_CELLS:g} of the box's shorter side; * = that level for a box of "
                      "a quarter of the input; pick another with --layer NAME, or --layer fuse)"])
