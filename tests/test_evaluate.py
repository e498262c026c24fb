"""runtime.methods (registry, SS-CAM / IS-CAM parity with torchcam), runtime.evaluate (toy-model
behaviour, the randomisation sanity check, the CLI) and exporter.randomize."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import make_bundle
from onnx import numpy_helper

from runtime import Explainer, images
from runtime.evaluate import Sample, evaluate, main, sanity, sanity_summary, summarize
from runtime.methods import METHODS, iscam_gains, parse_method, run_method
from runtime.scorecam import minmax, upsample

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_bundle(tmp_path_factory.mktemp("tiny") / "b", size=32, channels=16)
    x = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    return d, Explainer(d, device="cpu", batch_size=5), x


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_every_method():
    for name in ("scorecam", "faster", "sscam", "iscam", "random", "center", "scorecam-torchcam"):
        assert name in METHODS
    assert METHODS["random"].baseline and not METHODS["sscam"].baseline
    m, p = parse_method("sscam:n=8:sigma=1.5")
    assert m.name == "sscam" and p["n"] == 8 and p["sigma"] == 1.5
    with pytest.raises(ValueError, match="unknown method 'scorcam'.*scorecam"):
        parse_method("scorcam")
    with pytest.raises(ValueError, match="bad parameter"):
        parse_method("sscam:k=3")


def test_scorecam_presets_and_faster_are_the_explainer(tiny):
    d, ex, x = tiny
    for preset in ("paper", "torchcam", "official"):
        want = Explainer(d, device="cpu", preset=preset).explain_tensor(x, [2])[0].saliency
        np.testing.assert_allclose(run_method(f"scorecam:preset={preset}", ex, x, 2), want, atol=1e-6)
        np.testing.assert_allclose(run_method(f"scorecam-{preset}", ex, x, 2), want, atol=1e-6)
    # faster is Faster Score-CAM by name (fill zero); faster:fill=kernel is the Explainer's default with a cap
    want = Explainer(d, device="cpu", max_channels=4, fill="zero").explain_tensor(x, [2])[0].saliency
    np.testing.assert_allclose(run_method("faster:n=4", ex, x, 2), want, atol=1e-6)
    fast = Explainer(d, device="cpu", max_channels=4)
    assert (fast.fill, fast.selection) == ("kernel", "cover")
    np.testing.assert_allclose(run_method("faster:n=4:fill=kernel", ex, x, 2),
                               fast.explain_tensor(x, [2])[0].saliency, atol=1e-6)
    assert ex.preset.name == "paper" and ex.max_channels is None  # the explainer itself is untouched


def test_baselines():
    x = np.zeros((1, 3, 20, 30), np.float32)
    r = run_method("random", None, x, 0)
    assert r.shape == (20, 30) and 0 <= r.min() and r.max() <= 1
    np.testing.assert_array_equal(r, run_method("random", None, x, 0))  # the same seed: the same draws
    c = run_method("center", None, x, 0)
    assert c.max() == pytest.approx(1.0) and np.unravel_index(c.argmax(), c.shape) in {(9, 14), (9, 15), (10, 14),
                                                                                        (10, 15)}


def test_iscam_gains_accumulate_like_torchcam():
    np.testing.assert_allclose(iscam_gains(4), [0.25, 0.75, 1.5, 2.5])


# ----------------------------------------------------------------- SS-CAM / IS-CAM parity (torchcam)


@pytest.fixture(scope="module")
def twin(tiny):
    """The tiny bundle's net rebuilt in torch from its own initializers."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchcam")
    d, ex, x = tiny
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
         for i in onnx.load(str(d / "model.onnx")).graph.initializer}

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            nn = torch.nn
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(16, 5)
            with torch.no_grad():
                for mod, wk, bk in ((self.body[0], "w1", "b1"), (self.body[2], "w2", "b2"), (self.fc, "wf", "bf")):
                    mod.weight.copy_(w[wk])
                    mod.bias.copy_(w[bk])

        def forward(self, t):
            return self.fc(self.body(t).mean((2, 3)))

    net = Twin().eval()
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), ex.engine.classify(x), atol=1e-4)
    return net, torch


def _torchcam_map(extractor_cls, net, torch, x, c, **kwargs):
    with extractor_cls(net, "body.3", batch_size=5, input_shape=(3, 32, 32), **kwargs) as ext:
        net(torch.from_numpy(x))
        cam = ext(c)[0][0].numpy()
    return minmax(upsample(cam, (32, 32)))


