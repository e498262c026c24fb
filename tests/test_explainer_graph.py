"""The one-graph explainer (``python -m exporter explainer``) against ``Explainer.explain_tensor``.

Parity is max |saliency_graph - saliency_python| <= 1e-4 on the same pixels, with ONNX Runtime's graph
optimisations disabled and enabled; the class and the probabilities must match too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundles import make_bundle, photo, save_bundle

from exporter.explainer_graph import CLASS_INDEX, PIXELS, GraphBuildError, Options, build_explainer
from runtime import Explainer, images
from runtime.contract import FEATURES_FILE, MODEL_FILE, BundleError, read_props
from runtime.head import linear_head
from runtime.scorecam import PRESETS
from runtime.thirdparty import open_model

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "enabled": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(model: onnx.ModelProto, level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_graph(sess: ort.InferenceSession, rgb: np.ndarray, cls: int) -> tuple[np.ndarray, int, np.ndarray]:
    sal, c, probs = sess.run(None, {PIXELS: rgb[None], CLASS_INDEX: np.array([cls], np.int64)})
    return sal[0], int(c[0]), probs[0]


def sized(rgb: np.ndarray, bundle) -> np.ndarray:
    return images.resize_rgb(rgb, bundle.meta.preprocessing.input_size)


def assert_parity(bundle_dir, rgb: np.ndarray, preset: str, max_channels: int | None, levels=("disabled", "enabled"),
                  chunk: int | None = None, explicit: bool = True, select: str = "auto", resolved: str | None = None,
                  **derive) -> list[float]:
    """Graph vs Python for the top-1 class (class_index -1) and, with ``explicit``, the second-ranked class;
    each class explained alone (``relevance`` ranks the channels for the classes explained together)."""
    bundle = open_model(bundle_dir, **derive)
    rgb = sized(rgb, bundle)
    fill = "zero" if max_channels is not None else None  # the graph's only fill, asked explicitly with a cap
    model = build_explainer(bundle, Options(preset, max_channels, chunk, select, fill=fill))
    ex = Explainer(bundle_dir, device="cpu", preset=preset, max_channels=max_channels, select=select, fill=fill,
                   **derive)
    x = ex.pre.apply(rgb)[None]
    top2 = [int(i) for i in np.argsort(-ex.engine.classify(x)[0], kind="stable")[:2]]
    classes = top2 if explicit else top2[:1]
    if max_channels is not None and ex.selection == "relevance":
        want = {c: ex.explain_tensor(x, targets=[c])[0] for c in classes}
    else:  # class-blind: one call explains both
        want = {r.class_index: r for r in ex.explain_tensor(x, targets=classes)}
    assert read_props(model)["scorecam.select"] == ex.selection == (resolved or ex.selection)
    probs_ref = ex._probabilities(ex.engine.classify(x)[0].astype(np.float64))
    errors = []
    for level in levels:
        sess = session(model, level)
        for asked, expect in [(-1, top2[0])] + ([(top2[1], top2[1])] if explicit else []):
            sal, cls, probs = run_graph(sess, rgb, asked)
            assert cls == expect, (preset, level, asked)
            assert sal.shape == ex.input_size and sal.dtype == np.float32
            assert np.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1
            err = float(np.abs(sal - want[expect].saliency).max())
            assert err <= TOL, (preset, max_channels, level, asked, err)
            assert np.abs(probs - probs_ref).max() <= 1e-5
            errors.append(err)
    return errors


# ------------------------------------------------------------------------------------ the toy


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("max_channels, select", [(None, "auto"), (12, "auto"), (12, "relevance"), (12, "std")])
def test_toy_parity(toy_bundle, preset, max_channels, select):
    """The toy's head is global pooling -> linear: ``auto`` is ``relevance``, ranked for the class explained."""
    rgb = np.asarray(images.load_image(ROOT / "samples" / "chelsea.png"))
    assert_parity(toy_bundle, rgb, preset, max_channels, select=select,
                  resolved="std" if select == "std" else "relevance")


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunk_sizes(tmp_path, chunk):
    """Chunks of 1, 3 and 7 (neither divides K = 16 nor the number of maps run) and of all K at once."""
    bundle = make_bundle(tmp_path / "tiny", channels=16)
    for preset in PRESETS:
        assert_parity(bundle, photo(40, 40, seed=1), preset, None, chunk=chunk)
        assert_parity(bundle, photo(40, 40, seed=1), preset, 5, chunk=chunk, levels=("enabled",))


