"""``python -m bench.fill_study``: how each fast-mode rule keeps the exact map, on many more photos than the five
samples (the study that chose ``select="cover"`` + ``fill="kernel"``; bench/README.md).

Every photo is explained exactly once (every channel's masked input scored, fp32, ``paper`` preset, top-1
class) and its scores cached; each rule is then *replayed*: the real :class:`runtime.Explainer` runs with the
rule's options, its engine answering masked inputs from the cached exact scores instead of scoring them again
(same selection, fill, pass count and map code as a real run; only the repeated passes are saved). The table
gives min / mean Pearson r of each rule's map to the exact map per group of photos, and the passes.

Groups (``--groups``; photos come from this repository and from installed packages, nothing is downloaded):

- ``samples``: the five sample photos;
- ``crops``: three crops of each sample (top-left and bottom-right two thirds, a mirrored centre crop): the
  same scenes, framed otherwise: a rule tuned to the samples shows here;
- ``calib``: the package photos int8 is calibrated on (scikit-image, matplotlib);
- ``outside``: the package photos the benchmark reports as outside the repository (never tuned on);
- ``more``: more scikit-image images (cells, text, a clock, a logo, ...);
- ``faces``: three LFW faces shipped by scikit-image (grey, 25 x 25, upsampled);
- ``wild`` = ``opencv``, ``wallpapers``, ``pypi``: 65 real photographs of other packages
  (:data:`bench.bundles.WILD_PHOTOS`: OpenCV's sample photos from Debian's ``opencv-doc``; the photographs
  among Debian's MATE, Plasma and Lomiri wallpapers; scikit-learn's, mahotas' and ultralytics' photos), found
  where those packages install them; a missing package is named with the command that installs it.

The rules are named as the benchmark's contenders (``mc16+kern``: ``max_channels=16, fill="kernel"``;
``mc20+fill``; ``mc32``; ``preview``; ``int8+mc64+kern``). A rule with ``int8`` cannot be replayed from fp32
scores: it runs for real on the bundle's int8 classifier (made on first use, as ``python -m bench`` does).

``--time N``: on N photos spread over the groups, exact Score-CAM and every rule are timed side by side in one
run (``explain_tensor`` on the preprocessed photo, decoding left out; each explainer warmed once; ``--runs``
rounds, round-robin over photos and contenders so drift hits all alike; medians). The speed-up of a rule on a
photo is exact's median time over the rule's; the table gives the median and the lowest over the timed photos.
Exact scores are kept under ``--scores`` (by the bundle's hash), so a second study replays in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from runtime.contract import INT8_FILE

from .bundles import (
    DEFAULT_CACHE,
    PACKAGE_CALIBRATION,
    ensure_bundle,
    outside_photos,
    package_photos,
    sample_photos,
    wild_photos,
)
from .machine import cpu_model

GROUPS = ("samples", "crops", "calib", "outside", "more", "faces", "opencv", "wallpapers", "pypi")
WILD = ("opencv", "wallpapers", "pypi")
ALIASES = {"wild": WILD, "study": GROUPS[:6], "all": GROUPS}
MORE = ("cell", "clock_motion", "logo", "page", "text", "phantom", "microaneurysms")
#: the rules of ``--groups wild`` (issue 21): the kernel fill from 16 to 128 passes, fp32 and int8, and the preview
WILD_RULES = ("mc16+kern", "mc20+kern", "mc32+kern", "mc64+kern", "mc96+kern", "mc128+kern", "int8+mc32+kern",
              "int8+mc64+kern", "int8+mc128+kern", "mc64", "preview")
TARGET_R, TARGET_SPEEDUP = 0.95, 20.0
RULES = ("mc8+kern", "mc16+kern", "mc20+kern", "mc32+kern", "mc16", "mc32", "mc64", "mc16+fill", "mc20+fill",
         "mc32+std", "preview")


def _log(msg: str) -> None:
    print(f"[fill-study] {msg}", file=sys.stderr, flush=True)


def photos(groups) -> Iterator[tuple[str, str, np.ndarray]]:
    """(group, name, RGB uint8) of every photo of ``groups``."""
    from runtime import images

    if "samples" in groups:
        for p in sample_photos():
            yield "samples", p.name, images.load_image(p)
    if "crops" in groups:
        for p in sample_photos():
            rgb = images.load_image(p)
            h, w = rgb.shape[:2]
            yield "crops", f"{p.stem}-top-left", rgb[: h * 2 // 3, : w * 2 // 3]
            yield "crops", f"{p.stem}-bottom-right", rgb[h // 3:, w // 3:]
            yield "crops", f"{p.stem}-mirrored-centre", rgb[h // 6: h * 5 // 6, ::-1][:, w // 6: w * 5 // 6]
    if "calib" in groups:
        for p in package_photos(PACKAGE_CALIBRATION):
            yield "calib", p.name, images.load_image(p)
    if "outside" in groups:
        for p in outside_photos():
            yield "outside", p.name, images.load_image(p)
    skimage_data = package_photos((("skimage", "data/camera.png"),))
    root = skimage_data[0].parent if skimage_data else None
    if "more" in groups and root is not None:
        for n in MORE:
            if (root / f"{n}.png").is_file():
                yield "more", f"{n}.png", images.load_image(root / f"{n}.png")
    if "faces" in groups and root is not None and (root / "lfw_subset.npy").is_file():
        lfw = np.load(root / "lfw_subset.npy")
        for i in (0, 50, 100):
            g = lfw[i] * 255 if lfw[i].max() <= 1 else lfw[i]
            yield "faces", f"lfw_subset[{i}]", np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    wild = [g for g in WILD if g in groups]
    if wild:
        found, missing = wild_photos(wild)
        for hint in missing:
            _log(f"some photos of groups {','.join(wild)} are not installed: {hint}")
        for group, name, path in found:
            yield group, name, images.load_image(path)


class ReplayEngine:
    """The explainer's engine, but masked inputs are answered from one photo's cached exact scores (looked up
    by the channel map that makes the mask); everything else goes to the real engine."""

    def __init__(self, engine, acts: np.ndarray, column: np.ndarray, zero: float, class_index: int, classes: int):
        self._engine = engine
        self._rows = {np.ascontiguousarray(a, np.float32).tobytes(): float(s)
                      for a, s in zip(acts, column, strict=True)}
        self._zero, self._c, self._n = float(zero), int(class_index), int(classes)
        self.scored = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score(self, x, maps, spec, batch_size=None, progress=None) -> np.ndarray:
        out = np.zeros((maps.shape[0], self._n), np.float32)
        for i, m in enumerate(maps):
            m = np.ascontiguousarray(m, np.float32)
            out[i, self._c] = self._zero if not m.any() else self._rows[m.tobytes()]
        self.scored += maps.shape[0]
        return out


def exact_scores(ex, rgb: np.ndarray) -> dict:
    """Everything a replay needs: acts, the top-1 class, its exact masked score per channel, the zero input's."""
    from runtime import images
    from runtime.scorecam import constant_channels

    x = images.preprocess(rgb, ex.pre)
    logits, acts = ex.engine.classify_and_activations(x)
    c = int(np.argmax(logits[0]))
    skipped = constant_channels(acts)
    masked = ex.score_channels(x, acts, ~skipped, skipped, logits.shape[1])
    zero = ex.zero_input_scores(x, acts.shape[1:])
    return {"acts": acts, "class_index": c, "column": masked[:, c].astype(np.float32),
            "zero": float(zero[c]), "x": x}


