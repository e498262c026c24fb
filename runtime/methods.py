"""Saliency methods by name, all on Score-CAM's masked-scoring primitive, plus two reference baselines.

A method is a function ``(explainer, x [1,3,H,W], class_index, **params) -> saliency [H,W] in [0,1]``
registered with :func:`register`; :data:`METHODS` maps its name to it and :func:`list_methods` lists
them. A method is named on the command line as ``name[:key=value]...``, e.g. ``sscam:n=8:sigma=1``.

=============== ==================================================================================
``scorecam``     Score-CAM, the explainer's engine; ``preset=`` paper (default) / gradcam / torchcam /
                 official (``scorecam-<preset>`` names each one)
``faster``       Faster Score-CAM: only the ``n`` channels of largest spatial std are scored
``sscam``        SS-CAM: s_k = 1/N sum_i f_c(x * (H_k + d_ik)), d_ik ~ N(0, sigma^2) at H x W
                 (torchcam ``SSCAM``: N = 35, sigma = 2, masks up(norm(A_k)))
``iscam``        IS-CAM: s_k = 1/N sum_i f_c(g_i x * H_k), g_i = sum_{j<=i} j/N (torchcam ``ISCAM``, N = 10)
``random``       uniform noise (a baseline every method must beat)
``center``       a centred Gaussian, sigma = 0.25 of the side (the centre-bias baseline)
=============== ==================================================================================

SS-CAM and IS-CAM score with the preset's mask graph extended by an added noise or a gain input
(:mod:`runtime.maskgraph`), then apply the preset's weight rule to the mean logits over the N
passes and finish the map the preset's way (default preset ``torchcam``, which is what torchcam's
``SSCAM`` / ``ISCAM`` compute: softmax_k(mean_i f_c(.) - f_c(x)), map at h x w, then upsampled).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import require_finite
from .maskgraph import EPS, GAIN, IMAGE, MAPS, NOISE, build_scorer
from .scorecam import PRESETS, constant_channels, get_preset, maps_from_scores, minmax

#: ``noise(i, start, stop) -> float32 [stop - start, H, W]``: the noise of channels start..stop-1 in pass i.
NoiseFn = Callable[[int, int, int], np.ndarray]


@dataclass(frozen=True)
class Method:
    """A registered method: its function, default parameters and whether it looks at the model."""

    name: str
    fn: Callable[..., np.ndarray]
    defaults: dict = field(default_factory=dict)
    description: str = ""
    baseline: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, description: str = "", baseline: bool = False, **defaults):
    """Decorator: register ``fn`` under ``name`` with default parameters ``defaults``."""

    def wrap(fn):
        METHODS[name] = Method(name, fn, dict(defaults), description, baseline)
        return fn

    return wrap


def list_methods() -> list[str]:
    return list(METHODS)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> tuple[Method, dict]:
    """``name[:key=value]...`` -> (method, parameters merged over its defaults)."""
    name, *parts = str(spec).strip().split(":")
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (choose from {', '.join(METHODS)})")
    method = METHODS[name]
    params = dict(method.defaults)
    for part in parts:
        key, sep, val = part.partition("=")
        if not sep or key not in method.defaults:
            allowed = ", ".join(method.defaults) or "none"
            raise ValueError(f"method {name!r}: bad parameter {part!r} (parameters: {allowed}; write key=value)")
        params[key] = _value(val)
    return method, params


def run_method(spec: str, explainer, x: np.ndarray, class_index: int, **overrides) -> np.ndarray:
    """The saliency [H,W] of method ``spec`` for input ``x`` [1,3,H,W] and one class."""
    method, params = parse_method(spec)
    params.update(overrides)
    sal = method.fn(explainer, np.asarray(x, np.float32), int(class_index), **params)
    return np.clip(np.nan_to_num(np.asarray(sal, np.float32)), 0, 1)


# ------------------------------------------------------------------------------ Score-CAM family


def _variant(explainer, preset: str | None = None, max_channels: int | None = None):
    """A shallow copy of the explainer (same engine and sessions) with another preset / channel cap."""
    ex = copy.copy(explainer)
    if preset is not None:
        ex.preset = get_preset(preset)
    ex.max_channels = int(max_channels) if max_channels else None
    return ex


@register("scorecam", "Score-CAM (preset= paper, gradcam, torchcam, official)", preset="paper")
def scorecam(explainer, x, class_index, preset="paper"):
    return _variant(explainer, preset).explain_tensor(x, [class_index])[0].saliency


for _p in PRESETS:
    register(f"scorecam-{_p}", f"Score-CAM, preset {_p}", preset=_p)(scorecam)


@register("faster", "Faster Score-CAM: the n channels of largest spatial std", n=10, preset="paper")
def faster(explainer, x, class_index, n=10, preset="paper"):
    return _variant(explainer, preset, max_channels=n).explain_tensor(x, [class_index])[0].saliency


def _scorer(engine, spec, noise: bool, gain: bool):
    """The noise / gain scoring session of ``engine`` (made once, kept with the engine; thread-safe)."""

    def build():
        data = build_scorer(engine.scoring_classifier(), spec, engine.input_size, input_name=engine.input_name,
                            noise=noise, gain=gain).SerializeToString()  # the graph's weights freed at once
        return engine.session(data, "scoring graph")

    return engine.extra_session(("methods", spec.key, noise, gain), build)


def repeated_scores(engine, x: np.ndarray, acts: np.ndarray, spec, passes: int,
                    noise: NoiseFn | None = None, gains: np.ndarray | None = None,
                    batch_size: int = 32) -> np.ndarray:
    """Mean over ``passes`` of the logits [K,C] of ``x * (g_i * H_k + d_ik)``, chunk by chunk.

    ``noise(i, start, stop)`` gives d_ik at H x W (SS-CAM), ``gains[i]`` g_i (IS-CAM); memory is
    O(batch), never O(K).
    """
    sess = _scorer(engine, spec, noise is not None, gains is not None)
    out_name = sess.get_outputs()[0].name
    k = acts.shape[0]
    maps4 = np.ascontiguousarray(acts[:, None], np.float32)
    base = {IMAGE: np.ascontiguousarray(x, np.float32), EPS: np.asarray(spec.eps, np.float32)}
    total = None
    for i in range(passes):
        for start in range(0, k, batch_size):
            stop = min(start + batch_size, k)
            feeds = {**base, MAPS: maps4[start:stop]}
            if noise is not None:
                feeds[NOISE] = np.ascontiguousarray(noise(i, start, stop), np.float32)[:, None]
            if gains is not None:
                feeds[GAIN] = np.full((stop - start, 1, 1, 1), gains[i], np.float32)
            out = sess.run([out_name], feeds)[0].astype(np.float64)
            if total is None:
                total = np.zeros((k, out.shape[1]), np.float64)
            total[start:stop] += out
    return total / passes


def _repeated_map(explainer, x, class_index, preset, passes, noise=None, gains=None) -> np.ndarray:
    p = get_preset(preset)
    engine = explainer.engine
    logits, acts = engine.classify_and_activations(x)
    require_finite(logits, acts, explainer.meta.layer)
    base = logits[0].astype(np.float64)
    skipped = constant_channels(acts)
    scored = ~skipped if p.skip_constant else np.ones(acts.shape[0], bool)
    masked = np.zeros((acts.shape[0], base.shape[0]), np.float64)
    if scored.any():
        idx = np.flatnonzero(scored)

        def noise_of_scored(i: int, a: int, b: int) -> np.ndarray:
            """The noise of the a-th..(b-1)-th scored channels (channel numbers as in ``acts``)."""
            if idx[b - 1] - idx[a] == b - a - 1:
                return noise(i, int(idx[a]), int(idx[b - 1]) + 1)
            return np.stack([noise(i, int(j), int(j) + 1)[0] for j in idx[a:b]])

        masked[scored] = repeated_scores(engine, x, acts[scored], p.mask, passes,
                                         None if noise is None else noise_of_scored, gains,
                                         explainer.batch_size)
        require_finite(masked[scored], masked=True)
    return maps_from_scores(p, acts, masked, base, [class_index], explainer.input_size, skipped=skipped,
                            channel_mask=scored)[0].saliency


def default_noise(sigma: float, size: tuple[int, int], seed: int = 0) -> NoiseFn:
    """N(0, sigma^2) noise at H x W, one generator per (seed, pass, channel): independent of batching."""

    def noise(i: int, start: int, stop: int) -> np.ndarray:
        return np.stack([np.random.default_rng((seed, i, k)).normal(0.0, sigma, size).astype(np.float32)
                         for k in range(start, stop)])

    return noise


@register("sscam", "SS-CAM: n noisy copies of each mask, noise sigma", n=35, sigma=2.0, preset="torchcam", seed=0)
def sscam(explainer, x, class_index, n=35, sigma=2.0, preset="torchcam", seed=0, noise: NoiseFn | None = None):
    """``noise`` (optional) replaces the sampler: ``noise(i, start, stop)`` -> [stop-start, H, W]."""
    if int(n) < 1:
        raise ValueError(f"sscam: n must be >= 1, got {n}")
    noise = noise or default_noise(float(sigma), explainer.input_size, int(seed))
    return _repeated_map(explainer, x, class_index, preset, int(n), noise=noise)


def iscam_gains(n: int) -> np.ndarray:
    """IS-CAM's input scales g_i = sum_{j=1..i} j / N, i = 1..N (as torchcam's ``ISCAM`` accumulates them)."""
    g, out = 0.0, []
    for i in range(int(n)):
        g += (i + 1) / int(n)
        out.append(g)
    return np.asarray(out, np.float32)


@register("iscam", "IS-CAM: n integration steps", n=10, preset="torchcam")
def iscam(explainer, x, class_index, n=10, preset="torchcam"):
    if int(n) < 1:
        raise ValueError(f"iscam: n must be >= 1, got {n}")
    return _repeated_map(explainer, x, class_index, preset, int(n), gains=iscam_gains(int(n)))


# ------------------------------------------------------------------------------------ baselines


@register("random", "uniform noise (baseline)", baseline=True, seed=0)
def random_map(explainer, x, class_index, seed=0):
    h, w = np.shape(x)[-2:]
    return np.random.default_rng(int(seed)).random((h, w)).astype(np.float32)


@register("center", "centred Gaussian, sigma = fraction of the side (baseline)", baseline=True, sigma=0.25)
def center_map(explainer, x, class_index, sigma=0.25):
    h, w = np.shape(x)[-2:]
    yy = (np.arange(h) + 0.5 - h / 2) / (float(sigma) * h)
    xx = (np.arange(w) + 0.5 - w / 2) / (float(sigma) * w)
    g = np.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2))
    return minmax(g.astype(np.float32))


__all__ = ["METHODS", "Method", "default_noise", "iscam_gains", "list_methods", "parse_method",
           "register", "repeated_scores", "run_method"]
