"""Saliency methods by name, all on Score-CAM's masked-scoring primitive, plus two reference baselines.

A method is a function ``(explainer, x [1,3,H,W], class_index, **params) -> saliency [H,W] in [0,1]``
registered with :func:`register`; :data:`METHODS` maps its name to it and :func:`list_methods` lists
them. A method is named on the command line as ``name[:key=value]...``, e.g. ``sscam:n=8:sigma=1``.

=============== ==================================================================================
``scorecam``     Score-CAM, the explainer's engine; ``preset=`` paper (default) / gradcam / torchcam /
                 official (``scorecam-<preset>`` names each one); ``layers=N`` multi-layer Score-CAM (the
                 target layer plus N - 1 finer stages, fused by ``fusion=`` poly / product / sum);
                 ``baseline=blur`` masks onto the blurred image instead of 0 (also for ``faster``)
``faster``       Faster Score-CAM: only ``n`` channels are scored, chosen by ``select`` (auto / std /
                 relevance / cover, see :mod:`runtime.selection`), the others weigh 0 (``fill=zero``, the
                 default here: the published algorithm); ``fill=kernel`` (``Explainer(max_channels=n)``'s
                 default) weighs them by scores predicted from the scored channels' (kernel ridge
                 regression on the maps), ``fill=preview`` by their calibrated feature-space score
``preview``      the one-pass feature-space Score-CAM preview (``Explainer(mode="preview")``)
``reciprocam``   ReciproCAM (Byun & Lee 2022): the h*w spatially masked copies of the feature map
                 (3x3 Gaussian kernel around each cell, ``gaussian=1``; one cell, ``gaussian=0``) through
                 the classifier's tail after the target layer; map[i,j] = softmax(tail(A * M_ij))_c
                 (channels-last layers masked as they lie; token layers: ``vitreciprocam``)
``vitreciprocam`` ViT-ReciproCAM (Byun & Lee 2023; OpenVINO XAI's ``ViTReciproCAM``) for token layers
                 [N,T,D]: h*w copies of the tokens, copy (i,j) keeping cell (i,j)'s token (3x3 Gaussian
                 weights around it, ``gaussian=1``) and the auxiliary tokens (CLS, ``cls=1``; zeroed with
                 ``cls=0``), through the rest of the network: the target (the last block's first norm) and
                 the residual stream it normalises are masked alike, as OpenVINO XAI masks both
``rise``         RISE (Petsiuk et al. 2018): ``n`` random binary ``cells`` x ``cells`` grids (keep ``p``),
                 bilinearly upsampled and randomly shifted; map = sum_i softmax(f(x * M_i))_c M_i / (n p)
``qrise``        quasi-random RISE (:mod:`runtime.qrise`): ``n`` = 320 smooth masks from ``cells`` = 5 x 5
                 scrambled Sobol' designs, the class probability ridge-regressed on the masks (``k`` = 10),
                 times the fast Score-CAM map (16 channels, kernel fill) to the power ``gamma`` = 0.5;
                 ``edge`` = r > 0 (0, off, by default; e.g. 24): snapped to the photo's edges by a guided
                 filter of radius r pixels per 224 (more insertion, worse deletion: docs/evaluation.md);
                 ``check`` = s > 1 (0, off, by default; e.g. 4): a self-check picks, of five maps made from
                 these passes (this map, the regression map snapped to edges, this map guided-filtered,
                 RISE's estimator over the same masks, the fast CAM), the one with the highest mean
                 p_c(top j/s pixels kept) - mean p_c(top j/s pixels zeroed), j = 1..s-1: 10 (s-1) passes;
                 the result has the chosen map's pixel order and this map's values
``hsic``         HSIC attribution (Novello et al. 2022): ``n`` binary ``cells`` x ``cells`` masks from a
                 scrambled Sobol' sequence (cell on where the point's coordinate >= 1/2), the input masked
                 (``x * M_i``, nearest-upsampled); map[cell] = HSIC(cell on/off, class score) with the
                 kernels of the authors' Xplique: ``k(a,b) = 1/2 + [a == b]`` on the cell, an RBF of width
                 median(y) on the score ``y``; estimate ``tr(K H L H) / n``; upsampled bicubically
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
from .layout import NCHW, NHWC, NLC
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


def register(name: str, description: str = "", is_baseline: bool = False, task: str = "classify", **defaults):
    """Decorator: register ``fn`` under ``name`` with default parameters ``defaults`` (``is_baseline``: a
    reference map every method must beat, not a method; ``task="detect"``: a method for one box of an object
    detector, :mod:`runtime.detect`)."""

    def wrap(fn):
        METHODS[name] = Method(name, fn, dict(defaults), description, is_baseline, task)
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
             mode: str = "scorecam", fill: str | None = None, layers=None, baseline: str = "zero",
             fusion: str | None = None):
    """A shallow copy of the explainer (same engine and sessions) with another preset / channel cap /
    channel ranking / mode / fill (None: :func:`runtime.explainer.default_fill`, ``kernel`` with a cap) /
    layers / baseline / fusion (None: the explainer's)."""
    from .explainer import FILLS, check_layer_options, default_fill
    from .selection import SELECTS
    from .stages import parse_layers

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
    wanted = parse_layers(layers)
    fusion = fusion or explainer.fusion
    check_layer_options(wanted, mode, ex.fill, fusion, baseline, ex.engine.precision)
    ex.stages = ex.find_layers(wanted) if wanted else []
    ex.baseline, ex.fusion = baseline, fusion
    return ex


@register("scorecam", "Score-CAM (preset= paper, gradcam, torchcam, official; layers=N multi-layer, fusion= poly, "
          "product, sum; baseline= zero, blur)", preset="paper", layers=1, fusion="product", baseline="zero")
def scorecam(explainer, x, class_index, preset="paper", layers=1, fusion="product", baseline="zero"):
    ex = _variant(explainer, preset, layers=layers, fusion=fusion, baseline=baseline)
    return ex.explain_tensor(x, [class_index])[0].saliency


for _p in PRESETS:
    register(f"scorecam-{_p}", f"Score-CAM, preset {_p}", preset=_p)(scorecam)


@register("faster", "Faster Score-CAM: n channels (per layer), chosen by select= auto, std, relevance or cover; "
          "fill= zero (default: the others weigh 0, as the paper), kernel (the Explainer's default with "
          "max_channels) or preview; layers=N, fusion=, baseline= as scorecam",
          n=10, preset="paper", select="auto", fill="zero", layers=1, fusion="product", baseline="zero")
def faster(explainer, x, class_index, n=10, preset="paper", select="auto", fill="zero", layers=1, fusion="product",
           baseline="zero"):
    """Faster Score-CAM by name: ``fill="zero"`` unless asked (``faster:fill=kernel`` is ``Explainer(
    max_channels=n)``'s default mode), so an evaluation that names it measures the published algorithm."""
    ex = _variant(explainer, preset, max_channels=n, select=select, fill=fill, layers=layers, fusion=fusion,
                  baseline=baseline)
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
    if engine.layout.kind == NLC:  # its authors' ReciproCAM for transformers
        return vitreciprocam(explainer, x, class_index, gaussian=gaussian)
    if engine.layout.kind != NCHW:
        return _masked_cells(explainer, x, class_index, bool(int(gaussian)), keep_aux=True)
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


MASK = "scorecam_cell_mask"


def _masked_session(engine):
    """The classifier with a mask input multiplied into what the layers after the target read
    (:func:`runtime.head.masked_classifier`), made once per engine."""
    from .head import masked_classifier

    def build():
        shape = ["B", *[1 if i == engine.layout.channel_axis else d if d > 0 else f"d{i}" for i, d in
                        enumerate(_layer_shape(engine), start=1)]]
        try:
            model, _ = masked_classifier(engine.classifier_proto, engine.features_output, MASK, shape,
                                         engine.class_output)
        except ValueError as e:
            raise ValueError(f"reciprocam: {e}") from None
        return engine.session(model.SerializeToString(), "masked classifier")

    return engine.extra_session(("methods", "masked-cells"), build)


def _layer_shape(engine) -> list[int]:
    """The target layer's shape less the batch axis, from its layout (tokens: T = aux + h*w)."""
    lay = engine.layout
    if lay.kind == NLC:
        return [lay.tokens, -1]
    if lay.kind == NHWC:
        return [-1, -1, -1]
    raise ValueError("the masked classifier is for token and channels-last layers")


def _masked_cells(explainer, x, class_index, gaussian: bool, keep_aux: bool) -> np.ndarray:
    """ReciproCAM on the layer as it lies: copy k of the layer keeps cell k (weighted by the Gaussian kernel
    around it) and, for tokens, the auxiliary tokens (``keep_aux``) or zeros; map = softmax(f)_c per cell."""
    engine = explainer.engine
    layout = engine.layout
    _, acts = engine.classify_and_activations(x)
    h, w = acts.shape[1:]
    sess = _masked_session(engine)
    masks = spatial_masks(h, w, gaussian)[:, None]  # [hw,1,h,w]
    aux = np.full((layout.aux_tokens, 1), 1.0 if keep_aux else 0.0, np.float32) if layout.kind == NLC else None
    tokens = (layout.tokens or h * w) * acts.shape[0]
    bs = max(1, min(h * w, (1 << 23) // max(tokens, 1)))  # O(batch) memory: ~8M floats per copy of the layer
    out_name = sess.get_outputs()[0].name
    x = np.ascontiguousarray(x, np.float32)
    scores = []
    for start in range(0, h * w, bs):
        m = np.ascontiguousarray(layout.from_maps(masks[start:start + bs], aux), np.float32)
        scores.append(_probs(sess.run([out_name], {engine.input_name: x, MASK: m})[0], explainer)[:, class_index])
    cam = minmax(np.concatenate(scores).reshape(h, w).astype(np.float32))
    return minmax(upsample(cam, explainer.input_size))


@register("vitreciprocam", "ViT-ReciproCAM: h*w copies of the tokens, each keeping one cell's (Gaussian) and the "
          "CLS token, through the rest of the network", gaussian=1, cls=1)
def vitreciprocam(explainer, x, class_index, gaussian=1, cls=1):
    if explainer.engine.layout.kind != NLC:
        raise ValueError(f"vitreciprocam needs a token target layer [N,T,D] (ViT, DeiT); this model's is "
                         f"{explainer.engine.layout.kind}: use reciprocam")
    return _masked_cells(explainer, x, class_index, bool(int(gaussian)), keep_aux=bool(int(cls)))


def rise_masks(seed: int, start: int, stop: int, size: tuple[int, int], cells: int, p: float) -> np.ndarray:
    """RISE masks number ``start`` .. ``stop - 1`` [stop-start,H,W] of the run seeded ``seed``: binary
    cells x cells grids (1 with probability p), bilinearly upsampled to (cells + 1) * cell size and cropped at a
    random shift in [0, cell size) (:func:`runtime.qrise.smooth_masks`). Mask i draws from its own generator
    ``(seed, i)``, so the masks do not depend on how the run is cut into batches."""
    from .qrise import smooth_masks

    out = np.empty((stop - start, *size), np.float32)
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng((int(seed), i))
        grid = (rng.random((cells, cells)) < p).astype(np.float32)
        out[j] = smooth_masks(grid[None], size, rng)[0]
    return out


def hsic_designs(n: int, cells: int, seed: int = 0) -> np.ndarray:
    """``n`` binary [cells, cells] designs (float32 0/1): the first n points of a scrambled Sobol' sequence in
    cells^2 dimensions, a cell on where its coordinate is >= 1/2."""
    from .sobol import sobol

    return (sobol(int(n), int(cells) ** 2, scramble=True, seed=int(seed)) >= 0.5).astype(np.float32).reshape(
        int(n), int(cells), int(cells))


def hsic_scores(designs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """HSIC between each design variable (a column of ``designs`` [n,d], 0/1) and the output ``y`` [n], [d].

    ``HSIC_j = tr(K_j H L H) / n`` with ``K_j[a,b] = 1/2 + [x_aj == x_bj]`` (Xplique's binary kernel, 1.5 or
    0.5), ``L[a,b] = exp(-(y_a - y_b)^2 / (2 w^2))``, ``w = |median(y)|`` (1 if 0) and ``H = I - 1/n``. With
    ``Lc = H L H`` (rows and columns summing to 0) that is ``2 x_j^T Lc x_j / n``."""
    x = np.asarray(designs, np.float64)
    y = np.asarray(y, np.float64).ravel()
    n = y.size
    w = abs(float(np.median(y))) or 1.0
    lmat = np.exp(-((y[:, None] - y[None, :]) ** 2) / (2.0 * w * w))
    lc = lmat - lmat.mean(axis=0, keepdims=True) - lmat.mean(axis=1, keepdims=True) + lmat.mean()
    return 2.0 * np.einsum("aj,ab,bj->j", x, lc, x) / n


@register("hsic", "HSIC attribution: n binary cells x cells Sobol' masks, dependence of the class score on each cell",
          n=500, cells=8, seed=0, score="probability")
def hsic(explainer, x, class_index, n=500, cells=8, seed=0, score="probability"):
    from .sobol import MAX_DIMENSIONS

    if int(n) < 2 or not 1 <= int(cells) or int(cells) ** 2 > MAX_DIMENSIONS or score not in ("probability", "logit"):
        raise ValueError(f"hsic: need n >= 2, 1 <= cells <= 8 and score probability or logit, got n={n}, "
                         f"cells={cells}, score={score!r}")
    import cv2

    engine = explainer.engine
    sess, name = engine.classifier, engine.input_name
    h, w = np.shape(x)[-2:]
    designs = hsic_designs(int(n), int(cells), int(seed))
    rows = (np.arange(h) * int(cells)) // h  # nearest upsampling: pixel -> its cell
    cols = (np.arange(w) * int(cells)) // w
    bs = max(1, int(explainer.batch_size))
    y = []
    for start in range(0, int(n), bs):  # O(batch) memory
        m = designs[start:start + bs][:, rows][:, :, cols]
        out = sess.run([engine.class_output], {name: np.ascontiguousarray(x * m[:, None], np.float32)})[0]
        y.append(_probs(out, explainer)[:, class_index] if score == "probability"
                 else np.asarray(out, np.float64)[:, class_index])
    cell = hsic_scores(designs.reshape(int(n), -1), np.concatenate(y)).reshape(int(cells), int(cells))
    return minmax(cv2.resize(cell.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC))


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


@register("qrise", "quasi-random RISE: n smooth masks from Sobol' designs of cells (5+6: half 5 x 5, half 6 x 6), "
          "the class probability ridge-regressed on them (k), times the fast Score-CAM (16 channels, kernel fill) "
          "^ gamma; edge > 0: snapped to the photo's edges by a guided filter of radius edge per 224 pixels; "
          "check = s > 0: of five maps from these passes, the one whose top pixels the model needs most (insertion "
          "minus deletion at s - 1 points, 10 (s - 1) passes)",
          n=320, cells="5+6", k=10.0, gamma=0.5, seed=0, edge=0.0, check=0)
def qrise(explainer, x, class_index, n=320, cells="5+6", k=10.0, gamma=0.5, seed=0, edge=0.0, check=0):
    """:mod:`runtime.qrise`: ``minmax(ridge(p_c(x * M_i) ~ M_i)) * cam16^gamma`` (then :func:`edge_refine` with
    ``edge`` > 0), ``n`` passes + the fast Score-CAM's; ``check`` > 1: :func:`runtime.qrise.self_check` over
    :func:`runtime.qrise.check_candidates` at ``check`` steps (``10 (check - 1)`` passes more) picks the
    order of the pixels, the map keeps its own values (:func:`runtime.qrise.transfer_values`)."""
    from .qrise import checked, edge_refine, parse_cells, refine, ridge_map, scored_masks, upsampled

    try:
        parse_cells(cells)
    except ValueError as e:
        raise ValueError(f"qrise: {e}") from None
    if (int(n) < 2 or float(k) <= 0 or float(gamma) < 0 or not 0 <= float(edge) <= 224
            or int(check) not in (0, *range(2, 65))):
        raise ValueError(f"qrise: need n >= 2, k > 0, gamma >= 0, 0 <= edge <= 224 and check 0 or 2..64, got n={n}, "
                         f"k={k}, gamma={gamma}, edge={edge}, check={check}")
    size = tuple(np.shape(x)[-2:])
    low, y = scored_masks(explainer, x, [class_index], int(n), cells, int(seed))
    w = upsampled(ridge_map(low, y, float(k)), size)[0]
    cam = run_method("faster:n=16:fill=kernel", explainer, x, class_index) if float(gamma) or int(check) else None
    q = edge_refine(refine(w, cam, float(gamma)), x, float(edge))
    if not int(check):
        return q
    return checked(explainer, x, class_index, q, w, cam, low, y[:, 0], int(check))[0]


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


@register("random", "uniform noise (baseline)", is_baseline=True, seed=0)
def random_map(explainer, x, class_index, seed=0):
    h, w = np.shape(x)[-2:]
    return np.random.default_rng(int(seed)).random((h, w)).astype(np.float32)


@register("center", "centred Gaussian, sigma = fraction of the side (baseline)", is_baseline=True, sigma=0.25)
def center_map(explainer, x, class_index, sigma=0.25):
    h, w = np.shape(x)[-2:]
    yy = (np.arange(h) + 0.5 - h / 2) / (float(sigma) * h)
    xx = (np.arange(w) + 0.5 - w / 2) / (float(sigma) * w)
    g = np.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2))
    return minmax(g.astype(np.float32))


__all__ = ["METHODS", "Method", "default_noise", "hsic_designs", "hsic_scores", "iscam_gains", "list_methods",
           "parse_method", "register", "repeated_scores", "run_method", "vitreciprocam"]