def load_or_score(ex, rgb: np.ndarray, store: Path | None, key: str) -> dict:
    """:func:`exact_scores` of one photo, kept as ``<store>/<key>.npz`` (``store`` None: not kept) and read back
    from there next time: the exact passes are the study's whole cost."""
    path = store / f"{key}.npz" if store is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {"acts": z["acts"], "class_index": int(z["class_index"]), "column": z["column"],
                    "zero": float(z["zero"]), "x": z["x"]}
    cached = exact_scores(ex, rgb)
    if path is not None:
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **cached)
        tmp.replace(path)
    return cached


def store_dir(bundle: Path, root: Path) -> Path:
    """``<root>/<first 12 hex of sha256(model.onnx)>``: cached scores never outlive the bundle they came from."""
    import hashlib

    from runtime.contract import MODEL_FILE

    return root / hashlib.sha256((Path(bundle) / MODEL_FILE).read_bytes()).hexdigest()[:12]


class Replayer:
    """One explainer per rule, built once; :meth:`result` runs it on one photo's cached scores."""

    def __init__(self, bundle: Path, threads: int | None):
        self.bundle, self.threads, self._ex = Path(bundle), threads, {}

    def result(self, options: dict, cached: dict):
        """The :class:`runtime.Result` of an explainer with ``options`` (``{}``: exact) on one photo, its
        masked inputs answered from ``cached``."""
        from runtime import Explainer

        key = tuple(sorted(options.items()))
        if key not in self._ex:
            self._ex[key] = Explainer(self.bundle, device="cpu", threads=self.threads, **options)
        ex = self._ex[key]
        base = ex.engine._engine if isinstance(ex.engine, ReplayEngine) else ex.engine
        ex.engine = ReplayEngine(base, cached["acts"], cached["column"], cached["zero"], cached["class_index"],
                                 ex.num_classes)
        ex._zero_scores = None  # the all-zero input's row is this photo's cache's, not the last photo's
        return ex.explain_tensor(cached["x"], targets=cached["class_index"])[0]


