"""Interactive Score-CAM (issue 14): the head reader, class-aware selection, one pass per distinct mask,
the one-pass preview, the calibrated fill, and the peers ReciproCAM and RISE on our engine.

Correctness only; speed and fidelity on real photos are ``python -m bench``'s (no timing asserted here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundles import save_bundle
from onnx import TensorProto, helper, numpy_helper

from runtime import BundleError, Explainer, images
from runtime.contract import BundleMeta, Preprocessing
from runtime.head import linear_head, tail_graph
from runtime.methods import parse_method, rise_masks, run_method, spatial_masks
from runtime.scorecam import constant_channels, get_preset, maps_from_scores, minmax, softmax
from runtime.selection import distinct_masks, feature_scores, relevance, spatial_std, top_channels
from tests.bundles import make_bundle, photo

K, C, HW = 6, 4, 5
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


# ------------------------------------------------------------------------------ graphs for the head
def _head_model(head: list, inits: dict, extra_inputs=()) -> onnx.ModelProto:
    """input A0 [N,K,5,5] -> Relu -> 'feat' -> ``head`` nodes -> 'logits' [N,C]."""
    nodes = [helper.make_node("Relu", ["a0"], ["feat"]), *head]
    g = helper.make_graph(nodes, "h", [helper.make_tensor_value_info("a0", TensorProto.FLOAT, ["N", K, HW, HW]),
                                       *extra_inputs],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _run(m: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a0": a})[0]


RNG = np.random.default_rng(0)
W = RNG.normal(size=(C, K)).astype(np.float32)
B = RNG.normal(size=C).astype(np.float32)
A = RNG.normal(size=(2, K, HW, HW)).astype(np.float32)

HEADS = {
    "gap-flatten-gemm": ([helper.make_node("GlobalAveragePool", ["feat"], ["p"]),
                          helper.make_node("Flatten", ["p"], ["f"]),
                          helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)], {"w": W, "b": B}),
    "reducemean-reshape-dropout-gemm-alpha-beta": (
        [helper.make_node("ReduceMean", ["feat", "axes"], ["p"], keepdims=1),
         helper.make_node("Reshape", ["p", "shape"], ["f"]),
         helper.make_node("Dropout", ["f"], ["d"]),
         helper.make_node("Gemm", ["d", "wt", "b"], ["logits"], alpha=0.5, beta=2.0)],
        {"wt": W.T, "b": B, "axes": np.asarray([2, 3], np.int64), "shape": np.asarray([-1, K], np.int64)}),
    "reducemean-matmul-add": (
        [helper.make_node("ReduceMean", ["feat", "axes"], ["f"], keepdims=0),
         helper.make_node("Identity", ["f"], ["i"]),
         helper.make_node("MatMul", ["i", "wt"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        {"wt": W.T, "b": B, "axes": np.asarray([-2, -1], np.int64)}),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_linear_head_reads_w_and_b_of_every_accepted_form(name):
    nodes, inits = HEADS[name]
    m = _head_model(nodes, {k: (v.astype(np.int64) if v.dtype == np.int64 else v) for k, v in inits.items()})
    for k in ("axes", "shape"):  # int64 initializers
        for i in m.graph.initializer:
            if i.name == k:
                i.CopyFrom(numpy_helper.from_array(np.asarray(inits[k], np.int64), k))
    head = linear_head(m, "feat")
    assert head is not None and head.weight.shape == (C, K) and head.bias.shape == (C,)
    feat = np.maximum(A, 0)
    want = _run(m, A)
    got = feat.reshape(2, K, -1).mean(axis=2) @ head.weight.T + head.bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


REFUSED = {
    "conv head": ([helper.make_node("Conv", ["feat", "cw"], ["c"]),
                   helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                   helper.make_node("Flatten", ["p"], ["logits"])], {"cw": RNG.normal(size=(C, K, 1, 1))}),
    "second conv after the layer": ([helper.make_node("Conv", ["feat", "cw"], ["c"]),
                                     helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                                     helper.make_node("Flatten", ["p"], ["f"]),
                                     helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)],
                                    {"cw": RNG.normal(size=(K, K, 1, 1)), "w": W, "b": B}),
    "max pooling": ([helper.make_node("GlobalMaxPool", ["feat"], ["p"]),
                     helper.make_node("Flatten", ["p"], ["f"]),
                     helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)], {"w": W, "b": B}),
    "softmax at the end": ([helper.make_node("GlobalAveragePool", ["feat"], ["p"]),
                            helper.make_node("Flatten", ["p"], ["f"]),
                            helper.make_node("Gemm", ["f", "w", "b"], ["z"], transB=1),
                            helper.make_node("Softmax", ["z"], ["logits"])], {"w": W, "b": B}),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_linear_head_refuses_other_heads(name):
    nodes, inits = REFUSED[name]
    assert linear_head(_head_model(nodes, inits), "feat") is None


def test_tail_graph_runs_the_classifier_after_the_layer():
    nodes, inits = REFUSED["second conv after the layer"]  # any head: the tail is not limited to linear ones
    m = _head_model(nodes, inits)
    tail = tail_graph(m, "feat")
    feat = np.maximum(A, 0)
    sess = ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"feat": feat})[0], _run(m, A), rtol=1e-5, atol=1e-5)


def test_tail_graph_refuses_a_skip_connection_around_the_layer():
    skip = helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", C])
    nodes = [helper.make_node("GlobalAveragePool", ["feat"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["z"], transB=1),
             helper.make_node("Add", ["z", "side"], ["logits"])]
    m = _head_model(nodes, {"w": W, "b": B}, extra_inputs=[skip])
    assert tail_graph(m, "feat") is None
    assert linear_head(m, "feat") is None


# ----------------------------------------------------------------------------------- pure numpy
def test_relevance_is_abs_w_times_std_normalised_per_class_and_united_by_max():
    acts = RNG.normal(size=(K, 3, 3)).astype(np.float32)
    w = RNG.normal(size=(C, K))
    one = np.abs(w[1]) * spatial_std(acts)
    np.testing.assert_allclose(relevance(acts, w, [1]), one / one.max())
    two = np.abs(w[[1, 3]]) * spatial_std(acts)
    np.testing.assert_allclose(relevance(acts, w, [1, 3]), (two / two.max(axis=1, keepdims=True)).max(axis=0))
    keep = top_channels(relevance(acts, w, [1]), np.ones(K, bool), 2)
    assert set(np.flatnonzero(keep)) == set(np.argsort(-one)[:2])
    allowed = np.ones(K, bool)
    allowed[np.argmax(one)] = False
    assert not top_channels(one, allowed, 2)[np.argmax(one)]


def test_distinct_masks_groups_affine_copies_and_respects_eps():
    base = RNG.random((3, 4, 4)).astype(np.float32)
    # exact copies up to a power-of-two scale (bit-identical after min-max), as saturated ReLU6 maps are
    acts = np.stack([base[0], 2 * base[0], base[1], np.full((4, 4), 3.0, np.float32), base[2],
                     0.5 * base[0], np.zeros((4, 4), np.float32)])
    first, inverse = distinct_masks(acts, get_preset("paper").mask)
    groups = [set(np.flatnonzero(inverse == g)) for g in range(len(first))]
    assert {0, 1, 5} in groups and {3, 6} in groups and {2} in groups and {4} in groups
    assert all(inverse[f] == i for i, f in enumerate(first))
    # with eps = 1e-8, a channel whose range is ~1e-6 has a mask 1 % dimmer: not the same mask
    tiny = np.stack([base[0], np.float32(2.0**-20) * base[0]])
    assert len(distinct_masks(tiny, get_preset("paper").mask)[0]) == 2
    assert len(distinct_masks(tiny, get_preset("official").mask)[0]) == 1  # eps 0


def test_feature_scores_equal_the_masked_features_through_the_real_tail():
    """s[k,c] = f_c(A * norm(A_k)): the closed form against the head graph itself, run by ONNX Runtime."""
    nodes, inits = HEADS["gap-flatten-gemm"]
    m = _head_model(nodes, inits)
    acts = np.maximum(A[0], 0)
    acts[2] = 0.7  # a constant channel: mask 0, score b
    head = linear_head(m, "feat")
    s = feature_scores(acts, head.weight, head.bias)
    masked = acts[None] * (minmax(acts) * ~constant_channels(acts)[:, None, None])[:, None]  # [K,K,h,w]
    tail = ort.InferenceSession(tail_graph(m, "feat").SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s, tail.run(None, {"feat": masked})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feature_scores(acts, head.weight, head.bias, [3, 1]), s[:, [3, 1]])


# ---------------------------------------------------------------------------------- the explainer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tiny") / "b", channels=16)


def _conv_head_bundle(directory: Path) -> Path:
    """A bundle whose classifier ends in Conv 1x1 -> GlobalAveragePool -> Flatten (no linear head)."""
    rng = np.random.default_rng(1)
    inits = {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "w2": rng.normal(0, 0.3, (K, 8, 3, 3)),
             "wc": rng.normal(0, 1.0, (5, K, 1, 1))}
    t = {k: numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()}
    feat_nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", ["c2"], ["features"])]
    head = [helper.make_node("Conv", ["features", "wc"], ["cc"]),
            helper.make_node("GlobalAveragePool", ["cc"], ["gap"]), helper.make_node("Flatten", ["gap"], ["logits"])]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", K, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    opset = [helper.make_opsetid("", 17)]
    feat = helper.make_model(helper.make_graph(feat_nodes, "f", [x], [f], [t["w1"], t["w2"]]), opset_imports=opset)
    model = helper.make_model(helper.make_graph(feat_nodes + head, "m", [x], [y], list(t.values())),
                              opset_imports=opset)
    for m in (feat, model):
        m.ir_version = 8
    pre = Preprocessing((32, 32), "RGB", 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    meta = BundleMeta("classifier", "body.3", pre, versions={"exporter": "tests"})
    return save_bundle(directory, model, feat, meta)


@pytest.fixture(scope="module")
def conv_head(tmp_path_factory) -> Path:
    return _conv_head_bundle(tmp_path_factory.mktemp("convhead") / "b")


def test_auto_selects_by_relevance_where_the_head_allows_it(tiny):
    ex = Explainer(tiny, device="cpu", max_channels=4, fill="zero")  # Faster Score-CAM: auto is relevance
    assert ex.head is not None and ex.selection == "relevance"
    x = images.preprocess(photo(), ex.pre)
    acts = ex.engine.activations(x)
    r = ex.explain(photo(), targets=[2])[0]
    want = set(np.argsort(-relevance(acts, ex.head.weight, [2]), kind="stable")[:4])
    assert set(np.flatnonzero(r.weights)) <= want and r.channels_used == 4
    assert (r.select, r.passes, r.mode) == ("relevance", 4, "scorecam")
    d = r.to_dict()
    assert (d["select"], d["passes"], d["mode"], d["fill"]) == ("relevance", 4, "scorecam", "zero")
    # two classes: the union by the max of each class's normalised ranking
    two = ex.explain(photo(), targets=[0, 3])
    want = set(np.argsort(-relevance(acts, ex.head.weight, [0, 3]), kind="stable")[:4])
    assert all(set(np.flatnonzero(t.weights)) <= want for t in two)
    assert Explainer(tiny, device="cpu", max_channels=4, select="std").explain(photo())[0].select == "std"
    assert Explainer(tiny, device="cpu", max_channels=4).explain(photo())[0].select == "cover"  # the kernel fill's
    assert Explainer(tiny, device="cpu").explain(photo())[0].select == "all"


def test_without_a_linear_head_auto_is_std_and_the_rest_is_refused(conv_head):
    ex = Explainer(conv_head, device="cpu", max_channels=3, fill="zero")
    assert ex.head is None and ex.selection == "std"
    r = ex.explain(photo())[0]
    assert r.select == "std" and r.channels_used == 3 and np.isfinite(r.saliency).all()
    for kwargs in (dict(select="relevance"), dict(mode="preview"), dict(max_channels=3, fill="preview")):
        with pytest.raises(BundleError, match="global-pooling -> linear head"):
            Explainer(conv_head, device="cpu", **kwargs)
    with pytest.raises(ValueError, match="global-pooling -> linear head"):
        run_method("preview", ex, images.preprocess(photo(), ex.pre), 0)
    sal = run_method("reciprocam", ex, images.preprocess(photo(), ex.pre), 0)  # the tail exists: conv head is fine
    assert sal.shape == (32, 32) and np.isfinite(sal).all()


def test_bad_options_are_refused(tiny):
    for kwargs, msg in ((dict(select="best"), "unknown select"), (dict(mode="fast"), "unknown mode"),
                        (dict(fill="mean"), "unknown fill"), (dict(fill="preview", preset="official"), "official")):
        with pytest.raises(ValueError, match=msg):
            Explainer(tiny, device="cpu", **kwargs)


def test_one_pass_per_distinct_mask_shares_scores_exactly(tiny):
    """Duplicated (rescaled) channels are scored once; every row equals its own mask's score."""
    ex = Explainer(tiny, device="cpu")
    x = images.preprocess(photo(), ex.pre)
    acts = ex.engine.activations(x)
    dup = np.concatenate([acts, 2 * acts[:5], 0.25 * acts[:2]]).astype(np.float32)  # exact rescalings
    varying = ~constant_channels(dup)
    constant = ~varying
    masked, passes = ex.score_channels(x, dup, varying, constant, 5, count=True)
    assert passes == len(distinct_masks(dup[varying], ex.preset.mask)[0])  # the zero mask is cached, not counted
    assert passes <= acts.shape[0] + 1  # a 0.25x copy can differ by eps: one mask more than the K originals
    each = ex.engine.score(x, dup, ex.preset.mask, 7)  # every channel on its own
    np.testing.assert_allclose(masked[varying], each[varying], rtol=1e-5, atol=1e-5)


