"""The fast modes: max_channels (cover + kernel fill by default, Faster Score-CAM with fill="zero"), the int8
classifier (exporter.quantize), fp16 on CPU.

Correctness only: speed belongs to ``python -m bench``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.quantize import QuantizeError, calibration_files, main, quantize_bundle
from runtime import BundleError, EngineError, Explainer, images
from runtime.contract import FEATURES_FILE, INT8_FILE, BundleMeta, graph_sha256, read_props
from tests.bundles import make_bundle, photo

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
K = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("toy") / "b", channels=K)


@pytest.fixture(scope="module")
def toy_int8(tmp_path_factory) -> Path:
    b = make_bundle(tmp_path_factory.mktemp("toy8") / "b", channels=K)
    quantize_bundle(b, SAMPLES)
    return b


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------------- max_channels
@pytest.mark.parametrize("n", [K, K + 5, 1000])
def test_max_channels_of_k_or_more_is_exact(toy, n):
    img = photo()
    exact = Explainer(toy, device="cpu").explain(img, top_k=3)
    fast = Explainer(toy, device="cpu", max_channels=n).explain(img, top_k=3)
    for e, f in zip(exact, fast, strict=True):
        assert e.class_index == f.class_index
        # no channel left out: the same passes, scores and numpy as the exact run, so equal by construction
        assert (f.select, f.fill) == ("all", "zero")
        np.testing.assert_array_equal(e.saliency, f.saliency)
        np.testing.assert_array_equal(e.cam, f.cam)
        assert f.channels_used == e.channels_used


@pytest.mark.parametrize("n", [1, 4, 8])
def test_max_channels_scores_n_channels(toy, n):
    r = Explainer(toy, device="cpu", max_channels=n, fill="zero").explain(photo())[0]  # Faster Score-CAM
    assert r.channels_used == n and (r.select, r.fill) == ("relevance", "zero")
    assert np.count_nonzero(r.weights) <= n
    assert r.saliency.shape == (32, 32)
    assert np.isfinite(r.saliency).all() and 0.0 <= r.saliency.min() and r.saliency.max() <= 1.0


def test_max_channels_keeps_the_largest_spread(toy):
    ex = Explainer(toy, device="cpu", max_channels=4, select="std", fill="zero")
    from runtime import images

    acts = ex.engine.activations(images.preprocess(photo(), ex.pre))
    std = acts.reshape(K, -1).std(axis=1)
    r = ex.explain(photo())[0]
    assert set(np.flatnonzero(r.weights)) <= set(np.argsort(-std)[:4])


def test_max_channels_must_be_positive(toy):
    with pytest.raises(ValueError, match="max channels"):
        Explainer(toy, device="cpu", max_channels=0)


# ----------------------------------------------------------------------------------------- int8
def test_int8_file_carries_the_bundle_metadata(toy_int8):
    q = onnx.load(str(toy_int8 / INT8_FILE))
    meta = BundleMeta.from_props(read_props(q))
    assert meta.role == "classifier"
    assert meta.sibling_sha256 == graph_sha256(onnx.load(str(toy_int8 / FEATURES_FILE)))
    assert meta.versions["calibration_images"] == "5"
    assert "int8" in meta.versions["quantization"] and "QDQ" in meta.versions["quantization"]
    assert meta.labels == BundleMeta.from_props(read_props(onnx.load(str(toy_int8 / "model.onnx")))).labels
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not list(toy_int8.glob(".*")), "no temp files left in the bundle"


def test_int8_loads_and_correlates_with_exact(toy_int8):
    exact = Explainer(toy_int8, device="cpu")
    q = Explainer(toy_int8, device="cpu", precision="int8")
    for seed in range(3):
        img = photo(seed=seed)
        e = exact.explain(img)[0]
        f = q.explain(img, targets=e.class_index)[0]
        assert f.class_index == e.class_index
        # the decision and the score come from the same fp32 classifier session run on the same input: equal
        # by construction
        assert f.score == e.score
        assert pearson(e.saliency, f.saliency) >= 0.9


def test_int8_with_max_channels(toy_int8):
    r = Explainer(toy_int8, device="cpu", precision="int8", max_channels=5, fill="zero").explain(photo())[0]
    assert r.channels_used == 5 and np.isfinite(r.saliency).all()
    r = Explainer(toy_int8, device="cpu", precision="int8", max_channels=5).explain(photo())[0]  # kernel fill
    assert r.passes <= 5 and (r.select, r.fill) == ("cover", "kernel") and np.isfinite(r.saliency).all()


def test_int8_missing_is_a_clean_error(toy):
    with pytest.raises(BundleError, match="--int8"):
        Explainer(toy, device="cpu", precision="int8")


def test_int8_of_another_bundle_is_refused(toy_int8, tmp_path):
    other = make_bundle(tmp_path / "other", seed=1, channels=K)
    shutil.copy(toy_int8 / INT8_FILE, other / INT8_FILE)
    with pytest.raises(BundleError, match="does not belong"):
        Explainer(other, device="cpu", precision="int8")


def test_quantize_cli(tmp_path, capsys):
    b = make_bundle(tmp_path / "b", channels=8)
    assert main([str(b), str(SAMPLES / "chelsea.png"), str(SAMPLES / "coffee.png"), "--masked-per-image", "2"]) == 0
    assert (b / INT8_FILE).is_file()
    meta = BundleMeta.from_props(read_props(onnx.load(str(b / INT8_FILE))))
    assert meta.versions["calibration_images"] == "2"
    assert meta.versions["calibration_inputs"] == "24"  # 2 photos x (itself, mirrored, cropped, zoomed out) x (1 + 2)
    assert meta.versions["calibration_augment"] == "flip,crop,zoom"
    q = onnx.load(str(b / INT8_FILE))
    fp32_nodes = meta.versions["quantization_fp32_nodes"].split(",")
    assert len(fp32_nodes) == 2  # the last two weighted nodes (second Conv, Gemm) stay fp32: no DQ feeds their weights
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for node in q.graph.node:
        if node.name in fp32_nodes:
            assert node.op_type in ("Conv", "Gemm") and node.input[1] not in dq_out
    assert any(n.op_type == "Conv" and n.input[1] in dq_out for n in q.graph.node)  # the first is int8
    Explainer(b, device="cpu", precision="int8").explain(photo())
    assert main([str(b), str(SAMPLES / "chelsea.png"), "--masked-per-image", "2", "--no-augment",
                 "--keep-fp32", "0", "--keep-first", "0"]) == 0
    meta = BundleMeta.from_props(read_props(onnx.load(str(b / INT8_FILE))))
    assert meta.versions["calibration_inputs"] == "3" and meta.versions["quantization_fp32_nodes"] == ""


def test_quantize_without_images_fails_cleanly(tmp_path, capsys):
    b = make_bundle(tmp_path / "b", channels=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizeError, match="no calibration images"):
        calibration_files(empty)
    assert main([str(b), str(empty)]) == 2
    assert "no calibration images" in capsys.readouterr().err
    assert not (b / INT8_FILE).exists()
    assert main([str(tmp_path / "nope"), str(SAMPLES)]) == 2


# ----------------------------------------------------------------------------------------- fp16
def test_fp16_on_cpu_is_a_clean_error(toy):
    with pytest.raises(EngineError, match="CUDA"):
        Explainer(toy, device="cpu", precision="fp16")


def test_unknown_precision_is_refused(toy):
    with pytest.raises(EngineError, match="precision"):
        Explainer(toy, device="cpu", precision="int4")


# ------------------------------------------------------------------------- overflow, TF32 option
def test_reduced_precision_overflow_is_scored_again_in_fp32(toy_int8, monkeypatch, capsys):
    """fp16 can overflow (inf logits) on a masked input; those rows are re-scored in fp32, never NaN."""
    from runtime.engine import Engine

    x = images.preprocess(photo(), Explainer(toy_int8, device="cpu").pre)
    clean = Explainer(toy_int8, device="cpu", precision="int8")
    want = clean.explain_tensor(x, [1])[0]
    exact = Explainer(toy_int8, device="cpu").explain_tensor(x, [1])[0]
    real = Engine._run_chunks
    calls = []

    def overflowing(self, sess, x, maps4, eps, bs, progress, *args, **kw):
        out = real(self, sess, x, maps4, eps, bs, progress, *args, **kw)
        calls.append(maps4.shape[0])
        if len(calls) == 1:  # the int8 pass: two rows overflow
            out[[0, 3]] = np.inf
            out[5, 0] = np.nan
        return out

    monkeypatch.setattr(Engine, "_run_chunks", overflowing)
    ex = Explainer(toy_int8, device="cpu", precision="int8")
    got = ex.explain_tensor(x, [1])[0]
    assert calls[1] == 3  # only the three bad rows went through the fp32 scorer
    assert "int8 overflowed on 3 of" in capsys.readouterr().err
    assert np.isfinite(got.saliency).all() and np.isfinite(got.weights).all()
    # the re-scored channels now carry their fp32 weights; the others their int8 ones
    assert pearson(got.saliency, want.saliency) > 0.9 and pearson(got.saliency, exact.saliency) > 0.9


def test_cuda_sessions_ask_for_tf32_only_when_told(toy):
    from runtime.engine import CPU, CUDA

    ex = Explainer(toy, device="cpu")
    ex.engine.providers = [CUDA, CPU]  # what the engine would ask onnxruntime-gpu for
    assert ex.engine._provider_args() == [(CUDA, {"use_tf32": "0"}), CPU]
    ex.engine.tf32 = True
    assert ex.engine._provider_args() == [(CUDA, {"use_tf32": "1"}), CPU]
    assert Explainer(toy, device="cpu", tf32=True).engine._provider_args() == [CPU]


def test_calibration_augmentations():
    from exporter.quantize import augmentations

    rgb = photo(40, 60)
    orig, flip, crop, zoom = augmentations(rgb)
    assert orig is rgb and np.array_equal(flip, rgb[:, ::-1])
    assert crop.shape == (28, 42, 3) and np.array_equal(crop, rgb[6:34, 9:51])
    assert zoom.shape == rgb.shape and zoom.dtype == np.uint8
    assert np.array_equal(zoom[0, 0], rgb.reshape(-1, 3).mean(axis=0).astype(np.uint8))  # padded with the mean
    with pytest.raises(QuantizeError, match="unknown augmentation"):
        list(augmentations(rgb, ("rotate",)))


def test_an_int8_session_is_shared_only_by_the_same_int8_file(toy_int8, tmp_path):
    """Two bundles with the same fp32 graphs but different int8 files get their own int8 sessions (the shared
    session cache names the int8 file, not just the fp32 graphs), and an int8 file changed on disk is loaded
    afresh by the next explainer."""
    from onnx import numpy_helper

    other = tmp_path / "other"
    shutil.copytree(toy_int8, other)
    q = onnx.load(str(other / INT8_FILE))
    w = next(t for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1)
    arr = numpy_helper.to_array(w).copy() + 0.5  # another "calibration": a float bias moved
    w.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), w.name))
    onnx.save(q, str(other / INT8_FILE))
    a = Explainer(toy_int8, device="cpu", precision="int8")
    b = Explainer(other, device="cpu", precision="int8")
    spec = a.preset.mask
    assert a.engine.scorer(spec, "int8") is not b.engine.scorer(spec, "int8")
    assert a.engine.scorer(spec, "fp32") is b.engine.scorer(spec, "fp32")  # the fp32 graphs are still shared
    x = images.preprocess(photo(), a.pre)
    acts = a.engine.activations(x)
    assert not np.allclose(a.engine.score(x, acts, spec), b.engine.score(x, acts, spec))