def _constant_bundle(directory: Path) -> Path:
    """The tiny bundle with its target layer's bias so negative that every channel is ReLU(.) = 0."""
    make_bundle(directory)
    model, feat = onnx.load(str(directory / MODEL_FILE)), onnx.load(str(directory / FEATURES_FILE))
    for m in (model, feat):
        for init in m.graph.initializer:
            if init.name == "b2":
                init.CopyFrom(onnx.numpy_helper.from_array(np.full(16, -1e4, np.float32), "b2"))
    meta = open_model(directory).meta
    return save_bundle(directory, model, feat, meta)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_channel_constant(tmp_path, preset):
    """No channel varies: one (or, for official, no) pass of the zero map, an all-zero map, never a NaN."""
    bundle = _constant_bundle(tmp_path / "dead")
    ex = Explainer(bundle, device="cpu", preset=preset)
    x = ex.pre.apply(photo(32, 32))[None]
    assert ex.explain_tensor(x)[0].channels_skipped == 16
    for max_channels in (None, 4):
        assert_parity(bundle, photo(32, 32), preset, max_channels, chunk=3)
        graph = build_explainer(open_model(bundle), Options(preset, max_channels, fill="zero"))
        sal, _, _ = run_graph(session(graph, "enabled"), photo(32, 32), -1)
        assert np.isfinite(sal).all() and float(np.abs(sal).max()) == 0.0  # by construction: nothing varies


def _head_bundle(directory: Path, head: str) -> Path:
    """The tiny bundle (K = 16, C = 5) with another head after its target layer ``features``: ``conv`` (a 1x1
    conv, then pooling: no linear head), ``matmul`` (MatMul [K,C] + Add) or ``gemm`` (Gemm transB 0, alpha
    -0.75, beta 2)."""
    make_bundle(directory, seed=3)
    model, feat = onnx.load(str(directory / MODEL_FILE)), onnx.load(str(directory / FEATURES_FILE))
    g = model.graph
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1.0, (16, 5)).astype(np.float32)  # [K,C]
    keep = [n for n in g.node if n.op_type not in ("GlobalAveragePool", "Flatten", "Gemm")]
    inits = [i for i in g.initializer if i.name != "wf"]
    mk, arr = onnx.helper.make_node, onnx.numpy_helper.from_array
    if head == "conv":
        nodes = [mk("Conv", ["features", "wc", "bf"], ["cv"]), mk("GlobalAveragePool", ["cv"], ["gap"]),
                 mk("Flatten", ["gap"], ["logits"])]
        inits.append(arr(np.ascontiguousarray(w.T).reshape(5, 16, 1, 1), "wc"))
    elif head == "matmul":
        nodes = [mk("GlobalAveragePool", ["features"], ["gap"]), mk("Flatten", ["gap"], ["flat"]),
                 mk("MatMul", ["flat", "wm"], ["mm"]), mk("Add", ["mm", "bf"], ["logits"])]
        inits.append(arr(w, "wm"))
    else:
        nodes = [mk("GlobalAveragePool", ["features"], ["gap"]), mk("Flatten", ["gap"], ["flat"]),
                 mk("Gemm", ["flat", "wg", "bf"], ["logits"], alpha=-0.75, beta=2.0)]
        inits.append(arr(w, "wg"))
    del g.node[:], g.initializer[:]
    g.node.extend(keep + nodes)
    g.initializer.extend(inits)
    onnx.checker.check_model(model)
    meta = open_model(directory).meta
    return save_bundle(directory, model, feat, meta)


