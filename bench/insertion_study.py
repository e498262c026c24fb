"""``python -m bench.insertion_study PHOTO_DIR OUT_DIR [--part I/N] [--round 1|2|3|4|5] [--no-rise]``: cheap maps
that aim at RISE's insertion (round 2: PHOTO_DIR ``tuning`` is ``bench.evaluation.TUNING``; rounds 3 to 5:
``held-out`` is the measurement's photo set less TUNING). ``--report OUT_DIR``: means, and paired differences to
RISE(4000); for round 5 also the self-check rules of :data:`R5_RULES` replayed on the recorded checks.
``--no-rise`` (round 5, a directory): leave RISE(4000) out (its rows copied from another run of the photos).

Development exploration for issue 22's first target (a mode whose insertion and LeRF-MoRF reach RISE(4000)'s at
a tenth of its time). Per photo: the class = top-1; pools of masks are scored once and every candidate
estimator is made from those scores, so candidates differ only in how scores become a map. Round 1 (the
development photos): Sobol' designs of 5, 6 and 7 cells, 320 masks (the earlier rounds' designs and their
numbers are in ``docs/evaluation.md``). Round 2 (``bench.evaluation.TUNING``, held-out photos the measurement
leaves out with ``--skip-tuning``): RISE(4000) in the same run, 320-mask pools of 4, 5, 6, 8 and 10 cells,
the ridge ``k`` and the keep probability, and mixtures of scales (half the masks from each of two pools).
Measured: insertion, deletion, LeRF-MoRF on the zero substrate (50 steps), the energy pointing game on the
samples' boxes (round 1), and the passes. Writes ``OUT_DIR/study-PART.json`` after each photo.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

from .bundles import SAMPLES, ensure_bundle

STEPS = 50


def sobol_masks(rng, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RISE-style smooth masks from binary Sobol' designs (a point's coordinate >= 1/2: cell on)."""
    from runtime.qrise import smooth_masks

    g = int(round(points.shape[1] ** 0.5))
    return smooth_masks((points >= 0.5).astype(np.float32).reshape(-1, g, g), size, rng)


def estimators(m: np.ndarray, y: np.ndarray, p: float) -> dict[str, np.ndarray]:
    """Maps from masks ``m`` [n,H,W] and their scores ``y`` [n]: RISE's, the conditional mean difference
    ``E[y | on] - E[y | off]`` and :func:`runtime.qrise.ridge_map` at three ``k``."""
    from runtime.qrise import ridge_map

    n = y.size
    flat = m.reshape(n, -1).astype(np.float64)
    out = {"rise": (y @ flat / (n * p))}
    on = flat.sum(0) + 1e-6
    off = (1 - flat).sum(0) + 1e-6
    out["cond"] = y @ flat / on - y @ (1 - flat) / off
    for k in (1.0, 10.0, 100.0):  # runtime.qrise's estimator
        out[f"ridge{k}"] = ridge_map(m, y, k).ravel()
    return {k: v.reshape(m.shape[1:]) for k, v in out.items()}


def class_probability(ex, x: np.ndarray, masks: np.ndarray, c: int) -> np.ndarray:
    """The class-``c`` probability of ``x * M`` for each mask of ``masks`` [n,H,W], 32 per run: [n] float64."""
    from runtime.methods import _probs

    sess, name = ex.engine.classifier, ex.engine.input_name
    ys = [_probs(sess.run([ex.engine.class_output], {name: np.ascontiguousarray(x * masks[s:s + 32, None])})[0],
                 ex)[:, c] for s in range(0, len(masks), 32)]
    return np.concatenate(ys).astype(np.float64)


def at_work_size(masks: np.ndarray, small: tuple[int, int]) -> np.ndarray:
    """Masks [n,H,W] area-resized to the regression's working resolution ``small`` (h, w), as
    :func:`runtime.qrise.scored_masks` keeps them."""
    import cv2

    return np.stack([cv2.resize(a, small[::-1], interpolation=cv2.INTER_AREA) for a in masks])


def ridge_up(masks: np.ndarray, y: np.ndarray, size: tuple[int, int], k: float = 10.0) -> np.ndarray:
    """:func:`runtime.qrise.ridge_map` of working-size ``masks`` and scores ``y``, upsampled to ``size`` and
    min-max normalised."""
    import cv2

    from runtime.qrise import ridge_map
    from runtime.scorecam import minmax

    return minmax(cv2.resize(ridge_map(masks, y, k).astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR))


