"""Long runs (issue 16): 1,000 explanations in one process (max_channels=16, mixed sizes and formats):
RSS after the 1,000th within 5 % of RSS after the 100th; open file descriptors do not grow.

Run in a fresh interpreter (``python -m tests.soak``) so the figures are the explainer's alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_thousand_explanations_keep_memory_and_files_flat():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "tests.soak", "--n", "1000", "--max-channels", "16"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    marks = {m["n"]: m for m in report["marks"]}
    print(json.dumps(report))  # the figures, for the record (pytest -s)
    assert marks[1000]["rss_mib"] <= 1.05 * marks[100]["rss_mib"]
    assert marks[1000]["fds"] <= marks[100]["fds"]
