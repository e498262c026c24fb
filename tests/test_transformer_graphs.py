"""Transformers as third-party ONNX files (no metadata, no layer given): the automatic layer, its grid and its
auxiliary tokens, from both torch exporters, fixed or dynamic batch, decomposed LayerNorm, HuggingFace graphs.

Every file is written here the way a user writes it (``torch.onnx.export``, legacy at opset 17 / 14 or the
default dynamo exporter) from ``tests/transformer_models.py``'s networks (random weights). The automatic layer
must be the last block's first norm (``blocks[-1].norm1``) with the patch embedding's grid, so the map equals
the one of the bundle our exporter writes at that layer from the same weights; pooled-token and channels-last
heads take the tokens / map the head pools; a 4-D tensor is a map only on the image's grid.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import transformer_models as tm  # noqa: E402

from runtime import BundleError, Explainer, images  # noqa: E402
from runtime.graphinfo import GraphInfo  # noqa: E402
from runtime.thirdparty import list_layers, prepare  # noqa: E402

TOL = 1e-4  # the same network through two exports: ONNX Runtime agrees with itself to ~1e-6


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORECAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    made: dict[str, object] = {}

    def get(key: str):
        if key not in made:
            made[key] = _make(key, root)
        return made[key]

    return get


def _make(key: str, root):
    path = root / f"{key}.onnx"
    if key == "deit_legacy_fixed":
        return tm.onnx_file(tm.deit(), path, dynamic=False)
    if key == "deit_legacy_opset14":  # LayerNorm decomposed: ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add
        return tm.onnx_file(tm.deit(), path, opset=14)
    if key == "deit_dynamo":
        return tm.onnx_file(tm.deit(), path, dynamo=True)
    if key == "deit_dynamo_fixed":
        return tm.onnx_file(tm.deit(), path, dynamo=True, dynamic=False)
    if key == "deit_dynamo_default":  # torch's defaults: the weights in deit_dynamo_default.onnx.data beside it
        return tm.onnx_file(tm.deit(), path, dynamo=True, external_data=True)
    if key == "deit_distilled_legacy":
        return tm.onnx_file(tm.deit_distilled(), path)
    if key == "vit_dynamo":
        return tm.onnx_file(tm.vit(), path, dynamo=True)
    if key.startswith("hf_"):
        wrapped, _ = tm.huggingface_vit()
        outs = ["logits", *(f"hidden_states.{i}" for i in range(3))]
        return tm.onnx_file(wrapped, path, dynamo=key.endswith("dynamo"), input_name="pixel_values", output_names=outs)
    raise KeyError(key)


def _auto(path, size=None):
    cands = list_layers(path, size)
    (auto,) = [c for c in cands if c.auto]
    return auto, cands


def _module(path, tensor: str, size=(tm.SIZE, tm.SIZE)) -> str:
    import onnx

    p = prepare(onnx.load(str(path)), size, rewrite_batch=False)
    return p.info.module_of(tensor)


@pytest.mark.parametrize("key, aux", [("deit_legacy_fixed", 1), ("deit_legacy_opset14", 1), ("deit_dynamo", 1),
                                      ("deit_dynamo_fixed", 1), ("deit_dynamo_default", 1),
                                      ("deit_distilled_legacy", 2)])
def test_deit_auto_layer_is_the_last_blocks_first_norm_and_maps_equal_the_bundles(files, key, aux, transformer_bundle,
                                                                                   samples_dir):
    path = files(key)
    auto, cands = _auto(path)
    assert (auto.layout, auto.grid, auto.aux, auto.aux_position) == ("NLC", (7, 7), aux, "first")
    assert _module(path, auto.name) == "blocks.1.norm1"
    assert not any(c.op == "Conv" and c.auto for c in cands)  # never the patch embedding
    bundle = transformer_bundle("deit_distilled" if aux == 2 else "deit")
    photo = images.load_image(samples_dir / "coffee.png")
    got = Explainer(path, device="cpu").explain(photo)[0]
    want = Explainer(bundle, device="cpu").explain(photo)[0]
    assert got.class_index == want.class_index
    assert float(np.abs(got.saliency - want.saliency).max()) <= TOL


def test_decomposed_layernorm_is_found_as_the_norm(files):
    path = files("deit_legacy_opset14")
    auto, _ = _auto(path)
    assert auto.op == "Add" and "norm1" in auto.name  # the (x - mean) / sqrt(var + eps) * gamma + beta output
    import onnx

    assert not any(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node)


def test_torchvision_vit_and_huggingface_graphs(files, transformer_bundle, samples_dir):
    vit = files("vit_dynamo")
    auto, _ = _auto(vit)
    assert _module(vit, auto.name) == "encoder.layers.encoder_layer_1.ln_1"
    photo = images.load_image(samples_dir / "astronaut.png")
    got = Explainer(vit, device="cpu").explain(photo)[0]
    want = Explainer(transformer_bundle("vit"), device="cpu").explain(photo)[0]
    assert float(np.abs(got.saliency - want.saliency).max()) <= TOL
    for key in ("hf_legacy", "hf_dynamo"):  # pixel_values, four outputs: logits picked, hidden states ignored
        path = files(key)
        auto, _ = _auto(path)
        assert (auto.grid, auto.aux) == ((7, 7), 1)
        assert _module(path, auto.name).endswith("layers.1.layernorm_before")
        r = Explainer(path, device="cpu").explain(photo)[0]
        assert np.isfinite(r.saliency).all() and r.saliency.max() == pytest.approx(1.0)


def test_hf_maps_equal_pytorch_grad_cam_on_the_huggingface_module(files, samples_dir):
    """The HuggingFace model itself, with pytorch-grad-cam's reshape_transform on ``layernorm_before`` of
    the last layer (what its users do), against the derived bundle of its ONNX export (preset gradcam)."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    path = files("hf_legacy")
    _, hf = tm.huggingface_vit()
    ex = Explainer(path, device="cpu", preset="gradcam")
    x = images.preprocess(images.load_image(samples_dir / "chelsea.png"), ex.pre)
    (r,) = ex.explain_tensor(x)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, pixel_values):
            return self.hf(pixel_values=pixel_values).logits

    model = Logits().eval()
    blocks = hf.vit.encoder.layer if hasattr(hf.vit, "encoder") else hf.vit.layers  # transformers 4 / 5
    layer = blocks[-1].layernorm_before
    cam = ScoreCAM(model, [layer], reshape_transform=tm.token_reshape(1, (7, 7)))
    try:
        want = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(r.class_index)])[0]
    finally:
        cam.activations_and_grads.release()
    assert float(np.abs(r.saliency - want).max()) <= TOL


