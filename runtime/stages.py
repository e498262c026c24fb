"""The finer target layers of multi-layer Score-CAM: which tensors of the classifier, in which layout.

``Explainer(model, layers=3)`` explains with the bundle's target layer (the deepest map) plus the two
stage outputs next finer than it, found in the classifier graph itself
(:meth:`runtime.graphinfo.GraphInfo.stage_layers`: on EfficientNet-Lite0 the 112-channel 14 x 14 and the
40-channel 28 x 28 block outputs); ``layers=[names]`` names them (tensor, node or torch module names, as
``--layer``). Nothing is recorded in a bundle: every tensor of ``model.onnx`` is there to be found, so
bundles exported before this feature and third-party models work alike. The main session outputs those
tensors beside the logits and the target layer (:meth:`runtime.engine.Engine.classify_and_layers`), and
:func:`as_maps` turns each into ``[K,h,w]`` in one place, whatever its layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .contract import BundleError
from .graphinfo import NCHW, NHWC, GraphInfo, fixed_shapes

#: the most layers one explanation may use (the deepest included)
MAX_LAYERS = 6


@dataclass(frozen=True)
class Stage:
    """One finer target layer: a tensor of the classifier, its layout, channels and grid."""

    name: str
    layout: str  # NCHW or NHWC
    channels: int
    grid: tuple[int, int]


def parse_layers(value) -> int | tuple[str, ...] | None:
    """``layers`` as given (an int, ``"3"``, ``"name,name"``, a list of names, or None) -> a count (>= 1) or
    a tuple of names; None and 1 mean the target layer alone. ValueError on anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"layers must be a count or layer names, got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    elif isinstance(value, str):
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        if not names:
            raise ValueError("layers: no layer named")
        return names
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(v.strip() for v in value)
    else:
        raise ValueError(f"layers must be a count or layer names, got {value!r}")
    if not 1 <= n <= MAX_LAYERS:
        raise ValueError(f"layers must be between 1 and {MAX_LAYERS}, got {n}")
    return None if n == 1 else n


def find_stages(classifier: onnx.ModelProto, input_name: str, output: str, deepest: str,
                input_size: tuple[int, int], layers: int | Sequence[str]) -> list[Stage]:
    """The finer layers of ``layers`` (a total count, the deepest included, or names), coarsest first.

    ``deepest`` is the target layer as a tensor of ``classifier``. A count finds the stage outputs
    (:meth:`GraphInfo.stage_layers`); names are resolved as ``--layer`` is, must be maps finer than the
    deepest and feed the output; the target layer among them is left out (it is always used)."""
    shapes = fixed_shapes(classifier, input_name, (1, 3, *input_size))
    info = GraphInfo(classifier, input_name, shapes)
    if deepest not in info.producer:
        raise BundleError(f"the target layer {deepest!r} is not a tensor of the classifier graph, so no finer "
                          "layer can be found beside it")
    h0, w0 = _grid(info, deepest)
    if isinstance(layers, int):
        names = info.stage_layers(output, deepest, layers - 1)
        if len(names) < layers - 1:
            raise BundleError(f"the model has {len(names)} stage(s) finer than its target layer {deepest!r} "
                              f"({h0}x{w0}); use layers <= {len(names) + 1}")
    else:
        names = []
        for layer in layers:
            name = info.resolve_layer(layer, output)
            if name == deepest or name in names:
                continue
            if not info.is_map(name):
                raise BundleError(f"layer {layer!r} ({name}) is not a feature map with a spatial size > 1")
            h, w = _grid(info, name)
            if h * w <= h0 * w0:
                raise BundleError(f"layer {layer!r} ({name}) is {h}x{w}, not finer than the target layer "
                                  f"{deepest!r} ({h0}x{w0}); name finer layers")
            names.append(name)
        if len(names) + 1 > MAX_LAYERS:
            raise BundleError(f"{len(names) + 1} layers; at most {MAX_LAYERS}")
        names.sort(key=lambda t: _grid(info, t)[0] * _grid(info, t)[1])
    out = []
    for name in names:
        cand = info.candidate(name)
        if cand.layout not in (NCHW, NHWC) or cand.channels is None:
            raise BundleError(f"layer {name!r} is neither NCHW nor NHWC with a known channel count")
        out.append(Stage(name, cand.layout, int(cand.channels), _grid(info, name)))
    return out


def _grid(info: GraphInfo, name: str) -> tuple[int, int]:
    h, w = info.candidate(name).spatial
    if h is None or w is None:
        raise BundleError(f"layer {name!r} has an unknown spatial size")
    return int(h), int(w)


def as_maps(tensor: np.ndarray, stage: Stage) -> np.ndarray:
    """One image's activations of ``stage`` as float32 [K,h,w] (an NHWC [h,w,K] tensor transposed)."""
    t = np.asarray(tensor, np.float32)
    if t.ndim != 3:
        raise BundleError(f"layer {stage.name!r} gave a {t.ndim + 1}-D tensor; a 4-D map is needed")
    if stage.layout == NHWC:
        t = t.transpose(2, 0, 1)
    return np.ascontiguousarray(t)


__all__ = ["MAX_LAYERS", "Stage", "as_maps", "find_stages", "parse_layers"]
