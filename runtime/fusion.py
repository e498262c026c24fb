"""Multi-layer Score-CAM in pure numpy: a finer layer's map, and fusing the layers' maps into one finer map.

A finer layer's map (:func:`finer_map`): its channels are scored like the target layer's (``s_k = f_c(x *
H_k)``), but the paper's weights ``softmax_k(s_k)`` are nearly uniform over a finer layer's channels (on
EfficientNet-Lite0's 112-channel 14 x 14 stage the largest is ~0.03), which turns ``sum_k a_k A_k`` into the
mean activation, an edge map. Instead each channel's normalised map weighs by how much its mask raises the
class score above the median channel's: ``cam = sum_k max(0, s_k - median_j s_j) norm(A_k)``.

Fusion input: one map per layer, ``cams[0]`` the deepest (coarsest, the target layer's preset map) and then
finer ones, each ``cam_l`` [h_l,w_l] >= 0. ``norm`` is the
min-max to [0,1], ``up_g`` the bilinear resize (half-pixel, as :func:`runtime.scorecam.upsample`) to grid
``g``, ``down_g`` the area average to grid ``g`` (cells of a non-integer size weighed by their overlap).

- ``poly`` (Poly-CAM's local normalisation, Englebert et al. 2022): ``M_0 = norm(cam_0)``; for each finer
  layer ``M_l = up_l(M_{l-1}) * L(cam_l)`` with ``L(c) = norm(c) / (up_l(down_{l-1}(norm(c))) + eps)``: the
  finer map says where *within* each coarser cell the evidence sits, the coarser map how much the cell holds.
- ``product``: ``prod_l up(norm(cam_l))`` (a pixel counts when every layer shows it).
- ``sum``: ``mean_l up(norm(cam_l))``.

The saliency is ``norm(up_HxW(M))``, and the fused map at the finest grid is returned too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .scorecam import minmax, upsample

#: Poly-CAM's local normalisation: ``eps`` relative to the normalised map's range (1)
LOCAL_EPS = 1e-2


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of the 1-D area average (each output cell the mean of the input cells it
    covers, weighed by overlap: OpenCV's INTER_AREA for a shrink)."""
    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            w[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        w[i] /= w[i].sum()
    return w


def downsample(m: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area average of ``m`` [h,w] to ``grid`` (h', w') <= (h, w)."""
    wy = area_matrix(m.shape[0], grid[0])
    wx = area_matrix(m.shape[1], grid[1])
    return (wy @ np.asarray(m, np.float64) @ wx.T).astype(np.float32)


def local_norm(cam: np.ndarray, coarse: tuple[int, int], eps: float = LOCAL_EPS) -> np.ndarray:
    """``norm(c) / (up(down_coarse(norm(c))) + eps)``: the map relative to its own mean over each coarse cell."""
    c = minmax(cam)
    return (c / (upsample(downsample(c, coarse), c.shape) + np.float32(eps))).astype(np.float32)


def fuse_poly(cams: Sequence[np.ndarray]) -> np.ndarray:
    """Poly-CAM's fusion (module doc), at the finest grid."""
    m = minmax(cams[0])
    for prev, cam in zip(cams[:-1], cams[1:], strict=True):
        m = upsample(m, cam.shape) * local_norm(cam, prev.shape)
    return m.astype(np.float32)


def fuse_product(cams: Sequence[np.ndarray]) -> np.ndarray:
    """``prod_l up(norm(cam_l))`` at the finest grid."""
    grid = cams[-1].shape
    m = np.ones(grid, np.float32)
    for cam in cams:
        m = m * upsample(minmax(cam), grid)
    return m


def fuse_sum(cams: Sequence[np.ndarray]) -> np.ndarray:
    """``mean_l up(norm(cam_l))`` at the finest grid."""
    grid = cams[-1].shape
    return (sum(upsample(minmax(cam), grid) for cam in cams) / len(cams)).astype(np.float32)


FUSIONS: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
    "poly": fuse_poly, "product": fuse_product, "sum": fuse_sum}
DEFAULT_FUSION = "product"


def finer_map(acts: np.ndarray, scores: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(map [h,w], weights [K]) of a finer layer for one class (module doc): ``scores`` [K] the class score of
    each channel's masked input, ``valid`` [K] the channels that weigh (scored or filled, not constant)."""
    s = np.asarray(scores, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(s)
    w = np.zeros(s.shape[0], np.float64)
    if valid.any():
        w[valid] = np.maximum(s[valid] - np.median(s[valid]), 0.0)
    k = acts.shape[0]
    normed = minmax(acts).reshape(k, -1).astype(np.float64)
    cam = (w @ normed).reshape(acts.shape[1:])
    return cam.astype(np.float32), w.astype(np.float32)


def fuse(cams: Sequence[np.ndarray], size: tuple[int, int], how: str = DEFAULT_FUSION) -> tuple[np.ndarray, np.ndarray]:
    """(fused map at the finest grid, saliency [H,W] in [0,1]) of the per-layer maps ``cams`` (deepest first)."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; choose one of {', '.join(FUSIONS)}")
    cams = [np.nan_to_num(np.maximum(np.asarray(c, np.float32), 0)) for c in cams]
    m = FUSIONS[how](cams)
    return m, minmax(np.maximum(upsample(m, size), 0))


__all__ = ["DEFAULT_FUSION", "FUSIONS", "area_matrix", "downsample", "finer_map", "fuse", "local_norm"]
