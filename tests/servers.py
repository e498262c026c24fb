"""A real ``python -m runtime.serve`` subprocess on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m runtime.serve ARGS --port P`` with this checkout on PYTHONPATH; log kept in a temp file."""

    def __init__(self, *args: str, python: str = sys.executable, env: dict | None = None, ready: bool = True,
                 timeout: float = 120.0, installed: bool = False) -> None:
        """``installed``: run the package installed in ``python``'s environment, not this checkout."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="scorecam-serve-", suffix=".log", delete=False)
        full_env = dict(os.environ, PYTHONPATH="" if installed else str(ROOT), **(env or {}))
        self.proc = subprocess.Popen([python, "-m", "runtime.serve", *map(str, args), "--port", str(self.port)],
                                     cwd=tempfile.gettempdir() if installed else ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if ready:
            self.wait_ready(timeout)

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout}s:\n{self.log}")

    def metric(self, name: str, **labels) -> float:
        """The value of one sample of ``/metrics`` (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name or (want and key.startswith(name + "{") and all(
                    f'{k}="{v}"' in key for k, v in labels.items())):
                return float(value)
        return 0.0

    def wait_metric(self, name: str, predicate, timeout: float = 60.0, **labels) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.metric(name, **labels)
            if predicate(v):
                return v
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} never satisfied the condition (last {v})\n{self.log[-3000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
