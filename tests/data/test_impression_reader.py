"""The reader: batch layout, id mapping, dense normalisation, shuffling, epochs, streaming."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.rules import map_values
from trainer.data import DataError, ImpressionReader, infinite
from trainer.data.batch import TRUTH_COLUMNS
from trainer.data.reader import group_runs_order

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """splitmix64 written out on Python ints: an independent check of the schema's hashing."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _string_prehash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


@pytest.fixture
def hand_log(tmp_path, write_parquet):
    """Five rows with nulls, out-of-vocabulary ids, long lists and every normalisation."""
    columns = {
        "rid": pa.array([10, 11, 12, 13, 14], pa.int64()),
        "uid": pa.array([1, 2, None, 4, 5], pa.int64()),
        "city": pa.array(["a", None, "b", "a", "c"], pa.string()),
        "cat": pa.array([3, 12, -1, None, 9], pa.int64()),
        "hist": pa.array([[1, 2, 3], None, [], [4, None], [11, 5, 6]], pa.list_(pa.int64())),
        "price": pa.array([0.0, 1.0, -3.0, None, math.e - 1], pa.float64()),
        "activity": pa.array([2.0, 6.0, -2.0, None, 4.0], pa.float32()),
        "click": pa.array([1, 0, 1, 1, 0], pa.int8()),
        "conversion": pa.array([True, False, False, True, False], pa.bool_()),
        "junk": pa.array(["never read"] * 5),
    }
    return write_parquet(tmp_path / "hand.parquet", columns, [3, 2])


def _concat(batches):
    keys = batches[0].sparse.keys()
    per_key = {k: [b.sparse.to_dict()[k] for b in batches] for k in keys}
    return {
        "values": {k: torch.cat([j.values() for j in v]).tolist() for k, v in per_key.items()},
        "lengths": {k: torch.cat([j.lengths() for j in v]).tolist() for k, v in per_key.items()},
        "dense": torch.cat([b.dense for b in batches]),
        "click": torch.cat([b.click for b in batches]).tolist(),
        "conversion": torch.cat([b.conversion for b in batches]).tolist(),
        "group": torch.cat([b.group for b in batches]).tolist(),
    }


