"""``python -m bench.zoo``: torchvision's and timm's classifier families, as a user meets them.

Each family (random weights, seeded; nothing is downloaded) is exported with BOTH of torch's exporters, as a
user would (``torch.onnx.export``, no metadata): the legacy TorchScript exporter (``dynamo=False``, opset 17)
and the default dynamo exporter (``dynamo=True``: its default opset; the weights in the file when the runtime
cannot read ``.onnx.data`` files, else where the exporter puts them). Then, in a fresh process each, what a
user types:

    python -m runtime.explain FILE IMAGE --max-channels 16 --fill kernel     (no layer given)

and ``--list-layers`` for the automatic layer, its grid and where it sits among the candidates. Each row is
*explained with the automatic layer* (which one, its layout and grid), *explained with a named layer* (when the
automatic choice fails and the family's usual layer works) or *refused* with the one-line reason. A row is
flagged when the automatic layer is the stem or the patch embedding while a deeper candidate exists.

Slow on a small CPU (exports of ViT-B/16, ConvNeXt, MaxViT): every row is cached in ``--cache`` and the
results file, so a second run only does what is missing (``--redo`` to measure again). Results:
``bench/results/zoo.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .bundles import DEFAULT_CACHE, SAMPLES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
EXPORTERS = ("legacy", "dynamo")
FLAGS = ("--max-channels", "16", "--fill", "kernel")


@dataclass(frozen=True)
class Family:
    name: str
    source: str  # torchvision or timm
    model: str  # the constructor / timm name
    size: int = 224
    layer: str | None = None  # the usual target layer (module path), tried when the automatic choice fails
    kwargs: tuple = ()


FAMILIES = [
    Family("resnet", "torchvision", "resnet18", layer="layer4"),
    Family("mobilenet_v3", "torchvision", "mobilenet_v3_small", layer="features"),
    Family("efficientnet", "torchvision", "efficientnet_b0", layer="features"),
    Family("efficientnet_v2", "torchvision", "efficientnet_v2_s", layer="features"),
    Family("regnet", "torchvision", "regnet_y_400mf", layer="trunk_output"),
    Family("convnext", "torchvision", "convnext_tiny", layer="features"),
    Family("swin", "torchvision", "swin_t", layer="norm"),
    Family("maxvit", "torchvision", "maxvit_t", layer="blocks"),
    Family("vit", "torchvision", "vit_b_16", layer="encoder.layers.encoder_layer_11.ln_1"),
    Family("deit", "timm", "deit_tiny_patch16_224", layer="blocks.11.norm1"),
    Family("deit_distilled", "timm", "deit_tiny_distilled_patch16_224", layer="blocks.11.norm1"),
    Family("mobilevit", "timm", "mobilevit_xxs", size=256, layer="final_conv"),
    Family("levit", "timm", "levit_128s", layer="stages.2"),
    Family("efficientvit", "timm", "efficientvit_b0", layer="stages.3"),
    Family("mobilenetv4", "timm", "mobilenetv4_conv_small", layer="conv_head"),
    Family("shufflenet", "torchvision", "shufflenet_v2_x0_5", layer="conv5"),
    Family("squeezenet", "torchvision", "squeezenet1_0", layer="features"),
    Family("densenet", "torchvision", "densenet121", layer="features"),
    Family("googlenet", "torchvision", "googlenet", layer="inception5b",
           kwargs=(("aux_logits", False), ("init_weights", True))),
    Family("inception_v3", "torchvision", "inception_v3", size=299, layer="Mixed_7c",
           kwargs=(("aux_logits", False), ("init_weights", True))),
    Family("mnasnet", "torchvision", "mnasnet0_5", layer="layers"),
]


def log(msg: str) -> None:
    print(f"[bench.zoo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(f: Family):
    """The family's model, random weights (seeded), zero-initialised classifier heads drawn at random."""
    import torch

    torch.manual_seed(0)
    if f.source == "timm":
        import timm

        model = timm.create_model(f.model, pretrained=False)
    else:
        import torchvision

        model = getattr(torchvision.models, f.model)(weights=None, **dict(f.kwargs))
    for m in model.modules():  # torchvision's ViT/Swin heads start at 0: every logit would be 0
        if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model.eval()


def external_data_supported() -> bool:
    """Whether this runtime loads a model whose weights sit beside it (``model.onnx.data``)."""
    import importlib.util

    return importlib.util.find_spec("runtime.external") is not None