def main(photo_dir: str, out: str, part: tuple[int, int]) -> None:
    from runtime import Explainer, images
    from runtime.methods import run_method
    from runtime.metrics import Metrics
    from runtime.scorecam import minmax

    from .study import measure_maps

    ex = Explainer(ensure_bundle("lite0", 224), device="cpu", batch_size=32)
    meter = Metrics.of(ex)
    boxes = {k: v["boxes"] for k, v in json.loads((SAMPLES / "boxes.json").read_text()).items()
             if not k.startswith("_")}

    files = sorted(glob.glob(os.path.join(photo_dir, "*")))[part[0]::part[1]]
    results = []
    for f in files:
        im = os.path.basename(f)
        rgb = images.load_image(f)
        x = images.preprocess(rgb, ex.pre)
        c = int(np.argmax(ex.engine.classify(x)[0]))
        size = tuple(x.shape[-2:])
        maps, cost = {}, {}
        t = time.perf_counter()
        cam = run_method("faster:n=16:fill=kernel", ex, x, c)
        cost["cam16"] = time.perf_counter() - t
        t = time.perf_counter()
        cam3 = run_method("faster:n=16:fill=kernel:layers=3", ex, x, c)
        cost["cam3"] = time.perf_counter() - t
        maps["cam16"], maps["cam3"] = cam, cam3
        ref = os.path.join(out, f"rise4000-{im}.npy")
        if os.path.exists(ref):
            maps["rise4000"] = np.load(ref)
        from runtime.sobol import sobol

        rng = np.random.default_rng(0)
        n = 320
        for g in (5, 6, 7):
            d = f"sobol{g}"
            m = sobol_masks(rng, sobol(n, g * g, scramble=True, seed=0), size)
            t = time.perf_counter()
            y = class_probability(ex, x, m, c)
            cost[d] = time.perf_counter() - t
            for k, v in estimators(m, y, 0.5).items():
                if k not in ("cond", "ridge10.0"):
                    continue
                key = f"{d}:{k}"
                maps[key] = base = minmax(v.astype(np.float32))
                for gam in (0.25, 0.5):
                    maps[f"{key}*cam^{gam}"] = minmax(base * np.power(cam, gam))
                maps[f"{key}*cam3^0.5"] = minmax(base * np.power(cam3, 0.5))
        results += measure_maps(meter, x, c, maps, im, STEPS, boxes.get(im), rgb.shape[:2])
        results.append({"image": im, "map": "_times", **cost})
        print(im, {k: round(v, 1) for k, v in cost.items()}, flush=True)
        with open(os.path.join(out, f"study-{part[0]}.json"), "w") as fh:
            json.dump(results, fh)


