"""The CUDA provider: the same maps, scores and metrics as on the CPU.

Skipped where onnxruntime has no working CUDA provider (CI, this project's CPU machines); run on a
GPU box with onnxruntime-gpu (``pytest tests/test_cuda.py -s`` prints what it measured). TF32 is
off unless asked for, so fp32 maps match the CPU's to 1e-4 (measured on an H100: 7e-6 on Lite0;
with TF32 on, 1.9e-3).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import Explainer, images
from runtime.engine import CUDA
from runtime.evaluate import Sample, evaluate, summarize

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = ROOT / "samples" / "chelsea.png"
PRESETS = ("paper", "torchcam", "gradcam", "official")
EXACT = 1e-4  # fp32 CPU vs CUDA, maps in [0,1]


def _cuda_works() -> bool:
    if CUDA not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=[CUDA])
    except Exception:  # noqa: BLE001 - any failure means: no usable CUDA provider
        return False
    return s.get_providers()[0] == CUDA


pytestmark = pytest.mark.skipif(not _cuda_works(), reason="no working CUDA provider in this onnxruntime")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def toy_pair(toy_bundle):
    return Explainer(toy_bundle, device="cpu"), Explainer(toy_bundle, device="cuda")


@pytest.fixture(scope="module")
def lite0_pair(lite0_bundle):
    return Explainer(lite0_bundle, device="cpu"), Explainer(lite0_bundle, device="cuda")


def test_auto_picks_cuda(toy_bundle):
    ex = Explainer(toy_bundle)
    assert ex.provider == CUDA and ex.engine.on_cuda
    assert ex.batch_size == 128 * 224 * 224 // (64 * 64) or ex.batch_size == 256


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_maps_match_the_cpu(toy_bundle, toy_data, preset):
    cpu, gpu = Explainer(toy_bundle, device="cpu", preset=preset), Explainer(toy_bundle, device="cuda", preset=preset)
    worst = 0.0
    for rgb in toy_data[0][:4]:
        a, b = cpu.explain(rgb, top_k=3), gpu.explain(rgb, top_k=3)
        for ra, rb in zip(a, b, strict=True):
            assert ra.class_index == rb.class_index and rb.provider == CUDA
            assert np.isfinite(rb.saliency).all()
            worst = max(worst, float(np.abs(ra.saliency - rb.saliency).max()))
            np.testing.assert_allclose(rb.score, ra.score, rtol=1e-3, atol=1e-3)
    print(f"toy {preset}: max |cpu - cuda| = {worst:.2e}")
    assert worst <= EXACT


def test_tf32_is_opt_in(toy_bundle, toy_data):
    exact, fast = Explainer(toy_bundle, device="cuda"), Explainer(toy_bundle, device="cuda", tf32=True)
    for ex, want in ((exact, "0"), (fast, "1")):
        assert ex.engine.scorer(ex.engine.mask).get_provider_options()[CUDA]["use_tf32"] == want
        assert ex.engine.classifier.get_provider_options()[CUDA]["use_tf32"] == want
    a, b = exact.explain(toy_data[0][0])[0], fast.explain(toy_data[0][0])[0]
    print(f"toy tf32 vs exact: max diff {np.abs(a.saliency - b.saliency).max():.2e}")
    assert _pearson(a.saliency, b.saliency) >= 0.999


def test_lite0_top5_matches_the_cpu(lite0_pair):
    cpu, gpu = lite0_pair
    a, b = cpu.explain(CHELSEA, top_k=5), gpu.explain(CHELSEA, top_k=5)
    assert [r.class_index for r in a] == [r.class_index for r in b]
    assert b[0].class_index == 285 and b[0].provider == CUDA
    diffs = [float(np.abs(ra.saliency - rb.saliency).max()) for ra, rb in zip(a, b, strict=True)]
    print("lite0 top-5 max |cpu - cuda| per class:", [f"{d:.2e}" for d in diffs],
          f"seconds cpu {a[0].seconds:.2f} cuda {b[0].seconds:.2f}")
    assert max(diffs) <= EXACT
    assert min(_pearson(ra.saliency, rb.saliency) for ra, rb in zip(a, b, strict=True)) >= 0.9999


def test_padded_last_chunk_changes_nothing(lite0_bundle):
    """K = 1280 is no multiple of 100, so the last chunk is padded with all-zero maps."""
    x = images.preprocess(images.load_image(CHELSEA), Explainer(lite0_bundle, device="cpu").pre)
    ref = Explainer(lite0_bundle, device="cuda", batch_size=128).explain_tensor(x, [285])[0]
    odd = Explainer(lite0_bundle, device="cuda", batch_size=100).explain_tensor(x, [285])[0]
    one = Explainer(lite0_bundle, device="cuda", batch_size=1).explain_tensor(x, [285])[0]
    print(f"batch 100 vs 128: {np.abs(ref.saliency - odd.saliency).max():.2e}, "
          f"batch 1 vs 128: {np.abs(ref.saliency - one.saliency).max():.2e}")
    np.testing.assert_allclose(odd.saliency, ref.saliency, atol=EXACT)
    np.testing.assert_allclose(one.saliency, ref.saliency, atol=EXACT)


def test_fp16_is_faithful(lite0_pair, lite0_bundle):
    _, gpu = lite0_pair
    half = Explainer(lite0_bundle, device="cuda", precision="fp16")
    a, b = gpu.explain(CHELSEA, [285])[0], half.explain(CHELSEA, [285])[0]
    r = _pearson(a.saliency, b.saliency)
    print(f"fp16 vs fp32 on chelsea: pearson r {r:.5f}, max diff {np.abs(a.saliency - b.saliency).max():.2e}")
    assert np.isfinite(b.saliency).all() and r >= 0.99
    assert abs(b.probability - a.probability) < 1e-2  # the decision itself stays fp32


def test_max_channels_matches_the_cpu(lite0_bundle):
    a = Explainer(lite0_bundle, device="cpu", max_channels=64, fill="zero").explain(CHELSEA, [285])[0]
    b = Explainer(lite0_bundle, device="cuda", max_channels=64, fill="zero").explain(CHELSEA, [285])[0]
    assert a.channels_used == b.channels_used == 64
    np.testing.assert_allclose(b.saliency, a.saliency, atol=EXACT)


def test_metrics_match_the_cpu(toy_pair, toy_data):
    """Average Drop, deletion / insertion and the energy game run through CUDA sessions too."""
    ims, _, boxes = toy_data
    samples = [Sample(f"toy{i}.png", ims[i], boxes[i]) for i in range(4)]
    rows = [summarize(evaluate(ex, samples, ["scorecam", "center"], steps=20, progress=None))
            for ex in toy_pair]
    for method in ("scorecam", "center"):
        for key in ("avg_drop", "deletion_auc", "insertion_auc", "gap", "energy"):
            c, g = rows[0][method][key][0], rows[1][method][key][0]
            assert abs(c - g) <= 1e-2 * max(1.0, abs(c)), (method, key, c, g)


def test_third_party_onnx_on_cuda(lite0_bundle, tmp_path):
    """A plain classifier file (its feature graph derived on the fly) on the CUDA provider."""
    import onnx

    proto = onnx.load(str(Path(lite0_bundle) / "model.onnx"))
    del proto.metadata_props[:]  # no scorecam.* metadata: the third-party path
    plain = tmp_path / "lite0.onnx"
    onnx.save(proto, str(plain))
    want_ex = Explainer(lite0_bundle, device="cuda")
    pre = want_ex.pre
    ex = Explainer(plain, device="cuda", input_size=pre.input_size, mean=pre.mean, std=pre.std,
                   scale=pre.scale)  # the layer chosen automatically: the last spatial map
    assert ex.provider == CUDA
    r = ex.explain(CHELSEA, [285])[0]
    want = want_ex.explain(CHELSEA, [285])[0]
    np.testing.assert_allclose(r.saliency, want.saliency, atol=EXACT)


def test_cli_on_cuda(toy_bundle, toy_data, tmp_path):
    from PIL import Image

    img = tmp_path / "toy.png"
    Image.fromarray(toy_data[0][0]).save(img)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "runtime.explain", str(toy_bundle), str(img), "--device", "cuda",
                        "--out", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "CUDAExecutionProvider" in p.stdout
    assert any(out.glob("*.png"))


def test_a_model_with_external_data_on_cuda(tmp_path):
    """A classifier whose weights sit beside it (model.onnx + model.onnx.data) on the CUDA provider: the fp32
    map equals the CPU's (ONNX Runtime reads the weights from the model's folder on either device), and fp16,
    whose converter needs the weights in the graph, reads them in and stays close."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (32, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (64, 32, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.2, (10, 64)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "m").mkdir()
    onnx.save_model(model, str(tmp_path / "m" / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    cpu = Explainer(tmp_path / "m" / "model.onnx", device="cpu")
    gpu = Explainer(tmp_path / "m" / "model.onnx", device="cuda")
    assert gpu.engine.provider == CUDA and gpu.bundle.data_dir is not None
    want, got = cpu.explain(CHELSEA, top_k=2), gpu.explain(CHELSEA, top_k=2)
    for w, g in zip(want, got, strict=True):
        assert w.class_index == g.class_index
        np.testing.assert_allclose(g.saliency, w.saliency, atol=EXACT, rtol=0)
    half = Explainer(tmp_path / "m" / "model.onnx", device="cuda", precision="fp16")
    h = half.explain(CHELSEA, targets=[want[0].class_index])[0]
    assert np.isfinite(h.saliency).all() and _pearson(h.saliency, want[0].saliency) > 0.99