def test_register_tokens_non_square_input_and_pooled_heads(tmp_path):
    torch.manual_seed(0)
    reg = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=112,
                            reg_tokens=4, embed_dim=96, num_heads=3)
    auto, _ = _auto(tm.onnx_file(reg, tmp_path / "reg.onnx"))
    assert (auto.grid, auto.aux, auto.aux_position) == ((7, 7), 5, "first")  # CLS + 4 registers
    torch.manual_seed(0)
    wide = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=(112, 160))
    path = tm.onnx_file(wide, tmp_path / "wide.onnx", size=(112, 160))
    auto, _ = _auto(path, (112, 160))
    assert (auto.grid, auto.aux) == ((7, 10), 1)
    r = Explainer(path, device="cpu").explain(np.full((90, 130, 3), 99, np.uint8))[0]
    assert r.cam.shape == (7, 10) and r.saliency.shape == (112, 160)
    torch.manual_seed(0)  # a mean over the tokens: the tokens the head pools (the last block's output)
    gap = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=112,
                            embed_dim=96, num_heads=3, class_token=False, global_pool="avg", fc_norm=False)
    path = tm.onnx_file(gap, tmp_path / "gap.onnx")
    auto, _ = _auto(path)
    assert (auto.grid, auto.aux) == ((7, 7), 0) and _module(path, auto.name) == "norm"


def test_swin_and_levit_auto_layers(tmp_path):
    """torchvision's Swin (dynamo): the final channels-last norm the head pools; timm's LeViT: the last stage's
    4 x 4 tokens it pools, never an attention matrix [1,heads,16,16] (16 x 16 is no grid of LeViT's)."""
    auto, cands = _auto(tm.onnx_file(tm.swin(), tmp_path / "swin.onnx", dynamo=True))
    assert auto.layout == "NHWC" and auto.spatial == (4, 4)
    torch.manual_seed(0)
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=10)
    auto, cands = _auto(tm.onnx_file(levit, tmp_path / "levit.onnx", size=(224, 224)), (224, 224))
    assert (auto.layout, auto.grid, auto.aux) == ("NLC", (4, 4), 0)
    assert not any(c.layout in ("NCHW", "NHWC") and c.spatial == (16, 16) for c in cands)


