"""``python -m runtime.serve MODEL [MODEL ...]`` / ``scorecam-serve``: the explain service's command line.

Takes the flags KServe gives an explainer container (``--model_name``, ``--predictor_host``,
``--http_port``, ``--workers``); flags it does not know are ignored with a warning, so a newer KServe
cannot crash it. A bad MODEL is one ``error: ...`` line and exit status 2; SIGTERM stops taking
requests, lets the running ones finish (at most ``--timeout`` s) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .. import images, thirdparty
from ..cliargs import non_negative_int, one_line, positive_float, positive_int
from ..contract import BundleError
from ..engine import DEVICES
from ..explain import EXIT_USAGE, UsageError, _Parser, add_mode_arguments
from ..scorecam import PRESETS

MODEL_ENV = "SCORECAM_MODEL"  # MODEL when none is given (the container sets /mnt/models)
log = logging.getLogger("scorecam.serve")

EPILOG = """\
MODEL is a bundle directory, a .onnx file (a third-party classifier: give its preprocessing with
--size/--mean/--std/--scale/--bgr/--labels, as for python -m runtime.explain), a folder of bundles
(one model per subfolder), or the name of a bundle under models/ (or $SCORECAM_MODELS).

routes:
  POST /v1/models/NAME:explain   KServe V1: {"instances": [{"image": {"b64": ...}, "top_k": 3}]}, or an
                                 image body (Content-Type: image/*; ?targets=&top_k=); Accept: image/png
                                 answers the overlay PNG itself
  POST /v1/models/NAME:predict   top-5 classes;  GET /v1/models, /v1/models/NAME
  POST /v2/models/NAME/infer     Open Inference Protocol V2;  GET /v2/health/live, /v2/health/ready,
                                 /v2/models/NAME, /v2/models/NAME/ready
  GET  /metrics                  Prometheus;  GET /  the web page

examples:
  python -m runtime.serve models/efficientnet_lite0                 # http://127.0.0.1:8080/
  python -m runtime.serve models/ --host 0.0.0.0 --max-channels 128 # every bundle under models/
  curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' -H 'Accept: image/png' \\
      http://127.0.0.1:8080/v1/models/efficientnet_lite0:explain > heat.png
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.serve",
                description="Serve Score-CAM explanations over HTTP: KServe V1 :explain, Open Inference Protocol "
                            "V2, Prometheus /metrics and a web page.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", metavar="MODEL", nargs="*",
                   help=f"bundle dir, .onnx file, folder of bundles, or name (default: ${MODEL_ENV}, as set in the "
                        "container image)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a "
                                                       "container)")
    p.add_argument("--port", "--http_port", dest="port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--model_name", "--model-name", dest="model_name", default=None,
                   help="the name of a single served model (default: its bundle folder's name)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes (each loads every model once; default 1)")
    p.add_argument("--predictor_host", "--predictor-host", dest="predictor_host", default=None,
                   help="accepted for KServe; unused (the model runs inside this process)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--preset", choices=list(PRESETS), default="paper", help="default Score-CAM preset (a request "
                                                                          "may ask for another)")
    add_mode_arguments(p, "; a request may ask for another",
                       "; a request may ask for another (max_channels), or for all channels (max_channels: 0)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="masked inputs per ONNX Runtime run")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-concurrency", type=positive_int, default=1,
                   help="explanations running at once (default 1: one per device; each uses every core)")
    p.add_argument("--queue-size", type=non_negative_int, default=16,
                   help="requests waiting for a worker; one more is answered 429 (default 16)")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds per request, queue time included; past it: 504 and the work stops (default 120)")
    p.add_argument("--max-body-mb", type=positive_float, default=16.0, help="largest request body (default 16)")
    p.add_argument("--max-pixels", type=positive_int, default=images.MAX_PIXELS,
                   help=f"largest image, width x height (default {images.MAX_PIXELS:,}); more is 413")
    p.add_argument("--max-instances", type=positive_int, default=8, help="images per request (default 8)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    thirdparty.add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace):
    from .app import ServeConfig

    kw = thirdparty.cli_kwargs(args)
    return ServeConfig(models=list(args.models), model_name=args.model_name, device=args.device, preset=args.preset,
                       max_channels=args.max_channels, select=args.select, mode=args.mode, fill=args.fill,
                       batch_size=args.batch_size, threads=args.threads,
                       thirdparty=kw, max_concurrency=args.max_concurrency, queue_size=args.queue_size,
                       timeout=args.timeout, max_body_mb=args.max_body_mb, max_pixels=args.max_pixels,
                       max_instances=args.max_instances)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import CONFIG_ENV, create_app
    from .models import find_models

    if not args.models:
        if not os.environ.get(MODEL_ENV):
            raise UsageError(f"no MODEL given (a bundle dir, a .onnx file or a folder of bundles; or set ${MODEL_ENV})")
        args.models = [os.environ[MODEL_ENV]]
    if args.list_layers:
        raise UsageError("--list-layers belongs to python -m runtime.explain")
    config = config_from_args(args)
    specs = find_models(config.models, config.model_name)  # a bad MODEL fails here, before listening
    if args.predictor_host:
        log.info("--predictor_host %s is accepted but unused: the model runs inside this process", args.predictor_host)
    log.info("serving %s on http://%s:%d/ (max concurrency %d, queue %d, timeout %gs)",
             ", ".join(s.name for s in specs), args.host, args.port, config.max_concurrency, config.queue_size,
             config.timeout)
    common = {"host": args.host, "port": args.port, "log_level": args.log_level,
              "timeout_graceful_shutdown": int(config.timeout) + 5, "log_config": None}
    if args.workers > 1:
        os.environ[CONFIG_ENV] = config.to_json()
        uvicorn.run("runtime.serve.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0

    failed: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: refuse new work at once
            app.state.scorecam.closing = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a graceful stop is a success: exit 0, not uvicorn's re-raised SIGTERM
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list) and signal.SIGTERM in captured:
                    captured.remove(signal.SIGTERM)

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app = create_app(config, on_fatal=fatal)
    server = Server(uvicorn.Config(app, **common))
    try:
        server.run()
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except SystemExit:  # uvicorn exits when it cannot bind (the port is taken, ...), after logging why
        raise UsageError(f"cannot listen on {args.host}:{args.port} (see the log line above)") from None
    finally:
        app.state.scorecam.wait_loaded()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return EXIT_USAGE
    if not server.started:
        print(f"error: the server did not start on {args.host}:{args.port} (see the log above)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.serve`` / ``scorecam-serve``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    logging.getLogger().setLevel(args.log_level.upper())
    if unknown:
        log.warning("ignoring flags this server does not know: %s", " ".join(unknown))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, args.max_pixels)  # ours is the limit that counts
    try:
        return serve(args)
    except (UsageError, BundleError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
