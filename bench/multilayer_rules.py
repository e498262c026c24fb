"""``python -m bench.multilayer_rules PHOTO_DIR OUT_DIR``: the multi-layer rules tried, on development photos.

What ``docs/evaluation-multilayer/dev-exploration.md`` reports: per photo, the exact scores of every channel of
the target layer and the two finer stages (``Explainer(layers=3)``'s), then every candidate map made from
those scores (a weighting per layer x a fusion), RISE(4000), HSIC and ReciproCAM, measured by insertion,
deletion and LeRF on the zero substrate (50 steps) and the energy pointing game on the samples' boxes. Writes
``OUT_DIR/explore.json`` after each photo. Weightings (``s_k`` the class logit of channel k's masked input,
``p_k`` its probability, ``n_k = norm(A_k)``, sums over the varying channels):

- ``paper``: ``ReLU(sum_k softmax(s)_k A_k)``; ``temp``: the same with ``softmax(s / std s)``;
- ``pmask``: ``sum_k p_k n_k / sum_k n_k`` (RISE's estimator over the channel masks); ``smask`` with ``s - min s``;
- ``relu``: ``sum_k max(0, s_k - median s) n_k`` (what :func:`runtime.fusion.finer_map` keeps); ``prelu`` with ``p``.
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
RISE_N = 4000


def _lse(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def weightings():
    from runtime.scorecam import minmax, softmax

    def masks(a, var):
        return minmax(a) * var[:, None, None]

    def paper(a, s, p, var):
        return np.maximum(np.tensordot(softmax(s), a, 1), 0)

    def temp(a, s, p, var):
        return np.maximum(np.tensordot(softmax(s / (s[var].std() or 1.0)), a, 1), 0)

    def pmask(a, s, p, var):
        h = masks(a, var)
        return np.tensordot(p * var, h, 1) / (np.tensordot(var * 1.0, h, 1) + 1e-6)

    def smask(a, s, p, var):
        h = masks(a, var)
        return np.tensordot((s - s[var].min()) * var, h, 1) / (np.tensordot(var * 1.0, h, 1) + 1e-6)

    def relu(a, s, p, var):
        return np.tensordot(np.maximum(s - np.median(s[var]), 0) * var, masks(a, var), 1)

    def prelu(a, s, p, var):
        return np.tensordot(np.maximum(p - np.median(p[var]), 0) * var, masks(a, var), 1)

    return {"paper": paper, "temp": temp, "pmask": pmask, "smask": smask, "relu": relu, "prelu": prelu}


def gamma_fuse(cams, g: float, size=(224, 224)) -> np.ndarray:
    """Poly-CAM's fusion with the local ratio raised to ``g`` (1: ``poly``)."""
    from runtime.fusion import local_norm
    from runtime.scorecam import minmax, upsample

    m = minmax(cams[0])
    for prev, cam in zip(cams[:-1], cams[1:], strict=True):
        m = upsample(m, cam.shape) * np.power(np.maximum(local_norm(cam, prev.shape), 0), g)
    return minmax(np.maximum(upsample(m, size), 0))


def main(photo_dir: str, out: str) -> None:
    from runtime import Explainer, images
    from runtime.fusion import fuse
    from runtime.methods import run_method
    from runtime.metrics import Metrics
    from runtime.scorecam import constant_channels, mask_safe, minmax, upsample
    from runtime.selection import distinct_masks

    from .study import measure_maps

    ex = Explainer(ensure_bundle("lite0", 224), device="cpu", layers=3, batch_size=32)
    meter = Metrics.of(ex)
    boxes = {k: v["boxes"] for k, v in json.loads((SAMPLES / "boxes.json").read_text()).items()
             if not k.startswith("_")}
    rules = weightings()

    def score_layer(x, a):
        var = ~constant_channels(a)
        idx = np.flatnonzero(var)
        safe = mask_safe(a[idx])
        first, inv = distinct_masks(safe, ex.mask)
        got = ex.engine.score(x, safe[first], ex.mask, ex.batch_size)
        full = np.zeros((a.shape[0], got.shape[1]), np.float32)
        full[idx] = got[inv]
        full[~var] = ex.zero_input_scores(x, a.shape[1:])
        return full, var, len(first)

    results = []
    for f in sorted(glob.glob(os.path.join(photo_dir, "*"))):
        name = os.path.basename(f)
        rgb = images.load_image(f)
        x = images.preprocess(rgb, ex.pre)
        t0 = time.perf_counter()
        logits, acts, extra = ex.engine.classify_and_layers(x, [st.name for st in ex.stages])
        c = int(np.argmax(logits[0]))
        layers = []
        for a in [acts, *extra]:
            full, var, n = score_layer(x, a)
            s = full[:, c].astype(np.float64)
            layers.append((a, s, np.exp(s - _lse(full.astype(np.float64))), var, n))
        t_layers = time.perf_counter() - t0
        cams = {w: [rule(a, s, p, var) for a, s, p, var, _ in layers] for w, rule in rules.items()}
        maps = {f"deep:{w}": minmax(upsample(cams[w][0], (224, 224))) for w in rules}
        for w in ("paper", "pmask", "relu", "prelu"):
            maps[f"L14:{w}"] = minmax(upsample(cams[w][1], (224, 224)))
            maps[f"L28:{w}"] = minmax(upsample(cams[w][2], (224, 224)))
        for wd in ("paper", "pmask"):
            for wf in ("paper", "pmask", "relu", "prelu"):
                three = [cams[wd][0], cams[wf][1], cams[wf][2]]
                for how in ("poly", "product", "sum"):
                    maps[f"{how}3:{wd}/{wf}"] = fuse(three, (224, 224), how)[1]
                maps[f"poly2:{wd}/{wf}"] = fuse(three[:2], (224, 224), "poly")[1]
                maps[f"g0.5:{wd}/{wf}"] = gamma_fuse(three, 0.5)
        times = {"layers": t_layers, "passes": [n for *_, n in layers]}
        for key, spec in (("rise4000", f"rise:n={RISE_N}"), ("hsic", "hsic"), ("reciprocam", "reciprocam"),
                          ("exact", "scorecam")):
            t = time.perf_counter()
            maps[key] = run_method(spec, ex, x, c)
            times[key] = time.perf_counter() - t
        results += measure_maps(meter, x, c, maps, name, STEPS, boxes.get(name), rgb.shape[:2])
        results.append({"image": name, "map": "_times", **times})
        print(name, round(t_layers, 1), round(times["rise4000"], 1), flush=True)
        with open(os.path.join(out, "explore.json"), "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.multilayer_rules PHOTO_DIR OUT_DIR")
    main(sys.argv[1], sys.argv[2])
