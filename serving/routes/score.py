"""``POST /v1/score`` and ``POST /v1/score/columns``: raw impressions in, pCTR / pCVR / pCTCVR out,
one per row, in order; the same model and rules, rows or columns."""

from __future__ import annotations

import orjson
from fastapi import Response

from schemas.api import ScoreColumnsResponse, ScoreResponse
from serving.batching import BatchResult
from serving.deps import Scoring, ScoringDep
from serving.model import Features
from serving.routes._scoring import operation_extra, refuse_non_finite, score, scoring_router
from serving.scorer import RequestForm, Scorer

__all__ = ["router"]

router = scoring_router("score")


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score impressions",
    openapi_extra=operation_extra("ScoreRequest"),
)
async def score_rows(scoring: ScoringDep) -> Response:
    """Scores a batch of impressions, one object of raw feature values per impression (see the
    request schema).

    Concurrent requests are scored together in one model call (micro-batching); each gets its
    own rows' scores, in order, and the version of the model that computed them.
    """
    result = await _scores(scoring, RequestForm.ROWS)
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
    openapi_extra=operation_extra("ScoreColumnsRequest"),
)
async def score_columns(scoring: ScoringDep) -> Response:
    """Scores a batch of impressions given as one list of raw values per feature, one entry per
    impression (as feature stores and batch jobs hold them); answers one list per score.

    The same model, rules and micro-batching as `POST /v1/score`, and the same scores; errors
    name the feature and the row (`["body", "columns", "price", 3]`).
    """
    result = await _scores(scoring, RequestForm.COLUMNS)
    pctr, pcvr, pctcvr = result.scores.T.tolist()
    payload = {"model_version": result.version, "pctr": pctr, "pcvr": pcvr, "pctcvr": pctcvr}
    return Response(orjson.dumps(payload), media_type="application/json")


async def _scores(scoring: Scoring, form: RequestForm) -> BatchResult:
    def prepare(scorer: Scorer, body: bytes) -> Features:
        return scorer.prepare(body, form)

    _, result = await score(scoring, prepare, lambda features: features)
    refuse_non_finite(
        result.scores, lambda i: ["rows", i] if form is RequestForm.ROWS else ["columns"]
    )
    return result
