"""runtime.metrics: hand-computed cases, a model whose perfect map is known, and parity with torchcam.

The parity tests feed the SAME map to ``runtime.metrics`` (ONNX Runtime) and to torchcam 0.5.0's
``ClassificationMetric`` / ``DeletionInsertionMetric`` (torch EfficientNet-Lite0), with the same
number of steps and the same substrate, and ask for agreement within 1e-3.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import metrics as M
from runtime.engine import Engine

# ----------------------------------------------------------------------------- pure numpy parts


def test_step_counts_one_percent_per_step():
    c = M.step_counts(224 * 224, 100)
    assert c[0] == 0 and c[-1] == 224 * 224 and len(c) == 101
    assert np.all(np.diff(c[:-1]) == 502)  # ceil(50176 / 100)
    assert list(M.step_counts(10, 3)) == [0, 4, 8, 10]
    with pytest.raises(ValueError):
        M.step_counts(10, 0)


def test_pixel_ranks_descending_and_stable():
    s = np.array([[0.1, 0.9], [0.9, 0.0]], np.float32)
    assert M.pixel_ranks(s).tolist() == [[2, 0], [1, 3]]  # ties in raster order
    assert M.pixel_ranks(s, most_relevant_first=False).tolist() == [[1, 2], [3, 0]]


def test_auc_is_the_trapezoid_rule():
    f = np.array([0.0, 0.25, 0.5, 1.0])
    y = np.array([1.0, 0.5, 0.5, 0.0])
    assert M.auc(y, f) == pytest.approx(np.trapezoid(y, f))
    assert M.auc(np.ones(5), np.linspace(0, 1, 5)) == pytest.approx(1.0)


def test_drop_and_increase_by_hand():
    d, inc = M.drop_and_increase(np.array([0.8, 0.5, 0.4]), np.array([0.2, 0.5, 0.6]))
    np.testing.assert_allclose(d, [0.6 / 0.8, 0.0, 0.0], rtol=1e-6)
    assert inc.tolist() == [False, False, True]


def test_keep_top_keeps_half():
    s = np.arange(16, dtype=np.float32).reshape(4, 4) / 15
    k = M.keep_top(s, 0.5)
    assert (k > 0).sum() == 8 and np.array_equal(k[2:], s[2:]) and not k[:2].any()  # kept values are copied


def test_energy_of_a_map_equal_to_the_box_is_one():
    s = np.zeros((20, 30), np.float32)
    s[5:12, 8:20] = 1.0
    assert M.energy_pointing_game(s, [[8, 5, 20, 12]]) == pytest.approx(1.0)
    assert M.energy_pointing_game(s, [[0, 0, 8, 5]]) == 0.0
    assert M.energy_pointing_game(np.ones((10, 10)), [[0, 0, 5, 10]]) == pytest.approx(0.5)
    assert M.energy_pointing_game(np.ones((10, 10)), [[0, 0, 5, 10], [5, 0, 10, 2]]) == pytest.approx(0.6)
    assert M.energy_pointing_game(np.zeros((4, 4)), [[0, 0, 2, 2]]) == 0.0


def test_boxes_scale_from_the_original_image():
    s = np.zeros((10, 10), np.float32)
    s[:5, :] = 1.0  # the top half of a 10 x 10 map ...
    # ... is the top half of the 200 x 100 (h x w) original image the box comes from
    assert M.energy_pointing_game(s, [[0, 0, 100, 100]], image_shape=(200, 100)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.box_mask((4, 4), [[3, 0, 1, 2]])


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.random((12, 9))
    b = np.round(a + 0.5 * rng.random((12, 9)), 1)  # many ties
    assert M.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert M.spearman(a, a) == pytest.approx(1.0)
    assert M.spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(M.spearman(a, np.zeros_like(a)))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((40, 52))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0)
    assert M.ssim(a, b) == pytest.approx(want, abs=1e-10)
    assert M.ssim(a, a) == pytest.approx(1.0)


def test_blur_substrate_is_smooth_and_same_shape():
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    b = M.substrate_of(x, "blur")
    assert b.shape == x.shape and b.std() < 0.5 * x.std()
    assert not M.substrate_of(x, "zero").any()
    with pytest.raises(ValueError, match="substrate"):
        M.substrate_of(x, "noise")


# ------------------------------------------------------------- a model with a known perfect map

SIZE = 16
BOX = (4, 2, 10, 8)  # x0, y0, x1, y1


def _box_model() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """logits = [sum(w * x), 0] with w = 1/|box| inside BOX (all channels), 0 elsewhere: a class-0
    detector of bright pixels in the box. Its perfect map is the box."""
    w = np.zeros((1, 3, SIZE, SIZE), np.float32)
    x0, y0, x1, y1 = BOX
    w[..., y0:y1, x0:x1] = 4.0 / ((y1 - y0) * (x1 - x0) * 3)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero")]
    nodes = [helper.make_node("Mul", ["input", "w"], ["wx"]),
             helper.make_node("Flatten", ["wx"], ["flat"], axis=1),
             helper.make_node("ReduceSum", ["flat", "one"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Concat", ["s", "z"], ["logits"], axis=1)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    f = helper.make_tensor_value_info("wx", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    opset = [helper.make_opsetid("", 17)]
    model = helper.make_model(helper.make_graph(nodes, "box", [x], [y], inits), opset_imports=opset)
    feats = helper.make_model(helper.make_graph(nodes[:1], "feat", [x], [f], inits[:1]), opset_imports=opset)
    for m in (model, feats):
        m.ir_version = 8
        onnx.checker.check_model(m)
    return model, feats


@pytest.fixture(scope="module")
def box_setup():
    model, feats = _box_model()
    engine = Engine(model, feats, device="cpu", input_size=(SIZE, SIZE))
    x = np.full((1, 3, SIZE, SIZE), 1.0, np.float32)  # a bright image: p(class 0) = sigmoid(4)
    perfect = M.box_mask((SIZE, SIZE), [BOX]).astype(np.float32)
    rng = np.random.default_rng(0)
    return M.Metrics(engine, batch_size=7), x, perfect, rng.random((SIZE, SIZE)).astype(np.float32)


def test_average_drop_of_a_map_of_ones_is_zero(box_setup):
    meter, x, perfect, _ = box_setup
    d, inc = meter.average_drop(x, np.ones((SIZE, SIZE), np.float32), 0)
    assert d == pytest.approx(0.0, abs=1e-6) and not inc
    d, _ = meter.average_drop(x, perfect, 0)  # the box is all the model looks at: no drop either
    assert d == pytest.approx(0.0, abs=1e-6)
    d, _ = meter.average_drop(x, 1 - perfect, 0)  # everything but the evidence: p falls to 1/2
    y = 1 / (1 + np.exp(-4.0))
    assert d == pytest.approx((y - 0.5) / y, rel=1e-5)


def test_product_graph_equals_classifying_the_product(box_setup):
    meter, x, perfect, rnd = box_setup
    maps = np.stack([perfect, rnd, np.ones_like(rnd)])
    got = meter.masked_probability(x, maps, 0)
    want = [meter.probability(x * m[None, None], 0) for m in maps]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_deletion_of_the_perfect_map_drops_fastest(box_setup):
    meter, x, perfect, rnd = box_setup
    good = meter.curves(x, perfect + 0.01 * rnd, 0, steps=16)
    chance = meter.curves(x, rnd, 0, steps=16)
    worst = meter.curves(x, 1 - perfect + 0.01 * rnd, 0, steps=16)
    assert good.deletion_auc < chance.deletion_auc < worst.deletion_auc
    assert good.insertion_auc > chance.insertion_auc > worst.insertion_auc
    assert good.gap > 0.1 > abs(chance.gap) and worst.gap < -0.1
    # the box holds 36 of 256 pixels: after 3 of 16 steps (48 pixels) all the evidence is gone
    assert good.deletion[3] == pytest.approx(0.5, abs=1e-6)
    assert good.deletion[0] == pytest.approx(meter.probability(x, 0), abs=1e-6)


def test_curve_end_points_are_the_image_and_the_substrate(box_setup):
    meter, x, _, rnd = box_setup
    xb = x * (0.5 + np.linspace(0, 1, SIZE, dtype=np.float32))[None, None, None, :]
    for sub in M.SUBSTRATES:
        c = meter.curves(xb, rnd, 0, steps=10, substrate=sub)
        p_x = meter.probability(xb, 0)
        p_s = meter.probability(M.substrate_of(xb, sub), 0)
        assert c.deletion[0] == pytest.approx(p_x, abs=1e-6) and c.insertion[-1] == pytest.approx(p_x, abs=1e-6)
        assert c.deletion[-1] == pytest.approx(p_s, abs=1e-6) and c.insertion[0] == pytest.approx(p_s, abs=1e-6)
        assert c.fractions[0] == 0 and c.fractions[-1] == 1


# ------------------------------------------------------------------ parity with torchcam (real peer)


class _FixedCam:
    """A torchcam CAM extractor that returns one given map (what ClassificationMetric needs of one)."""

    def __init__(self, model, cam):
        self.model, self.cam = model, cam

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.cam]

    @staticmethod
    def fuse_cams(cams):
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self):
        yield


@pytest.fixture(scope="module")
def lite0_case(lite0_bundle, samples_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchcam")
    from exporter.recipes import build_torch
    from runtime import Explainer, images
    from runtime.methods import run_method

    ex = Explainer(lite0_bundle, device="cpu")
    x = images.preprocess(images.load_image(Path(samples_dir) / "chelsea.png"), ex.pre)
    c = int(np.argmax(ex.engine.classify(x)[0]))
    sal = run_method("faster:n=96", ex, x, c)  # a real Score-CAM map (top-96 channels, to stay fast)
    net = build_torch("efficientnet_lite0").eval()  # the very model the bundle was exported from
    return ex, x, c, sal, net, torch


def test_average_drop_and_increase_match_torchcam(lite0_case):
    from torchcam.metrics import ClassificationMetric

    ex, x, c, sal, net, torch = lite0_case
    meter = M.Metrics.of(ex)
    for s in (sal, M.keep_top(sal, 0.5)):
        metric = ClassificationMetric(_FixedCam(net, torch.from_numpy(s)[None]), partial(torch.softmax, dim=-1))
        metric.update(torch.from_numpy(x), c)
        want = metric.summary()
        d, inc = meter.average_drop(x, s, c)
        assert d == pytest.approx(want["avg_drop"], abs=1e-3)
        assert float(inc) == want["conf_increase"]  # a decision, 0 or 1 (did the probability rise?), not a float


@pytest.mark.parametrize("substrate", ["zero", "blur"])
def test_deletion_insertion_match_torchcam(lite0_case, substrate):
    from torchcam.metrics import DeletionInsertionMetric

    ex, x, c, sal, net, torch = lite0_case
    steps = 10
    baseline = None if substrate == "zero" else (lambda t: torch.from_numpy(M.blur(t.numpy())))
    metric = DeletionInsertionMetric(_FixedCam(net, torch.from_numpy(sal)[None]), partial(torch.softmax, dim=-1),
                                     steps=steps, baseline=baseline)
    metric.update(torch.from_numpy(x), c)
    want = metric.summary()
    got = M.Metrics.of(ex).curves(x, sal, c, steps=steps, substrate=substrate, lerf=False)
    assert got.deletion_auc == pytest.approx(want["deletion_auc"], abs=1e-3)
    assert got.insertion_auc == pytest.approx(want["insertion_auc"], abs=1e-3)
