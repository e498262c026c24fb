"""The toy model and its synthetic data: shapes, determinism, accuracy, and localised features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from exporter import toy
from exporter.recipes import build_torch


def test_make_dataset_shapes_and_boxes():
    images, labels, boxes = toy.make_dataset(200, seed=7)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and set(labels.tolist()) == {0, 1, 2}
    assert boxes.shape == (200, 4)
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    assert ((x1 - x0) == (y1 - y0)).all() and (x1 - x0).min() >= 16 and (x1 - x0).max() <= 26
    again = toy.make_dataset(200, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((images, labels, boxes), again, strict=True))
    assert not np.array_equal(images, toy.make_dataset(200, seed=8)[0])


def test_toy_data_fixture(toy_data):
    images, labels, boxes = toy_data
    assert images.shape == (64, 64, 64, 3) and labels.shape == (64,) and boxes.shape == (64, 4)


def test_training_is_deterministic():
    a = toy.train_toy.__wrapped__(seed=3, n_train=96, epochs=1)
    b = toy.train_toy.__wrapped__(seed=3, n_train=96, epochs=1)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_toy_accuracy_held_out():
    images, labels, _ = toy.make_dataset(512, seed=123)
    assert toy.accuracy(build_torch("toy"), images, labels) >= 0.95


def test_training_from_scratch_gives_a_working_toy(toy_data):
    """The committed weights come from ``train_toy(seed=0)``; training again, here, still gives a toy
    that classifies and localises (bit-equal weights only on a CPU like the one that wrote them)."""
    images, labels, boxes = toy_data
    model = toy.train_toy(seed=0)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  toy.pretrained().state_dict().values(), strict=True))
    print(f"retrained toy equals the committed weights: {same}")
    assert toy.accuracy(model, images, labels) >= 0.95
    assert _energy(model, images, boxes) >= 0.8


def test_save_and_load_weights_round_trip(tmp_path):
    model = toy.ToyNet().eval()
    toy.save_weights(model, tmp_path / "w.npz")
    again = toy.pretrained(tmp_path / "w.npz")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_toy_target_layer_shape():
    net = build_torch("toy")
    taken = []
    handle = net.get_submodule(toy.TARGET_LAYER).register_forward_hook(lambda _m, _i, o: taken.append(o))
    with torch.no_grad():
        net(torch.zeros(2, 3, 64, 64))
    handle.remove()
    assert taken[-1].shape == (2, 32, 32, 32)


def _scorecam(net, x: torch.Tensor) -> torch.Tensor:
    """Score-CAM (the paper's preset) in torch for a batch [N,3,H,W]: maps [N,H,W] in [0,1]."""
    with torch.no_grad():
        logits, a = net.forward_both(x)
        n, k = a.shape[:2]
        up = F.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=False)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)  # [N,K,H,W]
        masked = (x[:, None] * masks[:, :, None]).flatten(0, 1)  # [N*K,3,H,W]
        scores = net(masked).view(n, k, -1)[torch.arange(n), :, logits.argmax(1)]  # [N,K]
        weights = torch.softmax(scores, 1)
        cam = F.relu((weights[:, :, None, None] * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
        return (cam - lo) / (hi - lo + 1e-8)


def _energy(net, images: np.ndarray, boxes: np.ndarray) -> float:
    """Mean share of the torch Score-CAM map inside each object's box."""
    x = toy.preprocess(images)
    cams = torch.cat([_scorecam(net, x[i:i + 16]) for i in range(0, len(x), 16)])
    inside = [float(cam[y0:y1, x0:x1].sum() / cam.sum()) for cam, (x0, y0, x1, y1) in zip(cams, boxes, strict=True)]
    return float(np.mean(inside))


def test_toy_features_are_localised(toy_data):
    """Score-CAM on the toy model puts most of the saliency inside the object's box (measured 0.93)."""
    images, _, boxes = toy_data
    assert _energy(build_torch("toy"), images, boxes) >= 0.9