def replay(replayer: Replayer, rule: str, cached: dict, exact_map: np.ndarray) -> tuple[float, int]:
    """(r to the exact map, passes) of ``rule`` on one photo, by replaying cached scores (fp32 rules) or, for
    an ``int8`` rule, by running it for real."""
    from .__main__ import pearson
    from .contenders import fast_options

    opts = fast_options(rule) or {}
    res = real_explainer(replayer, opts).explain_tensor(cached["x"], targets=cached["class_index"])[0] \
        if opts.get("precision") else replayer.result(opts, cached)
    r = pearson(exact_map, res.saliency)
    return (0.0 if np.isnan(r) else r), res.passes  # a constant map: the worst r, so the group's min shows it


def real_explainer(replayer: Replayer, options: dict):
    """An explainer with ``options`` on the real engine (one per options, kept by ``replayer``)."""
    from runtime import Explainer

    key = ("real", *sorted(options.items()))
    if key not in replayer._ex:
        replayer._ex[key] = Explainer(replayer.bundle, device="cpu", threads=replayer.threads, **options)
    return replayer._ex[key]


def photo_key(group: str, name: str) -> str:
    return f"{group}--" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def run(bundle: Path, groups, rules, threads: int | None, store: Path | None = None, time_photos: int = 0,
        runs: int = 3) -> dict:
    from runtime import Explainer

    exact = Explainer(bundle, device="cpu", threads=threads)
    replayer = Replayer(bundle, threads)
    out: dict = {"rules": list(rules), "photos": []}
    timing: list[tuple[dict, dict]] = []
    for group, name, rgb in photos(groups):
        cached = load_or_score(exact, rgb, store, photo_key(group, name))
        exact_map = replayer.result({}, cached)
        row = {"group": group, "photo": name, "class_index": cached["class_index"],
               "label": exact.label_of(cached["class_index"]), "passes_exact": exact_map.passes, "r": {}, "passes": {}}
        for rule in rules:
            r, n = replay(replayer, rule, cached, exact_map.saliency)
            row["r"][rule], row["passes"][rule] = round(r, 4), int(n)
        out["photos"].append(row)
        timing.append((row, {"x": cached["x"], "class_index": cached["class_index"]}))
        _log(f"{group}/{name} ({row['label']}): " + ", ".join(f"{k} {v:.3f}" for k, v in row["r"].items()))
    if time_photos and timing:
        step = len(timing) / min(time_photos, len(timing))
        chosen = [timing[int(i * step)] for i in range(min(time_photos, len(timing)))]
        out["timing"] = time_rules(bundle, rules, chosen, threads, runs)
    return out


