"""``python -m bench.fill_study`` on the toy model: the replay, the exact-score store, int8 rules run for real,
side-by-side timing, the report, and the ``wild`` photo groups (found in installed packages, or named with the
command that installs them). None of this needs the wild photos themselves: they are faked in a temp folder.

No timing is asserted: only that the study runs, measures what it says and writes valid files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import bundles, fill_study
from tests.bundles import make_bundle, photo

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def toy8(tmp_path_factory) -> Path:
    from exporter.quantize import quantize_bundle

    b = make_bundle(tmp_path_factory.mktemp("study") / "toy", channels=12)
    quantize_bundle(b, SAMPLES)
    return b


@pytest.fixture(scope="module")
def study(toy8, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("out")
    argv = ["--bundle", str(toy8), "--groups", "samples", "--rules", "mc5+kern,mc5,int8+mc5+kern,preview",
            "--time", "2", "--runs", "2", "--scores", str(tmp / "scores"), "--out", str(tmp / "res")]
    assert fill_study.main(argv) == 0
    return tmp, argv


def test_the_study_writes_r_passes_and_timing_per_photo(study):
    tmp, _ = study
    res = json.loads((tmp / "res.json").read_text())
    assert res["rules"] == ["mc5+kern", "mc5", "int8+mc5+kern", "preview"]
    assert [p["photo"] for p in res["photos"]] == [p.name for p in bundles.sample_photos()]
    for p in res["photos"]:
        assert p["group"] == "samples" and p["passes_exact"] > 0
        assert set(p["r"]) == set(res["rules"]) and all(-1 <= r <= 1 for r in p["r"].values())
        assert p["passes"]["preview"] == 0 and 0 < p["passes"]["mc5+kern"] <= 5
    t = res["timing"]
    assert len(t["photos"]) == 2 and t["runs"] == 2 and set(t["speedup"]) == set(res["rules"])
    timed = [p for p in res["photos"] if "seconds" in p]
    assert [p["photo"] for p in timed] == t["photos"]
    for p in timed:
        assert len(p["runs_s"]["exact"]) == 2 and p["seconds"]["exact"] > 0
        assert p["speedup"]["mc5"] == pytest.approx(p["seconds"]["exact"] / p["seconds"]["mc5"], rel=0.01)
    assert res["settings"]["groups"] == ["samples"] and len(res["settings"]["load_average_before"]) == 3
    md = (tmp / "res.md").read_text()
    assert "| `int8+mc5+kern` |" in md and "speed-up (median, min)" in md and "samples (5) min / mean r" in md
    assert "Worst photo per rule and group" in md and "Target (>= 20 x" in md


def test_the_exact_scores_are_kept_and_reused(study, monkeypatch):
    tmp, argv = study
    kept = sorted(p.name for p in (tmp / "scores").rglob("*.npz"))
    assert kept == sorted(f"{fill_study.photo_key('samples', p.name)}.npz" for p in bundles.sample_photos())

    def no_scoring(*_a, **_k):
        raise AssertionError("the exact scores were computed again")

    monkeypatch.setattr(fill_study, "exact_scores", no_scoring)
    again = list(argv)
    del again[again.index("--time"): again.index("--time") + 2]  # no timing this time
    again[again.index("--out") + 1] = str(tmp / "again")
    assert fill_study.main(again) == 0
    first = json.loads((tmp / "res.json").read_text())["photos"]
    second = json.loads((tmp / "again.json").read_text())["photos"]
    for a, b in zip(first, second, strict=True):  # replays are deterministic; int8 runs the same session
        assert a["r"]["mc5+kern"] == b["r"]["mc5+kern"] and a["passes"] == b["passes"]


def test_replayer_gives_each_photo_its_own_zero_input_row(toy8):
    """One explainer per rule serves every photo: the all-zero input's cached row must be the photo's own."""
    from runtime import Explainer

    exact = Explainer(toy8, device="cpu")
    rep = fill_study.Replayer(toy8, None)
    for seed in (1, 2):
        cached = fill_study.exact_scores(exact, photo(seed=seed))
        real = Explainer(toy8, device="cpu", max_channels=5, fill="kernel").explain_tensor(
            cached["x"], cached["class_index"])[0]
        got = rep.result({"max_channels": 5, "fill": "kernel"}, cached)
        np.testing.assert_allclose(got.saliency, real.saliency, atol=1e-5)  # float32 maps of the same scores


def _fake_wild(tmp_path: Path, monkeypatch) -> Path:
    """Two "installed" photos (a Debian path, a Python package's) and two missing packages."""
    deb = tmp_path / "usr" / "share" / "pkg" / "street.jpg"
    deb.parent.mkdir(parents=True)
    Image.fromarray(photo(40, 52, seed=4)).save(deb)
    pkg = tmp_path / "site" / "fakephotos"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    Image.fromarray(photo(36, 30, seed=5)).save(pkg / "data" / "dog.png")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(bundles, "WILD_PHOTOS", (
        ("opencv", "deb", str(deb), "fake-doc"), ("opencv", "deb", str(tmp_path / "nope.jpg"), "missing-doc"),
        ("pypi", "py", "data/dog.png", "fakephotos"), ("pypi", "py", "x.jpg", "sklearn_missing_xyz")))
    monkeypatch.setitem(bundles.WILD_INSTALL, "sklearn_missing_xyz", "pip install missing-xyz")
    return deb


def test_wild_photos_are_found_where_packages_install_them(tmp_path, monkeypatch):
    deb = _fake_wild(tmp_path, monkeypatch)
    found, missing = bundles.wild_photos()
    assert [(g, n) for g, n, _ in found] == [("opencv", "street.jpg"), ("pypi", "dog.png")]
    assert found[0][2] == deb and found[1][2].is_file()
    assert missing == ["apt-get install missing-doc", "pip install missing-xyz"]
    assert bundles.wild_photos(("pypi",))[0][0][1] == "dog.png"


def test_wild_names_are_short_and_unique():
    names = [bundles.wild_name(w, p, k) for _, w, p, k in bundles.WILD_PHOTOS]
    assert len(set(names)) == len(names) >= 30
    assert "hfs/000.jpg" in names and "Kite.jpg" in names and "building.jpg" in names


def test_the_wild_group_runs_and_names_what_is_missing(toy8, tmp_path, monkeypatch, capsys):
    _fake_wild(tmp_path, monkeypatch)
    out = tmp_path / "wild"
    assert fill_study.main(["--bundle", str(toy8), "--groups", "wild", "--rules", "mc5+kern", "--scores", "none",
                            "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [(p["group"], p["photo"]) for p in res["photos"]] == [("opencv", "street.jpg"), ("pypi", "dog.png")]
    err = capsys.readouterr().err
    assert "apt-get install missing-doc" in err and "pip install missing-xyz" in err
    monkeypatch.setattr(bundles, "WILD_PHOTOS", (("opencv", "deb", str(tmp_path / "none.jpg"), "gone-doc"),))
    assert fill_study.main(["--bundle", str(toy8), "--groups", "opencv", "--rules", "mc5", "--scores", "none"]) == 2
    err = capsys.readouterr().err
    assert "error: no photo of groups opencv" in err and "apt-get install gone-doc" in err


@pytest.mark.parametrize("args, message", [
    (["--groups", "nowhere"], "unknown group 'nowhere'"),
    (["--rules", "paper"], "no fast mode of this study"),
    (["--rules", "fp16+mc5"], "no fast mode of this study"),
])
def test_bad_arguments_are_one_line_errors(toy8, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        fill_study.main(["--bundle", str(toy8), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_group_aliases_and_default_rules():
    assert fill_study.ALIASES["wild"] == ("opencv", "wallpapers", "pypi")
    assert set(fill_study.ALIASES["all"]) == set(fill_study.GROUPS)
    assert "int8+mc64+kern" in fill_study.WILD_RULES and "preview" in fill_study.WILD_RULES
