"""``python -m bench``: Score-CAM cost, side by side in one run, on this machine.

Default run (about 30 minutes on a quiet 2-core CPU; see bench/README.md for the detail):

- lite0 @ 224: floor, the four exact presets, top-5, the torch reference and every fast mode
  (timings), fidelity of each fast mode on the five sample photos, peak RSS of floor, paper, top5,
  torch and int8 (one process each);
- lite0 @ 448: floor, paper, int8, mc128 and their peak RSS;
- resnet50 @ 224 (K = 2048, random weights): floor and paper, and paper's peak RSS next to the
  same network with K = 256 (resnet50_k256), for "memory does not grow with K".

``--models/--sizes/--contenders`` replace that plan by their cross product; ``--quick`` is a short
smoke plan. Results go to ``bench/results/<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .bundles import DEFAULT_CACHE, HERE, SAMPLES, ensure_bundle, extra_photos, sample_photos
from .contenders import PRESETS, Context, fast_options, is_fast, kind, known, make, peer_map, peer_method
from .machine import cpu_model

RESULTS = HERE / "results"
CPU_FAST = ("mc128", "mc64", "mc32", "mc32+std", "mc16", "mc20+fill", "mc64+kern", "mc20+kern", "mc16+kern", "mc8+kern",
            "int8", "int8+mc128+kern", "int8+mc64+kern", "int8+mc16+kern", "int8+mc12+kern", "preview")
CUDA_FAST = ("fp16", "mc128", "mc32", "fp16+mc128", "fp16+mc32", "mc16+kern", "preview")
PEERS = ("reciprocam", "rise")
GROUPS = {"exact": PRESETS, "peers": PEERS, "all": ("floor", *PRESETS, "top5", "torch", "pass1", "fast", "peers")}
DEFAULT_RSS = ("floor", "bare", "paper", "pair", "top5", "torch", "int8")
RSS_ONLY = ("bare", "pair")  # measured for memory only (no timing of their own)
NOTES = [
    "floor: K preprocessed images through the bundle's classifier session at our batch size. paper, gradcam, "
    "torchcam, official: ours, exact, end to end (`Explainer.explain(path)`). top5: five classes from one pass. "
    "torch: torch eager reference of `paper` as peer libraries write it (all K masked inputs at once, batches of "
    "16, same thread count). mcN: `max_channels=N, fill=\"zero\"`; int8: the bundle's QDQ int8 classifier "
    "(calibrated on the five sample photos and eight package photos, each also mirrored, cropped and zoomed "
    "out; last two weighted layers in fp32); fp16: CUDA only. bare: a bare ONNX Runtime session of model.onnx "
    "running K images at our batch size (RSS yardstick); pair: two explainers of the bundle in one process, "
    "each explaining once.",
    "pass1: one classifier pass over the photo (decode, preprocess, classify). preview: `mode=\"preview\"`. "
    "reciprocam, riseN: the peers on our engine (`runtime.methods`; rise = 2000 masks), end to end from the photo. "
    "mcN: Faster Score-CAM (`fill=\"zero\"`, asked explicitly; channels ranked by `select=\"auto\"`, relevance on "
    "this head); +kern: the kernel fill (the Explainer's default with a cap); +std forces the spatial-std ranking. "
    "passes = masked inputs scored per photo (one per distinct mask; ReciproCAM: h*w through the tail).",
    "x floor = time / floor; torch / this = torch reference time / time; exact / this = paper time / time; "
    "min r = lowest Pearson r, over the five sample photos, of the map to the exact `paper` map (same class); "
    "min / mean r on the extra photos: photos from installed packages never calibrated or tuned on. "
    "Peak RSS = VmHWM of a process running that contender alone.",
]


@dataclass
class Job:
    model: str
    size: int
    contenders: list[str]
    rss: list[str] = field(default_factory=list)
    fidelity: bool = False
    twin: str | None = None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- machine
def machine_slug(cpu: str, cores: int, device: str = "cpu") -> str:
    s = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-?\s*core\b", " ", cpu.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "cpu"
    return f"{s}-{cores}c" + ("" if device == "cpu" else f"-{device}")


def versions() -> dict:
    import numpy
    import onnxruntime

    v = {"python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    if "torch" in sys.modules:
        v["torch"] = sys.modules["torch"].__version__
    return v


# ---------------------------------------------------------------------------------------- plan
def expand(names: list[str], fast: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for m in [y for g in GROUPS.get(n, (n,)) for y in GROUPS.get(g, (g,)) if g != "all"]:
            for x in (fast if m == "fast" else [m]):
                if not known(x):
                    raise SystemExit(f"error: unknown contender {x!r} (floor, {', '.join(PRESETS)}, top5, torch, "
                                     "mcN, int8, fp16, A+B, or the groups exact, fast, all)")
                if x not in out:
                    out.append(x)
    return out


def make_plan(args) -> list[Job]:
    fast = args.fast
    if args.plan == "memory-int8":  # issue 15's targets only: RSS against a bare session, two explainers, int8
        int8 = expand(["paper", "int8", "int8+mc512", "int8+mc128+kern", "int8+mc64+kern", "int8+mc16+kern", "mc512",
                       "mc128+kern", "mc64+kern", "mc16+kern"], fast)
        return [Job("lite0", 224, int8, ["bare", "paper", "pair", "int8"], not args.no_fidelity),
                Job("resnet50", 224, [], ["bare", "paper", "pair"], False, f"resnet50_k{args.twin_k}")]
    rss = list(args.rss or (["paper"] if args.quick else DEFAULT_RSS))
    rss = [] if rss == ["none"] else rss
    if args.quick and not (args.models or args.sizes or args.contenders):
        return [Job("lite0", 224, expand(["floor", "paper", "top5", "torch", "mc64", "int8"], fast),
                    ["paper"], True)]
    if args.models or args.sizes or args.contenders or args.quick:
        models = args.models or ["lite0"]
        contenders = expand(args.contenders or (["floor", "paper", "top5", "torch", "mc64", "int8"]
                                                if args.quick else ["all"]), fast)
        jobs = []
        for m in models:
            from . import models as zoo

            base, _ = zoo.parse(m)
            for s in args.sizes or [zoo.spec(m).default_size]:
                twin = f"{base}_k{args.twin_k}" if base != "lite0" and zoo.spec(m).channels != args.twin_k else None
                jobs.append(Job(m, s, contenders, [c for c in rss if c in contenders or c in RSS_ONLY],
                                any(is_fast(c) for c in contenders) and not args.no_fidelity, twin))
        return jobs
    return [
        Job("lite0", 224, expand(["all"], fast), [c for c in rss if c in (*expand(["all"], fast), *RSS_ONLY)],
            not args.no_fidelity),
        Job("lite0", 448, expand(["floor", "paper", "int8", "mc128"], fast), [c for c in rss if c in ("floor", "paper",
                                                                                                    "int8")]),
        Job("resnet50", 224, ["floor", "paper"], [c for c in ("bare", "paper", "pair") if c in rss], False,
            f"resnet50_k{args.twin_k}"),
    ]


# ----------------------------------------------------------------------------------------- run
def pearson(a, b) -> float:
    import numpy as np

    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def fidelity(ctx: Context, modes: list[str], photos: list[Path]) -> tuple[dict, dict]:
    """Pearson r of each fast mode's [0,1] map to the exact ``paper`` map, per photo (same class), and the
    masked passes each one scored there: ``({mode: {photo: r}}, {mode: {photo: passes}})`` (exact included)."""
    from .contenders import explainer

    exact = explainer(ctx)
    base = {p.name: exact.explain(p)[0] for p in photos}
    out, passes = {}, {"paper": {k: r.passes for k, r in base.items()}}
    for m in modes:
        out[m], passes[m] = {}, {}
        ex = explainer(ctx, **(fast_options(m) or {}))
        for p in photos:
            c = base[p.name].class_index
            if peer_method(m):
                sal, _, n = peer_map(exact, peer_method(m), p, c)
            else:
                r = ex.explain(p, targets=c)[0]
                sal, n = r.saliency, r.passes
            out[m][p.name] = round(pearson(base[p.name].saliency, sal), 4)
            passes[m][p.name] = int(n)
        log(f"  fidelity {m}: " + ", ".join(f"{k.split('.')[0]} {v:.3f}" for k, v in out[m].items()))
    return out, passes


def run_job(job: Job, args) -> dict:
    from . import models as zoo
    from .rss import measure

    need_int8 = any((fast_options(c) or {}).get("precision") == "int8" for c in job.contenders)
    bundle = ensure_bundle(job.model, job.size, args.cache, int8=need_int8)
    ctx = Context(job.model, bundle, Path(args.image), args.threads, args.batch_size, args.device)
    from .contenders import channels

    k = channels(ctx)
    res = {"model": job.model, "size": job.size, "channels": k, "layer": zoo.spec(job.model).layer,
           "bundle": str(bundle), "contenders": {}}
    log(f"{job.model}@{job.size} (K={k}): setting up {', '.join(job.contenders)}")
    runners = {}
    for c in job.contenders:
        t0 = time.perf_counter()
        runners[c] = make(c, ctx)
        res["contenders"][c] = {"runs_s": [], "setup_s": round(time.perf_counter() - t0, 3)}
        if is_fast(c):
            res["contenders"][c]["fast"] = True
            res["contenders"][c]["kind"] = kind(c)
    # round robin: run i of every contender, then run i+1, so drift hits them all alike
    for i in range(args.runs):
        for c, run in runners.items():
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            res["contenders"][c]["runs_s"].append(round(dt, 4))
            log(f"  run {i + 1}/{args.runs} {c}: {dt:.3f} s")
    for c in res["contenders"].values():
        c["median_s"] = round(statistics.median(c["runs_s"]), 4)
    del runners
    fast = [c for c in job.contenders if is_fast(c)]
    if job.fidelity and fast:
        log(f"{job.model}@{job.size}: fidelity on {len(args.photos)} photos")
        res["fidelity"], res["passes"] = fidelity(ctx, fast, [Path(p) for p in args.photos])
        if args.extra_photos:
            log(f"{job.model}@{job.size}: fidelity of our modes on {len(args.extra_photos)} extra photos "
                "(installed packages)")
            ours = [c for c in fast if kind(c) != "peer"]  # the claim on extra photos is about our modes
            res["fidelity_extra"], res["passes_extra"] = fidelity(ctx, ours, [Path(p) for p in args.extra_photos])
    for c in job.rss:
        log(f"{job.model}@{job.size}: peak RSS of {c} (own process)")
        res["contenders"].setdefault(c, {"rss_only": True}).update(measure(ctx, c))
        log(f"  {c}: {res['contenders'][c]['peak_rss_mb']:.0f} MB")
    if job.twin and "paper" in job.rss:
        tb = ensure_bundle(job.twin, job.size, args.cache)
        tctx = Context(job.twin, tb, ctx.image, ctx.threads, ctx.batch_size, ctx.device)
        log(f"{job.twin}@{job.size}: peak RSS of paper (own process)")
        res["twin"] = {"model": job.twin, "channels": channels(tctx), **measure(tctx, "paper")}
        log(f"  twin: {res['twin']['peak_rss_mb']:.0f} MB")
        if "bare" in job.rss:
            log(f"{job.twin}@{job.size}: peak RSS of bare (own process)")
            res["twin"]["bare"] = measure(tctx, "bare")
            log(f"  twin bare: {res['twin']['bare']['peak_rss_mb']:.0f} MB")
    res["ratios"] = report.ratios(res)
    return res


def parse_args(argv):
    from runtime.engine import cpu_count

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                     "\n\n", 1)[1])
    csv = lambda s: [w for w in re.split(r"[,\s]+", s) if w]  # noqa: E731
    ap.add_argument("--models", type=csv, help="comma list: lite0, resnet50, resnet50_kN, toy, toy_kN")
    ap.add_argument("--sizes", type=lambda s: [int(w) for w in csv(s)], help="input sizes, e.g. 224,448")
    ap.add_argument("--contenders", type=csv,
                    help="comma list: floor, paper, gradcam, torchcam, official, top5, torch, pass1, mcN, int8, "
                         "fp16, int8+mcN, mcN+std, preview, reciprocam, riseN, ...; groups: exact, fast, peers, all")
    ap.add_argument("--fast", type=csv, default=None,
                    help=f"the fast modes 'fast' stands for (default cpu: {','.join(CPU_FAST)}; "
                         f"cuda: {','.join(CUDA_FAST)})")
    ap.add_argument("--rss", type=csv, default=None,
                    help=f"contenders whose peak RSS is measured, each in its own process (default "
                         f"{','.join(DEFAULT_RSS)}; --quick: paper; 'none' for none)")
    ap.add_argument("--twin-k", type=int, default=256, help="K of the twin network for the RSS-vs-K claim (256)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender, median reported (>= 3)")
    ap.add_argument("--quick", action="store_true", help="short plan: lite0@224, a few contenders, RSS of paper")
    ap.add_argument("--plan", choices=("default", "memory-int8"), default="default",
                    help="memory-int8: only what issue 15's targets need (lite0@224: paper, int8 and int8 fast "
                         "modes timed, their fidelity, RSS of bare/paper/pair/int8; resnet50@224 and its K=256 "
                         "twin: RSS of bare/paper/pair, no timings)")
    ap.add_argument("--image", default=str(SAMPLES / "chelsea.png"), help="the image explained in the timings")
    ap.add_argument("--photos", type=csv, default=[str(p) for p in sample_photos()],
                    help="photos for the fidelity check (default: the five samples)")
    ap.add_argument("--extra-photos", type=csv, default=[str(p) for p in extra_photos()],
                    help="more photos whose r is reported beside the samples' (default: photos that "
                         "scikit-image and matplotlib ship, never calibrated or tuned on; 'none' for none)")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the fidelity check")
    ap.add_argument("--threads", type=int, default=cpu_count(), help="threads for ORT and torch (default: cores)")
    ap.add_argument("--batch-size", type=int, default=None, help="our batch size and the floor's (default: "
                                                                 "the runtime's for the device)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="ONNX Runtime device")
    ap.add_argument("--machine", help="name of the result files (default: slug of CPU model + cores)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="exported bundles (default bench/.cache)")
    ap.add_argument("--check-targets", action="store_true", help="print the issue's targets as PASS/MISS")
    ap.add_argument("--report", type=Path, help="re-render the markdown and targets of an existing results json")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.extra_photos == ["none"]:
        args.extra_photos = []
    if args.fast is None:
        args.fast = list(CUDA_FAST if args.device == "cuda" else CPU_FAST)
    return args


def _in_repo(path) -> bool:
    """A photo of the repository's samples/ (the venv may live in the repository: site-packages is not it)."""
    return Path(path).resolve().parent == SAMPLES.resolve()


