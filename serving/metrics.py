"""Prometheus metrics of the service, one registry per app (so tests can build many apps).

Exposed at ``GET /metrics``:

* ``ctcvr_http_requests_total{method, route, status}``: every response, errors included;
* ``ctcvr_http_request_duration_seconds{method, route}``: latency histogram, until the last byte;
* ``ctcvr_score_rows_total``: rows scored;
* ``ctcvr_batch_rows``: rows per model call (how well micro-batching groups requests);
* ``ctcvr_batch_duration_seconds``: time per model call;
* ``ctcvr_queue_rows``: rows waiting for the model;
* ``ctcvr_model_info{version, schema_fingerprint}``: 1 for the model being served;
* ``ctcvr_model_reloads_total{result}``: hot reloads, ``success`` or ``failure``.

Following a model repository (``--repository``; ``serving.repository``):

* ``ctcvr_repository_info{version}``: 1 for the version the repository's pointer names;
* ``ctcvr_repository_in_sync``: 1 when that is the version served, else 0;
* ``ctcvr_repository_refused_versions_total``: versions this replica could not load;
* ``ctcvr_repository_refused_info{version}``: 1 for the version refused, while the pointer names it;
* ``ctcvr_repository_polls_total{result}``: reads of the pointer, by what came of them;
* ``ctcvr_repository_last_poll_timestamp_seconds``: when the pointer was last read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MetricsMiddleware", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServiceMetrics:
    """The service's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ctcvr_http_requests",
            "HTTP responses by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ctcvr_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("ctcvr_score_rows", "Rows scored", registry=r)
        self.batch_rows = Histogram(
            "ctcvr_batch_rows", "Rows per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "ctcvr_batch_duration_seconds",
            "Time per model call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge("ctcvr_queue_rows", "Rows waiting for the model", registry=r)
        self.model_info = Gauge(
            "ctcvr_model_info",
            "The model being served (value 1)",
            ["version", "schema_fingerprint"],
            registry=r,
        )
        self.reloads = Counter(
            "ctcvr_model_reloads", "Hot reloads by result", ["result"], registry=r
        )
        self.repository_info = Gauge(
            "ctcvr_repository_info",
            "The version the model repository's pointer names (value 1)",
            ["version"],
            registry=r,
        )
        self.repository_in_sync = Gauge(
            "ctcvr_repository_in_sync",
            "1 when the served version is the one the repository's pointer names",
            registry=r,
        )
        self.refused_versions = Counter(
            "ctcvr_repository_refused_versions",
            "Versions of the model repository that could not be loaded",
            registry=r,
        )
        self.refused_info = Gauge(
            "ctcvr_repository_refused_info",
            "The version refused, while the repository's pointer names it (value 1)",
            ["version"],
            registry=r,
        )
        self.polls = Counter(
            "ctcvr_repository_polls",
            "Reads of the model repository's pointer by result",
            ["result"],
            registry=r,
        )
        self.last_poll = Gauge(
            "ctcvr_repository_last_poll_timestamp_seconds",
            "When the model repository's pointer was last read (Unix time)",
            registry=r,
        )

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.rows.inc(rows)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def set_model(self, version: str, schema_fingerprint: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version, schema_fingerprint=schema_fingerprint).set(1)

    def set_repository(self, current: str | None, served: str | None, refused: str | None) -> None:
        """The repository's current version, the served one and the one refused (if any)."""
        self.repository_info.clear()
        if current is not None:
            self.repository_info.labels(version=current).set(1)
        self.repository_in_sync.set(1 if current is not None and current == served else 0)
        self.refused_info.clear()
        if refused is not None:
            self.refused_info.labels(version=refused).set(1)

    def track_queue(self, rows: Callable[[], float]) -> None:
        self.queue_rows.set_function(rows)


class MetricsMiddleware:
    """Counts and times every HTTP response, labelled by route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # each label set's counter and histogram, found once (``labels()`` costs a request about
        # 5 us); as many as the series themselves
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app fails before it starts a response, the server answers 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            count, latency = self._of(scope.get("method", ""), _route(scope), status)
            count.inc()
            latency.observe(time.perf_counter() - start)

    def _of(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram of one label set."""
        series = self._series.get((method, route, status))
        if series is None:
            series = (
                self.metrics.requests.labels(method=method, route=route, status=str(status)),
                self.metrics.latency.labels(method=method, route=route),
            )
            self._series[method, route, status] = series
        return series


def _route(scope: Scope) -> str:
    """The matched route's path, or ``other`` for unmatched paths (never an unbounded label).

    Every route of this service is a fixed path (no path parameters), so a matched request's
    path is one of a handful of values.
    """
    return scope["path"] if scope.get("route") is not None else "other"
