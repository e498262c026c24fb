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
- ``faces``: three LFW faces shipped by scikit-image (grey, 25 x 25, upsampled).

Timing is not measured here (``python -m bench`` does that); the rules are named as the benchmark's
contenders (``mc16+kern``: ``max_channels=16, fill="kernel"``; ``mc20+fill``; ``mc32``; ``preview``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .bundles import DEFAULT_CACHE, PACKAGE_CALIBRATION, ensure_bundle, outside_photos, package_photos, sample_photos

GROUPS = ("samples", "crops", "calib", "outside", "more", "faces")
MORE = ("cell", "clock_motion", "logo", "page", "text", "phantom", "microaneurysms")
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


def replay(bundle: Path, rule: str, rgb: np.ndarray, cached: dict, exact_map: np.ndarray, threads: int):
    """(r to the exact map, passes) of ``rule`` on one photo, by replaying cached scores."""
    from runtime import Explainer

    from .__main__ import pearson
    from .contenders import fast_options

    ex = Explainer(bundle, device="cpu", threads=threads, **(fast_options(rule) or {}))
    ex.engine = ReplayEngine(ex.engine, cached["acts"], cached["column"], cached["zero"], cached["class_index"],
                             ex.num_classes)
    res = ex.explain_tensor(cached["x"], targets=cached["class_index"])[0]
    r = pearson(exact_map, res.saliency)
    return (0.0 if np.isnan(r) else r), res.passes  # a constant map: the worst r, so the group's min shows it


def run(bundle: Path, groups, rules, threads: int) -> dict:
    from runtime import Explainer

    exact = Explainer(bundle, device="cpu", threads=threads)
    out: dict = {"rules": list(rules), "photos": []}
    for group, name, rgb in photos(groups):
        cached = exact_scores(exact, rgb)
        exact_map = exact.explain_tensor(cached["x"], targets=cached["class_index"])[0]
        row = {"group": group, "photo": name, "class_index": cached["class_index"],
               "label": exact.label_of(cached["class_index"]), "passes_exact": exact_map.passes, "r": {}, "passes": {}}
        for rule in rules:
            r, n = replay(bundle, rule, rgb, cached, exact_map.saliency, threads)
            row["r"][rule], row["passes"][rule] = round(r, 4), int(n)
        out["photos"].append(row)
        _log(f"{group}/{name} ({row['label']}): " + ", ".join(f"{k} {v:.3f}" for k, v in row["r"].items()))
    return out


def markdown(res: dict) -> str:
    groups = [g for g in GROUPS if any(p["group"] == g for p in res["photos"])]
    counts = {g: sum(p["group"] == g for p in res["photos"]) for g in groups}
    head = "| rule | passes | " + " | ".join(f"{g} ({counts[g]}) min / mean r" for g in groups) + " | all, min |"
    lines = [head, "|---|---:|" + "---:|" * (len(groups) + 1)]
    for rule in res["rules"]:
        cells, every = [], []
        for g in groups:
            rs = [p["r"][rule] for p in res["photos"] if p["group"] == g]
            every += rs
            cells.append(f"{min(rs):.3f} / {np.mean(rs):.3f}")
        passes = [p["passes"][rule] for p in res["photos"]]
        lines.append(f"| `{rule}` | {np.mean(passes):.1f} | " + " | ".join(cells) + f" | {min(every):.3f} |")
    worst = ["", "Lowest r per rule (photo):", ""]
    for rule in res["rules"]:
        p = min(res["photos"], key=lambda q: q["r"][rule])
        worst.append(f"- `{rule}`: {p['r'][rule]:.3f} on {p['group']}/{p['photo']} ({p['label']})")
    return "\n".join(lines + worst) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fill_study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the benchmark's lite0 @ 224)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"photo groups (default: {','.join(GROUPS)})")
    ap.add_argument("--rules", default=",".join(RULES), help="fast-mode rules, as benchmark contender names")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own)")
    ap.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="benchmark bundle cache (default: %(default)s)")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        ap.error(f"unknown group {bad[0]!r}; choose from {', '.join(GROUPS)}")
    from .contenders import fast_options

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for r in rules:
        opts = fast_options(r)
        if opts is None or opts.get("precision"):
            ap.error(f"{r!r} is no fp32 fast mode (the replay holds fp32 exact scores)")
    bundle = args.bundle or ensure_bundle("lite0", 224, args.cache)
    res = run(bundle, groups, rules, args.threads)
    text = markdown(res)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(
            f"# Fast-mode rules on {len(res['photos'])} photos\n\n`python -m bench.fill_study` "
            f"(bundle {bundle.name})\n\n" + text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
