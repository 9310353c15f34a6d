"""What the scoring routes share: validating a body off or on the event loop, waiting for the
micro-batcher's scores, and the error responses they document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException, status
from fastapi.concurrency import run_in_threadpool

from schemas.api import ErrorResponse, ValidationErrorResponse
from serving.batching import BatchResult, Overloaded, ScoringTimeout
from serving.deps import BEARER_SECURITY, Scoring
from serving.model import Features, RankFeatures
from serving.scorer import RequestInvalid, Scorer

__all__ = ["RESPONSES", "operation_extra", "refuse_non_finite", "score"]

Prepared = TypeVar("Prepared")

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
