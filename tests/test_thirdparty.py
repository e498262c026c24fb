"""Third-party ONNX classifiers (no bundle metadata): the feature graph derived from the classifier.

Every model here is made WITHOUT our exporter (torch.onnx.export with no metadata, or onnx.helper),
in the shapes real models come in: a trailing Softmax, a batch fixed to 1, dynamic H/W, opset 11,
odd input/output names, several outputs, NHWC. For each, the map from the derived bundle must equal
the map from a bundle of the same network made the bundle way (one export with both outputs, split
with ``onnx.utils.extract_model``), and the automatic layer must be the one a person would pick.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import BundleError, Explainer
from runtime.bundle import load_bundle
from runtime.contract import FEATURES_FILE, MODEL_FILE, BundleMeta, Preprocessing, graph_sha256, write_metadata
from runtime.thirdparty import derive_bundle, format_layers, list_layers

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = 32
K = 12  # channels of the target layer (!= its 16x16 spatial size, so NCHW and NHWC differ)
LABELS = ("ant", "bee", "cat", "dog", "eel")
PREP = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "scale": 1 / 255}
TORCH_LAYER = "/net/body/body.3/Relu_output_0"  # the ReLU after the last conv, as torch names it


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORECAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([yy, xx, np.exp(-((yy - 0.4) ** 2 + (xx - 0.6) ** 2) * 12)], -1)
    return (rgb * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ the networks


class Net(nn.Module):
    """Conv(3->8) ReLU Conv(8->K, stride 2) ReLU, mean over space, Linear(K->5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, K, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(K, len(LABELS))

    def forward(self, x):
        a = self.body(x)
        return self.fc(a.mean((2, 3))), a


class Both(nn.Module):
    """The bundle way: one export, outputs (logits, features)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


class Logits(Both):
    def forward(self, x):
        return self.net(x)[0]


class Softmaxed(Both):
    def forward(self, x):
        return torch.softmax(self.net(x)[0], dim=1)


class FixedBatch(Both):
    """Flattens with a batch spelled out: exported without dynamic axes this is Reshape(x, [1, K])."""

    def forward(self, x):
        a = self.net.body(x)
        return self.net.fc(a.mean((2, 3), keepdim=True).reshape(1, -1))


class ThreeOutputs(Both):
    def forward(self, x):
        logits, a = self.net(x)
        return a, logits, torch.softmax(logits, dim=1)


class Nhwc(Both):
    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))[0]


def _export(module, path: Path, shape=(1, 3, SIZE, SIZE), opset: int = 17, input_names=("input",),
            output_names=("logits",), dynamic=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return path


def _batch_axes(names) -> dict:
    return {n: {0: "N"} for n in names}


def bundle_way(both: Path, directory: Path) -> Path:
    """A bundle split from a (logits, features) export and stamped, as tests/bundles.py and the exporter do."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx.utils.extract_model(str(both), str(directory / MODEL_FILE), ["input"], ["logits"])
    onnx.utils.extract_model(str(both), str(directory / FEATURES_FILE), ["input"], ["features"])
    m, f = onnx.load(str(directory / MODEL_FILE)), onnx.load(str(directory / FEATURES_FILE))
    meta = BundleMeta("classifier", "body.3", Preprocessing((SIZE, SIZE), "RGB", **PREP), labels=LABELS)
    write_metadata(m, meta.with_role("classifier", graph_sha256(f)))
    write_metadata(f, meta.with_role("features", graph_sha256(m)))
    onnx.save(m, str(directory / MODEL_FILE))
    onnx.save(f, str(directory / FEATURES_FILE))
    return directory


@pytest.fixture(scope="module")
def net() -> Net:
    return Net().eval()


@pytest.fixture(scope="module")
def reference(net, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    both = _export(Both(net), d / "both.onnx", output_names=("logits", "features"),
                   dynamic=_batch_axes(["input", "logits", "features"]))
    return bundle_way(both, d / "bundle")


def _maps(model, img, preset="paper", **kw):
    ex = Explainer(model, device="cpu", batch_size=kw.pop("batch_size", 5), preset=preset, **kw)
    return ex, ex.explain(img, top_k=2)


def assert_same_maps(ref_model, model, img, preset="paper", **kw):
    _, want = _maps(ref_model, img, preset)
    ex, got = _maps(model, img, preset, **kw)
    for w, g in zip(want, got, strict=True):
        assert g.class_index == w.class_index
        assert np.abs(g.saliency - w.saliency).max() <= 1e-3
        assert abs(g.probability - w.probability) <= 1e-5
    return ex, got


# -------------------------------------------------------------------------- onnx.helper networks


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
            "w2": rng.normal(0, 0.3, (K, 8, 3, 3)), "b2": rng.normal(0, 0.1, K),
            "wf": rng.normal(0, 1.0, (K, len(LABELS))), "bf": rng.normal(0, 0.1, len(LABELS))}


def helper_net(kind: str, path: Path, opset: int = 13) -> Path:
    """``both`` (reference: logits + features), ``nhwc_head`` (tf2onnx-like: NHWC input, maps moved to NHWC
    before a ReduceMean over axes 1,2), ``stuck_batch`` (batch 1 spelled out by a computed shape)."""
    w = {k: numpy_helper.from_array(v.astype(np.float32), k) for k, v in _weights().items()}
    conv = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c2"], ["act"])]
    head = [helper.make_node("ReduceMean", ["act"], ["gap"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["gap", "wf"], ["mm"]), helper.make_node("Add", ["mm", "bf"], ["logits"])]
    extra: list = []
    batch = "N"
    if kind == "both":
        nodes = [helper.make_node("Identity", ["input"], ["x"]), *conv, *head,
                 helper.make_node("Identity", ["act"], ["features"])]
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
        outs = ["logits", "features"]
    elif kind == "nhwc_head":
        nodes = [helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2]), *conv,
                 helper.make_node("Transpose", ["act"], ["act_nhwc"], perm=[0, 2, 3, 1]),
                 helper.make_node("ReduceMean", ["act_nhwc"], ["gap"], axes=[1, 2], keepdims=0),
                 *head[1:]]
        inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])
        outs = ["logits"]
    elif kind == "stuck_batch":
        batch = 1
        nodes = [helper.make_node("Identity", ["input"], ["x"]), *conv,
                 helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
                 helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))),
                 helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1], np.int64))),
                 helper.make_node("Concat", ["one", "rest"], ["flat_shape"], axis=0),
                 helper.make_node("Reshape", ["pool", "flat_shape"], ["gap"]), *head[1:]]
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])
        outs = ["logits"]
    else:
        raise ValueError(kind)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, len(LABELS)])]
    if "features" in outs:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, K, SIZE // 2, SIZE // 2]))
    model = helper.make_model(helper.make_graph(nodes + extra, kind, [inp], outputs, list(w.values())),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def helper_reference(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("href")
    return bundle_way(helper_net("both", d / "both.onnx"), d / "bundle")


# ----------------------------------------------------------------------------------------- cases


def test_trailing_softmax_is_cut_off(net, reference, image, tmp_path):
    path = _export(Softmaxed(net), tmp_path / "softmax.onnx", output_names=("probs",),
                   dynamic=_batch_axes(["input", "probs"]))
    for preset in ("paper", "official"):
        ex, got = assert_same_maps(reference, path, image, preset, labels=list(LABELS), **PREP)
    assert ex.meta.layer == TORCH_LAYER
    assert ex.meta.output_kind == "logits"
    assert [o.name for o in ex.bundle.model.graph.output] == ["logits"]
    assert not any(n.op_type == "Softmax" for n in ex.bundle.model.graph.node)
    # the probability reported is the model's own output
    x = (image.astype(np.float32) / 255 - 0.5) / 0.5
    probs = ort.InferenceSession(str(path)).run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
    assert got[0].probability == pytest.approx(float(probs[got[0].class_index]), abs=1e-5)
    assert got[0].label == LABELS[got[0].class_index]


def test_fixed_batch_reshape_becomes_dynamic(net, reference, image, tmp_path):
    path = _export(FixedBatch(net), tmp_path / "fixed.onnx")  # no dynamic axes: batch 1 everywhere
    src = onnx.load(str(path))
    assert src.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert any(n.op_type == "Reshape" for n in src.graph.node)
    ex, _ = assert_same_maps(reference, path, image, **PREP)
    assert ex.bundle.max_batch is None and ex.batch_size == 5
    assert ex.bundle.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert ex.meta.layer == "/body/body.3/Relu_output_0"  # FixedBatch calls net.body directly: no /net scope


def test_fixed_batch_that_stays_fixed_scores_one_at_a_time(helper_reference, image, tmp_path, capsys):
    path = helper_net("stuck_batch", tmp_path / "stuck.onnx")
    ex, _ = assert_same_maps(helper_reference, path, image, **PREP)
    assert ex.bundle.max_batch == 1 and ex.batch_size == 1
    assert "fixed to 1" in capsys.readouterr().err
    assert ex.meta.layer == "act"


def test_dynamic_height_width(net, reference, image, tmp_path, capsys):
    path = _export(Logits(net), tmp_path / "dyn.onnx", output_names=("logits",),
                   dynamic={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    ex, _ = assert_same_maps(reference, path, image, input_size=(SIZE, SIZE), **PREP)
    assert ex.input_size == (SIZE, SIZE) and ex.meta.layer == TORCH_LAYER
    capsys.readouterr()
    bundle = derive_bundle(path)  # no size anywhere: 224, said on stderr
    assert bundle.meta.preprocessing.input_size == (224, 224)
    assert "224x224" in capsys.readouterr().err
    cands = list_layers(path)
    auto = [c for c in cands if c.auto]
    assert [c.name for c in auto] == [TORCH_LAYER] and auto[0].shape == (1, K, 112, 112)


def test_opset_11(net, reference, image, tmp_path):
    path = _export(Softmaxed(net), tmp_path / "op11.onnx", opset=11, output_names=("prob",),
                   dynamic=_batch_axes(["input", "prob"]))
    ex, _ = assert_same_maps(reference, path, image, **PREP)
    assert ex.bundle.model.opset_import[0].version == 11
    assert ex.meta.layer == TORCH_LAYER
    for preset in ("gradcam", "torchcam"):
        assert_same_maps(reference, path, image, preset, **PREP)


def test_odd_input_and_output_names(net, reference, image, tmp_path):
    path = _export(Logits(net), tmp_path / "odd.onnx", input_names=("image:0",), output_names=("scores/out:0",),
                   dynamic=_batch_axes(["image:0", "scores/out:0"]))
    ex, _ = assert_same_maps(reference, path, image, **PREP)
    assert [i.name for i in ex.bundle.model.graph.input] == ["input"]
    assert [i.name for i in ex.bundle.features.graph.input] == ["input"]
    assert [o.name for o in ex.bundle.features.graph.output] == ["features"]
    assert ex.meta.layer == TORCH_LAYER


def test_several_outputs(net, reference, image, tmp_path):
    path = _export(ThreeOutputs(net), tmp_path / "three.onnx", output_names=("maps", "scores", "probs"),
                   dynamic=_batch_axes(["input", "maps", "scores", "probs"]))
    ex, _ = assert_same_maps(reference, path, image, **PREP)  # default: the first 2-D output
    assert ex.meta.layer == "maps"  # torch names the ReLU's output after the graph output it also is
    ex, _ = assert_same_maps(reference, path, image, output="probs", **PREP)  # its Softmax is cut off
    assert ex.meta.output_kind == "logits"
    with pytest.raises(BundleError, match="closest: probs"):
        derive_bundle(path, output="prob")
    with pytest.raises(BundleError, match="2-D"):
        derive_bundle(path, output="maps")


def test_nhwc_input(net, reference, image, tmp_path):
    path = _export(Nhwc(net), tmp_path / "nhwc.onnx", shape=(1, SIZE, SIZE, 3),
                   dynamic=_batch_axes(["input", "logits"]))
    ex, _ = assert_same_maps(reference, path, image, **PREP)
    first = ex.bundle.model.graph.node[0]
    assert first.op_type == "Transpose" and list(first.attribute[0].ints) == [0, 2, 3, 1]
    assert ex.meta.layer == TORCH_LAYER


def test_nhwc_head_tf_style(helper_reference, image, tmp_path):
    path = helper_net("nhwc_head", tmp_path / "tf.onnx", opset=11)
    ex, _ = assert_same_maps(helper_reference, path, image, **PREP)
    assert ex.meta.layer == "act"  # stepped back over the Transpose to the activation (NCHW)
    # the NHWC map itself works too: the feature graph transposes it back
    ex, _ = assert_same_maps(helper_reference, path, image, layer="act_nhwc", **PREP)
    assert ex.bundle.features.graph.node[-1].op_type == "Transpose"
    listed = {c.name: c for c in list_layers(path)}
    assert listed["act_nhwc"].layout == "NHWC" and listed["act_nhwc"].channels == K
    assert listed["act"].auto


def test_layer_by_name(net, reference, image, tmp_path):
    path = _export(Logits(net), tmp_path / "m.onnx", dynamic=_batch_axes(["input"]))
    assert derive_bundle(path, layer="net.body.3").meta.layer == TORCH_LAYER  # a torch module path
    assert derive_bundle(path, layer="net.body").meta.layer == TORCH_LAYER  # a module: its last map
    assert derive_bundle(path, layer="/net/body/body.3/Relu").meta.layer == TORCH_LAYER  # a node name
    b = derive_bundle(path, layer="/net/body/body.1/Relu_output_0")
    assert b.meta.layer == "/net/body/body.1/Relu_output_0"
    ex = Explainer(path, device="cpu", layer="/net/body/body.1/Relu_output_0", **PREP)
    assert ex.engine.activations(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (8, SIZE, SIZE)
    text = format_layers(list_layers(path))
    assert f"* {TORCH_LAYER}  [1x{K}x16x16]" in text


# ------------------------------------------------------------------------------- preprocessing


def test_sidecar_and_defaults(net, tmp_path):
    path = _export(Softmaxed(net), tmp_path / "side.onnx", output_names=("p",))
    meta = derive_bundle(path).meta
    assert meta.preprocessing == Preprocessing((SIZE, SIZE))  # ImageNet mean/std, 1/255, RGB
    assert meta.labels is None
    (tmp_path / "names.txt").write_text("\n".join(LABELS) + "\n")
    (tmp_path / "side.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1 / 127.5,
                                                    "color_order": "BGR", "labels": "names.txt"}))
    meta = derive_bundle(path).meta
    assert meta.preprocessing == Preprocessing((SIZE, SIZE), "BGR", 1 / 127.5, (0.5,) * 3, (0.25,) * 3)
    assert meta.labels == LABELS
    assert derive_bundle(path, mean=(0.1, 0.2, 0.3)).meta.preprocessing.mean == (0.1, 0.2, 0.3)  # flags win
    (tmp_path / "side.json").write_text(json.dumps({"mena": [0.5] * 3}))
    with pytest.raises(BundleError, match="unknown key"):
        derive_bundle(path)
    (tmp_path / "side.json").write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(BundleError, match="2 labels given for a model with 5 classes"):
        derive_bundle(path)


def test_cache_is_keyed_by_sha_and_reused(net, tmp_path, monkeypatch):
    path = _export(Logits(net), tmp_path / "c.onnx", dynamic=_batch_axes(["input"]))
    b1 = derive_bundle(path, **PREP)
    cache = tmp_path / "cache"
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert b1.directory.parent == cache / sha and (b1.directory / "derived.json").is_file()
    assert load_bundle(b1.directory).meta == b1.meta  # the cache entry is an ordinary bundle
    assert not [p for p in (cache / sha).iterdir() if p.name.startswith(".tmp")]

    import runtime.thirdparty as tp

    def boom(*a, **k):
        raise AssertionError("derived again")

    monkeypatch.setattr(tp, "derive_checked", boom)
    b2 = derive_bundle(path, **PREP)
    assert b2.directory == b1.directory and b2.source == path
    with pytest.raises(AssertionError, match="derived again"):
        derive_bundle(path, layer="/net/body/body.1/Relu_output_0", **PREP)  # other options: other entry


def test_bundle_flags_are_ignored_with_a_warning(reference, capsys):
    assert load_bundle(reference, layer="x", mean=None).meta.layer == "body.3"
    assert "ignoring layer" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- errors


def _save(nodes, inputs, outputs, inits, path: Path) -> Path:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_errors_are_one_line(net, tmp_path):
    flat = _save([helper.make_node("MatMul", ["v", "w"], ["y"])],
                 [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 10])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                 [numpy_helper.from_array(np.ones((10, 5), np.float32), "w")], tmp_path / "flat.onnx")
    mlp = _save([helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
                [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                [numpy_helper.from_array(np.ones((192, 5), np.float32), "w")], tmp_path / "mlp.onnx")
    gray = _save([helper.make_node("Flatten", ["input"], ["y"])],
                 [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [], tmp_path / "gray.onnx")
    cnn = _export(Logits(net), tmp_path / "cnn.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    cases = [
        (flat, {}, "not one image tensor"),
        (mlp, {}, "no 4-D feature map"),
        (gray, {}, "not a 3-channel image"),
        (cnn, {"layer": "/net/body/body.3/Relu_outptu_0"}, "closest: /net/body/body.3/Relu_output_0"),
        (cnn, {"layer": "/net/ReduceMean_output_0"}, "is 2-D"),
        (cnn, {"input_size": (64, 64)}, "fixed height of 32"),
        (tmp_path / "junk.onnx", {}, "not a valid ONNX model"),
    ]
    for path, kw, text in cases:
        with pytest.raises(BundleError, match=text) as e:
            Explainer(path, device="cpu", **kw)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ annotate


def test_annotate_writes_a_bundle_used_without_flags(net, reference, image, tmp_path):
    from exporter.annotate import main

    path = _export(Softmaxed(net), tmp_path / "third.onnx", output_names=("probs",),
                   dynamic=_batch_axes(["input", "probs"]))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    args = [str(path), "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--scale", str(1 / 255),
            "--labels", str(tmp_path / "labels.txt")]
    assert main(args) == 0
    out = tmp_path / "third"
    bundle = load_bundle(out)
    assert bundle.meta.labels == LABELS and bundle.meta.layer == TORCH_LAYER and bundle.source is None
    assert not any(p.key.startswith("scorecam.") for p in onnx.load(str(path)).metadata_props)  # source untouched
    assert_same_maps(reference, out, image)
    assert main([*args, "--out", str(tmp_path / "b2" / "clf.onnx")]) == 0
    assert load_bundle(tmp_path / "b2" / "clf.onnx").meta.labels == LABELS
    assert main([str(path), "--std", "1", "1", "1"]) == 2  # no mean: refused, nothing written
    assert main([str(out / MODEL_FILE), "--mean", "0", "0", "0", "--std", "1", "1", "1"]) == 2  # already a bundle
    assert main([str(path), "--mean", "0", "0", "0", "--std", "1", "1", "1", "--layer", "nope"]) == 2


def test_opset_below_11_is_converted(helper_reference, image, tmp_path):
    path = helper_net("both", tmp_path / "op9.onnx", opset=9)
    ex, _ = assert_same_maps(helper_reference, path, image, **PREP)
    assert ex.bundle.model.opset_import[0].version == 13 and ex.meta.layer == "act"


def test_cli_list_layers_and_flags(net, reference, image, tmp_path, capsys):
    import importlib

    explain = importlib.import_module("runtime.explain")  # (runtime.explain the attribute is the function)
    if "--list-layers" not in explain.build_parser().format_help():
        pytest.skip("runtime.explain has no third-party flags yet (thirdparty.add_arguments not wired)")
    path = _export(Softmaxed(net), tmp_path / "cli.onnx", output_names=("probs",), dynamic=_batch_axes(["input"]))
    assert explain.main([str(path), "--list-layers"]) == 0
    assert f"* {TORCH_LAYER}" in capsys.readouterr().out
    assert explain.main([str(reference), "--list-layers"]) == 0
    assert "a bundle" in capsys.readouterr().out
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "pic.png")
    flags = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--size", str(SIZE), str(SIZE)]
    assert explain.main([str(path), str(tmp_path / "pic.png"), *flags, "-o", str(tmp_path / "o")]) == 0
    want = Explainer(reference, device="cpu").explain(image)[0]
    got = np.load(tmp_path / "o" / f"pic.{want.class_index}.npy")
    assert np.abs(got - want.saliency).max() <= 1e-3
    capsys.readouterr()
    assert explain.main([str(path), str(tmp_path / "pic.png"), "--layer", "/net/body/body.3/Relu_outptu_0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "closest: /net/body/body.3/Relu_output_0" in err