def print_targets(res: dict) -> None:
    print("targets:")
    for t in res["targets"]:
        print(f"  {t['status']:4}  {t['target']}: {t['detail']}")


def write(res: dict, out: Path, machine: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{machine}.json", out / f"{machine}.md"
    js.write_text(json.dumps(res, indent=1) + "\n")
    md.write_text(report.markdown(res))
    return js, md


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        res = json.loads(args.report.read_text())
        res["targets"] = report.targets(res)
        js, md = write(res, args.out, res["machine"])
        print(f"wrote {md}")
        print_targets(res)
        return 0
    cpu = cpu_model()
    from runtime.engine import cpu_count

    cores = cpu_count()
    machine = args.machine or machine_slug(cpu, cores, args.device)
    plan = make_plan(args)
    log("plan: " + "; ".join(f"{j.model}@{j.size}: {','.join(j.contenders)}"
                             + (f" | rss {','.join(j.rss)}" if j.rss else "")
                             + (f" | twin {j.twin}" if j.twin and 'paper' in j.rss else "")
                             + (" | fidelity" if j.fidelity else "") for j in plan))
    t0 = time.perf_counter()
    res = {"schema": 1, "machine": machine, "cpu": cpu, "cores": cores, "threads": args.threads,
           "device": args.device, "created": _dt.datetime.now().isoformat(timespec="seconds"),
           "settings": {"runs": args.runs, "batch_size": args.batch_size or "default", "image": Path(args.image).name,
                        "outside_photos": [Path(p).name for p in args.extra_photos if not _in_repo(p)],
                        "fast": args.fast, "argv": list(sys.argv[1:] if argv is None else argv)},
           "jobs": [], "notes": NOTES}
    for job in plan:
        res["jobs"].append(run_job(job, args))
        res["versions"] = versions()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["targets"] = report.targets(res)
        js, md = write(res, args.out, machine)  # after every job: a long run keeps what it measured
    log(f"done in {res['seconds']:.0f} s: {js} and {md}")
    if args.check_targets:
        print_targets(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
