"""Small transformers with random weights (no downloads) for the token and channels-last tests.

- :func:`deit`: timm's DeiT-tiny (``deit_tiny_patch16_224``: 192 channels, 3 heads, patch 16) at 112 x 112
  with 2 blocks: tokens [N,50,192] = CLS + a 7 x 7 grid; target ``blocks.1.norm1`` (``blocks[-1].norm1``);
- :func:`deit_distilled`: the same with DeiT's distillation token: [N,51,192] = 2 auxiliary tokens + 7 x 7;
- :func:`swin`: torchvision's Swin transformer (``SwinTransformer``, Swin-T's layout with narrower stages and
  one block each) at 112: channels-last [N,h,w,C] maps, no CLS; target ``features.5.0.norm1`` (7 x 7 x 96);
- :func:`vit`: torchvision's ``VisionTransformer`` (ViT-B/16's layout, narrow) at 112: [N,50,96].

The full-size configurations (DeiT-tiny at 224 with 12 blocks, ViT-B/16) are measured by ``python -m bench``.
The reshapes are pytorch-grad-cam's ``reshape_transform`` for each (its tutorial's ViT and Swin examples).
"""

from __future__ import annotations

SIZE = 112
CLASSES = 10


def _seeded(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch


def _randomise_head(model, seed: int = 1):
    """torchvision zero-initialises classification heads (every logit 0): random weights instead."""
    torch = _seeded(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.2)
    return model.eval()


def deit(depth: int = 2, size: int = SIZE):
    import timm

    _seeded()
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, depth=depth,
                             img_size=size).eval()


def deit_distilled(depth: int = 2, size: int = SIZE):
    import timm

    _seeded()
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=CLASSES,
                              depth=depth, img_size=size)
    model.set_distilled_training(False)
    return model.eval()


def swin():
    from torchvision.models.swin_transformer import SwinTransformer

    _seeded()
    return _randomise_head(SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 1, 1],
                                           num_heads=[1, 2, 2, 4], window_size=[7, 7], num_classes=CLASSES))


def vit(size: int = SIZE):
    from torchvision.models.vision_transformer import VisionTransformer

    _seeded()
    return _randomise_head(VisionTransformer(image_size=size, patch_size=16, num_layers=2, num_heads=3,
                                             hidden_dim=96, mlp_dim=192, num_classes=CLASSES))


#: name -> (builder, target layer, aux tokens, grid) of each model at SIZE
MODELS = {
    "deit": (deit, "blocks.1.norm1", 1, (7, 7)),
    "deit_distilled": (deit_distilled, "blocks.1.norm1", 2, (7, 7)),
    "swin": (swin, "features.5.0.norm1", 0, (7, 7)),
    "vit": (vit, "encoder.layers.encoder_layer_1.ln_1", 1, (7, 7)),
}


def token_reshape(aux: int, grid: tuple[int, int]):
    """pytorch-grad-cam's ViT ``reshape_transform``: drop the ``aux`` leading tokens, [N,h,w,C] -> [N,C,h,w]."""

    def reshape_transform(tensor):
        result = tensor[:, aux:, :].reshape(tensor.size(0), grid[0], grid[1], tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


def channels_last_reshape(tensor):
    """pytorch-grad-cam's reshape for torchvision's Swin ([N,h,w,C] blocks): [N,h,w,C] -> [N,C,h,w]."""
    return tensor.permute(0, 3, 1, 2)


def reshape_for(name: str):
    _, _, aux, grid = MODELS[name]
    return channels_last_reshape if name == "swin" else token_reshape(aux, grid)


def export(name: str, out, **kwargs):
    """Export model ``name`` at its target layer into the bundle folder ``out`` (our exporter, verified)."""
    from exporter import export as export_bundle

    build, layer, _, _ = MODELS[name]
    export_bundle(build(), layer, out, input_size=(SIZE, SIZE), **kwargs)
    return out


# ------------------------------------------------------------------------------- third-party files


def onnx_file(model, path, size=(SIZE, SIZE), dynamo: bool = False, dynamic: bool = True, opset: int | None = None,
              input_name: str = "input", output_names=("logits",), external_data: bool = False):
    """``model`` written by torch's exporter as a user would (no metadata): the legacy TorchScript exporter
    (``dynamo=False``, opset 17 unless given) or the dynamo one (torch's default; the weights inside the file
    unless ``external_data``, torch's default, puts them in ``<file>.data`` beside it); batch dynamic or
    fixed to 1."""
    import warnings

    import torch

    x = torch.randn(2 if dynamo and dynamic else 1, 3, *size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, external_data=external_data,
                                  input_names=[input_name], output_names=list(output_names),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic else None,
                                  **({"opset_version": opset} if opset else {}))
        else:
            axes = {n: {0: "N"} for n in [input_name, *output_names]} if dynamic else None
            torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=opset or 17,
                              input_names=[input_name], output_names=list(output_names), dynamic_axes=axes)
    return path


def huggingface_vit(size: int = SIZE):
    """A HuggingFace ``ViTForImageClassification`` from a config (random weights), as its users export it:
    input ``pixel_values``, outputs ``logits`` and every block's hidden states (``output_hidden_states``)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=size, patch_size=16, num_hidden_layers=2, hidden_size=96, num_attention_heads=3,
                    intermediate_size=192, num_labels=CLASSES, output_hidden_states=True)
    hf = ViTForImageClassification(cfg).eval()

    class Exported(torch.nn.Module):  # what optimum / a user wrapper exports: (logits, *hidden_states)
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, pixel_values):
            out = self.hf(pixel_values=pixel_values)
            return (out.logits, *out.hidden_states)

    return Exported().eval(), hf
