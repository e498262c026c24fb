"""``python -m runtime.batch MODEL INPUT ... --out DIR``: explain a whole dataset, resumably.

Local processes by default (``--engine local``), or Ray Data actors on a Ray cluster (``--engine
ray``). See :mod:`runtime.batch.job` for the output folder; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import thirdparty
from ..cliargs import non_negative_float, one_line, positive_float, positive_int
from ..engine import DEVICES, PRECISIONS, cpu_count
from ..explain import EXIT_USAGE, UsageError, _Parser, add_mode_arguments, parse_cli
from ..scorecam import PRESETS
from . import job
from .inputs import InputError, expand
from .progress import Progress, summary

#: the local engine's default, measured with ``python -m bench.batch`` (README): on the 2-core machine
#: N processes x 1 ONNX Runtime thread beat one process with N threads (see LOCAL_DEFAULT_NOTE)
LOCAL_DEFAULT = "processes"
LOCAL_DEFAULT_NOTE = "one process per core, 1 ONNX Runtime thread each (measured faster than 1 process x all cores)"

EPILOG = """\
output folder DIR (resumable: run the same command again to finish an interrupted job):
  DIR/results.parquet/        parquet parts, one row per image x class: source, sha256, width, height,
                              class_index, label, probability, score, channels_used, seconds, provider,
                              preset, mode, select, fill, passes, map, overlay, error, settings
  DIR/maps/ab/<sha256>.<class>.npy     saliency, float32 [H,W] in [0,1] at the network's input size
  DIR/overlays/ab/<sha256>.<class>.png with --overlays: the heat map over the image, at its size
  DIR/run.json                settings, versions, and one record per run (done, skipped, failed, time)

INPUT: image files, folders (recursive), globs ('data/**/*.jpg', quoted), or manifests (.txt/.lst: one
path per line; .csv/.tsv: a 'path' column or the first one; relative to the manifest's folder).
A file that cannot be read or is not an image becomes a row with an 'error'; the job goes on.

examples:
  python -m runtime.batch efficientnet_lite0 photos/ --out runs/photos
  python -m runtime.batch efficientnet_lite0 val.csv --top-k 3 --max-channels 64 --out runs/val --overlays
  python -m runtime.batch models/efficientnet_lite0 'data/**/*.jpg' --engine ray --workers 8 --out /shared/run
  python -m runtime.batch efficientnet_lite0 data/ --engine ray --address 10.0.0.1:6379 --gpus-per-worker 1 \\
      --out /shared/run

exit status: 0 the job finished (images that failed are rows with an error); 2 bad arguments, model,
settings that differ from DIR's (use --force), or a cluster that cannot be reached; 130 interrupted
(what is written is kept: run again to resume).
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.batch",
                description="Explain a whole dataset with Score-CAM: one row per image and class in a parquet\n"
                            "table, a .npy map per row; resumable; on this machine or a Ray cluster.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="bundle directory, its model.onnx, or a name under models/")
    p.add_argument("inputs", metavar="INPUT", nargs="*", help="image files, folders, globs or manifests")
    p.add_argument("--out", "-o", metavar="DIR", type=Path, default=None, help="output folder (required)")
    p.add_argument("--target", "-t", metavar="C", nargs="+", action="extend", default=None,
                   help="class(es) to explain in every image, by index or label; default: the top-k classes")
    p.add_argument("--top-k", "-k", metavar="K", type=positive_int, default=1,
                   help="without --target, explain each image's K most probable classes (default 1)")
    p.add_argument("--preset", choices=list(PRESETS), default="paper", help="Score-CAM variant (default paper)")
    add_mode_arguments(p)
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32 (default), int8 (the bundle's quantized classifier) or fp16 (CUDA only)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="per worker: auto (CUDA when available, else CPU), cpu or cuda (default auto)")
    p.add_argument("--batch-size", "-b", metavar="N", type=positive_int, default=None,
                   help="masked images per ONNX Runtime call (default: 16 on CPU, 128 on CUDA at 224x224)")
    p.add_argument("--overlays", action="store_true", help="also write overlay PNGs (DIR/overlays/)")
    p.add_argument("--alpha", metavar="A", type=float, default=0.5, help="overlay heat-map opacity (default 0.5)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: processes on this machine (default); ray: Ray Data actors on a Ray cluster")
    p.add_argument("--workers", "-w", metavar="N", type=positive_int, default=None,
                   help=f"local: processes (default: {LOCAL_DEFAULT_NOTE}; 1 = one process, all cores); "
                        "ray: actors, each with its own model (default: the cluster's CPUs less one, or its GPUs "
                        "with --gpus-per-worker)")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="ONNX Runtime threads per worker (default: local: cores / workers; ray: CPUs per worker)")
    p.add_argument("--chunk", metavar="N", type=positive_int, default=None,
                   help="images per task and per parquet part; a crash loses at most one chunk per worker "
                        "(default: up to 16, small enough to keep every worker busy)")
    g = p.add_argument_group("ray engine")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="an existing Ray cluster (e.g. 10.0.0.1:6379, or 'auto'); default: start a local one")
    g.add_argument("--cpus-per-worker", metavar="N", type=positive_float, default=None,
                   help="Ray CPUs reserved per actor (default: 1, less when the cluster has fewer CPUs than "
                        "workers + 1: Ray Data's own tasks need a CPU slot too)")
    g.add_argument("--gpus-per-worker", metavar="N", type=non_negative_float, default=0.0,
                   help="Ray GPUs per actor, fractions allowed (e.g. 0.25: four actors share a GPU; default 0)")
    p.add_argument("--force", action="store_true",
                   help="DIR holds results of other settings: discard them and start again (default: refuse)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: a bar on a terminal, else a line every 30 s)")
    thirdparty.add_arguments(p)
    return p


