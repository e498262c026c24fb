"""Which masks to score, in pure numpy: channel ranking, distinct masks, the one-pass feature-space score.

Notation (DESIGN.md): activations ``A`` [K,h,w], class ``c``; with a global-pooling -> linear head the
logits are ``f(A) = W @ mean_hw(A) + b`` (``W`` [C,K], ``b`` [C], :mod:`runtime.head`).

- ``std`` ranking (Faster Score-CAM): ``r_k = std_hw(A_k)``, class-blind.
- ``relevance`` ranking: ``r_k = max_c |W[c,k]| * std_hw(A_k) / max_j(|W[c,j]| * std_hw(A_j))`` over the
  classes explained (each class's ranking normalised to 1, then the union by the max): a channel counts
  when it both varies over the image and moves the logit of a class being explained.
- distinct masks: two channels whose maps are equal after min-max normalisation (and whose
  ``range / (range + eps)`` is equal in float32) have the same mask, so the same score.
- feature-space score (the one-pass preview): the mask applied to the *features* instead of the input,
  ``s_k = f_c(A * norm(A_k)) = sum_j W[c,j] mean_hw(A_j * norm(A_k)) + b_c = mean_hw(M_c * norm(A_k)) + b_c``
  with ``M_c = sum_j W[c,j] A_j`` (the class activation map): no extra pass.
"""

from __future__ import annotations

import numpy as np

from .scorecam import MaskSpec, constant_channels, minmax

SELECTS = ("auto", "std", "relevance")


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


def feature_scores(acts: np.ndarray, weight: np.ndarray, bias: np.ndarray, classes=None) -> np.ndarray:
    """``s[k,c] = mean_hw(M_c * norm(A_k)) + b_c`` [K,n] for ``classes`` (None: all C), float64.

    ``norm`` is the h x w min-max (eps 0; a constant channel's mask is 0, so its score is ``b_c``).
    """
    k = acts.shape[0]
    flat = np.nan_to_num(acts.reshape(k, -1).astype(np.float64))
    normed = minmax(acts).reshape(k, -1).astype(np.float64) * ~constant_channels(acts)[:, None]
    w = np.asarray(weight, np.float64)
    b = np.asarray(bias, np.float64)
    if classes is not None:
        idx = np.asarray(list(classes), np.int64)
        w, b = w[idx], b[idx]
    cams = w @ flat  # [n,hw]: the class activation maps
    return normed @ cams.T / flat.shape[1] + b[None, :]


__all__ = ["SELECTS", "distinct_masks", "feature_scores", "relevance", "spatial_std", "top_channels"]
