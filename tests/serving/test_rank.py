"""POST /v1/rank: the same scores as /v1/score, top_k, where each feature may be given (its
scope), and every error naming ``context.<field>`` or ``candidates[<i>].<field>``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.api import RankResponse
from serving.artifact import load_artifact
from serving.columns import Unreadable, may_hold_booleans
from serving.model import Features, RankFeatures
from serving.ranking import Misplaced, top_indices
from serving.scorer import RequestInvalid, Scorer
from tests.serving.artifacts import EDGE_SCOPES, as_columns
from tests.serving.test_columns import KIND, anything, entries
from tests.serving.test_score import errors

JSON = {"content-type": "application/json"}
CONTEXT = [name for name, scope in EDGE_SCOPES.items() if scope == "context"]


def ranking(rows: list[dict], context_names, form: str = "objects") -> tuple[dict, list[dict]]:
    """A ranking body whose context holds ``context_names`` as the first row gives them, its
    candidates the rest of each row; and the rows ``/v1/score`` would score the same."""
    context = {k: v for k, v in rows[0].items() if k in context_names}
    candidates = [{k: v for k, v in row.items() if k not in context_names} for row in rows]
    same = [{**candidate, **context} for candidate in candidates]
    body = candidates if form == "objects" else as_columns(candidates)
    return {"context": context, "candidates": body}, same


def rank_scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array([body["pctr"], body["pcvr"], body["pctcvr"]]).T


def row_scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([[s["pctr"], s["pcvr"], s["pctcvr"]] for s in response.json()["scores"]])


@pytest.fixture
def scoped(make_client, scoped_edge_model):
    return make_client(model_dir=scoped_edge_model.model)


# Parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["objects", "columns"])
def test_rank_scores_as_score_does_the_rows_it_stands_for(scoped, scoped_edge_model, form):
    rows = scoped_edge_model.rows  # nulls, absent keys, OOV ids, long lists, strings
    for start in range(0, len(rows), 40):
        chunk = rows[start : start + 40]
        body, same = ranking(chunk, CONTEXT, form)
        response = scoped.post("/v1/rank", json=body)
        assert RankResponse.model_validate_json(response.content).top is None
        assert response.json()["model_version"] == scoped_edge_model.version
        expected = row_scores(scoped.post("/v1/score", json={"rows": same}))
        np.testing.assert_allclose(rank_scores(response), expected, atol=1e-6, rtol=0)
    assert np.ptp(expected[:, 2]) > 1e-4  # the candidates do not all score alike


@pytest.mark.parametrize(
    "context",
    [
        [],  # every feature per candidate: the trainer's own rows
        ["user", "city"],  # a hashed id and a string
        ["recent_tags", "words"],  # both lists
        ["level", "strict_cat", "price", "activity", "raw"],  # vocabulary ids and dense values
        sorted(KIND),  # everything in the context: every candidate the same
    ],
)
def test_any_feature_may_be_given_once_for_all_when_scopes_allow(client, edge_model, context):
    rows = edge_model.rows[:50]  # EDGE_SCHEMA declares no scope: every feature is 'any'
    body, same = ranking(rows, context)
    got = rank_scores(client.post("/v1/rank", json=body))
    np.testing.assert_allclose(
        got, row_scores(client.post("/v1/score", json={"rows": same})), atol=1e-6, rtol=0
    )
    if not context:
        np.testing.assert_allclose(got, edge_model.expected[:50], atol=1e-5, rtol=0)
    if len(context) == len(KIND):
        assert np.ptp(got, axis=0).max() == 0
    else:  # and given as columns
        columns = {**body, "candidates": as_columns(body["candidates"])}
        np.testing.assert_array_equal(rank_scores(client.post("/v1/rank", json=columns)), got)


def test_a_ddpo_model_ranks_as_it_scores(make_client, ddpo_edge_model):
    client = make_client(model_dir=ddpo_edge_model.model)
    body, same = ranking(ddpo_edge_model.rows[:60], ["user", "recent_tags", "activity"])
    np.testing.assert_allclose(
        rank_scores(client.post("/v1/rank", json=body)),
        row_scores(client.post("/v1/score", json={"rows": same})),
        atol=1e-6,
        rtol=0,
    )


def test_a_dot_interaction_model_ranks_as_it_scores(make_client, tmp_path):
    from tests.serving.artifacts import make_edge_run, request_rows
    from trainer.export import export_run

    run = make_edge_run(tmp_path, dim=4, overrides=["model.interaction=dot"], scoped=True)
    export_run(run, tmp_path / "model", log=None)
    client = make_client(model_dir=tmp_path / "model")
    rows = request_rows(tmp_path / "data" / "test", load_artifact(tmp_path / "model").schema)
    body, same = ranking(rows[:60], CONTEXT)
    np.testing.assert_allclose(
        rank_scores(client.post("/v1/rank", json=body)),
        row_scores(client.post("/v1/score", json={"rows": same})),
        atol=1e-6,
        rtol=0,
    )


def test_the_model_broadcasts_each_request_context_to_its_own_candidates(scoped_edge_model):
    """Several ranking requests in one model call (as the micro-batcher makes it), each with its
    own context, score as the rows they stand for; and so does every split of the first layer."""
    scorer = Scorer(load_artifact(scoped_edge_model.model), max_rows=64)
    rows = scoped_edge_model.rows
    parts, expected = [], []
    for start, size in ((0, 7), (7, 2), (9, 30)):
        body, same = ranking(rows[start : start + size], CONTEXT)
        parts.append(scorer.prepare_rank(orjson.dumps(body)).features)
        expected.append(scorer.predict(scorer.prepare(orjson.dumps({"rows": same}))))
    batch = RankFeatures.concat(parts)
    assert batch.counts.tolist() == [7, 2, 30] and batch.size == 39
    np.testing.assert_allclose(scorer.predict(batch), np.concatenate(expected), atol=1e-6)
    with pytest.raises(ValueError, match="share from_context"):
        RankFeatures.concat([parts[0], RankFeatures(**{**vars(parts[1]), "from_context": ()})])
    with pytest.raises(ValueError, match="not features of this model"):
        scorer.artifact.model.predict_ranking(
            RankFeatures(**{**vars(parts[1]), "from_context": ("nope",)})
        )


@pytest.mark.parametrize("form", ["objects", "columns"])
def test_one_candidate_is_the_row_it_stands_for(scoped, scoped_edge_model, form):
    """A single candidate and its context are one impression: they map to the row /v1/score
    maps (plain inputs, which batch with rows), with the very same scores."""
    scorer = Scorer(load_artifact(scoped_edge_model.model), max_rows=8)
    rows = scoped_edge_model.rows[:60]  # nulls, absent keys, OOV ids, long lists, strings
    for row in rows:
        body, same = ranking([row], CONTEXT, form)
        features = scorer.prepare_rank(orjson.dumps(body)).features
        assert isinstance(features, Features)
        expected = scorer.predict(scorer.prepare(orjson.dumps({"rows": same})))
        np.testing.assert_array_equal(scorer.predict(features), expected)
    body, same = ranking(rows[:1], CONTEXT, form)
    body["top_k"] = 1
    response = scoped.post("/v1/rank", json=body)
    assert response.json()["top"] == [0]
    expected = row_scores(scoped.post("/v1/score", json={"rows": same}))
    np.testing.assert_allclose(rank_scores(response), expected, atol=1e-6, rtol=0)


# top_k ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order_by", [None, "pctcvr", "pctr", "pcvr"])
def test_top_k_answers_the_best_candidates_best_first(scoped, scoped_edge_model, order_by):
    body, _ = ranking(scoped_edge_model.rows[:30], CONTEXT)
    body["top_k"] = 5
    if order_by is not None:
        body["order_by"] = order_by
    response = scoped.post("/v1/rank", json=body)
    scores = rank_scores(response)
    column = ["pctr", "pcvr", "pctcvr"].index(order_by or "pctcvr")
    top = response.json()["top"]
    assert top == sorted(range(30), key=lambda i: -scores[i, column])[:5]  # stable


def test_top_k_keeps_request_order_among_equal_scores_and_caps_at_the_candidates(scoped):
    same, other = {"tag": 3, "price": 2.0}, {"tag": 9, "price": 40.0}
    body = {
        "context": {"user": 1, "strict_cat": 0},
        "candidates": [same, other, same, same, other],
        "top_k": 10,
    }
    response = scoped.post("/v1/rank", json=body)
    scores = rank_scores(response)
    assert scores[0, 2] != scores[1, 2]
    best, worst = ([0, 2, 3], [1, 4]) if scores[0, 2] > scores[1, 2] else ([1, 4], [0, 2, 3])
    assert response.json()["top"] == best + worst  # all five: top_k beyond the candidates


def test_top_indices_by_hand():
    scores = np.array([[0.1, 0.5, 0.05], [0.3, 0.2, 0.06], [0.1, 0.5, 0.05], [0.9, 0.01, 0.009]])
    from schemas.api import RankOrder

    assert top_indices(scores, 2, RankOrder.PCTCVR) == [1, 0]
    assert top_indices(scores, 4, RankOrder.PCVR) == [0, 2, 1, 3]  # a tie: request order
    assert top_indices(scores, 9, RankOrder.PCTR) == [3, 1, 0, 2]


# Where features go, and errors ------------------------------------------------------------------

CANDIDATE = {"tag": 3, "words": ["a"], "price": 2.0}


@pytest.mark.parametrize(
    "body, expected",
    [
        (  # a candidate feature in the context
            {"context": {"strict_cat": 0, "tag": 3}, "candidates": [CANDIDATE]},
            [(("body", "context", "tag"), "'tag' is a candidate feature (scope 'candidate')")],
        ),
        (  # a context feature with the candidates, objects and columns
            {"context": {"strict_cat": 0}, "candidates": [CANDIDATE, {**CANDIDATE, "user": 7}]},
            [(("body", "candidates", 1, "user"), "'user' is a context feature (scope 'context')")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": {"tag": [1, 2], "user": [7, 8]}},
            [(("body", "candidates", "user"), "'user' is a context feature (scope 'context')")],
        ),
        (  # a feature of scope any in both places
            {"context": {"strict_cat": 0, "raw": 1.0}, "candidates": [{"raw": 2.0}]},
            [(("body", "context", "raw"), "'raw' is given in the context and for the candidates")],
        ),
        (  # a required feature (oov: error) given nowhere, or not by every candidate
            {"context": {"user": 1}, "candidates": [CANDIDATE]},
            [(("body", "context", "strict_cat"), "Field required: give it in the context or")],
        ),
        (
            {"candidates": [{"strict_cat": 1}, CANDIDATE, {"strict_cat": 2}, {}]},
            [
                (("body", "candidates", 1, "strict_cat"), "Field required"),
                (("body", "candidates", 3, "strict_cat"), "Field required"),
            ],
        ),
        (  # values the rules refuse, named where they are
            {"context": {"strict_cat": 9}, "candidates": [CANDIDATE]},
            [(("body", "context", "strict_cat"), "Input should be less than or equal to 3")],
        ),
        (
            {"context": {"strict_cat": 0, "user": "7"}, "candidates": [CANDIDATE, {"price": "x"}]},
            [
                (("body", "context", "user"), "Input should be an integer"),
                (("body", "candidates", 1, "price"), "Input should be a valid number"),
            ],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": {"price": [1.0, True], "tag": [1, 2]}},
            [(("body", "candidates", "price", 1), "Input should be a valid number")],
        ),
        (
            {"context": {"strict_cat": 0, "recent_tags": [1, "x"]}, "candidates": [CANDIDATE]},
            [(("body", "context", "recent_tags", 1), "Input should be an integer")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": [{"words": ["a", 5]}]},
            [(("body", "candidates", 0, "words", 1), "Input should be a valid string")],
        ),
        (  # the request's own fields
            {"context": {"strict_cat": 0}, "candidates": [CANDIDATE], "order_by": "pctr"},
            [(("body", "order_by"), "order_by orders the top_k best candidates: give top_k too")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": [CANDIDATE], "top_k": 0},
            [(("body", "top_k"), "Input should be greater than or equal to 1")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": [CANDIDATE], "top_k": 1, "order_by": "x"},
            [(("body", "order_by"), "Input should be 'pctcvr', 'pctr' or 'pcvr'")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": []},
            [(("body", "candidates"), "List should have at least 1 item")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": 3},
            [(("body", "candidates"), "candidates must be a list of objects")],
        ),
        (
            {"context": {"strict_cat": 0}, "candidates": {"tag": [1, 2], "price": [1.0]}},
            [(("body", "candidates"), "Value error, columns differ in length")],
        ),
        (
            {"context": {"strict_cat": 0, "nope": 1}, "candidates": [CANDIDATE]},
            [(("body", "context", "nope"), "Extra inputs are not permitted")],
        ),
        (
            {"candidates": [CANDIDATE], "context": {"strict_cat": 0}, "extra": 1},
            [(("body", "extra"), "Extra inputs are not permitted")],
        ),
    ],
)
def test_what_is_refused_is_named(scoped, body, expected):
    got = errors(scoped.post("/v1/rank", json=body))
    assert [loc for loc, _ in got] == [loc for loc, _ in expected], got
    for (_, msg), (_, start) in zip(got, expected, strict=True):
        assert msg.startswith(start), (msg, start)


def test_non_finite_and_out_of_range_dense_values_are_named(scoped):
    nan = '{"context": {"strict_cat": 0, "activity": NaN}, "candidates": [{"price": 1.0}]}'
    assert errors(scoped.post("/v1/rank", content=nan, headers=JSON)) == [
        (("body", "context", "activity"), "Input should be a finite number")
    ]
    body = {"context": {"strict_cat": 0, "activity": 1e39}, "candidates": {"raw": [1.0, -1e39]}}
    got = errors(scoped.post("/v1/rank", json=body))
    assert [loc for loc, _ in got] == [
        ("body", "context", "activity"),
        ("body", "candidates", "raw", 1),
    ]
    assert all("than or equal to" in msg for _, msg in got)


def test_the_featurizer_names_the_context_or_the_candidate(scoped_edge_model):
    """Values only the featurizer refuses (the reader's rules hold here too, for in-process
    callers and for what the request model converts)."""
    from schemas.api import RankOrder
    from serving.columns import Column, Columns
    from serving.ranking import CandidatesForm, RankValues

    scorer = Scorer(load_artifact(scoped_edge_model.model), max_rows=8)
    values = RankValues(
        context=Columns(1, {"strict_cat": Column(np.array([7]))}),
        candidates=Columns(2, {"raw": Column(np.array([0.0, np.inf]))}),
        form=CandidatesForm.OBJECTS,
        top_k=None,
        order_by=RankOrder.PCTCVR,
    )
    with pytest.raises(RequestInvalid) as err:
        scorer.featurize_rank(values)
    assert [(e["loc"], e["type"]) for e in err.value.errors] == [
        (["body", "context", "strict_cat"], "out_of_vocabulary"),
        (["body", "candidates", 1, "raw"], "finite_number"),
    ]
    columns = dataclasses.replace(values, form=CandidatesForm.COLUMNS)
    with pytest.raises(RequestInvalid) as err:
        scorer.featurize_rank(columns)
    assert err.value.errors[1]["loc"] == ["body", "candidates", "raw", 1]
    # one candidate: mapped as one row with its context, errors still named where given
    one = dataclasses.replace(values, candidates=Columns(1, {"raw": Column(np.array([np.inf]))}))
    for form, where in [(CandidatesForm.OBJECTS, [0, "raw"]), (CandidatesForm.COLUMNS, ["raw", 0])]:
        with pytest.raises(RequestInvalid) as err:
            scorer.featurize_rank(dataclasses.replace(one, form=form))
        assert [(e["loc"], e["type"]) for e in err.value.errors] == [
            (["body", "context", "strict_cat"], "out_of_vocabulary"),
            (["body", "candidates", *where], "finite_number"),
        ]


def test_openapi_documents_the_ranking_request_of_the_served_schema(scoped):
    spec = scoped.get("/openapi.json").json()
    operation = spec["paths"]["/v1/rank"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RankRequest"
    }
    components = spec["components"]["schemas"]
    request = components["RankRequest"]
    assert set(request["properties"]) == {"context", "candidates", "top_k", "order_by"}
    assert "context: user, city, level, recent_tags, activity" in request["description"]
    assert set(components["RankContext"]["properties"]) == {
        name for name, scope in EDGE_SCOPES.items() if scope != "candidate"
    }
    assert set(components["Candidate"]["properties"]) == {
        name for name, scope in EDGE_SCOPES.items() if scope != "context"
    }
    assert {"200", "422"} <= set(operation["responses"])
    features = {f["name"]: f["scope"] for f in scoped.get("/v1/model").json()["features"]}
    assert features == EDGE_SCOPES


# The fast path and the request model ------------------------------------------------------------

MAX_ROWS = 6


@st.composite
def rank_bodies(draw) -> dict:
    """Ranking bodies, half of them valid, in both candidate forms."""
    clean = draw(st.booleans())
    context_names = sorted(name for name, scope in EDGE_SCOPES.items() if scope != "candidate")
    candidate_names = sorted(name for name, scope in EDGE_SCOPES.items() if scope != "context")
    names = context_names + candidate_names if not clean else None
    in_context = draw(st.sets(st.sampled_from(names or context_names)))
    own = draw(st.sets(st.sampled_from(names or candidate_names)))
    if clean:  # 'any' features in one place, the required one in exactly one
        own -= in_context
        if "strict_cat" not in own:
            in_context.add("strict_cat")
    n = draw(st.integers(1, MAX_ROWS) if clean else st.integers(0, MAX_ROWS + 1))
    context = {name: draw(entries(name, clean)) for name in in_context}
    if clean and "strict_cat" in context:
        context["strict_cat"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        candidates: list | dict = [
            {name: draw(entries(name, clean)) for name in own} for _ in range(n)
        ]
    else:
        own = own or {"tag"}
        candidates = {name: [draw(entries(name, clean)) for _ in range(n)] for name in own}
    body: dict = {"context": context, "candidates": candidates}
    if draw(st.booleans()):
        body["top_k"] = draw(st.integers(1, MAX_ROWS) if clean else st.integers(-1, 9))
        if draw(st.booleans()):
            body["order_by"] = draw(st.sampled_from(["pctr", "pcvr", "pctcvr"]))
    if not clean and draw(st.integers(0, 5)) == 0:
        body[draw(st.sampled_from(["context", "candidates", "top_k", "order_by"]))] = draw(anything)
    return body


@pytest.fixture(scope="module")
def scorer(scoped_edge_model) -> Scorer:
    return Scorer(load_artifact(scoped_edge_model.model), max_rows=MAX_ROWS)


def _scores(scorer: Scorer, values) -> np.ndarray:
    # Scores, not inputs: a candidate column of nulls (the reader's) and no column at all (the
    # request model's dump leaves nulls out) place the missing value differently, same scores.
    return scorer.predict(scorer.featurize_rank(values))


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=rank_bodies())
def test_the_fast_path_accepts_exactly_what_the_rank_model_accepts(scorer, body):
    raw = json.dumps(body, allow_nan=True).encode()
    try:
        validated = scorer.rank_model.model_validate_json(raw)
    except ValidationError:
        validated = None
    for booleans in {True, may_hold_booleans(raw)}:  # the type check per value, or numpy's
        _check_fast_path(scorer, raw, validated, lambda b=booleans: _untyped(scorer, raw, b))
    _check_fast_path(  # candidate objects decoded by msgspec, read without a type check
        scorer, raw, validated, lambda: scorer.rank_reader.read_objects(scorer.objects.rank(raw))
    )
    if validated is None:
        with pytest.raises(RequestInvalid):
            scorer.parse_rank(raw)
    else:  # what the model accepts the service either takes or refuses with a named reason
        try:
            scorer.parse_rank(raw)
        except RequestInvalid as err:
            assert all(e["type"] in _PLACEMENT for e in err.errors), err.errors


_PLACEMENT = {"feature_twice", "missing", "missing_top_k"}  # what JSON Schema cannot say


def _untyped(scorer, raw: bytes, booleans: bool):
    return scorer.rank_reader.read(orjson.loads(raw), booleans=booleans)


def _check_fast_path(scorer, raw: bytes, validated, fast_path) -> None:
    """A fast path accepts only what the rank model accepts, with the same scores."""
    try:
        fast = fast_path()
    except (orjson.JSONDecodeError, Unreadable, Misplaced):
        return
    assert validated is not None, raw
    slow = scorer.rank_reader.read(validated.model_dump(mode="json", exclude_none=True))
    assert (fast.top_k, fast.order_by, fast.form) == (slow.top_k, slow.order_by, slow.form)
    try:
        a = _scores(scorer, fast)
    except RequestInvalid:  # out of float32 range after normalisation: both refuse
        with pytest.raises(RequestInvalid):
            _scores(scorer, slow)
        return
    np.testing.assert_allclose(a, _scores(scorer, slow), atol=1e-6, rtol=0)


def test_valid_rank_requests_take_the_fast_path(scorer, scoped_edge_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the request model was called")

    monkeypatch.setattr(scorer.rank_model, "model_validate_json", refuse)
    body, _ = ranking(scoped_edge_model.rows[:MAX_ROWS], CONTEXT)
    body["top_k"] = 2
    a = scorer.prepare_rank(orjson.dumps(body))
    b = scorer.prepare_rank(orjson.dumps({**body, "candidates": as_columns(body["candidates"])}))
    assert a.top_k == b.top_k == 2
    np.testing.assert_array_equal(scorer.predict(a.features), scorer.predict(b.features))
