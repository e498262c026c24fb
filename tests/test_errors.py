"""CLI failures: one ``error: ...`` line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import bomb_png, make_bundle, photo
from onnx import numpy_helper
from PIL import Image

import runtime.explain as cli
from runtime import EngineError
from runtime.explain import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    good = make_bundle(d / "good")
    other = make_bundle(d / "other", seed=1)
    out = {"good": good}

    swapped = d / "swapped"  # features.onnx from another export
    shutil.copytree(good, swapped)
    shutil.copy(other / "features.onnx", swapped / "features.onnx")
    out["swapped"] = swapped

    edited = d / "edited"  # one weight of the feature graph changed and the file re-saved
    shutil.copytree(good, edited)
    f = onnx.load(str(edited / "features.onnx"))
    w = f.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    onnx.save(f, str(edited / "features.onnx"))
    out["edited"] = edited

    nofeat = d / "nofeat"
    nofeat.mkdir()
    shutil.copy(good / "model.onnx", nofeat / "model.onnx")
    out["nofeat"] = nofeat

    text = d / "text"
    shutil.copytree(good, text)
    (text / "model.onnx").write_text("this is not an ONNX model\n")
    out["text"] = text

    noise = d / "noise"
    shutil.copytree(good, noise)
    (noise / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    out["noise"] = noise
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    good = d / "good.png"
    Image.fromarray(photo(40, 60)).save(good)
    jpg = d / "photo.jpg"
    Image.fromarray(photo(64, 64)).save(jpg, quality=95)
    trunc = d / "trunc.jpg"
    trunc.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    text = d / "notes.jpg"
    text.write_text("shopping list: eggs, milk\n")
    empty = d / "empty.png"
    empty.write_bytes(b"")
    bomb = bomb_png(d / "bomb.png")
    other_dir = d / "elsewhere"
    other_dir.mkdir()
    clash = other_dir / "good.jpg"  # same stem as good.png
    Image.fromarray(photo(10, 10)).save(clash)
    return {"good": good, "jpg": jpg, "trunc": trunc, "text": text, "empty": empty, "bomb": bomb,
            "missing": d / "missing.png", "dir": other_dir, "clash": clash}


@pytest.fixture
def out(tmp_path) -> Path:
    """An output dir that already holds a file; an error must leave it exactly so."""
    o = tmp_path / "out"
    o.mkdir()
    (o / "keep.txt").write_text("mine")
    return o


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def check_error(argv, capsys, out: Path, *needles: str) -> str:
    before = listing(out)
    code = main([str(a) for a in argv] + ["--out", str(out)])
    cap = capsys.readouterr()
    assert code == 2, cap.err
    lines = cap.err.splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in cap.err
    assert cap.out == ""
    assert listing(out) == before
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


# -------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("name,needles", [
    ("text", ("notes.jpg", "not an image")),
    ("empty", ("empty.png", "not an image")),
    ("trunc", ("trunc.jpg", "truncated")),
    ("missing", ("missing.png", "no such file")),
    ("dir", ("elsewhere", "directory")),
    ("bomb", ("bomb.png", "decompression bomb")),
])
def test_bad_image(bundles, files, out, capsys, name, needles):
    check_error([bundles["good"], files[name]], capsys, out, *needles)


def test_bad_image_after_good_ones_writes_nothing(bundles, files, out, capsys):
    check_error([bundles["good"], files["good"], files["jpg"], files["trunc"]], capsys, out, "trunc.jpg")


def test_image_over_pixel_limit(bundles, files, out, capsys):
    check_error([bundles["good"], files["good"], "--max-pixels", "1000"], capsys, out,
                "good.png", "over the limit of 1,000")


def test_output_names_would_clash(bundles, files, out, capsys):
    check_error([bundles["good"], files["good"], files["clash"]], capsys, out, "good.<class>.png")


# --------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("name,needles", [
    ("text", ("not a valid onnx model",)),
    ("noise", ("not a valid onnx model",)),
    ("nofeat", ("features.onnx is missing",)),
    ("swapped", ("same export",)),
    ("edited", ("same export",)),
])
def test_bad_bundle(bundles, files, out, capsys, name, needles):
    check_error([bundles[name], files["good"]], capsys, out, *needles)


def test_feature_graph_passed_as_model(bundles, files, out, capsys):
    check_error([bundles["good"] / "features.onnx", files["good"]], capsys, out, "model.onnx")


def test_model_not_found(files, out, capsys, tmp_path):
    check_error([tmp_path / "no_such_bundle", files["good"]], capsys, out, "model not found")
    check_error(["no_such_model_name", files["good"]], capsys, out, "no_such_model_name")


# ------------------------------------------------------------------------------------------- targets


def test_target_out_of_range(bundles, files, out, capsys):
    check_error([bundles["good"], files["good"], "--target", "5"], capsys, out, "out of range", "5 classes")
    check_error([bundles["good"], files["good"], "--target", "-1"], capsys, out, "out of range")


def test_unknown_label_suggests_close_ones(bundles, files, out, capsys):
    line = check_error([bundles["good"], files["good"], "--target", "bananna"], capsys, out, "unknown class label")
    assert "did you mean 'banana'" in line
    check_error([bundles["good"], files["good"], "--target", "0", "zzzz"], capsys, out, "'zzzz'")


def test_no_labels_in_model(tmp_path, files, out, capsys):
    b = make_bundle(tmp_path / "nolabels", labels=None)
    check_error([b, files["good"], "--target", "cat"], capsys, out, "no class labels")


# -------------------------------------------------------------------------------------- device, flags


def test_impossible_device(bundles, files, out, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    check_error([bundles["good"], files["good"], "--device", "cuda"], capsys, out, "cuda", "not available")


@pytest.mark.parametrize("flags,needles", [
    (["--top-k", "0"], ("--top-k", ">= 1")),
    (["--top-k", "two"], ("--top-k", "whole number")),
    (["--batch-size", "0"], ("--batch-size", ">= 1")),
    (["--batch-size", "-4"], ("--batch-size",)),
    (["--alpha", "2"], ("--alpha", "[0, 1]")),
    (["--alpha", "-0.1"], ("--alpha",)),
    (["--alpha", "nan"], ("--alpha",)),
    (["--alpha", "much"], ("--alpha",)),
    (["--max-pixels", "0"], ("--max-pixels",)),
    (["--device", "tpu"], ("--device", "invalid choice")),
    (["--preset", "best"], ("--preset", "invalid choice")),
    (["--frobnicate"], ("unrecognized arguments",)),
])
def test_bad_flag_values(bundles, files, out, capsys, flags, needles):
    check_error([bundles["good"], files["good"], *flags], capsys, out, *needles)


def test_missing_arguments(out, capsys):
    code = main([])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_out_is_a_file(bundles, files, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    code = main([str(bundles["good"]), str(files["good"]), "--out", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "not a directory" in err and f.read_text() == "x"


def test_new_out_dir_not_created_on_error(bundles, files, tmp_path, capsys):
    new = tmp_path / "a" / "b"
    check_error([bundles["good"], files["text"]], capsys, new, "not an image")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------- failures once writing began


def _fail_on_call(monkeypatch, n: int, exc: BaseException):
    real = cli.Explainer.explain
    calls = {"n": 0}

    def explain(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(self, *a, **k)

    monkeypatch.setattr(cli.Explainer, "explain", explain)


def test_midway_engine_error_rolls_back(bundles, files, out, capsys, monkeypatch):
    _fail_on_call(monkeypatch, 2, EngineError("the device ran out of memory"))
    check_error([bundles["good"], files["good"], files["jpg"], "-k", "2"], capsys, out, "out of memory")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_midway_error_removes_a_new_out_dir(bundles, files, tmp_path, capsys, monkeypatch):
    _fail_on_call(monkeypatch, 2, EngineError("boom"))
    check_error([bundles["good"], files["good"], files["jpg"]], capsys, tmp_path / "new" / "dir", "boom")
    assert not (tmp_path / "new").exists()


def test_interrupt_rolls_back(bundles, files, out, capsys, monkeypatch):
    _fail_on_call(monkeypatch, 2, KeyboardInterrupt())
    before = listing(out)
    code = main([str(bundles["good"]), str(files["good"]), str(files["jpg"]), "--out", str(out)])
    assert code == 130 and listing(out) == before
    assert capsys.readouterr().err.startswith("error: interrupted")


def test_internal_error_keeps_traceback_but_rolls_back(bundles, files, out, monkeypatch):
    _fail_on_call(monkeypatch, 2, RuntimeError("a bug"))
    before = listing(out)
    with pytest.raises(RuntimeError, match="a bug"):
        main([str(bundles["good"]), str(files["good"]), str(files["jpg"]), "--out", str(out)])
    assert listing(out) == before


def test_failure_while_renaming_rolls_back(bundles, files, out, capsys, monkeypatch):
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(cli.os, "replace", replace)
    check_error([bundles["good"], files["good"], files["jpg"]], capsys, out, "no space left")
    assert calls["n"] == 3


# ------------------------------------------------------------------------------ the real interpreter


@pytest.mark.parametrize("args", [
    lambda b, f: [b["good"], f["text"]],
    lambda b, f: [b["swapped"], f["good"]],
    lambda b, f: [b["good"], f["good"], "--top-k", "0"],
    lambda b, f: [b["good"], f["good"], "--device", "cuda"],
])
def test_subprocess_exit_status_and_no_traceback(bundles, files, tmp_path, args):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "runtime.explain", *map(str, args(bundles, files)), "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if "--device" in argv and "error: " not in proc.stderr:
        pytest.skip("CUDA is available here")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_ambiguous_synonym_and_word_suggestions(tmp_path, files, out, capsys):
    b = make_bundle(tmp_path / "syn", labels=("tabby, tabby cat", "tiger cat", "bullfrog, Rana catesbeiana",
                                              "kit fox, fox", "grey fox, fox"))
    line = check_error([b, files["good"], "--target", "fox"], capsys, out, "ambiguous class label 'fox'")
    assert "'kit fox, fox' (3)" in line and "'grey fox, fox' (4)" in line
    line = check_error([b, files["good"], "--target", "cat"], capsys, out, "unknown class label 'cat'")
    assert "'tabby, tabby cat' (0)" in line and "'tiger cat' (1)" in line and "bullfrog" not in line
