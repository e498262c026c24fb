"""Threads and processes (issue 16): one Explainer shared by 8 threads gives exactly the maps of a serial
run; sessions made on first use are made once under a race; a process forked after load explains
correctly on sessions of its own and can drop the Explainer without hanging on the parent's thread pools."""

from __future__ import annotations

import gc
import multiprocessing as mp
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime import Explainer
from runtime.methods import METHODS
from tests.bundles import make_bundle, photo

THREADS = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("threads") / "b", channels=24)


def _jobs() -> list[tuple[np.ndarray, int]]:
    """48 (image, top-k) pairs: different sizes and contents, so threads really do different work."""
    return [(photo(24 + 7 * (i % 5), 30 + 11 * (i % 4), seed=i), 1 + i % 3) for i in range(48)]


def _run(ex: Explainer, job):
    img, k = job
    return [(r.class_index, r.saliency, r.cam, r.weights, r.probability) for r in ex.explain(img, top_k=k)]


def _same(a, b) -> bool:
    """Bit for bit: the same settings, sessions and shapes in every thread (numpy's BLAS held to one thread inside
    an explanation), so equal by construction; a difference would be a race."""
    return len(a) == len(b) and all(x[0] == y[0] and x[4] == y[4] and all(np.array_equal(p, q) for p, q in
                                                                           zip(x[1:4], y[1:4], strict=True))
                                     for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("max_channels", [None, 8])
def test_eight_threads_give_exactly_the_serial_maps(bundle, preset, max_channels):
    jobs = _jobs()
    serial = [_run(Explainer(bundle, device="cpu", preset=preset, max_channels=max_channels, batch_size=5), j)
              for j in jobs]
    shared = Explainer(bundle, device="cpu", preset=preset, max_channels=max_channels, batch_size=5)
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda j: _run(shared, j), jobs))
    assert all(_same(s, t) for s, t in zip(serial, threaded, strict=True))


def test_sessions_made_on_first_use_are_made_once(bundle):
    ex = Explainer(bundle, device="cpu")
    gate = threading.Barrier(THREADS)

    def grab(_):
        gate.wait()
        return ex.engine.classifier, ex.engine.features

    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(grab, range(THREADS)))
    assert len({id(c) for c, _ in got}) == 1 and len({id(f) for _, f in got}) == 1
    # the methods' own scoring graphs (SS-CAM's noise input) too, and their maps match a serial run
    x = np.asarray(ex.explain(photo(), top_k=1)[0].saliency)  # warm the main session
    assert x.shape == ex.input_size
    from runtime import images

    xt = images.preprocess(photo(), ex.pre)
    want = METHODS["sscam"].fn(Explainer(bundle, device="cpu"), xt, 1, n=2, sigma=0.5, seed=3)

    def sscam(_):
        gate.wait()
        return METHODS["sscam"].fn(ex, xt, 1, n=2, sigma=0.5, seed=3)

    with ThreadPoolExecutor(THREADS) as pool:
        maps = list(pool.map(sscam, range(THREADS)))
    assert len(ex.engine._extra) == 1
    assert all(np.array_equal(m, want) for m in maps)


# ------------------------------------------------------------------------------------------- fork


def _child(ex: Explainer, img, queue) -> None:
    inherited = bool(ex.engine._scorers)  # must be empty: the parent's sessions were dropped at the fork
    r = ex.explain(img, top_k=2)
    made = len(ex.engine._scorers)
    del ex, r[0].weights
    gc.collect()
    queue.put((inherited, made, [x.saliency for x in r]))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_after_load(bundle):
    ex = Explainer(bundle, device="cpu", threads=2)
    img = photo(40, 50, seed=2)
    want = [r.saliency for r in ex.explain(img, top_k=2)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(ex, img, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for inherited, made, maps in results:
        assert not inherited and made == 1
        assert all(np.array_equal(a, b) for a, b in zip(maps, want, strict=True))
    # the parent's Explainer is untouched by its children
    assert all(np.array_equal(a.saliency, b) for a, b in zip(ex.explain(img, top_k=2), want, strict=True))


_HELD: dict[str, Explainer] = {}  # the only reference, so that a child can really destroy the Explainer


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_child_may_destroy_an_explainer_it_never_used(bundle):
    """Destroying an inherited ONNX Runtime session joins the parent's thread pool, which can hang (a race:
    seen once in three tries with EfficientNet-Lite0 and threads=2 without the engine's fork hook); the
    engine never destroys an inherited session, so dropping the Explainer in a child is safe."""
    _HELD["ex"] = Explainer(bundle, device="cpu", threads=2, max_channels=16)
    _HELD["ex"].explain(photo(), top_k=1)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_drop)
    p.start()
    p.join(30)
    if p.exitcode is None:
        p.kill()
    _HELD.clear()
    assert p.exitcode == 0


def _drop() -> None:
    ref = weakref.ref(_HELD["ex"])
    _HELD.clear()
    gc.collect()
    assert ref() is None  # the Explainer (and its engine) really went