def export(f: Family, exporter: str, path: Path) -> dict:
    """Write the family's ONNX file with one of torch's exporters, as a user does; what was done."""
    import torch

    model = build(f)
    x = torch.randn(2 if exporter == "dynamo" else 1, 3, f.size, f.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # no torch.no_grad(): a user exports as is (under no_grad torchvision's attention takes its fused fast path,
    # aten::_native_multi_head_attention, which the legacy exporter cannot translate)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            how = "torch.onnx.export(dynamo=False, opset_version=17), dynamic batch"
        else:
            external = external_data_supported()
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=external,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            how = ("torch.onnx.export(dynamo=True) (default opset), dynamic batch, "
                   + ("weights in model.onnx.data" if external else "external_data=False"))
    return {"export": how, "export_s": round(time.perf_counter() - t0, 1)}


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.explain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def explain(f: Family, path: Path, image: Path, out: Path, env: dict, timeout: float) -> dict:
    """``runtime.explain`` on the file with no layer (then the family's usual layer if that fails)."""
    row: dict = {}
    t0 = time.perf_counter()
    listed = _run([str(path), "--list-layers", "--size", str(f.size), str(f.size)], env, timeout)
    auto = [ln[2:] for ln in listed.stdout.splitlines() if ln.startswith("* ")]
    cands = [ln for ln in listed.stdout.splitlines() if ln.startswith(("* ", "  ")) and "[" in ln]
    row["candidates"] = len(cands)
    if auto:
        row["auto"] = auto[0]
        row["auto_rank"] = next(i for i, ln in enumerate(cands) if ln.startswith("* "))  # 0: the first (stem)
    r = _run([str(path), str(image), *FLAGS, "--json", "--out", str(out)], env, timeout)
    row["explain_s"] = round(time.perf_counter() - t0, 1)
    if r.returncode == 0:
        res = json.loads(r.stdout.splitlines()[0])
        row.update(status="auto", class_index=res["class_index"], passes=res["passes"])
        return row
    row["error"] = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
    if f.layer:
        r2 = _run([str(path), str(image), *FLAGS, "--layer", f.layer, "--json", "--out", str(out)], env, timeout)
        if r2.returncode == 0:
            row.update(status="named", layer=f.layer)
            return row
        row["named_error"] = (r2.stderr.strip().splitlines() or ["(no message)"])[-1]
    row["status"] = "refused"
    return row


def stem_flag(row: dict) -> bool:
    """The automatic layer is the first candidate (stem / patch embedding) while deeper ones exist."""
    return row.get("auto_rank") == 0 and row.get("candidates", 0) > 1


def render(results: dict) -> str:
    lines = ["# The classifier zoo: explained with no layer given", "",
             "Each family (random weights) exported by both of torch's exporters and explained with "
             "`python -m runtime.explain FILE IMAGE --max-channels 16 --fill kernel`, no layer given "
             f"(image: {results.get('image', 'samples/chelsea.png')}). Made by `python -m bench.zoo`.", "",
             "| family | model | exporter | result | automatic layer (layout, grid) | rank / candidates |",
             "|---|---|---|---|---|---:|"]
    done = {"auto": 0, "named": 0, "refused": 0}
    for key in sorted(results["rows"], key=lambda k: ([f.name for f in FAMILIES].index(k.split("/")[0])
                                                     if k.split("/")[0] in [f.name for f in FAMILIES] else 99, k)):
        r = results["rows"][key]
        family, exporter = key.split("/")
        status = r.get("status", "?")
        done[status] = done.get(status, 0) + 1
        what = {"auto": "explained (automatic layer)", "named": f"explained with --layer {r.get('layer')}",
                "refused": "refused: " + r.get("error", "")[:140]}.get(status, status)
        if stem_flag(r):
            what += " **(stem!)**"
        auto = r.get("auto", "").replace("|", "/")
        lines.append(f"| {family} | {r.get('model', '')} | {exporter} | {what} | `{auto}` | "
                     f"{r.get('auto_rank', '')} / {r.get('candidates', '')} |")
    lines += ["", f"Explained with the automatic layer: {done['auto']}; with a named layer: {done['named']}; "
              f"refused: {done['refused']} (of {len(results['rows'])} files). No automatic layer is the stem or the "
              "patch embedding when a deeper candidate exists" +
              (" (none flagged)." if not any(stem_flag(r) for r in results["rows"].values()) else
               ": FLAGGED rows above."), "",
              "Exports: " + "; ".join(sorted({f"{k.split('/')[1]}: {r['export']}" for k, r in results['rows'].items()
                                              if 'export' in r})) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--families", nargs="+", default=[f.name for f in FAMILIES],
                    help="families to survey (default: all: " + ", ".join(f.name for f in FAMILIES) + ")")
    ap.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    ap.add_argument("--image", type=Path, default=SAMPLES / "chelsea.png")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "zoo", help="the exported files (default "
                    "bench/.cache/zoo)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per runtime.explain run (default 3600)")
    ap.add_argument("--redo", action="store_true", help="measure rows already in the results again")
    args = ap.parse_args(argv)
    known = {f.name: f for f in FAMILIES}
    unknown = [n for n in args.families if n not in known]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(known)}")
    path = args.out / "zoo.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    results["image"] = str(Path(args.image).relative_to(ROOT)) if Path(args.image).is_relative_to(ROOT) \
        else str(args.image)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCORECAM_CACHE=str(args.cache / "derived"))
    todo = [(known[n], e) for n in args.families for e in args.exporters]
    for i, (f, exporter) in enumerate(todo, 1):
        key = f"{f.name}/{exporter}"
        if key in results["rows"] and not args.redo:
            continue
        onnx_path = args.cache / exporter / f"{f.name}.onnx"
        row: dict = {"model": f"{f.source} {f.model} @{f.size}"}
        try:
            if not onnx_path.is_file():
                log(f"[{i}/{len(todo)}] exporting {f.name} ({f.model}) with the {exporter} exporter")
                row.update(export(f, exporter, onnx_path))
            else:
                row["export"] = results["rows"].get(key, {}).get("export", "cached file")
            log(f"[{i}/{len(todo)}] explaining {key}")
            row.update(explain(f, onnx_path, args.image, args.cache / "out" / key, env, args.timeout))
        except Exception as e:  # noqa: BLE001 - an export that torch refuses is a row too
            row.update(status="refused", error=f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        log(f"  {key}: {row.get('status')} {row.get('auto', row.get('error', ''))[:120]}")
        results["rows"][key] = row
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "zoo.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