def test_exact_maps_are_unchanged_on_lite0(lite0_bundle):
    """Lite0 on chelsea.png: far fewer passes than channels, the same maps as scoring every channel."""
    ex = Explainer(lite0_bundle, device="cpu")
    rs = ex.explain(SAMPLES / "chelsea.png", top_k=2)
    x = images.preprocess(images.load_image(SAMPLES / "chelsea.png"), ex.pre)
    logits, acts = ex.engine.classify_and_activations(x)
    skipped = constant_channels(acts)
    masked = np.zeros((acts.shape[0], logits.shape[1]), np.float32)
    masked[~skipped] = ex.engine.score(x, acts[~skipped], ex.preset.mask)
    masked[skipped] = ex.engine.score(x, np.zeros((1, *acts.shape[1:]), np.float32), ex.preset.mask)[0]
    ref = maps_from_scores(ex.preset, acts, masked, logits[0].astype(np.float64), [r.class_index for r in rs],
                           ex.input_size, skipped=skipped)
    for r, m in zip(rs, ref, strict=True):
        assert np.abs(r.saliency - m.saliency).max() <= 1e-6
    assert rs[0].passes < int((~skipped).sum()) + 1  # distinct masks really are fewer
    head = ex.head
    assert head is not None and head.weight.shape == (1000, 1280)
    np.testing.assert_allclose(head.weight @ acts.reshape(1280, -1).mean(1) + head.bias, logits[0], atol=1e-4)


