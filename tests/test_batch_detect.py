"""The batch job with an object detector (``python -m runtime.batch``): one row per box, maps equal to
``DetectionExplainer``, error rows for unusable images, resuming; the local engine and a real local Ray instance."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from bundles import make_bundle
from conftest import RAY_TEST_TOKEN, require_tool
from PIL import Image

from runtime.batch import job
from runtime.batch.cli import main
from runtime.detect import DetectionExplainer

pq = pytest.importorskip("pyarrow.parquet")

SUMMARY = re.compile(r"done (\d+), skipped (\d+) .*failed (\d+)")


def _summary(text: str) -> tuple[int, int, int]:
    m = SUMMARY.search(text)
    assert m, text
    return tuple(int(v) for v in m.groups())


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / job.RESULTS).to_pylist()


@pytest.fixture
def dataset(tmp_path, toy_scenes) -> tuple[Path, list[Path], Path, Path]:
    """Five scenes in nested folders, a blank image (no detection) and a text file."""
    images, _ = toy_scenes
    root = tmp_path / "data"
    paths = []
    for i in range(5):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(sub / f"scene{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    blank = root / "a" / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(blank)
    text = root / "notes.txt"
    text.write_text("not an image\n")
    return root, paths, blank, text


def _check(out: Path, model: Path, paths: list[Path], blank: Path, text: Path, top_k: int) -> list[dict]:
    rows = _rows(out)
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source"], []).append(r)
    assert set(by_src) == {str(p.resolve()) for p in [*paths, blank, text]}
    (r,) = by_src[str(text.resolve())]
    assert "not an image" in r["error"] and r["map"] is None
    (r,) = by_src[str(blank.resolve())]
    assert "finds nothing" in r["error"] and r["task"] == "detect" and r["detection"] is None
    ex = DetectionExplainer(model, device="cpu")
    for p in paths:
        got = sorted(by_src[str(p.resolve())], key=lambda r: r["detection"])
        want = ex.explain(p, top_k=top_k)
        assert [r["detection"] for r in got] == [w.detection for w in want] == list(range(len(want)))
        for r, w in zip(got, want, strict=True):
            assert r["error"] is None and r["task"] == "detect" and (r["width"], r["height"]) == (64, 64)
            assert (r["class_index"], r["label"]) == (w.class_index, w.label)
            assert [r["box_x1"], r["box_y1"], r["box_x2"], r["box_y2"]] == pytest.approx(w.box, abs=1e-4)
            assert r["score"] == pytest.approx(w.score, abs=1e-6) and r["similarity"] == pytest.approx(w.similarity)
            assert r["passes"] == w.passes and r["flat"] is False and r["map"].endswith(f".det{w.detection}.npy")
            m = np.load(out / r["map"])
            assert m.dtype == np.float32 and m.shape == (64, 64)
            np.testing.assert_allclose(m, w.saliency_cropped(), atol=1e-6, rtol=0)
    return rows


def test_local_engine_one_row_per_box_and_resume(toy_detector, dataset, tmp_path, capsys):
    root, paths, blank, text = dataset
    out = tmp_path / "out"
    args = [str(toy_detector), str(root), "--out", str(out), "--top-k", "2", "--workers", "2", "--overlays",
            "--no-progress"]
    assert main(args) == 0
    assert _summary(capsys.readouterr().out) == (5, 0, 2)
    rows = _check(out, toy_detector, paths, blank, text, top_k=2)
    for r in rows:
        if r["overlay"]:
            assert Image.open(out / r["overlay"]).size == (64, 64)
    run = json.loads((out / job.RUN_JSON).read_text())
    assert run["settings"]["task"] == "detect" and run["settings"]["detector"]["score_threshold"] == 0.25
    parts = job.part_files(out)
    assert main(args) == 0  # nothing new: nothing explained again
    assert _summary(capsys.readouterr().out) == (0, 7, 0)
    assert job.part_files(out) == parts
    # other settings (a given box) are refused without --force
    assert main([*args, "--box", "2", "2", "30", "30", "--target", "ring"]) == 2
    assert "--force" in capsys.readouterr().err


def test_a_given_box_for_every_image(toy_detector, dataset, tmp_path, capsys):
    root, paths, blank, _ = dataset
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(root / "small.png")  # the box does not fit it
    out = tmp_path / "out"
    assert main([str(toy_detector), *map(str, [*paths[:2], blank, root / "small.png"]), "--out", str(out),
                 "--box", "4", "4", "40", "40", "--target", "ring", "--workers", "1", "--max-channels", "8",
                 "--fill", "kernel"]) == 0
    assert _summary(capsys.readouterr().out) == (3, 0, 1)
    rows = {Path(r["source"]).name: r for r in _rows(out)}
    assert "outside the image" in rows["small.png"]["error"]
    ex = DetectionExplainer(toy_detector, device="cpu", max_channels=8, fill="kernel")
    for p in [*paths[:2], blank]:
        r = rows[p.name]
        [w] = ex.explain(p, box=[4, 4, 40, 40], target="ring")
        assert r["detection"] is None and r["class_index"] == 1 and r["map"].endswith(".box.npy")
        assert [r["box_x1"], r["box_y1"], r["box_x2"], r["box_y2"]] == [4, 4, 40, 40]
        np.testing.assert_allclose(np.load(out / r["map"]), w.saliency_cropped(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["--box", "1", "1", "9", "9"], "--box needs its class"),
    (["--box", "1", "1", "9", "9", "--target", "ring", "--detection", "0"], "not both"),
    (["--target", "ring"], "--target names the class of a --box"),
    (["--box", "1", "1", "9", "9", "--target", "hexagon"], "unknown class label 'hexagon'"),
    (["--mode", "preview"], "--mode scorecam"),
    (["--detection", "-1"], "ranks start at 0"),
])
def test_detector_user_errors_are_one_line(toy_detector, dataset, tmp_path, capsys, argv, message):
    root = dataset[0]
    assert main([str(toy_detector), str(root), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_box_on_a_classifier_is_refused(tmp_path, dataset, capsys):
    bundle = make_bundle(tmp_path / "tiny", size=32, channels=8)
    assert main([str(bundle), str(dataset[0]), "--out", str(tmp_path / "out"), "--box", "1", "1", "9", "9",
                 "--target", "0"]) == 2
    assert "apply to object detectors" in capsys.readouterr().err


def test_ray_engine_one_row_per_box(toy_detector, dataset, tmp_path, capsys, monkeypatch):
    require_tool(importlib.util.find_spec("ray") is not None, "ray[data] (pip install 'scorecam-onnx[ray]')")
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TEST_TOKEN)  # one per session: Ray keeps the first in the process
    root, paths, blank, text = dataset
    out = tmp_path / "out"
    args = [str(toy_detector), str(root), "--out", str(out), "--top-k", "2", "--engine", "ray", "--workers", "2",
            "--no-progress"]
    assert main(args) == 0
    assert _summary(capsys.readouterr().out) == (5, 0, 2)
    _check(out, toy_detector, paths, blank, text, top_k=2)
    assert json.loads((out / job.RUN_JSON).read_text())["runs"][-1]["engine"] == "ray"
    assert main(args) == 0  # resumed: nothing to do, Ray is not even started
    assert _summary(capsys.readouterr().out) == (0, 7, 0)
