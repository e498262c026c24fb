"""numpy's BLAS kept to one thread while an explanation runs: ONNX Runtime's threads own the cores.

After each run ONNX Runtime's intra-op threads spin for a while waiting for the next one; a numpy product
big enough for OpenBLAS to start its own threads in that window (the k-means of ``select="cover"``, the
kernel fill, the bilinear upsampling) makes both thread pools fight over the same cores. Measured on a
2-core CPU with Lite0: ``max_channels=16, fill="kernel"`` took 144 ms with OpenBLAS on two threads and 89 ms
on one. The numpy work of an explanation is a few small products, so one thread costs nothing there.

:func:`one_blas_thread` is a re-entrant, thread-safe context manager: the first caller in saves the
current OpenBLAS thread count and sets 1, the last one out restores it. It finds OpenBLAS among the
libraries the process has loaded (numpy's bundled ``scipy_openblas``, or a system OpenBLAS); with another
BLAS, or where the library cannot be found, it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: (setter, getter) symbol pairs of the OpenBLAS builds numpy ships or links
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))

_lock = threading.Lock()
_depth = 0
_saved: int | None = None
_api: tuple | None | bool = None  # (set, get), False when there is none


def _openblas() -> tuple | None:
    """(set_num_threads, get_num_threads) of the loaded OpenBLAS, or None."""
    global _api
    if _api is None:
        _api = False
        try:
            import numpy as np

            np.dot(np.ones((2, 2)), np.ones((2, 2)))  # numpy loads its BLAS lazily on some builds
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for setter, getter in _SYMBOLS:
                if hasattr(lib, setter) and hasattr(lib, getter):
                    set_, get_ = getattr(lib, setter), getattr(lib, getter)
                    set_.argtypes, set_.restype, get_.restype = [ctypes.c_int], None, ctypes.c_int
                    _api = (set_, get_)
                    break
            if _api:
                break
    return _api or None


def blas_threads() -> int | None:
    """OpenBLAS's current thread count (None without OpenBLAS)."""
    api = _openblas()
    return int(api[1]()) if api else None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """OpenBLAS on one thread inside the block (re-entrant and thread-safe; see the module doc)."""
    global _depth, _saved
    api = _openblas()
    if api is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _saved = int(api[1]())
            if _saved != 1:
                api[0](1)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                if _saved != 1:
                    api[0](_saved)
                _saved = None
