"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process).

``scorecam_requests_total{route,status}``, ``scorecam_explanation_seconds{model}`` (histogram),
``scorecam_queue_depth``, ``scorecam_in_flight``, ``scorecam_model_load_seconds{model}``,
``scorecam_scored_chunks_total{model}`` (masked-input chunks actually scored: a request stopped at
its deadline adds fewer than a full explanation), ``scorecam_cancelled_total{reason}``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("scorecam_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("scorecam_explanation_seconds", "Wall time of one explain request (queue "
                                 "included) that succeeded", ["model"], buckets=BUCKETS, registry=r)
        self.queue_depth = Gauge("scorecam_queue_depth", "Requests waiting for a worker", registry=r)
        self.in_flight = Gauge("scorecam_in_flight", "Explanations running now", registry=r)
        self.load_seconds = Gauge("scorecam_model_load_seconds", "Seconds taken to load each model", ["model"],
                                  registry=r)
        self.chunks = Counter("scorecam_scored_chunks", "Chunks of masked inputs scored", ["model"], registry=r)
        self.cancelled = Counter("scorecam_cancelled", "Requests stopped early, by reason", ["reason"], registry=r)

    def on_scheduler(self, queued: int, running: int) -> None:
        self.queue_depth.set(queued)
        self.in_flight.set(running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
