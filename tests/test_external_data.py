"""Models whose weights sit beside the graph (ONNX external data: ``model.onnx`` + ``model.onnx.data``).

Every model here is a real export: torch's default (dynamo) exporter, which writes external data, and its
legacy one, which writes one file, of a small CNN and of a timm classifier (random weights). Both exports of
one network must give the same map, in every form (API, CLI, service, batch job, one-graph explainer, int8);
data files in a subfolder or split over several files load too; a data path that escapes the model's
folder is refused in one line by every entry point (ONNX Runtime's own check stays on); a missing or
truncated data file is one line; the cache copies the data and is keyed by it; a bundle's hashes cover it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundles import photo
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from servers import ServeProcess
from test_memory import protos_reachable

from runtime import BundleError, Explainer, external
from runtime.bundle import load_bundle
from runtime.contract import FEATURES_FILE, MODEL_FILE, graph_sha256
from runtime.head import linear_head
from runtime.serve.protocol import decode_saliency
from runtime.thirdparty import model_sha256

torch = pytest.importorskip("torch")
nn = torch.nn

#: the two exports of one network run different op sequences (dynamo's decompositions against the legacy
#: exporter's ops); their logits agree to float32 rounding, and a saliency map in [0, 1] to well under this
SAME_NET = 1e-4
#: one graph with the same weights, read from one file or from external data: the same computation
SAME_GRAPH = 1e-6


class SmallCNN(nn.Module):
    """Three convolutions, global average pooling, a linear head (its weight large enough to be external)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def torch_export(net: nn.Module, path: Path, size: int, dynamo: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        torch.onnx.export(net, (torch.randn(1, 3, size, size),), str(path), dynamo=dynamo, input_names=["image"])
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, nn.Module]:
    import timm

    torch.manual_seed(0)
    return {"cnn": SmallCNN().eval(), "timm": timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()}


SIZES = {"cnn": 32, "timm": 64}


@pytest.fixture(scope="module")
def models(tmp_path_factory, nets) -> dict[str, Path]:
    """``{name}-dynamo`` (model.onnx + model.onnx.data) and ``{name}-legacy`` (one file) of each network."""
    root = tmp_path_factory.mktemp("extdata")
    out = {}
    for name, net in nets.items():
        for kind in ("dynamo", "legacy"):
            out[f"{name}-{kind}"] = torch_export(net, root / f"{name}-{kind}" / MODEL_FILE, SIZES[name],
                                                 kind == "dynamo")
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SCORECAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def copy_model(src: Path, folder: Path) -> Path:
    """The model file and its data files, copied to ``folder`` (as a user moves a model)."""
    shutil.copytree(src.parent, folder)
    return folder / src.name


def resave(src: Path, dest: Path, **save) -> Path:
    """``src`` loaded with its weights and saved to ``dest`` with ``onnx.save_model(**save)``."""
    (dest.parent / save.get("location", "x")).parent.mkdir(parents=True, exist_ok=True)  # onnx makes no folder
    onnx.save_model(onnx.load(str(src)), str(dest), **save)
    return dest


def set_location(path: Path, location: str) -> Path:
    """Point every external tensor of the graph at ``path`` to ``location`` (offsets kept)."""
    m = onnx.load(str(path), load_external_data=False)
    for t in external.external_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(m, str(path))
    return path


def one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


# ------------------------------------------------------------------------------------- both exporters


@pytest.mark.parametrize("name", ["cnn", "timm"])
def test_both_torch_exporters_explain_alike(models, name, cache):
    dyn, legacy = models[f"{name}-dynamo"], models[f"{name}-legacy"]
    assert (dyn.parent / "model.onnx.data").is_file() and not (legacy.parent / "model.onnx.data").exists()
    a, b = Explainer(dyn, device="cpu"), Explainer(legacy, device="cpu")
    assert a.bundle.data_dir is not None and b.bundle.data_dir is None
    assert a.bundle.max_batch is None  # dynamo's fixed batch (Reshape allowzero=1 to [1,C]) made dynamic
    assert a.bundle.directory.parent.parent == cache  # derived into the cache, with a copy of the data
    assert (a.bundle.directory / "model.onnx.data").read_bytes() == (dyn.parent / "model.onnx.data").read_bytes()
    ra, rb = a.explain(photo(48, 64), top_k=2), b.explain(photo(48, 64), top_k=2)
    for x, y in zip(ra, rb, strict=True):
        assert x.class_index == y.class_index and x.channels_used == y.channels_used
        assert x.score == pytest.approx(y.score, abs=1e-4)
        np.testing.assert_allclose(x.saliency, y.saliency, atol=SAME_NET, rtol=0)