def time_rules(bundle: Path, rules, chosen: list[tuple[dict, dict]], threads: int | None, runs: int) -> dict:
    """Exact and every rule timed side by side on the ``chosen`` photos (module doc); adds ``seconds`` and
    ``speedup`` to each chosen photo's row and returns the settings and per-rule summary."""
    import time

    from runtime import Explainer

    from .contenders import fast_options

    names = ["exact", *rules]
    exs = {n: Explainer(bundle, device="cpu", threads=threads, **(fast_options(n) or {}) if n != "exact" else {})
           for n in names}
    for ex in exs.values():  # warm-up: sessions, the cached all-zero input, numpy's first calls
        ex.explain_tensor(chosen[0][1]["x"], targets=chosen[0][1]["class_index"])
    times: dict = {(i, n): [] for i in range(len(chosen)) for n in names}
    for rnd in range(runs):
        _log(f"timing round {rnd + 1}/{runs} on {len(chosen)} photos ...")
        for i, (_, c) in enumerate(chosen):
            for n in names:
                t0 = time.perf_counter()
                exs[n].explain_tensor(c["x"], targets=c["class_index"])
                times[i, n].append(time.perf_counter() - t0)
    summary: dict = {}
    for i, (row, _) in enumerate(chosen):
        row["seconds"] = {n: round(float(np.median(times[i, n])), 5) for n in names}
        row["runs_s"] = {n: [round(t, 5) for t in times[i, n]] for n in names}
        row["speedup"] = {n: round(row["seconds"]["exact"] / row["seconds"][n], 2) for n in rules}
    for n in rules:
        sp = [row["speedup"][n] for row, _ in chosen]
        summary[n] = {"median": round(float(np.median(sp)), 2), "min": round(float(min(sp)), 2),
                      "worst_photo": min(chosen, key=lambda rc: rc[0]["speedup"][n])[0]["photo"]}
    return {"photos": [row["photo"] for row, _ in chosen], "runs": runs, "threads": threads, "speedup": summary,
            "exact_s_median": round(float(np.median([row["seconds"]["exact"] for row, _ in chosen])), 4)}


