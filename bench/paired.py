"""``python -m bench.paired DIR [DIR ...] [--ref METHOD] [--substrate zero]``: paired differences to a reference.

Reads the per-photo rows that ``python -m bench.evaluation`` writes (``DIR/raw/*.json``) from one or more runs
on the same photos (a method measured in two runs keeps the first run's rows) and prints, for the photos every
method has, each method's mean insertion, deletion and LeRF-MoRF and its paired difference to ``--ref``
(default ``rise:n=4000``): mean, standard error (``sd / sqrt(photos)``) and wins. With several seeds of the
reference (``rise:n=4000:seed=1`` ...) it also prints the difference to the mean of the seeds, whose noise is
lower: how far a method is from RISE(4000)'s expected score, not from one draw of its masks. A method measured
with several seeds (``qrise``, ``qrise:seed=1`` ...) also gets a row of the photo-wise mean of its seeds.
``--methods a,b``: only these methods (and the reference's seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = (("insertion_auc", "insertion"), ("deletion_auc", "deletion"), ("gap", "LeRF-MoRF"))


def load(dirs: list[Path], substrate: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {photo: values}}`` of ``substrate`` from the runs' ``raw/*.json`` (first run wins)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for d in dirs:
        files = sorted((d / "raw").glob("*.json"))
        if not files:
            raise SystemExit(f"error: no results in {d / 'raw'}; run python -m bench.evaluation first")
        seen: dict[str, dict[str, dict[str, float]]] = {}
        for f in files:
            for r in json.loads(f.read_text()):
                if r["substrate"] == substrate:
                    seen.setdefault(r["method"], {})[r["image"]] = r["values"]
        for method, rows in seen.items():
            out.setdefault(method, rows)
    return out


def paired(a: np.ndarray, b: np.ndarray, lower_is_better: bool = False) -> tuple[float, float, int]:
    """(mean, s.e., wins) of ``a - b``; a win is ``a > b`` (``a < b`` with ``lower_is_better``)."""
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se, int((d < 0).sum() if lower_is_better else (d > 0).sum())


def table(rows: dict[str, dict[str, dict[str, float]]], ref: str) -> str:
    if ref not in rows:
        raise SystemExit(f"error: no method {ref!r} in the runs (have: {', '.join(sorted(rows))})")
    photos = sorted(set.intersection(*(set(v) for v in rows.values())))
    seeds = [m for m in rows if m == ref or m.startswith(ref + ":seed=")]
    val = {m: {k: np.array([rows[m][p][k] for p in photos]) for k, _ in METRICS} for m in rows}
    for m in [m for m in rows if ":seed=" not in m and m != ref]:  # a method measured with several seeds
        group = [m] + [s for s in rows if s.startswith(m + ":seed=")]
        if len(group) > 1:
            val[f"{m} (mean of {len(group)} seeds)"] = {k: np.mean([val[s][k] for s in group], axis=0)
                                                         for k, _ in METRICS}
    refs = {"one draw": val[ref]}
    if len(seeds) > 1:
        refs[f"mean of {len(seeds)} seeds"] = {k: np.mean([val[s][k] for s in seeds], axis=0) for k, _ in METRICS}
    head = "| method | " + " | ".join(name for _, name in METRICS)
    lines = [f"{len(photos)} photos; reference {ref!r} (seeds: {', '.join(seeds)}); paired difference: mean "
             "(s.e.) [wins; deletion: a win is lower]", ""]
    for label, r in refs.items():
        lines += [f"against {ref} ({label}):", "", head + " | " + " | ".join(f"{n} − ref" for _, n in METRICS)
                  + " |", "|---" * (1 + 2 * len(METRICS)) + "|"]
        for m in sorted(val, key=lambda m: -val[m]["insertion_auc"].mean()):
            cells = [f"{val[m][k].mean():.3f}" for k, _ in METRICS]
            for k, _ in METRICS:
                mean, se, wins = paired(val[m][k], r[k], lower_is_better=k == "deletion_auc")
                cells.append(f"{mean:+.3f} ({se:.3f}) [{wins}]")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="bench.evaluation output folders (with raw/)")
    ap.add_argument("--ref", default="rise:n=4000", help="the reference method (default rise:n=4000)")
    ap.add_argument("--substrate", default="zero", choices=("zero", "blur"))
    ap.add_argument("--methods", help="comma-separated: compare only these (and the reference's seeds)")
    args = ap.parse_args(argv)
    rows = load(args.dirs, args.substrate)
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",") if m.strip()}
        if keep - set(rows):
            raise SystemExit(f"error: no method {', '.join(sorted(keep - set(rows)))!r} in the runs")
        rows = {m: v for m, v in rows.items() if m in keep or m == args.ref or m.startswith(args.ref + ":seed=")}
    print(table(rows, args.ref))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
