"""The dataset batch job (``python -m runtime.batch``): both engines, maps equal to ``Explainer``, resuming
after a SIGKILL, nothing redone on a second run, settings checks, inputs.

Tiny ``onnx.helper`` bundles (tests/bundles.py) keep it fast; the Ray tests start a real local Ray
instance and, once, a real cluster with ``ray start --head`` on loopback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bundles import make_bundle
from conftest import RAY_TEST_TOKEN, ROOT, require_tool
from PIL import Image

from runtime import Explainer
from runtime.batch import job
from runtime.batch.cli import main
from runtime.batch.inputs import InputError, expand

pq = pytest.importorskip("pyarrow.parquet")

SUMMARY = re.compile(r"done (\d+), skipped (\d+) .*failed (\d+)")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("batch") / "tiny", size=32, channels=16)


def _dataset(root: Path, n: int = 6, seed: int = 0) -> tuple[list[Path], Path, Path]:
    """Images in nested folders, a corrupt PNG and a text file: (images, corrupt, non-image)."""
    rng = np.random.default_rng(seed)
    imgs = []
    for i in range(n):
        sub = root / ("a" if i % 2 else "a/b/c") / ("" if i % 3 else "deep")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (24 + i, 40 - i, 3), np.uint8)).save(p)
        imgs.append(p)
    corrupt = root / "a" / "broken.png"
    corrupt.write_bytes(imgs[1].read_bytes()[:60])  # a PNG cut short
    text = root / "a/b" / "notes.txt"
    text.write_text("not an image\n")
    (root / ".hidden.png").write_bytes(imgs[1].read_bytes())  # hidden files are left out
    return imgs, corrupt, text


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / job.RESULTS).to_pylist()


def _summary(text: str) -> tuple[int, int, int]:
    m = SUMMARY.search(text)
    assert m, text
    return tuple(int(v) for v in m.groups())


def _check_output(out: Path, bundle: Path, imgs: list[Path], corrupt: Path, text: Path, top_k: int) -> list[dict]:
    """Rows: top_k per image, one error row per bad file; maps equal ``Explainer.explain`` to 1e-6."""
    rows = _rows(out)
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source"], []).append(r)
    assert set(by_src) == {str(p.resolve()) for p in [*imgs, corrupt, text]}
    for bad, why in ((corrupt, "corrupt or truncated"), (text, "not an image")):
        (r,) = by_src[str(bad.resolve())]
        assert why in r["error"] and r["class_index"] is None and r["map"] is None
        assert r["sha256"] == job.file_sha256(bad)
    ex = Explainer(bundle, device="cpu")
    for p in imgs:
        got = sorted(by_src[str(p.resolve())], key=lambda r: -r["probability"])
        want = ex.explain(p, top_k=top_k)
        assert [r["class_index"] for r in got] == [w.class_index for w in want]
        w, h = Image.open(p).size
        for r, e in zip(got, want, strict=True):
            assert r["error"] is None and (r["width"], r["height"]) == (w, h)
            assert r["sha256"] == job.file_sha256(p) and r["label"] == e.label and r["preset"] == "paper"
            assert abs(r["probability"] - e.probability) < 1e-6 and r["channels_used"] == e.channels_used
            m = np.load(out / r["map"])
            assert m.dtype == np.float32 and m.shape == (32, 32)
            assert np.abs(m - e.saliency).max() <= 1e-6
    return rows


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / job.MAPS).rglob("*.npy")}


# ------------------------------------------------------------------------------------------ local


def test_local_engine_nested_folder_bad_files_and_resume(bundle, tmp_path, capsys):
    imgs, corrupt, text = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    assert main([str(bundle), str(tmp_path / "data"), "--out", str(out), "--top-k", "2", "--workers", "2",
                 "--overlays", "--no-progress"]) == 0
    assert _summary(capsys.readouterr().out) == (6, 0, 2)
    rows = _check_output(out, bundle, imgs, corrupt, text, top_k=2)
    assert all((out / r["overlay"]).is_file() for r in rows if r["error"] is None)
    run = json.loads((out / job.RUN_JSON).read_text())
    assert run["runs"][-1]["workers"] == 2 and run["versions"]["onnxruntime"]
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary file left behind

    # a second run with nothing new: no explanation work, no new part, no map rewritten
    parts, mtimes = job.part_files(out), _mtimes(out)
    assert main([str(bundle), str(tmp_path / "data"), "--out", str(out), "--top-k", "2", "--workers", "2",
                 "--overlays"]) == 0
    assert _summary(capsys.readouterr().out) == (0, 8, 0)
    assert job.part_files(out) == parts and _mtimes(out) == mtimes
    run = json.loads((out / job.RUN_JSON).read_text())
    assert run["runs"][-1]["todo"] == 0 and "workers" not in run["runs"][-1]  # no worker was even started

    # a new image and a changed one are explained; the rest are skipped; the changed one keeps one set of rows
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "data" / "new.png")
    Image.fromarray(np.full((30, 20, 3), 90, np.uint8)).save(imgs[0])
    assert main([str(bundle), str(tmp_path / "data"), "--out", str(out), "--top-k", "2", "--overlays"]) == 0
    assert _summary(capsys.readouterr().out) == (2, 7, 0)
    rows = _rows(out)
    assert sum(r["source"] == str(imgs[0].resolve()) for r in rows) == 2
    assert {r["height"] for r in rows if r["source"] == str(imgs[0].resolve())} == {30}


def test_changed_settings_are_refused_unless_force(bundle, tmp_path, capsys):
    imgs, _, _ = _dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    assert main([str(bundle), str(imgs[0]), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main([str(bundle), str(imgs[0]), "--out", str(out), "--preset", "gradcam"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "preset: 'paper' -> 'gradcam'" in err and "--force" in err
    assert err.count("\n") == 1
    assert main([str(bundle), str(imgs[0]), "--out", str(out), "--preset", "gradcam", "--force"]) == 0
    assert _summary(capsys.readouterr().out) == (1, 0, 0)
    assert {r["preset"] for r in _rows(out)} == {"gradcam"}


def test_select_mode_and_passes_are_recorded_and_maps_match(bundle, tmp_path, capsys):
    imgs, _, _ = _dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    assert main([str(bundle), str(imgs[0]), "--out", str(out), "--workers", "1", "--max-channels", "5",
                 "--select", "std"]) == 0
    (row,) = _rows(out)
    want = Explainer(bundle, device="cpu", max_channels=5, select="std").explain(imgs[0])[0]
    assert (row["select"], row["fill"], row["mode"], row["passes"]) == ("std", "kernel", "scorecam", want.passes)
    np.testing.assert_allclose(np.load(out / row["map"]), want.saliency, atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main([str(bundle), str(imgs[0]), "--out", str(out), "--max-channels", "5", "--select", "relevance"]) == 2
    assert "select: 'std' -> 'relevance'" in capsys.readouterr().err
    out2 = tmp_path / "preview"
    assert main([str(bundle), str(imgs[0]), "--out", str(out2), "--workers", "1", "--mode", "preview"]) == 0
    (row,) = _rows(out2)
    want = Explainer(bundle, device="cpu", mode="preview").explain(imgs[0])[0]
    assert (row["mode"], row["passes"]) == ("preview", 0)
    np.testing.assert_allclose(np.load(out2 / row["map"]), want.saliency, atol=1e-6, rtol=0)
    for mode in ("qrise", "qrise-check"):
        out3 = tmp_path / mode
        assert main([str(bundle), str(imgs[0]), "--out", str(out3), "--workers", "1", "--mode", mode]) == 0
        (row,) = _rows(out3)
        want = Explainer(bundle, device="cpu", mode=mode).explain(imgs[0])[0]
        assert (row["mode"], row["passes"]) == (mode, want.passes)
        np.testing.assert_allclose(np.load(out3 / row["map"]), want.saliency, atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["{data}/nothing-here"], "no such file, folder or manifest"),
    (["{data}/*.webp"], "the pattern matches no files"),
    (["{data}/a", "--target", "durian"], "unknown class label 'durian'"),
    (["{data}/a", "--engine", "local", "--address", "x:1"], "are for --engine ray"),
    (["{data}/a", "--top-k", "0"], "must be >= 1"),
])
def test_user_errors_are_one_line(bundle, tmp_path, capsys, argv, message):
    _dataset(tmp_path / "data", n=2)
    argv = [a.format(data=tmp_path / "data") for a in argv]
    assert main([str(bundle), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_model_and_missing_out(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path)]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_inputs_manifests_globs_and_targets(bundle, tmp_path, capsys):
    imgs, corrupt, _ = _dataset(tmp_path / "data", n=4)
    (tmp_path / "list.txt").write_text(f"# a comment\ndata/{imgs[0].relative_to(tmp_path / 'data')}\n\n"
                                       f"{imgs[1]}\ndata/missing.png\n")
    (tmp_path / "list.csv").write_text(f"label,path\nx,{imgs[2]}\ny,data/a\n")
    got = expand([str(tmp_path / "list.txt"), str(tmp_path / "list.csv"), str(tmp_path / "data/**/*.jpg")])
    want = [imgs[0], imgs[1], tmp_path / "data/missing.png", imgs[2], *sorted((tmp_path / "data/a").rglob("*"))]
    want = [str(p.resolve()) for p in want if p.is_file() or not p.exists()]
    want += [str(p.resolve()) for p in sorted((tmp_path / "data").rglob("*.jpg")) if str(p.resolve()) not in want]
    assert got[:4] == want[:4] and sorted(got) == sorted(set(want)) and len(got) == len(set(got))
    with pytest.raises(InputError):
        expand([str(tmp_path / "empty.txt")])
    out = tmp_path / "out"
    assert main([str(bundle), str(tmp_path / "list.txt"), "--out", str(out), "--target", "banana", "4",
                 "--workers", "1"]) == 0
    rows = _rows(out)
    assert {r["class_index"] for r in rows if not r["error"]} == {1, 4}
    (missing,) = [r for r in rows if r["error"]]
    assert "no such file" in missing["error"] and missing["sha256"] is None
    capsys.readouterr()
    # an unreadable file is tried again on the next run (it may exist by then); its old row is dropped
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data/missing.png")
    assert main([str(bundle), str(tmp_path / "list.txt"), "--out", str(out), "--target", "banana", "4"]) == 0
    assert _summary(capsys.readouterr().out) == (1, 2, 0)
    assert not [r for r in _rows(out) if r["error"]] and len(_rows(out)) == 6


def test_pyarrow_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(job.BatchError, match=r"needs pyarrow: pip install 'scorecam-onnx\[batch\]'"):
        job.pyarrow()


def test_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "runtime.batch", "--help"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 0 and "--engine {local,ray}" in r.stdout and "results.parquet" in r.stdout


def test_sigkill_midway_then_resume_recomputes_nothing_finished(tmp_path):
    """SIGKILL the job after some parts are written; the restart explains only what was not written."""
    slow = make_bundle(tmp_path / "slow", size=64, channels=128)  # ~0.1 s per image on one core
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for i in range(40):
        (data / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), np.uint8)).save(data / f"d{i % 3}" / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runtime.batch", str(slow), str(data), "--out", str(out), "--workers", "1",
           "--threads", "1", "--chunk", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(job.part_files(out)) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no parts written"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r["source"] for r in _rows(out)}
    mtimes = _mtimes(out)
    assert 4 <= len(before) < 40, "the job was not killed midway"

    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    done, skipped, failed = _summary(r.stdout)
    assert skipped == len(before) and done == 40 - len(before) and failed == 0
    rows = _rows(out)
    assert len(rows) == 40 and len({r["source"] for r in rows}) == 40  # one row per image: nothing twice
    assert all(_mtimes(out)[p] == t for p, t in mtimes.items())  # finished maps were not written again
    runs = json.loads((out / job.RUN_JSON).read_text())["runs"]
    assert [r["status"] for r in runs] == ["running", "finished"]  # the killed run never finished
    assert runs[1]["skipped"] == len(before) and runs[1]["done"] == 40 - len(before)


# --------------------------------------------------------------------------------------------- ray


def _need_ray():
    require_tool(importlib.util.find_spec("ray") is not None, "ray[data] (pip install 'scorecam-onnx[ray]')")


def test_ray_engine_local_instance(bundle, tmp_path, capsys, monkeypatch):
    """A local Ray instance (2 CPUs here): 2 actors of 0.5 CPU leave a slot for Ray Data's own tasks."""
    _need_ray()
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TEST_TOKEN)  # one per session: Ray keeps the first in the process
    imgs, corrupt, text = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = [str(bundle), str(tmp_path / "data"), "--out", str(out), "--top-k", "2", "--engine", "ray",
            "--workers", "2", "--no-progress"]
    assert main(args) == 0
    assert _summary(capsys.readouterr().out) == (6, 0, 2)
    _check_output(out, bundle, imgs, corrupt, text, top_k=2)
    run = json.loads((out / job.RUN_JSON).read_text())["runs"][-1]
    assert run["engine"] == "ray" and run["workers"] == 2 and run["address"] == "local"
    parts = job.part_files(out)
    assert main(args) == 0  # nothing new: Ray is not even started
    assert _summary(capsys.readouterr().out) == (0, 8, 0)
    assert job.part_files(out) == parts


