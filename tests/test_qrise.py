"""qrise (runtime.qrise): the ridge estimator recovers a known linear effect; the method runs, is bounded and
deterministic, and finds the toy model's known evidence."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.methods import parse_method
from runtime.qrise import refine, ridge_map, smooth_masks, work_size


def test_ridge_map_recovers_a_linear_effect():
    rng = np.random.default_rng(0)
    masks = smooth_masks((rng.random((300, 5, 5)) < 0.5).astype(np.float32), (20, 20), rng)
    truth = np.zeros((20, 20))
    truth[4:9, 11:16] = 1.0
    y = masks.reshape(300, -1) @ truth.ravel() / truth.sum() + 0.01 * rng.standard_normal(300)
    w = ridge_map(masks, y, 10.0)
    inside, outside = w[truth > 0].mean(), w[truth == 0].mean()
    assert inside > 5 * abs(outside)
    assert np.unravel_index(np.argmax(w), w.shape) in {(r, c) for r in range(3, 10) for c in range(10, 17)}


def test_ridge_map_of_constant_scores_is_zero():
    masks = np.random.default_rng(1).random((10, 4, 4))
    assert not ridge_map(masks, np.full(10, 0.3), 10.0).any()


def test_refine_and_work_size():
    w = np.linspace(-1, 1, 16).reshape(4, 4)
    cam = np.zeros((4, 4))
    cam[0] = 1
    out = refine(w, cam, 0.5)
    assert out.min() == 0 and out.max() == 1 and not out[1:].any()
    np.testing.assert_allclose(refine(w, cam, 0.0), (w + 1) / 2, atol=1e-6)
    assert work_size((224, 224)) == (56, 56) and work_size((100, 400)) == (14, 56)


def test_bad_parameters_are_refused():
    method, params = parse_method("qrise:n=8:cells=4")
    assert params["n"] == 8 and params["cells"] == 4
    with pytest.raises(ValueError, match="qrise"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, n=1)
    with pytest.raises(ValueError, match="qrise"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, cells=9)


def test_qrise_runs_on_a_bundle_bounded_and_deterministic(tmp_path):
    from bundles import make_bundle

    from runtime import Explainer
    from runtime.methods import run_method

    ex = Explainer(make_bundle(tmp_path / "b", size=32, channels=16), device="cpu", batch_size=7)
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    a = run_method("qrise:n=40:cells=4", ex, x, 1)
    b = run_method("qrise:n=40:cells=4", ex, x, 1)
    assert a.shape == (32, 32) and np.isfinite(a).all() and a.min() == 0 and a.max() == 1
    np.testing.assert_allclose(a, b, atol=1e-6)
    alone = run_method("qrise:n=40:cells=4:gamma=0", ex, x, 1)
    assert alone.shape == (32, 32) and np.isfinite(alone).all()