def test_the_linear_head_is_read_from_the_data_file(models, nets):
    """The head reader reads W from model.onnx.data (only that tensor) and the closed-form modes work."""
    ex = Explainer(models["cnn-dynamo"], device="cpu", mode="preview")
    m = onnx.load(str(ex.bundle.model_path), load_external_data=False)
    head = linear_head(m, ex.engine.features_output, ex.engine.class_output, base_dir=ex.bundle.data_dir)
    assert head is not None and external.is_external(next(t for t in m.graph.initializer if t.name == head.weight_name))
    np.testing.assert_allclose(head.weight, nets["cnn"].fc.weight.detach().numpy(), atol=1e-7)
    with pytest.raises(BundleError, match="external data file"):
        linear_head(m, ex.engine.features_output, ex.engine.class_output)  # no folder: refused, not guessed
    r = ex.explain(photo())[0]
    assert np.isfinite(r.saliency).all() and r.passes == 0


def test_list_layers_of_a_dynamo_export(models, capsys):
    from runtime.explain import main

    assert main([str(models["timm-dynamo"]), "--list-layers"]) == 0
    out = capsys.readouterr().out
    assert "* " in out and "[1x512x2x2]" in out


# ------------------------------------------------------------------------------------ data file layouts


def test_data_in_a_subfolder_and_split_over_several_files(models, tmp_path):
    src = models["cnn-dynamo"]
    want = Explainer(src, device="cpu").explain(photo())[0]
    sub = resave(src, tmp_path / "sub" / "model.onnx", save_as_external_data=True, location="weights/model.bin",
                 size_threshold=0)
    split = resave(src, tmp_path / "split" / "model.onnx", save_as_external_data=True,
                   all_tensors_to_one_file=False, size_threshold=0)
    assert (tmp_path / "sub" / "weights" / "model.bin").is_file()
    assert len([f for f in (tmp_path / "split").iterdir() if f.name != "model.onnx"]) > 3
    for path in (sub, split):
        got = Explainer(path, device="cpu").explain(photo())[0]
        assert got.class_index == want.class_index
        np.testing.assert_allclose(got.saliency, want.saliency, atol=SAME_GRAPH, rtol=0)
    ex = Explainer(sub, device="cpu")
    assert (ex.bundle.directory / "weights" / "model.bin").is_file()  # the cache keeps the layout


def test_every_tensor_external_shape_constants_included(models, tmp_path):
    """size_threshold=0 puts even the Reshape targets in the data file: the graph work reads them there."""
    path = resave(models["timm-dynamo"], tmp_path / "all" / "model.onnx", save_as_external_data=True,
                  size_threshold=0, location="w.bin")
    m = onnx.load(str(path), load_external_data=False)
    assert all(external.is_external(t) for t in m.graph.initializer)
    want = Explainer(models["timm-dynamo"], device="cpu", max_channels=16).explain(photo())[0]
    ex = Explainer(path, device="cpu", max_channels=16)
    assert ex.bundle.max_batch is None
    np.testing.assert_allclose(ex.explain(photo())[0].saliency, want.saliency, atol=SAME_GRAPH, rtol=0)


# ------------------------------------------------------------------------------------- refused paths


