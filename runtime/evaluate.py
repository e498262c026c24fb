"""Evaluate saliency methods on one model: ``python -m runtime.evaluate MODEL IMAGE... [options]``.

For every image (class = the model's top-1 prediction) and every method (:mod:`runtime.methods`)
it measures, with :mod:`runtime.metrics`: Average Drop / Increase (whole map, and the map's top 50 %),
deletion, insertion and LeRF-deletion AUCs and the LeRF - MoRF gap, the energy-based pointing game
(with ``--boxes``) and the seconds per map. It writes to ``--out``:

- ``report.md``: a methods x metrics table (mean +- std over images), also printed on stdout;
- ``metrics.csv`` (one row per image and method) and ``summary.csv`` (the table's numbers);
- ``curves.png``: the mean deletion and insertion curves per method;
- ``overlays.png``: a grid of image x method overlays;
- with ``--cascade DIR`` (written by the exporter's ``--randomize cascade``): the model-parameter
  randomisation sanity check: Spearman rank correlation and SSIM of each randomised model's map
  against the original one (``sanity.csv``, ``sanity.png``, and a table in ``report.md``).

Progress goes to stderr; a problem is one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images, metrics
from .methods import METHODS, parse_method, run_method

#: exact Score-CAM, the Explainer's fast mode (``max_channels=10``: cover + kernel fill), Faster Score-CAM (the
#: same 10-channel budget, the others weighing 0: the published algorithm) and the two baselines
DEFAULT_METHODS = ("scorecam", "faster:fill=kernel", "faster", "random", "center")
CASCADE_MANIFEST = "cascade.json"

#: (key, header, format, higher is better)
COLUMNS = (
    ("avg_drop", "Avg Drop % ↓", "{:.1f}", False),
    ("increase", "Avg Inc % ↑", "{:.1f}", True),
    ("avg_drop_top", "Drop top-50% ↓", "{:.1f}", False),
    ("increase_top", "Inc top-50% ↑", "{:.1f}", True),
    ("deletion_auc", "Deletion AUC ↓", "{:.3f}", False),
    ("insertion_auc", "Insertion AUC ↑", "{:.3f}", True),
    ("lerf_auc", "LeRF AUC ↑", "{:.3f}", True),
    ("gap", "LeRF−MoRF ↑", "{:.3f}", True),
    ("energy", "Energy PG ↑", "{:.3f}", True),
    ("seconds", "s / map", "{:.2f}", False),
)


class EvaluateError(ValueError):
    """A problem with the evaluation's inputs (reported as one line, exit 2)."""


@dataclass
class Sample:
    """One image to evaluate on: its name, RGB pixels and (optionally) object boxes in its pixels."""

    name: str
    rgb: np.ndarray
    boxes: np.ndarray | None = None


@dataclass
class Row:
    """The outcome of one method on one image."""

    image: str
    method: str
    class_index: int
    label: str
    values: dict[str, float]
    saliency: np.ndarray = field(repr=False)
    curves: metrics.Curves | None = field(default=None, repr=False)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- inputs