def test_batch_holds_mapped_ids_lengths_labels_and_normalised_dense(hand_log, tiny_schema):
    reader = ImpressionReader(hand_log, tiny_schema, batch_size=2, shuffle=False)
    batches = list(reader)
    assert [b.size for b in batches] == [2, 2, 1]
    first = batches[0]
    assert first.sparse.keys() == ["uid", "city", "cat", "hist"]
    assert first.sparse.values().dtype == torch.int64
    assert first.dense.dtype == torch.float32 and first.dense.shape == (2, 2)
    assert first.click.dtype == torch.float32 and first.group.dtype == torch.int64
    assert first.truth is None

    got = _concat(batches)
    oov_uid, oov_city, oov_cat = 1000, 50, 10
    assert got["values"]["uid"] == [
        _splitmix64(1) % 1000,
        _splitmix64(2) % 1000,
        oov_uid,
        _splitmix64(4) % 1000,
        _splitmix64(5) % 1000,
    ]
    city = {s: _splitmix64(_string_prehash(s)) % 50 for s in "abc"}
    assert got["values"]["city"] == [city["a"], oov_city, city["b"], city["a"], city["c"]]
    assert got["values"]["cat"] == [3, oov_cat, oov_cat, oov_cat, 9]
    # max_len 2 keeps the first two values; a null list and an empty list both have length 0.
    assert got["lengths"]["hist"] == [2, 0, 0, 2, 2]
    assert got["values"]["hist"] == [1, 2, 4, oov_cat, oov_cat, 5]
    assert got["lengths"]["uid"] == [1] * 5
    # price: sign(x) log1p(|x|), null -> default 2.0; activity: (x - 2) / 4, null -> default 10.
    expected_dense = [
        [0.0, 0.0],
        [math.log(2), 1.0],
        [-math.log(4), -1.0],
        [math.log(3), 2.0],
        [1.0, 0.5],
    ]
    torch.testing.assert_close(got["dense"], torch.tensor(expected_dense), rtol=1e-6, atol=1e-6)
    assert got["click"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert got["conversion"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert got["group"] == [10, 11, 12, 13, 14]


def test_stats_count_every_policy_action(hand_log, tiny_schema):
    reader = ImpressionReader(hand_log, tiny_schema, batch_size=2, shuffle=False, drop_last=True)
    assert len(list(reader)) == 2
    s = reader.stats
    assert (s.rows_read, s.rows_yielded, s.rows_dropped, s.batches) == (5, 4, 1, 2)
    assert s.truncated_rows == {"hist": 2}
    assert s.truncated_values == {"hist": 2}  # 3 -> 2 values and 3 -> 2 values
    # cat: 12, -1 and null; hist: the null element and 11 (the cut-off 6 is not mapped).
    assert s.oov_values == {"uid": 1, "city": 1, "cat": 3, "hist": 2}
    assert s.missing_values == {"uid": 1, "city": 1, "cat": 1, "hist": 1, "price": 1, "activity": 1}
    assert "hist=2" in s.format()


def test_reads_row_group_by_row_group_and_only_needed_columns(hand_log, tiny_schema, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reader must not load a whole file")

    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    calls = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        calls.append((i, tuple(columns)))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    assert (
        sum(b.size for b in ImpressionReader(hand_log, tiny_schema, batch_size=4, shuffle=False))
        == 5
    )
    assert [i for i, _ in calls] == [0, 1]
    expected = {"uid", "city", "cat", "hist", "price", "activity", "click", "conversion", "rid"}
    assert all(set(columns) == expected for _, columns in calls)


def test_string_group_ids_are_their_hash_as_int64(
    tmp_path, tiny_schema, tiny_columns, write_parquet
):
    columns = tiny_columns(3)
    columns["rid"] = pa.array(["u1", "u2", "u1"])
    path = write_parquet(tmp_path / "g.parquet", columns)
    (batch,) = ImpressionReader(path, tiny_schema, batch_size=8, shuffle=False)
    u1, u2 = _signed(_string_prehash("u1")), _signed(_string_prehash("u2"))
    assert batch.group.tolist() == [u1, u2, u1]


def test_dictionary_and_large_types_read_like_plain_ones(
    tmp_path, tiny_schema, tiny_columns, write_parquet
):
    plain = tiny_columns(6)
    other = dict(plain)
    other["city"] = plain["city"].dictionary_encode()
    other["hist"] = plain["hist"].cast(pa.large_list(pa.int64()))
    other["uid"] = plain["uid"].cast(pa.int32())
    other["price"] = pa.array([int(p) for p in plain["price"].to_pylist()], pa.int64())
    a = _concat(
        list(
            ImpressionReader(
                write_parquet(tmp_path / "a.parquet", plain),
                tiny_schema,
                batch_size=6,
                shuffle=False,
            )
        )
    )
    b = _concat(
        list(
            ImpressionReader(
                write_parquet(tmp_path / "b.parquet", other),
                tiny_schema,
                batch_size=6,
                shuffle=False,
            )
        )
    )
    assert a["values"] == b["values"] and a["lengths"] == b["lengths"]
    torch.testing.assert_close(a["dense"], b["dense"])


@pytest.fixture
def shuffled_log(tmp_path, tiny_columns, write_parquet):
    return write_parquet(tmp_path / "s.parquet", tiny_columns(200), [50, 50, 50, 50])


def _order(reader, epoch=0):
    reader.set_epoch(epoch)
    return [int(r) for batch in reader for r in batch.group]


def test_shuffle_is_reproducible_and_permutes(shuffled_log, tiny_schema):
    def make(seed=0):
        return ImpressionReader(
            shuffled_log, tiny_schema, batch_size=16, shuffle_buffer=60, seed=seed
        )

    first = _order(make())
    assert sorted(first) == list(range(200))
    assert first != list(range(200))
    assert _order(make()) == first  # same seed and epoch
    assert _order(make(), epoch=1) != first
    assert _order(make(seed=1)) != first
    # The buffer mixes row groups: the first batch does not come from a single one.
    assert len({r // 50 for r in first[:16]}) > 1
    # No buffer: rows are still permuted (inside row groups), each read once.
    unbuffered = _order(
        ImpressionReader(shuffled_log, tiny_schema, batch_size=16, shuffle_buffer=0)
    )
    assert sorted(unbuffered) == list(range(200)) and unbuffered != list(range(200))


def test_shuffle_keeps_rows_whole(shuffled_log, tiny_schema):
    """Every feature of a row moves with it: uid = 7 * rid, cat = rid % 10, hist = [rid % 10]."""
    reader = ImpressionReader(shuffled_log, tiny_schema, batch_size=32, shuffle_buffer=70, seed=3)
    for batch in reader:
        rid = batch.group
        sparse = batch.sparse.to_dict()
        assert sparse["cat"].values().tolist() == (rid % 10).tolist()
        assert sparse["hist"].values().tolist() == (rid % 10).tolist()
        expected_uid = [_splitmix64(7 * r) % 1000 for r in rid.tolist()]
        assert sparse["uid"].values().tolist() == expected_uid
        torch.testing.assert_close(batch.dense[:, 0], torch.log1p(rid.float()))
        assert batch.click.tolist() == (rid % 3 == 0).float().tolist()


def test_infinite_loops_epochs_and_resumes_from_its_state(shuffled_log, tiny_schema):
    def make():
        return ImpressionReader(shuffled_log, tiny_schema, batch_size=64, shuffle_buffer=60, seed=5)

    # 200 rows in batches of 64: 64, 64, 64, 8 per epoch.
    loop = infinite(make())
    sizes = [next(loop).size for _ in range(6)]
    assert sizes == [64, 64, 64, 8, 64, 64]
    assert loop.state_dict() == {"epoch": 1, "batch_in_epoch": 2}
    rest = [next(loop).group.tolist() for _ in range(4)]

    resumed_reader = make()
    resumed = infinite(resumed_reader)
    resumed.load_state_dict({"epoch": 1, "batch_in_epoch": 2})
    assert [next(resumed).group.tolist() for _ in range(4)] == rest
    assert resumed_reader.stats.rows_skipped == 128

    at_end = infinite(make(), start_epoch=0, skip_batches=4)
    fresh = make()
    fresh.set_epoch(1)
    assert next(at_end).group.tolist() == next(iter(fresh)).group.tolist()


def test_infinite_fails_when_an_epoch_has_no_batch(
    tmp_path, tiny_schema, tiny_columns, write_parquet
):
    path = write_parquet(tmp_path / "few.parquet", tiny_columns(3))
    reader = ImpressionReader(path, tiny_schema, batch_size=4, drop_last=True)
    with pytest.raises(DataError, match="no batch in a whole epoch"):
        next(infinite(reader))


def _stretches(sequence):
    """The maximal stretches of equal values, as (value, length)."""
    out = []
    for value in sequence:
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return [tuple(s) for s in out]


def test_group_runs_order_keeps_groups_together_in_runs_of_at_most_run_rows():
    sizes = [7, 3, 10, 1, 4]
    group = np.repeat(np.arange(len(sizes)) * 10, sizes)
    np.random.default_rng(5).shuffle(group)
    order = group_runs_order(group, 4, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(group)))  # every row once
    for value, size in zip(np.arange(len(sizes)) * 10, sizes, strict=True):
        stretches = [n for g, n in _stretches(group[order].tolist()) if g == value]
        assert sum(stretches) == size
        assert len(stretches) <= math.ceil(size / 4)  # cut into runs; adjacent runs may touch
    again = group_runs_order(group, 4, np.random.default_rng(0))
    assert again.tolist() == order.tolist()
    assert group_runs_order(group, 4, np.random.default_rng(1)).tolist() != order.tolist()
    # A run as long as the largest group: each group is one stretch.
    whole = _stretches(group[group_runs_order(group, 10, np.random.default_rng(2))].tolist())
    assert sorted(n for _, n in whole) == sorted(sizes)


@pytest.fixture
def grouped_log(tmp_path, tiny_columns, write_parquet):
    """200 rows in 20 groups of 10 (rid = row // 10); a row's index is expm1 of its price."""
    columns = tiny_columns(200)
    columns["rid"] = pa.array([r // 10 for r in range(200)], pa.int64())
    return write_parquet(tmp_path / "g.parquet", columns, [50, 50, 50, 50])


def test_group_rows_batches_hold_a_few_whole_groups_and_every_row_once(grouped_log, tiny_schema):
    reader = ImpressionReader(
        grouped_log, tiny_schema, batch_size=16, shuffle_buffer=1000, group_rows=10, seed=0
    )
    batches = list(reader)
    rows = [round(math.expm1(v)) for b in batches for v in b.dense[:, 0].tolist()]
    assert sorted(rows) == list(range(200))
    groups = [int(g) for b in batches for g in b.group]
    assert sorted(n for _, n in _stretches(groups)) == [10] * 20  # each group one stretch
    assert all(len(set(b.group.tolist())) <= 3 for b in batches)  # 16 rows span <= 3 runs
    assert groups != sorted(groups)  # the groups' order is shuffled
    # Rows still move whole: the labels follow the row index.
    click = [float(r % 3 == 0) for r in rows]
    assert [c for b in batches for c in b.click.tolist()] == click


def test_group_rows_needs_a_group_column_and_shuffling(grouped_log, tiny_schema_data):
    from schemas.features import FeatureSchema

    with pytest.raises(ValueError, match="group_rows must be >= 0"):
        ImpressionReader(
            grouped_log, FeatureSchema.from_dict(tiny_schema_data), batch_size=4, group_rows=-1
        )
    with pytest.raises(ValueError, match="shuffled reading only"):
        ImpressionReader(
            grouped_log,
            FeatureSchema.from_dict(tiny_schema_data),
            batch_size=4,
            shuffle=False,
            group_rows=4,
        )
    del tiny_schema_data["group"]
    with pytest.raises(ValueError, match="names no group column"):
        ImpressionReader(
            grouped_log, FeatureSchema.from_dict(tiny_schema_data), batch_size=4, group_rows=4
        )


def test_from_dataset_shuffles_train_only(small_sim):
    train = ImpressionReader.from_dataset(small_sim.out_dir, "train", batch_size=512)
    test = ImpressionReader.from_dataset(small_sim.out_dir, "test", batch_size=512)
    assert train.shuffle and not test.shuffle
    assert train.num_rows == 16_000 and test.num_rows == 4_000


def test_round_trip_of_the_simulated_log_matches_the_raw_columns(small_sim):
    schema = small_sim.schema
    reader = ImpressionReader.from_dataset(small_sim.out_dir, "test", batch_size=1_500)
    batches = list(reader)
    assert [b.size for b in batches] == [1_500, 1_500, 1_000]
    assert batches[0].sparse.keys() == schema.sparse_names
    assert batches[0].dense.shape == (1_500, 2)  # price and user_activity, no truth in features
    raw = pq.read_table(sorted((small_sim.out_dir / "test").glob("*.parquet")))
    got = _concat(batches)

    assert got["click"] == raw["click"].to_pylist()
    assert got["conversion"] == raw["conversion"].to_pylist()
    assert got["group"] == raw["user_id"].to_pylist()
    truth = torch.stack(
        [torch.cat([getattr(b.truth, name) for b in batches]) for name in TRUTH_COLUMNS], dim=1
    )
    expected_truth = np.stack([raw[c].to_numpy().astype(np.float32) for c in TRUTH_COLUMNS], axis=1)
    torch.testing.assert_close(truth, torch.from_numpy(expected_truth), rtol=0, atol=0)

    for name in ("gender", "age_bucket", "category", "hour", "position", "price_bucket"):
        assert got["values"][name] == raw[name].to_pylist(), name  # vocab ids are their own rows
    brand = raw["brand_id"].to_pylist()
    brand_rows = got["values"]["brand_id"]
    assert all((row == 10_000) == (b is None) for row, b in zip(brand_rows, brand, strict=True))
    user_table = schema.table_of("user_id")
    expected_users = map_values(
        raw["user_id"].to_numpy(), schema.sparse_feature("user_id"), user_table
    )
    assert got["values"]["user_id"] == expected_users.tolist()
    lists = raw["recent_categories"].to_pylist()
    assert got["lengths"]["recent_categories"] == [min(len(x), 5) for x in lists]
    assert got["values"]["recent_categories"] == [c for x in lists for c in x[:5]]

    price = raw["price"].to_numpy().astype(np.float64)
    activity = raw["user_activity"].to_numpy(zero_copy_only=False).astype(np.float64)
    activity = np.where(np.isnan(activity), 10.0, activity)  # null -> default 10
    expected_dense = np.stack([np.log1p(price), (activity - 10.0) / math.sqrt(50.0)], axis=1)
    torch.testing.assert_close(got["dense"], torch.from_numpy(expected_dense.astype(np.float32)))


def test_truth_is_optional(
    small_sim, tmp_path, tiny_schema, tiny_columns, write_parquet, monkeypatch
):
    reader = ImpressionReader(
        small_sim.out_dir / "test", small_sim.schema, batch_size=999, with_truth=False
    )
    assert not reader.with_truth
    assert not set(TRUTH_COLUMNS) & set(reader.plan.columns)
    assert next(iter(reader)).truth is None
    assert ImpressionReader(small_sim.out_dir / "test", small_sim.schema, batch_size=9).with_truth
    plain = write_parquet(tmp_path / "plain.parquet", tiny_columns(4))
    assert next(iter(ImpressionReader(plain, tiny_schema, batch_size=4))).truth is None
