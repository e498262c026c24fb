"""Bounded, reproducible fuzzing of the input edges (tests/fuzz.py; a longer run: ``python -m tests.fuzz
--minutes 10``): image decoding, bundle metadata, bundle files and the sidecar JSON. Every case ends in
a result or the one-line error of the documented type (ImageError, BundleError); about 6,000 cases."""

from __future__ import annotations

import pytest

from tests import fuzz

CASES = {"image_bytes": 1500, "image_random_bytes": 1000, "image_arrays": 500, "bundle_metadata": 1500,
         "bundle_files": 300, "sidecar": 1000}


@pytest.mark.parametrize("target", sorted(CASES))
def test_fuzz(target):
    ran = fuzz.run(fuzz.TARGETS[target], CASES[target], derandomize=True)
    assert ran >= min(CASES[target], 100)  # it really ran (a small input space may be exhausted early)
