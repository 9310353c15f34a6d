"""Hive day partitions read as one log, and the partition filter (data.filter)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from schemas.features import FeatureSchema
from schemas.rules import map_values
from trainer.config import ConfigError, load_config
from trainer.data import DataError, ImpressionReader, summarize
from trainer.data._partitions import (
    FilterError,
    PartitionFilter,
    partition_types,
    partition_values,
    select_partitions,
)

DAYS = ("2026-11-29", "2026-11-30", "2026-12-01", "2026-12-02")
ROWS_PER_DAY = 6


@pytest.fixture
def daily_log(tmp_path, tiny_columns, write_parquet):
    """``DAYS`` of 6 rows each under ``day=<day>/``; rows 0-5 on the first day, and so on."""
    root = tmp_path / "impressions"
    for index, day in enumerate(DAYS):
        directory = root / f"day={day}"
        directory.mkdir(parents=True)
        columns = tiny_columns(ROWS_PER_DAY, start=index * ROWS_PER_DAY)
        write_parquet(directory / "part-00000.parquet", columns, [4, 2])
    (root / f"day={DAYS[1]}" / "_SUCCESS").write_text("")  # markers and staging files: not data
    (root / f"day={DAYS[1]}" / ".part-00001.parquet.tmp").write_text("half")
    return root


def _rids(reader: ImpressionReader) -> list[int]:
    return [int(r) for batch in reader for r in batch.group.tolist()]


def _days_of(rids: list[int]) -> set[str]:
    return {DAYS[r // ROWS_PER_DAY] for r in rids}


# The filter --------------------------------------------------------------------------------------

TYPES = {"day": pa.string(), "hour": pa.int64()}
VALUES = [{"day": d, "hour": h} for d in DAYS for h in (0, 12)]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("day >= '2026-12-01'", {(d, h) for d in DAYS[2:] for h in (0, 12)}),
        ("'2026-11-30' <= day < '2026-12-02'", {(d, h) for d in DAYS[1:3] for h in (0, 12)}),
        ("day == '2026-12-02' and hour > 6", {(DAYS[3], 12)}),
        (
            "day == '2026-11-29' or (day == '2026-12-02' and not hour == 0)",
            {(DAYS[0], 0), (DAYS[0], 12), (DAYS[3], 12)},
        ),
        ("day in ('2026-11-29', '2026-12-01') and hour != 12", {(DAYS[0], 0), (DAYS[2], 0)}),
        ("day not in ['2026-11-29'] and hour <= 0", {(d, 0) for d in DAYS[1:]}),
        ("hour >= -1 and 13 > hour", {(d, h) for d in DAYS for h in (0, 12)}),
    ],
)
def test_filters_select_partitions(text, kept):
    selected = select_partitions(VALUES, TYPES, PartitionFilter.parse(text))
    assert {(VALUES[i]["day"], VALUES[i]["hour"]) for i in selected} == kept
    assert selected == sorted(selected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("day >= ", "not a valid expression"),
        ("day.startswith('2026')", r"day\.startswith\('2026'\)\" is not allowed"),
        ("__import__('os').system('true')", r"\('os'\)\.system\('true'\)\" is not allowed"),
        ("day >= '2026' + '-12'", r"'2026' \+ '-12'\" is not a constant"),
        ("day == hour", "needs one partition column and one constant"),
        ("'a' == 'b'", "needs one partition column and one constant"),
        ("day is None", "'is' comparisons are not allowed"),
        ("day in other", "'in' needs a non-empty list of constants"),
        ("day in ()", "'in' needs a non-empty list of constants"),
        ("day", "'day' is not allowed"),
        ("day == True", "'True' is not a constant"),
    ],
)
def test_invalid_filters_quote_the_offending_part(text, message):
    with pytest.raises(FilterError, match=message) as err:
        PartitionFilter.parse(text)
    assert str(err.value).startswith(f"filter {text!r}")


def test_unknown_columns_and_mistyped_constants():
    with pytest.raises(
        FilterError, match=r"unknown column 'dya'; the partition columns are \['day', 'hour'\]"
    ):
        PartitionFilter.parse("dya >= '2026-12-01'").expression(TYPES)
    with pytest.raises(
        FilterError, match=r"column 'day' holds strings, compared with 20261201; quote it"
    ):
        PartitionFilter.parse("day >= 20261201").expression(TYPES)
    with pytest.raises(
        FilterError, match=r"column 'hour' holds integers, compared with '3'; do not quote it"
    ):
        PartitionFilter.parse("hour == '3'").expression(TYPES)


def test_partition_values_and_types():
    values = partition_values("day=2026-12-01/hour=03/city=S%C3%A3o%20Paulo/part-0.parquet")
    assert values == {"day": "2026-12-01", "hour": "03", "city": "São Paulo"}
    assert partition_values("day=__HIVE_DEFAULT_PARTITION__/x.parquet") == {"day": None}
    types = partition_types([values, {"day": "2026-12-02", "hour": "4", "city": "Lima"}])
    assert types == {"day": pa.string(), "hour": pa.int64(), "city": pa.string()}


def test_the_config_checks_the_filter_when_it_loads():
    with pytest.raises(
        ConfigError, match=r"data\.filter: filter 'day >= now\(\)': 'now\(\)' is not a constant"
    ):
        load_config(None, ["output_dir=/tmp/x", "data.train=/tmp/d", 'data.filter="day >= now()"'])
    config = load_config(
        None, ["output_dir=/tmp/x", "data.train=/tmp/d", "data.filter=\"day >= '2026-12-01'\""]
    )
    assert config.data.filter == "day >= '2026-12-01'"


# Reading partitioned logs ------------------------------------------------------------------------


def test_a_partitioned_directory_is_one_log_in_path_order(daily_log, tiny_schema):
    reader = ImpressionReader(daily_log, tiny_schema, batch_size=5, shuffle=False)
    assert reader.num_rows == len(DAYS) * ROWS_PER_DAY
    assert _rids(reader) == list(range(len(DAYS) * ROWS_PER_DAY))
    assert reader.files == [str(daily_log / f"day={d}" / "part-00000.parquet") for d in DAYS]
    # The partition column is not a feature: the schema does not name it.
    batch = next(iter(reader))
    assert batch.sparse.keys() == tiny_schema.sparse_names


def test_the_filter_selects_days_and_ranks_split_what_it_keeps(daily_log, tiny_schema):
    kept = "day >= '2026-11-30' and day != '2026-12-01'"
    ranks = [
        ImpressionReader(
            daily_log, tiny_schema, batch_size=4, shuffle=True, rank=r, world_size=2, filter=kept
        )
        for r in range(2)
    ]
    assert ranks[0].num_rows == 2 * ROWS_PER_DAY
    rids = sorted(_rids(ranks[0]) + _rids(ranks[1]))
    assert _days_of(rids) == {DAYS[1], DAYS[3]}
    assert rids == sorted(set(rids)) and len(rids) == 2 * ROWS_PER_DAY  # every row once
    assert "filter=" in repr(ranks[0])
    assert summarize(daily_log, filter=kept).rows == 2 * ROWS_PER_DAY


def test_a_schema_may_name_the_partition_column(daily_log, tiny_schema_data):
    tiny_schema_data["sparse"].append(
        {"name": "day", "dtype": "string", "hash_buckets": 64, "dim": 4}
    )
    schema = FeatureSchema.from_dict(tiny_schema_data)
    reader = ImpressionReader(
        daily_log, schema, batch_size=24, shuffle=False, filter="day <= '2026-11-30'"
    )
    batch = next(iter(reader))
    expected = map_values(
        [DAYS[r // ROWS_PER_DAY] for r in batch.group.tolist()],
        schema.sparse_feature("day"),
        schema.table_of("day"),
    )
    assert batch.sparse["day"].values().tolist() == expected.tolist()
    assert len(set(expected.tolist())) == 2


def test_partition_errors(daily_log, tiny_schema, tiny_columns, write_parquet, tmp_path):
    with pytest.raises(
        DataError,
        match=r"selects none of its 4 file\(s\); the partitions hold day '2026-11-29' to '2026-12-02' \(4 value\(s\)\)",
    ):
        ImpressionReader(daily_log, tiny_schema, batch_size=4, filter="day > '2026-12-31'")
    with pytest.raises(DataError, match=r"impressions: filter 'days > 1': unknown column 'days'"):
        ImpressionReader(daily_log, tiny_schema, batch_size=4, filter="days > 1")
    with pytest.raises(DataError, match=r"filter 'day\(\)': 'day\(\)' is not allowed"):
        ImpressionReader(daily_log, tiny_schema, batch_size=4, filter="day()")
    flat = daily_log / f"day={DAYS[0]}"
    with pytest.raises(DataError, match="needs hive partitions .* holds Parquet files itself"):
        ImpressionReader(flat, tiny_schema, batch_size=4, filter="day > '1'")
    with pytest.raises(DataError, match="selects partitions of a directory, not a single file"):
        ImpressionReader(flat / "part-00000.parquet", tiny_schema, batch_size=4, filter="day > '1'")
    # A file whose own columns include the partition column: which value counts is not guessed.
    clash = tmp_path / "clash" / "day=2026-12-01"
    clash.mkdir(parents=True)
    write_parquet(clash / "p.parquet", {**tiny_columns(2), "day": pa.array(["x", "y"])})
    with pytest.raises(
        DataError,
        match=r"p\.parquet, column 'day': the column is in the file and in its partition directory \(day=2026-12-01\)",
    ):
        ImpressionReader(tmp_path / "clash", tiny_schema, batch_size=4)
    # Files at different partition depths.
    deeper = daily_log / f"day={DAYS[0]}" / "hour=3"
    deeper.mkdir()
    write_parquet(deeper / "p.parquet", tiny_columns(2))
    with pytest.raises(
        DataError, match=r"partition columns \['day'\] differ from \['day', 'hour'\]"
    ):
        ImpressionReader(daily_log, tiny_schema, batch_size=4)
