"""A tiny, deterministic test model: coloured shapes on a cluttered background.

``make_dataset`` draws one object (a filled square, a ring or a cross, 16-26 px) per 64 x 64 RGB
image at a random place, in a colour drawn from a palette shared by all classes, over a noisy
background around mid-grey strewn with small dots and thin lines. ``ToyNet`` is a small CNN whose
target layer ``features`` (a ReLU, 32 x 32 x 32 for a 64 x 64 input: 2 px per cell, receptive
field 11 x 11 px) feeds global average pooling and a linear layer, so its evidence stays where the
object is. ``train_toy`` trains it on the CPU in seconds, bit-for-bit reproducibly on one machine;
``pretrained`` loads the weights it gave here (seed 0), committed as ``toy_weights.npz`` (40 KB), so
every machine explains and evaluates the same toy (float rounding differs across CPU instruction
sets, and a retrained toy differs like another seed). ``python -m exporter.retrain_toy`` rewrites them.

Two choices serve the evaluation metrics (``runtime.metrics``): the 2 px cells let a map hug a
16 px box (at 4 px per cell even the box itself, upsampled, keeps only ~0.86 of its energy inside),
and the mid-grey background makes a pixel that a saliency map dims (to 0 after normalisation, i.e.
grey) look like background, so Average Drop measures how much of the object a map keeps.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES = ("square", "ring", "cross")
SIZE = 64
SCALE = 1.0 / 255.0
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
TARGET_LAYER = "features"
WEIGHTS = Path(__file__).with_name("toy_weights.npz")
LIFT = 62.0  # the background's base brightness 20..110 lifted to 82..172, around mid-grey

_PALETTE = np.array(
    [(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (220, 60, 220), (40, 220, 230)],
    dtype=np.float32,
)


def _shape_mask(kind: int, side: int) -> np.ndarray:
    """A boolean ``side x side`` mask of one shape (0 square, 1 ring, 2 cross)."""
    if kind == 0:
        return np.ones((side, side), bool)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if kind == 1:
        r = side / 2
        d2 = (yy - r) ** 2 + (xx - r) ** 2
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    arm = max(4, side // 3)
    lo = (side - arm) // 2
    mask = np.zeros((side, side), bool)
    mask[lo:lo + arm, :] = True
    mask[:, lo:lo + arm] = True
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A noisy background around mid-grey with a gentle colour gradient, small dots and thin lines."""
    base = rng.uniform(20, 110, size=3).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    slope = rng.uniform(-25, 25, size=(2, 3)).astype(np.float32)
    img = base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
    img = img + rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)
    for _ in range(int(rng.integers(4, 10))):
        colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.6, 1.0)
        y, x = (int(v) for v in rng.integers(0, size - 4, size=2))
        if rng.random() < 0.5:  # a dot of 2-4 px
            d = int(rng.integers(2, 5))
            img[y:y + d, x:x + d] = colour
        else:  # a thin line of 6-14 px
            length = int(rng.integers(6, 15))
            if rng.random() < 0.5:
                img[y, x:x + length] = colour
            else:
                img[y:y + length, x] = colour
    return img + np.float32(LIFT)  # dots and lines too


def make_dataset(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` images.

    Returns:
        images uint8 [N,size,size,3] RGB, labels int64 [N] (index into ``CLASSES``), and boxes
        int64 [N,4] as ``x0, y0, x1, y1`` (exclusive) around each object.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = rng.integers(0, len(CLASSES), size=n)
    boxes = np.empty((n, 4), np.int64)
    for i in range(n):
        img = _background(rng, size)
        side = int(rng.integers(16, 27))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        mask = _shape_mask(int(labels[i]), side)
        colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.75, 1.0)
        patch = img[y0:y0 + side, x0:x0 + side]
        patch[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes[i] = (x0, y0, x0 + side, y0 + side)
    return images, labels.astype(np.int64), boxes


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] RGB -> float32 [N,3,H,W] with the toy bundle's preprocessing."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * SCALE - mean) / std).contiguous()  # NCHW-contiguous: channels-last trains ~10x slower


def _stage(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class ToyNet(nn.Module):
    """Strided 3 x 3 conv, two 3 x 3 convs, 1 x 1 conv + ReLU (``features``), GAP, linear.

    ``features`` is 32 x H/2 x W/2 and each of its units sees only 11 x 11 input pixels, so its
    evidence (and a Score-CAM map made from it) stays on the object.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32) -> None:
        super().__init__()
        self.stage1 = _stage(3, 16, stride=2)
        self.stage2 = _stage(16, 24)
        self.stage3 = _stage(24, 24)
        self.conv3 = nn.Sequential(nn.Conv2d(24, width, 1, bias=False), nn.BatchNorm2d(width))
        self.features = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N,C], ``features`` activations [N,K,H/2,W/2])."""
        a = self.features(self.conv3(self.stage3(self.stage2(self.stage1(x)))))
        return self.fc(self.pool(a).flatten(1)), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x)[0]


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    model.eval()
    with torch.no_grad():
        pred = model(preprocess(images)).argmax(1).numpy()
    return float((pred == labels).mean())


@functools.lru_cache(maxsize=2)
def train_toy(seed: int = 0, n_train: int = 1536, epochs: int = 16, batch: int = 32, lr: float = 1e-2,
              sparsity: float = 0.5) -> ToyNet:
    """Train a ``ToyNet`` deterministically (same seed, same weights); returned in eval mode, cached.

    Loss: cross-entropy + ``sparsity`` * mean(``features``), an L1 penalty that keeps the target
    activations off the background. AdamW with a one-cycle schedule, random horizontal flips,
    one thread (fixed, so the result does not depend on the machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed for reproducibility; one thread also never stalls on a busy CPU
    try:
        torch.manual_seed(seed)
        images, labels, _ = make_dataset(n_train, seed=10_000 + seed)
        x, y = preprocess(images), torch.from_numpy(labels)
        model = ToyNet()
        steps = epochs * ((n_train + batch - 1) // batch)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n_train, generator=gen)
            for start in range(0, n_train, batch):
                idx = order[start:start + batch]
                xb = x[idx]
                if torch.rand((), generator=gen) < 0.5:  # flips keep every class's label
                    xb = xb.flip(3)
                logits, acts = model.forward_both(xb)
                loss = nn.functional.cross_entropy(logits, y[idx]) + sparsity * acts.mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def save_weights(model: nn.Module, path: Path = WEIGHTS) -> None:
    """Write ``model``'s state dict as float32/int64 arrays (no pickle) to ``path``."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def pretrained(path: Path = WEIGHTS) -> ToyNet:
    """The committed toy (``train_toy(seed=0)`` as trained here), in eval mode."""
    model = ToyNet()
    with np.load(path) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files}
    model.load_state_dict(state)
    return model.eval()

