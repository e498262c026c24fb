"""The contenders: each one, set up and warmed, is a zero-argument callable explaining the image once.

- ``floor``: K preprocessed images through the bundle's classifier session (``ex.engine.classifier``)
  at the chosen batch size: the cost of Score-CAM on this engine with zero overhead.
- ``paper``, ``gradcam``, ``torchcam``, ``official``: ours, exact, end to end through the public API
  (``Explainer(...).explain(image_path)``, decoding included).
- ``top5``: ours, ``paper``, five classes from the one scoring pass (``top_k=5``).
- ``torch``: a torch eager reference of the ``paper`` algorithm written the way peer libraries
  (pytorch-grad-cam, torchcam) do it: every masked input built at once (K x 3 x H x W), then scored
  in batches of 16; ``torch.set_num_threads`` = the same thread count.
- ``bare``: a bare ONNX Runtime session of the bundle's ``model.onnx`` (loaded from its path, nothing of ours
  but the batch) running K images at our batch size: the memory yardstick for "weights held once".
- ``pair``: two explainers of the same bundle in one process (the service's workers), each explaining once.
- fast modes ``mcN`` (``max_channels=N``, channels ranked by ``select="auto"``), ``+std`` / ``+rel`` (the
  ranking forced to ``std`` / ``relevance``), ``+cover`` (``select="cover"``), ``+fill`` (``fill="preview"``),
  ``+kern`` (``fill="kernel"``: with ``select="auto"`` the channels are chosen by ``cover``), ``int8``, ``fp16`` and
  combinations such as ``int8+mc32``;
  ``preview`` (``mode="preview"``: one pass, closed-form feature-space scores).
- ``pass1``: one classifier pass over the photo (``Explainer.predict(path)``: decode, preprocess,
  classify), the yardstick of the preview.
- the peers, on our engine (:mod:`runtime.methods`): ``reciprocam``; ``riseN`` (RISE, N masks; ``rise``:
  2000), each end to end from the photo (decode, preprocess, the top-1 class, the map).

Nothing here imports torch at module level: the ours/floor contenders run in torch-free processes
(their peak RSS must not include torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRESETS = ("paper", "gradcam", "torchcam", "official")
TORCH_BATCH = 16


@dataclass
class Context:
    model: str  # benchmark model name (for the torch reference)
    bundle: Path
    image: Path
    threads: int
    batch_size: int | None = None
    device: str = "cpu"


def is_fast(name: str) -> bool:
    """A contender whose map is compared with the exact one (fast modes, the preview and the peers)."""
    return fast_options(name) is not None or peer_method(name) is not None


def fast_options(name: str) -> dict | None:
    """``int8+mc128`` -> {precision: int8, max_channels: 128}; ``mc32+std`` -> {max_channels: 32, select:
    std}; ``mc16+fill`` -> {max_channels: 16, fill: preview}; ``mc16+kern`` -> {max_channels: 16, fill: kernel};
    ``preview`` -> {mode: preview}; None when ``name`` is no fast mode. A cap with no fill token is Faster
    Score-CAM, ``fill: zero``, asked explicitly (the Explainer's own default with a cap is the kernel fill)."""
    opts: dict = {}
    for tok in name.split("+"):
        m = re.fullmatch(r"mc(\d+)", tok)
        if m:
            opts["max_channels"] = int(m.group(1))
        elif tok in ("int8", "fp16"):
            opts["precision"] = tok
        elif tok in ("std", "rel") and opts:
            opts["select"] = "std" if tok == "std" else "relevance"
        elif tok == "fill" and opts:
            opts["fill"] = "preview"
        elif tok == "kern" and opts:
            opts["fill"] = "kernel"
        elif tok == "cover" and opts:
            opts["select"] = "cover"
        elif tok == "preview":
            opts["mode"] = "preview"
        else:
            return None
    if "max_channels" in opts:
        opts.setdefault("fill", "zero")
    return opts or None


def peer_method(name: str) -> str | None:
    """``reciprocam`` -> ``reciprocam``; ``rise1000`` -> ``rise:n=1000`` (``rise``: 2000 masks); else None."""
    if name == "reciprocam":
        return "reciprocam"
    m = re.fullmatch(r"rise(\d*)", name)
    if m:
        return f"rise:n={int(m.group(1) or 2000)}"
    return None


def kind(name: str) -> str:
    """``peer``, ``preview``, ``fast`` or ``exact`` (everything else)."""
    if peer_method(name):
        return "peer"
    opts = fast_options(name)
    if opts and opts.get("mode") == "preview":
        return "preview"
    return "fast" if opts else "exact"


def known(name: str) -> bool:
    return name in ("floor", "bare", "pair", "top5", "torch", "pass1", *PRESETS) or is_fast(name)


def peer_map(ex, spec: str, image: Path, class_index: int | None = None):
    """(saliency, class, passes) of peer method ``spec`` on ``image``, end to end (decode, preprocess, class)."""
    from runtime import images
    from runtime.methods import run_method

    x = images.preprocess(images.load_image(image), ex.pre)
    c = int(np.argmax(ex.engine.classify(x)[0])) if class_index is None else int(class_index)
    sal = run_method(spec, ex, x, c)
    if spec.startswith("rise"):
        passes = int(spec.split("n=")[1])
    else:
        h, w = ex.engine.activations(x).shape[1:]
        passes = h * w  # through the tail only
    return sal, c, passes


def explainer(ctx: Context, **kwargs):
    from runtime import Explainer

    return Explainer(ctx.bundle, device=ctx.device, batch_size=ctx.batch_size, threads=ctx.threads, **kwargs)


def _warm(ex, image: Path) -> None:
    """Build the scoring session and run one batch (the first run of a session pays allocations)."""
    saved = ex.max_channels
    ex.max_channels = min(saved or ex.batch_size, ex.batch_size)
    try:
        ex.explain(image)
    finally:
        ex.max_channels = saved


def make(name: str, ctx: Context) -> Callable[[], object]:
    """Set up contender ``name`` (sessions built, one warm-up batch run); return its run-once callable."""
    if name == "floor":
        return _floor(ctx)
    if name == "torch":
        return _torch_reference(ctx)
    if name == "bare":
        return _bare(ctx)
    if name == "pair":
        first, second = explainer(ctx), explainer(ctx)
        _warm(first, ctx.image)
        _warm(second, ctx.image)
        return lambda: (first.explain(ctx.image), second.explain(ctx.image))
    if name == "pass1":
        ex = explainer(ctx)
        ex.predict(ctx.image)
        return lambda: ex.predict(ctx.image)
    if peer_method(name):
        ex = explainer(ctx)
        spec = peer_method(name)
        peer_map(ex, spec.split(":")[0] + (":n=16" if spec.startswith("rise") else ""), ctx.image)  # warm-up
        return lambda: peer_map(ex, spec, ctx.image)
    if name in PRESETS or name == "top5":
        ex = explainer(ctx, preset="paper" if name == "top5" else name)
        top_k = 5 if name == "top5" else 1
        _warm(ex, ctx.image)
        return lambda: ex.explain(ctx.image, top_k=top_k)
    opts = fast_options(name)
    if opts is None:
        raise ValueError(f"unknown contender {name!r}")
    ex = explainer(ctx, **opts)
    _warm(ex, ctx.image)
    return lambda: ex.explain(ctx.image)


def channels(ctx: Context) -> int:
    from runtime import images

    ex = explainer(ctx)
    return int(ex.engine.activations(images.preprocess(images.load_image(ctx.image), ex.pre)).shape[0])


def _floor(ctx: Context) -> Callable[[], object]:
    from runtime import images

    ex = explainer(ctx)
    x = images.preprocess(images.load_image(ctx.image), ex.pre)
    k = int(ex.engine.activations(x).shape[0])
    bs = ex.batch_size
    batch = np.ascontiguousarray(np.repeat(x, bs, axis=0))
    sess = ex.engine.classifier
    name = sess.get_inputs()[0].name
    out = [ex.engine.class_output]
    if ex.engine.on_cuda:
        return _floor_cuda(sess, name, out[0], batch, k)
    sess.run(out, {name: batch})  # warm-up

    def run():
        for start in range(0, k, bs):
            sess.run(out, {name: batch[: min(bs, k - start)]})

    return run


def _bare(ctx: Context) -> Callable[[], object]:
    """A plain ``onnxruntime.InferenceSession(model.onnx)`` (no Explainer in the process) running K images
    in batches of our size (K from the bench's stamp, the batch size the runtime's default)."""
    import json

    import onnxruntime as ort

    from runtime import images
    from runtime.bundle import load_bundle
    from runtime.engine import DEFAULT_BATCH, providers_for, session_options

    pre = load_bundle(ctx.bundle).meta.preprocessing
    k = int(json.loads((Path(ctx.bundle) / "bench.json").read_text())["channels"])
    providers = providers_for(ctx.device)
    h, w = pre.input_size
    bs = ctx.batch_size or max(1, min(256, round(DEFAULT_BATCH[providers[0]] * 224 * 224 / (h * w))))
    sess = ort.InferenceSession(str(ctx.bundle / "model.onnx"), session_options(ctx.threads), providers=providers)
    x = images.preprocess(images.load_image(ctx.image), pre)
    batch = np.ascontiguousarray(np.repeat(x, bs, axis=0))
    name, out = sess.get_inputs()[0].name, [sess.get_outputs()[0].name]
    sess.run(out, {name: batch})  # warm-up

    def run():
        for start in range(0, k, bs):
            sess.run(out, {name: batch[: min(bs, k - start)]})

    return run


def _floor_cuda(sess, name: str, out: str, batch: np.ndarray, k: int) -> Callable[[], object]:
    """On CUDA the images sit on the device (bound once) and the outputs stay there: compute only."""
    import onnxruntime as ort

    bs = batch.shape[0]
    sizes = sorted({min(bs, k - s) for s in range(0, k, bs)})
    bindings = {}
    for n in sizes:
        b = sess.io_binding()
        b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch[:n]), "cuda", 0))
        b.bind_output(out, "cuda", 0)
        bindings[n] = b
        sess.run_with_iobinding(b)  # warm-up (and cuDNN's algorithm search) per shape

    def run():
        for start in range(0, k, bs):
            b = bindings[min(bs, k - start)]
            sess.run_with_iobinding(b)
            b.synchronize_outputs()

    return run


