"""runtime.blas: numpy's OpenBLAS on one thread during an explanation, restored after (nested, threads)."""

from __future__ import annotations

import threading

import pytest
from conftest import require_tool

from runtime import Explainer
from runtime.blas import blas_threads, one_blas_thread
from tests.bundles import make_bundle, photo


@pytest.fixture()
def openblas():
    n = blas_threads()
    require_tool(n is not None, "numpy built on OpenBLAS (numpy's PyPI wheels are)")
    from runtime.blas import _openblas

    _openblas()[0](2)  # a known starting point, so "restored" means something even on a 1-core machine
    yield 2
    _openblas()[0](n)


def test_one_thread_inside_restored_after_even_nested(openblas):
    assert blas_threads() == openblas
    with one_blas_thread():
        assert blas_threads() == 1
        with one_blas_thread():
            assert blas_threads() == 1
        assert blas_threads() == 1
    assert blas_threads() == openblas
    with pytest.raises(RuntimeError), one_blas_thread():
        raise RuntimeError("boom")
    assert blas_threads() == openblas


def test_overlapping_threads_restore_only_when_the_last_leaves(openblas):
    inside, release = threading.Event(), threading.Event()

    def hold():
        with one_blas_thread():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    with one_blas_thread():
        assert blas_threads() == 1
    assert blas_threads() == 1  # the other thread is still inside
    release.set()
    t.join(10)
    assert blas_threads() == openblas


def test_an_explanation_runs_with_one_blas_thread_and_restores_it(openblas, tmp_path, monkeypatch):
    seen = []
    import runtime.explainer as explainer_mod

    real = explainer_mod.Explainer._explain_tensor

    def spy(self, *a, **k):
        seen.append(blas_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(explainer_mod.Explainer, "_explain_tensor", spy)
    r = Explainer(make_bundle(tmp_path / "b"), device="cpu").explain(photo())[0]
    assert seen == [1] and blas_threads() == openblas and r.seconds > 0
