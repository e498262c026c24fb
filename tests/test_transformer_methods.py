"""Methods on token and channels-last layers: ViT-ReciproCAM, ReciproCAM on Swin, the fast modes, SS-/IS-CAM,
and the metrics (``runtime.evaluate``) on a DeiT.

ViT-ReciproCAM (Byun & Lee 2023, as OpenVINO XAI's ``ViTReciproCAM`` builds it): the target is the last block's
first norm; copy (i,j) of the tokens keeps cell (i,j)'s token (with the 3x3 Gaussian weights 1/4, 1/8, 1/16
around it, or alone) and the CLS token, the other grid tokens zeroed; the residual stream entering the block is
masked alike (OpenVINO XAI masks the Add before the block and the norm after it); every copy goes through the
rest of the network and map[i,j] = softmax(logits)_c. The reference here is torch itself with hooks on the timm
/ torchvision modules (independent of our graph surgery).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import transformer_models as tm  # noqa: E402

from runtime import Explainer, images  # noqa: E402
from runtime.methods import run_method, spatial_masks  # noqa: E402
from runtime.scorecam import minmax, upsample  # noqa: E402

# the map is min-max of the h*w copies' class probabilities, which a random-weight network spreads over ~1e-3
# only: ONNX Runtime's and torch's float32 rounding (~1e-7 on a probability) comes out ~1e-4 on the [0,1] map
TOL = 1e-3


def torch_reciprocam(model, block, norm, x: torch.Tensor, c: int, grid, aux: int, gaussian: bool, keep_aux: bool,
                     channels_last: bool = False) -> np.ndarray:
    """ViT-ReciproCAM (tokens) or ReciproCAM on a channels-last block, in torch: the block's input r and its
    first norm's output t of the image, then h*w copies with r * M and t * M through the rest of the network."""
    h, w = grid
    saved = {}
    hooks = [block.register_forward_pre_hook(lambda _m, inp: saved.__setitem__("r", inp[0].detach().clone())),
             norm.register_forward_hook(lambda _m, _i, out: saved.__setitem__("t", out.detach().clone()))]
    with torch.inference_mode():
        model(x)
    for hk in hooks:
        hk.remove()
    cells = torch.from_numpy(spatial_masks(h, w, gaussian))  # [hw,h,w]
    if channels_last:
        m = cells[..., None]  # [hw,h,w,1]
    else:
        m = torch.cat([torch.full((h * w, aux), 1.0 if keep_aux else 0.0), cells.reshape(h * w, h * w)], 1)[..., None]
    hooks = [block.register_forward_pre_hook(lambda _m, _inp: (saved["r"] * m,)),
             norm.register_forward_hook(lambda _m, _i, _out: saved["t"] * m)]
    try:
        with torch.inference_mode():
            probs = torch.softmax(model(x.expand(h * w, -1, -1, -1)), dim=1)[:, c].numpy()
    finally:
        for hk in hooks:
            hk.remove()
    cam = minmax(probs.reshape(h, w).astype(np.float32))
    return minmax(upsample(cam, tuple(x.shape[-2:])))


@pytest.fixture(scope="module")
def deit_case(transformer_bundle, samples_dir):
    ex = Explainer(transformer_bundle("deit"), device="cpu")
    x = images.preprocess(images.load_image(samples_dir / "chelsea.png"), ex.pre)
    return ex, x, tm.deit()


@pytest.mark.parametrize("params, gaussian, keep", [("", True, True), (":gaussian=0", False, True),
                                                    (":cls=0", True, False)])
def test_vit_reciprocam_equals_torch(deit_case, params, gaussian, keep):
    ex, x, model = deit_case
    c = int(np.argmax(ex.engine.classify(x)[0]))
    got = run_method("vitreciprocam" + params, ex, x, c)
    want = torch_reciprocam(model, model.blocks[-1], model.blocks[-1].norm1, torch.from_numpy(x), c, (7, 7), 1,
                            gaussian, keep)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert float(np.abs(got - want).max()) <= TOL
    if not params:  # reciprocam on a token layer is its authors' ViT version
        np.testing.assert_allclose(run_method("reciprocam", ex, x, c), got, atol=1e-6)


def test_vit_reciprocam_distilled_keeps_both_aux_tokens(transformer_bundle, samples_dir):
    ex = Explainer(transformer_bundle("deit_distilled"), device="cpu")
    x = images.preprocess(images.load_image(samples_dir / "coffee.png"), ex.pre)
    c = int(np.argmax(ex.engine.classify(x)[0]))
    model = tm.deit_distilled()
    want = torch_reciprocam(model, model.blocks[-1], model.blocks[-1].norm1, torch.from_numpy(x), c, (7, 7), 2,
                            True, True)
    assert float(np.abs(run_method("vitreciprocam", ex, x, c) - want).max()) <= TOL