@pytest.mark.parametrize("head", ["matmul", "gemm"])
def test_relevance_reads_every_linear_head_form(tmp_path, head):
    """MatMul + Add and Gemm without transB (W stored [K,C]) with a negative alpha: the class's column."""
    bundle = _head_bundle(tmp_path / head, head)
    assert linear_head(onnx.load(str(bundle / MODEL_FILE)), "features") is not None
    for preset in ("paper", "official"):
        assert_parity(bundle, photo(40, 40, seed=4), preset, 5, chunk=3)
    assert_parity(bundle, photo(40, 40, seed=4), "torchcam", 7, levels=("enabled",), select="relevance")


def test_no_linear_head_auto_is_std_and_relevance_is_refused(tmp_path):
    """A conv after the target layer: ``auto`` resolves to ``std`` (recorded as such); ``relevance`` is refused
    in one line, as the Python Explainer refuses it."""
    bundle = _head_bundle(tmp_path / "conv", "conv")
    assert linear_head(onnx.load(str(bundle / MODEL_FILE)), "features") is None
    for preset in PRESETS:
        assert_parity(bundle, photo(40, 40, seed=4), preset, 5, chunk=4, levels=("enabled",), resolved="std")
    assert_parity(bundle, photo(40, 40, seed=4), "paper", 5, levels=("disabled",), select="std")
    assert read_props(build_explainer(open_model(bundle), Options(max_channels=5, fill="zero")))["scorecam.select"] == \
        "std"
    for max_channels in (5, None):
        with pytest.raises(GraphBuildError, match="select 'relevance' needs a global-pooling -> linear head") as e:
            build_explainer(open_model(bundle), Options(max_channels=max_channels, select="relevance", fill="zero"))
        assert "\n" not in str(e.value) and "use select 'std'" in str(e.value)
    with pytest.raises(BundleError, match="select 'relevance' needs"):
        Explainer(bundle, device="cpu", max_channels=5, select="relevance", fill="zero")


