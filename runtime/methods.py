"""Saliency methods by name, all on Score-CAM's masked-scoring primitive, plus two reference baselines.

A method is a function ``(explainer, x [1,3,H,W], class_index, **params) -> saliency [H,W] in [0,1]``
registered with :func:`register`; :data:`METHODS` maps its name to it and :func:`list_methods` lists
them. A method is named on the command line as ``name[:key=value]...``, e.g. ``sscam:n=8:sigma=1``.

=============== ==================================================================================
``scorecam``     Score-CAM, the explainer's engine; ``preset=`` paper (default) / gradcam / torchcam /
                 official (``scorecam-<preset>`` names each one)
``faster``       Faster Score-CAM: only ``n`` channels are scored, chosen by ``select`` (auto / std /
                 relevance / cover, see :mod:`runtime.selection`), the others weigh 0 (``fill=zero``, the
                 default here: the published algorithm); ``fill=kernel`` (``Explainer(max_channels=n)``'s
                 default) weighs them by scores predicted from the scored channels' (kernel ridge
                 regression on the maps), ``fill=preview`` by their calibrated feature-space score
``preview``      the one-pass feature-space Score-CAM preview (``Explainer(mode="preview")``)
``reciprocam``   ReciproCAM (Byun & Lee 2022): the h*w spatially masked copies of the feature map
                 (3x3 Gaussian kernel around each cell, ``gaussian=1``; one cell, ``gaussian=0``) through
                 the classifier's tail after the target layer; map[i,j] = softmax(tail(A * M_ij))_c
``rise``         RISE (Petsiuk et al. 2018): ``n`` random binary ``cells`` x ``cells`` grids (keep ``p``),
                 bilinearly upsampled and randomly shifted; map = sum_i softmax(f(x * M_i))_c M_i / (n p)
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
from .scorecam import PRESETS, constant_channels, get_preset, maps_from_scores, minmax, upsample

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
    task: str = "classify"  # "detect": fn(detection explainer, x, target: runtime.detect.Target, **params)


METHODS: dict[str, Method] = {}


def register(name: str, description: str = "", baseline: bool = False, task: str = "classify", **defaults):
    """Decorator: register ``fn`` under ``name`` with default parameters ``defaults`` (``task="detect"``: a
    method for one box of an object detector, :mod:`runtime.detect`)."""

    def wrap(fn):
        METHODS[name] = Method(name, fn, dict(defaults), description, baseline, task)
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


def _variant(explainer, preset: str | None = None, max_channels: int | None = None, select: str = "auto",
             mode: str = "scorecam", fill: str | None = None):
    """A shallow copy of the explainer (same engine and sessions) with another preset / channel cap /
    channel ranking / mode / fill (None: :func:`runtime.explainer.default_fill`, ``kernel`` with a cap)."""
    from .explainer import FILLS, default_fill
    from .selection import SELECTS

    ex = copy.copy(explainer)
    if preset is not None:
        ex.preset = get_preset(preset)
    ex.max_channels = int(max_channels) if max_channels else None
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; choose one of {', '.join(SELECTS)}")
    if (mode == "preview" or select == "relevance") and ex.head is None:
        raise ValueError(f"{'preview' if mode == 'preview' else 'select=relevance'} needs a global-pooling -> "
                         "linear head after the target layer; this model has another head")
    if (fill is not None and fill not in FILLS) or (fill == "preview" and ex.head is None):
        raise ValueError(f"fill {fill!r}: choose kernel, zero, or preview (needs a global-pooling -> linear head)")
    if fill == "preview" and ex.preset.name == "official":
        raise ValueError("fill 'preview' does not apply to the 'official' preset; use fill 'kernel' or 'zero'")
    ex.select, ex.mode, ex.fill_asked, ex.fill = select, mode, fill, default_fill(fill, ex.max_channels)
    return ex


@register("scorecam", "Score-CAM (preset= paper, gradcam, torchcam, official)", preset="paper")
def scorecam(explainer, x, class_index, preset="paper"):
    return _variant(explainer, preset).explain_tensor(x, [class_index])[0].saliency


for _p in PRESETS:
    register(f"scorecam-{_p}", f"Score-CAM, preset {_p}", preset=_p)(scorecam)


@register("faster", "Faster Score-CAM: n channels, chosen by select= auto, std, relevance or cover; fill= zero "
          "(default: the others weigh 0, as the paper), kernel (the Explainer's default with max_channels) or preview",
          n=10, preset="paper", select="auto", fill="zero")
def faster(explainer, x, class_index, n=10, preset="paper", select="auto", fill="zero"):
    """Faster Score-CAM by name: ``fill="zero"`` unless asked (``faster:fill=kernel`` is ``Explainer(
    max_channels=n)``'s default mode), so an evaluation that names it measures the published algorithm."""
    ex = _variant(explainer, preset, max_channels=n, select=select, fill=fill)
    return ex.explain_tensor(x, [class_index])[0].saliency


@register("preview", "one-pass feature-space Score-CAM (closed form through the linear head)", preset="paper")
def preview(explainer, x, class_index, preset="paper"):
    return _variant(explainer, preset, mode="preview").explain_tensor(x, [class_index])[0].saliency


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


# ----------------------------------------------------------------------------------- the peers

def _tail(engine):
    """The session of the classifier after the target layer (input A [N,K,h,w] -> class scores), made once
    per engine (under its lock)."""
    from .head import tail_graph

    def build():
        tail = tail_graph(engine.classifier_proto, engine.features_output, engine.class_output)
        if tail is None:
            raise ValueError("reciprocam needs the classifier after the target layer as its own graph, and this "
                             "model's output also depends on the image by another path")
        return engine.session(tail.SerializeToString(), "tail graph")

    return engine.extra_session(("methods", "tail"), build)


GAUSS3 = np.asarray([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16


def spatial_masks(h: int, w: int, gaussian: bool = True) -> np.ndarray:
    """ReciproCAM's [h*w, h, w] masks: cell (i,j) alone, or a 3x3 Gaussian kernel centred on it (clipped)."""
    out = np.zeros((h * w, h, w), np.float32)
    for i in range(h):
        for j in range(w):
            if not gaussian:
                out[i * w + j, i, j] = 1
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        out[i * w + j, i + di, j + dj] = GAUSS3[di + 1, dj + 1]
    return out


def _probs(out: np.ndarray, explainer) -> np.ndarray:
    out = np.asarray(out, np.float64)
    return out if explainer.meta.output_kind == "probabilities" else _softmax_rows(out)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@register("reciprocam", "ReciproCAM: h*w spatially masked feature maps through the classifier's tail", gaussian=1)
def reciprocam(explainer, x, class_index, gaussian=1):
    engine = explainer.engine
    sess = _tail(engine)
    _, acts = engine.classify_and_activations(x)
    k, h, w = acts.shape
    masks = spatial_masks(h, w, bool(int(gaussian)))
    name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    bs = max(1, int(explainer.batch_size))
    scores = []
    for start in range(0, h * w, bs):  # O(batch) memory: [B,K,h,w] mosaics at a time
        mosaic = np.ascontiguousarray(acts[None] * masks[start:start + bs, None], np.float32)
        scores.append(_probs(sess.run([out_name], {name: mosaic})[0], explainer)[:, class_index])
    cam = minmax(np.concatenate(scores).reshape(h, w).astype(np.float32))
    return minmax(upsample(cam, explainer.input_size))


def rise_masks(seed: int, start: int, stop: int, size: tuple[int, int], cells: int, p: float) -> np.ndarray:
    """RISE masks number ``start`` .. ``stop - 1`` [stop-start,H,W] of the run seeded ``seed``: binary
    cells x cells grids (1 with probability p), bilinearly upsampled to (cells + 1) * cell size and cropped at a
    random shift in [0, cell size). Mask i draws from its own generator ``(seed, i)``, so the masks do not
    depend on how the run is cut into batches."""
    import cv2

    hh, ww = size
    ch, cw = -(-hh // cells), -(-ww // cells)
    out = np.empty((stop - start, hh, ww), np.float32)
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng((int(seed), i))
        grid = (rng.random((cells, cells)) < p).astype(np.float32)
        big = cv2.resize(grid, ((cells + 1) * cw, (cells + 1) * ch), interpolation=cv2.INTER_LINEAR)
        dy, dx = int(rng.integers(0, ch)), int(rng.integers(0, cw))
        out[j] = big[dy:dy + hh, dx:dx + ww]
    return out


@register("rise", "RISE: n random upsampled binary input masks", n=2000, cells=8, p=0.5, seed=0)
def rise(explainer, x, class_index, n=2000, cells=8, p=0.5, seed=0):
    if int(n) < 1 or int(cells) < 1 or not 0 < float(p) <= 1:
        raise ValueError(f"rise: need n >= 1, cells >= 1 and 0 < p <= 1, got n={n}, cells={cells}, p={p}")
    engine = explainer.engine
    sess, name = engine.classifier, engine.input_name
    size = tuple(np.shape(x)[-2:])
    bs = max(1, int(explainer.batch_size))
    total = np.zeros(size, np.float64)
    for start in range(0, int(n), bs):  # O(batch) memory: masks and masked inputs made per batch
        m = rise_masks(int(seed), start, min(start + bs, int(n)), size, int(cells), float(p))
        out = sess.run([engine.class_output], {name: np.ascontiguousarray(x * m[:, None], np.float32)})[0]
        total += np.tensordot(_probs(out, explainer)[:, class_index], m, axes=1)
    return minmax((total / (int(n) * float(p))).astype(np.float32))


@register("drise", "D-RISE (detectors): n random masks weighted by their D-RISE similarity to the box", task="detect",
          n=4000, cells=16, p=0.5, seed=0)
def drise(explainer, x, target, n=4000, cells=16, p=0.5, seed=0):
    """D-RISE (Petsiuk et al. 2021) for one box of a :class:`runtime.detect.DetectionExplainer`: map =
    sum_i s_i M_i / (n p), s_i the similarity of ``x * M_i`` to the target (RISE masks, :func:`rise_masks`)."""
    from .detect.drise import drise_map

    if int(n) < 1 or int(cells) < 1 or not 0 < float(p) <= 1:
        raise ValueError(f"drise: need n >= 1, cells >= 1 and 0 < p <= 1, got n={n}, cells={cells}, p={p}")
    return drise_map(explainer, x, target, int(n), int(cells), float(p), int(seed))


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
