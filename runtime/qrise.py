"""Quasi-random RISE with a ridge estimator, refined by the fast Score-CAM (the ``qrise`` method).

RISE (Petsiuk et al. 2018) scores ``n`` random smooth masks ``M_i`` and takes ``sum_i p_i M_i / (n p)``; its
error falls as ``1/sqrt(n)``, so it needs thousands of passes. Three changes bring 336 passes close to RISE(4000)
on insertion and LeRF-MoRF (on 54 held-out photos 0.284 / 0.213 against 0.293 / 0.230, and against exact
Score-CAM's 0.266 / 0.177) with exact Score-CAM's localisation (``docs/evaluation.md``; what each buys:
``bench.insertion_study``):

1. **Designs**: the on/off grids are the first points of scrambled Sobol' sequences (a cell is on where its
   coordinate is >= 1/2), so every cell is on in half the masks and every pair of cells is balanced as well
   as ``n`` allows; each grid is bilinearly upsampled to ``(cells + 1)`` cells and cropped at a random shift
   in ``[0, cell)`` (RISE's smooth masks). Coarse grids have fewer unknowns than RISE's 8 x 8, so ``n = 320``
   passes estimate them well; two scales (half the masks 5 x 5, half 6 x 6: :data:`DEFAULT_CELLS`) resolve
   more than one, since the two lattices of cell edges fall in different places.
2. **Estimator**: ridge regression of the class probability on the mask values instead of RISE's weighted
   mean: with ``F`` the masks [n, P] (at the working resolution), ``Fc = F - mean_i F``, ``yc = p - mean p``,
   ``G = Fc Fc^T`` and ``lambda = k tr(G) / n``: ``w = Fc^T (G + lambda I)^-1 yc`` (kernel form, an n x n
   solve). ``k -> inf`` gives RISE's estimator (up to a constant); a finite ``k`` removes the part of each
   pixel's estimate that the other cells' on/off explain.
3. **Localisation**: the map is ``minmax(w) * cam^gamma``, ``cam`` the fast Score-CAM map (``max_channels=16``,
   kernel fill: 16 masked passes), which suppresses what the regression leaves on the background.

An option of the method, not of the mode (``qrise:edge=24`` in :mod:`runtime.evaluate`; :func:`edge_refine`):
a guided filter (He et al. 2010) with the photo as guide moves the map's edges onto the photo's, weighted by
the square root of the map itself so that it stays where it was; no passes. It raises insertion and the
pointing game and worsens deletion, so LeRF-MoRF does not move on photos it was not chosen on
(``docs/evaluation.md``, round 4); the mode leaves it off.

A self-check (``qrise:check=4``, mode ``qrise-check``; :func:`self_check`): of five maps made from these
passes (:func:`check_candidates`), the one whose top pixels the model needs most, by the insertion and deletion
curves at ``check - 1`` inner points (30 passes at 4), gives the pixel order, ``qrise``'s map the values
(:func:`transfer_values`). On 61 photos no one had used it scores insertion 0.293 and LeRF-MoRF 0.243 against
RISE(4000)'s 0.193 / 0.152, on 24 fresh ones 0.259 / 0.190 against 0.243 / 0.184 (``docs/evaluation.md``, round 5).

The regression runs at a working resolution of about 56 pixels per side (the masks are smooth at the cell
scale, 45 pixels on a 224 input with 5 cells), so memory is O(n x 56^2) whatever the input size, and the
masks are made and scored batch by batch.
"""

from __future__ import annotations

import itertools

import numpy as np

#: the working resolution of the regression (pixels along the longer side)
WORK = 56
#: the masks of the default designs (the passes the regression takes)
QRISE_MASKS = 320
#: the scales of the default designs (cells per side, ``+``-joined): half the masks on each
DEFAULT_CELLS = "5+6"
#: the most cells per side: the Sobol' generator's 64 dimensions
MAX_CELLS = 8
#: the edge-aware refinement's radius in pixels per 224 pixels of the input's longer side (:func:`edge_refine`;
#: the method's option ``edge``, off by default)
EDGE = 24.0
#: the self-check's resolution (:func:`self_check`): insertion and deletion at j / CHECK of the pixels
CHECK = 4
#: the guided filter's regulariser (the guide in [0, 1]): below ~1e-3 the output no longer changes
EDGE_EPS = 1e-3


