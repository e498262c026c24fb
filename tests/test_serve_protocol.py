"""runtime.serve.protocol without a server: the parsers either return or raise ProtocolError with a
4xx status (fuzzed with hypothesis), and the saliency encodings round-trip."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runtime.serve import protocol as P

LIMITS = P.Limits(max_instances=3, max_pixels=10_000)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)

v1_like = st.fixed_dictionaries({}, optional={
    "instances": st.one_of(json_values, st.lists(st.one_of(
        json_values, st.fixed_dictionaries({"image": st.one_of(json_values, st.fixed_dictionaries(
            {"b64": st.one_of(st.text(max_size=16), st.just(base64.b64encode(b"abc").decode()))}))},
            optional={"targets": json_values, "top_k": json_values, "box": st.one_of(json_values, st.lists(
                st.one_of(st.floats(), st.integers(), st.text(max_size=4)), min_size=3, max_size=5)),
                "detection": json_values})), max_size=5)),
    "parameters": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "saliency_encoding": json_values, "overlay": json_values, "preset": json_values,
        "max_channels": json_values, "alpha": json_values, "select": json_values, "mode": json_values,
        "fill": json_values, "task": json_values, "score_threshold": json_values}))})


@settings(max_examples=300, deadline=None)
@given(v1_like)
@example({"parameters": {"preset": []}, "instances": [{"image": {"b64": "YWJj"}}]})  # was a TypeError (unhashable)
@example({"parameters": {"select": {}}, "instances": [{"image": {"b64": "YWJj"}}]})
def test_parse_v1_returns_or_refuses_with_a_client_status(data):
    try:
        instances, opts = P.parse_v1(data, LIMITS)
    except P.ProtocolError as e:
        assert e.status in (400, 413, 422) and e.message and "\n" not in e.message
        return
    assert 1 <= len(instances) <= LIMITS.max_instances
    assert opts.saliency_encoding in P.ENCODINGS
    for inst in instances:
        assert isinstance(inst.image, bytes) and inst.top_k >= 1
        if inst.box is not None:  # detectors: four finite numbers and exactly one class
            assert len(inst.box) == 4 and all(np.isfinite(inst.box)) and len(inst.targets) == 1
            assert inst.detection is None
        assert inst.detection is None or all(isinstance(d, int) and d >= 0 for d in inst.detection)
    assert opts.task in (None, *P.TASKS)
    assert opts.score_threshold is None or 0 <= opts.score_threshold <= 1


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={"inputs": json_values, "parameters": json_values}) | json_values)
def test_parse_v2_returns_or_refuses_with_a_client_status(data):
    if not isinstance(data, dict):
        data = {"inputs": data}
    try:
        P.parse_v2(data, LIMITS)
    except P.ProtocolError as e:
        assert e.status in (400, 413, 422)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parse_json_and_image_header_refuse_garbage_with_400(raw):
    try:
        P.parse_json(raw)
    except P.ProtocolError as e:
        assert e.status == 400
    with pytest.raises(P.ProtocolError) as info:
        P.check_image_header(raw, "image 0", 10_000)
    assert info.value.status in (400, 413)


@pytest.mark.parametrize("encoding", P.ENCODINGS)
def test_saliency_encodings_round_trip(encoding):
    s = np.random.default_rng(0).random((7, 9), dtype=np.float32)
    enc = json.loads(json.dumps(P.encode_saliency(s, encoding)))
    assert enc["shape"] == [7, 9] and enc["dtype"] == "float32"
    tol = 0 if encoding != "png16" else 0.5 / 65535 + 1e-7
    np.testing.assert_allclose(P.decode_saliency(enc), s, atol=tol, rtol=0)


def test_nan_never_reaches_a_response():
    s = np.array([[np.nan, 0.5]], np.float32)
    assert not np.isnan(P.decode_saliency(P.encode_saliency(s, "b64"))).any()
    assert P.finite(float("nan")) == 0.0


def test_base64_variants_and_targets():
    raw = bytes(range(256))
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
                 "data:image/png;base64," + base64.b64encode(raw).decode()):
        assert P.decode_b64(text, "x") == raw
    assert P.split_query_targets(["281,282", "tabby, tabby cat"]) == ["281", "282", "tabby, tabby cat"]
    with pytest.raises(P.ProtocolError) as info:
        P.parse_options({"max_channels": True})
    assert info.value.status == 422
