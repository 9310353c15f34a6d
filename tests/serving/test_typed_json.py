"""The typed decoding of row objects (msgspec): which bodies it takes, which it leaves to the
untyped path, and that the service's answers are those of the paths it stands before. (The
property tests of ``test_columns.py`` and ``test_rank.py`` hold its values to the request
models' on generated bodies.)"""

from __future__ import annotations

import copy

import numpy as np
import orjson
import pytest

from schemas.features import FeatureSchema
from serving.artifact import load_artifact
from serving.columns import Unreadable
from serving.scorer import RequestForm, RequestInvalid, Scorer
from serving.typed_json import ObjectBodies
from tests.serving.artifacts import EDGE_SCHEMA, EDGE_SCOPES, as_columns, edge_schema

MAX_ROWS = 64
CONTEXT = [name for name, scope in EDGE_SCOPES.items() if scope == "context"]


@pytest.fixture(scope="module")
def scorer(scoped_edge_model) -> Scorer:
    return Scorer(load_artifact(scoped_edge_model.model), max_rows=MAX_ROWS)


def _ranking(rows: list[dict]) -> dict:
    context = {k: v for k, v in rows[0].items() if k in CONTEXT}
    return {"context": context, "candidates": [_without(row, CONTEXT) for row in rows]}


def _without(row: dict, names) -> dict:
    return {k: v for k, v in row.items() if k not in names}


def test_valid_bodies_of_objects_take_the_typed_path_and_score_as_columns_do(
    scorer, scoped_edge_model, monkeypatch
):
    rows = scoped_edge_model.rows[:MAX_ROWS]  # nulls, absent keys, OOV ids, lists, strings
    body = _ranking(rows)
    # expected: the same impressions as columns, which the typed decoder never reads
    by_columns = orjson.dumps({"columns": as_columns(rows)})
    expected_rows = scorer.predict(scorer.prepare(by_columns, RequestForm.COLUMNS))
    rank_columns = orjson.dumps({**body, "candidates": as_columns(body["candidates"])})
    expected_rank = scorer.predict(scorer.prepare_rank(rank_columns).features)

    def refuse(*args, **kwargs):
        raise AssertionError("an untyped path was taken")

    monkeypatch.setattr(scorer.reader, "rows_request", refuse)
    monkeypatch.setattr(scorer.rank_reader, "read", refuse)
    for model in (scorer.request_model, scorer.rank_model):
        monkeypatch.setattr(model, "model_validate_json", refuse)
    rows_features = scorer.prepare(orjson.dumps({"rows": rows}))
    np.testing.assert_allclose(scorer.predict(rows_features), expected_rows, atol=1e-6, rtol=0)
    ranked = scorer.prepare_rank(orjson.dumps({**body, "top_k": 3, "order_by": "pcvr"}))
    assert (ranked.top_k, ranked.order_by.value) == (3, "pcvr")
    np.testing.assert_allclose(scorer.predict(ranked.features), expected_rank, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "change, why",
    [
        ({"tag": True}, "a boolean is not an id"),
        ({"tag": 2.0}, "an id written 2.0: the request model converts it"),
        ({"price": "1.5"}, "a number as a string"),
        ({"words": "a"}, "a string where a list belongs"),
        ({"unknown": 1}, "a feature the schema does not have"),
        ({"strict_cat": None}, "null for a required feature"),
    ],
)
def test_the_decoder_leaves_unusual_rows_to_the_untyped_path(
    scorer, scoped_edge_model, change, why
):
    row = {**scoped_edge_model.rows[0], **change}
    with pytest.raises(Unreadable):
        scorer.objects.rows(orjson.dumps({"rows": [row]}))
    # and the service answers as the paths after it do: converts, or names the value
    converted = change == {"tag": 2.0}
    if converted:
        expected = scorer.prepare(orjson.dumps({"rows": [{**row, "tag": 2}]}))
        np.testing.assert_array_equal(
            scorer.predict(scorer.prepare(orjson.dumps({"rows": [row]}))),
            scorer.predict(expected),
        )
    else:
        with pytest.raises(RequestInvalid) as err:
            scorer.parse(orjson.dumps({"rows": [row]}))
        assert err.value.errors[0]["loc"][:3] == ["body", "rows", 0], why


