"""``python -m runtime.explain`` end to end on a tiny bundle (built with onnx.helper, see bundles.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundles import LABELS, make_bundle, photo
from PIL import Image

from runtime.explain import main

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32  # the tiny bundle's input size


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pics")
    out = {"wide": d / "wide.png", "tall": d / "tall.jpg", "rot": d / "rotated.jpg"}
    Image.fromarray(photo(48, 80)).save(out["wide"])
    Image.fromarray(photo(70, 30, seed=1)).save(out["tall"], quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 wide x 20 tall, displayed 20 wide x 60 tall
    Image.fromarray(photo(20, 60, seed=2)).save(out["rot"], exif=exif)
    return out


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_one_image_writes_overlay_and_map(bundle, pics, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run([bundle, pics["wide"], "--out", out, "--device", "cpu"], capsys)
    assert code == 0, stderr
    assert stderr == ""  # no progress bar when stderr is not a terminal
    lines = stdout.splitlines()
    assert len(lines) == 1
    pngs, npys = sorted(out.glob("*.png")), sorted(out.glob("*.npy"))
    assert len(pngs) == 1 and len(npys) == 1
    c = int(pngs[0].name.split(".")[1])
    assert pngs[0].name == f"wide.{c}.png" and npys[0].name == f"wide.{c}.npy"
    assert Image.open(pngs[0]).size == Image.open(pics["wide"]).size == (80, 48)
    sal = np.load(npys[0])
    assert sal.dtype == np.float32 and sal.shape == (SIZE, SIZE)
    assert sal.min() >= 0 and sal.max() <= 1 and np.isfinite(sal).all()
    line = lines[0]
    assert str(pics["wide"]) in line and f"class {c}" in line and LABELS[c] in line
    assert "p=" in line and "CPUExecutionProvider" in line and str(pngs[0]) in line
    assert not list(out.glob(".*"))  # no temporary files left


def test_multiple_images_top_k_and_sizes(bundle, pics, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, _ = run([bundle, pics["wide"], pics["tall"], pics["rot"], "--top-k", "3", "--out", out], capsys)
    assert code == 0
    assert len(stdout.splitlines()) == 9
    for name, img, size in (("wide", pics["wide"], (80, 48)), ("tall", pics["tall"], (30, 70)),
                            ("rotated", pics["rot"], (20, 60))):  # EXIF rotation applied
        pngs = sorted(out.glob(f"{name}.*.png"))
        assert len(pngs) == 3, name
        assert len(list(out.glob(f"{name}.*.npy"))) == 3
        assert all(Image.open(p).size == size for p in pngs), img
    assert len(list(out.iterdir())) == 18


def test_top_k_beyond_class_count_is_clamped(bundle, pics, tmp_path, capsys):
    code, stdout, _ = run([bundle, pics["wide"], "-k", "50", "--out", tmp_path], capsys)
    assert code == 0 and len(stdout.splitlines()) == len(LABELS)


def test_targets_by_index_and_label(bundle, pics, tmp_path, capsys):
    code, stdout, _ = run([bundle, pics["wide"], "--target", "1", "cherry", "ELDERBERRY", "--out", tmp_path,
                           "--json"], capsys)
    assert code == 0
    recs = [json.loads(s) for s in stdout.splitlines()]
    assert [r["class_index"] for r in recs] == [1, 2, 4]
    assert [r["label"] for r in recs] == ["banana", "cherry", "elderberry"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["wide.1.png", "wide.2.png", "wide.4.png"]
    # --target given twice extends the list; a repeated class is explained once
    code, stdout, _ = run([bundle, pics["wide"], "-t", "0", "-t", "apple", "-t", "3", "--out", tmp_path, "--json"],
                          capsys)
    assert code == 0 and [json.loads(s)["class_index"] for s in stdout.splitlines()] == [0, 3]


def test_json_lines(bundle, pics, tmp_path, capsys):
    code, stdout, _ = run([bundle, pics["wide"], pics["tall"], "--json", "--top-k", "2", "--out", tmp_path], capsys)
    assert code == 0
    recs = [json.loads(s) for s in stdout.splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert set(r) >= {"image", "outputs", "class_index", "label", "score", "probability", "channels_used",
                          "channels_skipped", "seconds", "provider", "preset", "image_shape"}
        assert Path(r["outputs"]["overlay"]).is_file() and Path(r["outputs"]["saliency"]).is_file()
        assert r["outputs"]["overlay"].endswith(f".{r['class_index']}.png")
        assert 0 <= r["probability"] <= 1 and r["provider"] == "CPUExecutionProvider" and r["preset"] == "paper"
        assert 0 < r["channels_used"] <= 16 and 0 <= r["channels_skipped"] <= 16
    assert [r["image"] for r in recs] == [str(pics["wide"])] * 2 + [str(pics["tall"])] * 2
    assert recs[0]["image_shape"] == [48, 80] and recs[2]["image_shape"] == [70, 30]
    assert recs[0]["probability"] >= recs[1]["probability"]


def test_model_given_as_onnx_file_or_store_name(bundle, pics, tmp_path, capsys, monkeypatch):
    code, _, err = run([bundle / "model.onnx", pics["wide"], "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    monkeypatch.setenv("SCORECAM_MODELS", str(bundle.parent))
    code, _, err = run([bundle.name, pics["wide"], "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "b").glob("*.npy"))) == 1


def test_default_out_dir_is_cwd_out(bundle, pics, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run([bundle, pics["wide"]], capsys)
    assert code == 0
    assert len(list((tmp_path / "out").glob("wide.*.png"))) == 1


def test_alpha_zero_overlay_is_the_image(bundle, pics, tmp_path, capsys):
    code, _, _ = run([bundle, pics["wide"], "--alpha", "0", "--out", tmp_path], capsys)
    assert code == 0
    png = next(tmp_path.glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(Image.open(pics["wide"])))
    code, _, _ = run([bundle, pics["wide"], "--alpha", "1", "--out", tmp_path], capsys)
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(pics["wide"])))


@pytest.mark.parametrize("preset", ["paper", "gradcam", "torchcam", "official"])
def test_presets_and_batch_size(bundle, pics, tmp_path, capsys, preset):
    code, stdout, err = run([bundle, pics["tall"], "--preset", preset, "--batch-size", "3", "--json",
                             "--out", tmp_path], capsys)
    assert code == 0, err
    rec = json.loads(stdout)
    assert rec["preset"] == preset
    sal = np.load(rec["outputs"]["saliency"])
    assert sal.shape == (SIZE, SIZE) and 0 <= sal.min() and sal.max() <= 1


def test_progress_bar_forced(bundle, pics, tmp_path, capsys):
    code, stdout, stderr = run([bundle, pics["wide"], pics["tall"], "--progress", "--batch-size", "4",
                                "--out", tmp_path], capsys)
    assert code == 0
    assert "[1/2] wide.png" in stderr and "[2/2] tall.jpg" in stderr and "16/16" in stderr and "#" in stderr
    assert "[" not in stdout.split(":")[0]  # the bar stays off stdout
    code, _, stderr = run([bundle, pics["wide"], "--no-progress", "--out", tmp_path], capsys)
    assert stderr == ""


def test_outputs_replace_existing_files(bundle, pics, tmp_path, capsys):
    run([bundle, pics["wide"], "--target", "2", "--out", tmp_path], capsys)
    target = tmp_path / "wide.2.npy"
    target.write_bytes(b"old")
    code, _, _ = run([bundle, pics["wide"], "--target", "2", "--out", tmp_path], capsys)
    assert code == 0 and np.load(target).shape == (SIZE, SIZE)
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_same_file_twice_is_explained_once(bundle, pics, tmp_path, capsys):
    again = pics["wide"].parent / "." / pics["wide"].name
    code, stdout, _ = run([bundle, pics["wide"], again, "--out", tmp_path], capsys)
    assert code == 0 and len(stdout.splitlines()) == 1


def test_help(capsys):
    code = main(["--help"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in ("--target", "--top-k", "--out", "--device", "--batch-size", "--preset", "--alpha", "--json",
                   "--max-pixels", "class index", "examples:", "<stem>.<class>.png"):
        assert needle in out


def test_module_entry_point_subprocess(bundle, pics, tmp_path):
    """The real ``python -m runtime.explain`` (exit status, stdout) in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "runtime.explain", str(bundle), str(pics["tall"]), "--out",
                           str(tmp_path), "-k", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 2
    assert len(list(tmp_path.glob("tall.*.png"))) == 2


def test_target_by_synonym(pics, tmp_path, capsys):
    """ImageNet-style labels list synonyms: 'tabby' and 'Tabby Cat' name 'tabby, tabby cat'."""
    b = make_bundle(tmp_path / "syn", labels=("tabby, tabby cat", "tiger cat", "crane", "crane", "banana"))
    code, stdout, err = run([b, pics["wide"], "-t", "tabby", "Tabby Cat", "crane", "--json", "--out", tmp_path],
                            capsys)
    assert code == 0, err
    assert [json.loads(s)["class_index"] for s in stdout.splitlines()] == [0, 2]
