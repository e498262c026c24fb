"""The ``ray`` engine: Ray Data on a Ray cluster (an existing one at ``--address``, or a local one).

The pipeline: ``ray.data.from_items(paths)`` -> ``map_batches(ExplainActor, concurrency=workers,
num_cpus=..., num_gpus=...)`` -> ``write_parquet(DIR/results.parquet)``. Each actor builds ONE
Explainer in its constructor (the model is loaded once per actor, never per image) and calls the
same per-image function as the local engine on each path of its batch; it reads the image itself
(so an unreadable file becomes an error row instead of failing a read task) and writes the maps. Ray
writes each finished block as a parquet file while the rest still runs.

Every node must see the model, the images and DIR at the same paths (a shared filesystem), and
must be able to import this package: installed, or on the ``PYTHONPATH`` of the ``ray start`` that
started the node (a local instance started by the job inherits the driver's).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .job import RESULTS, BatchError, Task, explain_files, part_files, to_table


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BatchError("--engine ray needs Ray Data: pip install 'scorecam-onnx[ray]' "
                         "(ray[data] and pyarrow)") from None
    return ray


class ExplainActor:
    """A Ray Data actor: one Explainer per actor, built once; ``__call__`` explains a batch of paths."""

    task: Task  # set on a subclass made per job (see run_ray)

    def __init__(self) -> None:
        self.explainer = self.task.explainer()

    def __call__(self, batch):
        sources = batch.column("source").to_pylist()
        return to_table(explain_files(self.explainer, sources, self.task))


@contextlib.contextmanager
def connect(address: str | None, num_cpus: int | None = None):
    """``ray.init`` at ``address`` (an existing cluster), or a local instance; shut down at the end."""
    ray = ray_module()
    # no runtime_env: workers inherit the environment of the node's raylet (a local instance: the driver's,
    # PYTHONPATH included). A job-level runtime_env would keep Ray from using its prestarted workers: measured
    # 19-28 s against 10-13 s for a tiny job on a busy 2-core machine.
    kwargs = {"logging_level": "ERROR", "log_to_driver": True, "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        text = " ".join(str(e).split())[:300]
        chain, c = [], e
        while c is not None and len(chain) < 8:
            chain.append(c)
            c = c.__cause__ or c.__context__
        if any("Authentication" in type(c).__name__ or "InvalidAuthToken" in str(c) for c in chain):
            text += " (the cluster uses token authentication: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, to its token)"
        raise BatchError(f"cannot connect to {where}: {text}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def plan_resources(ray, workers: int | None, cpus_per_worker: float | None,
                   gpus_per_worker: float) -> tuple[int, float, float]:
    """(workers, CPUs per actor, GPUs per actor) for this cluster.

    Ray Data's own tasks (feeding the blocks, writing parquet) need a CPU slot beside the actors, or
    the pipeline stalls: by default the actors together take the cluster's CPUs less one (shared
    fractionally when there are fewer than the workers asked for), e.g. on 2 CPUs two actors of 0.5.
    """
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus_per_worker and gpus < gpus_per_worker:
        raise BatchError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has {gpus:g} GPUs")
    if workers is None:
        if gpus_per_worker:
            workers = max(1, int(gpus // gpus_per_worker))
        else:
            workers = max(1, int((cpus - 1) // (cpus_per_worker or 1))) if cpus > 1 else 1
    if cpus_per_worker is None:
        free = max(cpus - 1, 0.5)  # one CPU slot for Ray Data's own tasks
        cpus_per_worker = min(1.0, free / workers)
    if workers * cpus_per_worker > cpus:
        raise BatchError(f"{workers} workers x {cpus_per_worker:g} CPUs is more than the Ray cluster's {cpus:g} "
                         "CPUs; lower --workers or --cpus-per-worker")
    return workers, float(cpus_per_worker), float(gpus_per_worker)


def run_ray(task: Task, todo: Sequence[str], chunk: int, ray, workers: int, cpus_per_worker: float,
            gpus_per_worker: float, on_rows: Callable[[list[dict]], None]) -> None:
    """Run the Ray Data pipeline; ``on_rows`` is fed from the parquet files as Ray writes them."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours reports images/s and ETA
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    before = {p.name for p in part_files(task.out)}
    ds = ray.data.from_items([{"source": s} for s in todo],
                             override_num_blocks=max(1, -(-len(todo) // chunk)))
    # the task rides on the class (a subclass made here is pickled by value, with it)
    actor = type("ExplainActor", (ExplainActor,), {"task": task})
    ds = ds.map_batches(actor, batch_size=chunk, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(Path(task.out) / RESULTS, before, stop, on_rows), daemon=True)
    watcher.start()
    try:
        ds.write_parquet(str(Path(task.out) / RESULTS), min_rows_per_file=1)
    except ray.exceptions.RayError as e:  # e.g. an actor could not load the model on its node
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise BatchError(f"the Ray job failed: {(lines[-1] if lines else type(e).__name__)[:300]}") from None
    finally:
        stop.set()
        watcher.join()


def _watch(folder: Path, seen: set[str], stop: threading.Event, on_rows) -> None:
    """Feed ``on_rows`` with the rows of each parquet file Ray finished writing (for the progress bar)."""
    import pyarrow.parquet as pq

    while True:
        last = stop.wait(0.5)
        for p in sorted(folder.glob("*.parquet")):
            if p.name in seen or p.name.startswith((".", "_")):
                continue
            try:
                t = pq.read_table(p, columns=["source", "error"])
            except Exception:  # still being written: next time
                continue
            seen.add(p.name)
            on_rows(t.to_pylist())
        if last:
            return