def round2(photo_dir: str, out: str, part: tuple[int, int]) -> None:
    """Round 2: mixtures of scales, ``k`` and the keep probability against RISE(4000), same photos, same run."""

    from runtime import Explainer, images
    from runtime.methods import rise, run_method
    from runtime.metrics import Metrics
    from runtime.qrise import design_masks, work_size
    from runtime.scorecam import minmax
    from runtime.sobol import MAX_DIMENSIONS, sobol

    from .study import measure_maps

    ex = Explainer(ensure_bundle("lite0", 224), device="cpu", batch_size=32)
    meter = Metrics.of(ex)
    pools = {"s4": (4, 0.5), "s5": (5, 0.5), "s6": (6, 0.5), "s8": (8, 0.5), "s10": (10, 0.5), "s5p4": (5, 0.6)}
    mixes = {"s5": [("s5", 320)], "s5k3": [("s5", 320)], "s5k30": [("s5", 320)], "s6": [("s6", 320)],
             "s4": [("s4", 320)], "s5p4": [("s5p4", 320)], "s8": [("s8", 320)],
             "s5+s6": [("s5", 160), ("s6", 160)], "s5+s8": [("s5", 160), ("s8", 160)],
             "s5+s10": [("s5", 160), ("s10", 160)], "s5+s8 240/80": [("s5", 240), ("s8", 80)],
             "s4+s6+s8": [("s4", 107), ("s6", 107), ("s8", 106)]}
    if photo_dir == "tuning":  # bench.evaluation.TUNING, found where the photo packages installed them
        from .evaluation import TUNING, wild_photos

        files = [(n, str(p)) for n, p in wild_photos()[0] if n in TUNING]
    else:
        files = [(os.path.basename(f), f) for f in sorted(glob.glob(os.path.join(photo_dir, "*")))]
    results = []
    for im, f in sorted(files)[part[0]::part[1]]:
        x = images.preprocess(images.load_image(f), ex.pre)
        c = int(np.argmax(ex.engine.classify(x)[0]))
        size = tuple(x.shape[-2:])
        small = work_size(size)
        t = time.perf_counter()
        maps = {"rise4000": rise(ex, x, c, n=4000)}
        trise = time.perf_counter() - t
        cam = maps["cam16"] = run_method("faster:n=16:fill=kernel", ex, x, c)
        scored = {}
        for key, (g, thr) in pools.items():  # 10 x 10 cells: past the Sobol' dimensions, uniform random designs
            pts = (sobol(320, g * g, scramble=True, seed=0) if g * g <= MAX_DIMENSIONS
                   else np.random.default_rng(0).random((320, g * g)))
            m = design_masks(list((pts >= thr).astype(np.float32).reshape(320, g, g)), 0, 320, size, 0)
            scored[key] = (at_work_size(m, small), class_probability(ex, x, m, c))
        for label, parts in mixes.items():
            k = 3.0 if label.endswith("k3") else 30.0 if label.endswith("k30") else 10.0
            maps[label] = ridge_up(np.concatenate([scored[p][0][:n] for p, n in parts]),
                                   np.concatenate([scored[p][1][:n] for p, n in parts]), size, k)
            maps[label + "*cam.5"] = minmax(maps[label] * np.sqrt(cam))
        results += measure_maps(meter, x, c, maps, im, STEPS)
        print(im, f"RISE(4000) {trise:.1f} s", flush=True)
        with open(os.path.join(out, f"study-{part[0]}.json"), "w") as fh:
            json.dump(results, fh)


def zoom_masks(region: np.ndarray, n: int, cells: int, seed: int) -> np.ndarray:
    """Round 3's second-stage masks [n,H,W]: ``region`` (0/1 [H,W]) times RISE-style smooth masks of ``n``
    Sobol' ``cells`` x ``cells`` designs laid over the region's bounding box (zero outside the region)."""
    from runtime.qrise import smooth_masks
    from runtime.sobol import sobol

    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pts = (sobol(n, cells * cells, scramble=True, seed=seed) >= 0.5).astype(np.float32).reshape(n, cells, cells)
    out = np.zeros((n, *region.shape), np.float32)
    out[:, y0:y1, x0:x1] = smooth_masks(pts, (int(y1 - y0), int(x1 - x0)), np.random.default_rng(seed))
    return out * region[None]


