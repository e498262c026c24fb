"""Engine choices that need no model: the default batch size and the device list."""

from types import SimpleNamespace

import pytest

from runtime.engine import CPU, CUDA, Engine, EngineError, providers_for


@pytest.mark.parametrize("provider,size,want", [
    (CPU, (224, 224), 16), (CPU, (448, 448), 4), (CPU, (112, 112), 64), (CPU, (64, 64), 196),
    (CPU, (4000, 4000), 1), (CUDA, (224, 224), 128), (CUDA, (448, 448), 32), (CPU, (32, 32), 256),
])
def test_default_batch_keeps_the_chunk_memory_constant(provider, size, want):
    fake = SimpleNamespace(provider=provider, input_size=size)
    assert Engine.default_batch_size(fake) == want


def test_cpu_is_always_available_and_unknown_devices_are_refused():
    assert providers_for("cpu") == [CPU]
    with pytest.raises(EngineError, match="unknown device"):
        providers_for("tpu")


# ------------------------------------------------------------------- one session for everything
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.bundles import make_bundle

    return make_bundle(tmp_path_factory.mktemp("engine") / "b", size=32, channels=8)


@pytest.mark.parametrize("preset", ["paper", "gradcam", "torchcam", "official"])
def test_main_session_gives_the_plain_graphs_outputs(tiny, preset):
    """Logits and activations come from the scorer (all-zero map, offset 1): the same numbers as the
    plain classifier and feature-graph sessions, for every preset's mask (official's eps is 0)."""
    import numpy as np

    from runtime import Explainer

    ex = Explainer(tiny, device="cpu", preset=preset)
    eng = ex.engine
    x = np.random.default_rng(3).normal(size=(1, 3, 32, 32)).astype(np.float32)
    logits, acts = eng.classify_and_activations(x)
    ex.explain_tensor(x, top_k=2)
    assert eng.fused and not eng._plain  # one session did everything
    assert list(eng._scorers) == [f"{ex.preset.mask.key}/fp32"]
    want_logits = eng.classifier.run(None, {eng.input_name: x})[0]
    want_acts = eng.features.run(None, {eng.features.get_inputs()[0].name: x})[0][0]
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6)
    np.testing.assert_allclose(acts, want_acts, rtol=0, atol=1e-6)
    np.testing.assert_allclose(eng.classify(x), want_logits, rtol=0, atol=1e-6)
    batch = np.concatenate([x, -x])  # more than one image: the plain classifier session
    assert eng.classify(batch).shape == (2, want_logits.shape[1])


def test_a_target_layer_outside_the_classifier_uses_separate_sessions(tiny):
    """A feature graph whose output the classifier does not compute (never written by the exporter,
    but a bundle is only files) still works, through the plain sessions."""
    import numpy as np
    import onnx

    from runtime.bundle import load_bundle

    b = load_bundle(tiny)
    features = onnx.ModelProto()
    features.CopyFrom(b.features)
    old = features.graph.output[0].name
    for node in features.graph.node:
        node.output[:] = ["renamed_target" if o == old else o for o in node.output]
    features.graph.output[0].name = "renamed_target"
    eng = Engine(b.model, features, device="cpu", input_size=(32, 32))
    assert not eng.fused
    x = np.zeros((1, 3, 32, 32), np.float32)
    logits, acts = eng.classify_and_activations(x)
    assert logits.shape[0] == 1 and acts.ndim == 3 and set(eng._plain) == {"classifier", "features"}
