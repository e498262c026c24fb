"""The FastAPI app: KServe V1 ``:explain`` / ``:predict``, Open Inference Protocol V2, ``/metrics`` and
the web page at ``/``. A thin edge over :class:`runtime.Explainer` (and, for an object detector,
:class:`runtime.detect.DetectionExplainer`: one result per box, docs/detection.md): requests are parsed by
:mod:`.protocol`, explanations run in :mod:`.scheduler`'s worker threads (never on the event loop),
and every refusal is ``{"error": "..."}`` with the status that names its cause.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, images
from ..cliargs import one_line
from ..explainer import TargetError
from ..images import ImageError
from . import protocol as P
from .metrics import Metrics
from .models import ServedModel, find_models, load_models
from .scheduler import Cancelled, QueueFull, Scheduler, ShuttingDown, Token

log = logging.getLogger("scorecam.serve")
STATIC = Path(__file__).resolve().parent / "static"
CONFIG_ENV = "SCORECAM_SERVE_CONFIG"  # the config as JSON, for `--workers N` (uvicorn imports the app per process)


@dataclass
class ServeConfig:
    """Everything the app needs to know (the CLI's flags)."""

    models: list[str] = field(default_factory=list)
    model_name: str | None = None
    device: str = "auto"
    preset: str = "paper"
    max_channels: int | None = None
    select: str = "auto"
    mode: str = "scorecam"
    fill: str | None = None  # None: kernel when channels are capped (runtime.explainer.default_fill)
    layers: int | list[str] | None = None  # multi-layer Score-CAM (None: the target layer alone)
    fusion: str = "product"
    baseline: str = "zero"
    batch_size: int | None = None
    threads: int | None = None
    thirdparty: dict = field(default_factory=dict)  # Explainer kwargs for bare .onnx files
    task: str = "auto"  # auto (a detector is recognised by its outputs / metadata), classify or detect
    detector: dict = field(default_factory=dict)  # DetectionExplainer kwargs (score_threshold, nms_iou, ...)
    max_concurrency: int = 1
    queue_size: int = 16
    timeout: float = 120.0
    max_body_mb: float = 16.0
    max_pixels: int = images.MAX_PIXELS
    max_instances: int = 8

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 2**20)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))


