"""What the scoring routes share: their route class (a handler without FastAPI's generic
per-request work), validating a body off or on the event loop, waiting for the micro-batcher's
scores, and the error responses they document."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from schemas.api import ErrorResponse, ValidationErrorResponse
from serving.batching import BatchResult, Overloaded, ScoringTimeout
from serving.deps import BEARER_SECURITY, Scoring, read_scoring
from serving.model import Features, RankFeatures
from serving.scorer import RequestInvalid, Scorer

__all__ = [
    "API_PREFIX",
    "RESPONSES",
    "ScoringRoute",
    "operation_extra",
    "refuse_non_finite",
    "score",
    "scoring_router",
]

Prepared = TypeVar("Prepared")

API_PREFIX = "/v1"  # the versioned API: scoring, ranking and the model's description

# Bodies up to this size are parsed and mapped on the event loop (a 256-candidate ranking body,
# ~40 KB, in about a millisecond): the thread pool gains no parallelism for this GIL-holding
# work, and its hop cost a fifth of the 256-candidate throughput of one worker. Larger bodies go
# to the pool, so the loop keeps answering while they are read.
_INLINE_PARSE_BYTES = 128 * 1024

RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "Missing or invalid bearer token (CTCVR_API_TOKEN)",
    },
    413: {"description": "Body larger than CTCVR_MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "Body is not JSON"},
    422: {
        "model": ValidationErrorResponse,
        "description": "Invalid values: each `loc` names where the value is and the feature",
    },
    503: {
        "model": ErrorResponse,
        "description": "No model loaded, overloaded, or timed out; retry later",
    },
}


class ScoringRoute(APIRoute):
    """The score routes' class: their handler calls the one dependency and the endpoint itself.

    FastAPI's handler solves a route's dependencies, looks for a body to validate, records its
    telemetry and inspects the endpoint's result on every request: about 60 us of a 1-row
    ``/v1/rank`` request (~640 us in the app, measured through ASGI). A score route's endpoint
    takes one parameter, ``ScoringDep``, parses its body itself and returns a ``Response``, so
    that work finds nothing to do; this handler is ``endpoint(await read_scoring(request))``.
    Errors raised by either still reach the app's exception handlers, and the signature still
    declares the dependency, from which FastAPI builds the OpenAPI operation as for any route.

    The direct handler serves the route as constructed: register it on the app itself
    (``serving.main``). FastAPI builds the handler again for each inclusion of the route's
    router, and an inclusion may add dependencies this route cannot see, so an included route
    gets FastAPI's own handler, which runs them. Dependency overrides do not reach the direct
    handler.

    Raises:
        TypeError: an endpoint that takes anything but ``ScoringDep``, or a route or router that
            adds dependencies.
    """

    _built = False  # whether the handler of the route as constructed exists

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        if self._built:  # an inclusion, with dependencies of its own perhaps
            return super().get_route_handler()
        self._require_scoring_only()
        self._built = True
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(await read_scoring(request))

        return handle

    def _require_scoring_only(self) -> None:
        calls = [dependency.call for dependency in self.dependant.dependencies]
        parameters = inspect.signature(self.endpoint).parameters
        if calls != [read_scoring] or len(parameters) != 1:
            raise TypeError(
                f"{self.path}: a ScoringRoute's endpoint takes one parameter, ScoringDep, and "
                f"the route no other dependency (got parameters {list(parameters)}, "
                f"dependencies {[getattr(c, '__name__', c) for c in calls]})"
            )


def scoring_router(tag: str) -> APIRouter:
    """A router of score routes under the versioned API, each a :class:`ScoringRoute` documenting
    the scoring errors. The app registers its routes itself, so that they keep the route class's
    direct handler (an inclusion would rebuild them with FastAPI's own)."""
    return APIRouter(prefix=API_PREFIX, tags=[tag], route_class=ScoringRoute, responses=RESPONSES)


def operation_extra(schema: str) -> dict[str, Any]:
    """What a score route's OpenAPI operation says beyond its signature: the request body, with
    the loaded model's request schema (see serving.main; the scorer parses the body, not
    FastAPI), and the bearer token (which ``ScoringDep`` checks)."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    body = {"required": True, "content": {"application/json": {"schema": ref}}}
    return {"requestBody": body, **BEARER_SECURITY}


async def score(
    scoring: Scoring,
    prepare: Callable[[Scorer, bytes], Prepared],
    inputs: Callable[[Prepared], Features | RankFeatures],
) -> tuple[Prepared, BatchResult]:
    """Validate and map the request's body (``prepare``), queue its model ``inputs`` and await
    the scores.

    Raises:
        HTTPException: 422 for an invalid body, 503 when overloaded or out of time.
    """
    # The routes are async although torch blocks. The request is parsed and mapped here (small
    # bodies on the loop, large ones in the thread pool); the micro-batcher scores it with the
    # others of this loop pass (a few rows: on the loop, once this pass's requests are queued)
    # or in its worker thread (larger batches), and the route awaits its slice holding no
    # thread.
    body, scorer, batcher = scoring.body, scoring.scorer, scoring.batcher
    try:
        with batcher.expecting():  # batches forming now wait for this request
            if len(body) <= _INLINE_PARSE_BYTES:
                prepared = prepare(scorer, body)
            else:
                prepared = await run_in_threadpool(prepare, scorer, body)
            ticket = batcher.enqueue(scorer, inputs(prepared))
        result = await batcher.wait(ticket, timeout=scoring.settings.request_timeout_s)
    except RequestInvalid as err:
        raise HTTPException(422, detail=err.errors) from None
    except (Overloaded, ScoringTimeout) as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(err), headers={"Retry-After": "1"}
        ) from None
    return prepared, result


def refuse_non_finite(scores: np.ndarray, where: Callable[[int], list[str | int]]) -> None:
    """422 naming the rows (``where(row)``) without finite scores: only extreme dense values
    get here.

    Raises:
        HTTPException: some row has a score that is not finite.
    """
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["body", *where(i)],
                    "msg": f"the model gives no finite score for row {i}; check its dense values",
                    "type": "value_out_of_range",
                }
                for i in bad[:50].tolist()
            ],
        )
