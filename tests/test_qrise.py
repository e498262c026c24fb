"""qrise (runtime.qrise): the designs, the ridge estimator (a known linear effect, one solve for many targets);
the guided filter (smoothing on a flat guide, the identity on its own guide, a blob snapped to an object's
edges); the method runs, is bounded and deterministic, points at the toy model's objects, and mode ``qrise`` of the
Explainer, the CLI, the batch job and the service gives the method's map."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.methods import parse_method
from runtime.qrise import (
    check_inputs,
    conditional_map,
    designs,
    edge_refine,
    guide_image,
    guided_filter,
    parse_cells,
    refine,
    ridge_map,
    smooth_masks,
    work_size,
)


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


def test_ridge_map_solves_many_targets_at_once():
    rng = np.random.default_rng(2)
    masks = rng.random((40, 6, 6))
    y = rng.random((40, 3))
    y[:, 1] = 0.5  # a constant column: a zero map, the others unchanged
    both = ridge_map(masks, y, 10.0)
    assert both.shape == (3, 6, 6) and not both[1].any()
    for j in (0, 2):
        np.testing.assert_allclose(both[j], ridge_map(masks, y[:, j], 10.0), rtol=1e-9, atol=1e-12)


def test_designs_split_the_masks_over_the_scales_and_are_balanced():
    assert parse_cells(5) == (5,) and parse_cells("5+6") == (5, 6)
    for bad in ("0", "9", "5+x", "", "5+9"):
        with pytest.raises(ValueError, match="cells"):
            parse_cells(bad)
    grids = designs(7, "5+6")
    assert [g.shape for g in grids] == [(5, 5)] * 4 + [(6, 6)] * 3
    grids = designs(256, "5+6", seed=3)
    for part in (np.stack(grids[:128]), np.stack(grids[128:])):  # Sobol': every cell on in half the masks
        np.testing.assert_array_equal(part.mean(0), 0.5)
        assert set(np.unique(part)) == {0.0, 1.0}
    assert all(np.array_equal(a, b) for a, b in zip(designs(256, "5+6", seed=3), grids, strict=True))


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


def _box2(p: np.ndarray, r: int) -> np.ndarray:
    import cv2

    def box(a):
        return cv2.boxFilter(a, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)

    return box(box(p))


def test_guided_filter_smooths_on_a_flat_guide_and_keeps_its_own_guide():
    rng = np.random.default_rng(5)
    p = rng.random((30, 40))
    flat = np.full((3, 30, 40), 0.7)  # no edges: a = 0, q = mean(mean(p))
    np.testing.assert_allclose(guided_filter(flat, p, 3, 1e-3), _box2(p, 3), atol=1e-6)
    g = rng.random((1, 30, 40))  # src = its own guide: a -> 1, b -> 0 as eps -> 0
    np.testing.assert_allclose(guided_filter(g, g[0], 4, 1e-8), g[0], atol=1e-4)
    assert guided_filter(rng.random((3, 30, 40)), p, 4, 1e-3).dtype == np.float32


def test_guided_filter_snaps_a_blob_to_the_object_s_edges():
    """A bright square on a dark, textured background; the map a wide blob around it (as a coarse saliency
    map is): refined, the top-ranked pixels are the square's and the map's step at its edge sharpens; the
    filter alone follows the background's texture too, the square root of the map keeps it away."""
    import cv2

    rng = np.random.default_rng(6)
    hh = ww = 96
    obj = np.zeros((hh, ww))
    obj[30:54, 40:64] = 1.0
    other = np.zeros((hh, ww))  # another bright square, far from the map's blob
    other[78:92, 4:18] = 1.0
    photo = np.stack([0.2 + 0.6 * (obj + other) + 0.05 * rng.random((hh, ww)) for _ in range(3)])
    yy, xx = np.mgrid[:hh, :ww]
    blob = np.exp(-((yy - 45) ** 2 + (xx - 50) ** 2) / (2 * 18.0 ** 2))  # centre off the square's, wider
    out = edge_refine(blob, photo, edge=24 * 224 / 96)  # r = 24 at this size

    def top_inside(m):  # of the square's area's worth of top-ranked pixels, the share on the square
        return float(obj.ravel()[np.argsort(-m.ravel(), kind="stable")[:int(obj.sum())]].mean())

    ring = cv2.dilate(obj.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & (obj == 0)
    assert top_inside(blob) < 0.85 and top_inside(out) > 0.98
    assert out[obj > 0].mean() - out[ring].mean() > 3 * (blob[obj > 0].mean() - blob[ring].mean())
    assert out.min() == 0 and out.max() == 1 and np.isfinite(out).all()
    from runtime.scorecam import minmax

    alone = minmax(guided_filter(guide_image(photo), blob, 24, 1e-3))  # the filter alone lights the other square
    assert out[other > 0].mean() <= blob[other > 0].mean() and alone[other > 0].mean() > 3 * out[other > 0].mean()


def test_edge_refine_radius_scales_and_zero_is_off():
    rng = np.random.default_rng(7)
    sal = rng.random((50, 100)).astype(np.float32)
    x = rng.normal(size=(1, 3, 50, 100)).astype(np.float32)
    np.testing.assert_array_equal(edge_refine(sal, x, edge=0), sal)
    g = guide_image(x)
    assert g.shape == (3, 50, 100) and g.min() == 0 and g.max() == 1
    from runtime.scorecam import minmax

    want = minmax(np.sqrt(sal) * minmax(guided_filter(g, sal, 10, 1e-3)))  # r = 22.4 * 100 / 224 = 10
    np.testing.assert_allclose(edge_refine(sal, x, edge=22.4), want, atol=1e-6)
    const = edge_refine(sal, np.zeros_like(x))  # a constant photo: no edges, a smoothed map, no NaN
    assert np.isfinite(const).all() and const.max() == 1


def test_check_inputs_keep_then_zero_the_top_pixels():
    """Row j of the insertion half keeps the top j/s pixels of the map (ties in raster order, as the
    metrics rank them) on a zero canvas; the deletion half is the image less those pixels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 6, 8)).astype(np.float32)
    sal = rng.random((6, 8)).astype(np.float32)
    sal[0, :4] = 1.0  # a tie: the first pixels in raster order go first
    b = check_inputs(x, sal, 4)
    assert b.shape == (6, 3, 6, 8)
    order = np.argsort(-sal.ravel(), kind="stable")
    for j in range(3):
        kept = np.zeros(48, bool)
        kept[order[:12 * (j + 1)]] = True
        np.testing.assert_array_equal(b[j], x[0] * kept.reshape(6, 8))
        np.testing.assert_allclose(b[j] + b[3 + j], x[0], atol=1e-6)


def test_transfer_values_keeps_the_order_and_takes_the_values():
    """The metrics' pixel order (ties in raster order) is ``order``'s even where ``values`` is flat (its
    zeros); the values are ``values``' own, sorted onto that order."""
    from runtime.metrics import pixel_ranks
    from runtime.qrise import transfer_values

    rng = np.random.default_rng(3)
    order = np.round(rng.random((12, 10)), 1).astype(np.float32)  # many ties
    values = np.where(rng.random((12, 10)) < 0.4, 0.0, rng.random((12, 10))).astype(np.float32)
    values[0, 0] = 1.0
    out = transfer_values(order, values)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    np.testing.assert_array_equal(pixel_ranks(out), pixel_ranks(order))
    np.testing.assert_allclose(np.sort(out.ravel()), np.sort(values.ravel()), atol=2e-6)


def test_conditional_map_finds_the_cells_that_raise_the_score():
    rng = np.random.default_rng(2)
    masks = (rng.random((400, 6, 6)) < 0.5).astype(np.float32)
    y = 0.2 * masks[:, 1, 4] + 0.1 * masks[:, 3, 3] + rng.normal(0, 0.01, 400)
    c = conditional_map(masks, y)
    assert c.shape == (6, 6) and np.isfinite(c).all()
    assert abs(c[1, 4] - 0.2) < 0.03 and abs(c[3, 3] - 0.1) < 0.03
    rest = np.delete(c.ravel(), [1 * 6 + 4, 3 * 6 + 3])
    assert np.abs(rest).max() < 0.05


def test_self_check_prefers_the_object_to_its_complement(toy_bundle, toy_data):
    """The toy model's evidence is its object: of the box, the box's complement and a constant map, the
    self-check ranks the box first on every image; the method with the option gives a bounded map."""
    from runtime import Explainer, images
    from runtime.methods import run_method
    from runtime.metrics import box_mask
    from runtime.qrise import self_check

    ex = Explainer(toy_bundle, device="cpu")
    ims, _, boxes = toy_data
    for i in range(4):
        x = images.preprocess(ims[i], ex.pre)
        c = int(np.argmax(ex.engine.classify(x)[0]))
        box = box_mask(x.shape[-2:], [boxes[i]], ims[i].shape[:2]).astype(np.float32)
        name, scores = self_check(ex, x, c, {"flat": np.zeros_like(box), "outside": 1 - box, "box": box})
        assert name == "box" and scores["box"] > scores["outside"] + 0.2, scores
    with pytest.raises(ValueError, match="steps >= 2"):
        self_check(ex, x, c, {"box": box}, steps=1)
    sal = run_method("qrise:n=40:check=3", ex, x, c)
    assert sal.shape == x.shape[-2:] and np.isfinite(sal).all() and sal.min() == 0 and sal.max() == 1


def test_bad_parameters_are_refused():
    method, params = parse_method("qrise:n=8:cells=4")
    assert params["n"] == 8 and params["cells"] == 4
    with pytest.raises(ValueError, match="qrise"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, n=1)
    with pytest.raises(ValueError, match="qrise"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, cells=9)
    with pytest.raises(ValueError, match="edge"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, edge=-1)
    with pytest.raises(ValueError, match="check"):
        method.fn(None, np.zeros((1, 3, 8, 8), np.float32), 0, check=1)


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
    edged = run_method("qrise:n=40:cells=4:edge=24", ex, x, 1)  # the option: the map, then edge_refine
    np.testing.assert_allclose(edged, edge_refine(a, x, 24), atol=1e-6)
    assert not np.allclose(edged, a, atol=1e-3)


def test_mode_qrise_is_the_method_for_every_class_from_one_set_of_passes(tmp_path):
    from bundles import make_bundle

    from runtime import Explainer
    from runtime.methods import run_method
    from runtime.qrise import QRISE_MASKS

    bundle = make_bundle(tmp_path / "b", size=32, channels=16)
    x = np.random.default_rng(4).normal(size=(1, 3, 32, 32)).astype(np.float32)
    ex = Explainer(bundle, device="cpu", mode="qrise")
    seen = []
    results = ex.explain_tensor(x, targets=[1, 3], progress=lambda d, t: seen.append((d, t)))
    fast = Explainer(bundle, device="cpu", max_channels=16).explain_tensor(x, targets=[1, 3])
    for r, f in zip(results, fast, strict=True):
        np.testing.assert_allclose(r.saliency, run_method("qrise", ex, x, r.class_index), atol=1e-5)
        assert (r.mode, r.passes, r.fill, r.select) == ("qrise", QRISE_MASKS + f.passes, f.fill, f.select)
        assert np.isfinite(r.saliency).all() and r.saliency.min() == 0 and r.saliency.max() == 1
    assert seen[-1][0] == seen[-1][1] and all(b >= a for (a, _), (b, _) in zip(seen, seen[1:], strict=False))


def test_mode_qrise_check_is_the_method_with_the_check_for_every_class(tmp_path):
    from bundles import make_bundle

    from runtime import Explainer
    from runtime.methods import run_method
    from runtime.qrise import CHECK, QRISE_MASKS

    bundle = make_bundle(tmp_path / "b", size=32, channels=16)
    x = np.random.default_rng(5).normal(size=(1, 3, 32, 32)).astype(np.float32)
    ex = Explainer(bundle, device="cpu", mode="qrise-check")
    results = ex.explain_tensor(x, targets=[0, 2])
    fast = Explainer(bundle, device="cpu", max_channels=16).explain_tensor(x, targets=[0, 2])
    for r, f in zip(results, fast, strict=True):
        np.testing.assert_allclose(r.saliency, run_method(f"qrise:check={CHECK}", ex, x, r.class_index), atol=1e-5)
        assert (r.mode, r.passes) == ("qrise-check", QRISE_MASKS + f.passes + 5 * 2 * (CHECK - 1))
        assert np.isfinite(r.saliency).all() and r.saliency.min() == 0 and r.saliency.max() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": 2}, "no multi-layer form"),
    ({"baseline": "blur"}, "a baseline applies to mode 'scorecam'"),
    ({"precision": "int8"}, "use precision 'fp32'"),
])
@pytest.mark.parametrize("mode", ["qrise", "qrise-check"])
def test_mode_qrise_refuses_what_does_not_apply(tmp_path, kwargs, message, mode):
    from bundles import make_bundle

    from runtime import Explainer

    with pytest.raises(ValueError, match=message):
        Explainer(make_bundle(tmp_path / "b", size=32, channels=16), device="cpu", mode=mode, **kwargs)


