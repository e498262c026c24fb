"""Multi-layer Score-CAM and the blurred baseline: the stage outputs found in real graphs (torchvision ResNet-18,
EfficientNet-Lite0, VGG- and residual-shaped toys), each layer's map against independent references (torch's
own Score-CAM re-implementation on ResNet-18; a numpy one on the tiny bundle), and every edge: the CLI, the
evaluation's ``scorecam:layers=N`` and two substrates, the batch job."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundles import make_bundle, photo
from onnx import TensorProto, helper, numpy_helper
from servers import ROOT

from runtime import Explainer, images
from runtime.contract import BundleError
from runtime.fusion import fuse
from runtime.graphinfo import GraphInfo, fixed_shapes
from runtime.maskgraph import BASE, EPS, IMAGE, MAPS, build_scorer
from runtime.metrics import blur
from runtime.scorecam import MaskSpec, make_masks, minmax, softmax, upsample
from runtime.stages import as_maps, parse_layers

SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny bundle (features 16 x 16 x 16; its only finer stage ``r1`` 8 x 32 x 32), an explainer, an input."""
    d = make_bundle(tmp_path_factory.mktemp("ml") / "tiny")
    ex = Explainer(d, device="cpu")
    return d, ex, images.preprocess(photo(seed=4), ex.pre)


def _plain(model_path, outputs=()):
    m = onnx.load(str(model_path))
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n not in have)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _numpy_scorecam(sess, x, acts, c, size, base=None, finer=False):
    """Paper Score-CAM of one layer (DESIGN.md): masks norm(up(A_k)), inputs x*H (+ base*(1-H)), softmax of the
    logits over k, cam = ReLU(sum a_k A_k) at h x w; ``finer``: a finer layer's map instead,
    sum_k max(0, s_k - median s) norm_hw(A_k) (runtime.fusion.finer_map)."""
    masks = make_masks(acts, size, MaskSpec())
    inputs = x * masks[:, None] + (0.0 if base is None else base * (1.0 - masks[:, None]))
    logits = np.concatenate([sess.run(["logits"], {"input": inputs[i:i + 8].astype(np.float32)})[0]
                             for i in range(0, len(inputs), 8)])
    s = logits[:, c].astype(np.float64)
    if finer:
        lo = acts.min(axis=(1, 2), keepdims=True)
        normed = (acts - lo) / (acts.max(axis=(1, 2), keepdims=True) - lo)
        return np.tensordot(np.maximum(s - np.median(s), 0), normed, 1)
    return np.maximum(np.tensordot(softmax(s), acts, 1), 0)


# ------------------------------------------------------------------------------------------ stages