def test_ray_engine_on_a_real_cluster_via_address(bundle, tmp_path):
    """``ray start --head`` on loopback (bench.batch.ray_head: its own temp dir and auth token; only its
    processes are stopped), then --address."""
    from bench.batch import ray_head

    _need_ray()
    require_tool((Path(sys.executable).parent / "ray").exists(), "the ray command line")
    imgs, corrupt, text = _dataset(tmp_path / "data", n=4)
    with ray_head(2) as (address, env):
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "runtime.batch", str(bundle), str(tmp_path / "data"), "--out", str(out),
               "--engine", "ray", "--address", address, "--workers", "2"]
        deadline = time.monotonic() + 90
        while True:  # the head needs a few seconds before it takes drivers
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if r.returncode == 0 or time.monotonic() > deadline or "cannot connect" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stderr
        assert _summary(r.stdout) == (4, 0, 2)
        _check_output(out, bundle, imgs, corrupt, text, top_k=1)
        run = json.loads((out / job.RUN_JSON).read_text())["runs"][-1]
        assert run["address"] == address and run["workers"] == 2


def test_one_job_per_folder_and_lost_maps_are_redone(bundle, tmp_path, capsys):
    imgs, _, _ = _dataset(tmp_path / "data", n=3)
    out = tmp_path / "out"
    job.lock(out)  # as another job would hold it
    try:
        assert main([str(bundle), str(tmp_path / "data/a"), "--out", str(out)]) == 2
        assert "another batch job is writing into" in capsys.readouterr().err
    finally:
        job.unlock(out)
    assert main([str(bundle), str(tmp_path / "data/a"), "--out", str(out), "--workers", "1"]) == 0
    first = _summary(capsys.readouterr().out)
    (out / next(r["map"] for r in _rows(out) if r["map"])).unlink()  # someone deletes a map
    lost = [r for r in _rows(out) if r["map"] and not (out / r["map"]).exists()]
    assert len(lost) == 1
    assert main([str(bundle), str(tmp_path / "data/a"), "--out", str(out), "--workers", "1"]) == 0
    assert _summary(capsys.readouterr().out) == (len(lost), first[0] + first[2] - len(lost), 0)
    assert all((out / r["map"]).is_file() for r in _rows(out) if r["map"])