def _chunk(n: int, workers: int, chunk: int | None) -> int:
    return chunk or max(1, min(16, -(-n // (4 * workers))))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run(args: argparse.Namespace, stdout, stderr) -> int:
    if args.list_layers:
        print(thirdparty.layers_report(args.model, args.size, args.model_output), file=stdout)
        return 0
    if not args.inputs:
        raise UsageError("the following arguments are required: INPUT")
    if args.out is None:
        raise UsageError("the following arguments are required: --out DIR")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.engine == "local" and (args.address or args.cpus_per_worker or args.gpus_per_worker):
        raise UsageError("--address, --cpus-per-worker and --gpus-per-worker are for --engine ray")
    job.pyarrow()
    sources = expand(args.inputs)
    settings = job.Settings.make(args.model, args.target, top_k=args.top_k, preset=args.preset,
                                 max_channels=args.max_channels, select=args.select, mode=args.mode, fill=args.fill,
                                 precision=args.precision, overlays=args.overlays,
                                 alpha=args.alpha, thirdparty=thirdparty.cli_kwargs(args))
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise job.BatchError(f"--out {out} exists and is not a directory")
    job.lock(out)
    try:
        return _run(args, settings, out, sources, stdout, stderr)
    finally:
        job.unlock(out)


def _run(args, settings: job.Settings, out: Path, sources: list[str], stdout, stderr) -> int:
    doc = job.prepare_out(out, settings, args.force)
    doc["versions"] = job.versions()

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=stderr)

    plan = job.plan(out, sources, settings, warn=warn)
    t0 = time.monotonic()
    record = {"started": _now(), "engine": args.engine, "images": plan.total, "skipped": plan.skipped,
              "todo": len(plan.todo), "done": 0, "failed": 0, "status": "running"}
    doc["runs"].append(record)
    job.write_run_json(out, doc)
    bar = Progress(len(plan.todo), stderr, stderr.isatty() if args.progress is None else args.progress)
    counts = {"done": 0, "failed": 0}

    def on_rows(rows: list[dict]) -> None:
        ok, failed = job.count_images(rows)
        counts["done"] += ok
        counts["failed"] += failed
        bar.update(ok + failed, failed)

    status = "interrupted"
    try:
        if plan.todo:
            task = _task(args, settings, out)
            if args.engine == "local":
                _run_local(args, task, plan.todo, on_rows, record)
            else:
                _run_ray(args, task, plan.todo, on_rows, record)
        status = "finished"
    except KeyboardInterrupt:
        bar.finish()
        print(f"error: interrupted; {counts['done'] + counts['failed']} images written are kept: run the same "
              "command again to resume", file=stderr)
        return 130
    finally:
        bar.finish()
        record.update(done=counts["done"], failed=counts["failed"], finished=_now(), status=status,
                      seconds=round(time.monotonic() - t0, 3))
        job.write_run_json(out, doc)
    print(summary(counts["done"], plan.skipped, counts["failed"], time.monotonic() - t0, out / job.RESULTS),
          file=stdout)
    return 0


def _task(args, settings: job.Settings, out: Path) -> job.Task:
    """Validate the model and resolve the targets on the driver (one Explainer, freed before the workers start)."""
    explainer = settings.explainer(device="cpu", batch_size=args.batch_size, threads=1)
    classes = None
    if settings.targets:
        import numpy as np

        classes = tuple(explainer.resolve_targets(list(settings.targets), np.zeros(explainer.num_classes)))
    del explainer
    gc.collect()
    return job.Task(settings, classes, str(out.resolve()), args.device, args.batch_size, args.threads)


def _run_local(args, task: job.Task, todo: Sequence[str], on_rows, record: dict) -> None:
    from ..engine import CUDA, providers_for
    from .local import run_local

    gpu = args.device == "cuda" or (args.device == "auto" and CUDA in providers_for("auto"))
    workers = args.workers or (cpu_count() if LOCAL_DEFAULT == "processes" and not gpu else 1)
    workers = min(workers, len(todo))
    chunk = _chunk(len(todo), workers, args.chunk)
    record.update(workers=workers, chunk=chunk)
    run_local(task, todo, workers, chunk, on_rows)


def _run_ray(args, task: job.Task, todo: Sequence[str], on_rows, record: dict) -> None:
    from .ray_engine import connect, plan_resources, run_ray

    with connect(args.address) as ray:
        workers, cpus, gpus = plan_resources(ray, args.workers, args.cpus_per_worker, args.gpus_per_worker)
        workers = min(workers, len(todo))  # no actor (and no model load) without images to give it
        threads = args.threads or max(1, int(cpus))
        task = job.Task(task.settings, task.classes, task.out, task.device, task.batch_size, threads)
        chunk = _chunk(len(todo), workers, args.chunk)
        record.update(workers=workers, chunk=chunk, cpus_per_worker=cpus, gpus_per_worker=gpus,
                      address=args.address or "local")
        run_ray(task, todo, chunk, ray, workers, cpus, gpus, on_rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.batch`` / ``scorecam-batch``; returns the exit status."""
    stdout, stderr = sys.stdout, sys.stderr
    args = parse_cli(build_parser(), argv, stderr)
    if isinstance(args, int):
        return args
    try:
        return run(args, stdout, stderr)
    except (UsageError, InputError, job.BatchError, *job.USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=stderr)
        return EXIT_USAGE
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or one_line(e)}", file=stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
