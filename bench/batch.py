"""``python -m bench.batch``: dataset throughput of ``python -m runtime.batch``, local vs Ray, side by side.

On N distinct images (default 24, crops and flips of the five sample photos) it runs the batch CLI,
exact and with ``max_channels=64``, as: ``local`` with 1 worker (one process, ONNX Runtime on every
core) and with 2 workers (two processes, one thread each), and ``ray`` with 1 and 2 actors on a Ray
cluster the bench starts once (``ray start --head`` on loopback, its own temp dir and token), as a
user with a cluster would have it. Each run is a fresh ``--out`` (``--force``); images/s = N / wall
time of the whole command (model loading and, for Ray, connecting and starting the actors included), and
"steady" images/s from the times the parquet parts were written (the start left out).
Results: ``bench/results/batch-<machine>.json`` and ``.md``; ``--check-targets`` prints whether ray at
2 workers is within 15 % of the best local setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bundles import HERE, sample_photos

RESULTS = HERE / "results"
ROOT = HERE.parent
SUMMARY = re.compile(r"done (\d+), skipped (\d+) .*failed (\d+)")
CONFIGS = {  # name: batch CLI flags
    "local-1": ["--engine", "local", "--workers", "1"],
    "local-2": ["--engine", "local", "--workers", "2", "--threads", "1"],
    "ray-1": ["--engine", "ray", "--workers", "1", "--threads", "2"],
    "ray-2": ["--engine", "ray", "--workers", "2", "--threads", "1"],
}
MODES = {"mc64": ["--max-channels", "64"], "exact": []}


def log(msg: str) -> None:
    print(f"[bench.batch] {msg}", file=sys.stderr, flush=True)


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct images: crops (and mirror images) of the sample photos, as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sample_photos()]
    out = []
    for i in range(n):
        rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        k = i // len(photos)
        crop = rgb[k * h // 16: h - k * h // 24, k * w // 20: w - k * w // 16]
        if k % 2:
            crop = crop[:, ::-1]
        p = folder / f"img{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(crop)).save(p)
        out.append(p)
    return out


def resolve_model(name: str) -> str:
    from runtime.bundle import resolve_model_path
    from runtime.contract import BundleError

    try:
        return str(resolve_model_path(name))
    except BundleError:
        if name != "efficientnet_lite0":
            raise
        from .bundles import ensure_bundle

        return str(ensure_bundle("lite0", 224))


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(cpus: int):
    """A Ray cluster on loopback for the bench: (address, env for its drivers); stopped at the end."""
    ray_bin = Path(sys.executable).parent / "ray"
    port = free_port()
    temp = Path(tempfile.gettempdir()) / f"ray-bench-{os.getpid()}"
    env = _env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"})
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                             "--include-dashboard=false", f"--dashboard-port={free_port()}", "--disable-usage-stats",
                             f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def run_one(model: str, data: Path, out: Path, flags: list[str], env: dict, retries: float = 0) -> dict:
    cmd = [sys.executable, "-m", "runtime.batch", model, str(data), "--out", str(out), "--force", "--no-progress",
           "--device", "cpu", *flags]
    deadline = time.monotonic() + retries
    while True:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode == 0 or "cannot connect" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)  # the Ray head is still starting
    m = SUMMARY.search(r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    done, _, failed = (int(v) for v in m.groups())
    return {"wall_s": round(wall, 3), "done": done, "failed": failed, **steady(out)}


def steady(out: Path) -> dict:
    """Throughput once running: images written after the first part / time from the first part to the last
    (parts are written as chunks finish, so this leaves out the start: processes, Ray actors, model loads)."""
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, len(set(pq.read_table(p, columns=["source"]).column("source").to_pylist())))
                   for p in (out / "results.parquet").glob("*.parquet"))
    if len(parts) < 2 or parts[-1][0] <= parts[0][0]:
        return {"steady_images_per_s": None, "parts": len(parts)}
    n = sum(k for _, k in parts[1:])
    return {"steady_images_per_s": round(n / (parts[-1][0] - parts[0][0]), 4), "parts": len(parts)}


def table(res: dict) -> str:
    lines = [f"# Batch throughput: {res['machine']}", "",
             f"{res['images']} images (crops of the five sample photos), model {res['model_name']}, CPU, "
             f"{res['cpus']} cores. end to end: images / wall time of the whole `python -m runtime.batch` command "
             "(processes or Ray actors started, model loaded in each, and for Ray the driver connecting to the "
             "already-running cluster: all included). steady: images written after the first parquet part / "
             "time from the first part to the last (the start left out). One run per cell, measured "
             f"{res['date']}{'; ' + res['note'] if res.get('note') else ''}.", "",
             "| engine, workers | " + " | ".join(f"{m} end to end | {m} steady" for m in res["modes"]) + " |",
             "|---|" + "---:|" * (2 * len(res["modes"]))]

    def fmt(v) -> str:
        return f"{v:.3f}" if v is not None else "-"

    for c in res["configs"]:
        cells = []
        for m in res["modes"]:
            r = res["runs"][m].get(c, {})
            cells += [fmt(r.get("images_per_s")), fmt(r.get("steady_images_per_s"))]
        lines.append(f"| {c} ({' '.join(CONFIGS[c][2:])}) | " + " | ".join(cells) + " |")
    lines += ["", "| target | status | measured |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['status']} | {t['measured']} |")
    return "\n".join(lines) + "\n"


def targets(res: dict) -> list[dict]:
    out = []
    for m in res["modes"]:
        runs = res["runs"][m]
        for key, what in (("images_per_s", "end to end"), ("steady_images_per_s", "steady")):
            local = {c: v[key] for c, v in runs.items() if c.startswith("local") and v.get(key)}
            if not (runs.get("ray-2") or {}).get(key) or not local:
                continue
            best = max(local, key=local.get)
            ratio = runs["ray-2"][key] / local[best]
            out.append({"target": f"{m}, {what}: ray at 2 workers within 15 % of the best local setting",
                        "status": "PASS" if ratio >= 0.85 else "MISS",
                        "measured": f"ray-2 {runs['ray-2'][key]:.3f} vs {best} {local[best]:.3f} images/s "
                                    f"= {ratio:.2f}x"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0",
                   help="a bundle (default efficientnet_lite0: models/ or $SCORECAM_MODELS, else bench's cache)")
    p.add_argument("--images", type=int, default=24, help="distinct images (default 24)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--machine", default=None, help="results name (default: from the CPU model and core count)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--note", default="", help="a note for the table (e.g. 'busy machine')")
    p.add_argument("--check-targets", action="store_true", help="print the target as PASS/MISS")
    args = p.parse_args(argv)

    from runtime.engine import cpu_count

    model = resolve_model(args.model)
    cpus = cpu_count()
    machine = args.machine or f"{platform.machine()}-{cpus}c"
    res = {"machine": machine, "model": model, "model_name": Path(model).name, "images": args.images, "cpus": cpus,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note, "modes": args.modes,
           "configs": args.configs, "runs": {m: {} for m in args.modes}}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        data = Path(tmp) / "images"
        make_images(data, args.images)
        use_ray = any(c.startswith("ray") for c in args.configs)
        with ray_head(cpus) if use_ray else contextlib.nullcontext((None, _env())) as (address, ray_env):
            for m in args.modes:  # within a mode, the configs run one after the other, side by side
                for i, c in enumerate(args.configs):
                    flags = CONFIGS[c] + MODES[m]
                    env = _env()
                    if c.startswith("ray"):
                        flags, env = flags + ["--address", address], ray_env
                    log(f"{m} {c}: {' '.join(flags)}")
                    r = run_one(model, data, Path(tmp) / f"out-{m}-{c}", flags, env, retries=60 if i == 0 else 10)
                    if r["done"] + r["failed"] != args.images or r["failed"]:
                        raise RuntimeError(f"{m} {c}: {r}")
                    r["images_per_s"] = round(args.images / r["wall_s"], 4)
                    res["runs"][m][c] = r
                    log(f"  {r['wall_s']:.1f} s, {r['images_per_s']:.3f} images/s")
    res["targets"] = targets(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batch-{machine}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    (args.out / f"batch-{machine}.md").write_text(md)
    print(md)
    if args.check_targets:
        for t in res["targets"]:
            print(f"{t['status']}: {t['target']} ({t['measured']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