def _vgg_like() -> onnx.ModelProto:
    """conv-relu-conv-relu-maxpool at 16 x 16 (8 ch), then conv-relu x2 at 8 x 8 (16 ch), maxpool, conv-relu at
    4 x 4, GAP, Gemm: the finer stage at 8 x 8 is the last ReLU, not the pooled map of the stage before."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(src, dst, cin, cout):
        inits.extend([numpy_helper.from_array(rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32), dst + "_w")])
        nodes.extend([helper.make_node("Conv", [src, dst + "_w"], [dst + "_c"], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [dst + "_c"], [dst])])

    conv("input", "a1", 3, 8)
    conv("a1", "a2", 8, 8)
    nodes.append(helper.make_node("MaxPool", ["a2"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]))
    conv("p1", "b1", 8, 16)
    conv("b1", "b2", 16, 16)
    nodes.append(helper.make_node("MaxPool", ["b2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]))
    conv("p2", "c1", 16, 32)
    inits.append(numpy_helper.from_array(rng.normal(0, 1, (4, 32)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", ["c1"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _residual() -> onnx.ModelProto:
    """x -> conv a (8 ch) -> [conv b1 -> conv b2] + a = r (a residual block) -> conv s2 (stride 2) -> GAP: ``a`` and
    ``r`` are cuts, the block's inner tensors are not."""
    rng = np.random.default_rng(1)
    w = {n: numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
         for n, s in (("wa", (8, 3, 3, 3)), ("wb1", (32, 8, 1, 1)), ("wb2", (8, 32, 1, 1)), ("ws", (16, 8, 3, 3)),
                      ("fc", (2, 16)))}
    nodes = [helper.make_node("Conv", ["input", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "wb1"], ["b1"]), helper.make_node("Relu", ["b1"], ["b1r"]),
             helper.make_node("Conv", ["b1r", "wb2"], ["b2"]), helper.make_node("Add", ["a", "b2"], ["r"]),
             helper.make_node("Conv", ["r", "ws"], ["s2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["s2"], ["deep"]),
             helper.make_node("Shape", ["deep"], ["shp"]),  # a shape computation must not break any cut
             helper.make_node("GlobalAveragePool", ["deep"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], list(w.values()))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_cuts_leave_out_the_inside_of_a_residual_block():
    m = _residual()
    info = GraphInfo(m, "input", fixed_shapes(m, "input", (1, 3, 8, 8)))
    cuts = info.cut_tensors("logits")
    assert [t for t in cuts if len(info.shapes[t]) == 4] == ["a", "r", "s2", "deep", "gap"]
    assert info.stage_layers("logits", "deep", 1) == ["r"]


def test_a_stage_is_its_last_activation_not_the_pooled_map_before_it():
    m = _vgg_like()
    info = GraphInfo(m, "input", fixed_shapes(m, "input", (1, 3, 16, 16)))
    assert info.stage_layers("logits", "c1", 2) == ["b2", "a2"]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """torchvision's ResNet-18 (random weights, 10 classes, 64 x 64 input) exported by the exporter."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from exporter import export

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    out = tmp_path_factory.mktemp("ml") / "resnet18"
    export(model, "layer4", out, input_size=(64, 64), sample_images=[SAMPLES / "chelsea.png"])
    return model, out


def test_resnet_stages_are_layer3_and_layer2_and_the_map_matches_torch(resnet):
    """On a real network the automatic stages are the outputs of ``layer3`` and ``layer2`` (their activations
    equal torch's), and the multi-layer map equals the paper's Score-CAM of each of the three layers computed by
    the torch re-implementation (tests/reference_cam.py), fused by Poly-CAM's rule."""
    import torch
    from reference_cam import activations_of, halfpixel_masked_logits, paper_scorecam

    model, bundle = resnet
    ex = Explainer(bundle, device="cpu", layers=3)
    assert [(s.channels, s.grid) for s in ex.stages] == [(256, (4, 4)), (128, (8, 8))]
    x = images.preprocess(images.load_image(SAMPLES / "chelsea.png"), ex.pre)
    logits, acts, (l3, l2) = ex.engine.classify_and_layers(x, [s.name for s in ex.stages])
    xt = torch.from_numpy(x)
    for module, got in ((model.layer4, acts), (model.layer3, l3), (model.layer2, l2)):
        want = activations_of(model, module, xt)[1][0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    c = int(np.argmax(logits[0]))
    cams = [paper_scorecam(model, model.layer4, xt, c)[0]]
    for module in (model.layer3, model.layer2):  # a finer layer: sum_k max(0, s_k - median s) norm(A_k)
        p = halfpixel_masked_logits(model, module, xt, 16)
        s = p.logits_paper[:, c].double()
        a = p.activations.double()
        lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
        varying = (hi > lo).flatten()  # a constant channel (a dead ReLU) neither weighs nor sets the median
        w = torch.where(varying, torch.clamp(s - s[varying].quantile(0.5), min=0), 0.0)
        cams.append(torch.einsum("k,khw->hw", w, torch.where(hi > lo, (a - lo) / (hi - lo), 0.0)).numpy())
    want_fused, want_sal = fuse(cams, ex.input_size, "poly")
    r = Explainer(bundle, device="cpu", layers=3, fusion="poly").explain_tensor(x, [c])[0]
    assert r.layers == tuple(s.name for s in ex.stages) and r.passes <= 512 + 256 + 128
    np.testing.assert_allclose(r.cam, want_fused, rtol=1e-3, atol=1e-3)  # ORT vs torch float32 in every score
    np.testing.assert_allclose(r.saliency, want_sal, atol=2e-3)


def test_lite0_stages_are_the_112_and_40_channel_block_outputs(lite0_bundle):
    ex = Explainer(lite0_bundle, device="cpu", layers=3, max_channels=4, fill="kernel")
    assert [(s.channels, s.grid) for s in ex.stages] == [(112, (14, 14)), (40, (28, 28))]
    r = ex.explain(SAMPLES / "chelsea.png")[0]
    assert r.cam.shape == (28, 28) and r.passes <= 3 * 4 and np.isfinite(r.saliency).all()


# ------------------------------------------------------------------------------ the explainer, tiny


def test_each_layer_is_paper_scorecam_and_the_maps_are_fused(tiny):
    d, _, x = tiny
    sess = _plain(d / "model.onnx", ["features", "r1"])
    logits, deep, fine = sess.run(["logits", "features", "r1"], {"input": x})
    c = int(np.argmax(logits[0]))
    cams = [_numpy_scorecam(sess, x, deep[0], c, (32, 32)), _numpy_scorecam(sess, x, fine[0], c, (32, 32), finer=True)]
    for how in ("poly", "product", "sum"):
        r = Explainer(d, device="cpu", layers=2, fusion=how).explain_tensor(x)[0]
        want_cam, want_sal = fuse(cams, (32, 32), how)
        np.testing.assert_allclose(r.cam, want_cam, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.saliency, want_sal, atol=1e-5)
        assert r.layers == ("r1",) and r.channels_used == 16 + 8 and r.to_dict()["layers"] == ["body.3", "r1"]


def test_one_layer_is_exactly_the_exact_explainer(tiny):
    d, ex, x = tiny
    a = ex.explain_tensor(x, top_k=2)
    for layers in (None, 1, "1"):
        b = Explainer(d, device="cpu", layers=layers).explain_tensor(x, top_k=2)
        for ra, rb in zip(a, b, strict=True):
            np.testing.assert_array_equal(ra.saliency, rb.saliency)
            assert rb.layers == () and rb.passes == ra.passes


def test_layers_by_name_equal_layers_by_count_and_names_are_checked(tiny):
    d, _, x = tiny
    by_count = Explainer(d, device="cpu", layers=2).explain_tensor(x)[0]
    for names in (["r1"], "r1", ["features", "r1"], "r1,features"):
        by_name = Explainer(d, device="cpu", layers=names).explain_tensor(x)[0]
        np.testing.assert_array_equal(by_name.saliency, by_count.saliency)
    with pytest.raises(BundleError, match="has 1 stage"):
        Explainer(d, device="cpu", layers=3)
    with pytest.raises(BundleError, match="not a tensor of this model"):
        Explainer(d, device="cpu", layers="nosuch")
    with pytest.raises(BundleError, match="not finer than the target layer"):
        Explainer(d, device="cpu", layers=["c2"])
    for bad in (0, 7, True, "", [3]):
        with pytest.raises(ValueError):
            parse_layers(bad)
    with pytest.raises(ValueError, match="has no multi-layer form"):
        Explainer(d, device="cpu", layers=2, mode="preview")
    with pytest.raises(ValueError, match="use fill 'kernel'"):
        Explainer(d, device="cpu", layers=2, max_channels=4, fill="preview")
    with pytest.raises(ValueError, match="unknown fusion"):
        Explainer(d, device="cpu", layers=2, fusion="max")


def test_the_fast_modes_apply_per_layer(tiny):
    d, _, x = tiny
    r = Explainer(d, device="cpu", layers=2, max_channels=4, fill="kernel").explain_tensor(x)[0]
    assert r.passes <= 8 and r.select == "cover" and r.fill == "kernel" and np.isfinite(r.saliency).all()
    z = Explainer(d, device="cpu", layers=2, max_channels=4, fill="zero").explain_tensor(x)[0]
    assert z.passes <= 8 and z.channels_used == 8


def test_progress_counts_the_masks_of_every_layer_once(tiny):
    d, _, x = tiny
    seen = []
    ex = Explainer(d, device="cpu", layers=2, batch_size=5)
    r = ex.explain_tensor(x, progress=lambda a, b: seen.append((a, b)))[0]
    assert seen[-1] == (r.passes, r.passes) and all(b == r.passes for _, b in seen)
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)


# --------------------------------------------------------------------------------------- baseline


def test_blend_graph_is_the_blended_input_and_the_zero_graph_is_unchanged():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    base = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    maps = rng.normal(size=(3, 1, 4, 4)).astype(np.float32)
    ident = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"])], "id",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])]),
        opset_imports=[helper.make_opsetid("", 17)])
    spec = MaskSpec(blend=True)
    sess = ort.InferenceSession(build_scorer(ident, spec, (8, 8), blend=True).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    got = sess.run(None, {IMAGE: x, MAPS: maps, EPS: np.asarray(1e-8, np.float32), BASE: base})[0]
    h = make_masks(maps[:, 0], (8, 8), MaskSpec())[:, None]
    np.testing.assert_allclose(got, x * h + base * (1 - h), rtol=1e-5, atol=1e-6)
    plain = build_scorer(ident, MaskSpec(), (8, 8))
    assert BASE not in {i.name for i in plain.graph.input} and spec.key != MaskSpec().key
    assert not any("inverse" in n.output[0] for n in plain.graph.node)


def test_blurred_baseline_is_paper_scorecam_on_the_blurred_canvas(tiny):
    d, _, x = tiny
    sess = _plain(d / "model.onnx", ["features", "r1"])
    logits, deep, fine = sess.run(["logits", "features", "r1"], {"input": x})
    c = int(np.argmax(logits[0]))
    bx = blur(x)
    ex = Explainer(d, device="cpu", baseline="blur")
    r = ex.explain_tensor(x, [c])[0]
    assert r.baseline == "blur" and r.score == pytest.approx(float(logits[0, c]), abs=1e-5)  # x itself, unblended
    want = _numpy_scorecam(sess, x, deep[0], c, (32, 32), base=bx)
    np.testing.assert_allclose(r.cam, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.saliency, minmax(upsample(want, (32, 32))), atol=1e-4)
    ml = Explainer(d, device="cpu", baseline="blur", layers=2).explain_tensor(x, [c])[0]
    cams = [want, _numpy_scorecam(sess, x, fine[0], c, (32, 32), base=bx, finer=True)]
    np.testing.assert_allclose(ml.cam, fuse(cams, (32, 32))[0], rtol=1e-4, atol=1e-5)
    zero = Explainer(d, device="cpu").explain_tensor(x, [c])[0]
    assert not np.allclose(zero.cam, r.cam)  # the canvas changes the scores


def test_blurred_baseline_scores_dead_channels_on_each_images_blur(tmp_path):
    """A constant channel's mask is all zeros: its masked input is blur(x), which depends on the image (the zero
    baseline's x * 0 does not and is cached)."""
    d = make_bundle(tmp_path / "b", seed=3, channels=24)
    ex = Explainer(d, device="cpu", baseline="blur")
    x1, x2 = (images.preprocess(photo(seed=s), ex.pre) for s in (1, 2))
    dead = np.zeros((2, 16, 16), np.float32)
    r1 = ex.zero_input_scores(x1, (16, 16))
    r2 = ex.zero_input_scores(x2, (16, 16))
    plain = _plain(d / "model.onnx")
    np.testing.assert_allclose(r1, plain.run(["logits"], {"input": blur(x1)})[0][0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(r1, r2) and ex._zero_scores is None
    masked = ex.score_channels(x1, dead, np.zeros(2, bool), np.ones(2, bool), 5)
    np.testing.assert_allclose(masked[0], r1, rtol=1e-6)


# ------------------------------------------------------------------------------------------- edges


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_layers_fusion_and_baseline(tiny, tmp_path):
    d, _, _ = tiny
    out = tmp_path / "o"
    r = _cli("runtime.explain", str(d), str(SAMPLES / "coffee.png"), "--layers", "2", "--fusion", "product",
             "--baseline", "blur", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["layers"] == ["body.3", "r1"] and rec["baseline"] == "blur"
    want = Explainer(d, device="cpu", layers=2, fusion="product", baseline="blur").explain(SAMPLES / "coffee.png")[0]
    np.testing.assert_allclose(np.load(rec["outputs"]["saliency"]), want.saliency, atol=1e-6)
    for args, message in ((["--layers", "0"], "between 1 and 6"), (["--layers", "3"], "has 1 stage"),
                          (["--layers", "nosuch"], "not a tensor of this model"),
                          (["--layers", "2", "--mode", "preview"], "no multi-layer form"),
                          (["--baseline", "grey"], "invalid choice")):
        bad = _cli("runtime.explain", str(d), str(SAMPLES / "coffee.png"), "--out", str(tmp_path / "bad"), *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: "), bad.stderr
        assert message in bad.stderr and not (tmp_path / "bad").exists()


def test_evaluate_takes_scorecam_layers_and_two_substrates(tiny, tmp_path):
    from runtime.evaluate import main

    d, _, _ = tiny
    out = tmp_path / "ev"
    rc = main([str(d), str(SAMPLES / "chelsea.png"), str(SAMPLES / "rocket.jpg"), "--methods", "scorecam",
               "scorecam:layers=2", "faster:n=4:fill=kernel:layers=2:baseline=blur", "hsic:n=16",
               "--substrate", "zero", "blur", "--steps", "5", "--out", str(out), "--no-plots"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "## Substrate: zero" in report and "## Substrate: blur" in report and "| scorecam:layers=2 |" in report
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 * 4 * 2 and {r["substrate"] for r in rows} == {"zero", "blur"}
    same = [(r["image"], r["method"]) for r in rows if r["substrate"] == "zero"]
    assert same == [(r["image"], r["method"]) for r in rows if r["substrate"] == "blur"]
    for a, b in zip([r for r in rows if r["substrate"] == "zero"], [r for r in rows if r["substrate"] == "blur"],
                    strict=True):
        assert a["seconds"] == b["seconds"] and a["avg_drop"] == b["avg_drop"]  # one map, measured twice


def test_batch_job_takes_layers(tiny, tmp_path):
    pytest.importorskip("pyarrow")
    d, _, _ = tiny
    out = tmp_path / "batch"
    r = _cli("runtime.batch", str(d), str(SAMPLES / "coffee.png"), "--out", str(out), "--layers", "2",
             "--baseline", "blur", "--workers", "1")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["layers"] == 2 and run["settings"]["baseline"] == "blur"
    import pyarrow.parquet as pq

    [row] = pq.read_table(out / "results.parquet").to_pylist()
    want = Explainer(d, device="cpu", layers=2, baseline="blur").explain(SAMPLES / "coffee.png")[0]
    np.testing.assert_allclose(np.load(out / row["map"]), want.saliency, atol=1e-6)
    plain = _cli("runtime.batch", str(d), str(SAMPLES / "coffee.png"), "--out", str(tmp_path / "p"), "--workers", "1")
    assert plain.returncode == 0 and "layers" not in json.loads((tmp_path / "p" / "run.json").read_text())["settings"]


def test_the_service_takes_layers_fusion_and_baseline_per_request(tiny):
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx
    from PIL import Image
    from servers import ServeProcess

    from runtime.serve.protocol import decode_saliency

    d, _, _ = tiny
    rgb = photo(40, 56, seed=5)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    body = {"instances": [{"image": {"b64": base64.b64encode(buf.getvalue()).decode()}}]}
    with ServeProcess(str(d), "--layers", "2") as server:
        url = f"{server.url}/v1/models/tiny:explain"
        meta = httpx.get(f"{server.url}/ui/models", timeout=30).json()["models"][0]
        assert meta["layers"] == ["body.3", "r1"]
        for params, kw in (({}, {"layers": 2}), ({"layers": 1}, {}), ({"layers": "r1", "fusion": "sum"},
                           {"layers": 2, "fusion": "sum"}), ({"baseline": "blur"}, {"layers": 2, "baseline": "blur"})):
            r = httpx.post(url, json={**body, "parameters": params}, timeout=60)
            assert r.status_code == 200, r.text
            [got] = r.json()["explanations"][0]["results"]
            want = Explainer(d, device="cpu", **kw).explain(rgb)[0]
            assert got["layers"] == want.to_dict()["layers"] and got["baseline"] == want.baseline
            np.testing.assert_allclose(decode_saliency(got["saliency"]), want.saliency, atol=1e-6, rtol=0)
        for params, message in (({"layers": 3}, "has 1 stage"), ({"layers": 0}, "between 1 and 6"),
                                ({"layers": "nosuch"}, "not a tensor"), ({"fusion": "max"}, "fusion must be one of"),
                                ({"baseline": "grey"}, "baseline must be one of")):
            r = httpx.post(url, json={**body, "parameters": params}, timeout=60)
            assert r.status_code == 422 and message in r.json()["error"], r.text
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        q = httpx.post(f"{url}?layers=1", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=60)
        assert q.status_code == 200 and q.json()["explanations"][0]["results"][0]["layers"] == ["body.3"]
        assert "Traceback" not in server.log


def _nhwc_net() -> onnx.ModelProto:
    """A graph whose finer stage is channels-last (as TF-converted models keep their maps): conv (NCHW) ->
    Transpose to NHWC -> Relu ``fine`` [1,8,8,4] -> Transpose back -> stride-2 conv ``deep`` -> GAP -> Gemm."""
    rng = np.random.default_rng(2)
    w = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n)
         for n, s in (("w1", (4, 3, 3, 3)), ("w2", (6, 4, 3, 3)), ("fc", (3, 6)))]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c1"], ["t1"], perm=[0, 2, 3, 1]),
             helper.make_node("Relu", ["t1"], ["fine"]),
             helper.make_node("Transpose", ["fine"], ["back"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["back", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["deep"]),
             helper.make_node("GlobalAveragePool", ["deep"], ["gap"]), helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], w)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_channels_last_finer_layer_is_read_as_k_h_w(tmp_path):
    path = tmp_path / "nhwc.onnx"
    onnx.save(_nhwc_net(), str(path))
    ex = Explainer(path, device="cpu", layers=2, input_size=(8, 8))
    [st] = ex.stages
    assert (st.name, st.layout, st.channels, st.grid) == ("fine", "NHWC", 4, (8, 8))
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    _, _, (fine,) = ex.engine.classify_and_layers(x, ["fine"])
    c1 = _plain(path, ["c1"]).run(["c1"], {"input": x})[0][0]
    np.testing.assert_allclose(as_maps(fine, st), np.maximum(c1, 0), rtol=1e-6, atol=1e-6)
    r = ex.explain_tensor(x)[0]
    assert r.cam.shape == (8, 8) and np.isfinite(r.saliency).all()


def test_a_third_party_resnet_gets_the_same_multilayer_map_as_its_bundle(resnet, tmp_path):
    """The same ResNet-18 as a plain .onnx file (no bundle metadata): the stages are found in the derived
    classifier and the map equals the bundle's."""
    import torch

    model, bundle = resnet
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    x = images.preprocess(images.load_image(SAMPLES / "coffee.png"), Explainer(bundle, device="cpu").pre)
    a = Explainer(path, device="cpu", layers=3, max_channels=24, select="std", input_size=(64, 64)).explain_tensor(x)[0]
    b = Explainer(bundle, device="cpu", layers=3, max_channels=24, select="std").explain_tensor(x)[0]
    assert a.class_index == b.class_index and len(a.layers) == 2
    np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-4)
