"""The exporter on transformers: ``--layer`` on token and channels-last modules writes a verified bundle whose
metadata records the layout; ``--list-layers`` lists token layers with their grid; ``--grid`` / ``--aux-tokens``
/ ``--layout`` override the inference and a value that does not fit the tensor is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")


from exporter.__main__ import main  # noqa: E402
from runtime.contract import REPORT_FILE, BundleMeta, read_props  # noqa: E402
from runtime.layout import Layout  # noqa: E402


def test_bundles_record_their_layout(transformer_bundle):
    for name, want in (("deit", Layout("NLC", (7, 7), 1)), ("deit_distilled", Layout("NLC", (7, 7), 2)),
                       ("swin", Layout("NHWC", (7, 7))), ("vit", Layout("NLC", (7, 7), 1))):
        bundle = transformer_bundle(name)
        for graph in ("model.onnx", "features.onnx"):
            meta = BundleMeta.from_props(read_props(onnx.load(str(bundle / graph), load_external_data=False)))
            assert meta.layout == want, (name, graph)
        report = json.loads((bundle / REPORT_FILE).read_text())
        assert report["features"]["layout"] == want.kind and report["verification"]["passed"]
        assert (report["features"]["K"], report["features"]["h"], report["features"]["w"])[1:] == (7, 7)


def test_list_layers_shows_token_layers_with_their_grid(capsys, in_tests_dir):
    assert main(["transformer_models:deit", "--list-layers", "--input-size", "112",
                 "--layer", "blocks.1.norm1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (chosen,) = [ln for ln in lines if ln.startswith("*")]
    assert chosen.split()[1:4] == ["blocks.1.norm1", "192x7x7", "192"]
    assert "NLC 50 tokens = 1 aux (first) + 7x7" in chosen
    assert any(ln.split()[:2] == ["patch_embed.proj", "192x7x7"] and "NLC" not in ln for ln in lines)
    assert main(["transformer_models:swin", "--list-layers", "--input-size", "112"]) == 0
    out = capsys.readouterr().out
    assert any(ln.split()[:3] == ["features.5.0.norm1", "96x7x7", "96"] and "NHWC 7x7" in ln
               for ln in out.splitlines())


@pytest.fixture
def in_tests_dir(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent)


@pytest.mark.parametrize("flags, message", [
    (["--layer", "blocks.1.norm1", "--grid", "8", "8"], "T must be aux + H*W"),
    (["--layer", "blocks.1.norm1", "--grid", "7", "7", "--aux-tokens", "2"], "T must be aux + H*W"),
    (["--layer", "blocks.1.norm1", "--aux-tokens", "9"], "T must be aux + H*W"),
    (["--layer", "patch_embed.proj", "--aux-tokens", "1"], "--aux-tokens applies to token layers"),
    (["--layer", "patch_embed.proj", "--grid", "5", "5"], "grid"),
    (["--layer", "head"], "Score-CAM needs maps"),
    (["--layer", "blocks.1.norm1", "--layout", "NHWC"], "layout NHWC needs a 4-D tensor"),
])
def test_bad_grids_and_layers_are_one_line(flags, message, tmp_path, capsys, in_tests_dir):
    out = tmp_path / "b"
    assert main(["transformer_models:deit", "--input-size", "112", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_overrides_that_fit_write_the_same_bundle(tmp_path, capsys, in_tests_dir):
    out = tmp_path / "b"
    assert main(["transformer_models:deit", "--input-size", "112", "--layer", "blocks.1.norm1", "--grid", "7", "7",
                 "--aux-tokens", "1", "--out", str(out)]) == 0
    assert "192 maps of 7x7, NLC, 1 aux" in capsys.readouterr().out
    meta = BundleMeta.from_props(read_props(onnx.load(str(out / "model.onnx"))))
    assert meta.layout == Layout("NLC", (7, 7), 1) and meta.layer == "blocks.1.norm1"


def test_a_layout_that_does_not_fit_the_features_is_one_line(transformer_bundle, tmp_path, capsys, samples_dir):
    """Metadata edited by hand (2 aux tokens on DeiT's 50 tokens): the explainer refuses in one line, exit 2."""
    import shutil
    from dataclasses import replace

    from runtime.contract import graph_sha256, write_metadata
    from runtime.explain import main as explain

    bundle = tmp_path / "b"
    shutil.copytree(transformer_bundle("deit"), bundle)
    graphs = {n: onnx.load(str(bundle / n)) for n in ("model.onnx", "features.onnx")}
    meta = replace(BundleMeta.from_props(read_props(graphs["model.onnx"])), layout=Layout("NLC", (7, 7), 2))
    write_metadata(graphs["model.onnx"], meta.with_role("classifier", graph_sha256(graphs["features.onnx"])))
    write_metadata(graphs["features.onnx"], meta.with_role("features", graph_sha256(graphs["model.onnx"])))
    for n, g in graphs.items():
        onnx.save(g, str(bundle / n))
    assert explain([str(bundle), str(samples_dir / "chelsea.png"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "T != aux + h*w" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
