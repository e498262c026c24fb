"""The exporter API: bundle layout, metadata, hashes, dynamic batch, the report, failure handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import user_models

from exporter import ExportError, export, list_layers
from exporter.lite import efficientnet_lite0, imagenet_labels, load_original
from runtime.contract import (
    FEATURES_FILE,
    MODEL_FILE,
    REPORT_FILE,
    BundleMeta,
    graph_sha256,
    read_props,
)

TOL = 1e-4


def _meta(path: Path) -> BundleMeta:
    return BundleMeta.from_props(read_props(onnx.load(str(path))), str(path))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tiny_bundle(out: Path, **kw) -> dict:
    kw.setdefault("input_size", (32, 40))
    return export(user_models.tiny(), "act2", out, **kw)


# ---------------------------------------------------------------------------------- bundle layout


def test_bundle_holds_two_single_file_graphs_and_the_report(toy_bundle):
    assert sorted(p.name for p in toy_bundle.iterdir()) == sorted([MODEL_FILE, FEATURES_FILE, REPORT_FILE])
    siblings = [p.name for p in toy_bundle.parent.iterdir()]
    assert not [n for n in siblings if ".partial-" in n or ".old-" in n]
    for name in (MODEL_FILE, FEATURES_FILE):
        model = onnx.load(str(toy_bundle / name), load_external_data=False)
        onnx.checker.check_model(model)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_graph_inputs_and_outputs_follow_the_contract(toy_bundle):
    model = onnx.load(str(toy_bundle / MODEL_FILE))
    feats = onnx.load(str(toy_bundle / FEATURES_FILE))
    for g in (model.graph, feats.graph):
        assert [i.name for i in g.input] == ["input"]
        dims = g.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
        assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == ["logits"]
    assert [o.name for o in feats.graph.output] == ["features"]


def test_both_graphs_carry_the_metadata(toy_bundle):
    cls, feat = _meta(toy_bundle / MODEL_FILE), _meta(toy_bundle / FEATURES_FILE)
    assert (cls.role, feat.role) == ("classifier", "features")
    for m in (cls, feat):
        assert m.layer == "features"
        assert m.output_kind == "logits"
        assert m.labels == ("square", "ring", "cross")
        p = m.preprocessing
        assert p.input_size == (64, 64) and p.color_order == "RGB"
        assert p.scale == pytest.approx(1 / 255) and p.mean == (0.5,) * 3 and p.std == (0.5,) * 3
        assert set(m.versions) == {"exporter", "opset", "torch", "onnx"}
        assert m.versions["torch"] == torch.__version__ and m.versions["opset"] == "18"


def test_sibling_hashes_match(toy_bundle):
    model = onnx.load(str(toy_bundle / MODEL_FILE))
    feats = onnx.load(str(toy_bundle / FEATURES_FILE))
    assert _meta(toy_bundle / MODEL_FILE).sibling_sha256 == graph_sha256(feats)
    assert _meta(toy_bundle / FEATURES_FILE).sibling_sha256 == graph_sha256(model)
    report = json.loads((toy_bundle / REPORT_FILE).read_text())
    assert report["files"][MODEL_FILE]["graph_sha256"] == graph_sha256(model)
    assert report["files"][FEATURES_FILE]["graph_sha256"] == graph_sha256(feats)


def test_features_graph_is_a_part_of_the_classifier(toy_bundle):
    """One export, split: every node of features.onnx is a node of model.onnx, same weights."""
    model = onnx.load(str(toy_bundle / MODEL_FILE))
    feats = onnx.load(str(toy_bundle / FEATURES_FILE))
    nodes = {n.SerializeToString(deterministic=True) for n in model.graph.node}
    assert all(n.SerializeToString(deterministic=True) in nodes for n in feats.graph.node)
    weights = {t.name: t.raw_data for t in model.graph.initializer}
    assert all(weights[t.name] == t.raw_data for t in feats.graph.initializer)
    assert "features" in {o for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_in_onnx_runtime(toy_bundle, batch):
    x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    logits = _session(toy_bundle / MODEL_FILE).run(None, {"input": x})[0]
    feats = _session(toy_bundle / FEATURES_FILE).run(None, {"input": x})[0]
    assert logits.shape == (batch, 3) and feats.shape == (batch, 32, 32, 32)
    assert (feats >= 0).all()  # a ReLU output


def test_bundle_matches_the_torch_model(toy_bundle, toy_data):
    from exporter.recipes import build_torch
    from exporter.toy import preprocess

    net = build_torch("toy")
    x = preprocess(toy_data[0][:8])
    with torch.no_grad():
        want = net(x).numpy()
    got = _session(toy_bundle / MODEL_FILE).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


def test_report_says_what_was_exported_and_verified(toy_bundle):
    r = json.loads((toy_bundle / REPORT_FILE).read_text())
    assert r["layer"] == "features" and r["num_classes"] == 3 and r["labels"] == 3
    assert r["input"]["shape"][1:] == [3, 64, 64]
    assert r["output"] == {"name": "logits", "kind": "logits", "shape": [r["input"]["shape"][0], 3]}
    assert (r["features"]["K"], r["features"]["h"], r["features"]["w"]) == (32, 32, 32)
    assert set(r["versions"]) >= {"exporter", "opset", "torch", "onnx", "onnxruntime"}
    for name in (MODEL_FILE, FEATURES_FILE):
        assert r["files"][name]["bytes"] == (toy_bundle / name).stat().st_size
    v = r["verification"]
    assert v["passed"] and v["tolerance"] == TOL and v["max_rel_error"] <= TOL
    assert {c["inputs"] for c in v["checks"]} == {"random", "samples", "samples[0]"}
    assert {c["batch"] for c in v["checks"]} == {1, 2, 5}
    assert all(c["output_rel_error"] <= TOL and c["features_rel_error"] <= TOL for c in v["checks"])
    assert sorted(t["image"] for t in v["top1"]) == sorted(
        ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg"])
    assert all(t["torch_agrees"] and t["label"] in ("square", "ring", "cross") for t in v["top1"])


# ------------------------------------------------------------------------------- EfficientNet-Lite0


def test_lite_classifier_reproduces_the_original_net():
    original = load_original()
    ours = efficientnet_lite0()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(original(x), ours(x))
    head = [m for m in list_layers(ours) if m.name == "head_act"]
    assert head and head[0].shape == (2, 1280, 7, 7) and head[0].usable
    assert list_layers(ours)[0].name == "head_act"


def test_lite0_bundle(lite0_bundle, samples_dir):
    from PIL import Image

    r = json.loads((lite0_bundle / REPORT_FILE).read_text())
    assert r["layer"] == "head_act" and r["features"]["shape"][1:] == [1280, 7, 7]
    assert r["num_classes"] == 1000 and r["verification"]["max_rel_error"] <= TOL
    top = {t["image"]: t for t in r["verification"]["top1"]}
    assert top["chelsea.png"]["index"] == 285 and top["chelsea.png"]["label"] == "Egyptian cat"
    assert top["chelsea.png"]["probability"] == pytest.approx(0.79, abs=0.02)
    assert top["coffee.png"]["label"] == "espresso"

    meta = _meta(lite0_bundle / MODEL_FILE)
    assert meta.preprocessing.scale == pytest.approx(1 / 127.5)
    assert meta.preprocessing.mean == (1.0, 1.0, 1.0) and meta.preprocessing.std == (1.0, 1.0, 1.0)
    assert meta.labels is not None and len(meta.labels) == 1000 and meta.labels[285] == "Egyptian cat"
    assert list(meta.labels) == imagenet_labels()

    rgb = np.asarray(Image.open(samples_dir / "chelsea.png").convert("RGB").resize((224, 224), Image.BILINEAR))
    x = meta.preprocessing.apply(rgb)[None]
    logits = _session(lite0_bundle / MODEL_FILE).run(None, {"input": x})[0]
    feats = _session(lite0_bundle / FEATURES_FILE).run(None, {"input": x})[0]
    assert int(logits.argmax()) == 285 and feats.shape == (1, 1280, 7, 7)
    assert feats.min() >= 0 and feats.max() <= 6  # ReLU6


# ----------------------------------------------------------------------------------- API behaviour


def test_softmax_output_is_recorded_as_probabilities(tmp_path):
    report = export(user_models.tiny_softmax(), "act2", tmp_path / "b", input_size=(32, 32))
    assert report["output"]["name"] == "probabilities" and report["output"]["kind"] == "probabilities"
    assert _meta(tmp_path / "b" / MODEL_FILE).output_kind == "probabilities"
    model = onnx.load(str(tmp_path / "b" / MODEL_FILE))
    assert [o.name for o in model.graph.output] == ["probabilities"]
    p = _session(tmp_path / "b" / MODEL_FILE).run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert np.allclose(p.sum(1), 1, atol=1e-5)


def test_no_verify_skips_the_check(tmp_path):
    report = _tiny_bundle(tmp_path / "b", verify=False)
    assert report["verification"] is None
    assert json.loads((tmp_path / "b" / REPORT_FILE).read_text())["verification"] is None


def test_failed_verification_writes_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "b"
    with pytest.raises(ExportError, match="verification failed"):
        _tiny_bundle(out, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []  # not even the parent folders


def test_force_replaces_only_after_success(tmp_path):
    out = tmp_path / "b"
    _tiny_bundle(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="not empty"):
        export(user_models.tiny(), "act1", out, input_size=(32, 40))
    with pytest.raises(ExportError, match="verification failed"):
        export(user_models.tiny(), "act1", out, input_size=(32, 40), force=True, tolerance=-1.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export(user_models.tiny(), "act1", out, input_size=(32, 40), force=True)
    assert _meta(out / FEATURES_FILE).layer == "act1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_empty_destination_is_fine_and_gets_normal_permissions(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    _tiny_bundle(out, verify=False)
    mask = os.umask(0)
    os.umask(mask)
    assert (out / MODEL_FILE).is_file() and out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_finish_step_runs_inside_the_temporary_folder(tmp_path):
    seen = []
    _tiny_bundle(tmp_path / "b", verify=False, finish=lambda d: seen.append(sorted(p.name for p in d.iterdir())))
    assert seen == [[REPORT_FILE, FEATURES_FILE, MODEL_FILE]]


def _export_error(model, layer, out, **kw) -> str:
    with pytest.raises(ExportError) as info:
        export(model, layer, out, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("build", "layer", "kw", "expected"), [
    (user_models.tiny, "act3", {}, "unknown layer 'act3': did you mean act"),
    (user_models.tiny, "fc", {}, "outputs a 2-D tensor"),
    (user_models.SharedAct, "act", {}, "runs 2 times per forward"),
    (user_models.Untraceable, "act", {}, "torch could not export the model: RuntimeError"),
    (user_models.tiny, "act2", {"std": (0.0, 1.0, 1.0)}, "bad preprocessing: std must not contain 0"),
    (user_models.tiny, "act2", {"input_size": (0, 32)}, "bad preprocessing: input size must be positive"),
    (user_models.tiny, "act2", {"opset": 13}, "opset must be between 18"),
    (user_models.tiny, "act2", {"labels": ["a", "b"]}, "got 2 labels for a model with 5 outputs"),
    (lambda: {"not": "a module"}, "act2", {}, "expected a torch.nn.Module"),
])
def test_api_errors_are_one_line_and_write_nothing(tmp_path, build, layer, kw, expected):
    kw.setdefault("input_size", (32, 32))
    model = build()
    message = _export_error(model, layer, tmp_path / "b", **kw)
    assert expected in message
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_destination_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert "not empty" in _export_error(user_models.tiny(), "act2", tmp_path / "b", input_size=(32, 32))
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]
    (tmp_path / "f").write_text("a file")
    assert "not a folder" in _export_error(user_models.tiny(), "act2", tmp_path / "f", input_size=(32, 32))


def test_list_layers_is_deepest_first():
    names = [m.name for m in list_layers(user_models.tiny(), (32, 32))]
    assert names == ["act2", "bn2", "conv2", "act1", "conv1"]
    shared = {m.name: m for m in list_layers(user_models.SharedAct(), (16, 16))}
    assert shared["act"].calls == 2 and not shared["act"].usable
