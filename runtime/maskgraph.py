"""The scoring graph: Score-CAM's masking as ONNX nodes in front of the classifier.

``scorer(image [1,3,H,W], maps [B,1,h,w], eps []) -> logits [B,C]`` computes, inside ONNX Runtime,

    H_b = norm(up(maps_b))   (or up(norm(maps_b)) for ``norm_first``)
    logits_b = f(image * H_b)

with ``up`` = ``Resize`` linear (half_pixel or align_corners, the same grids as torch's bilinear
``F.interpolate``) and ``norm(m) = (m - min m) / (max m - min m + eps)`` per map. With a baseline input
(``blend``) the masked input is ``image * H_b + base * (1 - H_b)`` instead (the paper's baseline is 0:
``base`` is then left out and the graph is the one above, node for node). Only the
low-resolution maps go in and the scores come out, so on CUDA the B x 3 x H x W masked batch is
made on the device and never crosses the bus.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper, numpy_helper

from .scorecam import MaskSpec

IMAGE = "scorecam_image"
MAPS = "scorecam_maps"
EPS = "scorecam_eps"
NOISE = "scorecam_noise"  # optional [B,1,H,W], added to the masks (SS-CAM)
GAIN = "scorecam_gain"  # optional [B,1,1,1], multiplies the masks (IS-CAM)
OFFSET = "scorecam_offset"  # optional [B,1,1,1], added to the masks: 1 with an all-zero map scores x itself
BASE = "scorecam_base"  # optional [1,3,H,W], what the masked-out pixels become (default: 0, the paper's)
_P = "scorecam_mask/"


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the classifier graph imports no default-domain opset")


def _const(name: str, values, dtype=None):
    import numpy as np

    arr = np.asarray(values, dtype=dtype)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def mask_nodes(spec: MaskSpec, size: tuple[int, int], opset: int, out: str, noise: bool = False,
               gain: bool = False, offset: bool = False, blend: bool = False) -> list[onnx.NodeProto]:
    """Nodes turning ``MAPS`` [B,1,h,w] (and ``IMAGE``, ``EPS``) into the masked batch ``out``.

    ``noise``: the masks become ``H_b + NOISE_b`` (SS-CAM); ``gain``: they become ``GAIN_b * H_b``
    (IS-CAM); ``offset``: they become ``H_b + OFFSET_b``; ``blend``: the batch is ``IMAGE * H_b + BASE *
    (1 - H_b)``, ``BASE`` [1,3,H,W] the baseline (e.g. the image blurred). All default off, which leaves
    the graph exactly as Score-CAM needs it. An all-zero map has the all-zero mask in every preset, so with
    ``OFFSET_b = 1`` its row is ``image * 1 (+ base * 0)``, the image itself, bit for bit.
    """
    import numpy as np

    mode = "align_corners" if spec.align_corners else "half_pixel"
    nodes = [
        helper.make_node("Shape", [MAPS], [_P + "shape"]),
        _const(_P + "zero", [0], np.int64),
        _const(_P + "two", [2], np.int64),
        helper.make_node("Slice", [_P + "shape", _P + "zero", _P + "two"], [_P + "bc"]),
        _const(_P + "hw", list(size), np.int64),
        helper.make_node("Concat", [_P + "bc", _P + "hw"], [_P + "sizes"], axis=0),
    ]
    if opset < 13:
        nodes.append(_const(_P + "roi", np.zeros(0, np.float32)))
        nodes.append(_const(_P + "scales", np.zeros(0, np.float32)))
        resize_inputs = [_P + "roi", _P + "scales", _P + "sizes"]
    else:
        resize_inputs = ["", "", _P + "sizes"]

    def resize(src: str, dst: str) -> onnx.NodeProto:
        return helper.make_node("Resize", [src, *resize_inputs], [dst], mode="linear",
                                coordinate_transformation_mode=mode)

    def extremes(src: str, tag: str) -> tuple[list[onnx.NodeProto], str, str]:
        """Nodes giving the per-map min and max of ``src`` [B,1,*,*] (keepdims)."""
        lo, hi = _P + tag + "_min", _P + tag + "_max"
        if opset >= 18:
            axes = _P + tag + "_axes"
            return [_const(axes, [2, 3], np.int64),
                    helper.make_node("ReduceMin", [src, axes], [lo], keepdims=1),
                    helper.make_node("ReduceMax", [src, axes], [hi], keepdims=1)], lo, hi
        return [helper.make_node("ReduceMin", [src], [lo], axes=[2, 3], keepdims=1),
                helper.make_node("ReduceMax", [src], [hi], axes=[2, 3], keepdims=1)], lo, hi

    def normalise(src: str, dst: str) -> list[onnx.NodeProto]:
        """``dst = (src - min) / (max - min + eps)`` per map."""
        nodes, lo, hi = extremes(src, dst)
        return [*nodes,
                helper.make_node("Sub", [src, lo], [dst + "_num"]),
                helper.make_node("Sub", [hi, lo], [dst + "_rng"]),
                helper.make_node("Add", [dst + "_rng", EPS], [dst + "_den"]),
                helper.make_node("Div", [dst + "_num", dst + "_den"], [dst])]

    if spec.norm_first:
        nodes += normalise(MAPS, _P + "normed")
        nodes.append(resize(_P + "normed", _P + "masks"))
    else:
        # up(constant) wobbles by an ulp in float32 and norm() would blow that up into a mask:
        # a channel that is constant at h x w gets the all-zero mask (DESIGN.md) through a 0/1 gate.
        nodes.append(resize(MAPS, _P + "up"))
        nodes += normalise(_P + "up", _P + "normed")
        low, lo, hi = extremes(MAPS, "low")
        nodes += [*low,
                  helper.make_node("Sub", [hi, lo], [_P + "low_rng"]),
                  _const(_P + "fzero", np.zeros((), np.float32)),
                  helper.make_node("Greater", [_P + "low_rng", _P + "fzero"], [_P + "varies"]),
                  helper.make_node("Cast", [_P + "varies"], [_P + "gate"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [_P + "normed", _P + "gate"], [_P + "masks"])]
    masks = _P + "masks"
    if noise:
        nodes.append(helper.make_node("Add", [masks, NOISE], [_P + "noisy"]))
        masks = _P + "noisy"
    if gain:
        nodes.append(helper.make_node("Mul", [masks, GAIN], [_P + "gained"]))
        masks = _P + "gained"
    if offset:
        nodes.append(helper.make_node("Add", [masks, OFFSET], [_P + "offset"]))
        masks = _P + "offset"
    if not blend:
        nodes.append(helper.make_node("Mul", [IMAGE, masks], [out]))
        return nodes
    nodes += [_const(_P + "one", np.ones((), np.float32)),
              helper.make_node("Sub", [_P + "one", masks], [_P + "inverse"]),
              helper.make_node("Mul", [IMAGE, masks], [_P + "kept"]),
              helper.make_node("Mul", [BASE, _P + "inverse"], [_P + "filled"]),
              helper.make_node("Add", [_P + "kept", _P + "filled"], [out])]
    return nodes


def build_scorer(classifier: onnx.ModelProto, spec: MaskSpec, size: tuple[int, int],
                 input_name: str | None = None, noise: bool = False, gain: bool = False,
                 offset: bool = False, extra_outputs: Sequence[str] = (), in_place: bool = False,
                 blend: bool = False) -> onnx.ModelProto:
    """The classifier with the mask nodes in front: inputs ``IMAGE``, ``MAPS``, ``EPS``; same outputs.

    ``input_name`` is the classifier input the masked batch feeds (default: its only real input).
    ``noise`` / ``gain`` / ``offset`` / ``blend`` add the inputs ``NOISE`` [B,1,H,W] / ``GAIN`` [B,1,1,1] /
    ``OFFSET`` [B,1,1,1] / ``BASE`` [1,3,H,W] (see :func:`mask_nodes`). ``extra_outputs`` names intermediate tensors of
    the classifier to output too (the target layer: one session then gives the logits and the
    activations of the image, and scores the masks, with one copy of the weights). ``in_place``: build
    on ``classifier`` itself (no copy of its weights) and return it.
    """
    if in_place:
        model = classifier
    else:
        model = onnx.ModelProto()
        model.CopyFrom(classifier)
    g = model.graph
    inits = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    if input_name is None:
        if len(real_inputs) != 1:
            raise ValueError(f"the classifier has {len(real_inputs)} inputs; name the image input")
        input_name = real_inputs[0].name
    target = next((i for i in real_inputs if i.name == input_name), None)
    if target is None:
        raise ValueError(f"the classifier has no input named {input_name!r}")
    elem = target.type.tensor_type.elem_type
    nodes = mask_nodes(spec, size, _opset(model), input_name, noise=noise, gain=gain, offset=offset, blend=blend)
    produced = {o for n in g.node for o in n.output}
    for name in extra_outputs:
        if name not in produced:
            raise ValueError(f"the classifier computes no tensor named {name!r}")
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    extra = []
    if noise:
        extra.append(helper.make_tensor_value_info(NOISE, elem, ["chunk", 1, size[0], size[1]]))
    if gain:
        extra.append(helper.make_tensor_value_info(GAIN, elem, ["chunk", 1, 1, 1]))
    if offset:
        extra.append(helper.make_tensor_value_info(OFFSET, elem, ["chunk", 1, 1, 1]))
    if blend:
        extra.append(helper.make_tensor_value_info(BASE, elem, [1, 3, size[0], size[1]]))
    kept_inputs = [i for i in g.input if i.name != input_name]
    del g.input[:]
    g.input.extend([
        helper.make_tensor_value_info(IMAGE, elem, [1, 3, size[0], size[1]]),
        helper.make_tensor_value_info(MAPS, elem, ["chunk", 1, None, None]),
        helper.make_tensor_value_info(EPS, TensorProto.FLOAT, []),
        *extra,
        *kept_inputs,
    ])
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    return model