class State:
    """The app's live state: models (once loaded), readiness, the scheduler and the metrics."""

    def __init__(self, config: ServeConfig, loader: Callable[[], dict[str, ServedModel]] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.max_concurrency, config.queue_size, self.metrics.on_scheduler)
        self.limits = P.Limits(config.max_instances, config.max_pixels)
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.load_error: str | None = None
        self.closing = False
        self._loader = loader or self._load
        self._on_fatal = on_fatal
        self._thread: threading.Thread | None = None

    def _load(self) -> dict[str, ServedModel]:
        c = self.config
        specs = find_models(c.models, c.model_name)
        kwargs = {"device": c.device, "preset": c.preset, "max_channels": c.max_channels, "select": c.select,
                  "mode": c.mode, "fill": c.fill, "layers": c.layers, "fusion": c.fusion, "baseline": c.baseline,
                  "batch_size": c.batch_size, "threads": c.threads}
        return load_models(specs, kwargs, c.thirdparty, log=log.info, detector_kwargs=c.detector, task=c.task)

    def start_loading(self) -> None:
        """Load the models in a thread: the server answers liveness (and 503 elsewhere) meanwhile."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._load_now, name="load-models", daemon=True)
            self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait for the loading thread (a process must not exit while ONNX Runtime builds a session)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _load_now(self) -> None:
        try:
            models = self._loader()
        except Exception as e:  # BundleError, EngineError, ...: one line, then the server stops
            self.load_error = one_line(e)
            log.error("error: %s", self.load_error)
            if self._on_fatal:
                self._on_fatal(self.load_error)
            return
        for m in models.values():
            self.metrics.load_seconds.labels(m.name).set(m.load_seconds)
        self.models = models
        self.ready = True
        log.info("ready: %s", ", ".join(models))

    @property
    def loading(self) -> bool:
        """The loading thread is still at work (no error yet)."""
        return not self.ready and self.load_error is None and self._thread is not None and self._thread.is_alive()

    async def wait_for_load(self) -> None:
        """Wait while the models load, up to the request timeout (``--timeout``): with ``--workers N`` a request
        can reach a process still loading after another one has answered the readiness probe (and the page may
        open early)."""
        end = time.monotonic() + self.config.timeout
        while self.loading and not self.closing and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def loaded_model(self, name: str) -> ServedModel:
        """:meth:`model` after :meth:`wait_for_load`."""
        await self.wait_for_load()
        return self.model(name)

    def model(self, name: str) -> ServedModel:
        if self.closing:
            raise P.ProtocolError(503, "the server is shutting down")
        if not self.ready:
            raise P.ProtocolError(503, f"not ready: {self.load_error}" if self.load_error
                                  else "not ready: the models are still loading")
        if name not in self.models:
            raise P.ProtocolError(404, f"unknown model {name!r}; served: {', '.join(self.models)}")
        return self.models[name]


# ------------------------------------------------------------------------------------- the jobs


def _decode(inst: P.Instance, i: int, max_pixels: int) -> np.ndarray:
    try:
        return images.load_image(io.BytesIO(inst.image), max_pixels=max_pixels)
    except ImageError as e:
        msg = str(e).replace("<stream>", f"image {i}")
        raise P.ProtocolError(413 if "over the limit" in msg or "too many pixels" in msg else 400, msg) from None


def check_task(model: ServedModel, instances: list[P.Instance], opts: P.Options) -> None:
    """422 for a request whose ``task`` is not the model's, or that gives a box / detection to a classifier."""
    if opts.task is not None and opts.task != model.task:
        what = "an object detector" if model.task == "detect" else "a classifier"
        raise P.ProtocolError(422, f"task {opts.task!r} does not fit model {model.name!r}: it is {what} (task "
                                   f"{model.task!r})")
    if model.task == "classify":
        for i, inst in enumerate(instances):
            if inst.box is not None or inst.detection is not None:
                raise P.ProtocolError(422, f"image {i}: box and detection apply to object detectors; model "
                                           f"{model.name!r} is a classifier (give targets / top_k)")
    elif opts.mode not in (None, "scorecam"):
        raise P.ProtocolError(422, f"mode {opts.mode!r} does not apply to detectors: they are explained with mode "
                                   "scorecam")


def _progress(model: ServedModel, state: State, token: Token):
    """The ``progress(done, total)`` of one request's explanation: counts the chunk in the metrics and on the
    token, and stops the work when the token is cancelled or its deadline has passed."""
    chunks = state.metrics.chunks.labels(model.name)

    def progress(done: int, total: int) -> None:
        chunks.inc()
        token.steps += 1
        token.check()

    return progress


def _explain_all(model: ServedModel, instances: list[P.Instance], opts: P.Options, state: State, token: Token,
                 want_png: bool = False):
    """Runs in a worker thread: decode, explain (stopping at the token's deadline), encode."""
    try:
        if model.task == "detect":
            if opts.layers not in (None, 1) or opts.baseline not in (None, "zero"):
                raise ValueError("layers and baseline apply to classifiers; a detector is explained from one level")
            ex = model.variant(opts.preset, opts.max_channels, opts.exact, opts.select, opts.mode, opts.fill,
                               opts.score_threshold)
        else:
            ex = model.variant(opts.preset, opts.max_channels, opts.exact, opts.select, opts.mode, opts.fill,
                               layers=opts.layers, fusion=opts.fusion, baseline=opts.baseline)
    except ValueError as e:  # e.g. preview / relevance asked of a model whose head does not allow it
        raise P.ProtocolError(422, str(e)) from None
    if model.task == "detect":
        return _explain_boxes(model, ex, instances, opts, state, token, want_png)
    progress = _progress(model, state, token)
    out = []
    for i, inst in enumerate(instances):
        token.check()
        rgb = _decode(inst, i, state.config.max_pixels)
        try:
            results = ex.explain(rgb, targets=inst.targets, top_k=inst.top_k, progress=progress)
        except TargetError as e:
            raise P.ProtocolError(422, f"image {i}: {e}") from None
        if want_png:
            r = results[0]
            return P.png(images.overlay(rgb, r.saliency, opts.alpha)), r
        # overlays are made now, so only one decoded image is held at a time
        pngs = [P.png(images.overlay(rgb, r.saliency, opts.alpha)) if opts.overlay else None for r in results]
        out.append(((int(rgb.shape[0]), int(rgb.shape[1])), results, pngs))
        del rgb
    return out


