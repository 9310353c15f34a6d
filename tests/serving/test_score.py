"""POST /v1/score: results, order, and every validation rule (422 naming row and field, never 500)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.api import ScoreResponse

JSON = {"content-type": "application/json"}


def scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([[s["pctr"], s["pcvr"], s["pctcvr"]] for s in response.json()["scores"]])


def errors(response) -> list[tuple[tuple, str]]:
    assert response.status_code == 422, response.text
    return [(tuple(e["loc"]), e["msg"]) for e in response.json()["detail"]]


def test_scores_match_the_trainer_in_order(client, edge_model):
    response = client.post("/v1/score", json={"rows": edge_model.rows[:100]})
    assert response.headers["content-type"] == "application/json"
    assert ScoreResponse.model_validate_json(response.content).model_version == edge_model.version
    got = scores(response)
    np.testing.assert_allclose(got, edge_model.expected[:100], atol=1e-5)
    assert np.allclose(got[:, 2], got[:, 0] * got[:, 1], atol=1e-7)


def test_a_ddpo_model_scores_like_the_trainer(make_client, ddpo_edge_model):
    # The service recomputes DDPO's causal transfer modules (ddpo.txt Eq. 12-14) for pCVR.
    client = make_client(model_dir=ddpo_edge_model.model)
    got = scores(client.post("/v1/score", json={"rows": ddpo_edge_model.rows[:200]}))
    np.testing.assert_allclose(got, ddpo_edge_model.expected[:200], atol=1e-5)
    assert np.allclose(got[:, 2], got[:, 0] * got[:, 1], atol=1e-7)


def test_a_row_scores_the_same_alone_and_in_any_batch(client, edge_model):
    batch = scores(client.post("/v1/score", json={"rows": edge_model.rows[:7]}))
    reversed_ = scores(client.post("/v1/score", json={"rows": edge_model.rows[:7][::-1]}))
    alone = np.concatenate(
        [scores(client.post("/v1/score", json={"rows": [row]})) for row in edge_model.rows[:7]]
    )
    np.testing.assert_allclose(batch, alone, atol=1e-6)
    np.testing.assert_allclose(batch, reversed_[::-1], atol=1e-6)


def test_a_missing_feature_follows_the_schema_policy(client):
    base = {
        "strict_cat": 1,
        "user": 5,
        "city": "x",
        "level": 2,
        "recent_tags": [1, 2],
        "tag": 3,
        "words": ["a"],
        "price": 3.0,
        "activity": 1.0,
        "raw": 0.5,
    }

    def score_of(**changes):
        row = {k: v for k, v in {**base, **changes}.items() if v is not ...}
        return scores(client.post("/v1/score", json={"rows": [row]}))[0]

    # absent == null; a missing single value reads the OOV row, like an out-of-vocabulary id
    np.testing.assert_allclose(score_of(level=...), score_of(level=None), atol=1e-7)
    np.testing.assert_allclose(score_of(level=...), score_of(level=99), atol=1e-7)
    np.testing.assert_allclose(score_of(level=...), score_of(level=-1), atol=1e-7)
    # a missing list is an empty bag; a missing dense value takes the feature's default
    np.testing.assert_allclose(score_of(recent_tags=...), score_of(recent_tags=[]), atol=1e-7)
    np.testing.assert_allclose(score_of(price=...), score_of(price=1.5), atol=1e-7)
    np.testing.assert_allclose(score_of(activity=None), score_of(activity=-2.0), atol=1e-7)
    # lists are cut to max_len (3 for recent_tags, 2 for words)
    np.testing.assert_allclose(
        score_of(recent_tags=[1, 2, 3, 4, 5]), score_of(recent_tags=[1, 2, 3]), atol=1e-7
    )
    np.testing.assert_allclose(
        score_of(words=["a", "b", "c"]), score_of(words=["a", "b"]), atol=1e-7
    )
    # ids may be written as integral numbers (JSON Schema's "integer" admits 1.0)
    np.testing.assert_allclose(
        score_of(user=-7.0, level=2.0, recent_tags=[1.0]),
        score_of(user=-7, level=2, recent_tags=[1]),
        atol=1e-7,
    )
    # and the values matter
    assert not np.allclose(score_of(level=1), score_of(level=2))


@pytest.mark.parametrize(
    ("rows", "loc", "message"),
    [
        ([{"nope": 1}], ("body", "rows", 0, "nope"), "Extra inputs are not permitted"),
        ([{}, {"user": "5"}], ("body", "rows", 1, "user"), "Input should be an integer"),
        ([{"user": 1.5}], ("body", "rows", 0, "user"), "Input should be an integer"),
        ([{"user": True}], ("body", "rows", 0, "user"), "Input should be an integer"),
        ([{"user": 2**63}], ("body", "rows", 0, "user"), "Input should be less than"),
        (
            [{"user": -(2**63) - 1}],
            ("body", "rows", 0, "user"),
            "Input should be greater than or equal to",
        ),
        ([{"user": 1e300}], ("body", "rows", 0, "user"), "Input should be less than"),
        ([{"user": 2.5e-42}], ("body", "rows", 0, "user"), "Input should be an integer"),
        ([{"city": 7}], ("body", "rows", 0, "city"), "valid string"),
        ([{"city": "x" * 1025}], ("body", "rows", 0, "city"), "at most 1024 characters"),
        ([{"recent_tags": 3}], ("body", "rows", 0, "recent_tags"), "valid array"),
        (
            [{"recent_tags": [1, "a"]}],
            ("body", "rows", 0, "recent_tags", 1),
            "Input should be an integer",
        ),
        (
            [{"recent_tags": list(range(1_001))}],
            ("body", "rows", 0, "recent_tags"),
            "at most 1000 items",
        ),
        ([{"words": ["a", 1]}], ("body", "rows", 0, "words", 1), "valid string"),
        ([{"price": "1.5"}], ("body", "rows", 0, "price"), "valid number"),
        ([{"price": False}], ("body", "rows", 0, "price"), "valid number"),
        ([{"price": [1.0]}], ("body", "rows", 0, "price"), "valid number"),
        ([], ("body", "rows"), "at least 1 item"),
        ([{"user": 1}] * 1025, ("body", "rows"), "at most 1024 items"),
    ],
)
def test_invalid_values_are_refused_naming_row_and_field(client, rows, loc, message):
    found = errors(client.post("/v1/score", json={"rows": rows}))
    assert any(where == loc and message in m for where, m in found), found


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(client, literal):
    body = (
        f'{{"rows": [{{"strict_cat": 0, "price": 1.0}}, {{"strict_cat": 0, "price": {literal}}}]}}'
    )
    assert errors(client.post("/v1/score", content=body, headers=JSON)) == [
        (("body", "rows", 1, "price"), "Input should be a finite number")
    ]


def test_the_configured_row_limit_applies(make_client):
    client = make_client(max_rows=5)
    assert client.post("/v1/score", json={"rows": [{"strict_cat": 0}] * 5}).status_code == 200
    assert errors(client.post("/v1/score", json={"rows": [{"strict_cat": 0}] * 6})) == [
        (("body", "rows"), "List should have at most 5 items after validation, not 6")
    ]


def test_oov_error_policy_makes_the_feature_required_within_its_vocabulary(client):
    found = errors(
        client.post(
            "/v1/score",
            json={"rows": [{"strict_cat": 1}, {"strict_cat": 9}, {}, {"strict_cat": None}]},
        )
    )
    assert found == [
        (("body", "rows", 1, "strict_cat"), "Input should be less than or equal to 3"),
        (("body", "rows", 2, "strict_cat"), "Field required"),
        (("body", "rows", 3, "strict_cat"), "Input should be an integer"),
    ]


def test_the_featurizer_enforces_the_oov_error_policy_too(edge_model):
    # The request checks already refuse these; the featurizer (shared with in-process callers)
    # names row, feature and value on its own as well, for single values and list elements.
    from serving.artifact import load_artifact
    from serving.columns import Column, Columns
    from serving.features import RowErrors

    featurizer = load_artifact(edge_model.model).featurizer
    columns = Columns(
        3, {"strict_cat": Column(np.array([1, 9, 0]), present=np.array([True, True, False]))}
    )
    with pytest.raises(RowErrors) as err:
        featurizer(columns)
    found = [(e.loc("rows"), e.msg) for e in err.value.errors]
    assert [loc for loc, _ in found] == [("rows", 1, "strict_cat"), ("rows", 2, "strict_cat")]
    assert "value 9 is out of vocabulary" in found[0][1] and "oov policy is 'error'" in found[0][1]
    assert "missing value" in found[1][1]
    assert err.value.errors[0].loc("columns") == ("columns", "strict_cat", 1)


def test_dense_values_whose_normalisation_overflows_float32_are_refused(client, edge_model):
    rows = [
        {"strict_cat": 0, "raw": 1e39},
        {"strict_cat": 0, "activity": -1e39},
        {"strict_cat": 0, "price": 1e308},
    ]
    found = errors(client.post("/v1/score", json={"rows": rows}))
    assert [loc for loc, _ in found] == [
        ("body", "rows", 0, "raw"),
        ("body", "rows", 1, "activity"),
    ]
    assert all(msg.startswith("Input should be") for _, msg in found)  # log1p of 1e308 fits
    # the featurizer checks it too, for in-process callers
    from serving.artifact import load_artifact
    from serving.columns import Column, Columns
    from serving.features import RowErrors

    def dense(k: int, value: float) -> Column:
        return Column(np.where(np.arange(3) == k, value, 0.0), present=np.arange(3) == k)

    columns = Columns(
        3,
        {
            "strict_cat": Column(np.zeros(3, dtype=np.int64)),
            "raw": dense(0, 1e39),
            "activity": dense(1, -1e39),
            "price": dense(2, 1e308),
        },
    )
    with pytest.raises(
        RowErrors,
        match="value 1e\\+39 is out of range: its none normalisation does not fit a float32",
    ) as err:
        load_artifact(edge_model.model).featurizer(columns)
    assert [e.loc("rows") for e in err.value.errors] == [
        ("rows", 0, "raw"),
        ("rows", 1, "activity"),
    ]


def test_other_requests_of_a_batch_are_unaffected_by_a_bad_one(client, edge_model):
    # The micro-batcher maps several requests at once; only the bad one fails.
    from concurrent.futures import ThreadPoolExecutor

    good = {"rows": edge_model.rows[:3]}
    bad = {"rows": [{"strict_cat": 99}]}
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda k: client.post("/v1/score", json=bad if k % 2 else good), range(16))
        )
    for k, response in enumerate(results):
        if k % 2:
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
                "body",
                "rows",
                0,
                "strict_cat",
            ]
        else:
            np.testing.assert_allclose(scores(response), edge_model.expected[:3], atol=1e-5)


def test_errors_are_capped(client):
    found = errors(client.post("/v1/score", json={"rows": [{"user": "x", "city": 1}] * 100}))
    assert len(found) == 51 and found[-1] == (("body",), "250 more error(s) not listed")


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 422),
        (b"", "application/json", 422),
        (b'{"rows": [{}]', "application/json", 422),
        (b"[1, 2]", "application/json", 422),
        (b'{"rows": [{}], "extra": 1}', "application/json", 422),
        (b'"\\ud800"', "application/json", 422),
        (b'{"rows": [{}]}', "text/plain", 415),
        (b"rows=1", "application/x-www-form-urlencoded", 415),
        (b'{"rows": [{"strict_cat": 0}]}', "application/json; charset=utf-8", 200),
        (b'{"rows": [{"strict_cat": 0}]}', "application/vnd.api+json", 200),
        ("[" * 100_000 + "]" * 100_000, "application/json", 422),
    ],
)
def test_malformed_bodies(client, body, content_type, status):
    response = client.post("/v1/score", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text


def test_bodies_over_the_size_limit_are_refused(make_client):
    client = make_client(max_body_bytes=2048)
    small = json.dumps({"rows": [{"strict_cat": 1}] * 10})
    large = json.dumps({"rows": [{"strict_cat": 1}] * 400})
    assert client.post("/v1/score", content=small, headers=JSON).status_code == 200
    response = client.post("/v1/score", content=large, headers=JSON)
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(40):
            yield b" " * 100

    assert client.post("/v1/score", content=chunks(), headers=JSON).status_code == 413


def test_strings_that_are_not_utf8_are_refused(edge_model):
    # JSON cannot carry a lone surrogate past the parser, but the featurizer guards it anyway.
    from serving.artifact import load_artifact
    from serving.columns import ColumnReader
    from serving.features import RowErrors
    from tests.serving.artifacts import edge_schema

    reader = ColumnReader(edge_schema(), max_rows=10)
    rows = [
        {"strict_cat": 0},
        {"strict_cat": 0, "city": "\ud800"},
        {"strict_cat": 0, "words": ["ok", "\udfff"]},
    ]
    featurizer = load_artifact(edge_model.model).featurizer
    with pytest.raises(RowErrors) as err:
        featurizer(reader.rows_request({"rows": rows}))
    assert [e.loc("rows") for e in err.value.errors] == [
        ("rows", 1, "city"),
        ("rows", 2, "words", 1),
    ]


def test_unknown_routes_and_methods(client):
    assert client.get("/v1/score").status_code == 405
    assert client.get("/nope").status_code == 404