def test_an_attention_product_is_not_a_map(files):
    """ViT's [1,heads,T,d] attention products and [1,heads,T,T] matrices have four axes and no grid."""
    import onnx

    path = files("deit_legacy_fixed")
    p = prepare(onnx.load(str(path)), None, rewrite_batch=False)
    info: GraphInfo = p.info
    four_d = [t for t in info.tensor_names() if len(info.shapes.get(t) or ()) == 4 and t in info.dynamic]
    maps = [t for t in four_d if info.is_map(t)]
    assert any(info.shapes[t][2:] == (50, 64) for t in four_d)  # the attention product exists
    assert maps == ["/patch_embed/proj/Conv_output_0"]  # only the patch embedding is on the 7 x 7 grid


class TwoStreams(torch.nn.Module):
    """Two DeiTs side by side (a two-branch model, as CrossViT): which stream is the target is not for us to say."""

    def __init__(self):
        super().__init__()
        self.a, self.b = tm.deit(), tm.deit()

    def forward(self, x):
        return self.a(x) + self.b(x[..., :, :])


class ClsLast(torch.nn.Module):
    """A tiny ViT whose class token is appended after the patches (aux position ``last``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 32, 16, 16)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 32))
        self.norm1 = torch.nn.LayerNorm(32)
        self.qkv = torch.nn.Linear(32, 96)
        self.proj_out = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([t, self.cls.expand(x.shape[0], -1, -1)], dim=1)
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)
        t = t + self.proj_out(attn @ v)
        return self.head(self.norm(t)[:, -1])


def test_two_token_streams_are_refused_naming_them(tmp_path):
    path = tm.onnx_file(TwoStreams(), tmp_path / "two.onnx")
    with pytest.raises(BundleError, match="several token streams.*--layer") as e:
        Explainer(path, device="cpu")
    assert "\n" not in str(e.value)
    r = Explainer(path, device="cpu", layer="a.blocks.1.norm1").explain(np.full((64, 64, 3), 50, np.uint8))[0]
    assert np.isfinite(r.saliency).all()


def test_class_token_last(tmp_path, samples_dir):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = ClsLast().eval()
    path = tm.onnx_file(model, tmp_path / "last.onnx")
    auto, _ = _auto(path)
    assert (auto.grid, auto.aux, auto.aux_position) == ((7, 7), 1, "last")
    ex = Explainer(path, device="cpu", preset="gradcam")
    x = images.preprocess(images.load_image(samples_dir / "rocket.jpg"), ex.pre)
    (r,) = ex.explain_tensor(x)

    def reshape(t):  # the class token is the LAST token here
        return t[:, :-1, :].reshape(t.size(0), 7, 7, t.size(2)).permute(0, 3, 1, 2)

    cam = ScoreCAM(model, [model.norm1], reshape_transform=reshape)
    try:
        want = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(r.class_index)])[0]
    finally:
        cam.activations_and_grads.release()
    assert float(np.abs(r.saliency - want).max()) <= TOL


def test_grid_and_aux_overrides(files, tmp_path, capsys):
    from runtime.explain import main

    path = files("deit_legacy_fixed")
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(img)
    layer = "blocks.1.norm1"
    assert main([str(path), str(img), "--layer", layer, "--grid", "7", "7", "--aux-tokens", "1",
                 "--out", str(tmp_path / "ok")]) == 0
    for flags, text in ((["--grid", "7", "7", "--aux-tokens", "2"], "T must be aux + H*W"),
                        (["--grid", "8", "8"], "T must be aux + H*W"),
                        (["--aux-tokens", "3"], "T must be aux + H*W")):
        capsys.readouterr()
        assert main([str(path), str(img), "--layer", layer, *flags, "--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and text in err and "\n" not in err, (flags, err)
    assert not (tmp_path / "no").exists()
    capsys.readouterr()
    assert main([str(path), "--list-layers"]) == 0
    listed = capsys.readouterr().out
    assert "* /blocks/blocks.1/norm1/LayerNormalization_output_0" in listed and "1 aux (first) + 7x7" in listed
