"""Which masks to score, in pure numpy: channel ranking, distinct masks, the one-pass feature-space score.

Notation (DESIGN.md): activations ``A`` [K,h,w], class ``c``; with a global-pooling -> linear head the
logits are ``f(A) = W @ mean_hw(A) + b`` (``W`` [C,K], ``b`` [C], :mod:`runtime.head`).

- ``std`` ranking (Faster Score-CAM): ``r_k = std_hw(A_k)``, class-blind.
- ``relevance`` ranking: ``r_k = max_c |W[c,k]| * std_hw(A_k) / max_j(|W[c,j]| * std_hw(A_j))`` over the
  classes explained (each class's ranking normalised to 1, then the union by the max): a channel counts
  when it both varies over the image and moves the logit of a class being explained.
- distinct masks: two channels whose maps are equal after min-max normalisation (and whose
  ``range / (range + eps)`` is equal in float32) have the same mask, so the same score.
- ``cover`` selection: the N channels whose normalised maps ``n_k = norm(A_k)`` (h x w, min-max) best
  cover all of them: weighted k-means on ``n_k`` (weights ``sqrt(relevance)``, or ``sqrt(std)`` without a
  linear head; deterministic start: farthest-point sampling from the heaviest), each cluster represented by its member
  nearest the centre.
- ``kernel`` fill: the scores of the channels left out predicted from the scored ones by kernel ridge
  regression on the maps: ``s_hat = mu + k(n, N_S) (k(N_S, N_S) + lambda I)^-1 (s_S - mu)``, Gaussian
  ``k(a, b) = exp(-|a - b|^2 / h)``, ``h`` = :data:`KERNEL_BANDWIDTH` x the median squared distance between
  maps, ``lambda`` = :data:`KERNEL_RIDGE`, ``mu`` the mean scored row. Two channels with similar maps have
  similar masks and so similar scores; the regression needs no linear head.
- feature-space score (the one-pass preview): the mask applied to the *features* instead of the input,
  ``s_k = f_c(A * norm(A_k)) = sum_j W[c,j] mean_hw(A_j * norm(A_k)) + b_c = mean_hw(M_c * norm(A_k)) + b_c``
  with ``M_c = sum_j W[c,j] A_j`` (the class activation map): no extra pass.
"""

from __future__ import annotations

import numpy as np

from .scorecam import MaskSpec, constant_channels, minmax

SELECTS = ("auto", "std", "relevance", "cover")
#: kernel fill: bandwidth in units of the median squared distance between normalised maps, ridge, and the
#: power of the cover weights (chosen by measurement on the sample photos and their crops: bench/README.md)
KERNEL_BANDWIDTH = 2.0
KERNEL_RIDGE = 0.1
COVER_POWER = 0.5
KMEANS_ITERATIONS = 10


def spatial_std(acts: np.ndarray) -> np.ndarray:
    """``std_hw(A_k)`` [K] (float64)."""
    return acts.reshape(acts.shape[0], -1).astype(np.float64).std(axis=1)


def relevance(acts: np.ndarray, weight: np.ndarray, classes) -> np.ndarray:
    """``max over c in classes of |W[c,k]| std(A_k) / max_j |W[c,j]| std(A_j)`` [K] (see the module doc)."""
    sd = spatial_std(acts)
    rel = np.abs(np.asarray(weight, np.float64)[np.asarray(list(classes), np.int64)]) * sd[None, :]  # [n,K]
    top = rel.max(axis=1, keepdims=True)
    rel = np.where(top > 0, rel / np.where(top > 0, top, 1.0), 0.0)
    return rel.max(axis=0)


