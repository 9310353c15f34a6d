"""schemas.rules: the feature rules the reader and the service share, column by column."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import DenseFeature, FeatureSchema, HashingError
from schemas.hashing import hash_ints, hash_string, hash_strings, splitmix64
from schemas.rules import (
    dense_values,
    int_rows,
    list_positions,
    map_values,
    oov_reason,
    sparse_rows,
    string_rows,
    truncate_lists,
)


@pytest.fixture
def schema():
    return FeatureSchema.from_dict(
        {
            "sparse": [
                {"name": "uid", "hash_buckets": 1000, "dim": 4},
                {"name": "city", "dtype": "string", "hash_buckets": 97, "dim": 4},
                {"name": "gender", "vocab_size": 3, "dim": 4},
                {"name": "strict", "vocab_size": 3, "dim": 4, "oov": "error"},
            ],
            "dense": [
                {"name": "plain", "default": 7.0},
                {"name": "price", "default": 1.0, "normalization": {"kind": "log1p"}},
                {
                    "name": "age",
                    "default": 30.0,
                    "normalization": {"kind": "standard", "mean": 40.0, "std": 1e-300},
                },
            ],
            "labels": {"click": "click", "conversion": "conversion"},
        }
    )


def _rows_by_hand(value: int, buckets: int) -> int:
    return int(splitmix64(np.array([value], dtype=np.int64).view(np.uint64))[0] % buckets)


def test_hashed_ints_missing_values_read_the_oov_row():
    ids = int_rows(np.array([5, -5, 0]), 1000, hashed=True, present=np.array([1, 1, 0], bool))
    assert ids.rows.tolist() == [_rows_by_hand(5, 1000), _rows_by_hand(-5, 1000), 1000]
    assert ids.oov.tolist() == [False, False, True] and ids.invalid is None
    assert ids.refused(True).tolist() == [False, False, True]
    assert not ids.refused(False).any()


def test_vocabulary_ids_are_their_own_rows_within_the_vocabulary():
    ids = int_rows(
        np.array([0, 2, 3, -1, 1]), 3, hashed=False, present=np.array([1, 1, 1, 1, 0], bool)
    )
    assert ids.rows.tolist() == [0, 2, 3, 3, 3]
    assert ids.oov.tolist() == [False, False, True, True, True]


def test_a_matrix_of_features_takes_one_bucket_count_and_one_policy_per_column():
    ints = np.array([[5, 1], [6, 9], [7, 0]])
    present = np.array([[True, True], [True, True], [False, False]])
    vocab = int_rows(ints, np.array([4, 3]), hashed=False, present=present)
    assert vocab.rows.tolist() == [[4, 1], [4, 3], [4, 3]]
    assert vocab.refused(np.array([False, True])).tolist() == [
        [False, False],
        [False, True],
        [False, True],
    ]
    hashed = int_rows(ints, np.array([1000, 7]), hashed=True)
    assert hashed.rows.tolist() == hash_ints(ints, np.array([1000, 7])).tolist()
    with pytest.raises(HashingError, match="expected integer values, got dtype float64"):
        int_rows(np.array([1.5]), 3, hashed=True)


def test_strings_are_hashed_once_per_distinct_value(monkeypatch):
    import schemas.rules

    hashed: list[str] = []
    monkeypatch.setattr(
        schemas.rules, "hash_strings", lambda v, b: hashed.extend(v) or hash_strings(v, b)
    )
    values = ["paris", None, "rome", "paris", "\ud800", "paris"]
    ids = string_rows(values, 97)
    assert sorted(hashed) == sorted(["paris", "rome", "\ud800"])
    paris = int(splitmix64(np.array([hash_string("paris")], dtype=np.uint64))[0] % 97)
    assert ids.rows.tolist()[0] == ids.rows.tolist()[3] == ids.rows.tolist()[5] == paris
    assert ids.rows[1] == ids.rows[4] == 97  # missing, and the invalid string's placeholder
    assert ids.oov.tolist() == [False, True, False, False, False, False]
    assert ids.invalid.tolist() == [False, False, False, False, True, False]
    with pytest.raises(HashingError, match="expected a string at position 2, got int 3"):
        string_rows(["a", None, 3], 97)


def test_the_rules_are_element_wise_so_distinct_values_can_be_mapped_once(schema):
    rng = np.random.default_rng(0)
    raw = rng.integers(-3, 6, 200)
    present = rng.random(200) < 0.8
    feature, table = schema.sparse_feature("gender"), schema.table_of("gender")
    whole = sparse_rows(raw, feature, table, present=present)
    keys = np.where(present, raw, np.iinfo(np.int64).min)  # one key for "missing"
    distinct, inverse = np.unique(keys, return_inverse=True)
    once = sparse_rows(distinct, feature, table, present=distinct != np.iinfo(np.int64).min)
    via_distinct = once.take(inverse)
    np.testing.assert_array_equal(via_distinct.rows, whole.rows)
    np.testing.assert_array_equal(via_distinct.oov, whole.oov)

    cities = [None if v < 0 else f"c{v}" for v in raw]
    city, city_table = schema.sparse_feature("city"), schema.table_of("city")
    names = list(dict.fromkeys(cities))
    index = np.array([names.index(c) for c in cities])
    np.testing.assert_array_equal(
        sparse_rows(names, city, city_table).take(index).rows,
        sparse_rows(cities, city, city_table).rows,
    )


def test_string_features_take_a_present_mask_as_well(schema):
    feature, table = schema.sparse_feature("city"), schema.table_of("city")
    ids = sparse_rows(["a", "b"], feature, table, present=np.array([True, False]))
    assert ids.rows.tolist() == [string_rows(["a"], 97).rows[0], 97]
    assert ids.oov.tolist() == [False, True]


def test_lists_keep_their_first_max_len_values():
    lengths = np.array([0, 5, 2, 3])
    cut = truncate_lists(lengths, 2)
    flat = np.arange(10)
    assert flat[cut.keep].tolist() == [0, 1, 5, 6, 7, 8]
    assert cut.lengths.tolist() == [0, 2, 2, 2]
    assert (cut.rows, cut.values) == (2, 4)
    untouched = truncate_lists(lengths, 5)
    assert untouched.keep is None and untouched.lengths.tolist() == [0, 5, 2, 3]
    assert (untouched.rows, untouched.values) == (0, 0)


def test_list_positions_name_the_row_and_the_place_in_its_list():
    rows, positions = list_positions(np.array([2, 0, 3]), np.array([0, 1, 2, 4]))
    assert rows.tolist() == [0, 0, 2, 2]
    assert positions.tolist() == [0, 1, 0, 2]


def test_dense_values_default_then_normalise_in_float64_then_float32(schema):
    plain, price, _ = schema.dense
    raw = np.array([2.5, 0.0, -3.0])
    got = dense_values(raw, price, present=np.array([True, False, True]))
    expected = np.array([np.log1p(2.5), np.log1p(1.0), -np.log1p(3.0)]).astype(np.float32)
    np.testing.assert_array_equal(got.values, expected)
    assert got.values.dtype == np.float32 and not got.refused.any()
    assert dense_values(np.array([0.0]), plain, present=np.array([False])).values.tolist() == [7.0]
    # float64 first: 2**24 + 1 has no float32, but its standardised value does
    wide = DenseFeature(
        name="wide", normalization={"kind": "standard", "mean": 2.0**24, "std": 1.0}
    )
    assert dense_values(np.array([2.0**24 + 1]), wide).values.tolist() == [1.0]


def test_non_finite_and_overflowing_dense_values_are_refused(schema):
    plain, price, age = schema.dense
    got = dense_values(
        np.array([np.nan, 1e39, 0.0, np.inf, 1.0]),
        plain,
        present=np.array([True, True, False, True, True]),
    )
    assert got.not_finite.tolist() == [True, False, False, True, False]
    assert got.overflow.tolist() == [False, True, False, False, False]
    assert got.values.tolist() == [0.0, 0.0, 7.0, 0.0, 1.0]  # refused ones hold a placeholder
    assert dense_values(np.array([1e308]), price).refused.tolist() == [False]  # log1p fits
    assert dense_values(np.array([41.0]), age).overflow.tolist() == [True]  # 1 / 1e-300
    # a missing value is never "not finite", whatever the array holds under it
    assert not dense_values(np.array([np.nan]), plain, present=np.array([False])).refused.any()


def test_map_values_raises_for_the_first_refused_value(schema):
    strict, table = schema.sparse_feature("strict"), schema.table_of("strict")
    with pytest.raises(HashingError, match=r"f.parquet: feature 'strict' at position 1: value 7"):
        map_values(np.array([1, 7, 9]), strict, table, where="f.parquet")
    city, city_table = schema.sparse_feature("city"), schema.table_of("city")
    with pytest.raises(HashingError, match="position 1: string '\\\\ud800' is not valid UTF-8"):
        map_values(["ok", "\ud800"], city, city_table)
    assert oov_reason(None) == "missing value"
    assert oov_reason(np.int64(7)) == "value 7 is out of vocabulary"