@pytest.mark.parametrize("preset", ["paper", "torchcam", "official"])
def test_preview_is_the_closed_form_weighted_by_the_preset(tiny, preset):
    ex = Explainer(tiny, device="cpu", mode="preview", preset=preset)
    x = images.preprocess(photo(), ex.pre)
    logits, acts = ex.engine.classify_and_activations(x)
    r = ex.explain_tensor(x, targets=[1, 4])
    s = feature_scores(acts, ex.head.weight, ex.head.bias)  # [K,C]
    want = maps_from_scores(get_preset(preset), acts, s, logits[0].astype(np.float64), [1, 4], ex.input_size)
    for got, m in zip(r, want, strict=True):
        np.testing.assert_allclose(got.saliency, m.saliency, atol=1e-6)
        assert (got.mode, got.passes) == ("preview", 0)
    if preset == "paper":
        np.testing.assert_allclose(r[0].weights, softmax(s[:, 1]), rtol=1e-5, atol=1e-7)


def test_fill_weighs_the_left_out_channels_by_their_calibrated_preview_score(tiny):
    ex = Explainer(tiny, device="cpu", max_channels=5, fill="preview")
    x = images.preprocess(photo(), ex.pre)
    logits, acts = ex.engine.classify_and_activations(x)
    r = ex.explain_tensor(x, targets=[2])[0]
    assert r.fill == "preview" and r.passes == 5
    assert np.count_nonzero(r.weights) == acts.shape[0]  # every channel weighs
    exact = ex.engine.score(x, acts, ex.preset.mask)[:, 2].astype(np.float64)
    keep = top_channels(relevance(acts, ex.head.weight, [2]), np.ones(acts.shape[0], bool), 5)
    s = feature_scores(acts, ex.head.weight, ex.head.bias, [2])[:, 0]
    a, b = np.polyfit(s[keep], exact[keep], 1)
    a = max(a, 0.0)
    b = np.mean(exact[keep] - a * s[keep])
    want = np.where(keep, exact, a * s + b)
    np.testing.assert_allclose(r.weights, softmax(want), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- the peers
def test_reciprocam_matches_its_definition_on_a_linear_head(tiny):
    ex = Explainer(tiny, device="cpu")
    x = images.preprocess(photo(), ex.pre)
    _, acts = ex.engine.classify_and_activations(x)
    k, h, w = acts.shape
    masks = spatial_masks(h, w, True)
    assert masks.shape == (h * w, h, w) and masks[0, 0, 0] == 0.25
    assert masks[(h // 2) * w + w // 2].sum() == pytest.approx(1)
    logits = (acts[None] * masks[:, None]).reshape(h * w, k, -1).mean(2) @ ex.head.weight.T + ex.head.bias
    cam = softmax(logits, axis=1)[:, 3].reshape(h, w).astype(np.float32)
    from runtime.scorecam import upsample

    want = minmax(upsample(minmax(cam), ex.input_size))
    np.testing.assert_allclose(run_method("reciprocam", ex, x, 3), want, atol=1e-5)
    plain = run_method("reciprocam:gaussian=0", ex, x, 3)
    assert plain.shape == (32, 32) and not np.allclose(plain, want)


def test_rise_is_the_probability_weighted_mean_of_its_masks(tiny):
    ex = Explainer(tiny, device="cpu", batch_size=7)
    x = images.preprocess(photo(), ex.pre)
    got = run_method("rise:n=20:cells=4:seed=3", ex, x, 1)
    masks = rise_masks(3, 0, 20, (32, 32), 4, 0.5)
    assert masks.shape == (20, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    # each mask has its own generator: the batches (7, 7, 6 here) draw the same masks; equal by construction
    np.testing.assert_array_equal(np.concatenate([rise_masks(3, a, b, (32, 32), 4, 0.5)
                                                  for a, b in ((0, 7), (7, 14), (14, 20))]), masks)
    probs = softmax(ex.engine.classifier.run(None, {ex.engine.input_name: (x * masks[:, None]).astype(np.float32)})[0],
                    axis=1)[:, 1]
    want = minmax((np.tensordot(probs, masks, axes=1) / (20 * 0.5)).astype(np.float32))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # another batch size: the same masks, so the same map (to ONNX Runtime's and the sums' float rounding)
    other = run_method("rise:n=20:cells=4:seed=3", Explainer(tiny, device="cpu", batch_size=20), x, 1)
    np.testing.assert_allclose(other, got, atol=1e-5)
    with pytest.raises(ValueError, match="rise"):
        run_method("rise:n=0", ex, x, 1)


def test_the_new_methods_are_registered_with_their_parameters():
    assert parse_method("faster:n=16:select=relevance:fill=preview")[1] == {
        "n": 16, "preset": "paper", "select": "relevance", "fill": "preview", "layers": 1, "fusion": "product",
        "baseline": "zero"}
    assert parse_method("rise")[1] == {"n": 2000, "cells": 8, "p": 0.5, "seed": 0}
    assert parse_method("reciprocam")[1] == {"gaussian": 1} and parse_method("preview")[1] == {"preset": "paper"}


def test_evaluate_reports_the_modes_and_the_peers(tiny, tmp_path, capsys):
    from runtime.evaluate import main

    img = tmp_path / "p.png"
    _png(photo(), img)
    methods = ["scorecam", "faster:n=4", "faster:n=4:fill=preview", "preview", "reciprocam", "rise:n=16"]
    assert main([str(tiny), str(img), "--methods", *methods, "--steps", "5", "--out", str(tmp_path / "ev")]) == 0
    table = (tmp_path / "ev" / "report.md").read_text()
    for m in methods:
        assert f"| {m} |" in table


def _png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def test_cli_select_mode_fill_and_their_errors(tiny, conv_head, tmp_path, capsys):
    from runtime.explain import main

    img = tmp_path / "p.png"
    _png(photo(), img)
    assert main([str(tiny), str(img), "--max-channels", "4", "--select", "std", "--json",
                 "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert (rec["select"], rec["fill"], rec["passes"], rec["mode"]) == ("std", "kernel", 4, "scorecam")
    # --max-channels alone: cover + the kernel fill; --fill zero: Faster Score-CAM (auto: relevance here)
    for extra, want in (([], ("cover", "kernel")), (["--fill", "zero"], ("relevance", "zero"))):
        assert main([str(tiny), str(img), "--max-channels", "4", *extra, "--json", "--out", str(tmp_path / "d"),
                     "--no-progress"]) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
        assert (rec["select"], rec["fill"]) == want and rec["passes"] <= 4
    assert main([str(tiny), str(img), "--mode", "preview", "--json", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert (rec["mode"], rec["passes"]) == ("preview", 0)
    assert main([str(conv_head), str(img), "--mode", "preview", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: mode 'preview' needs a global-pooling -> linear head")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
