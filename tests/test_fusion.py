"""runtime.fusion: the multi-layer fusions against torch re-implementations (Poly-CAM's local normalisation
with torch's own pooling and bilinear resize) and on maps whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.fusion import FUSIONS, area_matrix, downsample, fuse, local_norm
from runtime.scorecam import minmax


def _torch_norm(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _torch_up(m: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _torch_poly(cams: list[np.ndarray], eps: float = 1e-2) -> torch.Tensor:
    """Poly-CAM as the issue states it, with torch ops: M_0 = norm(cam_0); M_l = up(M_(l-1)) * norm(cam_l) /
    (up(avg_pool(norm(cam_l))) + eps) (integer factors: avg_pool2d is the area average)."""
    t = [torch.from_numpy(c.astype(np.float64)) for c in cams]
    m = _torch_norm(t[0])
    for prev, cam in zip(t[:-1], t[1:], strict=True):
        c = _torch_norm(cam)
        f = cam.shape[0] // prev.shape[0]
        local = _torch_up(F.avg_pool2d(c[None, None], f)[0, 0], cam.shape)
        m = _torch_up(m, cam.shape) * c / (local + eps)
    return m


@pytest.mark.parametrize("grids", [[(7, 7), (14, 14), (28, 28)], [(3, 5), (6, 10)], [(2, 2), (8, 8)]])
def test_poly_fusion_matches_a_torch_reimplementation(grids):
    rng = np.random.default_rng(0)
    cams = [np.maximum(rng.normal(size=g), 0).astype(np.float32) for g in grids]
    fused, sal = fuse(cams, (56, 56), "poly")
    want = _torch_poly(cams)
    assert fused.shape == grids[-1]
    np.testing.assert_allclose(fused, want.numpy(), rtol=1e-4, atol=1e-5)  # float32 vs float64 arithmetic
    ref_sal = _torch_norm(torch.relu(_torch_up(want, (56, 56)))).numpy()
    np.testing.assert_allclose(sal, ref_sal, atol=1e-4)


def test_area_matrix_is_the_average_over_cells_and_handles_fractions():
    np.testing.assert_allclose(area_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    w = area_matrix(5, 2)  # 2.5 input cells per output cell
    np.testing.assert_allclose(w, [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]])
    np.testing.assert_allclose(area_matrix(7, 3).sum(1), 1.0)
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(downsample(m, (2, 2)), [[2.5, 4.5], [10.5, 12.5]])


def test_local_norm_is_one_on_a_locally_flat_map():
    flat = np.kron(np.arange(1, 5, dtype=np.float32).reshape(2, 2), np.ones((4, 4), np.float32))
    ln = local_norm(flat, (2, 2), eps=1e-9)
    corners = ln[6:, 6:], ln[:2, 6:], ln[6:, :2]  # at the outer corners bilinear up() gives the cell's own mean
    for block in corners:
        np.testing.assert_allclose(block, 1.0, atol=1e-6)


def test_a_finer_layer_moves_the_peak_inside_a_coarse_cell():
    coarse = np.zeros((2, 2), np.float32)
    coarse[0, 0] = 1.0  # the object is in the top-left quarter
    fine = np.zeros((8, 8), np.float32)
    fine[1, 2] = 1.0  # ... at this fine cell of it
    fine[6, 6] = 1.0  # a fine response in a quarter the coarse map rules out
    for how in ("poly", "product"):
        m, _ = fuse([coarse, fine], (8, 8), how)
        assert np.unravel_index(np.argmax(m), m.shape) == (1, 2), how
    m, _ = fuse([coarse, fine], (8, 8), "sum")  # a sum keeps both
    assert m[6, 6] > 0 and m[1, 2] == m.max()


def test_one_layer_fuses_to_its_own_normalised_map_and_constant_maps_give_zeros():
    rng = np.random.default_rng(1)
    cam = np.maximum(rng.normal(size=(7, 7)), 0).astype(np.float32)
    for how in FUSIONS:
        m, _ = fuse([cam], (14, 14), how)
        np.testing.assert_allclose(m, minmax(cam), atol=1e-6)
        zero, sal = fuse([np.zeros((7, 7)), np.zeros((14, 14))], (28, 28), how)
        assert np.isfinite(sal).all() and not sal.any()


def test_unknown_fusion_names_the_choices():
    with pytest.raises(ValueError, match="poly, product, sum"):
        fuse([np.ones((2, 2))], (4, 4), "max")