def _explain_boxes(model: ServedModel, ex, instances: list[P.Instance], opts: P.Options, state: State, token: Token,
                   want_png: bool):
    """The detector's :func:`_explain_all`: one :class:`runtime.detect.BoxResult` per box; overlays with the box
    drawn."""
    progress = _progress(model, state, token)
    out = []
    for i, inst in enumerate(instances):
        token.check()
        rgb = _decode(inst, i, state.config.max_pixels)
        try:
            results = ex.explain(rgb, detection=inst.detection, box=inst.box,
                                 target=inst.targets[0] if inst.box is not None else None, top_k=inst.top_k,
                                 progress=progress)
        except TargetError as e:
            raise P.ProtocolError(422, f"image {i}: {e}") from None
        if want_png:
            r = results[0]
            return P.png(r.overlay(rgb, opts.alpha)), r
        pngs = [P.png(r.overlay(rgb, opts.alpha)) if opts.overlay else None for r in results]
        out.append(((int(rgb.shape[0]), int(rgb.shape[1])), results, pngs))
        del rgb
    return out


def _v1_body(model: ServedModel, explained, opts: P.Options) -> bytes:
    if model.task == "detect":
        explanations = [{"image_size": list(size), "task": "detect",
                         "results": [P.result_detect_v1(r, opts, png) for r, png in zip(results, pngs, strict=True)]}
                        for size, results, pngs in explained]
        return json.dumps({"model_name": model.name, "explanations": explanations}).encode()
    explanations = [{"image_size": list(size), "results": [P.result_v1(r, opts, png)
                                                            for r, png in zip(results, pngs, strict=True)]}
                    for size, results, pngs in explained]
    return json.dumps({"model_name": model.name, "explanations": explanations}).encode()


# ---------------------------------------------------------------------------------------- the app