def test_sscam_matches_torchcam_with_the_same_noise(tiny, twin):
    from torchcam.methods import SSCAM

    _, ex, x = tiny
    net, torch = twin
    n, sigma = 5, 2.0
    torch.manual_seed(7)  # SSCAM draws N(0, sigma) [1,K,H,W] once per pass from torch's global RNG
    noise = torch.stack([torch.distributions.Normal(0, sigma).sample((1, 16, 32, 32))[0] for _ in range(n)]).numpy()
    torch.manual_seed(7)
    want = _torchcam_map(SSCAM, net, torch, x, 3, num_samples=n, std=sigma)
    got = run_method(f"sscam:n={n}:sigma={sigma}", ex, x, 3, noise=lambda i, a, b: noise[i, a:b])
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the built-in sampler differs from torch's, but is deterministic and batch-independent
    a = run_method("sscam:n=3", ex, x, 3)
    ex2 = Explainer(tiny[0], device="cpu", batch_size=3)
    np.testing.assert_allclose(a, run_method("sscam:n=3", ex2, x, 3), atol=1e-6)


def test_iscam_matches_torchcam(tiny, twin):
    from torchcam.methods import ISCAM

    _, ex, x = tiny
    net, torch = twin
    for n in (10, 3):
        want = _torchcam_map(ISCAM, net, torch, x, 1, num_samples=n)
        np.testing.assert_allclose(run_method(f"iscam:n={n}", ex, x, 1), want, atol=1e-4)


# ------------------------------------------------------------------------------------ toy model


@pytest.fixture(scope="module")
def toy(toy_bundle, toy_data):
    """(bundle dir, explainer, samples): the toy model and 16 held-out toy images with exact boxes."""
    ims, _, boxes = toy_data
    samples = [Sample(f"toy{i:02d}.png", ims[i], boxes[i]) for i in range(16)]
    return Path(toy_bundle), Explainer(toy_bundle, device="cpu"), samples


@pytest.fixture(scope="module")
def toy_rows(toy):
    _, ex, samples = toy
    return evaluate(ex, samples, ["scorecam", "random", "center"], steps=25, progress=None)


