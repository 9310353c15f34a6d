"""``POST /v1/score``: raw impressions in, pCTR / pCVR / pCTCVR out, one per row, in order."""

from __future__ import annotations

import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool

from schemas.api import ErrorResponse, ScoreResponse, ValidationErrorResponse
from serving.batching import Overloaded, ScoringTimeout
from serving.deps import BatcherDep, RawJsonBody, ScorerDep, SettingsDep
from serving.scorer import RequestInvalid

__all__ = ["router"]

router = APIRouter(tags=["score"])

_INLINE_PARSE_BYTES = 16 * 1024  # about 40 rows: parsing takes well under a millisecond

# The body is parsed by the loaded model's request schema (one pass, in the request thread); the
# OpenAPI document gets that schema under this name (see serving.main).
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
    }
}


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score impressions",
    openapi_extra=_BODY,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid bearer token (CTCVR_API_TOKEN)"},
        413: {"description": "Body larger than CTCVR_MAX_BODY_BYTES"},
        415: {"model": ErrorResponse, "description": "Body is not JSON"},
        422: {"model": ValidationErrorResponse, "description": "Invalid rows: each `loc` names the row and the feature"},
        503: {"model": ErrorResponse, "description": "No model loaded, overloaded, or timed out; retry later"},
    },
)
async def score(body: RawJsonBody, scorer: ScorerDep, batcher: BatcherDep, settings: SettingsDep) -> Response:
    """Scores a batch of impressions given as raw feature values (see the request schema).

    Concurrent requests are scored together in one model call (micro-batching); each gets its
    own rows' scores, in order, and the version of the model that computed them.
    """
    # The route is async although torch blocks: it never runs the model. The micro-batcher's
    # worker thread maps features and runs the model; the route only validates (small bodies on
    # the loop, large ones in the thread pool) and awaits its slice, holding no thread meanwhile.
    try:
        with batcher.expecting():  # batches forming now wait for this request
            if len(body) <= _INLINE_PARSE_BYTES:
                rows = scorer.parse(body)
            else:
                rows = await run_in_threadpool(scorer.parse, body)
            ticket = batcher.submit(scorer, rows)
        result = await batcher.wait(ticket, timeout=settings.request_timeout_s)
    except RequestInvalid as err:
        raise HTTPException(422, detail=err.errors) from None
    except (Overloaded, ScoringTimeout) as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err), headers={"Retry-After": "1"}) from None
    bad = np.flatnonzero(~np.isfinite(result.scores).all(axis=1))
    if bad.size:  # only extreme dense values can get here; say which rows
        raise HTTPException(
            422,
            detail=[
                {"loc": ["body", "rows", int(i)], "msg": "the model gives no finite score for this row; "
                 "check its dense values", "type": "value_out_of_range"}
                for i in bad[:50]
            ],
        )
    # Serialised here rather than through ScoreResponse objects, which cost more than the model
    # for large requests; the shape is ScoreResponse's (the OpenAPI spec and tests hold it to it).
    scores = [{"pctr": a, "pcvr": b, "pctcvr": c} for a, b, c in result.scores.tolist()]
    return Response(orjson.dumps({"model_version": result.version, "scores": scores}), media_type="application/json")