def _third_party(path: Path) -> Path:
    """The tiny classifier as someone else's file: no bundle metadata, input ``images``, a trailing Softmax."""
    make_bundle(path.parent / "src")
    m = onnx.load(str(path.parent / "src" / MODEL_FILE))
    del m.metadata_props[:]
    g = m.graph
    for node in g.node:
        node.input[:] = ["images" if n == "input" else n for n in node.input]
    g.input[0].name = "images"
    g.node.append(onnx.helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    g.output[0].name = "prob"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("preset", list(PRESETS))
def test_third_party_model(tmp_path, monkeypatch, preset):
    monkeypatch.setenv("SCORECAM_CACHE", str(tmp_path / "cache"))
    model = _third_party(tmp_path / "net.onnx")
    assert_parity(model, photo(50, 70, seed=2), preset, None, chunk=5, input_size=(32, 32), mean=(0.4, 0.5, 0.6),
                  std=(0.2, 0.25, 0.3), bgr=True)
    assert_parity(model, photo(50, 70, seed=2), preset, 6, levels=("enabled",), input_size=(32, 32))


def test_graph_contract(tmp_path):
    """Inputs, outputs, metadata, IR version and opset of the classifier, the checker's full check, one copy
    of the weights (inside the Loop body, not in the main graph)."""
    bundle_dir = make_bundle(tmp_path / "tiny", channels=16)
    bundle = open_model(bundle_dir)
    model = build_explainer(bundle, Options("torchcam", 5, 4, fill="zero"))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == bundle.model.ir_version
    opsets = [(o.domain, o.version) for o in bundle.model.opset_import]
    assert [(o.domain, o.version) for o in model.opset_import] == opsets
    assert [i.name for i in model.graph.input] == ["pixels", "class_index"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["saliency", "explained_class", "probabilities"]
    assert "NonZero" not in {n.op_type for n in model.graph.node}
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1
    body = loops[0].attribute[0].g
    weights = {i.name for i in bundle.model.graph.initializer}
    assert weights <= {i.name for i in body.initializer}
    assert not weights & {i.name for i in model.graph.initializer}
    props = read_props(model)
    assert props["scorecam.role"] == "explainer" and props["scorecam.preset"] == "torchcam"
    assert props["scorecam.max_channels"] == "5" and props["scorecam.select"] == "relevance"  # auto, linear head
    assert props["scorecam.fill"] == "zero"
    std = build_explainer(bundle, Options("paper", 5, select="std", fill="zero"))
    assert read_props(std)["scorecam.select"] == "std"
    assert props["scorecam.chunk"] == "4" and props["scorecam.channels"] == "16"
    assert json.loads(props["scorecam.labels"])[0] == "apple"
    assert json.loads(props["scorecam.mean"]) == [0.5, 0.5, 0.5] and props["scorecam.color_order"] == "RGB"
    import hashlib

    assert props["scorecam.source_sha256"] == hashlib.sha256((bundle_dir / MODEL_FILE).read_bytes()).hexdigest()


def test_class_out_of_range_is_an_error_not_a_wrong_map(tmp_path):
    bundle = open_model(make_bundle(tmp_path / "tiny"))
    for options in (Options(), Options(max_channels=5, fill="zero")):  # the latter reads the class's row of W
        sess = session(build_explainer(bundle, options), "enabled")
        with pytest.raises(Exception, match="(?i)out of (bounds|range)|invalid"):
            run_graph(sess, photo(32, 32), 5)


def test_build_errors(tmp_path):
    bundle = open_model(make_bundle(tmp_path / "tiny"))
    with pytest.raises(GraphBuildError, match="max channels must be >= 1"):
        build_explainer(bundle, Options(max_channels=0))
    with pytest.raises(GraphBuildError, match="chunk size must be >= 1"):
        build_explainer(bundle, Options(chunk=0))
    with pytest.raises(GraphBuildError, match="unknown channel selection"):
        build_explainer(bundle, Options(select="magic"))


def test_a_channel_cap_needs_fill_zero_asked_explicitly(tmp_path):
    """The graph has no kernel fill (the Explainer's default with a cap): a cap alone, or another fill, is refused
    in one line that says what to do; fill zero without a cap is exact Score-CAM."""
    bundle = open_model(make_bundle(tmp_path / "tiny"))
    with pytest.raises(GraphBuildError, match="max_channels needs fill='zero' here") as e:
        build_explainer(bundle, Options(max_channels=5))
    assert "\n" not in str(e.value) and "drop max_channels for exact" in str(e.value)
    for fill in ("kernel", "preview"):
        with pytest.raises(GraphBuildError, match=f"no '{fill}' fill"):
            build_explainer(bundle, Options(max_channels=5, fill=fill))
    assert read_props(build_explainer(bundle, Options(fill="zero")))["scorecam.max_channels"] == "all"


# ------------------------------------------------------------------------------------ the CLI, without torch

BLOCK_TORCH = textwrap.dedent("""
    import runpy, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "torchvision", "torchcam")):
                raise ImportError(f"torch is blocked here: {name}")
    sys.meta_path.insert(0, Block())
    sys.argv = ["exporter", *sys.argv[1:]]
    try:
        runpy.run_module("exporter", run_name="__main__", alter_sys=True)
    finally:
        print("TORCH:" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] == "torch")), file=sys.stderr)
""")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_runs_without_torch_and_writes_triton(tmp_path):
    bundle = make_bundle(tmp_path / "tiny")
    out = tmp_path / "explainer.onnx"
    proc = cli("explainer", str(bundle), "--out", str(out), "--preset", "gradcam", "--max-channels", "6",
               "--fill", "zero", "--chunk", "4", "--triton", str(tmp_path / "repo"), "--triton-name", "tiny_cam")
    assert proc.returncode == 0, proc.stderr
    assert "TORCH:\n" in proc.stderr + "\n" and "torch is blocked" not in proc.stderr
    assert "wrote" in proc.stdout
    model = onnx.load(str(out))
    assert read_props(model)["scorecam.preset"] == "gradcam"
    assert (tmp_path / "repo" / "tiny_cam" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    config = (tmp_path / "repo" / "tiny_cam" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and 'name: "tiny_cam"' in config
    assert "TYPE_UINT8" in config and "dims: [ 1, 32, 32, 3 ]" in config and 'name: "explained_class"' in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explainer.onnx", "repo", "tiny"]  # no temporary files


@pytest.mark.parametrize("args, message", [
    (["{bundle}"], "--out FILE is required"),
    (["{bundle}", "--out", "{tmp}/no/such/dir/x.onnx"], "does not exist"),
    (["{bundle}", "--out", "{tmp}"], "is a directory"),
    (["{tmp}/missing", "--out", "{tmp}/x.onnx"], "model not found"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--preset", "nope"], "invalid choice"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--max-channels", "0"], "--max-channels must be >= 1"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--chunk", "-2"], "--chunk must be >= 1"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--max-channels", "8"], "--max-channels needs --fill zero here"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--max-channels", "8", "--fill", "kernel"], "has no 'kernel' fill"),
    (["{bundle}", "--out", "{tmp}/x.onnx", "--fill", "magic"], "invalid choice"),
    (["{notonnx}", "--out", "{tmp}/x.onnx"], "not a valid ONNX model"),
    (["{graph}", "--out", "{tmp}/x.onnx"], "is already an explainer graph"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    bundle = make_bundle(tmp_path / "tiny")
    (tmp_path / "bad.onnx").write_text("not a model")
    onnx.save(build_explainer(open_model(bundle), Options()), str(tmp_path / "graph.onnx"))
    subs = {"bundle": str(bundle), "tmp": str(tmp_path), "notonnx": str(tmp_path / "bad.onnx"),
            "graph": str(tmp_path / "graph.onnx")}
    proc = cli("explainer", *[a.format(**subs) for a in args])
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("TORCH:", "loading", "building"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------ EfficientNet-Lite0

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_lite0_parity_every_preset(lite0_bundle, preset):
    """chelsea.png: exact (optimisations on) and 64 channels (off and on; the default selection, ``auto`` =
    ``relevance`` on Lite0's pooling -> linear head), top-1 and an explicit class."""
    rgb = images.load_image(ROOT / "samples" / PHOTOS[0])
    assert_parity(lite0_bundle, rgb, preset, None, levels=("enabled",))
    assert_parity(lite0_bundle, rgb, preset, 64, resolved="relevance")


def test_lite0_parity_exact_without_optimisations(lite0_bundle):
    assert_parity(lite0_bundle, images.load_image(ROOT / "samples" / PHOTOS[0]), "paper", None,
                  levels=("disabled",), explicit=False)


@pytest.mark.parametrize("photo_name", PHOTOS[1:])
def test_lite0_parity_other_photos(lite0_bundle, photo_name):
    rgb = images.load_image(ROOT / "samples" / photo_name)  # 64 channels: relevance ranks per class, so Python
    assert_parity(lite0_bundle, rgb, "paper", 64, levels=("enabled",), resolved="relevance")  # runs twice
    assert_parity(lite0_bundle, rgb, "paper", None, levels=("enabled",), explicit=False)


def test_lite0_file_is_one_classifier(lite0_bundle, tmp_path):
    out = tmp_path / "explainer.onnx"
    proc = cli("explainer", str(lite0_bundle), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    ratio = out.stat().st_size / (lite0_bundle / MODEL_FILE).stat().st_size
    assert ratio <= 1.1, ratio


def test_bench_onegraph_runs(tmp_path):
    """``python -m bench.onegraph`` on a tiny bundle: both timings, the size ratio and parity in its report."""
    from bench.onegraph import main

    bundle = make_bundle(tmp_path / "tiny")
    photo_path = tmp_path / "pic.png"
    from PIL import Image

    Image.fromarray(photo(40, 40)).save(photo_path)
    assert main(["--model", str(bundle), "--photo", str(photo_path), "--repeats", "2", "--max-channels", "4",
                 "--out", str(tmp_path / "res")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert [r["budget"] for r in res["rows"]] == ["exact", "mc4"]
    for r in res["rows"]:
        assert len(r["python_s"]) == len(r["graph_s"]) == 2 and r["ratio"] > 0 and r["size_ratio"] > 1
        assert r["max_abs_diff"] <= TOL and r["class_index"] == r["python_class"]
    assert "| exact |" in (tmp_path / "res.md").read_text()


# ------------------------------------------------------------------------------------ multi-layer


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("fusion, max_channels, chunk", [("product", None, None), ("poly", 5, 3), ("sum", None, 7)])
def test_multilayer_parity(tmp_path, preset, fusion, max_channels, chunk):
    """``--layers 2`` equals ``Explainer(layers=2)``: both layers scored in one Loop (the finer one after the
    target layer's chunks), the finer map and the fusion in the graph, top-1 and an explicit class."""
    bundle = make_bundle(tmp_path / "tiny", seed=2)
    b = open_model(bundle)
    fill = "zero" if max_channels else None  # the graph's only fill with a cap, asked for explicitly
    model = build_explainer(b, Options(preset, max_channels, chunk, layers=2, fusion=fusion, fill=fill))
    props = read_props(model)
    assert json.loads(props["scorecam.layers"]) == ["body.3", "r1"] and props["scorecam.fusion"] == fusion
    ex = Explainer(bundle, device="cpu", preset=preset, max_channels=max_channels, layers=2, fusion=fusion, fill=fill)
    rgb = sized(photo(seed=7), b)
    x = ex.pre.apply(rgb)[None]
    for level in LEVELS:
        sess = session(model, level)
        for asked in (-1, 3):
            sal, cls, _ = run_graph(sess, rgb, asked)
            want = ex.explain_tensor(x, targets=[cls])[0]
            assert asked in (-1, cls) and np.abs(sal - want.saliency).max() <= TOL, (level, asked)


def test_multilayer_three_layers_on_lite0(lite0_bundle):
    """Three layers (an If chain picks each chunk's maps: 7x7x1280, 14x14x112, 28x28x40) with 16 channels per
    layer, the default ``relevance`` on the target layer and ``std`` on the finer ones, as the Python explainer."""
    bundle = open_model(lite0_bundle)
    model = build_explainer(bundle, Options("paper", 16, layers=3, fill="zero"))
    ex = Explainer(lite0_bundle, device="cpu", max_channels=16, layers=3, fill="zero")
    rgb = sized(images.load_image(ROOT / "samples" / "coffee.png"), bundle)
    sal, cls, _ = run_graph(session(model, "enabled"), rgb, -1)
    want = ex.explain_tensor(ex.pre.apply(rgb)[None], targets=[cls])[0]
    assert want.passes <= 48 and np.abs(sal - want.saliency).max() <= TOL


def test_multilayer_cli_and_errors(tmp_path):
    bundle = make_bundle(tmp_path / "tiny")
    out = tmp_path / "fine.onnx"
    proc = cli("explainer", str(bundle), "--out", str(out), "--layers", "2", "--fusion", "poly")
    assert proc.returncode == 0, proc.stderr
    assert "layers body.3, r1" in proc.stdout and read_props(onnx.load(str(out)))["scorecam.fusion"] == "poly"
    for args, message in ((["--layers", "3"], "has 1 stage"), (["--layers", "0"], "between 1 and 6"),
                          (["--layers", "nosuch"], "not a tensor of this model")):
        bad = cli("explainer", str(bundle), "--out", str(tmp_path / "x.onnx"), *args)
        lines = [ln for ln in bad.stderr.splitlines() if not ln.startswith(("TORCH:", "loading", "building"))]
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0], bad.stderr
        assert not (tmp_path / "x.onnx").exists()
