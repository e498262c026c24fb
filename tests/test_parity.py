"""Parity of the torch-free runtime with the torch references (``reference_cam.py``), preset by preset.

Maps are compared on the [0,1] scale: ``saliency`` [H,W] for ``paper``, ``gradcam`` and ``official``;
``cam`` [h,w] for ``torchcam`` (the real torchcam package returns the map at feature resolution).
Models: the toy CNN (fixture ``toy_bundle``) and the real ImageNet EfficientNet-Lite0 (``lite0_bundle``,
samples/chelsea.png). The masked passes do not depend on the class: each reference pass is computed
once per model and mask kind (module-scoped fixtures) and serves every class, and ``paper`` and
``official`` share theirs (the same masks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("torchcam")

import reference_cam as ref  # noqa: E402
from bundles import make_bundle, photo  # noqa: E402

from runtime import Explainer, images  # noqa: E402
from runtime.contract import BundleMeta, graph_sha256, read_props, write_metadata  # noqa: E402
from runtime.scorecam import constant_channels, get_preset, make_masks, maps_from_scores  # noqa: E402

PRESETS = ("paper", "gradcam", "torchcam", "official")
TOL = 1e-3
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


class Case:
    """One model + one input: the bundle's explainers, the torch module and its target layer, the refs."""

    def __init__(self, bundle: Path, model, layer, rgb: np.ndarray, batch_size: int = 16) -> None:
        self.bundle, self.model, self.layer, self.rgb = bundle, model.eval(), layer, rgb
        self.batch_size = batch_size
        self._explainers: dict[str, Explainer] = {}
        self._hp = self._gp = None
        self._official: dict[int, np.ndarray] = {}
        ex = self.explainer("paper")
        self.x_np = images.preprocess(rgb, ex.pre)
        self.x = torch.from_numpy(self.x_np)
        self.size = ex.input_size

    def explainer(self, preset: str) -> Explainer:
        if preset not in self._explainers:
            self._explainers[preset] = Explainer(self.bundle, device="cpu", preset=preset)
        return self._explainers[preset]

    def explain(self, preset: str, **kw):
        return self.explainer(preset).explain_tensor(self.x_np, **kw)

    @property
    def hp(self) -> ref.HalfPixelPass:
        if self._hp is None:
            self._hp = ref.halfpixel_masked_logits(self.model, self.layer, self.x, self.batch_size)
        return self._hp

    @property
    def gp(self) -> ref.GradcamPass:
        if self._gp is None:
            self._gp = ref.gradcam_masked_logits(self.model, self.layer, self.x, self.batch_size)
        return self._gp

    def reference(self, preset: str, c: int) -> np.ndarray:
        """The reference map on the [0,1] scale that the runtime's map is compared with."""
        if preset == "paper":
            return ref.paper_scorecam(self.model, self.layer, self.x, c, masked=self.hp)[1]
        if preset == "gradcam":
            return ref.gradcam_scorecam(self.model, self.layer, self.x, c, masked=self.gp)[1]
        if preset == "official":
            if c not in self._official:
                self.official([c])
            return self._official[c]
        return ref.torchcam_scorecam(self.model, self.layer, self.x, c, self.batch_size)

    def official(self, classes: list[int]) -> list[np.ndarray]:
        """The authors' maps of ``classes``, from one loop over the channels (cached per class)."""
        maps = ref.official_scorecam(self.model, self.layer, self.x, list(classes), masked=self.hp)
        for c, m in zip(classes, maps, strict=True):
            self._official[c] = np.zeros(self.size, np.float32) if m is None else m
        return [self._official[c] for c in classes]

    @staticmethod
    def ours(preset: str, result) -> np.ndarray:
        return result.cam if preset == "torchcam" else result.saliency


def _diff(case: Case, preset: str, result) -> float:
    want = case.reference(preset, result.class_index)
    got = Case.ours(preset, result)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max())


# ------------------------------------------------------------------------------------------ the toy


