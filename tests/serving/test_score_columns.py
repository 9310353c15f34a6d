"""POST /v1/score/columns: the same scores as the row form, and every validation rule (422 naming
the feature and the row, never 500)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.api import ScoreColumnsResponse
from tests.serving.artifacts import as_columns
from tests.serving.test_score import errors

JSON = {"content-type": "application/json"}


def scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array([body["pctr"], body["pcvr"], body["pctcvr"]]).T


def row_scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([[s["pctr"], s["pcvr"], s["pctcvr"]] for s in response.json()["scores"]])


def score_columns(client, **columns):
    """``POST /v1/score/columns`` with ``columns`` and the required ``strict_cat`` (0 in every row)."""
    n = next((len(v) for v in columns.values() if isinstance(v, list) and v), 1)
    return client.post("/v1/score/columns", json={"columns": {"strict_cat": [0] * n, **columns}})


def test_columns_score_exactly_as_rows_and_as_the_trainer(client, edge_model):
    rows = edge_model.rows  # nulls, absent keys, OOV ids, negative ids, long lists, null list items
    for start in range(0, len(rows), 100):
        chunk = rows[start : start + 100]
        response = client.post("/v1/score/columns", json={"columns": as_columns(chunk)})
        assert response.headers["content-type"] == "application/json"
        body = ScoreColumnsResponse.model_validate_json(response.content)
        assert body.model_version == edge_model.version and len(body.pctr) == len(chunk)
        got = scores(response)
        np.testing.assert_array_equal(
            got, row_scores(client.post("/v1/score", json={"rows": chunk}))
        )
        np.testing.assert_allclose(got, edge_model.expected[start : start + 100], atol=1e-5)


def test_a_missing_column_follows_the_schema_policy(client, edge_model):
    base = {
        "user": [5, 6],
        "city": ["x", "y"],
        "level": [2, 1],
        "recent_tags": [[1, 2], [3]],
        "tag": [3, 2],
        "words": [["a"], ["b", "c"]],
        "price": [3.0, 1.0],
        "activity": [1.0, 2.0],
        "raw": [0.5, -0.5],
    }

    def score_of(**changes):
        columns = {k: v for k, v in {**base, **changes}.items() if v is not ...}
        return scores(score_columns(client, **columns))

    # an absent column == a column of nulls == each row's missing value (OOV row, [], default)
    for name, missing in [
        ("level", None),
        ("city", None),
        ("recent_tags", None),
        ("words", None),
        ("price", None),
    ]:
        np.testing.assert_array_equal(
            score_of(**{name: ...}), score_of(**{name: [missing, missing]})
        )
    np.testing.assert_array_equal(
        score_of(level=...), score_of(level=[99, -1])
    )  # out of vocabulary: OOV row
    np.testing.assert_array_equal(score_of(recent_tags=...), score_of(recent_tags=[[], []]))
    np.testing.assert_array_equal(score_of(price=...), score_of(price=[1.5, 1.5]))  # the default
    np.testing.assert_array_equal(
        score_of(activity=[None, 2.0])[0], score_of(activity=[-2.0, 2.0])[0]
    )
    # lists are cut to max_len; ids may be written 1.0; nulls inside lists read the OOV row
    np.testing.assert_array_equal(
        score_of(recent_tags=[[1, 2, 3, 4], [3]]), score_of(recent_tags=[[1, 2, 3], [3]])
    )
    np.testing.assert_array_equal(score_of(user=[5.0, 6.0], level=[2.0, 1]), score_of())
    np.testing.assert_array_equal(
        score_of(recent_tags=[[None], [3]]), score_of(recent_tags=[[12], [3]])
    )
    # and the values matter
    assert not np.allclose(score_of(level=[1, 1]), score_of(level=[2, 2]))
    # the same impressions as rows give the same scores
    rows = [
        {name: values[i] for name, values in {**base, "strict_cat": [0, 0]}.items()}
        for i in range(2)
    ]
    np.testing.assert_array_equal(
        score_of(), row_scores(client.post("/v1/score", json={"rows": rows}))
    )


@pytest.mark.parametrize(
    ("columns", "loc", "message"),
    [
        ({"nope": [1]}, ("body", "columns", "nope"), "Extra inputs are not permitted"),
        ({"user": [1, "5"]}, ("body", "columns", "user", 1), "Input should be an integer"),
        ({"user": [1.5]}, ("body", "columns", "user", 0), "Input should be an integer"),
        ({"user": [True]}, ("body", "columns", "user", 0), "Input should be an integer"),
        ({"user": [2**63]}, ("body", "columns", "user", 0), "Input should be less than"),
        (
            {"user": [-(2**63) - 1]},
            ("body", "columns", "user", 0),
            "Input should be greater than or equal to",
        ),
        ({"user": [1e300]}, ("body", "columns", "user", 0), "Input should be less than"),
        ({"user": [2.5e-42]}, ("body", "columns", "user", 0), "Input should be an integer"),
        ({"user": 5}, ("body", "columns", "user"), "valid array"),
        ({"user": None}, ("body", "columns", "user"), "valid array"),
        ({"city": [7]}, ("body", "columns", "city", 0), "valid string"),
        ({"city": ["ok", "x" * 1025]}, ("body", "columns", "city", 1), "at most 1024 characters"),
        ({"recent_tags": [3]}, ("body", "columns", "recent_tags", 0), "valid array"),
        (
            {"recent_tags": [[1, "a"]]},
            ("body", "columns", "recent_tags", 0, 1),
            "Input should be an integer",
        ),
        (
            {"recent_tags": [[1, True]]},
            ("body", "columns", "recent_tags", 0, 1),
            "Input should be an integer",
        ),
        (
            {"recent_tags": [list(range(1_001))]},
            ("body", "columns", "recent_tags", 0),
            "at most 1000 items",
        ),
        ({"words": [["a", 1]]}, ("body", "columns", "words", 0, 1), "valid string"),
        ({"words": [[{"a": 1}]]}, ("body", "columns", "words", 0, 0), "valid string"),
        ({"price": ["1.5"]}, ("body", "columns", "price", 0), "valid number"),
        ({"price": [False]}, ("body", "columns", "price", 0), "valid number"),
        ({"price": [[1.0]]}, ("body", "columns", "price", 0), "valid number"),
        ({"raw": [1e39]}, ("body", "columns", "raw", 0), "Input should be less than or equal to"),
        ({"price": []}, ("body", "columns", "price"), "at least 1 item"),
        ({"price": [1.0] * 1025}, ("body", "columns", "price"), "at most 1024 items"),
    ],
)
def test_invalid_values_are_refused_naming_feature_and_row(client, columns, loc, message):
    found = errors(score_columns(client, **columns))
    assert any(where == loc and message in m for where, m in found), found


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(client, literal):
    body = f'{{"columns": {{"strict_cat": [0, 0], "price": [1.0, {literal}]}}}}'
    assert errors(client.post("/v1/score/columns", content=body, headers=JSON)) == [
        (("body", "columns", "price", 1), "Input should be a finite number")
    ]


def test_columns_of_different_lengths_are_refused(client):
    found = errors(
        client.post(
            "/v1/score/columns", json={"columns": {"strict_cat": [0, 0, 0], "price": [1.0, 2.0]}}
        )
    )
    assert found == [
        (
            ("body", "columns"),
            (
                "Value error, columns differ in length: 'strict_cat' has 3 entries, "
                "'price' has 2 (every column holds one entry per row)"
            ),
        )
    ]


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"columns": {}}, ("body", "columns", "strict_cat"), "Field required"),
        ({"columns": []}, ("body", "columns"), "Input should be an object"),
        ({}, ("body", "columns"), "Field required"),
        (
            {"columns": {"strict_cat": [0]}, "rows": [{}]},
            ("body", "rows"),
            "Extra inputs are not permitted",
        ),
        ({"rows": [{"strict_cat": 0}]}, ("body", "rows"), "Extra inputs are not permitted"),
    ],
)
def test_malformed_requests_are_refused(client, body, loc, message):
    found = errors(client.post("/v1/score/columns", json=body))
    assert any(where == loc and message in m for where, m in found), found


def test_nulls_are_allowed_where_the_row_form_allows_them(client):
    assert (
        score_columns(
            client, user=[None], city=[None], recent_tags=[None], words=[[None, "a"]], price=[None]
        ).status_code
        == 200
    )
    assert errors(
        client.post("/v1/score/columns", json={"columns": {"strict_cat": [0, None]}})
    ) == [(("body", "columns", "strict_cat", 1), "Input should be an integer")]


def test_oov_error_policy_makes_the_column_required_within_its_vocabulary(client):
    assert errors(client.post("/v1/score/columns", json={"columns": {"strict_cat": [1, 9]}})) == [
        (("body", "columns", "strict_cat", 1), "Input should be less than or equal to 3")
    ]
    assert errors(client.post("/v1/score/columns", json={"columns": {"user": [1]}})) == [
        (("body", "columns", "strict_cat"), "Field required")
    ]


def test_the_configured_row_limit_applies(make_client):
    client = make_client(max_rows=5)
    assert (
        client.post("/v1/score/columns", json={"columns": {"strict_cat": [0] * 5}}).status_code
        == 200
    )
    assert errors(client.post("/v1/score/columns", json={"columns": {"strict_cat": [0] * 6}})) == [
        (
            ("body", "columns", "strict_cat"),
            "List should have at most 5 items after validation, not 6",
        )
    ]


def test_errors_are_capped(client):
    found = errors(
        client.post(
            "/v1/score/columns", json={"columns": {"strict_cat": [0] * 100, "user": ["x"] * 100}}
        )
    )
    assert len(found) == 51 and found[-1] == (("body",), "50 more error(s) not listed")


def test_featurizer_errors_name_feature_then_row(edge_model):
    from serving.artifact import load_artifact
    from serving.columns import Column, Columns
    from serving.scorer import RequestForm, RequestInvalid, Scorer

    scorer = Scorer(load_artifact(edge_model.model), max_rows=10)
    columns = Columns(2, {"strict_cat": Column(np.array([0, 9]))})
    with pytest.raises(RequestInvalid) as err:
        scorer.featurize(columns, RequestForm.COLUMNS)
    assert err.value.errors[0]["loc"] == ["body", "columns", "strict_cat", 1]
