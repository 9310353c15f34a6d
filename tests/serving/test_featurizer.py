"""serving.features: request columns to model inputs by the rules of ``schemas.rules``.

The parity check here is on the model inputs themselves: the trainer's reader and the service's
featurizer, given the same impressions, produce the same row ids and dense values bit for bit.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import FeatureSchema
from schemas.artifact import ModelSpec, Pooling, TableEntry
from serving.columns import Column, Columns
from serving.features import Featurizer, RowErrors
from tests.serving.artifacts import EDGE_SCHEMA, edge_schema, edge_table, request_rows


def _spec(schema: FeatureSchema) -> ModelSpec:
    tables = [
        TableEntry(
            name=table.name,
            num_rows=table.num_rows,
            dim=table.dim,
            pooling=Pooling.SUM,
            features=tuple(schema.features_of(table.name)),
        )
        for table in schema.all_tables
    ]
    return ModelSpec(
        num_experts=1,
        expert_sizes=(2,),
        tables=tuple(tables),
        dense_features=tuple(schema.dense_names),
    )


def test_the_reader_and_the_featurizer_give_the_same_model_inputs(tmp_path):
    from trainer.data import ImpressionReader

    schema = edge_schema()
    pq.write_table(edge_table(400, seed=11), tmp_path / "part.parquet", row_group_size=150)
    reader = ImpressionReader(
        tmp_path / "part.parquet", schema, batch_size=1000, shuffle=False, with_truth=False
    )
    (batch,) = list(reader)
    spec = _spec(schema)
    featurizer = Featurizer(schema, spec)
    features = featurizer(request_rows(tmp_path / "part.parquet", schema))
    trained = batch.sparse.to_dict()
    singles = [n for n in spec.sparse_features if not schema.sparse_feature(n).multi_valued]
    for slot, name in enumerate(singles):
        np.testing.assert_array_equal(features.single[:, slot], trained[name].values().numpy())
    for k, name in enumerate(featurizer.multi_valued):
        np.testing.assert_array_equal(features.multi_values[k], trained[name].values().numpy())
        np.testing.assert_array_equal(features.multi_lengths[k], trained[name].lengths().numpy())
    np.testing.assert_array_equal(features.dense, batch.dense.numpy())
    # the data exercises every rule: nulls, OOV ids, long lists, every normalisation
    stats = reader.stats
    assert stats.truncated_rows["recent_tags"] and stats.truncated_rows["words"]
    assert stats.oov_values["level"] > stats.missing_values["level"] > 0
    assert all(stats.missing_values[name] for name in schema.dense_names)


def test_a_missing_string_is_refused_under_the_error_policy_in_process():
    data = {**EDGE_SCHEMA, "sparse": [dict(f) for f in EDGE_SCHEMA["sparse"]]}
    next(f for f in data["sparse"] if f["name"] == "city")["oov"] = "error"
    schema = FeatureSchema.from_dict(data)
    featurizer = Featurizer(schema, _spec(schema))
    columns = Columns(
        2,
        {
            "strict_cat": Column(np.zeros(2, dtype=np.int64)),
            "city": Column(["paris", None]),
            "words": Column([None, "w"], lengths=np.array([1, 1])),
        },
    )
    with pytest.raises(RowErrors) as err:
        featurizer(columns)
    assert [(e.loc("rows"), e.type) for e in err.value.errors] == [
        (("rows", 1, "city"), "out_of_vocabulary")
    ]
    assert err.value.errors[0].msg.startswith("missing value; the feature's oov policy is 'error'")
    absent = Columns(1, {"strict_cat": Column(np.zeros(1, dtype=np.int64))})
    with pytest.raises(RowErrors, match="rows.0.city: missing value"):
        featurizer(absent)


def test_non_finite_dense_values_are_refused_in_process():
    schema = edge_schema()
    featurizer = Featurizer(schema, _spec(schema))
    columns = Columns(
        3,
        {
            "strict_cat": Column(np.zeros(3, dtype=np.int64)),
            "raw": Column(np.array([np.nan, 0.0, np.inf]), present=np.array([True, False, True])),
        },
    )
    with pytest.raises(RowErrors) as err:
        featurizer(columns)
    assert [(e.loc("rows"), e.msg) for e in err.value.errors] == [
        (("rows", 0, "raw"), "Input should be a finite number"),
        (("rows", 2, "raw"), "Input should be a finite number"),
    ]
