"""Small user models for the exporter tests, loaded as ``user_models:NAME`` (SPEC) from tests/."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-ReLU (``act1``), conv-ReLU (``act2``: 12 x H/2 x W/2), global average pool, linear."""

    def __init__(self, num_classes: int = 5, softmax: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)
        self.softmax = nn.Softmax(dim=1) if softmax else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.conv1(x)))))
        return self.softmax(self.fc(self.pool(x).flatten(1)))


def tiny() -> nn.Module:
    """A seeded, untrained TinyNet (its BatchNorm has non-trivial running statistics)."""
    torch.manual_seed(0)
    net = TinyNet()
    net.bn2.running_mean.uniform_(-0.5, 0.5)
    net.bn2.running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_softmax() -> nn.Module:
    """A TinyNet ending in a Softmax: its bundle's output kind is ``probabilities``."""
    torch.manual_seed(0)
    return TinyNet(softmax=True).eval()


class SharedAct(nn.Module):
    """One ReLU module used twice (``act``), like EfficientNet-Lite's ``_swish``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    """Leaves torch for numpy in the middle of forward: no exporter can trace that."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        x = torch.from_numpy(x.detach().numpy() * 2.0)
        return self.fc(x.mean((2, 3)))


def not_a_module() -> dict:
    return {"weights": [1, 2, 3]}


def broken() -> nn.Module:
    raise RuntimeError("checkpoint missing")
