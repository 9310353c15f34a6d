"""``POST /v1/rank``: one context and many candidates in, every candidate's pCTR / pCVR / pCTCVR
out in request order, and optionally the indices of the ``top_k`` best."""

from __future__ import annotations

import orjson
from fastapi import Response

from schemas.api import RankResponse
from serving.deps import ScoringDep
from serving.model import Features, RankFeatures
from serving.ranking import RankInputs, top_indices
from serving.routes._scoring import operation_extra, refuse_non_finite, score, scoring_router
from serving.scorer import Scorer

__all__ = ["router"]

router = scoring_router("rank")


@router.post(
    "/rank",
    response_model=RankResponse,
    response_model_exclude_none=True,
    summary="Score and rank the candidates of one context",
    openapi_extra=operation_extra("RankRequest"),
)
async def rank(scoring: ScoringDep) -> Response:
    """Scores every candidate of a ranking call: the features of the user and the request are
    given once (`context`), those of each item per candidate (`candidates`: one object per
    candidate, or one list per feature), as each feature's `scope` in the model's schema says
    (`GET /v1/model`). Answers every candidate's scores in request order, the same as
    `POST /v1/score` gives for rows repeating the context in every candidate, and with `top_k`
    the indices of the best candidates by `order_by` (default `pctcvr`), best first; equal
    scores keep request order.

    Errors name `["body", "context", <feature>]`, `["body", "candidates", <candidate>, <feature>]`
    or, for columns, `["body", "candidates", <feature>, <candidate>]`.
    """
    prepared, result = await score(scoring, Scorer.prepare_rank, _features)
    refuse_non_finite(result.scores, lambda i: ["candidates", i])
    pctr, pcvr, pctcvr = result.scores.T.tolist()
    payload = {"model_version": result.version, "pctr": pctr, "pcvr": pcvr, "pctcvr": pctcvr}
    if prepared.top_k is not None:
        payload["top"] = top_indices(result.scores, prepared.top_k, prepared.order_by)
    return Response(orjson.dumps(payload), media_type="application/json")


def _features(prepared: RankInputs) -> Features | RankFeatures:
    return prepared.features
