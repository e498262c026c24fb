"""Models from the wild (issue 16): the corpus of tests/zoo_models.py, and numerics that must not overflow.

Every corpus model either explains (a finite map in [0,1], the class the original model picks) or
fails with its one-line named reason. A [N,C,1,1] classifier, with or without a trailing Softmax and
at opsets 7-9, gives the same map as the same network with a [N,C] output. Python warnings are
errors in this module: no numpy RuntimeWarning may reach a user.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime import BundleError, Explainer
from runtime.engine import EngineError, NonFiniteError
from runtime.scorecam import PRESETS, channel_spread, maps_from_scores, mask_safe, minmax, weighted_sum
from runtime.thirdparty import format_layers, list_layers
from tests import zoo_models as zoo

pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORECAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40] / 48
    rgb = np.stack([yy, xx, np.exp(-((yy - 0.4) ** 2 + (xx - 0.6) ** 2) * 12)], -1) * 200
    return np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)


def _model(name: str, corpus_dir):
    path = corpus_dir / f"{name}.onnx"
    return path if path.is_file() else zoo.build(name, corpus_dir)


def _source_scores(path, ex: Explainer, img) -> np.ndarray:
    """The ORIGINAL model's output for the image, preprocessed the explainer's way, flattened to [C]."""
    from runtime import images

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.preprocess(images.load_image(img), ex.pre)
    feeds = {sess.get_inputs()[0].name: x}
    return np.asarray(sess.run(None, feeds)[0]).reshape(-1)


@pytest.mark.parametrize("name", list(zoo.CORPUS))
def test_corpus_model_explains_or_names_why_not(name, corpus_dir, image):
    expected = zoo.CORPUS[name][1]
    path = _model(name, corpus_dir)
    if expected != "ok":
        with pytest.raises((BundleError, EngineError), match=expected) as e:
            Explainer(path, device="cpu").explain(image)
        assert "\n" not in str(e.value)
        return
    ex = Explainer(path, device="cpu", batch_size=4)
    results = ex.explain(image, top_k=2)
    assert [o.name for o in ex.bundle.model.graph.output] == ["logits"]
    assert len(ex.bundle.model.graph.output[0].type.tensor_type.shape.dim) == 2
    assert ex.bundle.max_batch is None  # a batch fixed to 1 was made dynamic: masks are scored 4 at a time
    for graph in (ex.bundle.model, ex.bundle.features):
        onnx.checker.check_model(graph, full_check=True)  # valid ONNX for any other consumer too
    for r in results:
        assert np.isfinite(r.saliency).all() and np.isfinite(r.cam).all()
        assert 0.0 <= r.saliency.min() and r.saliency.max() <= 1.0
        assert r.saliency.max() - r.saliency.min() > 0.5  # a map, not a constant
        assert 0.0 <= r.probability <= 1.0
    # the class explained first is the class the original model picks, with its own probability
    src = _source_scores(path, ex, image)
    top = results[0].class_index
    assert top == int(np.argmax(src))
    probs = src if np.isclose(src.sum(), 1.0, atol=1e-4) and (src >= 0).all() else \
        np.exp(src - src.max()) / np.exp(src - src.max()).sum()
    assert results[0].probability == pytest.approx(float(probs[top]), abs=1e-5)
    assert "*" in format_layers(list_layers(path))  # --list-layers works and marks the automatic layer


@pytest.mark.parametrize("variant", ["squeezenet_nc11_op9", "squeezenet_nc11_softmax_op9",
                                     "squeezenet_nc11_softmax_op8", "squeezenet_nc11_softmax_op7",
                                     "squeezenet_nc11_softmax_dynamic_op9"])
def test_nc11_scores_give_the_map_of_the_nc_network(variant, corpus_dir, image):
    ref_path = _model("squeezenet_nc_op9", corpus_dir)
    path = _model(variant, corpus_dir)
    for preset in PRESETS:
        want = Explainer(ref_path, device="cpu", preset=preset).explain(image, top_k=3)
        ex = Explainer(path, device="cpu", preset=preset)
        got = ex.explain(image, top_k=3)
        assert ex.meta.layer == "/classifier/classifier.2/Relu_output_0"
        assert ex.meta.output_kind == "logits"
        for w, g in zip(want, got, strict=True):
            assert g.class_index == w.class_index
            assert np.abs(g.saliency - w.saliency).max() <= 1e-5, preset
            assert abs(g.probability - w.probability) <= 1e-5


def test_nhwc_class_scores_with_and_without_softmax_agree(corpus_dir, image):
    a = Explainer(_model("nhwc_scores_op11", corpus_dir), device="cpu").explain(image, top_k=2)
    b = Explainer(_model("nhwc_scores_softmax_op11", corpus_dir), device="cpu").explain(image, top_k=2)
    for x, y in zip(a, b, strict=True):
        assert x.class_index == y.class_index and np.abs(x.saliency - y.saliency).max() <= 1e-5


def test_named_4d_output_is_accepted(corpus_dir):
    ex = Explainer(_model("caffe2_lrn_dropout_op7", corpus_dir), device="cpu", output="pool")
    assert ex.num_classes == zoo.CLASSES
    with pytest.raises(BundleError, match=r"class scores must be a 2-D \[N,C\] tensor"):
        Explainer(_model("segmentation_output", corpus_dir), device="cpu", output="prob")


def test_cli_names_why_a_model_cannot_be_explained(corpus_dir, tmp_path, capsys):
    from runtime.explain import main

    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    for name in ("segmentation_output", "non_finite_activations"):
        assert main([str(_model(name, corpus_dir)), str(img), "--out", str(tmp_path / name), "--device", "cpu"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and zoo.CORPUS[name][1] in err[0]
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


# --------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("max_channels", [None, 4])
def test_huge_activations_give_the_map_of_ordinary_ones(preset, max_channels, tmp_path, image):
    """Activations ~1e30 (squares overflow float32) explain without a warning, and since every map is
    invariant to the scale of the target layer, equal the map of the same net at scale 1."""
    want = Explainer(zoo._scaled_head(tmp_path / "one.onnx", 1.0), device="cpu", preset=preset,
                     max_channels=max_channels).explain(image, top_k=2)
    got = Explainer(zoo._scaled_head(tmp_path / "huge.onnx", 1e30), device="cpu", preset=preset,
                    max_channels=max_channels).explain(image, top_k=2)
    for w, g in zip(want, got, strict=True):
        assert g.class_index == w.class_index
        assert np.abs(g.saliency - w.saliency).max() <= 1e-5


def test_a_model_that_overflows_is_an_error_not_a_map(tmp_path, image):
    from runtime import images
    from runtime.methods import METHODS

    ex = Explainer(zoo._scaled_head(tmp_path / "over.onnx", 1e36), device="cpu")  # its pooling overflows
    with pytest.raises(NonFiniteError, match="not finite"):
        ex.explain(image)
    x = images.preprocess(images.load_image(image), ex.pre)
    for name in ("sscam", "iscam", "faster"):  # the evaluation's methods say so too
        with pytest.raises(NonFiniteError, match="not finite"):
            METHODS[name].fn(ex, x, 0, n=2)


EXTREME = np.float32(3e38)


def test_numerics_at_the_edge_of_float32():
    rng = np.random.default_rng(0)
    acts = (rng.uniform(-1, 1, (6, 5, 5)) * EXTREME).astype(np.float32)
    acts[2] = 7.0  # a constant channel
    acts[3] *= np.float32(1e-30)  # an ordinary one
    m = minmax(acts)
    assert np.isfinite(m).all() and m.min() == 0.0 and np.isclose(m.max(), 1.0)
    assert (m[2] == 0).all()
    np.testing.assert_allclose(m[3], minmax(acts[3] * np.float32(1e30)), atol=1e-6)
    spread = channel_spread(acts)
    assert np.isfinite(spread).all() and spread[2] == 0
    safe = mask_safe(acts)
    assert np.abs(safe[[0, 1, 4, 5]]).max() <= 1.0 and (safe[2] == 7.0).all() and (safe[3] == acts[3]).all()
    np.testing.assert_allclose(minmax(safe), m, atol=1e-6)
    s = weighted_sum(np.full((2, 6), 5.0), acts)  # weights summing to 30: the float32 sum would overflow
    assert np.isfinite(s).all() and np.abs(s).max() <= 1.0 + 1e-6
    masked = rng.normal(0, 1, (6, 4)) * 1e30
    for preset in PRESETS.values():
        for out in maps_from_scores(preset, acts, masked, masked[0], [0, 1], (20, 20)):
            assert np.isfinite(out.saliency).all() and np.isfinite(out.cam).all()
            assert 0.0 <= out.saliency.min() and out.saliency.max() <= 1.0


def test_derivation_depends_on_bundles_never_the_reverse(corpus_dir):
    import ast
    from pathlib import Path

    from runtime import bundle, thirdparty

    tree = ast.parse(Path(bundle.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and "thirdparty" in m for m in imported)
    path = _model("densenet_op9", corpus_dir)
    with pytest.raises(BundleError, match="no Score-CAM bundle metadata: it is not a bundle"):
        bundle.load_bundle(path)
    assert thirdparty.open_model(path).source == path  # what Explainer uses: derives one