def load_boxes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{file name: boxes [n,4]}`` from a JSON file mapping a name to a list of ``[x0, y0, x1, y1]``
    or to ``{"boxes": [...], ...}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise EvaluateError(f"{p}: no such boxes file") from None
    except (OSError, ValueError) as e:
        raise EvaluateError(f"{p}: cannot read the boxes ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvaluateError(f"{p}: boxes must be a JSON object mapping an image file name to its boxes")
    out = {}
    for name, v in data.items():
        if name.startswith("_"):
            continue  # comments
        boxes = v.get("boxes") if isinstance(v, dict) else v
        try:
            arr = np.asarray(boxes, np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise EvaluateError(f"{p}: the boxes of {name!r} must be lists of 4 numbers x0, y0, x1, y1") from None
        if arr.size == 0 or np.any(arr[:, 2] <= arr[:, 0]) or np.any(arr[:, 3] <= arr[:, 1]):
            raise EvaluateError(f"{p}: the boxes of {name!r} need x1 > x0 and y1 > y0")
        out[name] = arr
    return out


def read_cascade(cascade_dir: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """(step, layer, bundle dir) of each step of a randomisation cascade (``cascade.json``)."""
    d = Path(cascade_dir)
    f = d / CASCADE_MANIFEST
    if not f.is_file():
        raise EvaluateError(f"{d}: no {CASCADE_MANIFEST} here (write a cascade with the exporter's "
                            "--randomize cascade)")
    try:
        data = json.loads(f.read_text())
        return [(int(s["step"]), str(s["layer"]), d / s["bundle"]) for s in data["steps"]]
    except (ValueError, KeyError, TypeError) as e:
        raise EvaluateError(f"{f}: not a cascade manifest ({e})") from None


# ------------------------------------------------------------------------------------- evaluation


def evaluate(explainer, samples: Sequence[Sample], methods: Sequence[str] = DEFAULT_METHODS,
             steps: int = 100, substrate: str = "zero", insertion_substrate: str | None = None,
             keep: float = 0.5, targets: Sequence[int] | None = None,
             progress: Callable[[str], None] | None = _stderr) -> list[Row]:
    """Every metric of every method on every sample (class: ``targets[i]`` or the top-1 prediction)."""
    for m in methods:
        parse_method(m)  # fail before any work
    for s in (substrate, insertion_substrate or substrate):
        if s not in metrics.SUBSTRATES:
            raise EvaluateError(f"unknown substrate {s!r}; choose one of {', '.join(metrics.SUBSTRATES)}")
    meter = metrics.Metrics.of(explainer)
    rows: list[Row] = []
    for i, sample in enumerate(samples):
        x = images.preprocess(sample.rgb, explainer.pre)
        logits = explainer.engine.classify(x)[0]
        c = int(targets[i]) if targets is not None else int(np.argmax(logits))
        for m in methods:
            t0 = time.perf_counter()
            sal = run_method(m, explainer, x, c)
            secs = time.perf_counter() - t0
            d, inc = meter.average_drop(x, sal, c)
            dt, inct = meter.average_drop(x, sal, c, keep=keep)
            cur = meter.curves(x, sal, c, steps=steps, substrate=substrate,
                               insertion_substrate=insertion_substrate)
            values = {"avg_drop": 100 * d, "increase": 100.0 * inc, "avg_drop_top": 100 * dt,
                      "increase_top": 100.0 * inct, "deletion_auc": cur.deletion_auc,
                      "insertion_auc": cur.insertion_auc, "lerf_auc": cur.lerf_auc, "gap": cur.gap,
                      "energy": (metrics.energy_pointing_game(sal, sample.boxes, sample.rgb.shape[:2])
                                 if sample.boxes is not None else float("nan")),
                      "seconds": secs}
            rows.append(Row(sample.name, m, c, explainer.label_of(c), values, sal, cur))
            if progress:
                progress(f"[{i + 1}/{len(samples)}] {sample.name} {m}: map {secs:.2f} s, "
                         f"insertion {cur.insertion_auc:.3f}, gap {cur.gap:.3f}")
    return rows


def summarize(rows: Sequence[Row]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {metric: (mean, std, n)}}`` over images (NaNs left out)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for m in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == m]
        out[m] = {}
        for key, *_ in COLUMNS:
            v = np.asarray([r.values.get(key, np.nan) for r in sel], np.float64)
            v = v[np.isfinite(v)]
            out[m][key] = (float(v.mean()), float(v.std()), int(v.size)) if v.size else (np.nan, np.nan, 0)
    return out


def sanity(samples: Sequence[Sample], rows: Sequence[Row], method: str, cascade_dir, make_explainer,
           progress: Callable[[str], None] | None = _stderr) -> list[dict]:
    """Spearman rank correlation and SSIM between each sample's original map (``method`` in ``rows``)
    and the map of the same class from every randomised model of the cascade.

    A constant map (a fully random model may output one) carries no ranking: its correlation is 0.
    """
    original = {r.image: r for r in rows if r.method == method}
    out = []
    for step, layer, bundle in read_cascade(cascade_dir):
        ex = make_explainer(bundle)
        for sample in samples:
            ref = original[sample.name]
            x = images.preprocess(sample.rgb, ex.pre)
            sal = run_method(method, ex, x, ref.class_index)
            rho = metrics.spearman(ref.saliency, sal)
            out.append({"step": step, "layer": layer, "image": sample.name,
                        "spearman": 0.0 if np.isnan(rho) else rho, "ssim": metrics.ssim(ref.saliency, sal)})
        if progress:
            sel = out[-len(samples):]
            progress(f"sanity step {step} ({layer}): spearman {np.mean([s['spearman'] for s in sel]):.3f}, "
                     f"ssim {np.mean([s['ssim'] for s in sel]):.3f}")
    return out


def sanity_summary(records: Sequence[dict]) -> list[dict]:
    """Per step: layer, mean and std of the Spearman correlation and SSIM over images."""
    out = []
    for step in dict.fromkeys(r["step"] for r in records):
        sel = [r for r in records if r["step"] == step]
        rho = np.asarray([r["spearman"] for r in sel])
        ss = np.asarray([r["ssim"] for r in sel])
        out.append({"step": step, "layer": sel[0]["layer"], "spearman": float(rho.mean()),
                    "spearman_std": float(rho.std()), "ssim": float(ss.mean()), "ssim_std": float(ss.std())})
    return out


# ---------------------------------------------------------------------------------------- reports


def _cell(mean: float, std: float, fmt: str) -> str:
    return "–" if not np.isfinite(mean) else f"{fmt.format(mean)} ± {fmt.format(std)}"


def markdown_table(summary: dict, skip_empty: bool = True, keep: float = 0.5) -> str:
    """Methods x metrics, ``mean ± std`` over images (``keep``: the fraction the top-map columns keep)."""
    cols = [c for c in COLUMNS if not skip_empty or any(summary[m][c[0]][2] for m in summary)]
    lines = ["| method | " + " | ".join(c[1].replace("50%", f"{keep:.0%}") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m, vals in summary.items():
        lines.append(f"| {m} | " + " | ".join(_cell(vals[c[0]][0], vals[c[0]][1], c[2]) for c in cols) + " |")
    return "\n".join(lines)


def sanity_table(summary: Sequence[dict]) -> str:
    lines = ["| step | randomised down to | Spearman ρ | SSIM |", "|---:|---|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['step']} | {s['layer']} | {s['spearman']:.3f} ± {s['spearman_std']:.3f} | "
                     f"{s['ssim']:.3f} ± {s['ssim_std']:.3f} |")
    return "\n".join(lines)


def write_csvs(rows: Sequence[Row], summary: dict, out: Path) -> None:
    keys = [c[0] for c in COLUMNS]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "method", "class_index", "label", *keys])
        for r in rows:
            w.writerow([r.image, r.method, r.class_index, r.label, *(f"{r.values[k]:.6g}" for k in keys)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *(f"{k}_{s}" for k in keys for s in ("mean", "std")), "images"])
        for m, vals in summary.items():
            w.writerow([m, *(f"{vals[k][i]:.6g}" for k in keys for i in (0, 1)),
                        max(v[2] for v in vals.values())])


# ------------------------------------------------------------------------- plots (OpenCV, no pyplot)

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.4, color=(0, 0, 0)) -> None:
    import cv2

    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def line_plot(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
              ylim: tuple[float, float] = (0.0, 1.0), size: tuple[int, int] = (340, 440)) -> np.ndarray:
    """An RGB uint8 line chart: one coloured polyline per series, axes, ticks and a legend."""
    import cv2

    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 52, 12, 28, 42
    pw, ph = w - left - right, h - top - bottom
    lo, hi = ylim
    xs = [np.asarray(x, np.float64) for x, _ in series.values()]
    x0 = min((x.min() for x in xs), default=0.0)
    x1 = max((x.max() for x in xs), default=1.0)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (int(round(left + (x - x0) / (x1 - x0) * pw)),
                int(round(top + ph - (np.clip(y, lo, hi) - lo) / (hi - lo) * ph)))

    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    for t in np.linspace(lo, hi, 5):
        y = px(x0, t)[1]
        cv2.line(img, (left - 4, y), (left + pw, y), (225, 225, 225) if lo < t < hi else (0, 0, 0), 1)
        _text(img, f"{t:.2g}", (4, y + 4), 0.35)
    for t in np.linspace(x0, x1, 5):
        x = px(t, lo)[0]
        cv2.line(img, (x, top + ph), (x, top + ph + 4), (0, 0, 0), 1)
        _text(img, f"{t:.2g}", (x - 10, top + ph + 16), 0.35)
    _text(img, title, (left, 18), 0.45)
    _text(img, xlabel, (left + pw // 2 - 40, h - 8), 0.4)
    _text(img, ylabel, (4, top - 8), 0.35)
    for i, (name, (x, y)) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        pts = np.asarray([px(a, b) for a, b in zip(x, y, strict=True)], np.int32)
        cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
        ly = top + 14 + 15 * i
        cv2.line(img, (left + pw - 120, ly - 4), (left + pw - 100, ly - 4), color, 2)
        _text(img, name[:18], (left + pw - 96, ly), 0.35)
    return img


def plot_curves(rows: Sequence[Row], path: Path) -> None:
    """Mean deletion and insertion curves per method, side by side."""
    panels = []
    for kind in ("deletion", "insertion"):
        series = {}
        for m in dict.fromkeys(r.method for r in rows):
            sel = [r.curves for r in rows if r.method == m and r.curves is not None]
            if sel:
                series[m] = (sel[0].fractions, np.mean([getattr(c, kind) for c in sel], axis=0))
        panels.append(line_plot(series, f"{kind} (mean over images)", "fraction of pixels", "p(class)"))
    _save(np.concatenate(panels, axis=1), path)


def plot_grid(samples: Sequence[Sample], rows: Sequence[Row], path: Path, cell: int = 128) -> None:
    """Rows: images; columns: the image, then each method's overlay."""
    methods = list(dict.fromkeys(r.method for r in rows))
    head = 22
    grid = np.full((head + cell * len(samples), cell * (1 + len(methods)), 3), 255, np.uint8)
    _text(grid, "image", (4, 15))
    for j, m in enumerate(methods):
        _text(grid, m[:20], (cell * (j + 1) + 4, 15))
    by_key = {(r.image, r.method): r for r in rows}
    for i, s in enumerate(samples):
        y = head + cell * i
        grid[y:y + cell, :cell] = images.resize_rgb(s.rgb, (cell, cell))
        for j, m in enumerate(methods):
            r = by_key.get((s.name, m))
            if r is not None:
                ov = images.overlay(images.resize_rgb(s.rgb, (cell, cell)), r.saliency)
                grid[y:y + cell, cell * (j + 1):cell * (j + 2)] = ov
        _text(grid, s.name[:18], (3, y + cell - 5), 0.35, (255, 255, 255))
    _save(grid, path)


def plot_sanity(summary: Sequence[dict], path: Path) -> None:
    steps = np.asarray([s["step"] for s in summary], np.float64)
    series = {"Spearman": (np.r_[0, steps], np.r_[1.0, [s["spearman"] for s in summary]]),
              "SSIM": (np.r_[0, steps], np.r_[1.0, [s["ssim"] for s in summary]])}
    _save(line_plot(series, "cascading randomisation", "layers randomised", "similarity", ylim=(-1.0, 1.0)),
          path)


def _save(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


# -------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    methods = ", ".join(METHODS)
    p = _Parser(
        prog="python -m runtime.evaluate",
        description="Measure saliency methods (Average Drop/Increase, deletion/insertion, LeRF-MoRF gap, "
                    "energy pointing game, randomisation sanity check) on one exported model.",
        epilog=f"methods: {methods}; parameters as name:key=value, e.g. sscam:n=8:sigma=1 faster:n=32 "
               "scorecam:preset=torchcam")
    p.add_argument("model", help="bundle directory (or its model.onnx, or a name under models/)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images to evaluate on")
    p.add_argument("--boxes", help="JSON: image file name -> [[x0, y0, x1, y1], ...] object boxes")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=100,
                   help="deletion/insertion steps (default 100: 1%% of the pixels per step)")
    p.add_argument("--substrate", default="zero", choices=metrics.SUBSTRATES,
                   help="what deleted pixels become: zero (the paper) or blur (default: zero)")
    p.add_argument("--insertion-substrate", choices=metrics.SUBSTRATES,
                   help="the insertion's starting image (default: as --substrate; RISE uses blur)")
    p.add_argument("--keep", type=float, default=0.5,
                   help="Average Drop on the top fraction of the map too (default 0.5)")
    p.add_argument("--batch-size", type=int, help="inputs per ONNX Runtime run")
    p.add_argument("--cascade", metavar="DIR", help="randomisation cascade (exporter --randomize cascade) "
                   "for the sanity check")
    p.add_argument("--sanity-method", help="method of the sanity check (default: the first non-baseline one)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--top-k", type=int, default=1, help="object detectors: explain the top K detections of each image "
                   "(default 1; methods: scorecam, faster, drise, random, center)")
    return p


def _samples(paths: Sequence[str], boxes: dict[str, np.ndarray] | None) -> list[Sample]:
    out = []
    for p in paths:
        rgb = images.load_image(p)
        name = Path(p).name
        b = None
        if boxes is not None:
            b = boxes.get(name)
            if b is None:
                _stderr(f"warning: {name}: no box in the boxes file; energy pointing game skipped for it")
        out.append(Sample(name, rgb, b))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise EvaluateError("two images share a file name; the report keys images by name")
    return out


def run_detector(args: argparse.Namespace) -> str:
    """``run`` for an object detector (:mod:`runtime.detect.evaluate`): the top-k detections of each image."""
    from .detect import evaluate as devaluate
    from .detect.explainer import DetectionExplainer

    methods = list(devaluate.DEFAULT_METHODS) if args.methods == list(DEFAULT_METHODS) else list(args.methods)
    ex = DetectionExplainer(args.model, device=args.device, batch_size=args.batch_size)
    samples = [(Path(p).name, images.load_image(p)) for p in args.images]
    _stderr(f"evaluating {len(methods)} method(s) on the top {args.top_k} detection(s) of {len(samples)} image(s) "
            f"with {ex.provider}")
    rows = devaluate.evaluate_boxes(ex, samples, methods, top_k=args.top_k, steps=args.steps,
                                    substrate=args.substrate, progress=_stderr)
    if not rows:
        raise EvaluateError("the detector finds nothing on these images; nothing to evaluate")
    text = (f"# Box explanations: {Path(args.model).name}\n\n{len(rows) // len(methods)} box(es) (the top "
            f"{args.top_k} detection(s) per image); deletion/insertion of the box's D-RISE similarity over "
            f"{args.steps} steps, substrate {args.substrate}; mean over boxes.\n\n"
            + devaluate.markdown(devaluate.summary(rows)) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    with open(out / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "detection", "label", "method", "insertion", "deletion", "pointing", "seconds"])
        for r in rows:
            w.writerow([r.image, r.detection, r.label, r.method, *(f"{r.values[k]:.6g}" for k in
                        ("insertion", "deletion", "pointing")), f"{r.seconds:.4f}"])
    _stderr(f"wrote {out}/report.md, boxes.csv")
    return text


def run(args: argparse.Namespace) -> str:
    from .detect.model import looks_like_detector
    from .explainer import Explainer

    if looks_like_detector(args.model):
        return run_detector(args)

    if args.steps < 1:
        raise EvaluateError(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.keep <= 1:
        raise EvaluateError(f"--keep must be in (0, 1], got {args.keep}")
    for m in args.methods:
        parse_method(m)
    sanity_method = args.sanity_method
    if args.cascade:
        cascade = read_cascade(args.cascade)
        if sanity_method is None:
            sanity_method = next((m for m in args.methods if not parse_method(m)[0].baseline), "scorecam")
        parse_method(sanity_method)
        missing = [str(b) for _, _, b in cascade if not b.is_dir()]
        if missing:
            raise EvaluateError(f"cascade bundle(s) missing: {', '.join(missing)}")
    boxes = load_boxes(args.boxes) if args.boxes else None
    samples = _samples(args.images, boxes)

    def make(model):
        return Explainer(model, device=args.device, batch_size=args.batch_size)

    ex = make(args.model)
    _stderr(f"evaluating {len(args.methods)} method(s) on {len(samples)} image(s) with {ex.provider}")
    methods = list(args.methods)
    if sanity_method and sanity_method not in methods:
        methods.append(sanity_method)
    rows = evaluate(ex, samples, methods, steps=args.steps, substrate=args.substrate,
                    insertion_substrate=args.insertion_substrate, keep=args.keep)
    summary = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fractions = f"{args.keep:.0%}"
    report = [f"# Saliency evaluation: {Path(args.model).name}", "",
              f"{len(samples)} image(s), class = top-1 prediction; {args.steps} deletion/insertion steps, "
              f"substrate {args.substrate}"
              + (f" (insertion: {args.insertion_substrate})" if args.insertion_substrate else "")
              + f"; 'top-{fractions}' columns keep only the map's top {fractions} of pixels; "
              "mean ± std over images.", "",
              markdown_table(summary, keep=args.keep), "",
              "Rank by insertion and the LeRF−MoRF gap, never by deletion alone (a map that breaks the "
              "image deletes well)."]
    write_csvs(rows, summary, out)
    if args.cascade:
        records = sanity(samples, rows, sanity_method, args.cascade, make)
        ssum = sanity_summary(records)
        report += ["", f"## Sanity check: cascading randomisation ({sanity_method})", "", sanity_table(ssum), "",
                   "Similarity to the original model's map; an explanation of the model must drift toward 0."]
        with open(out / "sanity.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "layer", "image", "spearman", "ssim"])
            w.writeheader()
            w.writerows(records)
        if not args.no_plots:
            plot_sanity(ssum, out / "sanity.png")
    if not args.no_plots:
        plot_curves(rows, out / "curves.png")
        plot_grid(samples, rows, out / "overlays.png")
    text = "\n".join(report) + "\n"
    (out / "report.md").write_text(text)
    _stderr(f"wrote {out}/report.md, metrics.csv, summary.csv" + ("" if args.no_plots else ", PNG plots"))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .contract import BundleError
    from .engine import EngineError
    from .explainer import TargetError
    from .images import ImageError

    try:
        text = run(args)
    except (EvaluateError, BundleError, EngineError, ImageError, TargetError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