def parse_cells(cells: int | str) -> tuple[int, ...]:
    """``5`` or ``"5+6"`` -> ``(5,)`` / ``(5, 6)``: the grid sizes of the designs, each in 1..:data:`MAX_CELLS`."""
    try:
        out = tuple(int(c) for c in str(cells).split("+"))
    except ValueError:
        out = ()
    if not out or not all(1 <= c <= MAX_CELLS for c in out):
        raise ValueError(f"cells: grid sizes 1..{MAX_CELLS}, one or '+'-joined (e.g. 5+6), got {cells!r}")
    return out


def designs(n: int, cells: int | str, seed: int = 0) -> list[np.ndarray]:
    """``n`` on/off grids (float32 0/1), split evenly over the scales of ``cells``: for each scale ``g`` the
    first points of a scrambled Sobol' sequence in ``g^2`` dimensions (seed ``seed``), a cell on where its
    coordinate is >= 1/2; the scales one after the other."""
    from .sobol import sobol

    scales = parse_cells(cells)
    out: list[np.ndarray] = []
    for j, g in enumerate(scales):
        m = n // len(scales) + (j < n % len(scales))
        if m:
            pts = sobol(m, g * g, scramble=True, seed=int(seed)) >= 0.5
            out += list(pts.astype(np.float32).reshape(m, g, g))
    return out


