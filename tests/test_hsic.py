"""runtime.sobol and the ``hsic`` method: Sobol' points against scipy (the real peer), HSIC against the
estimator of the authors' Xplique re-implemented in numpy, and on a model whose right answer is known."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bundles import save_bundle
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import qmc

from runtime import Explainer, images
from runtime.contract import BundleMeta, Preprocessing
from runtime.methods import hsic_designs, hsic_scores, run_method
from runtime.sobol import MAX_DIMENSIONS, sobol
from tests.bundles import make_bundle, photo


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_unscrambled_sobol_points_are_scipys(d):
    np.testing.assert_array_equal(sobol(1024, d, scramble=False), qmc.Sobol(d, scramble=False).random(1024))


def test_scrambled_points_stay_a_digital_net_and_differ_by_seed():
    a, b = sobol(512, 64, seed=0), sobol(512, 64, seed=1)
    assert not np.array_equal(a, b) and np.array_equal(a, sobol(512, 64, seed=0))
    assert 0 <= a.min() and a.max() < 1
    for j in range(64):  # every dimension: each of the 16 intervals [i/16, (i+1)/16) holds 512 / 16 points
        assert (np.bincount((a[:, j] * 16).astype(int), minlength=16) == 32).all()
    for i, j in [(0, 1), (5, 40), (62, 63)]:  # pairs of dimensions: each of the 4 x 4 cells holds 32 points
        cells = (a[:, i] * 4).astype(int) * 4 + (a[:, j] * 4).astype(int)
        assert (np.bincount(cells, minlength=16) == 32).all()
    assert qmc.discrepancy(a[:, :4]) < qmc.discrepancy(np.random.default_rng(0).random((512, 4)))


def test_sobol_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="1..64"):
        sobol(8, MAX_DIMENSIONS + 1)
    with pytest.raises(ValueError, match="at least one"):
        sobol(0, 2)


def _xplique_hsic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Xplique's ``BinaryEstimator``: K_j = prod(1 + (0.5 - (x_a - x_b)^2)), L = RBF of width median(y),
    score = sum((H K H) * (H L H)^T) / n, one cell at a time."""
    n = y.size
    w = np.percentile(y, 50.0)
    lmat = np.exp(-((y[:, None] - y[None, :]) ** 2) / (2 * w ** 2))
    h = np.eye(n) - np.ones((n, n)) / n
    lc = h @ lmat @ h
    out = []
    for j in range(x.shape[1]):
        k = 1 + (0.5 - (x[:, j][:, None] - x[:, j][None, :]) ** 2)
        out.append(np.sum((h @ k @ h) * lc.T) / n)
    return np.asarray(out)


def test_hsic_scores_equal_xpliques_estimator():
    rng = np.random.default_rng(0)
    x = (rng.random((96, 9)) < 0.5).astype(np.float64)
    y = 2.0 + x[:, 4] * 3 + 0.5 * x[:, 0] + rng.normal(0, 0.1, 96)
    got = hsic_scores(x, y)
    np.testing.assert_allclose(got, _xplique_hsic(x, y), rtol=1e-9, atol=1e-12)
    assert np.argmax(got) == 4


def test_designs_are_binary_balanced_and_distinct_cells():
    d = hsic_designs(512, 8, seed=0)
    assert d.shape == (512, 8, 8) and set(np.unique(d)) == {0.0, 1.0}
    np.testing.assert_array_equal(d.reshape(512, -1).mean(0), 0.5)  # a digital net: each bit exactly balanced
    assert len({c.tobytes() for c in d.reshape(512, -1).T}) == 64  # no two cells switch together


def _region_bundle(directory, size: int = 32, cell: tuple[int, int] = (1, 2), cells: int = 4):
    """A bundle whose class-0 logit is the sum of the (preprocessed) pixels of one grid cell: the right
    HSIC map is that cell."""
    mask = np.zeros((1, 1, size, size), np.float32)
    s = size // cells
    mask[..., cell[0] * s:(cell[0] + 1) * s, cell[1] * s:(cell[1] + 1) * s] = 1.0
    inits = [numpy_helper.from_array(mask, "region"), numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
             numpy_helper.from_array(np.asarray([1, 2, 3], np.int64), "axes")]
    feat_nodes = [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("Mul", ["r", "region"], ["features"])]
    head = [helper.make_node("ReduceSum", ["features", "axes"], ["s"], keepdims=0),
            helper.make_node("Unsqueeze", ["s", "one"], ["s2"]),
            helper.make_node("Mul", ["zero", "s2"], ["z"]),
            helper.make_node("Concat", ["s2", "z"], ["logits"], axis=1)]
    inits.append(numpy_helper.from_array(np.asarray([1], np.int64), "one"))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 1, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    op = [helper.make_opsetid("", 17)]
    feat = helper.make_model(helper.make_graph(feat_nodes, "f", [x], [f], inits[:2]), opset_imports=op)
    model = helper.make_model(helper.make_graph(feat_nodes + head, "m", [x], [y], inits), opset_imports=op)
    for m in (feat, model):
        m.ir_version = 8
        onnx.checker.check_model(m)
    pre = Preprocessing((size, size), "RGB", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    meta = BundleMeta("classifier", "features", pre, labels=("region", "nothing"))
    return save_bundle(directory, model, feat, meta)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_hsic_finds_the_one_cell_the_class_depends_on(tmp_path, score):
    ex = Explainer(_region_bundle(tmp_path / "region"), device="cpu")
    rgb = np.full((32, 32, 3), 200, np.uint8)
    x = images.preprocess(rgb, ex.pre)
    sal = run_method(f"hsic:cells=4:n=64:score={score}", ex, x, 0)
    assert sal.shape == (32, 32) and np.isfinite(sal).all() and 0 <= sal.min() and sal.max() <= 1
    cell_means = sal.reshape(4, 8, 4, 8).mean(axis=(1, 3))
    assert np.unravel_index(np.argmax(cell_means), (4, 4)) == (1, 2)
    assert cell_means[1, 2] > 2 * np.delete(cell_means.ravel(), 6).max()


def test_hsic_on_a_cnn_is_a_valid_map_and_bad_parameters_are_refused(tmp_path):
    ex = Explainer(make_bundle(tmp_path / "tiny"), device="cpu")
    x = images.preprocess(photo(), ex.pre)
    sal = run_method("hsic:n=32", ex, x, 1)
    assert sal.shape == (32, 32) and np.isfinite(sal).all() and sal.max() == pytest.approx(1.0)
    for bad in ("hsic:n=1", "hsic:cells=9", "hsic:score=rank"):
        with pytest.raises(ValueError, match="hsic"):
            run_method(bad, ex, x, 1)
