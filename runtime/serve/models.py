"""The models a service answers for: found from the command line's MODEL arguments, loaded once.

MODEL is a bundle directory, a ``.onnx`` file (a third-party classifier, with the CLI's
preprocessing flags), a folder of bundles (one model per subfolder holding a ``model.onnx``), or a
bundle name under ``models/``. A model is served under its folder's name (a lone ``.onnx`` file:
its stem), or ``--model_name`` for a single model. An object detector (recognised by its outputs or
metadata, :func:`runtime.detect.looks_like_detector`, or ``--task detect``) is served by a
:class:`runtime.detect.DetectionExplainer`: its task is ``detect``.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import resolve_model_path
from ..contract import MODEL_FILE, BundleError
from ..detect import DetectionExplainer, looks_like_detector
from ..explainer import Explainer, default_fill
from ..methods import _variant

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    third_party: bool  # a bare .onnx file: the preprocessing flags apply


def find_models(args: list[str], model_name: str | None = None) -> list[ModelSpec]:
    """Resolve MODEL arguments to (name, path) pairs without loading anything (BundleError: one line)."""
    specs: list[ModelSpec] = []
    for arg in args:
        p = resolve_model_path(arg)
        if p.is_file():
            name = p.parent.name if p.name == MODEL_FILE else p.stem
            specs.append(ModelSpec(name, p, p.name != MODEL_FILE or not (p.parent / "features.onnx").exists()))
        elif (p / MODEL_FILE).is_file():
            specs.append(ModelSpec(p.resolve().name, p, False))
        elif p.is_dir():
            found = sorted(d for d in p.iterdir() if d.is_dir() and (d / MODEL_FILE).is_file())
            if not found:
                raise BundleError(f"{arg}: neither a bundle (no {MODEL_FILE}) nor a folder of bundles "
                                  f"(no subfolder holds a {MODEL_FILE})")
            specs += [ModelSpec(d.name, d, False) for d in found]
        else:
            raise BundleError(f"{arg}: not a file or a directory")
    if model_name is not None:
        if len(specs) != 1:
            raise BundleError(f"--model_name names ONE model, but {len(specs)} were given")
        specs = [ModelSpec(model_name, specs[0].path, specs[0].third_party)]
    seen: dict[str, Path] = {}
    for s in specs:
        if not NAME.match(s.name):
            raise BundleError(f"model name {s.name!r} may hold only letters, digits, '.', '_' and '-' "
                              "(set --model_name)")
        if s.name in seen:
            raise BundleError(f"two models are named {s.name!r} ({seen[s.name]} and {s.path}); serve them "
                              "from separate folders or one at a time with --model_name")
        seen[s.name] = s.path
    return specs


@dataclass
class ServedModel:
    """One loaded model: its base explainer, and per-request variants (another preset or channel cap)."""

    name: str
    explainer: Explainer | DetectionExplainer
    load_seconds: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def task(self) -> str:
        """``detect`` for an object detector, else ``classify``."""
        return "detect" if isinstance(self.explainer, DetectionExplainer) else "classify"

    def variant(self, preset: str | None, max_channels: int | None, exact: bool = False, select: str | None = None,
                mode: str | None = None, fill: str | None = None, score_threshold: float | None = None, *,
                layers=None, fusion: str | None = None, baseline: str | None = None):
        """The explainer for one request (None: the server's setting; a fill neither asked for follows the cap:
        ``kernel`` with one, :func:`runtime.explainer.default_fill`; ``layers`` 1: the target layer alone;
        ``score_threshold``: detectors only). A variant shares the engine and its sessions; the scorer session of
        a new mask kind is built here, under a lock, so two requests never race to make it. ValueError
        (BundleError) when the model does not allow the mode / selection / layers asked for."""
        if self.task == "detect":
            return self._detect_variant(preset, max_channels, exact, select, mode, fill, score_threshold)
        ex = self.explainer
        mc = None if exact else (max_channels if max_channels is not None else ex.max_channels)
        # a fill neither the request nor the server asked for follows the cap: kernel when channels are capped
        select, mode, fill = select or ex.select, mode or ex.mode, fill or ex.fill_asked
        fusion, baseline = fusion or ex.fusion, baseline or ex.baseline
        served = tuple(st.name for st in ex.stages)
        if layers is None:
            layers = served or None
        elif layers == 1:
            layers = None
        same_layers = (layers or ()) == served
        if (preset is None or preset == ex.preset.name) and mc == ex.max_channels and same_layers and \
                (select, mode, default_fill(fill, mc), fusion, baseline) == \
                (ex.select, ex.mode, ex.fill, ex.fusion, ex.baseline):
            return ex
        v = _variant(ex, preset or ex.preset.name, mc, select, mode, fill, layers=layers, fusion=fusion,
                     baseline=baseline)
        with self._lock:
            v.engine.scorer(v.mask)
        return v

    def _detect_variant(self, preset, max_channels, exact, select, mode, fill, score_threshold):
        import copy

        from ..detect.explainer import SELECTS
        from ..scorecam import get_preset

        ex = self.explainer
        if mode not in (None, "scorecam"):
            raise ValueError(f"mode {mode!r} does not apply to detectors: they are explained with mode scorecam")
        select = {"relevance": "auto", None: ex.select}.get(select, select)
        if select not in SELECTS:
            raise ValueError(f"select {select!r} does not apply to detectors; choose one of {', '.join(SELECTS)}")
        mc = None if exact else (max_channels if max_channels is not None else ex.max_channels)
        # the classifiers' rule: a fill neither the request nor the server asked for follows the cap (kernel)
        fill = default_fill(fill or ex.fill_asked, mc)
        if fill not in ("kernel", "zero"):
            raise ValueError(f"fill {fill!r} does not apply to detectors; choose kernel or zero")
        threshold = ex.score_threshold if score_threshold is None else float(score_threshold)
        if (preset is None or preset == ex.preset.name) and mc == ex.max_channels and \
                (select, fill, threshold) == (ex.select, ex.fill, ex.score_threshold):
            return ex
        v = copy.copy(ex)
        v.preset = get_preset(preset or ex.preset.name)
        v.max_channels, v.select, v.fill, v.score_threshold = mc, select, fill, threshold
        with self._lock:
            v.engine.scorer(v.preset.mask)
        return v

    def metadata(self) -> dict:
        """What a client needs to know (V2 model metadata's extra fields)."""
        ex = self.explainer
        if self.task == "detect":
            det = ex.detector
            pre = det.preprocessing
            h, w = ex.input_size
            return {"task": "detect", "labels": len(ex.labels) or ex.num_classes, "input_size": [h, w],
                    "preprocessing": {"input_size": [h, w], "color_order": pre.color_order, "scale": pre.scale,
                                      "mean": list(pre.mean), "std": list(pre.std), "letterbox": det.letterbox},
                    "head": det.head.kind, "nms_in_graph": det.head.nms_in_graph,
                    "levels": [{"name": lv.name, "stride": lv.stride, "channels": lv.channels} for lv in ex.levels],
                    "layer": ex.layer, "provider": ex.provider, "preset": ex.preset.name,
                    "max_channels": ex.max_channels, "select": ex.select, "fill": ex.fill,
                    "weighting": ex.weighting, "score_threshold": ex.score_threshold, "nms_iou": ex.nms_iou,
                    "batch_size": ex.batch_size}
        pre = ex.pre
        h, w = ex.input_size
        return {"task": "classify", "labels": len(ex.labels) or ex.num_classes, "input_size": [h, w],
                "preprocessing": {"input_size": [h, w], "color_order": pre.color_order,
                                  "scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std)},
                "target_layer": ex.meta.layer, "layout": ex.meta.layout.describe(),
                "provider": ex.provider, "preset": ex.preset.name,
                "max_channels": ex.max_channels, "select": ex.select, "mode": ex.mode, "fill": ex.fill,
                "layers": [ex.meta.layer, *(st.name for st in ex.stages)], "fusion": ex.fusion,
                "baseline": ex.baseline, "batch_size": ex.batch_size}


def load_detector(path, explainer_kwargs: dict, thirdparty_kwargs: dict, detector_kwargs: dict) -> DetectionExplainer:
    """A :class:`DetectionExplainer` from the server's settings (the classifier flags that apply to detectors,
    and the detector flags); ValueError for a setting that does not apply to detectors."""
    kw = dict(explainer_kwargs)
    if kw.pop("mode", "scorecam") != "scorecam":
        raise ValueError(f"{path}: an object detector is explained with --mode scorecam")
    kw.pop("precision", None)
    layers, baseline = kw.pop("layers", None), kw.pop("baseline", "zero")
    kw.pop("fusion", None)
    if layers not in (None, 1) or baseline not in (None, "zero"):
        raise ValueError(f"{path}: --layers and --baseline apply to classifiers; a detector is explained from one "
                         "level")
    if kw.get("select") == "relevance":
        kw["select"] = "auto"
    tp = {k: v for k, v in thirdparty_kwargs.items() if k in ("layer", "input_size", "mean", "std", "scale", "bgr",
                                                                 "labels") and v not in (None, False)}
    return DetectionExplainer(path, **kw, **tp, **detector_kwargs)


def load_models(specs: list[ModelSpec], explainer_kwargs: dict, thirdparty_kwargs: dict,
                log=print, detector_kwargs: dict | None = None, task: str = "auto") -> dict[str, ServedModel]:
    """Load every model once (an Explainer, or a DetectionExplainer for a detector: ``task`` ``auto`` tells them
    apart); ``log`` gets one line per model."""
    out: dict[str, ServedModel] = {}
    for s in specs:
        t0 = time.perf_counter()
        if task == "detect" or (task == "auto" and looks_like_detector(s.path)):
            dx = load_detector(s.path, explainer_kwargs, thirdparty_kwargs if s.third_party else {},
                               detector_kwargs or {})
            seconds = time.perf_counter() - t0
            out[s.name] = ServedModel(s.name, dx, seconds)
            log(f"loaded detector {s.name!r} from {s.path} in {seconds:.2f}s ({dx.provider}, head {dx.head.kind}, "
                f"{dx.num_classes or '?'} classes, layer {dx.layer}, preset {dx.preset.name}"
                + (f", max_channels {dx.max_channels}, fill {dx.fill})" if dx.max_channels else ")"))
            continue
        kwargs = dict(explainer_kwargs, **(thirdparty_kwargs if s.third_party else {}))
        ex = Explainer(s.path, **kwargs)
        seconds = time.perf_counter() - t0
        out[s.name] = ServedModel(s.name, ex, seconds)
        log(f"loaded model {s.name!r} from {s.path} in {seconds:.2f}s ({ex.provider}, {ex.num_classes} classes, "
            f"layer {ex.meta.layer}, preset {ex.preset.name}"
            + (f", max_channels {ex.max_channels})" if ex.max_channels else ")"))
    return out