def test_reciprocam_on_swin_channels_last(transformer_bundle, samples_dir):
    ex = Explainer(transformer_bundle("swin"), device="cpu")
    x = images.preprocess(images.load_image(samples_dir / "rocket.jpg"), ex.pre)
    c = int(np.argmax(ex.engine.classify(x)[0]))
    model = tm.swin()
    block = model.features[5][0]
    want = torch_reciprocam(model, block, block.norm1, torch.from_numpy(x), c, (7, 7), 0, True, True,
                            channels_last=True)
    assert float(np.abs(run_method("reciprocam", ex, x, c) - want).max()) <= TOL
    with pytest.raises(ValueError, match="needs a token target layer"):
        run_method("vitreciprocam", ex, x, c)


def test_fast_modes_and_repeated_methods_on_tokens(deit_case):
    """Presets, max_channels with the kernel fill, SS-CAM and IS-CAM see [K,h,w] maps: they run unchanged."""
    ex, x, _ = deit_case
    exact = ex.explain_tensor(x)[0]
    fast = Explainer(ex.bundle.directory, device="cpu", max_channels=32, fill="kernel").explain_tensor(x)[0]
    assert fast.passes <= 32 + 1 and fast.class_index == exact.class_index
    r = np.corrcoef(fast.saliency.ravel(), exact.saliency.ravel())[0, 1]
    assert r > 0.8, r  # the benchmark measures it on the full DeiT-tiny
    for spec in ("sscam:n=2", "iscam:n=2", "faster:n=16:select=std", "scorecam:preset=official"):
        sal = run_method(spec, ex, x, exact.class_index)
        assert sal.shape == (tm.SIZE, tm.SIZE) and np.isfinite(sal).all() and sal.max() > 0, spec
    with pytest.raises(Exception, match="linear head"):  # the class token's head is no pooling -> linear head
        Explainer(ex.bundle.directory, device="cpu", mode="preview")


def _head_graph(kind: str) -> tuple:
    """A target ``A`` in layout ``kind`` -> global average pool over its grid -> Gemm, as ONNX nodes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, c = 6, 4
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((c, k)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    shape = {"NHWC": [1, 3, 5, k], "NHWC-t": [1, 3, 5, k], "NLC": [1, 15, k]}[kind]
    if kind == "NHWC-t":  # torch's permute -> AdaptiveAvgPool2d(1) -> flatten
        nodes = [helper.make_node("Transpose", ["A"], ["p"], perm=[0, 3, 1, 2]),
                 helper.make_node("GlobalAveragePool", ["p"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
    else:  # a mean over the grid's axes: (1, 2) channels last, 1 for tokens
        nodes = [helper.make_node("ReduceMean", ["A", "axes"], ["f"], keepdims=0)]
    nodes.append(helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1))
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.asarray([1, 2] if kind == "NHWC" else [1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("A", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, c])], inits)
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), w, b


@pytest.mark.parametrize("kind", ["NHWC", "NHWC-t", "NLC"])
def test_the_linear_head_is_read_through_the_layout(kind):
    """preview, relevance and the preview fill need W and b after a global pooling: over the grid's axes of a
    channels-last map or of tokens without auxiliary tokens (with them the mean is not over the grid)."""
    from runtime.head import linear_head
    from runtime.layout import Layout

    model, w, b = _head_graph(kind)
    layout = Layout("NLC", (3, 5)) if kind == "NLC" else Layout("NHWC", (3, 5))
    head = linear_head(model, "A", "logits", layout)
    assert head is not None
    np.testing.assert_allclose(head.weight, w, rtol=1e-6)
    np.testing.assert_allclose(head.bias, b, rtol=1e-6)
    assert linear_head(model, "A", "logits") is None  # read as NCHW, that pooling is over the wrong axes
    if kind == "NLC":
        assert linear_head(model, "A", "logits", Layout("NLC", (2, 7), 1)) is None


def test_evaluate_measures_vit_reciprocam(transformer_bundle, samples_dir, tmp_path):
    from runtime.evaluate import main

    out = tmp_path / "eval"
    code = main([str(transformer_bundle("deit")), str(samples_dir / "chelsea.png"), "--methods", "vitreciprocam",
                 "scorecam", "--out", str(out), "--steps", "8"])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "vitreciprocam" in report and "scorecam" in report
