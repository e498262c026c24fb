"""The ``local`` engine: this machine's cores, no cluster software.

``workers == 1``: one process whose ONNX Runtime session uses every core (intra-op threads).
``workers == N > 1``: N worker processes (spawned, so no ONNX Runtime state crosses a fork), each with
ONE Explainer built once and ``cores // N`` threads. The parent writes one parquet part per finished
chunk of images, so a crash loses at most the chunks in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..engine import cpu_count
from .job import BatchError, Task, explain_files, write_part

_worker: dict = {}


def _init(task: Task) -> None:
    _worker["task"] = task
    _worker["explainer"] = task.explainer()


def _work(sources: Sequence[str]) -> list[dict]:
    return explain_files(_worker["explainer"], sources, _worker["task"])


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def run_local(task: Task, todo: Sequence[str], workers: int, chunk: int,
              on_rows: Callable[[list[dict]], None]) -> None:
    """Explain ``todo`` with ``workers`` processes; every finished chunk becomes a parquet part, then
    ``on_rows(rows)`` (progress) is called."""
    run_id = uuid.uuid4().hex[:12]
    parts = chunks(todo, chunk)

    def done(i: int, rows: list[dict]) -> None:
        write_part(task.out, rows, f"part-{run_id}-{i:06d}.parquet")
        on_rows(rows)

    if workers <= 1:
        explainer = task.explainer()
        for i, sources in enumerate(parts):
            done(i, explain_files(explainer, sources, task))
        return
    threads = task.threads or max(1, cpu_count() // workers)
    task = Task(task.settings, task.classes, task.out, task.device, task.batch_size, threads)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(task,)) as pool:
        pending: dict = {}
        queue = list(enumerate(parts))
        queue.reverse()
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:  # a bounded queue: a million images is fine
                    i, sources = queue.pop()
                    pending[pool.submit(_work, sources)] = i
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    try:
                        rows = f.result()
                    except BrokenProcessPool:
                        raise BatchError("a worker process died (out of memory, killed, or its model failed to "
                                         "load); what was written is kept: run again to resume") from None
                    done(pending.pop(f), rows)
        except BaseException:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            for p in list(getattr(pool, "_processes", {}).values()):  # our own workers, by their pid
                if p.is_alive():
                    os.kill(p.pid, 15)
            raise
