"""Unit tests of ``runtime/scorecam.py`` (pure numpy) and of the ONNX mask graph (``runtime/maskgraph.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtime import scorecam as sc
from runtime.maskgraph import EPS, IMAGE, MAPS, build_scorer
from runtime.scorecam import MaskSpec, make_masks, maps_from_scores, minmax, softmax, upsample

SPECS = {
    "up-norm-hp": MaskSpec(),
    "up-norm-ac": MaskSpec(align_corners=True),
    "norm-up-hp": MaskSpec(norm_first=True),
    "up-norm-hp-eps0": MaskSpec(eps=0.0),
}
SOFTMAX_PRESETS = ("paper", "gradcam", "torchcam")


# ----------------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((16, 16), (64, 64)), ((5, 7), (30, 17)),
                                     ((9, 6), (4, 3)), ((8, 8), (3, 5)), ((1, 4), (5, 1)), ((3, 3), (3, 3))])
def test_upsample_matches_torch_interpolate(src, dst, align_corners):
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(0).normal(size=(4, *src)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None], size=dst, mode="bilinear",
                                          align_corners=align_corners)[0].numpy()
    ours = upsample(m, dst, align_corners)
    assert ours.shape == (4, *dst) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(7, 224), (16, 64), (5, 3), (9, 4), (1, 6), (6, 1), (4, 4)])
def test_interp_matrix_rows_are_convex_combinations(n_in, n_out, align_corners):
    w = sc.interp_matrix(n_in, n_out, align_corners)
    assert w.shape == (n_out, n_in)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert ((w > 0).sum(axis=1) <= 2).all()


def test_interp_matrix_identity_and_corners():
    # exact by construction: at the identity and at the ends the source index is whole, lam = 0, weights 1 and 0
    np.testing.assert_array_equal(sc.interp_matrix(5, 5, False), np.eye(5))
    np.testing.assert_array_equal(sc.interp_matrix(5, 5, True), np.eye(5))
    w = sc.interp_matrix(4, 10, True)  # align_corners: the end samples are the end inputs
    np.testing.assert_array_equal(w[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(w[-1], [0, 0, 0, 1])


# ----------------------------------------------------------------------------------- minmax, softmax


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_minmax_constant_maps_are_zeros(eps):
    for value in (0.0, 1.0, -3.5, 6.0):
        m = minmax(np.full((2, 5, 5), value, np.float32), eps)
        assert np.isfinite(m).all()
        np.testing.assert_array_equal(m, 0)  # exact by construction: minmax writes 0 where the range is 0


def test_minmax_range_and_per_map():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(3, 6, 7)).astype(np.float32) * np.array([1, 10, 100], np.float32)[:, None, None]
    out = minmax(m)
    np.testing.assert_allclose(out.min(axis=(1, 2)), 0, atol=0)
    np.testing.assert_allclose(out.max(axis=(1, 2)), 1, atol=1e-6)
    want = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, want, atol=1e-6)
    # eps enters the denominator exactly as DESIGN.md's norm()
    out_eps = minmax(m, eps=0.5)
    np.testing.assert_allclose(out_eps, (m - m.min(axis=(1, 2), keepdims=True))
                               / (np.ptp(m, axis=(1, 2), keepdims=True) + 0.5), atol=1e-6)


def test_softmax_values_and_stability():
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 1001.0, 1002.0], [-1e4, 0.0, -1e4]])
    p = softmax(z, axis=1)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(p[1], p[0], rtol=1e-12)  # shift invariance
    np.testing.assert_allclose(p[2], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(softmax(z.T, axis=0), p.T, rtol=1e-12)


# --------------------------------------------------------------------------------------- make_masks


def _maps(k=6, h=5, w=7, seed=0):
    return np.random.default_rng(seed).gamma(1.5, 1.0, size=(k, h, w)).astype(np.float32)


@pytest.mark.parametrize("key", list(SPECS))
def test_make_masks_formula(key):
    spec = SPECS[key]
    acts = _maps()
    size = (20, 28)
    masks = make_masks(acts, size, spec)
    if spec.norm_first:
        lo = acts.min(axis=(1, 2), keepdims=True)
        want = upsample((acts - lo) / (np.ptp(acts, axis=(1, 2), keepdims=True) + spec.eps), size)
    else:
        up = upsample(acts, size, spec.align_corners)
        lo = up.min(axis=(1, 2), keepdims=True)
        want = (up - lo) / (np.ptp(up, axis=(1, 2), keepdims=True) + spec.eps)
    np.testing.assert_allclose(masks, want, atol=1e-6)
    assert masks.shape == (6, *size)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6


def test_mask_spec_keys_are_distinct_per_kind():
    keys = {SPECS[k].key for k in ("up-norm-hp", "up-norm-ac", "norm-up-hp")}
    assert len(keys) == 3
    assert {sc.get_preset(p).mask.key for p in ("paper", "gradcam", "torchcam")} == keys
    assert sc.get_preset("official").mask.key == sc.get_preset("paper").mask.key


@pytest.mark.parametrize("key", ["up-norm-hp", "up-norm-ac", "norm-up-hp"])
@pytest.mark.parametrize("src,size", [((7, 7), (224, 224)), ((5, 5), (33, 33))])
def test_constant_channel_gives_all_zero_mask(key, src, size):
    """DESIGN.md: "A channel whose activation is constant yields no mask" (scorecam.py: "an all-zero mask").

    Bilinear weights (1 - lam, lam) do not sum to exactly 1 in float32, so ``up`` of a constant c != 0
    wobbles by an ulp, and ``(up - min) / (ulp + 1e-8)`` turns that rounding noise into a mask with values
    up to ~1. The numpy twin shows it for align_corners=True (and for half-pixel at non-integer ratios).
    """
    acts = np.stack([np.full(src, v, np.float32) for v in (0.0, 0.3, 1.7, 6.0, 3.14159)])
    masks = make_masks(acts, size, SPECS[key])
    assert np.isfinite(masks).all()
    np.testing.assert_array_equal(masks.max(axis=(1, 2)), 0)  # by construction: constant channels are multiplied by 0


# ----------------------------------------------------------------------------- the ONNX mask graph


def _classifier(h: int, w: int, opset: int, head: str) -> onnx.ModelProto:
    """A classifier made of ``Flatten`` (logits = the input itself) or ``GlobalAveragePool + Flatten``."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])
    if head == "flatten":
        nodes = [helper.make_node("Flatten", ["input"], ["logits"], axis=1)]
        c = 3 * h * w
    else:
        nodes = [helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
                 helper.make_node("Flatten", ["gap"], ["logits"], axis=1)]
        c = 3
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])
    model = helper.make_model(helper.make_graph(nodes, "clf", [x], [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _run_scorer(spec: MaskSpec, opset: int, head: str, image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    h, w = image.shape[-2:]
    proto = build_scorer(_classifier(h, w, opset, head), spec, (h, w))
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [IMAGE, MAPS, EPS]
    return sess.run(None, {IMAGE: image, MAPS: maps[:, None], EPS: np.asarray(spec.eps, np.float32)})[0]


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
@pytest.mark.parametrize("key", list(SPECS))
@pytest.mark.parametrize("src,size", [((4, 6), (32, 24)), ((7, 7), (224, 224)), ((9, 8), (5, 6))])
def test_mask_graph_equals_numpy_masks_times_image(opset, key, src, size):
    spec = SPECS[key]
    rng = np.random.default_rng(opset)
    image = rng.normal(size=(1, 3, *size)).astype(np.float32)
    maps = _maps(5, *src, seed=opset)
    out = _run_scorer(spec, opset, "flatten", image, maps)
    want = make_masks(maps, size, spec)[:, None] * image
    assert out.shape == (5, 3 * size[0] * size[1])
    np.testing.assert_allclose(out.reshape(want.shape), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
@pytest.mark.parametrize("key", ["up-norm-hp", "up-norm-ac", "norm-up-hp"])
def test_mask_graph_feeds_the_classifier(opset, key):
    spec = SPECS[key]
    size = (24, 20)
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 3, *size)).astype(np.float32)
    maps = _maps(7, 6, 5, seed=4)
    out = _run_scorer(spec, opset, "gap", image, maps)
    want = (make_masks(maps, size, spec)[:, None] * image).mean(axis=(2, 3))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["up-norm-hp", "up-norm-ac", "norm-up-hp"])
@pytest.mark.parametrize("src,size", [((7, 7), (224, 224)), ((16, 16), (64, 64)), ((5, 5), (33, 33))])
def test_mask_graph_constant_channel_gives_zero_mask(key, src, size):
    """The same DESIGN.md rule inside ONNX Runtime: a constant map scores the all-zero input, no NaN.

    (ORT's Resize of a constant 1.7 map is not exactly constant: without a guard, norm() would turn
    that rounding noise into a mask with values up to ~1, e.g. at 7 -> 224 half-pixel, Lite0's geometry.)
    """
    image = np.ones((1, 3, *size), np.float32)
    maps = np.stack([np.full(src, v, np.float32) for v in (0.0, 0.3, 1.7, 6.0)])
    out = _run_scorer(SPECS[key], 17, "flatten", image, maps)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(np.abs(out).max(axis=1), 0)  # by construction: the guarded mask is 0, x * 0 = 0


def test_mask_graph_batch_is_dynamic_and_keeps_outputs():
    spec = MaskSpec()
    size = (16, 16)
    proto = build_scorer(_classifier(*size, 17, "gap"), spec, size)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    image = np.random.default_rng(0).normal(size=(1, 3, *size)).astype(np.float32)
    for b in (1, 3, 8):
        maps = _maps(b, 4, 4)[:, None]
        out = sess.run(None, {IMAGE: image, MAPS: maps, EPS: np.asarray(1e-8, np.float32)})[0]
        assert out.shape == (b, 3)


def test_build_scorer_refuses_unknown_input_name():
    with pytest.raises(ValueError, match="no input named"):
        build_scorer(_classifier(8, 8, 17, "gap"), MaskSpec(), (8, 8), input_name="nope")


# ------------------------------------------------------------------------------- maps_from_scores


def _object(h=8, w=8):
    obj = np.zeros((h, w), np.float32)
    obj[2:5, 3:7] = 1.0
    return obj


@pytest.mark.parametrize("preset", list(sc.PRESETS))
def test_single_channel_equal_to_the_object_gives_the_object(preset):
    p = sc.get_preset(preset)
    obj = _object()
    acts = obj[None] * 2.5
    logits = np.array([[3.0, -1.0, 0.5]])
    (m,) = maps_from_scores(p, acts, logits, np.zeros(3), [0], (8, 8))
    assert m.class_index == 0
    np.testing.assert_allclose(m.saliency, obj, atol=1e-6)
    np.testing.assert_allclose(m.cam / m.cam.max(), obj, atol=1e-6)
    # at a larger size the saliency is the object, upsampled and min-maxed
    (m,) = maps_from_scores(p, acts, logits, np.zeros(3), [0], (32, 32))
    want = minmax(upsample(obj, (32, 32), align_corners=False))
    atol = 0.08 if preset == "gradcam" else 1e-5  # gradcam resizes with cv2 (its own grid)
    np.testing.assert_allclose(m.saliency, want, atol=atol)
    assert m.saliency.shape == (32, 32) and m.saliency.dtype == np.float32
    assert m.cam.shape == (8, 8)


@pytest.mark.parametrize("preset", SOFTMAX_PRESETS)
def test_softmax_presets_weights_sum_to_one(preset):
    rng = np.random.default_rng(0)
    acts = _maps(12, 4, 4)
    masked = rng.normal(size=(12, 5)) * 3
    base = rng.normal(size=5)
    maps = maps_from_scores(sc.get_preset(preset), acts, masked, base, [0, 3, 4], (16, 16))
    for m in maps:
        assert np.all(m.weights >= 0)
        np.testing.assert_allclose(m.weights.sum(), 1.0, atol=1e-6)
        scores = masked[:, m.class_index]
        if preset == "torchcam":
            scores = scores - base[m.class_index]
        np.testing.assert_allclose(m.weights, softmax(scores), rtol=1e-5)


def test_official_weights_are_class_probabilities_and_skip_constant_channels():
    rng = np.random.default_rng(1)
    acts = _maps(6, 4, 4)
    acts[2] = 0.0
    acts[4] = 1.7
    masked = rng.normal(size=(6, 4))
    (m,) = maps_from_scores(sc.get_preset("official"), acts, masked, rng.normal(size=4), [1], (16, 16))
    probs = softmax(masked, axis=1)[:, 1]
    np.testing.assert_allclose(m.weights[[0, 1, 3, 5]], probs[[0, 1, 3, 5]], rtol=1e-5)
    np.testing.assert_array_equal(m.weights[[2, 4]], 0)  # by construction: skipped channels get weight 0
    # the saliency is ReLU(sum_k s_k up(A_k)), min-maxed
    s = np.tensordot(probs * [1, 1, 0, 1, 0, 1], upsample(acts, (16, 16)), axes=1)
    np.testing.assert_allclose(m.saliency, minmax(np.maximum(s, 0)), atol=1e-5)
    # rows of skipped channels are ignored whatever they hold (even NaN)
    masked[[2, 4]] = np.nan
    (m2,) = maps_from_scores(sc.get_preset("official"), acts, masked, np.zeros(4), [1], (16, 16))
    np.testing.assert_allclose(m2.saliency, m.saliency, atol=1e-6)


@pytest.mark.parametrize("preset", list(sc.PRESETS))
def test_constant_channels_never_give_nan(preset):
    acts = _maps(5, 4, 4)
    acts[1] = 0.0
    acts[3] = 2.0
    masked = np.random.default_rng(2).normal(size=(5, 3))
    for a in (acts, np.zeros_like(acts), np.full_like(acts, 3.0)):
        for m in maps_from_scores(sc.get_preset(preset), a, masked, np.zeros(3), [0, 1, 2], (16, 16)):
            for arr in (m.saliency, m.cam, m.weights):
                assert np.isfinite(arr).all()
            assert 0 <= m.saliency.min() and m.saliency.max() <= 1


def test_all_channels_skipped_gives_zero_map():
    acts = np.full((4, 3, 3), 2.0, np.float32)
    (m,) = maps_from_scores(sc.get_preset("official"), acts, np.zeros((4, 2)), np.zeros(2), [0], (9, 9))
    # by construction: no channel scored, every weight is 0, the sum is 0 and minmax of a constant map is 0
    np.testing.assert_array_equal(m.weights, 0)
    np.testing.assert_array_equal(m.saliency, 0)


@pytest.mark.parametrize("preset", list(sc.PRESETS))
def test_channel_mask_gives_weight_zero(preset):
    rng = np.random.default_rng(3)
    acts = _maps(8, 4, 4)
    masked = rng.normal(size=(8, 3))
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    (m,) = maps_from_scores(sc.get_preset(preset), acts, masked, np.zeros(3), [2], (8, 8), channel_mask=keep)
    np.testing.assert_array_equal(m.weights[~keep], 0)  # by construction: channels not scored weigh 0
    # same result as dropping those channels outright
    (ref,) = maps_from_scores(sc.get_preset(preset), acts[keep], masked[keep], np.zeros(3), [2], (8, 8))
    np.testing.assert_allclose(m.weights[keep], ref.weights, atol=1e-7)
    np.testing.assert_allclose(m.saliency, ref.saliency, atol=1e-6)


@pytest.mark.parametrize("preset", list(sc.PRESETS))
def test_many_classes_equal_one_at_a_time(preset):
    rng = np.random.default_rng(4)
    acts = _maps(10, 5, 5)
    masked = rng.normal(size=(10, 6)) * 2
    base = rng.normal(size=6)
    p = sc.get_preset(preset)
    together = maps_from_scores(p, acts, masked, base, [5, 0, 2], (20, 20))
    # bit for bit by construction, on any CPU and BLAS kernel: each class's weights and sum are computed on
    # their own with the same shapes whatever the number of classes (scorecam.weighted_sum, softmax)
    for m in together:
        (one,) = maps_from_scores(p, acts, masked, base, [m.class_index], (20, 20))
        np.testing.assert_array_equal(m.saliency, one.saliency)
        np.testing.assert_array_equal(m.weights, one.weights)


def test_get_preset_unknown_names_the_choices():
    with pytest.raises(ValueError, match="paper"):
        sc.get_preset("nope")
    assert {"paper", "gradcam", "torchcam", "official"} <= set(sc.PRESETS)