def test_qrise_points_at_the_toy_objects_and_beats_the_baselines(toy_bundle, toy_data):
    """The toy model's right answer is the object's box: qrise's energy pointing game and insertion on 16
    held-out toy images (with and without the edge option) must beat the random and centred baselines by a
    wide margin."""
    from runtime import Explainer
    from runtime.evaluate import Sample, evaluate, summarize

    ims, _, boxes = toy_data
    samples = [Sample(f"toy{i:02d}.png", ims[i], boxes[i]) for i in range(16)]
    s = summarize(evaluate(Explainer(toy_bundle, device="cpu"), samples,
                           ["qrise", "qrise:edge=24", "random", "center"], steps=25, progress=None))
    print({m: (round(s[m]["energy"][0], 3), round(s[m]["insertion_auc"][0], 3)) for m in s})
    for m in ("qrise", "qrise:edge=24"):  # the edge option keeps the map where it was (0.906 and 0.937 here)
        assert s[m]["energy"][0] >= 0.8
        for base in ("random", "center"):
            assert s[m]["energy"][0] > 2 * s[base]["energy"][0]
            assert s[m]["insertion_auc"][0] > s[base]["insertion_auc"][0] + 0.1


def test_cli_mode_qrise_writes_the_map_and_refuses_layers(tmp_path, capsys):
    import json

    from bundles import make_bundle, photo
    from PIL import Image

    from runtime import Explainer
    from runtime.explain import main

    bundle = make_bundle(tmp_path / "b", size=32, channels=16)
    img = tmp_path / "p.png"
    Image.fromarray(photo()).save(img)
    assert main([str(bundle), str(img), "--mode", "qrise", "--json", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    want = Explainer(bundle, device="cpu", mode="qrise").explain(str(img))[0]
    assert (rec["mode"], rec["passes"]) == ("qrise", want.passes)
    np.testing.assert_allclose(np.load(rec["outputs"]["saliency"]), want.saliency, atol=1e-5)
    assert main([str(bundle), str(img), "--mode", "qrise", "--layers", "2", "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no multi-layer form" in err[0]
    assert not (tmp_path / "e").exists()