def _recipe_torch(name: str):
    """The recipe's torch module (the one its bundle was exported from) and its target layer module."""
    from exporter import recipes

    model = recipes.build_torch(name)  # built once per process: the same object the fixture exported
    return model, dict(model.named_modules())[recipes.RECIPES[name].layer]


@pytest.fixture(scope="module")
def toy_case(toy_bundle) -> Case:
    from exporter import toy

    model, layer = _recipe_torch("toy")
    rgb, _, _ = toy.make_dataset(1, seed=2024)
    return Case(Path(toy_bundle), model, layer, rgb[0])


@pytest.fixture(scope="module")
def toy_black(toy_bundle) -> Case:
    model, layer = _recipe_torch("toy")
    ex = Explainer(Path(toy_bundle), device="cpu")
    return Case(Path(toy_bundle), model, layer, np.zeros((*ex.input_size, 3), np.uint8))


def test_toy_bundle_matches_its_torch_model(toy_case):
    with torch.inference_mode():
        want = toy_case.model(toy_case.x).numpy()[0]
    got = toy_case.explainer("paper").engine.classify(toy_case.x_np)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_parity_every_class(toy_case, preset):
    n = toy_case.explainer(preset).num_classes
    results = toy_case.explain(preset, targets=list(range(n)))
    assert [r.class_index for r in results] == list(range(n))
    diffs = [_diff(toy_case, preset, r) for r in results]
    if preset == "gradcam":  # its cam [h,w] after the first scaling, too
        for r in results:
            want = ref.gradcam_scorecam(toy_case.model, toy_case.layer, toy_case.x, r.class_index,
                                        masked=toy_case.gp)[0]
            diffs.append(float(np.abs(r.cam - want).max()))
    print(f"\nparity toy {preset}: max abs diff per class {' '.join(f'{d:.2e}' for d in diffs)}")
    assert max(diffs) <= TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_parity_on_a_black_image(toy_black, preset):
    """An all-black input: dead (all-zero) channels; no NaN, and still the references' maps."""
    results = toy_black.explain(preset, top_k=3)
    for r in results:
        for arr in (r.saliency, r.cam, r.weights):
            assert np.isfinite(arr).all()
        assert 0 <= r.saliency.min() and r.saliency.max() <= 1
    diffs = [_diff(toy_black, preset, r) for r in results]
    print(f"\nparity toy black image {preset}: {' '.join(f'{d:.2e}' for d in diffs)}, "
          f"{results[0].channels_skipped} constant channels")
    assert max(diffs) <= TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_toy_top_k_from_one_call_equals_single_calls(toy_case, preset):
    together = toy_case.explain(preset, top_k=3)
    assert len(together) == 3
    logits = toy_case.explainer(preset).engine.classify(toy_case.x_np)[0]
    assert [r.class_index for r in together] == list(np.argsort(-logits, kind="stable")[:3])
    for r in together:
        (one,) = toy_case.explain(preset, targets=r.class_index)
        np.testing.assert_allclose(r.saliency, one.saliency, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.cam, one.cam, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.weights, one.weights, atol=1e-7, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_top5_from_one_call_equals_five_single_calls(tmp_path, preset):
    """tests/bundles.py's 5-class net: ``top_k=5`` in one call == five ``targets=c`` calls."""
    ex = Explainer(make_bundle(tmp_path / "b", size=40, channels=24), device="cpu", preset=preset, batch_size=7)
    rgb = photo(40, 40, seed=1)
    together = ex.explain(rgb, top_k=5)
    assert sorted(r.class_index for r in together) == [0, 1, 2, 3, 4]
    probs = [r.probability for r in together]
    assert probs == sorted(probs, reverse=True)
    for r in together:
        (one,) = ex.explain(rgb, targets=r.class_index)
        np.testing.assert_allclose(r.saliency, one.saliency, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.cam, one.cam, atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.weights, one.weights, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------- constant, non-zero channels


def _bundle_with_constant_channels(directory: Path) -> Path:
    """tests/bundles.py's net at 33 x 33 (features 8 x 17 x 17) with channels 1, 3, 5 constant (1.7, 0.3, 0)."""
    make_bundle(directory, size=33, channels=8)
    graphs = {name: onnx.load(str(directory / name)) for name in ("model.onnx", "features.onnx")}
    for g in graphs.values():
        for init in g.graph.initializer:
            a = numpy_helper.to_array(init).copy()
            if init.name == "w2":
                a[[1, 3, 5]] = 0
            elif init.name == "b2":
                a[[1, 3, 5]] = (1.7, 0.3, -1.0)
            else:
                continue
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    m, f = graphs["model.onnx"], graphs["features.onnx"]
    meta = BundleMeta.from_props(read_props(m))
    write_metadata(m, meta.with_role("classifier", graph_sha256(f)))
    write_metadata(f, meta.with_role("features", graph_sha256(m)))
    for name, g in graphs.items():
        onnx.save(g, str(directory / name))
    return directory


@pytest.mark.parametrize("preset", PRESETS)
def test_constant_channels_score_the_zero_input(tmp_path, preset):
    """DESIGN.md: "A channel whose activation is constant yields no mask": its masked input is all zeros.

    Computed here with the plain classifier session on ``x * H_k``, the constant channels' masks set to
    zero. The runtime's weights must be the ones these scores give (and nothing may be NaN).
    """
    ex = Explainer(_bundle_with_constant_channels(tmp_path / "b"), device="cpu", preset=preset)
    x = images.preprocess(photo(33, 33), ex.pre)
    acts = ex.engine.activations(x)
    const = constant_channels(acts)
    assert const.tolist() == [False, True, False, True, False, True, False, False]
    p = get_preset(preset)
    masks = make_masks(acts, ex.input_size, p.mask)
    masks[const] = 0
    logits = ex.engine.classify(np.ascontiguousarray(x * masks[:, None], np.float32))
    base = ex.engine.classify(x)[0]
    want = maps_from_scores(p, acts, logits, base, [0, 1, 2], ex.input_size)
    got = ex.explain_tensor(x, targets=[0, 1, 2])
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g.weights).all() and np.isfinite(g.saliency).all()
        np.testing.assert_allclose(g.weights, w.weights, atol=1e-5, err_msg=f"{preset} class {g.class_index}")
        np.testing.assert_allclose(g.saliency, w.saliency, atol=TOL)


# ---------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0_case(lite0_bundle) -> Case:
    model, layer = _recipe_torch("efficientnet_lite0")
    return Case(Path(lite0_bundle), model, layer, images.load_image(SAMPLES / "chelsea.png"), batch_size=32)


def test_lite0_top1_is_a_cat_and_matches_torch(lite0_case):
    with torch.inference_mode():
        want = lite0_case.model(lite0_case.x).numpy()[0]
    got = lite0_case.explainer("paper").engine.classify(lite0_case.x_np)[0]
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert 281 <= int(np.argmax(got)) <= 285  # ImageNet's domestic cats


@pytest.mark.parametrize("preset", ["paper", "official", "gradcam"])
def test_lite0_parity_top5(lite0_case, preset):
    """One call explains the top-5 classes; each map equals the reference of its class."""
    results = lite0_case.explain(preset, top_k=5)
    with torch.inference_mode():
        top5 = torch.topk(lite0_case.model(lite0_case.x)[0], 5).indices.tolist()
    assert [r.class_index for r in results] == top5
    if preset == "official":
        lite0_case.official(top5)
    diffs = [_diff(lite0_case, preset, r) for r in results]
    print(f"\nparity lite0 {preset}: max abs diff top-5 {' '.join(f'{d:.2e}' for d in diffs)}")
    assert max(diffs) <= TOL


def test_lite0_parity_torchcam_top1(lite0_case):
    (r,) = lite0_case.explain("torchcam", top_k=1)
    d = _diff(lite0_case, "torchcam", r)
    print(f"\nparity lite0 torchcam: max abs diff top-1 {d:.2e}")
    assert d <= TOL