def test_bench_batch_harness_runs(bundle, tmp_path):
    """``python -m bench.batch`` end to end on the tiny bundle, local engine only (no timing asserted)."""
    from bench.batch import main as bench_main

    assert bench_main(["--model", str(bundle), "--images", "4", "--configs", "local-1", "local-2",
                       "--modes", "exact", "--machine", "t", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "batch-t.json").read_text())
    assert set(res["runs"]["exact"]) == {"local-1", "local-2"}
    assert all(r["done"] == 4 and r["images_per_s"] > 0 for r in res["runs"]["exact"].values())
    assert "| local-2 (--workers 2 --threads 1) |" in (tmp_path / "batch-t.md").read_text()


def test_progress_bar_shows_rate_and_eta():
    import io

    from runtime.batch.progress import Progress, summary

    stream = io.StringIO()
    bar = Progress(10, stream, bar=True)
    bar.t0 -= 2.0  # as if two seconds had passed
    bar.update(4, 1)
    line = stream.getvalue()
    assert "4/10 images" in line and "img/s" in line and "ETA" in line and "failed 1" in line
    bar.finish()
    assert summary(3, 5, 1, 2.0, "DIR") == "done 3, skipped 5 (already in DIR), failed 1, time 2.0s, 1.50 images/s"


def test_a_part_cut_short_by_a_crash_is_removed_and_its_images_redone(bundle, tmp_path, capsys):
    imgs, _, _ = _dataset(tmp_path / "data", n=3)
    out = tmp_path / "out"
    assert main([str(bundle), *map(str, imgs), "--out", str(out), "--workers", "1", "--chunk", "1"]) == 0
    capsys.readouterr()
    part = job.part_files(out)[0]
    lost = set(pq.read_table(part).column("source").to_pylist())
    part.write_bytes(part.read_bytes()[:100])  # as a writer killed mid-file (e.g. a Ray write task) leaves it
    assert main([str(bundle), *map(str, imgs), "--out", str(out), "--workers", "1", "--chunk", "1"]) == 0
    captured = capsys.readouterr()
    assert f"removed the unreadable part {part.name}" in captured.err
    assert _summary(captured.out) == (len(lost), 3 - len(lost), 0)
    assert sorted(r["source"] for r in _rows(out)) == sorted(str(p.resolve()) for p in imgs)
