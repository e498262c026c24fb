"""A tiny object detector whose right answer is known: coloured shapes, one or two per image.

``make_scenes`` draws 1-2 objects (a filled square, a ring or a cross, 14-22 px, the toy classifier's shapes and
cluttered mid-grey background, :mod:`exporter.toy`) per 64 x 64 RGB image, never touching each other.
``ToyDetector`` is a small single-stage, anchor-free detector with a YOLOv8-style raw head: a stride-4
backbone (receptive field 31 px), a neck that upsamples it and joins the stride-2 stem (``neck``, 32 channels,
32 x 32 cells: a target for Score-CAM that resolves a 14 px box), and two 1 x 1 branches: boxes (cx, cy, w, h
in input pixels) and class scores (sigmoid). Its output is [N, 4+3, 1024], as Ultralytics' ``output0``.

Training (``train_detector``, CPU, ~1-2 minutes, deterministic on one machine): the cells within 1.5 cells of an
object's centre are its positives (class BCE with positive weight, L1 on the box / 16), every other cell a
negative for every class, plus an L1 penalty on ``neck`` that keeps its activations off the background.
``pretrained`` loads the committed weights (``toy_detector_weights.npz``); ``python -m exporter.retrain_toy
--detector`` rewrites them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .toy import _PALETTE, CLASSES, MEAN, SCALE, STD, _background, _shape_mask

SIZE = 64
STRIDE = 2
GRID = SIZE // STRIDE
WEIGHTS = Path(__file__).with_name("toy_detector_weights.npz")
NECK = "neck"
MIN_SIDE, MAX_SIDE = 14, 23  # object sides drawn in [14, 22]
POSITIVE_RADIUS = 1.5  # cells


def make_scenes(n: int, seed: int, size: int = SIZE, max_objects: int = 2):
    """``n`` images uint8 [N,size,size,3] and, per image, a list of (class, (x0, y0, x1, y1)) (x1, y1 exclusive).

    Objects never overlap: their boxes, grown by 4 px, are disjoint."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    objects: list[list[tuple[int, tuple[int, int, int, int]]]] = []
    for i in range(n):
        img = _background(rng, size)
        count = int(rng.integers(1, max_objects + 1))
        placed: list[tuple[int, tuple[int, int, int, int]]] = []
        for _ in range(count):
            for _try in range(50):
                side = int(rng.integers(MIN_SIDE, MAX_SIDE))
                x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = (x0, y0, x0 + side, y0 + side)
                if all(box[0] >= b[2] + 4 or b[0] >= box[2] + 4 or box[1] >= b[3] + 4 or b[1] >= box[3] + 4
                       for _, b in placed):
                    break
            else:
                continue
            kind = int(rng.integers(0, len(CLASSES)))
            mask = _shape_mask(kind, side)
            colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.75, 1.0)
            patch = img[y0:y0 + side, x0:x0 + side]
            patch[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
            placed.append((kind, box))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        objects.append(placed)
    return images, objects


def preprocess(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * SCALE - mean) / std).contiguous()


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class ToyDetector(nn.Module):
    """Stem (stride 2), backbone (stride 4), neck (stride 2, ``neck``), box and class branches."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32) -> None:
        super().__init__()
        self.stem = _conv(3, 16, 2)
        self.backbone = nn.Sequential(_conv(16, width, 2), _conv(width, width), _conv(width, width),
                                      _conv(width, width))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.join = nn.Sequential(nn.Conv2d(width + 16, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.neck = nn.ReLU()
        self.box = nn.Conv2d(width, 4, 1)
        self.cls = nn.Conv2d(width, num_classes, 1)
        nn.init.constant_(self.cls.bias, -4.0)  # start from "nothing here" (focal-loss prior)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(box parameters [N,4,g,g], class logits [N,C,g,g], ``neck`` [N,K,g,g])."""
        s = self.stem(x)
        a = self.neck(self.join(torch.cat([self.up(self.backbone(s)), s], 1)))
        return self.box(a), self.cls(a), a

    @staticmethod
    def decode(t: torch.Tensor) -> torch.Tensor:
        """Box parameters [N,4,g,g] -> cx, cy, w, h in input pixels [N,4,g,g]."""
        g = t.shape[-1]
        j = torch.arange(g, dtype=t.dtype).view(1, 1, g) + 0.5
        i = torch.arange(g, dtype=t.dtype).view(1, g, 1) + 0.5
        cx = (j + 2.0 * torch.tanh(t[:, 0])) * STRIDE
        cy = (i + 2.0 * torch.tanh(t[:, 1])) * STRIDE
        w = 16.0 * torch.exp(torch.clamp(t[:, 2], -3.0, 3.0))
        h = 16.0 * torch.exp(torch.clamp(t[:, 3], -3.0, 3.0))
        return torch.stack([cx, cy, w, h], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 4+C, g*g]: cx, cy, w, h, class scores (sigmoid) per cell, row-major."""
        t, logits, _ = self.raw(x)
        out = torch.cat([self.decode(t), torch.sigmoid(logits)], 1)
        return out.flatten(2)


def targets(objects, grid: int = GRID, num_classes: int = len(CLASSES)):
    """(class targets [N,C,g,g], positive mask [N,g,g], box targets cx, cy, w, h [N,4,g,g])."""
    n = len(objects)
    cls = np.zeros((n, num_classes, grid, grid), np.float32)
    pos = np.zeros((n, grid, grid), bool)
    box = np.zeros((n, 4, grid, grid), np.float32)
    centres = np.arange(grid) + 0.5
    for k, objs in enumerate(objects):
        for c, (x0, y0, x1, y1) in objs:
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
            near = ((centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2) <= POSITIVE_RADIUS ** 2
            cls[k, c][near] = 1.0
            pos[k][near] = True
            box[k, :, near] = np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], np.float32)
    return torch.from_numpy(cls), torch.from_numpy(pos), torch.from_numpy(box)


@functools.lru_cache(maxsize=2)
def train_detector(seed: int = 0, n_train: int = 2048, epochs: int = 14, batch: int = 32, lr: float = 1e-2,
                   sparsity: float = 0.05) -> ToyDetector:
    """Train a ``ToyDetector`` deterministically (one thread); returned in eval mode, cached."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        images, objects = make_scenes(n_train, seed=20_000 + seed)
        x = preprocess(images)
        cls_t, pos_t, box_t = targets(objects)
        model = ToyDetector()
        steps = epochs * ((n_train + batch - 1) // batch)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(8.0), reduction="mean")
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n_train, generator=gen)
            for start in range(0, n_train, batch):
                idx = order[start:start + batch]
                t, logits, a = model.raw(x[idx])
                pos = pos_t[idx]
                loss = bce(logits, cls_t[idx]) + sparsity * a.mean()
                if pos.any():
                    got = model.decode(t).permute(0, 2, 3, 1)[pos]
                    want = box_t[idx].permute(0, 2, 3, 1)[pos]
                    loss = loss + (got - want).abs().mean() / 16.0
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def save_weights(model: nn.Module, path: Path = WEIGHTS) -> None:
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def pretrained(path: Path = WEIGHTS) -> ToyDetector:
    """The committed toy detector (``train_detector(seed=0)`` as trained here), in eval mode."""
    model = ToyDetector()
    with np.load(path) as data:
        model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
    return model.eval()


def recall(model: nn.Module, images: np.ndarray, objects, threshold: float = 0.5) -> float:
    """Share of objects matched by a detection of their class with IoU >= 0.5 (score >= ``threshold``, NMS)."""
    from runtime.detect.heads import Head, decode_batch, detections, iou

    model.eval()
    with torch.no_grad():
        out = model(preprocess(images)).numpy()
    head = Head("yolo8", ("out",), len(CLASSES))
    hit = total = 0
    for props, objs in zip(decode_batch(head, [out]), objects, strict=True):
        idx = detections(head, props, threshold, 0.5)
        for c, b in objs:
            total += 1
            ok = [i for i in idx if props.labels[i] == c and iou(np.asarray(b, float), props.boxes[i:i + 1])[0] >= 0.5]
            hit += bool(ok)
    return hit / max(total, 1)
