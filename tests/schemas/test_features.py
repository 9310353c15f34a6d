import subprocess
import sys

import pytest

from schemas import FeatureSchema, FeatureScope, SchemaError, load_schema

LABELS = {"click": "click", "conversion": "conversion"}


def schema(**overrides):
    data = {
        "sparse": [
            {"name": "user_id", "hash_buckets": 1000, "dim": 8},
            {"name": "item_id", "table": "items"},
            {"name": "history", "table": "items", "multi_valued": True, "max_len": 5},
            {"name": "gender", "vocab_size": 3, "dim": 8},
            {"name": "city", "dtype": "string", "hash_buckets": 50, "dim": 4},
        ],
        "tables": [{"name": "items", "hash_buckets": 500, "dim": 8}],
        "dense": [{"name": "price", "default": 1.0, "normalization": {"kind": "log1p"}}],
        "labels": dict(LABELS),
        "group": "user_id",
    }
    data.update(overrides)
    return data


def test_valid_schema_derives_tables_in_order():
    s = FeatureSchema.from_dict(schema())
    assert [t.name for t in s.all_tables] == ["items", "user_id", "gender", "city"]
    assert s.features_of("items") == ["item_id", "history"]
    assert s.table_of("history").num_rows == 501  # 500 buckets + the OOV row
    assert s.table_of("gender").num_rows == 4
    assert s.sparse_names == ["user_id", "item_id", "history", "gender", "city"]


def test_yaml_round_trip_and_fingerprint(tmp_path):
    s = FeatureSchema.from_dict(schema())
    s.save(tmp_path / "schema.yaml")
    again = load_schema(tmp_path / "schema.yaml")
    assert again == s
    assert again.fingerprint() == s.fingerprint()
    changed = FeatureSchema.from_dict(schema(group=None))
    assert changed.fingerprint() != s.fingerprint()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d: d["sparse"].append({"name": "user_id", "vocab_size": 3, "dim": 4}),
            "duplicate feature name 'user_id'",
        ),
        (lambda d: d["dense"].append({"name": "gender"}), "duplicate feature name 'gender'"),
        (
            lambda d: d["sparse"][0].update(dim=0),
            "sparse[0] 'user_id'.dim: Input should be greater than 0",
        ),
        (
            lambda d: d["tables"][0].update(dim=0),
            "tables[0] 'items'.dim: Input should be greater than 0",
        ),
        (lambda d: d["sparse"][1].update(table="nope"), "'item_id' reads unknown table 'nope'"),
        (lambda d: d["labels"].pop("conversion"), "labels.conversion: Field required"),
        (lambda d: d.pop("labels"), "labels: Field required"),
        (lambda d: d["sparse"][3].update(dtype="string"), "string values need hash_buckets"),
        (
            lambda d: d["sparse"][0].update(vocab_size=10),
            "set exactly one of vocab_size and hash_buckets",
        ),
        (lambda d: d["sparse"][1].update(dim=4), "dim belong to the table"),
        (
            lambda d: d["sparse"][0].update(colour="red"),
            "sparse[0] 'user_id'.colour: Extra inputs are not permitted",
        ),
        (lambda d: d["sparse"][0].update(max_len=3), "max_len only applies to multi_valued"),
        (lambda d: d.update(sparse=[]), "at least one sparse feature"),
    ],
)
def test_invalid_schema_names_the_field(mutate, expected):
    data = schema()
    mutate(data)
    with pytest.raises(SchemaError) as err:
        FeatureSchema.from_dict(data)
    assert expected in str(err.value)


def test_load_schema_errors_name_the_file(tmp_path):
    with pytest.raises(SchemaError, match="cannot read schema file .*missing.yaml"):
        load_schema(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparse: [unclosed")
    with pytest.raises(SchemaError, match="bad.yaml: not valid YAML"):
        load_schema(bad)


def test_schemas_package_never_imports_torch():
    code = "import sys, schemas, schemas.hashing, schemas.features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_normalization_by_hand():
    import math

    import numpy as np

    from schemas import Normalization

    x = np.array([-3.0, 0.0, 2.0])
    assert Normalization().apply(x).tolist() == [-3.0, 0.0, 2.0]
    assert Normalization(kind="log1p").apply(x).tolist() == pytest.approx(
        [-math.log(4), 0.0, math.log(3)]
    )
    assert Normalization(kind="standard", mean=1.0, std=2.0).apply(x).tolist() == [-2.0, -0.5, 0.5]


def test_scope_says_where_a_ranking_request_gives_a_feature():
    s = FeatureSchema.from_dict(schema())
    assert {s.scope_of(n) for n in s.sparse_names + s.dense_names} == {FeatureScope.ANY}
    assert "scope" not in s.to_yaml()  # older schemas are written as they were
    scoped = schema()
    scoped["sparse"][0]["scope"] = "context"  # user_id
    scoped["sparse"][1]["scope"] = "candidate"  # item_id
    scoped["dense"][0]["scope"] = "candidate"  # price
    t = FeatureSchema.from_dict(scoped)
    assert t.scope_of("user_id") is FeatureScope.CONTEXT
    assert t.scope_of("item_id") is FeatureScope.CANDIDATE
    assert t.scope_of("price") is FeatureScope.CANDIDATE
    assert t.scope_of("history") is FeatureScope.ANY
    assert FeatureSchema.from_yaml(t.to_yaml()) == t
    # scope changes no weight: declaring it keeps the fingerprint of checkpoints and exports
    assert t.fingerprint() == s.fingerprint()
    with pytest.raises(SchemaError, match="unknown feature 'nope'"):
        t.scope_of("nope")


def test_an_unknown_scope_is_refused_naming_the_feature():
    data = schema()
    data["sparse"][2]["scope"] = "user"
    with pytest.raises(
        SchemaError, match=r"sparse\[2\] 'history'.scope: Input should be 'context'"
    ):
        FeatureSchema.from_dict(data)
