"""``python -m bench.evaluation``: every saliency method on one photo set, both substrates, in one run per part.

The measurement behind ``docs/evaluation.md``: ``runtime.evaluate`` (insertion, deletion, LeRF-MoRF, Average
Drop, the energy pointing game on ``samples/boxes.json``, seconds per map) for :data:`METHODS` on
EfficientNet-Lite0, each map made once and measured on the zero and the blurred substrate.

Photos (nothing downloaded, nothing here tuned on them): the five samples, then the real photographs that
installed packages ship (``bench.bundles.WILD_PHOTOS``, the fast-mode study's: OpenCV's sample photos from
Debian's ``opencv-doc``, the photographs among Debian's MATE, Plasma and Lomiri wallpapers, scikit-learn's,
mahotas' and ultralytics' photos) less :data:`DEV`, the photos the multi-layer rules
were chosen on; ``--photos N`` keeps the samples and N - 5 wild photos evenly spread over the list.

Resumable and splittable: ``--part I/J`` does every J-th photo from the I-th (one process each, one ONNX
Runtime thread each, so J parts share J cores); each photo's rows and maps go to ``OUT/raw/`` and are not
made again. ``--report`` (after the parts) writes ``OUT/report.md``, ``metrics.csv``, ``summary.csv``,
``overlays.png`` (photo x method) and ``timing.json`` (median seconds per map and per-photo ratios to RISE).
Missing packages are named with the command that installs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import bundles
from .bundles import SAMPLES, ensure_bundle, sample_photos

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "docs" / "evaluation-multilayer"
STEPS = 50
#: the methods, all on one engine; ``rise:n=4000`` is the reference the targets are measured against
METHODS = (
    "scorecam",
    "scorecam:layers=3",
    "scorecam:layers=3:fusion=poly",
    "scorecam:baseline=blur",
    "faster:n=16:fill=kernel",
    "faster:n=16:fill=kernel:layers=3",
    "reciprocam",
    "hsic",
    "rise:n=4000",
)
REFERENCE = "rise:n=4000"
#: short column titles of the overlay grid
LABELS = {"scorecam": "exact", "scorecam:layers=3": "3 layers", "scorecam:layers=3:fusion=poly": "3 layers, poly",
          "scorecam:baseline=blur": "blur baseline", "faster:n=16:fill=kernel": "16 ch. kernel",
          "faster:n=16:fill=kernel:layers=3": "16 ch. x 3 layers", "reciprocam": "ReciproCAM", "hsic": "HSIC",
          "rise:n=4000": "RISE 4000", "qrise": "qRISE", "qrise:gamma=0": "qRISE, no CAM",
          "qrise:cells=5": "qRISE 5x5"}
#: the photos the multi-layer rules (a finer layer's weights, the fusion) were chosen on, besides the samples
#: (grace_hopper.jpg, matplotlib's, is not in :data:`~bench.bundles.WILD_PHOTOS` either): left out of the measurement
DEV = ("china.jpg", "flower.jpg", "bus.jpg", "zidane.jpg")
#: the held-out wild photos qrise's two scales (5+6) were chosen on (``bench.insertion_study``'s second round):
#: left out with ``--skip-tuning``
TUNING = ("aero3.jpg", "board.jpg", "ela_original.jpg", "licenseplate_motion.jpg", "starry_night.jpg",
          "hfs-002.jpg", "text-scenetext05.jpg", "Blinds.jpg", "LadyBird.jpg", "YellowFlower.jpg", "EveningGlow.jpg",
          "Path.jpg")


def wild_photos() -> tuple[list[tuple[str, Path]], list[str]]:
    """``([(name, path)], [install commands])``: the installed :data:`bench.bundles.WILD_PHOTOS` less :data:`DEV`,
    in their order; a name is :func:`bench.bundles.wild_name` with ``/`` as ``-`` (``hfs-001.jpg``: the results
    are files named after it)."""
    found, missing = bundles.wild_photos()
    return [(name.replace("/", "-"), path) for _, name, path in found if name not in DEV], missing


def photo_set(n: int | None, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """The samples, then ``n - 5`` wild photos spread evenly over their order (None: all of them), less the
    photos named in ``skip``."""
    wild, missing = wild_photos()
    wild = [(name, path) for name, path in wild if name not in skip]
    for cmd in missing:
        print(f"warning: photos missing; to add them: {cmd}", file=sys.stderr)
    if n is not None and n - 5 < len(wild):
        keep = np.unique(np.linspace(0, len(wild) - 1, max(n - 5, 0)).round().astype(int))
        wild = [wild[i] for i in keep]
    return [(p.name, p) for p in sample_photos()] + wild


def run_part(out: Path, photos: list[tuple[str, Path]], part: tuple[int, int], threads: int | None,
             methods: tuple[str, ...] = METHODS) -> None:
    """Rows and maps of this part's photos into ``out/raw`` (photos done before are skipped)."""
    from runtime import Explainer, images
    from runtime.evaluate import Sample, evaluate, load_boxes

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    boxes = load_boxes(SAMPLES / "boxes.json")
    ex = Explainer(ensure_bundle("lite0", 224), device="cpu", threads=threads)
    i, j = part
    mine = photos[i::j]
    for k, (name, path) in enumerate(mine, 1):
        done = raw / f"{name}.json"
        if done.is_file():
            continue
        t0 = time.perf_counter()
        sample = Sample(name, images.load_image(path), boxes.get(name))
        rows = evaluate(ex, [sample], methods, steps=STEPS, substrate=["zero", "blur"], progress=None)
        maps = {r.method: r.saliency.astype(np.float16) for r in rows}
        np.savez_compressed(raw / f"{name}.npz", **{m: s for m, s in maps.items()})
        doc = [{"image": r.image, "method": r.method, "class_index": r.class_index, "label": r.label,
                "substrate": r.substrate, "values": r.values} for r in rows]
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(done)
        print(f"[part {i}/{j}: {k}/{len(mine)}] {name} ({rows[0].label}) {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)


def report(out: Path, photos: list[tuple[str, Path]]) -> str:
    """Aggregate ``out/raw`` into the report files; returns the markdown."""
    from runtime import images
    from runtime.evaluate import Row, Sample, by_substrate, markdown_table, plot_grid, summarize, write_csvs

    rows: list[Row] = []
    samples = []
    for name, path in photos:
        f = out / "raw" / f"{name}.json"
        if not f.is_file():
            continue
        maps = np.load(out / "raw" / f"{name}.npz")
        for d in json.loads(f.read_text()):
            rows.append(Row(d["image"], d["method"], d["class_index"], d["label"], d["values"],
                            maps[d["method"]].astype(np.float32), None, d["substrate"]))
        samples.append(Sample(name, images.load_image(path)))
    if not rows:
        raise SystemExit("error: no results yet; run the parts first")
    groups = by_substrate(rows)
    summaries = {sub: summarize(sel) for sub, sel in groups.items()}
    write_csvs(rows, summaries, out)
    shown = [s for s in samples if s.name in {"chelsea.png", "coffee.png", "astronaut.png"}] + \
        [s for s in samples if s.name not in {p.name for p in sample_photos()}][:5]
    labelled = [Row(r.image, LABELS.get(r.method, r.method), r.class_index, r.label, r.values, r.saliency, None,
                    r.substrate) for r in groups["zero"]]
    plot_grid(shown, labelled, out / "overlays.png", cell=160)
    timing = ratios(groups["zero"])
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    lines = [f"# Saliency evaluation: EfficientNet-Lite0, {len(samples)} photos", "",
             f"Class = top-1 prediction; {STEPS} deletion/insertion steps; energy pointing game on the samples' boxes "
             "only; mean ± std over photos; `s / map` is the mean, the timing section gives medians and ratios.",
             ""]
    for sub, summary in summaries.items():
        lines += [f"## Substrate: {sub}", "", markdown_table(summary), ""]
    lines += ["## Time per map (same run, same engine)", "", "| method | median s / map | median ratio to RISE(4000) |",
              "|---|---:|---:|"]
    for m, t in timing.items():
        lines.append(f"| {m} | {t['median_seconds']:.2f} | {t['median_ratio_to_reference']:.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def ratios(rows) -> dict:
    """Per method: median seconds per map and the median over photos of its time / the reference's time."""
    secs: dict[str, dict[str, float]] = {}
    for r in rows:
        secs.setdefault(r.method, {})[r.image] = r.values["seconds"]
    ref = secs.get(REFERENCE, {})
    out = {}
    for m, per in secs.items():
        rat = [per[i] / ref[i] for i in per if ref.get(i)]
        out[m] = {"median_seconds": statistics.median(per.values()),
                  "median_ratio_to_reference": statistics.median(rat) if rat else float("nan"), "photos": len(per)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.evaluation", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--photos", type=int, default=None, help="the samples + N-5 wild photos (default: all)")
    ap.add_argument("--skip-tuning", action="store_true",
                    help="leave out the photos qrise's scales were chosen on (TUNING)")
    ap.add_argument("--part", default="0/1", help="I/J: every J-th photo from the I-th (default 0/1: all)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: 1 with J > 1)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated runtime.evaluate methods (default: {','.join(METHODS)})")
    ap.add_argument("--report", action="store_true", help="aggregate the parts' results")
    ap.add_argument("--list", action="store_true", help="print the photo set and exit")
    args = ap.parse_args(argv)
    photos = photo_set(args.photos, TUNING if args.skip_tuning else ())
    if args.list:
        print("\n".join(f"{n}\t{p}" for n, p in photos))
        return 0
    if args.report:
        print(report(args.out, photos))
        return 0
    i, j = (int(v) for v in args.part.split("/"))
    methods = tuple(m for m in args.methods.split(",") if m)
    run_part(args.out, photos, (i, j), args.threads or (1 if j > 1 else None), methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
