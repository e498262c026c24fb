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