def top_channels(rank: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """Boolean [K]: the ``n`` allowed channels of largest ``rank`` (ties: the lower index first)."""
    r = np.where(allowed, rank, -np.inf)
    keep = np.argsort(-r, kind="stable")[: int(n)]
    out = np.zeros(rank.shape[0], bool)
    out[keep] = True
    return out & allowed


def distinct_masks(acts: np.ndarray, spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(first [m], inverse [K])``: channel ``k`` has the mask of channel ``first[inverse[k]]``.

    The key of a channel is its map at h x w after min-max normalisation (float32 bits) and its
    ``range / (range + eps)`` in float32, the factor ``eps`` leaves on the mask: equal keys give equal
    masks for ``norm(up(A))`` and ``up(norm(A))`` alike (``up`` is linear and keeps constants). Constant
    channels all share the all-zero key.
    """
    k = acts.shape[0]
    flat = acts.reshape(k, -1).astype(np.float32)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    rng = hi - lo
    normed = np.where(rng > 0, (flat - lo) / np.where(rng > 0, rng, 1), 0).astype(np.float32)
    factor = np.where(rng > 0, rng / (rng + np.float32(spec.eps)), 0).astype(np.float32)
    keys = np.ascontiguousarray(np.concatenate([normed, factor], axis=1))
    rows = keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups numbered by their first channel
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.ravel()]


def normalized_maps(acts: np.ndarray) -> np.ndarray:
    """``n_k = norm(A_k)`` flattened, [K,h*w] float64 (min-max over h x w; a constant channel is all zeros)."""
    return minmax(acts).reshape(acts.shape[0], -1).astype(np.float64)


def sq_distances(a: np.ndarray, b: np.ndarray, a2: np.ndarray | None = None) -> np.ndarray:
    """``|a_i - b_j|^2`` [len(a), len(b)] without the [n,m,d] intermediate (clipped at 0); ``a2``: the
    squared norms of ``a``'s rows when known."""
    a2 = (a * a).sum(1) if a2 is None else a2
    d = a2[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def cover(acts: np.ndarray, weight: np.ndarray, allowed: np.ndarray, n: int,
          iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Boolean [K]: at most ``n`` allowed channels whose normalised maps cover the allowed ones (module doc).

    Weighted k-means on ``n_k`` with weights ``weight`` [K] (>= 0), started deterministically by
    farthest-point sampling from the heaviest channel; each cluster is represented by its member nearest
    its centre. Channels with equal maps always fall in one cluster, so no mask is chosen twice.
    """
    idx = np.flatnonzero(allowed)
    out = np.zeros(acts.shape[0], bool)
    if idx.size <= n:
        out[idx] = True
        return out
    x = normalized_maps(acts[idx])
    w = np.maximum(np.nan_to_num(np.asarray(weight, np.float64)[idx]), 0.0) + 1e-12
    x2 = (x * x).sum(1)
    chosen = [int(np.argmax(w))]
    dist = sq_distances(x, x[chosen], x2)[:, 0]
    for _ in range(n - 1):
        j = int(np.argmax(dist))
        if dist[j] <= 0:  # fewer than n distinct maps
            break
        chosen.append(j)
        dist = np.minimum(dist, sq_distances(x, x[j:j + 1], x2)[:, 0])
    centres = x[chosen]
    for _ in range(iterations):
        label = sq_distances(x, centres, x2).argmin(axis=1)
        for c in range(len(centres)):
            m = label == c
            if m.any():
                centres[c] = (w[m, None] * x[m]).sum(0) / w[m].sum()
    d = sq_distances(x, centres, x2)
    label = d.argmin(axis=1)
    for c in range(len(centres)):
        members = np.flatnonzero(label == c)
        if members.size:
            out[idx[members[np.argmin(d[members, c])]]] = True
    return out


def kernel_fill(acts: np.ndarray, scored: np.ndarray, values: np.ndarray, allowed: np.ndarray,
                bandwidth: float = KERNEL_BANDWIDTH, ridge: float = KERNEL_RIDGE) -> np.ndarray:
    """``values`` [K,m] with the rows of the allowed channels not ``scored`` predicted by kernel ridge
    regression on the normalised maps from the scored allowed rows (module doc), float64.

    Rows outside ``allowed`` and the scored rows are returned unchanged. Column by column: everything that
    depends on the maps alone (``k(N_S, N_S) + lambda I``, inverted once, and ``k(n, N_S)``) is shared, and each
    column's mean and products have the same shapes whatever ``m``, so a class's column does not change with
    the other classes explained beside it.
    """
    out = np.asarray(values, np.float64).copy()
    idx = np.flatnonzero(allowed)
    known = np.flatnonzero(allowed & scored)
    todo = np.flatnonzero(allowed & ~scored)
    if not known.size or not todo.size:
        return out
    x = normalized_maps(acts[idx])
    pos = np.searchsorted(idx, known), np.searchsorted(idx, todo)
    xs, xt = x[pos[0]], x[pos[1]]
    sample = x[:: -(-idx.size // 128)]  # the median distance over at most 128 maps (every m-th)
    dd = sq_distances(sample, sample).ravel()
    dd = dd[dd > 0]  # each pair twice: the same median
    h = bandwidth * (float(np.median(dd)) if dd.size else 1.0)
    inverse = np.linalg.inv(np.exp(-sq_distances(xs, xs) / h) + ridge * np.eye(known.size))  # SPD, eig >= ridge
    cross = np.exp(-sq_distances(xt, xs) / h)
    for j in range(out.shape[1]):
        y = out[known, j]
        mu = y.mean()
        out[todo, j] = mu + cross @ (inverse @ (y - mu))
    return out


def feature_scores(acts: np.ndarray, weight: np.ndarray, bias: np.ndarray, classes=None) -> np.ndarray:
    """``s[k,c] = mean_hw(M_c * norm(A_k)) + b_c`` [K,n] for ``classes`` (None: all C), float64.

    ``norm`` is the h x w min-max (eps 0; a constant channel's mask is 0, so its score is ``b_c``). With
    ``classes``, one class at a time (the same products whatever their number: a class's scores do not
    change with the others asked); None: every class in one product (the columns never depend on a request).
    """
    k = acts.shape[0]
    flat = np.nan_to_num(acts.reshape(k, -1).astype(np.float64))
    normed = minmax(acts).reshape(k, -1).astype(np.float64) * ~constant_channels(acts)[:, None]
    w = np.asarray(weight, np.float64)
    b = np.asarray(bias, np.float64)
    if classes is None:
        cams = w @ flat  # [C,hw]: the class activation maps
        return normed @ cams.T / flat.shape[1] + b[None, :]
    cls = [int(c) for c in classes]
    out = np.empty((k, len(cls)), np.float64)
    for i, c in enumerate(cls):
        cam = np.ascontiguousarray(w[c]) @ flat  # [hw]: the class activation map M_c
        out[:, i] = normed @ cam / flat.shape[1] + b[c]
    return out


__all__ = ["SELECTS", "cover", "distinct_masks", "feature_scores", "kernel_fill", "normalized_maps", "relevance",
           "spatial_std", "top_channels"]
