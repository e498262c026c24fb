"""``python -m bench.onegraph``: the one-graph explainer vs the Python engine, side by side in one run.

For one model and one photo (at the network's size), exact and ``--max-channels N``: the median time of
``Explainer.explain_tensor(x)`` and of one run of the explainer graph (``python -m exporter explainer``) on the
same pixels, interleaved repeat by repeat so both see the same machine load; the graph's file size against the
classifier's; optionally the same graph in Node.js (examples/node, onnxruntime-node) and in headless Chromium
(examples/web, onnxruntime-web wasm, one thread). Needs no torch. Results: ``bench/results/onegraph-<machine>.md``
and ``.json``.

Targets (issue #12): graph time <= 1.15 x the Python engine's (exact, CPU), file <= 1.1 x the classifier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .machine import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def log(msg: str) -> None:
    print(f"[onegraph {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run(model: str, photo: Path, budgets: list[int | None], repeats: int, node: bool, browser: bool,
        preset: str = "paper") -> dict:
    import onnxruntime as ort

    from exporter.explainer_graph import CLASS_INDEX, PIXELS, Options, build_explainer
    from runtime import Explainer, images
    from runtime.thirdparty import open_model

    bundle = open_model(model)
    rgb = images.resize_rgb(images.load_image(photo), bundle.meta.preprocessing.input_size)
    classifier_bytes = os.path.getsize(bundle.model_path)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="onegraph-"))
    from PIL import Image

    Image.fromarray(rgb).save(tmp / "photo.png")
    for budget in budgets:
        label = f"mc{budget}" if budget else "exact"
        graph = build_explainer(bundle, Options(preset, budget, fill="zero" if budget else None))
        data = graph.SerializeToString()
        (tmp / f"{label}.onnx").write_bytes(data)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        ex = Explainer(model, device="cpu", preset=preset, max_channels=budget, fill="zero")  # the graph's fill
        x = ex.pre.apply(rgb)[None]
        feeds = {PIXELS: rgb[None], CLASS_INDEX: np.array([-1], np.int64)}
        sess.run(None, feeds)  # warm-up, both
        ref = ex.explain_tensor(x)[0]
        t_py, t_graph, c_py, c_graph = [], [], [], []  # wall seconds; CPU seconds of this process (all threads)
        for i in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            ref = ex.explain_tensor(x)[0]
            t_py.append(time.perf_counter() - t0)
            c_py.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            sal, cls, _ = sess.run(None, feeds)
            t_graph.append(time.perf_counter() - t0)
            c_graph.append(time.process_time() - c0)
            log(f"{label} repeat {i + 1}/{repeats}: python {t_py[-1]:.2f} s ({c_py[-1]:.2f} CPU s), "
                f"graph {t_graph[-1]:.2f} s ({c_graph[-1]:.2f} CPU s)")
        err = float(np.abs(sal[0] - ref.saliency).max())
        ref.saliency.astype("<f4").tofile(tmp / f"{label}.f32")
        (tmp / f"{label}.json").write_text(json.dumps({
            "model": f"{label}.onnx", "image": "photo.png", "saliency": f"{label}.f32", "class_index": -1,
            "expected_class": ref.class_index, "tolerance": 1e-4, "repeats": repeats}))
        row = {"budget": label, "channels_run": ref.channels_used, "constant": ref.channels_skipped,
               "python_s": t_py, "graph_s": t_graph, "python_median_s": _median(t_py),
               "graph_median_s": _median(t_graph), "ratio": _median(t_graph) / _median(t_py),
               "python_cpu_s": c_py, "graph_cpu_s": c_graph,
               "cpu_ratio": _median(c_graph) / _median(c_py),
               "max_abs_diff": err, "class_index": int(cls[0]), "python_class": ref.class_index,
               "graph_bytes": len(data), "size_ratio": len(data) / classifier_bytes}
        if node:
            row.update(_node(tmp / f"{label}.json"))
        if browser:
            row.update(_browser(tmp, label, rgb, ref))
        rows.append(row)
        del sess, ex
    return {"model": str(model), "photo": photo.name, "preset": preset, "repeats": repeats,
            "classifier_bytes": classifier_bytes, "rows": rows, "threads": "ONNX Runtime default",
            "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()),
            "onnxruntime": ort.__version__}


def _node(ref: Path) -> dict:
    log(f"node: {ref.name}")
    proc = subprocess.run(["node", "explain.mjs", "--check", str(ref)], cwd=ROOT / "examples" / "node",
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"node_error": (proc.stdout + proc.stderr).strip()[-300:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"node_s": [m / 1000 for m in out["ms"]], "node_median_s": _median([m / 1000 for m in out["ms"]]),
            "node_max_abs_diff": out["max_abs_diff"]}


def _browser(tmp: Path, label: str, rgb: np.ndarray, ref) -> dict:
    """The same graph in headless Chromium (Debian's), onnxruntime-web wasm, one thread."""
    import functools
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    web = ROOT / "examples" / "web"

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                          ".wasm": "application/wasm"}

        def translate_path(self, path: str) -> str:
            if path.startswith("/model/"):
                return str(tmp / Path(path.split("?")[0]).name)
            return super().translate_path(path)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(web)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"browser: {label}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html?model=/model/{label}.onnx")
            page.wait_for_function("document.body.dataset.ready", timeout=600_000)
            times, err, cls = [], 0.0, -1
            for _ in range(int(os.environ.get("ONEGRAPH_BROWSER_REPEATS", "1"))):
                got = page.evaluate("""async (rgb) => {
                    const r = await window.scorecam.explainPixels(rgb, -1);
                    return {classIndex: r.classIndex, saliency: Array.from(r.saliency), ms: r.ms};
                }""", rgb.reshape(-1).tolist())
                times.append(got["ms"] / 1000)
                cls = got["classIndex"]
                err = float(np.abs(np.asarray(got["saliency"], np.float32).reshape(ref.saliency.shape)
                                   - ref.saliency).max())
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return {"browser_s": times, "browser_median_s": _median(times), "browser_max_abs_diff": err,
            "browser_class": cls}


