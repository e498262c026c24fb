"""``python -m bench.serve``: the explain service under load, side by side with the in-process API.

1. Overhead at concurrency 1: the same photo explained by ``Explainer.explain(path)`` in this process
   and by ``POST /v1/models/NAME:explain`` (JSON, base64 image in, base64 float32 saliency out),
   alternately, one at a time, so drift on a busy machine hits both; medians compared (target <= 5 %).
2. Throughput and p50/p95 latency at 1, 4 and 16 concurrent clients, exact and ``max_channels=64``.
3. A soak: 16 clients for ``--seconds`` (60) against ``--queue-size 16``: every answer must be 200 or
   429 (by design), and the server's RSS at the end within 5 % of its RSS at the 10th second.

The server is a real ``python -m runtime.serve`` subprocess on a free loopback port (``--max-concurrency 1``:
one explanation uses every core). Results: ``bench/results/serve-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .machine import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODES = {"exact": None, "mc64": 64}


def log(msg: str) -> None:
    print(f"[bench.serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    i = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[i]


class Server:
    def __init__(self, model: str, queue_size: int, extra: list[str]) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", model, "--port", str(self.port),
                                      "--queue-size", str(queue_size), "--max-concurrency", "1", "--timeout", "900",
                                      "--log-level", "warning", *extra], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready in 300 s")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(120)


def body(image_b64: str, max_channels: int | None) -> bytes:
    params = {"saliency_encoding": "b64"}
    if max_channels:
        params["max_channels"] = max_channels
    return json.dumps({"instances": [{"image": {"b64": image_b64}}], "parameters": params}).encode()


def overhead(server: Server, name: str, model: str, image: Path, reps: int) -> dict:
    """Alternate in-process and served explanations, one at a time; medians per mode."""
    import httpx

    from runtime import Explainer

    out = {}
    image_b64 = base64.b64encode(image.read_bytes()).decode()
    with httpx.Client(timeout=900) as client:
        for mode, mc in MODES.items():
            ex = Explainer(model, max_channels=mc)
            ex.explain(image)  # warm both sides
            client.post(f"{server.url}/v1/models/{name}:explain", content=body(image_b64, mc),
                        headers={"Content-Type": "application/json"}).raise_for_status()
            api, served, edge = [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                ex.explain(image)
                api.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = client.post(f"{server.url}/v1/models/{name}:explain", content=body(image_b64, mc),
                                headers={"Content-Type": "application/json"})
                served.append(time.perf_counter() - t0)
                r.raise_for_status()
                inside = r.json()["explanations"][0]["results"][0]["seconds"]  # Explainer.explain in the server
                edge.append(served[-1] / inside - 1)  # the same request: HTTP, JSON, base64, queue, decode
            a, s = statistics.median(api), statistics.median(served)
            out[mode] = {"api_median_s": a, "served_median_s": s, "overhead": s / a - 1, "reps": reps,
                         "edge_overhead_median": statistics.median(edge), "api_s": api, "served_s": served}
            log(f"overhead {mode}: api {a:.3f}s served {s:.3f}s -> {100 * (s / a - 1):+.1f}%; round trip over the "
                f"server's own explain time {100 * statistics.median(edge):+.1f}%")
            del ex
    return out


def load(server: Server, name: str, image: Path, clients: int, requests: int | None, seconds: float | None,
         mc: int | None, sample_rss: bool = False) -> dict:
    """``clients`` threads posting back to back, until ``requests`` are done or ``seconds`` passed."""
    import httpx

    payload = body(base64.b64encode(image.read_bytes()).decode(), mc)
    url = f"{server.url}/v1/models/{name}:explain"
    lock = threading.Lock()
    lat: list[float] = []
    statuses: dict[str, int] = {}
    issued = [0]
    t_start = time.perf_counter()
    stop_at = t_start + seconds if seconds else None
    rss: list[tuple[float, float]] = []

    def take() -> bool:
        with lock:
            if requests is not None and issued[0] >= requests:
                return False
            if stop_at is not None and time.perf_counter() >= stop_at:
                return False
            issued[0] += 1
            return True

    def worker() -> None:
        with httpx.Client(timeout=900) as c:
            while take():
                t0 = time.perf_counter()
                try:
                    r = c.post(url, content=payload, headers={"Content-Type": "application/json"})
                    code = str(r.status_code)
                    if r.status_code == 429:
                        time.sleep(min(float(r.headers.get("Retry-After", 1)), 1.0))
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == "200":
                        lat.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    health: list[float] = []
    with httpx.Client(timeout=30) as probe:
        while any(t.is_alive() for t in threads):
            if sample_rss:  # the soak: the server's RSS, and how fast liveness answers while it works
                rss.append((time.perf_counter() - t_start, rss_mb(server.proc.pid)))
                t0 = time.perf_counter()
                probe.get(server.url + "/v2/health/live")
                health.append(time.perf_counter() - t0)
            time.sleep(0.5)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    res = {"clients": clients, "completed": len(lat), "wall_s": wall, "throughput_per_s": len(lat) / wall,
           "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "statuses": statuses}
    if sample_rss and rss:
        at10 = next((m for t, m in rss if t >= 10.0), rss[0][1])
        res.update(rss_at_10s_mb=at10, rss_end_mb=rss[-1][1], rss_growth=rss[-1][1] / at10 - 1,
                   rss_max_mb=max(m for _, m in rss), health_p50_s=pct(health, 50), health_p95_s=pct(health, 95),
                   health_max_s=max(health))
    return res


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def markdown(res: dict) -> str:
    lines = [f"# Explain service benchmark ({res['date']})", "",
             f"Machine: {res['machine']}. Model `{res['model']}`, photo `{res['image']}`; server: "
             "`python -m runtime.serve MODEL --max-concurrency 1 --queue-size 16` on loopback; clients: httpx "
             "threads posting V1 `:explain` JSON (base64 image in, base64 float32 saliency out).", "",
             "## Overhead over the in-process API (concurrency 1, alternating, medians)", "",
             "| mode | pairs | API s | served s | overhead | round trip / server's explain time |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, o in res["overhead"].items():
        edge = o.get("edge_overhead_median")
        lines.append(f"| {mode} | {o['reps']} | {o['api_median_s']:.3f} | {o['served_median_s']:.3f} | "
                     f"{100 * o['overhead']:+.1f} % | {'' if edge is None else f'{100 * edge:+.1f} %'} |")
    lines += ["", "## Throughput and latency", "",
              "| mode | clients | requests | throughput /s | p50 s | p95 s | statuses |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in res["load"]:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['completed']} | {row['throughput_per_s']:.2f} | "
                     f"{row['p50_s']:.3f} | {row['p95_s']:.3f} | {row['statuses']} |")
    s = res["soak"]
    lines += ["", f"## Soak: {s['clients']} clients for {res['soak_seconds']:g} s ({s['mode']})", "",
              f"- answers: {s['statuses']}; unexpected (not 200/429): {s['unexpected']}",
              f"- server RSS: {s.get('rss_at_10s_mb', float('nan')):.0f} MB at 10 s, "
              f"{s.get('rss_end_mb', float('nan')):.0f} MB at the end "
              f"({100 * s.get('rss_growth', float('nan')):+.1f} %), "
              f"max {s.get('rss_max_mb', float('nan')):.0f} MB",
              f"- `GET /v2/health/live` while it worked: p50 {1000 * s.get('health_p50_s', float('nan')):.1f} ms, "
              f"p95 {1000 * s.get('health_p95_s', float('nan')):.1f} ms, "
              f"max {1000 * s.get('health_max_s', float('nan')):.1f} ms",
              "", "## Targets", "", "| target | status | measured |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {'PASS' if t['ok'] else 'MISS'} | {t['measured']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", help="bundle dir or name under models/ "
                                                                  "(default efficientnet_lite0)")
    p.add_argument("--image", type=Path, default=ROOT / "samples" / "chelsea.png")
    p.add_argument("--reps", type=int, default=7, help="alternating pairs per mode for the overhead (default 7)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per load level (default: 2 x clients, at least 6)")
    p.add_argument("--seconds", type=float, default=60.0, help="soak duration (default 60)")
    p.add_argument("--soak-mode", choices=list(MODES), default="mc64")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--out", type=Path, default=None, help="result stem (default bench/results/serve-<host>)")
    p.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--overhead-only", action="store_true", help="only the overhead comparison (no load, no soak)")
    args = p.parse_args(argv)

    from runtime.bundle import resolve_model_path
    from runtime.serve.models import find_models

    model = str(resolve_model_path(args.model))
    name = find_models([model])[0].name
    server = Server(model, 16, [])
    log(f"server pid {server.proc.pid} on {server.url}, model {name}")
    try:
        over = overhead(server, name, model, args.image, args.reps)
        if args.overhead_only:
            server.stop()
            res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                   "model": name, "overhead": over, "command": "python -m bench.serve " + " ".join(sys.argv[1:])}
            stem = args.out or RESULTS / f"serve-overhead-{platform.node() or 'host'}"
            Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
            return 0
        rows = []
        for mode, mc in MODES.items():
            for c in args.levels:
                n = args.requests or max(6, 2 * c)
                row = load(server, name, args.image, c, n, None, mc)
                row["mode"] = mode
                rows.append(row)
                log(f"{mode} x{c}: {row['throughput_per_s']:.2f}/s p50 {row['p50_s']:.3f}s p95 {row['p95_s']:.3f}s "
                    f"{row['statuses']}")
        soak = load(server, name, args.image, 16, None, args.seconds, MODES[args.soak_mode], sample_rss=True)
        soak["mode"] = args.soak_mode
        soak["unexpected"] = sum(v for k, v in soak["statuses"].items() if k not in ("200", "429"))
        log(f"soak: {soak['statuses']} rss {soak.get('rss_at_10s_mb', 0):.0f} -> {soak.get('rss_end_mb', 0):.0f} MB")
    finally:
        code = server.stop()
    o1 = over["exact"]["overhead"]
    targets = [
        {"target": "served overhead over the in-process API at concurrency 1 <= 5 % (exact)", "ok": o1 <= 0.05,
         "measured": f"{100 * o1:+.1f} % (mc64: {100 * over['mc64']['overhead']:+.1f} %)"},
        {"target": "60 s with 16 clients: zero unexpected errors (only 429s)", "ok": soak["unexpected"] == 0,
         "measured": f"{soak['statuses']}"},
        {"target": "RSS growth from the 10th second to the end < 5 %", "ok": soak.get("rss_growth", 1) < 0.05,
         "measured": f"{100 * soak.get('rss_growth', float('nan')):+.1f} %"},
        {"target": "SIGTERM at the end: exit 0", "ok": code == 0, "measured": f"exit {code}"},
    ]
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "model": name, "image": str(args.image.relative_to(ROOT) if args.image.is_relative_to(ROOT) else args.image),
           "overhead": over, "load": rows, "soak": soak, "soak_seconds": args.seconds, "targets": targets,
           "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = args.out or RESULTS / f"serve-{platform.node() or 'host'}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    Path(f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 1 if args.check_targets and not all(t["ok"] for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
