"""The models a service answers for: found from the command line's MODEL arguments, loaded once.

MODEL is a bundle directory, a ``.onnx`` file (a third-party classifier, with the CLI's
preprocessing flags), a folder of bundles (one model per subfolder holding a ``model.onnx``), or a
bundle name under ``models/``. A model is served under its folder's name (a lone ``.onnx`` file:
its stem), or ``--model_name`` for a single model.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import resolve_model_path
from ..contract import MODEL_FILE, BundleError
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
    explainer: Explainer
    load_seconds: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def variant(self, preset: str | None, max_channels: int | None, exact: bool = False, select: str | None = None,
                mode: str | None = None, fill: str | None = None) -> Explainer:
        """The explainer for one request (None: the server's setting; a fill neither asked for follows the cap:
        ``kernel`` with one, :func:`runtime.explainer.default_fill`). A variant shares the engine and its
        sessions; the scorer session of a new mask kind is built here, under a lock, so two requests never
        race to make it. ValueError when the model's head does not allow the mode / selection asked for."""
        ex = self.explainer
        mc = None if exact else (max_channels if max_channels is not None else ex.max_channels)
        # a fill neither the request nor the server asked for follows the cap: kernel when channels are capped
        select, mode, fill = select or ex.select, mode or ex.mode, fill or ex.fill_asked
        if (preset is None or preset == ex.preset.name) and mc == ex.max_channels and \
                (select, mode, default_fill(fill, mc)) == (ex.select, ex.mode, ex.fill):
            return ex
        v = _variant(ex, preset or ex.preset.name, mc, select, mode, fill)
        with self._lock:
            v.engine.scorer(v.preset.mask)
        return v

    def metadata(self) -> dict:
        """What a client needs to know (V2 model metadata's extra fields)."""
        ex = self.explainer
        pre = ex.pre
        h, w = ex.input_size
        return {"labels": len(ex.labels) or ex.num_classes, "input_size": [h, w],
                "preprocessing": {"input_size": [h, w], "color_order": pre.color_order,
                                  "scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std)},
                "target_layer": ex.meta.layer, "provider": ex.provider, "preset": ex.preset.name,
                "max_channels": ex.max_channels, "select": ex.select, "mode": ex.mode, "fill": ex.fill,
                "batch_size": ex.batch_size}


def load_models(specs: list[ModelSpec], explainer_kwargs: dict, thirdparty_kwargs: dict,
                log=print) -> dict[str, ServedModel]:
    """Load every model once (an Explainer each); ``log`` gets one line per model."""
    out: dict[str, ServedModel] = {}
    for s in specs:
        t0 = time.perf_counter()
        kwargs = dict(explainer_kwargs, **(thirdparty_kwargs if s.third_party else {}))
        ex = Explainer(s.path, **kwargs)
        seconds = time.perf_counter() - t0
        out[s.name] = ServedModel(s.name, ex, seconds)
        log(f"loaded model {s.name!r} from {s.path} in {seconds:.2f}s ({ex.provider}, {ex.num_classes} classes, "
            f"layer {ex.meta.layer}, preset {ex.preset.name}"
            + (f", max_channels {ex.max_channels})" if ex.max_channels else ")"))
    return out
