"""Peak memory of one contender, alone in its own process.

``python -m bench.rss '<json Context>' NAME`` sets contender NAME up, runs it once and prints one JSON
line: ``{"peak_rss_mb": VmHWM, "start_rss_mb": RSS after imports, before any setup}``. The parent
(:func:`measure`) starts one such process per contender, so no contender's memory (or torch's
import) shows up in another's number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """VmHWM of this process in MiB (``resource.getrusage`` maxrss where /proc is missing)."""
    v = _status_mb("VmHWM")
    if v is not None:
        return v
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


def measure(ctx, name: str, timeout: float = 3600) -> dict:
    """Run contender ``name`` once in a fresh interpreter; its peak and start RSS (MiB)."""
    from dataclasses import asdict

    arg = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(ctx).items()})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "bench.rss", arg, name], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"peak-RSS run of {name} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .contenders import Context, make

    d = json.loads(argv[0])
    d["bundle"], d["image"] = Path(d["bundle"]), Path(d["image"])
    ctx = Context(**d)
    start = _status_mb("VmRSS")
    run = make(argv[1], ctx)
    run()
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1),
                      "start_rss_mb": round(start, 1) if start is not None else None,
                      "torch_imported": "torch" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