def test_a_row_without_a_required_feature_is_named_by_the_request_model(scorer, scoped_edge_model):
    row = _without(scoped_edge_model.rows[0], ["strict_cat"])
    with pytest.raises(Unreadable):
        scorer.objects.rows(orjson.dumps({"rows": [row]}))
    with pytest.raises(RequestInvalid) as err:
        scorer.parse(orjson.dumps({"rows": [row]}))
    assert err.value.errors[0]["loc"] == ["body", "rows", 0, "strict_cat"]


def test_misplaced_features_are_named_by_candidate(scorer, scoped_edge_model):
    body = _ranking(scoped_edge_model.rows[:3])
    body["candidates"][2]["user"] = 5  # a context feature given by a candidate
    raw = orjson.dumps(body)
    with pytest.raises(Unreadable):  # the decoder's candidates have no such field
        scorer.rank_reader.read_objects(scorer.objects.rank(raw))
    with pytest.raises(RequestInvalid) as err:
        scorer.parse_rank(raw)
    assert err.value.errors[0]["loc"] == ["body", "candidates", 2, "user"]
    assert err.value.errors[0]["type"] == "feature_scope"


def test_a_feature_given_in_both_places_is_left_to_the_untyped_path(scorer, scoped_edge_model):
    body = _ranking(scoped_edge_model.rows[:3])
    body["context"]["raw"] = 1.5  # 'any' scope: in the context ...
    for candidate in body["candidates"]:
        candidate["raw"] = 2.5  # ... and for the candidates
    raw = orjson.dumps(body)
    with pytest.raises(Unreadable):
        scorer.rank_reader.read_objects(scorer.objects.rank(raw))
    with pytest.raises(RequestInvalid) as err:
        scorer.parse_rank(raw)
    assert err.value.errors[0]["type"] == "feature_twice"


def test_candidates_as_columns_are_not_the_decoders(scorer, scoped_edge_model):
    rows = scoped_edge_model.rows[:4]
    body = _ranking(rows)
    by_columns = {**body, "candidates": as_columns(body["candidates"])}
    with pytest.raises(Unreadable):
        scorer.objects.rank(orjson.dumps(by_columns))
    np.testing.assert_allclose(
        scorer.predict(scorer.prepare_rank(orjson.dumps(by_columns)).features),
        scorer.predict(scorer.prepare_rank(orjson.dumps(body)).features),
        atol=1e-6,
        rtol=0,
    )


def test_a_feature_null_or_absent_in_every_row_is_left_out():
    bodies = ObjectBodies(edge_schema())
    rows = bodies.rows(b'{"rows": [{"strict_cat": 1, "tag": null}, {"strict_cat": 2, "price": 3}]}')
    assert rows.rows == 2
    assert rows.columns == {"strict_cat": (1, 2), "price": (None, 3.0)}  # ints as floats
    ranking = bodies.rank(b'{"context": {"user": null}, "candidates": [{"tag": 4}, {}]}')
    assert ranking.context == {"user": None}  # the context keeps what it was given
    assert ranking.candidates.columns == {"tag": (4, None)}
    assert (ranking.top_k, ranking.order_by) == (None, None)


def test_features_named_as_python_keywords_decode():
    data = copy.deepcopy(EDGE_SCHEMA)
    data["dense"][0]["name"] = "class"
    bodies = ObjectBodies(FeatureSchema.from_dict(data))
    rows = bodies.rows(b'{"rows": [{"strict_cat": 1, "class": 0.5}]}')
    assert rows.columns["class"] == (0.5,)


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'{"rows": []}', b'{"rows": [1]}', b'{"rows": [{}], "x": 1}', b'{"rows": {}}'],
)
def test_what_is_not_a_body_of_rows_is_unreadable(body):
    with pytest.raises(Unreadable):
        ObjectBodies(edge_schema()).rows(body)
