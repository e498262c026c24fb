"""Explain a whole dataset: ``python -m runtime.batch MODEL INPUT ... --out DIR`` (resumable).

``local.py`` (processes on this machine) and ``ray_engine.py`` (Ray Data actors on a cluster) both
call :func:`runtime.batch.job.explain_file` per image; ``inputs.py`` expands the INPUT arguments;
``cli.py`` is the command line. pyarrow (for parquet) is imported only when a job runs.
"""

from .job import COLUMNS, BatchError, Settings, Task, explain_file

__all__ = ["COLUMNS", "BatchError", "Settings", "Task", "explain_file"]