@pytest.fixture()
def escaping(models, tmp_path) -> dict[str, Path]:
    """The CNN whose data path leaves its folder (``../secret.bin``, an existing file with the right bytes)
    and one whose data path is absolute."""
    out = {}
    for kind, loc in (("relative", "../secret.bin"), ("absolute", str(tmp_path / "secret.bin"))):
        path = copy_model(models["cnn-dynamo"], tmp_path / kind / "m")
        shutil.copyfile(path.parent / "model.onnx.data", tmp_path / kind / "secret.bin")
        shutil.copyfile(path.parent / "model.onnx.data", tmp_path / "secret.bin")
        out[kind] = set_location(path, loc)
    return out


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_onnx_runtime_itself_refuses_an_escaping_path(escaping, kind):
    """The check is ONNX Runtime's, by path and from bytes with the folder option: ours mirrors it."""
    path = escaping[kind]
    with pytest.raises(Exception, match="[Ee]xternal data"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    external.point_to(opts, path.parent)
    with pytest.raises(Exception, match="[Ee]xternal data"):
        ort.InferenceSession(onnx.load(str(path), load_external_data=False).SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_an_escaping_path_is_one_line_from_every_entry_point(escaping, kind, tmp_path, capsys):
    from exporter.explainer_cli import main as explainer_main
    from runtime.batch.cli import main as batch_main
    from runtime.explain import main as explain_main

    path = escaping[kind]
    with pytest.raises(BundleError, match="escapes the model's folder|absolute path"):
        Explainer(path, device="cpu")
    Image.fromarray(photo()).save(tmp_path / "p.png")
    calls = {
        "explain": lambda: explain_main([str(path), str(tmp_path / "p.png"), "--out", str(tmp_path / "o")]),
        "list-layers": lambda: explain_main([str(path), "--list-layers"]),
        "batch": lambda: batch_main([str(path), str(tmp_path / "p.png"), "--out", str(tmp_path / "b"),
                                     "--no-progress"]),
        "one-graph": lambda: explainer_main([str(path), "--out", str(tmp_path / "e.onnx")]),
    }
    for what, call in calls.items():
        assert call() == 2, what
        err = capsys.readouterr().err
        line = one_error_line("\n".join(ln for ln in err.splitlines() if not ln.startswith("loading ")))
        assert str(path) in line and "model.onnx" in line, (what, line)
        assert "tensor '" in line and ("escapes the model's folder" in line or "absolute path" in line), (what, line)
    assert not (tmp_path / "e.onnx").exists() and not (tmp_path / "o").exists()


def test_an_escaping_path_stops_the_service_in_one_line(escaping):
    srv = ServeProcess(escaping["relative"], ready=False)
    try:
        assert srv.proc.wait(timeout=120) == 2
    finally:
        srv.terminate()
    errors = [ln for ln in srv.log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "escapes the model's folder" in errors[0] and "Traceback" not in srv.log


def test_the_cli_process_prints_one_line_for_an_escaping_path(escaping):
    out = subprocess.run([sys.executable, "-m", "runtime.explain", str(escaping["relative"]), "--list-layers"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "'../secret.bin'" in one_error_line(out.stderr)


def test_symlinks_a_hub_cache_layout_loads_and_a_link_out_of_the_folder_is_refused(models, tmp_path):
    """A Hugging Face cache snapshot links ``model.onnx`` and ``model.onnx.data`` to blobs in one other folder:
    that loads (as ONNX Runtime loads it by path). A data file linked out of the model's folder, when the
    model file itself is not a link there, is refused."""
    src = models["cnn-dynamo"]
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    shutil.copyfile(src, blobs / "1f2e")
    shutil.copyfile(src.parent / "model.onnx.data", blobs / "9a8b")
    (snap / "model.onnx").symlink_to(blobs / "1f2e")
    (snap / "model.onnx.data").symlink_to(blobs / "9a8b")
    ort.InferenceSession(str(snap / "model.onnx"), providers=["CPUExecutionProvider"])  # ONNX Runtime takes it
    want = Explainer(src, device="cpu").explain(photo())[0]
    got = Explainer(snap / "model.onnx", device="cpu").explain(photo())[0]
    np.testing.assert_allclose(got.saliency, want.saliency, atol=SAME_GRAPH, rtol=0)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(src, plain / "model.onnx")
    (plain / "model.onnx.data").symlink_to(blobs / "9a8b")
    with pytest.raises(Exception, match="escapes"):
        ort.InferenceSession(str(plain / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(BundleError, match="escapes the model's folder"):
        Explainer(plain / "model.onnx", device="cpu")


def test_a_missing_or_truncated_data_file_is_one_line(models, tmp_path, capsys):
    from runtime.explain import main

    path = copy_model(models["cnn-dynamo"], tmp_path / "m")
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    assert main([str(path), "--list-layers"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "truncated" in line and str(data) in line and "tensor '" in line
    data.unlink()
    assert main([str(path), "--list-layers"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "missing" in line and str(data) in line


# ------------------------------------------------------------------------------------------- the cache


def _scaled(data: Path, factor: float) -> None:
    """Rewrite a float32 data file with every weight multiplied by ``factor`` (same size, other weights)."""
    w = np.fromfile(data, np.float32)
    (w * np.float32(factor)).tofile(data)


def test_the_cache_copies_the_data_and_a_changed_data_file_derives_again(models, tmp_path, cache):
    path = copy_model(models["cnn-dynamo"], tmp_path / "m")
    first = Explainer(path, device="cpu")
    r1 = first.explain(photo())[0]
    entry = first.bundle.directory
    assert model_sha256(path) in str(entry)
    _scaled(path.parent / "model.onnx.data", 0.5)  # the graph file is unchanged
    second = Explainer(path, device="cpu")
    assert second.bundle.directory != entry and second.bundle.model_sha256 != first.bundle.model_sha256
    r2 = second.explain(photo())[0]
    assert r2.score != pytest.approx(r1.score, abs=1e-3)
    # the first entry is self-contained: the source moved away, it still opens and explains as before
    shutil.rmtree(path.parent)
    again = Explainer(entry, device="cpu").explain(photo())[0]
    np.testing.assert_allclose(again.saliency, r1.saliency, atol=SAME_GRAPH, rtol=0)
    assert sorted(p.name for p in cache.glob("*/*/*")) == sorted(["derived.json", "features.onnx", "model.onnx",
                                                                 "model.onnx.data"] * 2)


def test_the_cache_never_reads_the_weights_into_python(models, tmp_path):
    """The cache copy is the kernel's (shutil.copyfile), and the derivation keeps the graph light."""
    path = copy_model(models["timm-dynamo"], tmp_path / "m")
    ex = Explainer(path, device="cpu", max_channels=4)
    m = onnx.load(str(ex.bundle.model_path), load_external_data=False)
    assert os.path.getsize(ex.bundle.model_path) < 200_000 < os.path.getsize(ex.bundle.directory / "model.onnx.data")
    assert sum(t.ByteSize() for t in m.graph.initializer) < 10_000
    ex.explain(photo())
    assert protos_reachable(ex) == []  # no graph (and no weight) kept after the sessions are built


# --------------------------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def ext_bundles(tmp_path_factory, nets) -> dict[str, Path]:
    """Our exporter's bundle of the CNN, with --external-data and as single files."""
    from exporter.bundle import export

    root = tmp_path_factory.mktemp("extbundles")
    with quiet():
        export(nets["cnn"], "body.5", root / "ext", input_size=(32, 32), external_data=True)
        export(nets["cnn"], "body.5", root / "one", input_size=(32, 32))
    return {"ext": root / "ext", "one": root / "one"}


def test_exporter_external_data_bundle(ext_bundles):
    ext, one = ext_bundles["ext"], ext_bundles["one"]
    assert sorted(p.name for p in ext.iterdir()) == ["export.json", "features.onnx", "model.onnx", "model.onnx.data"]
    for name in (MODEL_FILE, FEATURES_FILE):  # both graphs read the one data file: each weight stored once
        g = onnx.load(str(ext / name), load_external_data=False)
        assert {dict((e.key, e.value) for e in t.external_data)["location"]
                for t in external.external_tensors(g)} == {"model.onnx.data"}
    report = json.loads((ext / "export.json").read_text())
    size = os.path.getsize(ext / "model.onnx.data")
    assert report["files"]["model.onnx"]["external_data"] == {"model.onnx.data": size}
    b = load_bundle(ext)
    assert b.data_dir == ext and b.data_files == ("model.onnx.data",)
    a = Explainer(ext, device="cpu").explain(photo(), top_k=2)
    c = Explainer(one, device="cpu").explain(photo(), top_k=2)
    for x, y in zip(a, c, strict=True):
        assert x.class_index == y.class_index
        np.testing.assert_allclose(x.saliency, y.saliency, atol=SAME_GRAPH, rtol=0)


def test_the_bundle_hash_covers_the_data_file(ext_bundles, tmp_path):
    b = shutil.copytree(ext_bundles["ext"], tmp_path / "b")
    opened = load_bundle(b)
    g = onnx.load(str(b / MODEL_FILE), load_external_data=False)
    with pytest.raises(BundleError, match="folder is needed"):
        graph_sha256(g)
    assert graph_sha256(g, b) == opened.model_sha256
    _scaled(b / "model.onnx.data", 2.0)  # the weights swapped, the graphs untouched
    with pytest.raises(BundleError, match="changed since the bundle was opened"):
        opened.model  # noqa: B018
    with pytest.raises(BundleError, match="sibling hashes differ"):
        load_bundle(b)
    one = onnx.load(str(ext_bundles["one"] / MODEL_FILE))  # a graph without external data: hashed as before
    import hashlib

    assert graph_sha256(one) == hashlib.sha256(one.graph.SerializeToString(deterministic=True)).hexdigest()


def test_a_bundle_whose_data_path_escapes_is_refused_by_the_runtime_and_the_quantizer(ext_bundles, tmp_path,
                                                                                         capsys, samples_dir):
    from exporter.quantize import main as quantize_main
    from runtime.explain import main as explain_main

    b = shutil.copytree(ext_bundles["ext"], tmp_path / "b")
    shutil.copyfile(b / "model.onnx.data", tmp_path / "secret.bin")
    set_location(b / MODEL_FILE, "../secret.bin")
    Image.fromarray(photo()).save(tmp_path / "p.png")
    for call in (lambda: explain_main([str(b), str(tmp_path / "p.png"), "--out", str(tmp_path / "o")]),
                 lambda: quantize_main([str(b), str(samples_dir)])):
        assert call() == 2
        line = one_error_line(capsys.readouterr().err)
        assert "escapes the model's folder" in line and str(b / MODEL_FILE) in line
    assert not (b / "model.int8.onnx").exists()


def test_int8_of_an_external_data_bundle(ext_bundles, tmp_path, monkeypatch, samples_dir):
    from exporter.quantize import quantize_bundle

    b = shutil.copytree(ext_bundles["ext"], tmp_path / "b")
    quantize_bundle(b, samples_dir)
    assert (b / "model.int8.onnx").is_file() and not (b / "model.int8.onnx.data").exists()
    fp32 = Explainer(b, device="cpu").explain(photo())[0]
    r = Explainer(b, device="cpu", precision="int8").explain(photo(), targets=[fp32.class_index])[0]
    assert np.isfinite(r.saliency).all() and np.corrcoef(r.saliency.ravel(), fp32.saliency.ravel())[0, 1] > 0.9
    # an int8 model over protobuf's limit (the limit lowered here) keeps its weights in model.int8.onnx.data
    monkeypatch.setattr(external, "PROTO_LIMIT", 1 << 20)
    quantize_bundle(b, samples_dir)
    assert (b / "model.int8.onnx.data").is_file()
    r2 = Explainer(b, device="cpu", precision="int8").explain(photo(), targets=[fp32.class_index])[0]
    np.testing.assert_allclose(r2.saliency, r.saliency, atol=SAME_GRAPH, rtol=0)


# ---------------------------------------------------------------------------- the one-graph explainer


def test_one_graph_explainer_of_a_dynamo_export(models, tmp_path, capsys):
    from exporter.explainer_cli import main
    from runtime import images

    path = models["cnn-dynamo"]
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert main([str(path), "--out", str(one), "--max-channels", "8", "--fill", "zero"]) == 0
    assert main([str(path), "--out", str(two), "--max-channels", "8", "--fill", "zero", "--external-data", "--triton",
                 str(tmp_path / "triton")]) == 0
    capsys.readouterr()
    assert not (tmp_path / "one.onnx.data").exists() and (tmp_path / "two.onnx.data").is_file()
    assert (tmp_path / "triton" / "two" / "1" / "two.onnx.data").is_file()
    ex = Explainer(path, device="cpu", max_channels=8, fill="zero")  # the graph's fill
    rgb = images.resize_rgb(photo(), ex.pre.input_size)
    want = ex.explain(rgb)[0]
    for f in (one, two, tmp_path / "triton" / "two" / "1" / "model.onnx"):
        sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        sal, cls, _ = sess.run(None, {"pixels": rgb[None], "class_index": np.array([-1], np.int64)})
        assert int(cls[0]) == want.class_index
        np.testing.assert_allclose(sal[0], want.saliency, atol=1e-4, rtol=0)  # tests/test_explainer_graph.py's TOL


# ------------------------------------------------------------------------------- service and batch job


def test_the_service_explains_a_dynamo_export(models):
    path = models["cnn-dynamo"]
    want = Explainer(path, device="cpu").explain(photo(48, 64), top_k=2)
    buf = io.BytesIO()
    Image.fromarray(photo(48, 64)).save(buf, "PNG")
    import base64

    with ServeProcess(path, "--model_name", "cnn") as srv:
        r = httpx.post(f"{srv.url}/v1/models/cnn:explain", timeout=120,
                       json={"instances": [{"image": {"b64": base64.b64encode(buf.getvalue()).decode()}, "top_k": 2}]})
    assert r.status_code == 200, r.text
    got = r.json()["explanations"][0]["results"]
    assert [g["class_index"] for g in got] == [w.class_index for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(decode_saliency(g["saliency"]), w.saliency, atol=SAME_GRAPH, rtol=0)


def _dataset(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(3):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(photo(40, 50, seed=i)).save(paths[-1])
    return paths


def test_the_batch_job_on_a_dynamo_export_and_a_changed_data_file_is_another_model(models, tmp_path, capsys):
    from runtime.batch import job
    from runtime.batch.cli import main

    pq = pytest.importorskip("pyarrow.parquet")
    path = copy_model(models["cnn-dynamo"], tmp_path / "m")
    imgs = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    assert main([str(path), str(tmp_path / "data"), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    rows = pq.read_table(out / job.RESULTS).to_pylist()
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    ex = Explainer(path, device="cpu")
    for r in rows:
        want = ex.explain(r["source"])[0]
        np.testing.assert_allclose(np.load(out / r["map"]), want.saliency, atol=SAME_GRAPH, rtol=0)
    before = job.Settings.make(path).model_sha256
    _scaled(path.parent / "model.onnx.data", 0.5)
    assert job.Settings.make(path).model_sha256 != before  # the same graph file with other weights
    capsys.readouterr()
    assert main([str(path), str(tmp_path / "data"), "--out", str(out), "--no-progress"]) == 2
    assert "settings" in one_error_line(capsys.readouterr().err)
    assert len(imgs) == 3


def test_the_ray_engine_on_a_dynamo_export(models, tmp_path, capsys, monkeypatch):
    import importlib.util

    from conftest import RAY_TEST_TOKEN, require_tool

    from runtime.batch import job
    from runtime.batch.cli import main

    require_tool(importlib.util.find_spec("ray") is not None, "ray[data] (pip install 'scorecam-onnx[ray]')")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TEST_TOKEN)  # one per session: Ray keeps the first in the process
    _dataset(tmp_path / "data")
    out = tmp_path / "out"
    path = models["cnn-dynamo"]
    assert main([str(path), str(tmp_path / "data"), "--out", str(out), "--engine", "ray", "--workers", "1",
                 "--no-progress"]) == 0
    rows = pq.read_table(out / job.RESULTS).to_pylist()
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    want = Explainer(path, device="cpu").explain(rows[0]["source"])[0]
    np.testing.assert_allclose(np.load(out / rows[0]["map"]), want.saliency, atol=SAME_GRAPH, rtol=0)


# ------------------------------------------------------------------------------------ over 2 GB, memory


def test_list_layers_of_a_model_over_2gb_reads_none_of_its_weights(tmp_path):
    """A classifier whose head weight is 2.2 GB (a sparse file: no disk used): the graph work (shape inference,
    the automatic layer) runs on the light graph, never on the weights: ``--list-layers`` in a fresh process
    peaks far below their size."""
    classes = 140_000_000  # W [C, 4] float32: 2.24 GB
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    head = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[classes, 4])
    head.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(classes * 16))):
        e = head.external_data.add()
        e.key, e.value = k, v
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], [w, head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "big"
    folder.mkdir()
    onnx.save_model(model, str(folder / MODEL_FILE))
    with open(folder / "model.onnx.data", "wb") as f:
        f.truncate(classes * 16)
    code = ("import sys; from runtime.explain import main; from bench.rss import peak_rss_mb; rc = main(sys.argv[1:]); "
            "print('peak', peak_rss_mb()); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(folder / MODEL_FILE), "--list-layers"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert "* r  [1x4x8x8]" in out.stdout
    assert float(out.stdout.split("peak")[-1]) < 1000  # MiB: the 2.2 GB never came in


PEAK = """
import json, sys
import numpy as np
from bench.rss import peak_rss_mb
from tests.bundles import photo
mode, path = sys.argv[1], sys.argv[2]
if mode == "bare":
    import onnxruntime as ort
    from runtime.engine import session_options
    s = ort.InferenceSession(path, session_options(1), providers=["CPUExecutionProvider"])
    s.run(None, {"input": np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32)})
else:
    from runtime import Explainer
    ex = Explainer(path, device="cpu", threads=1)
    assert (ex.bundle.data_dir is not None) == (mode == "external")
    r = ex.explain(photo())[0]
    assert np.isfinite(r.saliency).all()
print(json.dumps({"peak": peak_rss_mb()}))
"""


def _peak(mode: str, path: Path, cache: Path) -> float:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env["PYTHONPATH"] = str(ROOT)
    env["SCORECAM_CACHE"] = str(cache)
    out = subprocess.run([sys.executable, "-c", PEAK, mode, str(path)], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_peak_rss_holds_the_weights_once(tmp_path, cache):
    """A third-party classifier whose memory is its weights (28 MB), as one file and as model.onnx +
    model.onnx.data: explaining the external-data one peaks within 1.2 x a bare ONNX Runtime session of it
    (loaded by path), and no higher than the one-file model's explanation (x 1.1): no Python copy of the
    weights at the session's peak. Each derived once first (the measured run is a cache hit)."""
    from test_memory import heavy_bundle  # noqa: I001 - tests/ is on the path

    heavy = heavy_bundle(tmp_path / "heavy")
    plain = onnx.load(str(heavy / MODEL_FILE))
    del plain.metadata_props[:]  # a third-party model: no bundle metadata
    one = tmp_path / "one" / "model.onnx"
    one.parent.mkdir()
    onnx.save_model(plain, str(one))
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(plain, str(ext), save_as_external_data=True, location="model.onnx.data")
    del plain
    for path in (one, ext):
        Explainer(path, device="cpu", threads=1)  # derive into the cache now
    bare, external_peak, one_peak = _peak("bare", ext, cache), _peak("external", ext, cache), _peak("one", one, cache)
    assert external_peak <= 1.2 * bare, (external_peak, bare)
    assert external_peak <= 1.1 * one_peak, (external_peak, one_peak)



def test_the_rules_by_hand(tmp_path):
    """external.check on hand-made entries: what is accepted, and the one-line reason for what is not."""
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    np.arange(12, dtype=np.float32).tofile(folder / "w.bin")

    def model(**entries) -> onnx.ModelProto:
        t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 4], data_location=TensorProto.EXTERNAL)
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, str(v)
        g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [t])
        return helper.make_model(g)

    assert external.check(model(location="w.bin"), folder) == ["w.bin"]
    assert external.check(model(location="sub/../w.bin", offset=0, length=48), folder) == ["w.bin"]
    # exact: the bytes written are read back, nothing is computed
    np.testing.assert_array_equal(external.read_tensor(model(location="w.bin").graph.initializer[0], folder),
                                  np.arange(12, dtype=np.float32).reshape(3, 4))
    for entries, reason in [({}, "names no data file"), ({"location": "w.bin", "length": 40}, "needs 48 bytes"),
                            ({"location": "w.bin", "offset": 8}, "truncated: tensor 'w' needs bytes 8..56"),
                            ({"location": "w.bin", "offset": "x"}, "malformed"),
                            ({"location": "w.bin", "offset": -4}, "negative"),
                            ({"location": "nope.bin"}, "missing"),
                            ({"location": "../m/../w.bin"}, "escapes"),
                            ({"location": str(folder / "w.bin")}, "absolute path")]:
        with pytest.raises(BundleError, match=reason.replace("(", r"\(").replace(".", r"\.")) as e:
            external.check(model(**entries), folder)
        assert "\n" not in str(e.value)