def markdown(res: dict) -> str:
    """Tables: min / mean r per rule and group; photos at r >= 0.95; speed-up; the worst photo of each cell."""
    groups = [g for g in GROUPS if any(p["group"] == g for p in res["photos"])]
    counts = {g: sum(p["group"] == g for p in res["photos"]) for g in groups}
    timing = res.get("timing", {}).get("speedup", {})
    head = "| rule | passes | " + ("speed-up (median, min) | " if timing else "") + \
        " | ".join(f"{g} ({counts[g]}) min / mean r" for g in groups) + f" | all, min | r >= {TARGET_R} |"
    lines = [head, "|---|---:|" + ("---:|" if timing else "") + "---:|" * (len(groups) + 2)]
    for rule in res["rules"]:
        cells, every = [], []
        for g in groups:
            rs = [p["r"][rule] for p in res["photos"] if p["group"] == g]
            every += rs
            cells.append(f"{min(rs):.3f} / {np.mean(rs):.3f}")
        passes = [p["passes"][rule] for p in res["photos"]]
        sp = (f"{timing[rule]['median']:.1f} x, {timing[rule]['min']:.1f} x | " if rule in timing
              else "- | " if timing else "")
        good = sum(r >= TARGET_R for r in every)
        lines.append(f"| `{rule}` | {np.mean(passes):.1f} | {sp}" + " | ".join(cells)
                     + f" | {min(every):.3f} | {good}/{len(every)} |")
    exact = [p["passes_exact"] for p in res["photos"]]
    lines += ["", f"Exact: {min(exact)}-{max(exact)} passes per photo (median {int(np.median(exact))})."]
    if timing:
        t = res["timing"]
        lines.append(f"Speed-up: exact's time over the rule's, each the median of {t['runs']} side-by-side runs, on "
                     f"{len(t['photos'])} photos ({', '.join(t['photos'])}); exact took {t['exact_s_median']:.2f} s "
                     "(median photo).")
    hits = [r for r in res["rules"] if r in timing and timing[r]["min"] >= TARGET_SPEEDUP
            and min(p["r"][r] for p in res["photos"]) >= TARGET_R]
    if timing:
        lines.append(f"Target (>= {TARGET_SPEEDUP:.0f} x exact on every timed photo, r >= {TARGET_R} on every photo): "
                     + (", ".join(f"`{h}`" for h in hits) + " PASS" if hits else "no rule reaches it") + ".")
    worst = ["", "Worst photo per rule and group (r):", "",
             "| rule | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for rule in res["rules"]:
        cells = []
        for g in groups:
            p = min((q for q in res["photos"] if q["group"] == g), key=lambda q: q["r"][rule])
            cells.append(f"{p['photo']} {p['r'][rule]:.3f}")
        worst.append(f"| `{rule}` | " + " | ".join(cells) + " |")
    return "\n".join(lines + worst) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fill_study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the benchmark's lite0 @ 224)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"photo groups (default: {','.join(GROUPS)})")
    ap.add_argument("--rules", default=None,
                    help=f"fast-mode rules, as benchmark contender names (default: {','.join(RULES)}; with only wild "
                         f"groups: {','.join(WILD_RULES)})")
    ap.add_argument("--time", type=int, default=0, metavar="N",
                    help="also time exact and every rule side by side on N photos spread over the groups (default 0)")
    ap.add_argument("--runs", type=int, default=3, help="timing rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    ap.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="benchmark bundle cache (default: %(default)s)")
    ap.add_argument("--scores", type=Path, default=DEFAULT_CACHE / "exact-scores",
                    help="keep each photo's exact scores here and reuse them (default: %(default)s; 'none': never)")
    args = ap.parse_args(argv)
    groups: list[str] = []
    for g in (g.strip() for g in args.groups.split(",") if g.strip()):
        if g not in GROUPS and g not in ALIASES:
            ap.error(f"unknown group {g!r}; choose from {', '.join(GROUPS)} (or {', '.join(ALIASES)})")
        groups += [x for x in ALIASES.get(g, (g,)) if x not in groups]
    from .contenders import fast_options

    default = WILD_RULES if set(groups) <= set(WILD) else RULES
    rules = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else list(default)
    for r in rules:
        opts = fast_options(r)
        if opts is None or opts.get("precision") not in (None, "int8"):
            ap.error(f"{r!r} is no fast mode of this study (fp32 rules are replayed, int8 ones run for real)")
    int8 = any((fast_options(r) or {}).get("precision") for r in rules)
    bundle = args.bundle or ensure_bundle("lite0", 224, args.cache, int8=int8)
    if int8 and not (bundle / INT8_FILE).is_file():
        ap.error(f"{bundle} has no {INT8_FILE}: make it with python -m exporter.quantize, or drop the int8 rules")
    store = None if str(args.scores) == "none" else store_dir(bundle, args.scores)
    load = os.getloadavg()
    res = run(bundle, groups, rules, args.threads, store, args.time, args.runs)
    if not res["photos"]:
        print(f"error: no photo of groups {','.join(groups)} is installed (see the lines above for what to install)",
              file=sys.stderr)
        return 2
    res["settings"] = {"groups": groups, "bundle": bundle.name, "threads": args.threads, "cpu": cpu_model(),
                       "cores": os.cpu_count(), "load_average_before": [round(x, 2) for x in load],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    text = markdown(res)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(
            f"# Fast-mode rules on {len(res['photos'])} photos\n\n`python -m bench.fill_study "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` (bundle {bundle.name})\n\n" + text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
