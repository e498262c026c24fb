"""The ``cover`` selection and the ``kernel`` fill (issue 14's fast mode for photos the rules were not tuned
on), and the cached all-zero masked input.

Correctness only; fidelity on photos and speed are ``python -m bench``'s (no timing asserted here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import Explainer, images
from runtime.scorecam import constant_channels, minmax
from runtime.selection import COVER_POWER, cover, kernel_fill, normalized_maps, relevance
from tests.bundles import photo
from tests.test_interactive import _conv_head_bundle

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def smooth_maps(k: int, seed: int = 0, hw: int = 7) -> np.ndarray:
    """``k`` random smooth activation maps [k,hw,hw]: Gaussian bumps at random places and widths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:hw, 0:hw].astype(np.float64)
    cy, cx = rng.uniform(0, hw - 1, (2, k, 1, 1))
    width = rng.uniform(0.8, 3.0, (k, 1, 1))
    return (rng.uniform(0.5, 4.0, (k, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / width ** 2)).astype(
        np.float32)


def test_cover_picks_n_distinct_allowed_channels_deterministically():
    acts = smooth_maps(60)
    acts = np.concatenate([acts, 3 * acts[:10], np.zeros((5, 7, 7), np.float32)])  # copies and dead channels
    allowed = ~constant_channels(acts)
    w = np.linspace(0.1, 1, acts.shape[0])
    w[7] = 10.0
    got = cover(acts, w, allowed, 12)
    assert got.sum() == 12 and not (got & ~allowed).any()
    assert got[7]  # the start: the heaviest channel
    maps = normalized_maps(acts)[got]
    assert len({m.tobytes() for m in maps.astype(np.float32)}) == 12  # no mask twice
    np.testing.assert_array_equal(got, cover(acts, w, allowed, 12))  # the same call again: deterministic
    few = np.zeros(acts.shape[0], bool)
    few[[1, 2, 3]] = True
    np.testing.assert_array_equal(cover(acts, w, few, 12), few)  # n >= allowed: all of them
    # only 3 distinct maps among the allowed: at most 3 chosen
    same = np.concatenate([np.repeat(acts[:3], 10, axis=0)])
    assert cover(same, np.ones(30), np.ones(30, bool), 8).sum() == 3


def test_cover_spreads_over_the_maps_unlike_a_ranking():
    """Two tight groups of maps, the heavy group large: a ranking takes only the heavy group, the cover both."""
    base = smooth_maps(2, seed=3)
    rng = np.random.default_rng(1)
    heavy = base[0] + 0.01 * rng.random((40, 7, 7))
    light = base[1] + 0.01 * rng.random((10, 7, 7))
    acts = np.concatenate([heavy, light]).astype(np.float32)
    w = np.r_[np.full(40, 1.0), np.full(10, 0.2)]
    got = cover(acts, w, np.ones(50, bool), 4)
    assert got[:40].any() and got[40:].any()


def test_kernel_fill_keeps_scored_rows_and_predicts_a_smooth_score():
    """Scores that are a smooth function of the normalised map are predicted far better than by their mean."""
    acts = smooth_maps(300, seed=5)
    n = normalized_maps(acts)
    v = np.random.default_rng(2).normal(size=n.shape[1])
    y = np.c_[n @ v, np.tanh(n @ v / 5)]  # [K,2]: two columns (two classes) at once
    allowed = np.ones(300, bool)
    allowed[-3:] = False
    scored = cover(acts, np.ones(300), allowed, 40)
    values = np.where(scored[:, None], y, 0.0)
    values[~allowed] = 7.0
    got = kernel_fill(acts, scored, values, allowed)
    # exact by construction: scored rows and rows outside allowed are copied, never recomputed
    np.testing.assert_array_equal(got[scored], y[scored])
    np.testing.assert_array_equal(got[~allowed], 7.0)
    todo = allowed & ~scored
    for col in range(2):
        err = np.sqrt(np.mean((got[todo, col] - y[todo, col]) ** 2))
        base = np.sqrt(np.mean((y[scored, col].mean() - y[todo, col]) ** 2))
        assert err < 0.35 * base, (col, err, base)
    # a channel whose map equals a scored one's gets (nearly) that score
    twin = np.concatenate([acts, 2 * acts[np.flatnonzero(scored)[:1]]])
    s2 = np.r_[scored, False]
    y2 = np.r_[y[:, 0], 0.0][:, None] * np.r_[scored, False][:, None]
    got2 = kernel_fill(twin, s2, y2, np.ones(301, bool))
    assert abs(got2[-1, 0] - y[np.flatnonzero(scored)[0], 0]) < 0.2 * np.ptp(y[:, 0])
    # nothing scored or nothing left: unchanged (a copy: exact)
    np.testing.assert_array_equal(kernel_fill(acts, np.zeros(300, bool), values, allowed), values)
    np.testing.assert_array_equal(kernel_fill(acts, np.ones(300, bool), y, allowed), y)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.bundles import make_bundle

    return make_bundle(tmp_path_factory.mktemp("kfill") / "tiny", channels=12)


@pytest.mark.parametrize("preset", ["paper", "torchcam", "official"])
def test_kernel_fill_through_the_explainer(tiny, preset):
    ex = Explainer(tiny, device="cpu", max_channels=5, fill="kernel", preset=preset)
    assert ex.selection == "cover"
    x = images.preprocess(photo(), ex.pre)
    logits, acts = ex.engine.classify_and_activations(x)
    skipped = constant_channels(acts)
    r = ex.explain_tensor(x, targets=[2])[0]
    assert (r.select, r.fill, r.mode) == ("cover", "kernel", "scorecam") and r.passes <= 5
    assert np.isfinite(r.saliency).all() and np.isfinite(r.weights).all()
    assert r.to_dict()["fill"] == "kernel"
    # the filled scores are exactly what the explainer's pieces give
    allowed = ~skipped
    scored = ex.channels_to_score(acts, skipped, [2])
    assert scored.sum() <= 5 and not (scored & skipped).any()
    rank = relevance(acts, ex.head.weight, [2])
    # the Explainer's own computation, repeated: the same channels by construction
    np.testing.assert_array_equal(scored, cover(acts, rank ** COVER_POWER, allowed, 5))
    exact = ex.engine.score(x, acts, ex.preset.mask).astype(np.float64)
    cols = slice(None) if preset == "official" else [2]
    want = exact.copy()
    want[:, cols] = kernel_fill(acts, scored, np.where(scored[:, None], exact, 0.0)[:, cols], allowed)
    from runtime.scorecam import maps_from_scores

    ref = maps_from_scores(ex.preset, acts, want, logits[0].astype(np.float64), [2], ex.input_size, skipped=skipped)
    np.testing.assert_allclose(r.saliency, ref[0].saliency, atol=1e-5)
    # every channel allowed: exact
    full = Explainer(tiny, device="cpu", max_channels=100, fill="kernel", preset=preset).explain_tensor(x, [2])[0]
    exact_r = Explainer(tiny, device="cpu", preset=preset).explain_tensor(x, [2])[0]
    np.testing.assert_allclose(full.saliency, exact_r.saliency, atol=1e-6)


def test_kernel_fill_needs_no_linear_head(tmp_path):
    ex = Explainer(_conv_head_bundle(tmp_path / "conv"), device="cpu", max_channels=3, fill="kernel")
    assert ex.head is None and ex.selection == "cover"
    r = ex.explain(photo())[0]
    assert r.select == "cover" and r.passes <= 3 and np.isfinite(r.saliency).all()


def test_the_zero_mask_is_scored_once_and_equals_a_zero_input(tiny):
    ex = Explainer(tiny, device="cpu")
    x = images.preprocess(photo(), ex.pre)
    acts = ex.engine.activations(x)
    dead = np.concatenate([acts, np.zeros((2, *acts.shape[1:]), np.float32)])
    constant = constant_channels(dead)
    masked = ex.score_channels(x, dead, ~constant, constant, 5)
    want = ex.engine.score(np.zeros_like(x), np.zeros((1, *acts.shape[1:]), np.float32), ex.preset.mask)[0]
    np.testing.assert_allclose(masked[-2:], np.stack([want, want]), atol=1e-6)
    first = ex._zero_scores
    ex.score_channels(images.preprocess(photo(seed=3), ex.pre), dead, ~constant, constant, 5)
    assert ex._zero_scores is first  # kept, not scored again


def test_kernel_fill_on_lite0_keeps_the_map_of_a_sample(lite0_bundle):
    """Lite0 on coffee.png, 16 channels of 1280: the map stays close to the exact one (r >= 0.95)."""
    img = SAMPLES / "coffee.png"
    exact = Explainer(lite0_bundle, device="cpu").explain(img)[0]
    fast = Explainer(lite0_bundle, device="cpu", max_channels=16, fill="kernel").explain(img)[0]
    assert fast.class_index == exact.class_index and fast.passes <= 16
    r = np.corrcoef(fast.saliency.ravel(), exact.saliency.ravel())[0, 1]
    assert r >= 0.95, r
    assert minmax(fast.saliency).max() == 1.0  # exact: minmax's peak is (max - min) / (max - min)


@pytest.mark.parametrize("rule", ["mc5+kern", "mc5+fill", "mc5", "preview"])
def test_the_fill_study_replays_exactly_what_a_real_run_computes(tiny, rule):
    """bench.fill_study answers masked inputs from cached exact scores: the map must be the real run's."""
    from bench.contenders import fast_options
    from bench.fill_study import ReplayEngine, exact_scores

    exact = Explainer(tiny, device="cpu")
    cached = exact_scores(exact, photo(seed=1))
    real = Explainer(tiny, device="cpu", **fast_options(rule)).explain_tensor(cached["x"], cached["class_index"])[0]
    ex = Explainer(tiny, device="cpu", **fast_options(rule))
    ex.engine = ReplayEngine(ex.engine, cached["acts"], cached["column"], cached["zero"], cached["class_index"],
                             ex.num_classes)
    got = ex.explain_tensor(cached["x"], cached["class_index"])[0]
    np.testing.assert_allclose(got.saliency, real.saliency, atol=1e-5)
    assert got.passes == real.passes
    assert ex.engine.scored == real.passes + (ex._zero_scores is not None)  # + the zero input, once per explainer


# ------------------------------------------------------------------------------ the default with a channel cap
def test_a_channel_cap_alone_means_cover_and_the_kernel_fill(tiny):
    """``max_channels=N`` alone: select cover + fill kernel; ``fill="zero"`` keeps Faster Score-CAM (auto: relevance
    where the head allows it); an explicit select is kept; without a cap nothing is filled. Results say so."""
    img = photo()
    default = Explainer(tiny, device="cpu", max_channels=5)
    assert (default.fill, default.selection, default.fill_asked) == ("kernel", "cover", None)
    kernel = Explainer(tiny, device="cpu", max_channels=5, fill="kernel", select="cover")
    for a, b in zip(default.explain(img, top_k=2), kernel.explain(img, top_k=2), strict=True):
        assert (a.select, a.fill) == ("cover", "kernel") and a.passes <= 5
        np.testing.assert_array_equal(a.saliency, b.saliency)  # the same settings, resolved: equal by construction
    zero = Explainer(tiny, device="cpu", max_channels=5, fill="zero").explain(img)[0]
    assert (zero.select, zero.fill, zero.channels_used) == ("relevance", "zero", 5)
    std = Explainer(tiny, device="cpu", max_channels=5, select="std").explain(img)[0]
    assert (std.select, std.fill) == ("std", "kernel")
    exact = Explainer(tiny, device="cpu")
    assert exact.fill == "zero" and exact.explain(img)[0].to_dict()["select"] == "all"


def test_a_variant_with_a_cap_gets_the_kernel_fill_unless_one_was_asked(tiny):
    """methods' and the service's per-request variants resolve the fill from their own cap."""
    from runtime.methods import _variant
    from runtime.serve.models import ServedModel

    exact = Explainer(tiny, device="cpu")
    assert _variant(exact, max_channels=4).fill == "kernel" and _variant(exact).fill == "zero"
    assert _variant(exact, max_channels=4, fill="zero").fill == "zero"
    served = ServedModel("tiny", exact, 0.0)
    assert served.variant(None, 4).fill == "kernel" and served.variant(None, 4).selection == "cover"
    assert served.variant(None, 4, fill="zero").fill == "zero" and served.variant(None, None) is exact
    capped = ServedModel("tiny", Explainer(tiny, device="cpu", max_channels=4, fill="zero"), 0.0)
    assert capped.variant(None, 6).fill == "zero"  # the server asked for zero: kept for other caps
    assert capped.variant(None, None, fill="kernel").fill == "kernel"
    assert capped.variant(None, None, exact=True).max_channels is None
    assert capped.variant(None, None) is capped.explainer


@pytest.mark.parametrize("kwargs", [{}, {"mode": "preview"}, {"max_channels": 5, "select": "std"},
                                    {"max_channels": 5, "select": "std", "fill": "zero"},
                                    {"max_channels": 5, "select": "std", "fill": "preview"},
                                    {"max_channels": 5, "select": "std", "preset": "torchcam"}])
def test_several_classes_at_once_are_bit_for_bit_one_at_a_time(tiny, kwargs):
    """The promise of one scoring pass for every class: where the channels scored do not depend on the classes
    (exact, the preview, a class-blind selection), a class's map is the same, bit for bit, alone or with
    others. By construction: the same ONNX Runtime runs, then per-class numpy of the same shapes (no [n,K]
    product whose BLAS kernel changes with n). relevance and cover choose for the union of the classes asked,
    so there the channels, and the maps, differ on purpose."""
    ex = Explainer(tiny, device="cpu", batch_size=4, **kwargs)
    together = ex.explain(photo(seed=2), top_k=4)
    for r in together:
        (one,) = ex.explain(photo(seed=2), targets=r.class_index)
        for field in ("saliency", "cam", "weights"):
            np.testing.assert_array_equal(getattr(r, field), getattr(one, field), err_msg=field)


def test_the_fills_and_the_preview_score_each_class_alone():
    """kernel_fill's columns and feature_scores' classes do not change with the others beside them (bit for bit:
    the same shapes per column whatever their number)."""
    from runtime.selection import feature_scores

    acts = smooth_maps(120, seed=7)
    rng = np.random.default_rng(3)
    values = rng.normal(size=(120, 5))
    scored = cover(acts, np.ones(120), np.ones(120, bool), 16)
    every = kernel_fill(acts, scored, values, np.ones(120, bool))
    for j in range(5):
        alone = kernel_fill(acts, scored, values[:, j:j + 1], np.ones(120, bool))
        np.testing.assert_array_equal(alone[:, 0], every[:, j])
    weight, bias = rng.normal(size=(6, 120)), rng.normal(size=6)
    three = feature_scores(acts, weight, bias, [4, 0, 2])
    for i, c in enumerate((4, 0, 2)):
        np.testing.assert_array_equal(feature_scores(acts, weight, bias, [c])[:, 0], three[:, i])
    np.testing.assert_allclose(feature_scores(acts, weight, bias)[:, [4, 0, 2]], three, rtol=1e-12, atol=1e-12)