def design_masks(grids: list[np.ndarray], start: int, stop: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Masks ``start .. stop - 1`` [stop-start,H,W] of ``grids``: :func:`smooth_masks`, mask ``i`` shifted by
    its own generator ``(seed, i)`` (so the masks do not depend on how a run is cut into batches)."""
    return np.concatenate([smooth_masks(grids[i][None], size, np.random.default_rng((int(seed), i)))
                           for i in range(start, stop)]) if stop > start else np.zeros((0, *size), np.float32)


def smooth_masks(grids: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """RISE's smooth masks [B,H,W] from on/off ``grids`` [B,g,g]: each bilinearly upsampled to ``(g + 1)``
    cells of ``ceil(H / g) x ceil(W / g)`` pixels and cropped at a shift drawn from ``rng`` in ``[0, cell)``."""
    import cv2

    hh, ww = size
    g = grids.shape[-1]
    ch, cw = -(-hh // g), -(-ww // g)
    out = np.empty((len(grids), hh, ww), np.float32)
    for i, grid in enumerate(np.asarray(grids, np.float32)):
        big = cv2.resize(grid, ((g + 1) * cw, (g + 1) * ch), interpolation=cv2.INTER_LINEAR)
        dy, dx = int(rng.integers(0, ch)), int(rng.integers(0, cw))
        out[i] = big[dy:dy + hh, dx:dx + ww]
    return out


def work_size(size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the regression's working resolution: the longer side :data:`WORK`, the aspect kept."""
    hh, ww = size
    s = WORK / max(hh, ww)
    return max(1, round(hh * s)), max(1, round(ww * s))


def ridge_map(masks: np.ndarray, y: np.ndarray, k: float) -> np.ndarray:
    """``w = Fc^T (Fc Fc^T + k tr(Fc Fc^T) / n I)^-1 (y - mean y)`` over masks [n,h,w] and scores ``y`` [n]
    -> [h,w], or ``y`` [n,m] (m targets, one solve) -> [m,h,w].

    Constant scores (or one mask) give a zero map."""
    yy = np.asarray(y, np.float64)
    cols = yy.reshape(len(yy), -1)
    n, shape = len(cols), np.shape(masks)[1:]
    f = np.asarray(masks, np.float64).reshape(n, -1)
    fc = f - f.mean(0)
    yc = cols - cols.mean(0)
    yc[:, np.ptp(cols, axis=0) == 0] = 0.0  # a constant score explains nothing
    gram = fc @ fc.T
    lam = float(k) * np.trace(gram) / n if n else 0.0
    if n < 2 or lam <= 0:
        w = np.zeros((cols.shape[1], *shape), np.float64)
    else:
        alpha = np.linalg.solve(gram + lam * np.eye(n), yc)
        w = (fc.T @ alpha).T.reshape(cols.shape[1], *shape)
    return w[0] if yy.ndim == 1 else w


def scored_masks(explainer, x: np.ndarray, classes: list[int], n: int = QRISE_MASKS,
                 cells: int | str = DEFAULT_CELLS, seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """The passes of qrise: the classifier's probabilities of ``x * M_i`` for the masks of :func:`designs`
    -> (the masks at the working resolution [n,h,w], the probabilities of ``classes`` [n,len(classes)]).
    Memory O(batch x H x W + n x 56^2); ``progress(done, n)`` after each batch."""
    import cv2

    from .engine import require_finite
    from .methods import _probs

    engine = explainer.engine
    sess, name = engine.classifier, engine.input_name
    size = tuple(np.shape(x)[-2:])
    small = work_size(size)
    grids = designs(int(n), cells, int(seed))
    bs = max(1, int(explainer.batch_size))
    low = np.empty((len(grids), *small), np.float32)
    y = []
    for start in range(0, len(grids), bs):  # O(batch) full-size masks; the regression keeps the small copies
        stop = min(start + bs, len(grids))
        m = design_masks(grids, start, stop, size, int(seed))
        out = sess.run([engine.class_output], {name: np.ascontiguousarray(x * m[:, None], np.float32)})[0]
        require_finite(np.asarray(out).reshape(len(m), -1), masked=True)
        y.append(_probs(out, explainer)[:, list(classes)])
        for j, mask in enumerate(m):
            low[start + j] = cv2.resize(mask, small[::-1], interpolation=cv2.INTER_AREA)
        if progress:
            progress(stop, len(grids))
    return low, np.concatenate(y)


def upsampled(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Working-resolution maps [m,h,w] bilinearly upsampled to ``size`` and min-max normalised: [m,H,W]."""
    import cv2

    from .scorecam import minmax

    return np.stack([minmax(cv2.resize(np.asarray(c, np.float32), size[::-1], interpolation=cv2.INTER_LINEAR))
                     for c in maps])


def conditional_map(masks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RISE's estimator as a contrast over masks [n,h,w] and scores ``y`` [n]: per pixel the mean score of
    the masks weighted by the pixel's value minus the mean weighted by one minus it,
    ``sum_i y_i M_i / sum_i M_i - sum_i y_i (1 - M_i) / sum_i (1 - M_i)`` -> [h,w]."""
    f = np.asarray(masks, np.float64).reshape(len(masks), -1)
    yy = np.asarray(y, np.float64)
    on = yy @ f / (f.sum(0) + 1e-6)
    off = yy @ (1.0 - f) / ((1.0 - f).sum(0) + 1e-6)
    return (on - off).reshape(np.shape(masks)[1:])


def guide_image(x: np.ndarray) -> np.ndarray:
    """The guide of :func:`edge_refine`: the model's input [1,C,H,W] (or [C,H,W]) rescaled as a whole to
    [0, 1] -> [C,H,W] float64 (a constant input gives zeros)."""
    g = np.asarray(x, np.float64).reshape(-1, *np.shape(x)[-2:])
    span = float(np.ptp(g)) if g.size else 0.0
    return (g - g.min()) / span if span > 0 else np.zeros_like(g)


def guided_filter(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He, Sun and Tang's guided filter (2010) of ``src`` [H,W] with a ``guide`` of C channels [C,H,W] over
    (2r+1)^2 boxes (reflected at the border): per box ``a = (cov(I) + eps U)^-1 cov(I, p)`` (C numbers),
    ``b = mean(p) - a . mean(I)``; ``q = mean(a) . I + mean(b)`` (means over the boxes around each pixel).
    Locally an affine function of the guide: the output follows the guide's edges where ``src`` varies
    across them and is ``src`` smoothed where the guide is flat. [H,W] float32."""
    import cv2

    def box(a: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(a, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)

    i = np.moveaxis(np.asarray(guide, np.float64), 0, -1)  # [H,W,C]
    p = np.asarray(src, np.float64)
    c = i.shape[-1]
    mi = box(i).reshape(i.shape)  # cv2 drops a trailing axis of 1
    mp = box(p)
    cov_ip = box(i * p[..., None]).reshape(i.shape) - mi * mp[..., None]
    sig = np.empty((*p.shape, c, c))
    for u in range(c):
        for v in range(u, c):
            sig[..., u, v] = sig[..., v, u] = box(i[..., u] * i[..., v]) - mi[..., u] * mi[..., v]
    a = np.linalg.solve(sig + eps * np.eye(c), cov_ip[..., None])[..., 0]
    b = mp - (a * mi).sum(-1)
    return ((box(a).reshape(i.shape) * i).sum(-1) + box(b)).astype(np.float32)


def edge_refine(sal: np.ndarray, x: np.ndarray, edge: float = EDGE, eps: float = EDGE_EPS) -> np.ndarray:
    """``minmax(sqrt(sal) * minmax(guided_filter(guide_image(x), sal, r, eps)))``, ``r = round(edge * max(H, W)
    / 224)``: the map snapped to the edges of the photo the model saw (the filter), kept where it was (the
    square root of the map itself: the filter alone also spreads onto textured background, which costs
    localisation). ``edge`` = 0: ``sal`` unchanged."""
    from .scorecam import minmax

    sal = np.asarray(sal, np.float32)
    if not edge:
        return sal
    snapped = guided(sal, x, edge, eps)
    return minmax(np.sqrt(np.clip(sal, 0, None)) * snapped)


def guided(sal: np.ndarray, x: np.ndarray, edge: float = EDGE, eps: float = EDGE_EPS) -> np.ndarray:
    """``clip(minmax(guided_filter(guide_image(x), sal, r, eps)), 0, 1)``, ``r = round(edge * max(H, W) / 224)``:
    the map moved onto the photo's edges (and onto its texture: :func:`edge_refine` keeps it in place)."""
    from .scorecam import minmax

    hh, ww = np.shape(sal)[-2:]
    r = max(1, round(float(edge) * max(hh, ww) / 224))
    return np.clip(minmax(guided_filter(guide_image(x), np.asarray(sal, np.float32), r, float(eps))), 0, 1)


def check_candidates(q: np.ndarray, w: np.ndarray, cam: np.ndarray, cond: np.ndarray,
                     x: np.ndarray) -> dict[str, np.ndarray]:
    """The maps :func:`self_check` chooses from, all from qrise's own passes: ``qrise`` (the map as the
    options made it), ``edge(w)`` (the regression map alone, snapped to the photo's edges: :func:`edge_refine`),
    ``guided`` (``qrise`` through the guided filter: :func:`guided`), ``rise`` (RISE's estimator over the
    same masks: :func:`conditional_map`) and ``cam`` (the fast Score-CAM map)."""
    from .scorecam import minmax

    return {"qrise": np.asarray(q, np.float32), "edge(w)": edge_refine(w, x), "guided": guided(q, x),
            "rise": minmax(np.asarray(cond, np.float32)), "cam": minmax(np.clip(np.asarray(cam, np.float32), 0, 1))}


def transfer_values(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A map with the pixel order of ``order`` and the values of ``values``: ``values`` sorted high to low,
    laid on the pixels of ``order`` ranked as :func:`runtime.metrics.pixel_ranks` ranks them (high to low,
    ties in raster order), plus ``1e-6 (1 - rank / (P - 1))`` so that pixels ``values`` ties (its zeros) keep
    that order; min-max normalised [H,W] float32. What the faithfulness metrics measure (the order) is
    ``order``'s; what is shown (the contrast, the energy the pointing game sums) is ``values``'."""
    from .metrics import pixel_ranks
    from .scorecam import minmax

    ranks = pixel_ranks(order, True)
    n = ranks.size
    v = np.sort(np.asarray(values, np.float64).ravel())[::-1] + 1e-6 * (1.0 - np.arange(n) / max(n - 1, 1))
    return minmax(v[ranks].astype(np.float32))


def checked(explainer, x: np.ndarray, class_index: int, q: np.ndarray, w: np.ndarray, cam: np.ndarray,
            masks: np.ndarray, y: np.ndarray, steps: int = CHECK) -> tuple[np.ndarray, int]:
    """qrise's self-check for one class: :func:`check_candidates` from its map ``q``, ridge map ``w``, fast CAM
    ``cam`` and RISE's estimator over its working-resolution ``masks`` and that class's scores ``y`` [n];
    :func:`self_check` at ``steps``; the winner's pixel order with ``q``'s values (:func:`transfer_values`).
    -> (the map [H,W], the passes the check took)."""
    cond = upsampled(conditional_map(masks, y)[None], tuple(np.shape(x)[-2:]))[0]
    maps = check_candidates(q, w, cam, cond, x)
    best = self_check(explainer, x, class_index, maps, steps)[0]
    return transfer_values(maps[best], q), len(maps) * 2 * (int(steps) - 1)


def check_inputs(x: np.ndarray, sal: np.ndarray, steps: int = CHECK) -> np.ndarray:
    """The self-check's inputs for one map [2 (steps - 1), C, H, W]: ``x`` with only its top ``j / steps``
    pixels (ranked by ``sal`` as :func:`runtime.metrics.pixel_ranks`: ties in raster order) kept, the rest 0,
    for j = 1 .. steps - 1 (insertion on the zero canvas), then with those pixels set to 0 (deletion)."""
    from .metrics import pixel_ranks, step_counts

    ranks = pixel_ranks(sal, True)
    counts = step_counts(ranks.size, int(steps))[1:-1]
    top = (ranks[None] < counts[:, None, None]).astype(np.float32)[:, None]  # [j,1,H,W]
    xx = np.asarray(x, np.float32).reshape(1, -1, *ranks.shape)
    return np.concatenate([xx * top, xx * (1.0 - top)])


def self_check(explainer, x: np.ndarray, class_index: int, maps: dict[str, np.ndarray],
               steps: int = CHECK) -> tuple[str, dict[str, float]]:
    """Which of ``maps`` explains class ``class_index`` best by the model's own account: per map, ``score =
    mean_j p_c(top_j(x)) - mean_j p_c(x - top_j(x))``, ``top_j(x)`` the map's top ``j / steps`` pixels of ``x``
    on a zero canvas, ``j = 1 .. steps - 1`` (the insertion and deletion curves of the metrics, at
    ``steps - 1`` inner points; their end points are the same for every map). ``len(maps) * 2 (steps - 1)``
    passes. -> (the best map's name, first on ties; every map's score)."""
    from .engine import require_finite
    from .methods import _probs

    if int(steps) < 2:
        raise ValueError(f"the self-check needs steps >= 2, got {steps}")
    engine = explainer.engine
    bs = max(1, int(explainer.batch_size))
    rows = (row for sal in maps.values() for row in check_inputs(x, sal, int(steps)))  # one map's rows at a time
    p: list[np.ndarray] = []
    while batch := list(itertools.islice(rows, bs)):  # the maps' inputs in full batches, O(batch) memory
        out = engine.classifier.run([engine.class_output], {engine.input_name: np.stack(batch)})[0]
        require_finite(np.asarray(out).reshape(len(batch), -1), masked=True)
        p.append(_probs(out, explainer)[:, int(class_index)])
    per = np.concatenate(p).reshape(len(maps), 2, int(steps) - 1)
    scores = {name: float(a[0].mean() - a[1].mean()) for name, a in zip(maps, per, strict=True)}
    return max(scores, key=scores.get), scores


def refine(w: np.ndarray, cam: np.ndarray, gamma: float) -> np.ndarray:
    """``minmax(minmax(w) * cam^gamma)``: the regression map, normalised, times the Score-CAM map (gamma = 0:
    the regression map alone)."""
    from .scorecam import minmax

    base = minmax(np.asarray(w, np.float32))
    if gamma:
        base = base * np.power(np.clip(np.asarray(cam, np.float32), 0, 1), np.float32(gamma))
    return minmax(base)


__all__ = ["CHECK", "DEFAULT_CELLS", "EDGE", "EDGE_EPS", "MAX_CELLS", "QRISE_MASKS", "WORK", "check_candidates",
           "check_inputs", "checked", "conditional_map", "design_masks", "designs", "edge_refine", "guide_image",
           "guided", "guided_filter", "parse_cells", "refine", "ridge_map", "scored_masks", "self_check",
           "smooth_masks", "transfer_values", "upsampled", "work_size"]