def markdown(res: dict) -> str:
    lines = [f"# One-graph explainer vs the Python engine ({res['date']})", "",
             f"{res['model']}, {res['photo']} at the network's size, preset {res['preset']}, top-1 class; "
             f"{res['cpu']}, {res['cores']} cores, onnxruntime {res['onnxruntime']}, {res['threads']} threads; "
             f"median of {res['repeats']} repeats, Python and graph interleaved. Classifier "
             f"{res['classifier_bytes'] / 1e6:.2f} MB.", "",
             "| channels | scored (constant in A) | Python s | graph s | graph / Python | CPU s graph / Python | "
             "Node s | browser s | file MB | file / classifier | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        node = f"{r['node_median_s']:.2f}" if "node_median_s" in r else "-"
        web = f"{r['browser_median_s']:.2f}" if "browser_median_s" in r else "-"
        lines.append(f"| {r['budget']} | {r['channels_run']} ({r['constant']} constant) | {r['python_median_s']:.2f} | "
                     f"{r['graph_median_s']:.2f} | {r['ratio']:.3f} | {r.get('cpu_ratio', float('nan')):.3f} | "
                     f"{node} | {web} | {r['graph_bytes'] / 1e6:.2f} | {r['size_ratio']:.3f} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onegraph", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", help="bundle dir or name (default efficientnet_lite0; "
                   "SCORECAM_MODELS=/path/to/models to find it)")
    p.add_argument("--photo", default=str(ROOT / "samples" / "chelsea.png"))
    p.add_argument("--max-channels", type=int, nargs="*", default=[64], help="budgets besides exact (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="paper")
    p.add_argument("--node", action="store_true", help="also time examples/node (needs its node_modules)")
    p.add_argument("--browser", action="store_true", help="also time examples/web in headless Chromium")
    p.add_argument("--out", default=None, help="results stem (default bench/results/onegraph-<cpu>-<cores>c)")
    args = p.parse_args(argv)
    res = run(args.model, Path(args.photo), [None, *args.max_channels], max(1, args.repeats), args.node,
              args.browser, args.preset)
    md = markdown(res)
    print(md)
    if args.out:
        stem = Path(args.out)
    else:
        import re

        cpu = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", res["cpu"].lower())
        stem = RESULTS / f"onegraph-{re.sub(r'[^a-z0-9]+', '-', cpu).strip('-') or 'cpu'}-{res['cores']}c"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(md)
    log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