def create_app(config: ServeConfig, loader: Callable[[], dict[str, ServedModel]] | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service for ``config``; models are loaded in a thread when the server starts."""
    state = State(config, loader, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        state.closing = True
        await state.scheduler.drain(config.timeout)

    app = FastAPI(title="scorecam-onnx explain service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # FastAPI's docs pages load scripts from a CDN
    app.state.scorecam = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(P.ProtocolError)
    async def _protocol_error(request: Request, e: P.ProtocolError):
        return _error(e.status, e.message, getattr(e, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        text = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not "
                f"allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(e.status_code, text)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("internal error on %s %s:\n%s", request.method, request.url.path, traceback.format_exc())
        return _error(500, f"internal error ({type(e).__name__}); see the server log")

    # ------------------------------------------------------------------------------ helpers
    async def read_body(request: Request) -> bytes:
        limit = config.max_body
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise P.ProtocolError(413, f"request body of {int(length):,} bytes is over the limit of {limit:,} "
                                       "(--max-body-mb)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise P.ProtocolError(413, f"request body is over the limit of {limit:,} bytes (--max-body-mb)")
        return bytes(body)

    async def run_job(request: Request, fn, model: ServedModel):
        t0 = time.perf_counter()
        try:
            out = await state.scheduler.run(fn, config.timeout, request.is_disconnected)
        except QueueFull as e:
            state.metrics.cancelled.labels("queue_full").inc()
            raise _Refused(429, str(e), {"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown:
            raise P.ProtocolError(503, "the server is shutting down") from None
        except Cancelled as e:
            state.metrics.cancelled.labels(e.reason).inc()
            if e.reason == "timeout":
                raise P.ProtocolError(504, f"the explanation took longer than the server's timeout of "
                                           f"{config.timeout:g} s (--timeout); its remaining work was dropped"
                                      ) from None
            raise P.ProtocolError(499, "the client disconnected") from None
        state.metrics.latency.labels(model.name).observe(time.perf_counter() - t0)
        return out

    async def parse_request(request: Request, v2: bool = False) -> tuple[list[P.Instance], P.Options]:
        body = await read_body(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not v2 and (ctype.startswith("image/") or ctype == "application/octet-stream"):
            q = request.query_params
            if not body:
                raise P.ProtocolError(400, "empty request body; send the image file's bytes")
            params = {k: q[k] for k in P.OPTION_KEYS if k in q}
            opts = P.parse_options(params)
            detection = q.getlist("detection")
            inst = P.Instance(body, P.split_query_targets(q.getlist("targets") + q.getlist("target")),
                              P.parse_int(q.get("top_k", 1), "top_k", 1, P.MAX_TOP_K), box=P.parse_box(q.get("box")),
                              detection=P.parse_detection(",".join(detection)) if detection else None)
            instances = [P.check_box_request(inst, "query")]
        else:
            data = await run_in_threadpool(P.parse_json, body)
            instances, opts = await run_in_threadpool(P.parse_v2 if v2 else P.parse_v1, data, state.limits)
        for i, inst in enumerate(instances):  # not an image / over the pixel limit: refused before queueing
            await run_in_threadpool(P.check_image_header, inst.image, f"image {i}", config.max_pixels)
        return instances, opts

    # ------------------------------------------------------------------------------ V1
    @app.get("/v1/models")
    async def v1_models():
        await state.wait_for_load()  # not an empty list from a process still loading
        return {"models": list(state.models)}

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request):
        model = await state.loaded_model(name)
        instances, opts = await parse_request(request)
        check_task(model, instances, opts)
        accept = request.headers.get("accept", "")
        if "image/png" in accept and "application/json" not in accept:
            data, r = await run_job(request, lambda t: _explain_all(model, instances[:1], opts, state, t, True), model)
            if model.task == "detect":
                return Response(data, media_type="image/png", headers={
                    "X-Class-Index": str(r.class_index), "X-Label": quote(r.label), "X-Score": f"{r.score:.6f}",
                    "X-Box": ",".join(f"{v:.2f}" for v in r.box),
                    "X-Detection": "" if r.detection is None else str(r.detection), "X-Seconds": f"{r.seconds:.4f}",
                    "X-Provider": r.provider, "X-Flat": "true" if r.flat else "false"})
            return Response(data, media_type="image/png", headers={
                "X-Class-Index": str(r.class_index), "X-Label": quote(r.label), "X-Probability": f"{r.probability:.6f}",
                "X-Seconds": f"{r.seconds:.4f}", "X-Provider": r.provider})

        def job(token: Token) -> bytes:
            return _v1_body(model, _explain_all(model, instances, opts, state, token), opts)

        return Response(await run_job(request, job, model), media_type="application/json")

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request):
        model = await state.loaded_model(name)
        instances, opts = await parse_request(request)
        check_task(model, [], opts)

        def job(token: Token) -> dict:
            preds = []
            for i, inst in enumerate(instances):
                token.check()
                if model.task == "detect":  # the model's detections, best first
                    ex = model.variant(None, None, score_threshold=opts.score_threshold)
                    preds.append([P.detection_v1(d) for d in ex.detect(_decode(inst, i, config.max_pixels))])
                    continue
                probs = model.explainer.predict(_decode(inst, i, config.max_pixels))
                preds.append(P.prediction(probs, model.explainer.label_of, 5))
            return {"predictions": preds}

        return await run_job(request, job, model)

    @app.get("/v1/models/{name}")
    async def v1_model(name: str):
        model = state.model(name)
        return {"name": model.name, "ready": state.ready and not state.closing}

    # ------------------------------------------------------------------------------ V2
    @app.get("/v2")
    async def v2_server():
        return {"name": "scorecam-onnx", "version": __version__, "extensions": []}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        ok = state.ready and not state.closing
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str):
        model = state.model(name)
        h, w = model.explainer.input_size
        meta = model.metadata()
        if model.task == "detect":
            outputs = [{"name": "image_index", "datatype": "INT64", "shape": [-1]},
                       {"name": "saliency", "datatype": "FP32", "shape": [-1, h, w]},
                       {"name": "content", "datatype": "INT64", "shape": [-1, 4]},
                       {"name": "box", "datatype": "FP32", "shape": [-1, 4]},
                       {"name": "detection", "datatype": "INT64", "shape": [-1]},
                       {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                       {"name": "score", "datatype": "FP32", "shape": [-1]},
                       {"name": "similarity", "datatype": "FP32", "shape": [-1]},
                       {"name": "label", "datatype": "BYTES", "shape": [-1]}]
            return {"name": model.name, "versions": ["1"], "platform": "scorecam-onnx",
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}], "outputs": outputs,
                    **meta, "parameters": meta}
        return {"name": model.name, "versions": ["1"], "platform": "scorecam-onnx",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "saliency", "datatype": "FP32", "shape": [-1, -1, h, w]},
                            {"name": "class_index", "datatype": "INT64", "shape": [-1, -1]},
                            {"name": "probability", "datatype": "FP32", "shape": [-1, -1]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1, -1]}],
                **meta, "parameters": meta}

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str):
        model = state.model(name)
        return {"name": model.name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        model = await state.loaded_model(name)
        instances, opts = await parse_request(request, v2=True)
        check_task(model, instances, opts)

        def job(token: Token) -> bytes:
            explained = _explain_all(model, instances, opts, state, token)
            results = [rs for _, rs, _ in explained]
            outputs = P.v2_detect_outputs(results, model.explainer.input_size) if model.task == "detect" else \
                P.v2_outputs(results, model.explainer.input_size)
            return json.dumps({"model_name": model.name, "model_version": "1", "outputs": outputs}).encode()

        return Response(await run_job(request, job, model), media_type="application/json")

    # ------------------------------------------------------------------------------ metrics and the page
    @app.get("/metrics")
    async def metrics():
        data, ctype = state.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/ui/models")
    async def ui_models():
        await state.wait_for_load()
        if not state.ready:
            raise P.ProtocolError(503, state.load_error or "not ready: the models are still loading")
        return {"models": [{"name": m.name, **m.metadata()} for m in state.models.values()],
                "presets": list(P.PRESETS)}

    @app.get("/ui/models/{name}/labels")
    async def ui_labels(name: str):
        return {"labels": (await state.loaded_model(name)).explainer.labels}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Refused(P.ProtocolError):
    """A refusal with extra headers (429's Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict) -> None:
        super().__init__(status, message)
        self.headers = headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _CountRequests:
    """ASGI middleware: ``scorecam_requests_total{route,status}`` by the matched route's template."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if path.startswith("/static"):
                path = "/static"
            self.metrics.requests.labels(path, str(status["code"])).inc()


def app_from_env() -> FastAPI:
    """The app factory for ``uvicorn --factory`` (used with ``--workers N``): config from the environment."""
    text = os.environ.get(CONFIG_ENV)
    if not logging.getLogger().handlers:  # a worker process: log as the parent does
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the service with python -m runtime.serve")
    return create_app(ServeConfig.from_json(text))
