"""Quasi-random RISE with a ridge estimator, refined by the fast Score-CAM (the ``qrise`` method).

RISE (Petsiuk et al. 2018) scores ``n`` random smooth masks ``M_i`` and takes ``sum_i p_i M_i / (n p)``; its
error falls as ``1/sqrt(n)``, so it needs thousands of passes. Three changes give RISE(4000)'s insertion and
LeRF-MoRF at about 1/12 of its passes (``docs/evaluation.md``; what each buys: ``bench.insertion_study``):

1. **Designs**: the ``cells x cells`` on/off grids are the first ``n`` points of a scrambled Sobol' sequence in
   ``cells^2`` dimensions (a cell is on where its coordinate is >= 1/2), so every cell is on in half the masks
   and every pair of cells is balanced as well as ``n`` allows; each grid is bilinearly upsampled to
   ``(cells + 1)`` cells and cropped at a random shift in ``[0, cell)`` (RISE's smooth masks). A coarse grid
   (5 x 5) has fewer unknowns than RISE's 8 x 8, so ``n = 320`` passes estimate it well.
2. **Estimator**: ridge regression of the class probability on the mask values instead of RISE's weighted
   mean: with ``F`` the masks [n, P] (at the working resolution), ``Fc = F - mean_i F``, ``yc = p - mean p``,
   ``G = Fc Fc^T`` and ``lambda = k tr(G) / n``: ``w = Fc^T (G + lambda I)^-1 yc`` (kernel form, an n x n
   solve). ``k -> inf`` gives RISE's estimator (up to a constant); a finite ``k`` removes the part of each
   pixel's estimate that the other cells' on/off explain.
3. **Localisation**: the map is ``minmax(w) * cam^gamma``, ``cam`` the fast Score-CAM map (``max_channels=16``,
   kernel fill: 16 masked passes), which suppresses what the regression leaves on the background.

The regression runs at a working resolution of about 56 pixels per side (the masks are smooth at the cell
scale, 45 pixels on a 224 input with 5 cells), so memory is O(n x 56^2) whatever the input size, and the
masks are made and scored batch by batch.
"""

from __future__ import annotations

import numpy as np

#: the working resolution of the regression (pixels along the longer side)
WORK = 56


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
    """``w = Fc^T (Fc Fc^T + k tr(Fc Fc^T) / n I)^-1 (y - mean y)`` over masks [n,h,w] and scores [n]; [h,w].

    Constant scores (or one mask) give a zero map."""
    n = len(y)
    f = np.asarray(masks, np.float64).reshape(n, -1)
    fc = f - f.mean(0)
    yc = np.asarray(y, np.float64) - np.mean(y)
    gram = fc @ fc.T
    lam = float(k) * np.trace(gram) / n
    if n < 2 or np.ptp(np.asarray(y, np.float64)) == 0 or lam <= 0:
        return np.zeros(np.shape(masks)[1:], np.float64)
    alpha = np.linalg.solve(gram + lam * np.eye(n), yc)
    return (fc.T @ alpha).reshape(np.shape(masks)[1:])


def refine(w: np.ndarray, cam: np.ndarray, gamma: float) -> np.ndarray:
    """``minmax(minmax(w) * cam^gamma)``: the regression map, normalised, times the Score-CAM map (gamma = 0:
    the regression map alone)."""
    from .scorecam import minmax

    base = minmax(np.asarray(w, np.float32))
    if gamma:
        base = base * np.power(np.clip(np.asarray(cam, np.float32), 0, 1), np.float32(gamma))
    return minmax(base)


__all__ = ["WORK", "refine", "ridge_map", "smooth_masks", "work_size"]
