"""The request rules of schemas.api: one statement per feature, read by both request forms."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from schemas import FeatureSchema
from schemas.api import (
    INT64_MAX,
    INT64_MIN,
    ValueKind,
    feature_rules,
    score_columns_model,
    score_request_model,
)


@pytest.fixture
def schema() -> FeatureSchema:
    return FeatureSchema.from_dict(
        {
            "tables": [{"name": "tags", "vocab_size": 12, "dim": 4}],
            "sparse": [
                {"name": "user", "hash_buckets": 97, "dim": 4},
                {"name": "city", "dtype": "string", "hash_buckets": 13, "dim": 3},
                {"name": "strict_cat", "vocab_size": 4, "dim": 2, "oov": "error"},
                {
                    "name": "recent_tags",
                    "table": "tags",
                    "multi_valued": True,
                    "max_len": 3,
                    "oov": "error",
                },
            ],
            "dense": [
                {"name": "price", "normalization": {"kind": "log1p"}},
                {
                    "name": "activity",
                    "normalization": {"kind": "standard", "mean": 3.0, "std": 2.0},
                },
            ],
            "labels": {"click": "click", "conversion": "conversion"},
        }
    )


def test_feature_rules_state_kind_strictness_and_range(schema):
    rules = {rule.name: rule for rule in feature_rules(schema)}
    assert list(rules) == ["user", "city", "strict_cat", "recent_tags", "price", "activity"]
    assert (rules["user"].kind, rules["user"].low, rules["user"].high) == (
        ValueKind.INT,
        INT64_MIN,
        INT64_MAX,
    )
    assert rules["city"].kind is ValueKind.STRING and not rules["city"].required
    assert (rules["strict_cat"].low, rules["strict_cat"].high, rules["strict_cat"].required) == (
        0,
        3,
        True,
    )
    # a strict list: elements within the vocabulary and never null, but the list may be left out
    assert (rules["recent_tags"].low, rules["recent_tags"].high) == (0, 11)
    assert rules["recent_tags"].strict and not rules["recent_tags"].required
    assert rules["price"].high > 1e300  # log1p of any finite double fits a float32
    assert math.isclose(rules["activity"].high, 3.0 + 2.0 * 0.999 * 3.4028234663852886e38)


def test_both_forms_hold_each_value_to_the_same_rule(schema):
    rows, columns = score_request_model(schema, 10), score_columns_model(schema, 10)
    for name, value in [
        ("user", True),
        ("city", 5),
        ("strict_cat", 4),
        ("recent_tags", [None]),
        ("price", float("inf")),
    ]:
        with pytest.raises(ValidationError) as by_row:
            rows.model_validate({"rows": [{"strict_cat": 0, name: value}]})
        with pytest.raises(ValidationError) as by_column:
            columns.model_validate({"columns": {"strict_cat": [0], name: [value]}})
        assert [e["msg"] for e in by_row.value.errors()] == [
            e["msg"] for e in by_column.value.errors()
        ]
    row_schema = rows.model_json_schema()["$defs"]["Impression"]["properties"]
    column_schema = columns.model_json_schema()["$defs"]["ImpressionColumns"]["properties"]
    for name in row_schema:
        assert column_schema[name]["items"] == {
            k: v for k, v in row_schema[name].items() if k not in ("description", "title")
        }


def test_columns_are_of_one_length_and_at_least_one(schema):
    model = score_columns_model(schema, 3)
    assert model.model_validate({"columns": {"strict_cat": [0, 1], "price": [1.0, None]}})
    with pytest.raises(ValidationError, match="'strict_cat' has 2 entries, 'price' has 1"):
        model.model_validate({"columns": {"strict_cat": [0, 1], "price": [1.0]}})
    with pytest.raises(ValidationError, match="at most 3 items"):
        model.model_validate({"columns": {"strict_cat": [0] * 4}})
    assert model.model_json_schema()["$defs"]["ImpressionColumns"]["minProperties"] == 1
