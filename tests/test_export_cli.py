"""``python -m exporter``: recipes, user modules (``module:callable``), --list-layers, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.__main__ import main
from exporter.errors import ExportError
from exporter.spec import read_labels
from runtime.contract import FEATURES_FILE, MODEL_FILE, REPORT_FILE, BundleMeta, read_props

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def _cli(*args: str, cwd: Path = TESTS_DIR) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def in_tests_dir(monkeypatch):
    """Run ``main()`` in-process as if started from tests/ (so ``user_models:...`` imports)."""
    monkeypatch.chdir(TESTS_DIR)
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def test_user_module_in_a_subprocess(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\nthree\nfour\n")
    out = tmp_path / "bundle"
    done = _cli("user_models:tiny", "--layer", "act2", "--out", str(out), "--input-size", "40", "48",
                "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--labels", str(labels))
    assert done.returncode == 0, done.stderr
    assert "verified against torch" in done.stdout and "act2" in done.stdout
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["verification"]["max_rel_error"] <= 1e-4
    assert report["features"]["shape"][1:] == [12, 20, 24]
    meta = BundleMeta.from_props(read_props(__import__("onnx").load(str(out / MODEL_FILE))))
    assert meta.labels == ("zero", "one", "two", "three", "four")
    assert meta.preprocessing.input_size == (40, 48) and meta.preprocessing.std == (0.25,) * 3
    assert meta.preprocessing.scale == pytest.approx(1 / 255)


def test_an_error_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    done = _cli("user_models:tiny", "--layer", "act9", "--out", str(tmp_path / "b"), "--input-size", "32")
    assert done.returncode == 2
    assert done.stderr.splitlines() in (["error: unknown layer 'act9': did you mean act1, act2?"],
                                        ["error: unknown layer 'act9': did you mean act2, act1?"])
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_recipe_needs_no_flags(tmp_path, capsys, toy_bundle):
    """The toy recipe brings layer, size, preprocessing and labels (its training is cached per process)."""
    out = tmp_path / "toy"
    assert main(["toy", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer features" in printed and "verified against torch" in printed and "top-1 chelsea.png" in printed
    for name in (MODEL_FILE, FEATURES_FILE):  # deterministic training: the same graphs as toy_bundle
        assert (out / name).read_bytes() == (toy_bundle / name).read_bytes()


def test_list_layers_of_a_recipe(capsys):
    assert main(["efficientnet_lite0", "--list-layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "deepest first" in lines[0]
    first = lines[2].split()
    assert first[:4] == ["*", "head_act", "1280x7x7", "1280"]
    assert any(line.split()[:2] == ["_bn1", "1280x7x7"] for line in lines)
    assert any("_blocks.1._swish" in line and "shared" in line for line in lines)
    assert not any(line.split()[0] in ("_fc", "_avg_pooling") for line in lines[2:])


def test_list_layers_of_a_user_module(capsys, in_tests_dir):
    assert main(["user_models:tiny", "--list-layers", "--input-size", "32"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["act2", "bn2", "conv2", "act1", "conv1"]
    assert rows[0][1:] == ["12x16x16", "12"]


def test_help_explains_spec_and_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("SPEC", "--layer", "--list-layers", "--input-size", "--labels", "--force", "--no-verify",
                 "package.module:callable", "efficientnet_lite0"):
        assert word in text


ERRORS = [
    (["nosuchrecipe", "--out", "B"], "unknown recipe 'nosuchrecipe'"),
    (["toyy", "--out", "B"], "did you mean toy?"),
    (["user_models:tiny", "--out", "B", "--input-size", "32"], "needs --layer NAME"),
    (["user_models:tiny", "--layer", "act", "--out", "B", "--input-size", "32"], "did you mean act"),
    (["user_models:tiny", "--layer", "fc", "--out", "B", "--input-size", "32"], "outputs a 2-D tensor"),
    (["user_models:SharedAct", "--layer", "act", "--out", "B", "--input-size", "16"], "runs 2 times"),
    (["no_such_module:build", "--layer", "x", "--out", "B"], "cannot import 'no_such_module'"),
    (["user_models:nothing", "--layer", "x", "--out", "B"], "has no attribute 'nothing'"),
    (["user_models:not_a_module", "--layer", "x", "--out", "B"], "returned a dict, not a torch.nn.Module"),
    (["user_models:broken", "--layer", "x", "--out", "B"], "RuntimeError: checkpoint missing"),
    (["user_models:Untraceable", "--layer", "act", "--out", "B", "--input-size", "16"],
     "torch could not export the model"),
    (["toy", "--out", "B", "--mean", "a", "b", "c"], "invalid float value: 'a'"),
    (["toy", "--out", "B", "--mean", "1", "2"], "expected 3 arguments"),
    (["toy", "--out", "B", "--std", "1", "0", "1"], "std must not contain 0"),
    (["toy", "--out", "B", "--scale", "0"], "scale must be a finite non-zero number"),
    (["toy", "--out", "B", "--input-size", "0"], "--input-size needs one or two positive integers"),
    (["toy", "--out", "B", "--input-size", "1", "2", "3"], "--input-size needs one or two positive integers"),
    (["toy", "--out", "B", "--opset", "12"], "opset must be between 18"),
    (["toy", "--out", "B", "--labels", "missing.txt"], "cannot read labels file"),
    (["toy", "--out", "B", "--bogus"], "unrecognized arguments: --bogus"),
    (["toy"], "--out DIR is required"),
    ([], "the following arguments are required: SPEC"),
]


@pytest.mark.parametrize(("argv", "expected"), ERRORS, ids=[" ".join(a)[:40] for a, _ in ERRORS])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, in_tests_dir, argv, expected):
    argv = [str(tmp_path / "B") if a == "B" else a for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_dir_needs_force(tmp_path, capsys, in_tests_dir):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["user_models:tiny", "--layer", "act2", "--out", str(out), "--input-size", "32"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {out} is not empty; use --force (force=True) to replace it"
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert main([*args, "--force", "--no-verify"]) == 0
    assert "not verified" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, FEATURES_FILE, REPORT_FILE])


def test_labels_file_mismatch_is_an_error(tmp_path, capsys, in_tests_dir):
    labels = tmp_path / "l.json"
    labels.write_text('["a", "b"]')
    argv = ["user_models:tiny", "--layer", "act2", "--out", str(tmp_path / "b"), "--labels", str(labels),
            "--input-size", "32"]
    assert main(argv) == 2
    assert "got 2 labels for a model with 5 outputs" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["l.json"]


def test_read_labels_text_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n dog \n\nbird\n")
    (tmp_path / "b.json").write_text('["cat", "dog", "bird"]')
    (tmp_path / "c.json").write_text("[not json")
    assert read_labels(tmp_path / "a.txt") == ["cat", "dog", "bird"]
    assert read_labels(tmp_path / "b.json") == ["cat", "dog", "bird"]
    with pytest.raises(ExportError, match="not valid JSON"):
        read_labels(tmp_path / "c.json")


def test_extras_int8_and_randomisation_cascade(tmp_path, capsys, in_tests_dir, samples_dir):
    base = ["user_models:tiny", "--layer", "act2", "--input-size", "32", "--no-verify"]
    assert main([*base, "--out", str(tmp_path / "q"), "--int8", str(samples_dir)]) == 0
    assert (tmp_path / "q" / "model.int8.onnx").is_file()
    assert main([*base, "--out", str(tmp_path / "c"), "--randomize", "cascade"]) == 0
    steps = json.loads((tmp_path / "c" / "cascade.json").read_text())["steps"]
    assert [s["layer"] for s in steps] == ["fc", "bn2", "conv2", "conv1"]
    assert all((tmp_path / "c" / s["bundle"] / MODEL_FILE).is_file() for s in steps)
    assert main([*base, "--out", str(tmp_path / "z"), "--int8", str(tmp_path / "none")]) == 2
    assert "error: --int8" in capsys.readouterr().err and not (tmp_path / "z").exists()
