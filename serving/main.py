"""The FastAPI app: ``create_app()`` wires settings, model registry, micro-batcher and routes.

Routes::

    POST /v1/score        score impressions, one object per row (bearer token if CTCVR_API_TOKEN is set)
    POST /v1/score/columns  the same, one list per feature
    POST /v1/rank         score and rank candidates: the context once, each candidate's features
    GET  /v1/model        the model being served
    POST /admin/reload    hot reload (bearer token CTCVR_ADMIN_TOKEN; disabled without one)
    GET  /healthz         liveness
    GET  /readyz          readiness (a model is loaded)
    GET  /metrics         Prometheus
    GET  /docs, /openapi.json

The model is loaded in the lifespan, before the first request; a missing or invalid artifact
fails the startup with a message naming the file and the problem. With a model repository
(``CTCVR_MODEL_REPOSITORY``) its current version is loaded, and a background thread, started
and stopped by the lifespan, follows its pointer (``serving.repository``). Unexpected errors answer
``500 {"detail": "internal server error"}`` and are logged with their traceback, which never
reaches the client.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from schemas.api import RankRequest, ScoreColumnsRequest, ScoreRequest
from schemas.host_memory import tune_host_allocator
from serving.artifact import ArtifactError
from serving.batching import MicroBatcher
from serving.config import ServingSettings, get_settings
from serving.deps import require_api_token
from serving.metrics import MetricsMiddleware, ServiceMetrics
from serving.registry import ModelRegistry
from serving.repository import RepositoryFollower, follow_repository
from serving.routes import admin, health, model, rank, score
from serving.routes._scoring import API_PREFIX

__all__ = ["create_app", "worker_app"]

log = logging.getLogger("ctcvr.serving")

# A request allocates and frees thousands of containers (its parsed JSON): with Python's default
# threshold (700) that starts a young garbage collection every few hundred, and every so often a
# full one that walks every object of the process (the model, torch, FastAPI) with the GIL held:
# about 0.3 to 1 ms per 256-row request of the row form. Reference counting frees a parsed body
# long before 10,000 of its containers could accumulate, so young collections now run only when
# that many containers have outlived their request.
GC_YOUNG_THRESHOLD = 10_000


class _App(FastAPI):
    """FastAPI whose metrics middleware sits outside everything, so it sees every response
    (413s from the body limit and 500s included)."""

    def build_middleware_stack(self) -> ASGIApp:
        return MetricsMiddleware(super().build_middleware_stack(), self.state.metrics)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServingSettings = app.state.settings
    registry: ModelRegistry = app.state.registry
    batcher: MicroBatcher = app.state.batcher
    follower: RepositoryFollower | None = app.state.follower
    torch.set_num_threads(settings.torch_threads)
    tune_host_allocator()  # a batch reuses the last one's memory (schemas.host_memory)
    # The batcher's thread takes the GIL back after each torch operation of a model call, while
    # the loop's thread parses other requests with it held: with Python's 5 ms switch interval a
    # 4,096-row batch spent half its time waiting (benchmarks/README.md, "The GIL handed over
    # sooner").
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    if registry.current is None:
        try:
            if follower is not None:
                follower.load_initial()
            else:
                registry.load()
        except ArtifactError as err:
            log.error("cannot start: %s", err)
            raise
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log.info("serving %s from %s", registry.current.version, registry.model_dir)
    batcher.start()
    if follower is not None:
        follower.start()
        log.info(
            "following model repository %s every %s s",
            follower.repository.uri,
            follower.poll_seconds,
        )
    try:
        yield
    finally:
        if follower is not None:
            follower.stop()
        batcher.stop()


def create_app(
    settings: ServingSettings | None = None,
    registry: ModelRegistry | None = None,
    follower: RepositoryFollower | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: default :func:`get_settings` (the environment); routes read them through
            ``serving.deps.SettingsDep``.
        registry: a registry with a model already loaded (``python -m serving`` loads before
            starting the server so that a bad artifact fails with a plain message); default: one
            that the lifespan fills from ``settings.model_dir``.
        follower: the follower of ``settings.model_repository`` around ``registry`` (built here
            when there is a repository and none is given).
    """
    settings = settings or get_settings()
    metrics = registry.metrics if registry is not None else ServiceMetrics()
    registry = registry or ModelRegistry(
        settings.model_dir, settings.max_rows, metrics, settings.model_cache
    )
    if follower is None and settings.model_repository is not None:
        follower = follow_repository(settings, registry)
    app = _App(
        title="ctcvr scoring service",
        summary="Post-click conversion rate: pCTR, pCVR and pCTCVR for raw impressions.",
        version="1",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.follower = follower
    app.state.batcher = MicroBatcher(
        max_rows=settings.batch_max_rows,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
        min_rows=settings.batch_min_rows,
        max_queue_rows=settings.max_queue_rows,
        on_batch=metrics.observe_batch,
    )
    metrics.track_queue(lambda: app.state.batcher.queued_rows)

    # The score routes check the API token in their one dependency (serving.deps.ScoringDep),
    # and are the app's own routes rather than an included router's: an inclusion would serve
    # them with FastAPI's generic handler instead of ScoringRoute's direct one. First, as they
    # take most of the requests (routes are matched in order).
    app.router.routes[:0] = [*score.router.routes, *rank.router.routes]
    app.include_router(model.router, prefix=API_PREFIX, dependencies=[Depends(require_api_token)])
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def worker_app() -> FastAPI:
    """The app of one worker process of ``python -m serving --workers N`` (uvicorn's factory):
    settings from the environment, which the main process set from its flags, and the model
    loaded by the lifespan."""
    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def configure_logging(level: str) -> None:
    """The service's log lines: ``level`` (uvicorn's names) on stderr with a timestamp."""
    logging.basicConfig(
        level=level.upper().replace("TRACE", "DEBUG"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with the request schema of the model being served."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    scorer = app.state.registry.current
    models = {
        "ScoreRequest": scorer.request_model if scorer is not None else ScoreRequest,
        "ScoreColumnsRequest": scorer.columns_model if scorer is not None else ScoreColumnsRequest,
        "RankRequest": scorer.rank_model if scorer is not None else RankRequest,
    }
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, request_model in models.items():
        body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[name] = body
    app.openapi_schema = spec
    return spec
