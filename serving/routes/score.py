"""``POST /v1/score`` and ``POST /v1/score/columns``: raw impressions in, pCTR / pCVR / pCTCVR out,
one per row, in order; the same model and rules, rows or columns."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool

from schemas.api import ErrorResponse, ScoreColumnsResponse, ScoreResponse, ValidationErrorResponse
from serving.batching import BatchResult, Overloaded, ScoringTimeout
from serving.deps import RawJsonBody, Scoring, ScoringDep
from serving.scorer import RequestForm, RequestInvalid

__all__ = ["router"]

router = APIRouter(tags=["score"])

_INLINE_PARSE_BYTES = 16 * 1024  # parsing and mapping take well under a millisecond

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "Missing or invalid bearer token (CTCVR_API_TOKEN)",
    },
    413: {"description": "Body larger than CTCVR_MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "Body is not JSON"},
    422: {
        "model": ValidationErrorResponse,
        "description": "Invalid values: each `loc` names the row and the feature",
    },
    503: {
        "model": ErrorResponse,
        "description": "No model loaded, overloaded, or timed out; retry later",
    },
}


def _body(schema: str) -> dict[str, Any]:
    """The request body documented with the loaded model's request schema (see serving.main):
    the body is parsed by the scorer, not by FastAPI."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score impressions",
    openapi_extra=_body("ScoreRequest"),
    responses=_RESPONSES,
)
async def score(body: RawJsonBody, scoring: ScoringDep) -> Response:
    """Scores a batch of impressions, one object of raw feature values per impression (see the
    request schema).

    Concurrent requests are scored together in one model call (micro-batching); each gets its
    own rows' scores, in order, and the version of the model that computed them.
    """
    result = await _scores(body, RequestForm.ROWS, scoring)
    # Serialised here rather than through ScoreResponse objects, which cost more than the model
    # for large requests; the shape is ScoreResponse's (the OpenAPI spec and tests hold it to it).
    scores = [{"pctr": a, "pcvr": b, "pctcvr": c} for a, b, c in result.scores.tolist()]
    return Response(
        orjson.dumps({"model_version": result.version, "scores": scores}),
        media_type="application/json",
    )


@router.post(
    "/score/columns",
    response_model=ScoreColumnsResponse,
    summary="Score impressions given column by column",
    openapi_extra=_body("ScoreColumnsRequest"),
    responses=_RESPONSES,
)
async def score_columns(body: RawJsonBody, scoring: ScoringDep) -> Response:
    """Scores a batch of impressions given as one list of raw values per feature, one entry per
    impression (as feature stores and batch jobs hold them); answers one list per score.

    The same model, rules and micro-batching as `POST /v1/score`, and the same scores; errors
    name the feature and the row (`["body", "columns", "price", 3]`).
    """
    result = await _scores(body, RequestForm.COLUMNS, scoring)
    pctr, pcvr, pctcvr = result.scores.T.tolist()
    payload = {"model_version": result.version, "pctr": pctr, "pcvr": pcvr, "pctcvr": pctcvr}
    return Response(orjson.dumps(payload), media_type="application/json")


async def _scores(body: bytes, form: RequestForm, scoring: Scoring) -> BatchResult:
    # The route is async although torch blocks: it never runs the model. The request is parsed
    # and mapped here (small bodies on the loop, large ones in the thread pool); the micro-
    # batcher's worker thread runs the model, and the route awaits its slice holding no thread.
    scorer, batcher = scoring.scorer, scoring.batcher
    try:
        with batcher.expecting():  # batches forming now wait for this request
            if len(body) <= _INLINE_PARSE_BYTES:
                features = scorer.prepare(body, form)
            else:
                features = await run_in_threadpool(scorer.prepare, body, form)
            ticket = batcher.submit(scorer, features)
        result = await batcher.wait(ticket, timeout=scoring.settings.request_timeout_s)
    except RequestInvalid as err:
        raise HTTPException(422, detail=err.errors) from None
    except (Overloaded, ScoringTimeout) as err:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(err), headers={"Retry-After": "1"}
        ) from None
    bad = np.flatnonzero(~np.isfinite(result.scores).all(axis=1))
    if bad.size:  # only extreme dense values can get here; say which rows
        raise HTTPException(
            422,
            detail=[
                {
                    "loc": ["body", "rows", i] if form is RequestForm.ROWS else ["body", "columns"],
                    "msg": f"the model gives no finite score for row {i}; check its dense values",
                    "type": "value_out_of_range",
                }
                for i in bad[:50].tolist()
            ],
        )
    return result
