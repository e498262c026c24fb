"""A corpus of old and odd classifier graphs, as model zoos ship them, made here (no downloads).

Each builder writes one ``.onnx`` file WITHOUT bundle metadata and returns its path. Two ways of making them:

- torch's legacy TorchScript exporter (``dynamo=False``) at opsets 7-9 with ``keep_initializers_as_inputs``
  (IR 3/4, initializers also listed as graph inputs, batch fixed to 1, the 4-D Softmax torch writes as
  Transpose-Softmax-Transpose): SqueezeNet-, DenseNet-, Inception- and ShuffleNet-style networks;
- ``onnx.helper`` graphs for what torch does not write: the ONNX ``LRN`` and ``Dropout`` ops at opset 7,
  weights made by ``Constant`` / ``ConstantOfShape`` nodes, Caffe2-style [N,C,1,1] and TF-style [N,1,1,C]
  class scores with a Softmax over the class axis, huge and non-finite activations, and graphs that
  cannot be explained (they must fail with a named reason).

:data:`CORPUS` maps a name to ``(builder, expected)``: ``expected`` is ``"ok"`` or a piece of the
one-line error the runtime must give. All networks take 32 x 32 RGB images and have a handful of classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 32
CLASSES = 6


# ------------------------------------------------------------------------------------ torch networks


def _torch():
    import torch

    return torch, torch.nn


def _export(module, path: Path, opset: int = 9, dynamic: bool = False) -> Path:
    torch, _ = _torch()
    kw = {"dynamic_axes": {"input": {0: "N"}, "scores": {0: "N"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 3, SIZE, SIZE),), str(path), opset_version=opset,
                          dynamo=False, keep_initializers_as_inputs=True, input_names=["input"],
                          output_names=["scores"], **kw)
    return path


def squeeze_net(head: str = "nc11"):
    """SqueezeNet-style: Conv ReLU MaxPool, a Fire module (squeeze 1x1; expand 1x1 and 3x3, concatenated),
    Dropout, a 1x1 conv to the classes, ReLU, global average pool. ``head``: ``nc11`` (the [N,C,1,1]
    output, as torchvision's SqueezeNet before its flatten), ``nc11_softmax`` (+ softmax over dim 1),
    ``nc`` (flattened to [N,C]), ``nc_softmax``."""
    torch, nn = _torch()

    class Fire(nn.Module):
        def __init__(self, cin, squeeze, expand):
            super().__init__()
            self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
            self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
            self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

        def forward(self, x):
            s = self.squeeze(x)
            return torch.cat([self.e1(s), self.e3(s)], 1)

    class Squeeze(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.MaxPool2d(2, ceil_mode=True), Fire(16, 8, 16))
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, CLASSES, 1), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            y = self.classifier(self.features(x))
            if head.startswith("nc11"):
                return torch.softmax(y, dim=1) if head.endswith("softmax") else y
            y = torch.flatten(y, 1)
            return torch.softmax(y, dim=1) if head.endswith("softmax") else y

    return Squeeze()


def dense_net():
    """DenseNet-style: two dense blocks (every layer's output concatenated to its input), a transition
    (BN ReLU 1x1 conv, AvgPool), BN ReLU, global pool, Linear."""
    torch, nn = _torch()

    class Layer(nn.Module):
        def __init__(self, cin, growth):
            super().__init__()
            self.f = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, growth, 3, padding=1))

        def forward(self, x):
            return torch.cat([x, self.f(x)], 1)

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.block1 = nn.Sequential(Layer(8, 4), Layer(12, 4), Layer(16, 4))
            self.trans = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1), nn.AvgPool2d(2))
            self.block2 = nn.Sequential(Layer(10, 4), Layer(14, 4))
            self.norm = nn.BatchNorm2d(18)
            self.fc = nn.Linear(18, CLASSES)
            for m in self.modules():  # non-trivial BN statistics, so folding them matters
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

        def forward(self, x):
            y = torch.relu(self.norm(self.block2(self.trans(self.block1(self.stem(x))))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    return Dense()


def inception_net():
    """Inception-style: a module of four branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 max pool-1x1) concatenated,
    then global pool, Dropout, Linear, softmax."""
    torch, nn = _torch()

    def cbr(cin, cout, k):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU())

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.stem = nn.Sequential(cbr(3, 12, 3), nn.MaxPool2d(2))
            self.b1 = cbr(12, 6, 1)
            self.b2 = nn.Sequential(cbr(12, 4, 1), cbr(4, 6, 3))
            self.b3 = nn.Sequential(cbr(12, 2, 1), cbr(2, 4, 5))
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(12, 4, 1))
            self.drop = nn.Dropout(0.4)
            self.fc = nn.Linear(20, CLASSES)

        def forward(self, x):
            s = self.stem(x)
            y = torch.cat([self.b1(s), self.b2(s), self.b3(s), self.b4(s)], 1)
            return torch.softmax(self.fc(self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))), 1)

    return Inception()


def shuffle_net():
    """ShuffleNet-style: grouped 1x1 convs with a channel shuffle (Reshape-Transpose-Reshape, the batch
    taken from the tensor's own shape), a depthwise 3x3, a residual add, global mean, Linear."""
    torch, nn = _torch()

    def shuffle(x, groups):
        n, c, h, w = x.size()
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU())
            self.g1 = nn.Conv2d(12, 12, 1, groups=3)
            self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
            self.g2 = nn.Conv2d(12, 12, 1, groups=3)
            self.fc = nn.Linear(12, CLASSES)

        def forward(self, x):
            s = self.stem(x)
            y = self.g2(self.dw(shuffle(torch.relu(self.g1(s)), 3)))
            y = torch.relu(s + y)
            return self.fc(y.mean(3).mean(2))

    return Shuffle()


# ---------------------------------------------------------------------------------- onnx.helper graphs


def _w(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
            "b1": rng.normal(0, 0.1, 8).astype(np.float32),
            "w2": rng.normal(0, 0.3, (10, 8, 3, 3)).astype(np.float32),
            "b2": rng.normal(0, 0.1, 10).astype(np.float32),
            "wc": rng.normal(0, 0.5, (CLASSES, 10, 1, 1)).astype(np.float32),
            "bc": rng.normal(0, 0.1, CLASSES).astype(np.float32)}


def _body(x: str = "input") -> list[onnx.NodeProto]:
    """Conv(3->8) ReLU Conv(8->10, stride 2) ReLU -> ``act`` [N,10,16,16]."""
    return [helper.make_node("Conv", [x, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2],
                             kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c2"], ["act"])]


def _save(path: Path, nodes, outputs, opset: int, ir: int, inits: dict[str, np.ndarray],
          inits_as_inputs: bool = False, batch="N", input_type=TensorProto.FLOAT) -> Path:
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("input", input_type, [batch, 3, SIZE, SIZE])]
    if inits_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, tensors),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="zoo")
    model.ir_version = ir
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _out(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def caffe2_style(path: Path, softmax: bool = True, opset: int = 7) -> Path:
    """Caffe/Caffe2 conversion: IR 3, opset 7, initializers also inputs, batch 1, LRN and Dropout in the
    graph, a 1x1 conv to the classes, GlobalAveragePool -> [1,C,1,1], Softmax (axis 1) over that 4-D tensor."""
    w = _w(5)
    nodes = [*_body()[:2],
             helper.make_node("LRN", ["r1"], ["n1"], size=3, alpha=1e-4, beta=0.75, bias=1.0),
             helper.make_node("Conv", ["n1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c2"], ["act"]),
             helper.make_node("Dropout", ["act"], ["drop"], ratio=0.5),
             helper.make_node("Conv", ["drop", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["cls"], ["pool"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["pool"], ["prob"], axis=1))
    return _save(path, nodes, [_out("prob" if softmax else "pool", [1, CLASSES, 1, 1])], opset, 3, w,
                 inits_as_inputs=True, batch=1)


def nhwc_scores(path: Path, softmax: bool = True) -> Path:
    """Class scores shaped [N,1,1,C] (a TF-style head: maps moved to NHWC, mean over H and W kept as 1x1,
    a 1x1 'conv' as MatMul), with a Softmax over the last axis, opset 11."""
    w = _w(6)
    w["wm"] = w.pop("wc")[:, :, 0, 0].T.copy()
    w["bm"] = w.pop("bc")
    nodes = [*_body(),
             helper.make_node("Transpose", ["act"], ["act_nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["act_nhwc"], ["gap"], axes=[1, 2], keepdims=1),
             helper.make_node("MatMul", ["gap", "wm"], ["mm"]),
             helper.make_node("Add", ["mm", "bm"], ["logits4"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits4"], ["prob"], axis=3))
    return _save(path, nodes, [_out("prob" if softmax else "logits4", ["N", 1, 1, CLASSES])], 11, 6, w)


def constant_weights(path: Path) -> Path:
    """Weights from ``Constant`` nodes and a bias from ``ConstantOfShape`` (opset 9, IR 4): no
    initializers at all, as some converters write them."""
    w = _w(7)
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k + "_value"))
             for k, v in w.items() if k != "b2"]
    nodes += [helper.make_node("Constant", [], ["b2_shape"], value=numpy_helper.from_array(np.array([10], np.int64))),
              helper.make_node("ConstantOfShape", ["b2_shape"], ["b2"],
                               value=numpy_helper.from_array(np.array([0.05], np.float32))),
              *_body(),
              helper.make_node("Conv", ["act", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
              helper.make_node("GlobalAveragePool", ["cls"], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["logits"], axis=1)]
    return _save(path, nodes, [_out("logits", ["N", CLASSES])], 9, 4, {})


def _scaled_head(path: Path, gain: float, opset: int = 13) -> Path:
    """Conv body whose second conv (the target layer) is multiplied by ``gain`` and whose linear head by
    1/gain, so the logits keep their ordinary size."""
    w = _w(8)
    w["w2"] = (w["w2"].astype(np.float64) * gain).astype(np.float32)
    w["b2"] = (w["b2"].astype(np.float64) * gain).astype(np.float32)
    w["wm"] = (w.pop("wc")[:, :, 0, 0].T.astype(np.float64) / gain).astype(np.float32)
    w["bm"] = w.pop("bc")
    nodes = [*_body(), helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "wm"], ["mm"]), helper.make_node("Add", ["mm", "bm"], ["logits"])]
    return _save(path, nodes, [_out("logits", ["N", CLASSES])], opset, 8, w)


def huge_activations(path: Path) -> Path:
    """Activations around 1e30 (their squares overflow float32), logits of ordinary size."""
    return _scaled_head(path, 1e30)


def non_finite_activations(path: Path) -> Path:
    """Activations that overflow to inf inside the network (weights x 1e38 x 1e38), so logits are NaN."""
    w = _w(9)
    w["g"] = np.array(1e38, np.float32)
    nodes = [*_body()[:2], helper.make_node("Mul", ["r1", "g"], ["big"]),
             helper.make_node("Mul", ["big", "g"], ["r1x"]),
             helper.make_node("Conv", ["r1x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c2"], ["act"]),
             helper.make_node("Conv", ["act", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["cls"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["logits"], axis=1)]
    return _save(path, nodes, [_out("logits", ["N", CLASSES])], 13, 8, w)


def segmentation_output(path: Path) -> Path:
    """Not a classifier: per-pixel class scores [N,C,16,16] (no [N,C] output anywhere)."""
    w = _w(10)
    nodes = [*_body(), helper.make_node("Conv", ["act", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
             helper.make_node("Softmax", ["cls"], ["prob"], axis=1)]
    return _save(path, nodes, [_out("prob", ["N", CLASSES, SIZE // 2, SIZE // 2])], 13, 8, w)


def softmax_over_space(path: Path) -> Path:
    """[N,C,1,1] scores whose 'softmax' runs over a size-1 axis (always 1.0): no class information."""
    w = _w(11)
    nodes = [*_body(), helper.make_node("Conv", ["act", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["cls"], ["pool"]),
             helper.make_node("Softmax", ["pool"], ["prob"], axis=3)]
    return _save(path, nodes, [_out("prob", ["N", CLASSES, 1, 1])], 13, 8, w)


def uint8_input(path: Path) -> Path:
    """An image input of type uint8 (some zoo graphs take raw pixels): not supported, said so."""
    w = _w(12)
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT), *_body("x"),
             helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["logits"], axis=1)]
    return _save(path, nodes, [_out("logits", ["N", 10])], 13, 8, w, input_type=TensorProto.UINT8)


# ------------------------------------------------------------------------------------------ the corpus

Builder = Callable[[Path], Path]


def _torch_builder(make: Callable, opset: int = 9, dynamic: bool = False) -> Builder:
    return lambda path: _export(make(), path, opset, dynamic)


#: name -> (builder(path) -> path, "ok" or a piece of the expected one-line error)
CORPUS: dict[str, tuple[Builder, str]] = {
    "squeezenet_nc11_op9": (_torch_builder(lambda: squeeze_net("nc11")), "ok"),
    "squeezenet_nc11_softmax_op9": (_torch_builder(lambda: squeeze_net("nc11_softmax")), "ok"),
    "squeezenet_nc11_softmax_op8": (_torch_builder(lambda: squeeze_net("nc11_softmax"), opset=8), "ok"),
    "squeezenet_nc11_softmax_op7": (_torch_builder(lambda: squeeze_net("nc11_softmax"), opset=7), "ok"),
    "squeezenet_nc_op9": (_torch_builder(lambda: squeeze_net("nc")), "ok"),
    "squeezenet_nc11_softmax_dynamic_op9": (_torch_builder(lambda: squeeze_net("nc11_softmax"), dynamic=True), "ok"),
    "densenet_op9": (_torch_builder(dense_net), "ok"),
    "inception_op9": (_torch_builder(inception_net), "ok"),
    "shufflenet_op9": (_torch_builder(shuffle_net), "ok"),
    "shufflenet_dynamic_op9": (_torch_builder(shuffle_net, dynamic=True), "ok"),
    "caffe2_lrn_dropout_softmax_op7": (caffe2_style, "ok"),
    "caffe2_lrn_dropout_op7": (lambda p: caffe2_style(p, softmax=False), "ok"),
    "nhwc_scores_softmax_op11": (nhwc_scores, "ok"),
    "nhwc_scores_op11": (lambda p: nhwc_scores(p, softmax=False), "ok"),
    "constant_weights_op9": (constant_weights, "ok"),
    "huge_activations": (huge_activations, "ok"),
    "non_finite_activations": (non_finite_activations, "not finite"),
    "segmentation_output": (segmentation_output, "no class-score output"),
    "softmax_over_space": (softmax_over_space, "Softmax runs over axis 3"),
    "uint8_input": (uint8_input, "only float32 image inputs"),
}


def build(name: str, directory: Path) -> Path:
    """Write corpus model ``name`` into ``directory`` (``<name>.onnx``) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    return CORPUS[name][0](directory / f"{name}.onnx")