def _ideal_energy(samples, feature_size: int) -> float:
    """Energy of the best map a feature map of this size can give: the box itself, area-averaged to
    the feature grid and upsampled like Score-CAM's map (the bilinear spread leaks out of the box)."""
    from runtime.metrics import box_mask, energy_pointing_game

    out = []
    for s in samples:
        h, w = s.rgb.shape[:2]
        m = box_mask((h, w), [s.boxes]).astype(np.float32)
        low = m.reshape(feature_size, h // feature_size, feature_size, w // feature_size).mean((1, 3))
        out.append(energy_pointing_game(minmax(upsample(low, (h, w))), [s.boxes]))
    return float(np.mean(out))


def test_scorecam_points_at_the_object_on_the_toy_set(toy, toy_rows):
    s = summarize(toy_rows)
    energy = s["scorecam"]["energy"][0]
    ceilings = {n: _ideal_energy(toy[2], n) for n in (16, 32)}
    print(f"energy: scorecam {energy:.3f}, random {s['random']['energy'][0]:.3f}, "
          f"center {s['center']['energy'][0]:.3f}; ideal box map at 32x32 {ceilings[32]:.3f}, "
          f"at 16x16 {ceilings[16]:.3f}")
    # measured 0.929, the ideal 32 x 32 box map 0.930; at 16 x 16 cells even the ideal map scores
    # 0.856 < 0.9, which is why the toy's target layer is 32 x 32
    assert energy >= 0.9
    assert energy > 3 * max(s["random"]["energy"][0], s["center"]["energy"][0])


@pytest.mark.parametrize("metric,better", [("avg_drop", "lower"), ("insertion_auc", "higher"), ("gap", "higher")])
def test_scorecam_beats_the_baselines_on_the_toy_set(toy_rows, metric, better):
    """Measured on the committed toy (16 images): Average Drop 46.6 vs center 53.5 / random 65.2,
    insertion 0.888 vs 0.687 / 0.371, gap 0.572 vs 0.245 / 0.003. The Average Drop margin over
    ``center`` is the committed toy's, not every training seed's (see README, Evaluation)."""
    s = summarize(toy_rows)
    print(f"{metric}: " + ", ".join(f"{m} {s[m][metric][0]:.3f}" for m in ("scorecam", "random", "center")))
    ours = s["scorecam"][metric][0]
    for base in ("random", "center"):
        theirs = s[base][metric][0]
        assert (ours < theirs) if better == "lower" else (ours > theirs), (metric, base, ours, theirs)


def test_randomisation_cascade_decorrelates_the_maps(toy, toy_rows, tmp_path):
    pytest.importorskip("torch")
    from exporter.randomize import default_layer_order, randomize_cascade, recipe_export_fn
    from exporter.recipes import build_torch

    _, _, samples = toy
    model = build_torch("toy")
    before = {k: v.clone() for k, v in model.state_dict().items()}  # compared exactly: copies, never recomputed
    order = default_layer_order(model)
    assert order == ["fc", "conv3", "stage3", "stage2", "stage1"]
    bundles = randomize_cascade(model, order, tmp_path / "cascade", recipe_export_fn("toy"), seed=0)
    assert [b.name for b in bundles] == ["01-fc", "02-conv3", "03-stage3", "04-stage2", "05-stage1"]
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    records = sanity(samples[:8], toy_rows, "scorecam", tmp_path / "cascade",
                     lambda b: Explainer(b, device="cpu"), progress=None)
    summary = sanity_summary(records)
    rho = [s["spearman"] for s in summary]
    ssim = [s["ssim"] for s in summary]
    print("spearman per step", np.round(rho, 3), "ssim", np.round(ssim, 3))
    # falls as layers are randomised (measured 1.00, 0.56, 0.58, 0.54, 0.50; SSIM 0.98 -> 0.05)
    assert all(b <= a + 0.1 for a, b in zip(rho, rho[1:], strict=False))
    assert rho[-1] < min(0.65, rho[0] - 0.3)
    assert ssim[-1] < 0.3 and ssim[-1] < ssim[0] - 0.4


def test_randomize_rejects_unknown_layers(tmp_path):
    torch = pytest.importorskip("torch")
    from exporter.randomize import randomize_cascade

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="unknown layer"):
        randomize_cascade(net, ["nope"], tmp_path, lambda m, d: None)
    with pytest.raises(ValueError, match="no parameters"):
        randomize_cascade(net, ["1"], tmp_path, lambda m, d: None)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_table_csv_and_plots(tiny, tmp_path, capsys):
    d, _, _ = tiny
    out = tmp_path / "ev"
    rc = main([str(d), str(SAMPLES / "chelsea.png"), str(SAMPLES / "coffee.png"), "--boxes",
               str(SAMPLES / "boxes.json"), "--methods", "scorecam", "iscam:n=2", "random", "--out", str(out),
               "--steps", "10", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0
    table = captured.out
    assert "| method |" in table and "Energy PG" in table and "| iscam:n=2 |" in table and " ± " in table
    assert "[2/2] coffee.png random" in captured.err
    for f in ("report.md", "metrics.csv", "summary.csv", "curves.png", "overlays.png"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"scorecam", "iscam:n=2", "random"}
    assert all(0 <= float(r["energy"]) <= 1 for r in rows)
    png = images.load_image(out / "overlays.png")
    assert png.shape[0] > 2 * 100 and png.shape[1] > 4 * 100


def test_cli_sanity_check_from_a_cascade_folder(tiny, tmp_path, capsys):
    d, _, _ = tiny
    cascade = tmp_path / "cascade"
    cascade.mkdir()
    for i in (1, 2):  # stand-ins for randomised models: other weights, same architecture
        make_bundle(cascade / f"0{i}-layer{i}", seed=10 + i, size=32, channels=16)
    (cascade / "cascade.json").write_text(json.dumps({"seed": 0, "layers": ["layer1", "layer2"], "steps": [
        {"step": 1, "layer": "layer1", "bundle": "01-layer1"}, {"step": 2, "layer": "layer2", "bundle": "02-layer2"}]}))
    out = tmp_path / "ev"
    rc = main([str(d), str(SAMPLES / "rocket.jpg"), "--methods", "random", "--cascade", str(cascade), "--out",
               str(out), "--steps", "5", "--no-plots"])
    assert rc == 0
    assert "Sanity check" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "sanity.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(-1 <= float(r["spearman"]) <= 1 for r in rows)


@pytest.mark.parametrize("args,message", [
    (["nope.png"], "nope.png: no such file"),
    (["{chelsea}", "--methods", "gradcam++"], "unknown method"),
    (["{chelsea}", "--steps", "0"], "--steps must be >= 1"),
    (["{chelsea}", "--boxes", "missing.json"], "no such boxes file"),
    (["{chelsea}", "--cascade", "."], "no cascade.json"),
])
def test_cli_errors_are_one_line_exit_2(tiny, tmp_path, capsys, args, message):
    d, _, _ = tiny
    args = [a.replace("{chelsea}", str(SAMPLES / "chelsea.png")) for a in args]
    assert main([str(d), *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_cli_module_entry_point_and_bad_option(tiny):
    d, _, _ = tiny
    r = subprocess.run([sys.executable, "-m", "runtime.evaluate", str(d), "x.png", "--steps", "many"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_sample_boxes_cover_every_photo():
    boxes = json.loads((SAMPLES / "boxes.json").read_text())
    photos = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert sorted(k for k in boxes if not k.startswith("_")) == photos
    for name in photos:
        h, w = images.load_image(SAMPLES / name).shape[:2]
        for x0, y0, x1, y1 in boxes[name]["boxes"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, name