def _torch_reference(ctx: Context) -> Callable[[], object]:
    import torch

    from runtime import images
    from runtime.bundle import load_bundle

    from .bundles import load_torch

    torch.set_num_threads(int(ctx.threads))
    net, layer = load_torch(ctx.model, ctx.bundle)
    dev = "cuda" if ctx.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    net = net.to(dev)
    module = dict(net.named_modules())[layer]
    pre = load_bundle(ctx.bundle).meta.preprocessing
    with torch.no_grad():  # warm-up
        net(torch.zeros(TORCH_BATCH, 3, *pre.input_size, device=dev))

    def run():
        x = torch.from_numpy(images.preprocess(images.load_image(ctx.image), pre)).to(dev)
        return torch_scorecam(net, module, x)

    return run


def torch_scorecam(net, module, x, class_idx: int | None = None, batch: int = TORCH_BATCH):
    """Score-CAM (``paper`` preset) the way peer libraries write it; returns the [H,W] map in [0,1]."""
    import torch
    import torch.nn.functional as F

    store = {}
    hook = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    with torch.no_grad():
        try:
            logits = net(x)
        finally:
            hook.remove()
        acts = store["a"]  # [1,K,h,w]
        c = int(logits.argmax(1)) if class_idx is None else int(class_idx)
        size = x.shape[-2:]
        up = F.interpolate(acts, size=size, mode="bilinear", align_corners=False)
        lo = up.amin(dim=(2, 3), keepdim=True)
        hi = up.amax(dim=(2, 3), keepdim=True)
        masks = (up - lo) / (hi - lo + 1e-8)  # [1,K,H,W]
        inputs = x[:, None] * masks[:, :, None]  # [1,K,3,H,W]: every masked input at once
        scores = torch.cat([net(inputs[0, i:i + batch])[:, c] for i in range(0, inputs.shape[1], batch)])
        w = torch.softmax(scores, dim=0)
        cam = F.relu((w[:, None, None] * acts[0]).sum(0))
        sal = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        sal = (sal - sal.min()) / (sal.max() - sal.min() + 1e-12)
        return sal.cpu().numpy()