def zoom_combine(s1: np.ndarray, s2: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The region keeps its place above the rest of ``s1``; inside it pixels are ordered by ``s1 * s2``."""
    from runtime.scorecam import minmax

    thr = float(s1[region > 0].min())
    inner = minmax(s1 * np.clip(s2, 0, 1))
    return minmax(np.where(region > 0, thr + (1.0 - thr) * inner + 1e-6, s1).astype(np.float32))


def run_photos(photo_dir: str, out: str, part: tuple[int, int], maps_of, extra=None) -> None:
    """The photo loop of rounds 3 and 4: for this part's photos, ``maps_of(ex, x, c, name, held_out)`` ->
    ``{map: saliency}`` (class ``c`` = top-1), measured (:func:`bench.study.measure_maps`) into
    ``OUT/study-PART.json`` after each photo. PHOTO_DIR ``held-out``: ``bench.evaluation``'s photo set less
    TUNING (``held_out`` True: RISE's stored runs cover them); a directory: its files."""
    from runtime import Explainer, images
    from runtime.metrics import Metrics

    from .study import measure_maps

    ex = Explainer(ensure_bundle("lite0", 224), device="cpu", batch_size=32)
    meter = Metrics.of(ex)
    held_out = photo_dir == "held-out"
    if held_out:
        from .evaluation import TUNING, photo_set

        files = [(n, str(p)) for n, p in photo_set(None, TUNING)]
    else:
        files = [(os.path.basename(f), f) for f in sorted(glob.glob(os.path.join(photo_dir, "*")))]
    results = []
    for im, f in files[part[0]::part[1]]:
        x = images.preprocess(images.load_image(f), ex.pre)
        c = int(np.argmax(ex.engine.classify(x)[0]))
        rows = measure_maps(meter, x, c, maps_of(ex, x, c, im, held_out), im, STEPS)
        results += extra(rows) if extra else rows
        print(im, flush=True)
        with open(os.path.join(out, f"study-{part[0]}.json"), "w") as fh:
            json.dump(results, fh)


def round3(photo_dir: str, out: str, part: tuple[int, int], quantile: float = 0.2, cells: int = 4) -> None:
    """Round 3: a second, zoomed stage after 200 stage-1 masks (100 of 5 x 5, 100 of 6 x 6, ridge, x cam^0.5):
    120 masks on the top ``quantile`` of the stage-1 map, ``cells`` x ``cells`` cells over its bounding box,
    the rest of the image black (``zins``: the insertion's regime), kept (``zdel``: the deletion's) or 60 of
    each (``zboth``); the region stays first, ordered inside by stage 1 x stage 2. Against qrise (``q``:
    160 + 160 masks) and RISE(4000). PHOTO_DIR ``held-out``: ``bench.evaluation``'s photo set less TUNING
    with RISE's maps from ``docs/evaluation-qrise-all/raw`` (same seed); a directory: RISE made here."""
    from runtime.methods import rise, run_method
    from runtime.qrise import design_masks, designs, work_size
    from runtime.scorecam import minmax

    raw = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                       "evaluation-qrise-all", "raw")

    def maps_of(ex, x, c, im, held_out):
        size = tuple(x.shape[-2:])
        small = work_size(size)
        maps = {"rise4000": (np.load(os.path.join(raw, f"{im}.npz"))["rise:n=4000"].astype(np.float32) if held_out
                             else rise(ex, x, c, n=4000))}
        cam = run_method("faster:n=16:fill=kernel", ex, x, c)
        pools = {}
        for g in (5, 6):
            m = design_masks(designs(160, g, 0), 0, 160, size, 0)
            pools[g] = (at_work_size(m, small), class_probability(ex, x, m, c))

        def mix(n, pools=pools):
            return tuple(np.concatenate([pools[5][j][:n], pools[6][j][:n]]) for j in (0, 1))

        maps["q"] = minmax(ridge_up(*mix(160), size) * np.sqrt(cam))
        s1 = minmax(ridge_up(*mix(100), size) * np.sqrt(cam))
        region = (s1 >= np.quantile(s1, 1 - quantile)).astype(np.float32)
        zi = zoom_masks(region, 120, cells, 1)
        zd = 1.0 - zoom_masks(region, 120, cells, 2)  # the background on, the region's cells off where on
        yi, yd = class_probability(ex, x, zi, c), class_probability(ex, x, zd, c)
        li, ld = at_work_size(zi, small), at_work_size(zd, small)
        maps["zins"] = zoom_combine(s1, ridge_up(li, yi, size), region)
        maps["zdel"] = zoom_combine(s1, ridge_up(ld, yd, size), region)
        maps["zboth"] = zoom_combine(s1, minmax(ridge_up(li[:60], yi[:60], size) + ridge_up(ld[:60], yd[:60], size)),
                                     region)
        return maps

    run_photos(photo_dir, out, part, maps_of)


def round4(photo_dir: str, out: str, part: tuple[int, int]) -> None:
    """Round 4: the qrise map ``q`` (as the mode makes it) post-processed, with no further passes, by the
    guided filter with the photo as colour guide (:func:`runtime.qrise.guided_filter`; ``c<r>``: radius r,
    eps 1e-3, min-max normalised; ``c16(c16)``: twice), alone or combined with ``q`` (``q*c``, ``q^.5*c``: the
    method's ``edge`` option, ``q+c``). PHOTO_DIR ``held-out`` as round 3 (RISE's metrics: the stored runs,
    ``python -m bench.paired``), or a directory (RISE(4000) made here)."""
    from runtime.methods import rise, run_method
    from runtime.qrise import guide_image, guided_filter
    from runtime.scorecam import minmax

    def maps_of(ex, x, c, im, held_out):
        q = run_method("qrise", ex, x, c)
        guide = guide_image(x)
        maps = {} if held_out else {"rise4000": rise(ex, x, c, n=4000)}
        maps["q"] = q
        for r in (16, 24):
            g = maps[f"c{r}"] = minmax(guided_filter(guide, q, r, 1e-3))
            maps[f"q*c{r}"] = minmax(q * np.clip(g, 0, 1))
            maps[f"q^.5*c{r}"] = minmax(np.sqrt(q) * np.clip(g, 0, 1))
            maps[f"q+c{r}"] = minmax(q + g)
        maps["c16(c16)"] = minmax(guided_filter(guide, maps["c16"], 16, 1e-3))
        maps["c8"] = minmax(guided_filter(guide, q, 8, 1e-3))
        return maps

    run_photos(photo_dir, out, part, maps_of)


#: round 5's candidate maps, all from qrise's 336 passes (see :func:`round5`)
R5_MAPS = ("q", "w", "w*cam", "cam", "cond", "cond*cam^.5", "e", "c24", "we")
#: round 5's check: insertion and deletion at the interior points of this many steps
R5_STEPS = 8
#: round 5's selection rules scored by ``--report`` (label: candidates, steps): the first is ``qrise:check=4``
#: (:func:`runtime.qrise.check_candidates`), fixed on the held-out photos before the fresh and Scratch runs
R5_RULES = {"check: q we c24 cond cam, 4 steps (qrise:check=4)": (("q", "we", "c24", "cond", "cam"), 4),
            "check: q we c24 cond cam, 8 steps": (("q", "we", "c24", "cond", "cam"), 8),
            "check: all nine, 8 steps": (R5_MAPS, 8),
            "check: q e cond*cam^.5 (localised), 4 steps": (("q", "e", "cond*cam^.5"), 4)}


def selected(rows: list[dict], maps: tuple[str, ...], steps: int) -> list[dict]:
    """Round 5's self-check replayed on one photo's rows: of ``maps``, the row whose mean check probability
    with the top pixels kept minus with them deleted, at the ``j / steps`` points (a subset of the recorded
    ``j / R5_STEPS``), is highest (first on ties)."""
    by = {r["map"]: r for r in rows}
    stride = R5_STEPS // steps
    pick = slice(stride - 1, R5_STEPS - 1, stride)

    def score(m: str) -> float:
        return float(np.mean(by[m]["pins"][pick]) - np.mean(by[m]["pdel"][pick]))

    return [by[max(maps, key=score)]]


def round5(photo_dir: str, out: str, part: tuple[int, int], with_rise: bool = True) -> None:
    """Round 5: a self-check. Every candidate of :data:`R5_MAPS` comes from qrise's own passes (320 masks and
    the fast CAM): ``q`` (the mode), ``w`` (the ridge map alone), ``w*cam``, ``cam``, ``cond`` (RISE's
    conditional-mean estimator over the same masks), ``cond*cam^.5``, ``e`` (``qrise:edge=24``), ``c24``
    (the guided filter of ``q``) and ``we`` (``w`` snapped by the edge option). For each, the full metrics
    (50 steps) and the check: class probability with the top ``j / R5_STEPS`` pixels inserted into / deleted
    from the zero canvas at the interior points (``pins`` / ``pdel``; the end points are the same image for
    every map). Selection rules over these are scored by ``--report``. A directory: RISE(4000) made here."""
    from runtime.methods import rise, run_method
    from runtime.metrics import Metrics, pixel_ranks, step_counts
    from runtime.qrise import conditional_map, design_masks, designs, edge_refine, guided, upsampled, work_size
    from runtime.scorecam import minmax

    checks: dict[str, tuple[list, list]] = {}

    def maps_of(ex, x, c, im, held_out):
        size = tuple(x.shape[-2:])
        m = design_masks(designs(320, "5+6", 0), 0, 320, size, 0)
        y = class_probability(ex, x, m, c)
        low = at_work_size(m, work_size(size))
        w = ridge_up(low, y, size)
        cond = upsampled(conditional_map(low, y)[None], size)[0]
        cam = np.clip(run_method("faster:n=16:fill=kernel", ex, x, c), 0, 1)
        q = minmax(w * np.sqrt(cam))
        maps = {"rise4000": rise(ex, x, c, n=4000)} if with_rise and not held_out else {}
        maps.update({"q": q, "w": w, "w*cam": minmax(w * cam), "cam": minmax(cam), "cond": cond,
                     "cond*cam^.5": minmax(cond * np.sqrt(cam)), "e": edge_refine(q, x, 24.0),
                     "c24": guided(q, x, 24.0), "we": edge_refine(w, x, 24.0)})
        meter = Metrics.of(ex)
        counts = step_counts(size[0] * size[1], R5_STEPS)[1:-1]
        zero = np.zeros_like(x)
        for k in R5_MAPS:
            ranks = pixel_ranks(maps[k], True)
            checks[k] = (meter.insertion_curve(x, ranks, c, counts, zero).tolist(),
                         meter.deletion_curve(x, ranks, c, counts, zero).tolist())
        return maps

    def extra(rows):
        for r in rows:
            if r["map"] in checks:
                r["pins"], r["pdel"] = checks[r["map"]]
        return rows

    run_photos(photo_dir, out, part, maps_of, extra)


def stored_rise(photos: set[str]) -> dict[str, dict[str, dict[str, float]]]:
    """RISE(4000)'s per-photo insertion / deletion / LeRF-MoRF (zero substrate) from the stored held-out runs
    (``docs/evaluation-qrise-all``, seeds 1 and 2 in ``docs/evaluation-qrise-seeds/rise``), as references
    ``{label: {photo: {"ins", "dele", "gap"}}}``: seed 0 and the mean of the three draws; none (``{}``) when
    the runs are missing or do not cover ``photos`` (a run that is not a held-out one)."""
    from pathlib import Path

    from .paired import load

    docs = Path(__file__).resolve().parent.parent / "docs"
    try:
        rows = load([docs / "evaluation-qrise-all", docs / "evaluation-qrise-seeds" / "rise"], "zero")
    except SystemExit:  # no stored runs
        return {}
    names = ["rise:n=4000"] + [f"rise:n=4000:seed={s}" for s in (1, 2)]
    if not photos <= set(rows.get(names[0], {})):
        return {}
    keys = {"ins": "insertion_auc", "dele": "deletion_auc", "gap": "gap"}
    return {f"RISE(4000), {label} (stored)": {p: {k: float(np.mean([rows[n][p][v] for n in use]))
                                                  for k, v in keys.items()} for p in rows[names[0]]}
            for label, use in (("seed 0", names[:1]), ("mean of 3 seeds", names))}


def report(out: str) -> None:
    """Means per map and paired differences to RISE(4000): made in the run (``rise4000``) or, for a held-out
    run without it, the stored draw of the same seed and the mean of the three stored draws."""
    from .paired import paired

    rows = []
    for f in glob.glob(os.path.join(out, "study-*.json")):
        rows += json.load(open(f))
    by = {}
    for r in rows:
        if r["map"] != "_times":
            by.setdefault(r["map"], []).append(r)
    common = set.intersection(*[{r["image"] for r in rs} for rs in by.values()])
    by = {k: [r for r in rs if r["image"] in common] for k, rs in by.items()}
    if all(m in by and "pins" in by[m][0] for m in R5_MAPS):  # round 5: the self-check's choices
        per = {}
        for m in R5_MAPS:
            for r in by[m]:
                per.setdefault(r["image"], []).append(r)
        for label, (maps, steps) in R5_RULES.items():
            by[label] = [selected(per[im], maps, steps)[0] for im in sorted(per)]
    print(len(common), "photos")
    refs = ({"RISE(4000) in the run": {r["image"]: r for r in by["rise4000"]}} if "rise4000" in by
            else stored_rise(common))
    for label, base in refs.items() or [("", {})]:
        print(f"\nagainst {label}:" if label else "")
        print(f"{'map':50s} ins    del    gap    epg    ins-RISE (s.e.)  gap-RISE (s.e.)  wins")
        for k, rs in sorted(by.items(), key=lambda kv: -np.mean([r["ins"] for r in kv[1]])):
            e = [r["epg"] for r in rs if r.get("epg") is not None]
            line = (f"{k:50s} {np.mean([r['ins'] for r in rs]):.3f}  {np.mean([r['dele'] for r in rs]):.3f}  "
                    f"{np.mean([r['gap'] for r in rs]):.3f}  {np.mean(e) if e else float('nan'):.3f}")
            if base:
                (di, si, wins), (dg, sg, _) = (paired(np.array([r[m] for r in rs]),
                                                      np.array([base[r["image"]][m] for r in rs]))
                                               for m in ("ins", "gap"))
                line += f"  {di:+.3f} ({si:.3f})   {dg:+.3f} ({sg:.3f})   {wins}"
            print(line)


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(sys.argv[2])
    else:
        args = sys.argv[1:]
        which = args[args.index("--round") + 1] if "--round" in args else "1"
        part = args[args.index("--part") + 1] if "--part" in args else "0/1"
        a, b = part.split("/")
        if which == "5":
            round5(args[0], args[1], (int(a), int(b)), "--no-rise" not in args)
        else:
            {"1": main, "2": round2, "3": round3, "4": round4}[which](args[0], args[1], (int(a), int(b)))
