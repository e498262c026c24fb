"""The benchmark harness (``python -m bench``) end to end on the toy model, and its pieces.

No timing is asserted: only that the harness runs, measures what it says and writes valid files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from bench import report  # noqa: E402
from bench.__main__ import machine_slug, main  # noqa: E402
from bench.contenders import fast_options, kind, known, peer_method  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, cache = tmp / "results", tmp / "cache"
    argv = ["--models", "toy", "--sizes", "32", "--quick", "--twin-k", "4", "--machine", "test-box",
            "--out", str(out), "--cache", str(cache), "--check-targets"]
    assert main(argv) == 0
    return out, cache


def test_quick_run_writes_json_and_markdown(quick_run, capsys):
    out, cache = quick_run
    res = json.loads((out / "test-box.json").read_text())
    assert res["machine"] == "test-box" and res["settings"]["runs"] == 3
    assert {"numpy", "onnxruntime", "python"} <= set(res["versions"])
    (job,) = res["jobs"]
    assert (job["model"], job["size"], job["channels"]) == ("toy", 32, 16)
    assert {"floor", "paper", "top5", "torch", "int8"} <= set(job["contenders"])
    for c in job["contenders"].values():
        if c.get("rss_only"):
            continue
        assert len(c["runs_s"]) == 3 and c["median_s"] == pytest.approx(float(np.median(c["runs_s"])), abs=1e-4)
    assert job["contenders"]["paper"]["peak_rss_mb"] > 0
    assert job["twin"]["channels"] == 4 and job["twin"]["peak_rss_mb"] > 0
    assert not job["twin"]["torch_imported"] and not job["contenders"]["paper"]["torch_imported"]
    assert set(job["fidelity"]) == {c for c in job["contenders"] if job["contenders"][c].get("fast")}
    outside = res["settings"]["outside_photos"]
    assert len(outside) >= 4 and not set(outside) & set(report.PHOTOS)  # photos of installed packages
    for per_photo in job["fidelity"].values():
        assert set(per_photo) == set(report.PHOTOS)
        assert all(-1.0 <= r <= 1.0 for r in per_photo.values())
    assert set(job["fidelity_extra"]) == {c for c in job["fidelity"] if job["contenders"][c].get("kind") != "peer"}
    for per_photo in job["fidelity_extra"].values():
        assert set(per_photo) == set(outside) and all(-1.0 <= r <= 1.0 for r in per_photo.values())
    assert {"x_floor:paper", "torch_over:paper", "top5/paper"} <= set(job["ratios"])
    assert len(res["targets"]) == 13  # 6 of issue 4, 3 of issue 14, 4 of issue 15
    assert {t["status"] for t in res["targets"]} <= {"PASS", "MISS", "n/a"}
    md = (out / "test-box.md").read_text()
    assert "## toy at 32x32 (K = 16)" in md and "## Targets" in md
    assert "| floor |" in md and "| paper |" in md
    assert (cache / "toy-32" / "model.int8.onnx").is_file()


def test_report_rerenders_existing_results(quick_run, tmp_path, capsys):
    out, _ = quick_run
    assert main(["--report", str(out / "test-box.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "test-box.md").read_text() == (out / "test-box.md").read_text()
    assert "targets:" in capsys.readouterr().out


def test_torch_reference_computes_the_same_map_as_ours(quick_run):
    import torch

    from bench.bundles import load_torch
    from bench.contenders import torch_scorecam
    from runtime import Explainer, images

    _, cache = quick_run
    bundle = cache / "toy-32"
    net, layer = load_torch("toy", bundle)
    ex = Explainer(bundle, device="cpu")
    img = images.load_image(report_photo())
    ours = ex.explain(img)[0]
    x = torch.from_numpy(images.preprocess(img, ex.pre))
    ref = torch_scorecam(net, dict(net.named_modules())[layer], x, class_idx=ours.class_index)
    np.testing.assert_allclose(ref, ours.saliency, atol=1e-3)


def report_photo():
    from bench.bundles import sample_photos

    return sample_photos()[0]


def test_machine_slug():
    assert machine_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 2) == "intel-xeon-platinum-8481c-2c"
    assert machine_slug("AMD EPYC 7B13 64-Core Processor", 16) == "amd-epyc-7b13-16c"
    assert machine_slug("", 4, "cuda") == "cpu-4c-cuda"


def test_contender_names():
    # a cap without a fill token is Faster Score-CAM, asked explicitly (the Explainer's default is the kernel fill)
    assert fast_options("int8+mc128") == {"precision": "int8", "max_channels": 128, "fill": "zero"}
    assert fast_options("mc64") == {"max_channels": 64, "fill": "zero"}
    assert fast_options("mc16+kern") == {"max_channels": 16, "fill": "kernel"}
    assert fast_options("paper") is None and fast_options("mcx") is None
    assert fast_options("mc32+std") == {"max_channels": 32, "select": "std", "fill": "zero"}
    assert fast_options("int8+mc16+rel") == {"precision": "int8", "max_channels": 16, "select": "relevance",
                                             "fill": "zero"}
    assert fast_options("preview") == {"mode": "preview"} and fast_options("std") is None
    assert peer_method("reciprocam") == "reciprocam" and peer_method("rise") == "rise:n=2000"
    assert peer_method("rise500") == "rise:n=500" and peer_method("mc32") is None
    assert [kind(n) for n in ("paper", "mc32", "preview", "rise")] == ["exact", "fast", "preview", "peer"]
    assert all(known(n) for n in ("floor", "paper", "official", "top5", "torch", "fp16+mc32", "pass1", "preview",
                                  "reciprocam", "rise100"))
    assert not known("bogus")


def _job(model="m", size=224, k=2048, **medians):
    return {"model": model, "size": size, "channels": k,
            "contenders": {n: {"median_s": t, **({"fast": True} if n.startswith(("mc", "int8")) else {})}
                           for n, t in medians.items()}}


def test_targets_logic():
    job = _job(model="lite0", floor=10.0, paper=10.5, top5=10.6, torch=60.0, mc64=0.9, int8=6.0)
    job["contenders"]["paper"]["peak_rss_mb"] = 300.0  # the 600 MB bound is the issue's, for lite0 at 224²
    job["twin"] = {"model": "m_k256", "channels": 256, "peak_rss_mb": 290.0}
    job["fidelity"] = {"mc64": dict.fromkeys(report.PHOTOS, 0.97), "int8": dict.fromkeys(report.PHOTOS, 0.99)}
    res = {"jobs": [job]}
    assert [t["status"] for t in report.targets(res)][:6] == ["PASS"] * 6
    job["fidelity"]["mc64"]["rocket.jpg"] = 0.5
    job["contenders"]["paper"]["median_s"] = 12.0
    assert [t["status"] for t in report.targets(res)][:6] == ["MISS", "PASS", "PASS", "PASS", "PASS", "MISS"]
    assert report.targets({"jobs": [_job(paper=1.0)]})[0]["status"] == "n/a"
    big = _job(model="resnet50", floor=10.0, paper=10.0)
    big["contenders"]["paper"]["peak_rss_mb"] = 1300.0  # outside the bound's scope: reported, not judged
    assert report.targets({"jobs": [big]})[3]["status"] == "n/a"


def _interactive_job(**r):
    job = _job(model="lite0", floor=10.0, paper=2.0, pass1=0.010, mc32=0.09, mc16=0.045, preview=0.018,
               reciprocam=0.02)
    for n in ("mc32", "mc16"):
        job["contenders"][n]["kind"] = "fast"
    job["contenders"]["preview"].update(fast=True, kind="preview")
    job["contenders"]["reciprocam"].update(fast=True, kind="peer")
    job["fidelity"] = {n: dict.fromkeys(report.PHOTOS, r.get(n, 0.97))
                       for n in ("mc32", "mc16", "preview", "reciprocam")}
    return {"jobs": [job]}


def test_interactive_targets():
    statuses = lambda res: [t["status"] for t in report.interactive_targets(res)]  # noqa: E731
    assert statuses(_interactive_job()) == ["PASS", "PASS", "PASS"]  # mc32: 22 x, mc16: 44 x, preview 1.8 x
    assert statuses(_interactive_job(mc16=0.85)) == ["PASS", "MISS", "PASS"]
    assert statuses(_interactive_job(mc32=0.93, mc16=0.93)) == ["MISS", "PASS", "PASS"]  # the 40 x one alone counts
    # one mode cannot be both: the 40 x target needs ANOTHER mode than the 20 x one
    res = _interactive_job(mc32=0.5)
    assert statuses(res) == ["PASS", "MISS", "PASS"]
    assert statuses(_interactive_job(preview=0.89)) == ["PASS", "PASS", "MISS"]
    res = _interactive_job()
    res["jobs"][0]["contenders"]["preview"]["median_s"] = 0.025  # 2.5 x one pass
    assert statuses(res)[2] == "MISS"
    # the peers never count as our fast modes (the reciprocam here is 100 x at r 0.97)
    res = _interactive_job(mc32=0.5, mc16=0.5)
    assert statuses(res)[:2] == ["MISS", "MISS"]
    assert statuses({"jobs": [_job(paper=1.0)]}) == ["n/a"] * 3


def test_memory_and_int8_targets_logic():
    job = _job(model="resnet50", paper=10.0, int8=5.0, **{"int8+mc64": 0.5})
    job["contenders"]["paper"]["peak_rss_mb"] = 600.0
    job["contenders"]["bare"] = {"rss_only": True, "peak_rss_mb": 550.0}
    job["contenders"]["pair"] = {"rss_only": True, "peak_rss_mb": 610.0}
    job["twin"] = {"model": "resnet50_k256", "channels": 256, "peak_rss_mb": 480.0, "bare": {"peak_rss_mb": 500.0}}
    job["fidelity"] = {"int8": dict.fromkeys(report.PHOTOS, 0.98), "int8+mc64": dict.fromkeys(report.PHOTOS, 0.96)}
    job["fidelity_extra"] = {"int8": {"grace_hopper.jpg": 0.98}, "int8+mc64": {"grace_hopper.jpg": 0.96}}
    res = {"jobs": [job], "settings": {"outside_photos": ["grace_hopper.jpg"]}}
    got = {t["target"].split(":")[0].split(" <=")[0]: t for t in report.memory_and_int8_targets(res)}
    assert [t["status"] for t in got.values()] == ["PASS"] * 4
    assert "K=2048: 600 vs 550 MB = 1.09 x" in got["explanation peak RSS"]["detail"]
    assert "K=256: 480 vs 500 MB = 0.96 x" in got["explanation peak RSS"]["detail"]
    assert "0.50 x exact's time" in got["int8"]["detail"] and "1 photos outside the repository 0.980" in \
        got["int8"]["detail"]
    job["contenders"]["pair"]["peak_rss_mb"] = 900.0  # a second explainer with its own weights: MISS
    job["fidelity_extra"]["int8"]["grace_hopper.jpg"] = 0.9  # outside the repository: counts as much as the samples
    job["contenders"]["int8"]["median_s"] = 7.0
    job["fidelity"]["int8+mc64"]["chelsea.png"] = 0.94
    status = [t["status"] for t in report.memory_and_int8_targets(res)]
    assert status == ["PASS", "MISS", "MISS", "MISS"]
    detail = report.memory_and_int8_targets(res)[2]["detail"]
    assert "0.70 x exact's time, min r 0.900 (samples 0.980, 1 photos outside the repository 0.900)" in detail
    assert [t["status"] for t in report.memory_and_int8_targets({"jobs": [_job(paper=1.0)]})] == ["n/a"] * 4


def test_default_plan_is_the_documented_one():
    from bench.__main__ import make_plan, parse_args

    plan = make_plan(parse_args([]))
    assert [(j.model, j.size) for j in plan] == [("lite0", 224), ("lite0", 448), ("resnet50", 224)]
    assert {"floor", "paper", "gradcam", "torchcam", "official", "top5", "torch", "int8", "mc64"} <= set(
        plan[0].contenders)
    assert plan[0].fidelity and "torch" in plan[0].rss
    assert "torch" not in plan[1].contenders and plan[2].twin == "resnet50_k256" and "paper" in plan[2].rss
    custom = make_plan(parse_args(["--models", "resnet50", "--sizes", "448", "--contenders", "floor,exact"]))
    assert [(j.model, j.size, j.contenders) for j in custom] == [
        ("resnet50", 448, ["floor", "paper", "gradcam", "torchcam", "official"])]
    with pytest.raises(SystemExit):
        make_plan(parse_args(["--contenders", "bogus"]))


def test_paired_differences_to_the_reference_and_to_the_mean_of_its_seeds(tmp_path, capsys):
    """bench.paired: two runs on the same photos; a photo missing from one method is left out."""
    from bench.paired import load, main, paired

    def write(run: str, photo: str, values: dict[str, tuple[float, float]]) -> None:
        raw = tmp_path / run / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        rows = [{"image": photo, "method": m, "substrate": s, "values": {
                 "insertion_auc": ins + (s == "blur"), "deletion_auc": dele, "gap": ins - dele}}
                for m, (ins, dele) in values.items() for s in ("zero", "blur")]
        (raw / f"{photo}.json").write_text(json.dumps(rows))

    write("a", "p1", {"rise:n=4000": (0.5, 0.1), "qrise": (0.4, 0.1)})
    write("a", "p2", {"rise:n=4000": (0.3, 0.2), "qrise": (0.5, 0.1)})
    write("a", "p3", {"rise:n=4000": (0.3, 0.2)})  # qrise missing: p3 is not compared
    write("b", "p1", {"rise:n=4000:seed=1": (0.3, 0.1), "qrise": (9.0, 9.0)})  # qrise: run a's rows win
    write("b", "p2", {"rise:n=4000:seed=1": (0.5, 0.2)})
    rows = load([tmp_path / "a", tmp_path / "b"], "zero")
    assert rows["qrise"]["p1"]["insertion_auc"] == 0.4 and set(rows["qrise"]) == {"p1", "p2"}
    mean, se, wins = paired(np.array([0.4, 0.5]), np.array([0.5, 0.3]))
    assert mean == pytest.approx(0.05) and se == pytest.approx(0.15) and wins == 1
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 photos;") and "mean of 2 seeds" in out
    one, both = out.split("mean of 2 seeds")
    qrise_one = next(ln for ln in one.splitlines() if ln.startswith("| qrise |"))
    qrise_both = next(ln for ln in both.splitlines() if ln.startswith("| qrise |"))
    assert "| 0.450 | 0.100 | 0.350 | +0.050 (0.150) [1] | -0.050 (0.050) [1] | +0.100 (0.200) [1] |" in qrise_one
    assert "+0.050 (0.050) [1]" in qrise_both  # against (0.4, 0.4): the seeds' mean per photo
    with pytest.raises(SystemExit, match="no method 'hsic'"):
        main([str(tmp_path / "a"), "--ref", "hsic"])
    write("c", "p1", {"qrise:seed=1": (0.6, 0.1), "hsic": (0.1, 0.1)})
    write("c", "p2", {"qrise:seed=1": (0.3, 0.1), "hsic": (0.1, 0.1)})
    assert main([str(tmp_path / d) for d in "abc"] + ["--methods", "qrise,qrise:seed=1"]) == 0
    out = capsys.readouterr().out
    assert "| hsic |" not in out and "| qrise:seed=1 |" in out
    mean2 = next(ln for ln in out.splitlines() if ln.startswith("| qrise (mean of 2 seeds) |"))
    assert mean2.startswith("| qrise (mean of 2 seeds) | 0.450 | 0.100 | 0.350 |")  # (0.5, 0.4) per photo
    with pytest.raises(SystemExit, match="no method 'bogus'"):
        main([str(tmp_path / "a"), "--methods", "bogus"])


def test_round5_replays_the_self_check_on_recorded_probabilities():
    """bench.insertion_study's round-5 rules choose, per photo, the candidate with the highest mean check
    probability kept minus deleted at the rule's points (j/4 = the recorded j/8 at j = 2, 4, 6)."""
    from bench.insertion_study import R5_STEPS, selected

    assert R5_STEPS == 8
    flat = [0.5] * 7
    rows = [{"map": "a", "pins": flat, "pdel": flat},
            {"map": "b", "pins": [0.0, 0.9, 0.0, 0.9, 0.0, 0.9, 0.0], "pdel": flat},  # wins at j/4 only
            {"map": "c", "pins": [0.9, 0.6, 0.9, 0.6, 0.9, 0.6, 0.9], "pdel": flat}]  # wins at j/8
    assert selected(rows, ("a", "b", "c"), 4)[0]["map"] == "b"
    assert selected(rows, ("a", "b", "c"), 8)[0]["map"] == "c"
    assert selected(rows, ("a", "c"), 4)[0]["map"] == "c"
    assert selected(rows, ("a",), 2)[0]["map"] == "a"
