"""Bad data fails with a DataError naming the file, the row group, the column and the row."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from schemas.features import FeatureSchema
from trainer.data import DataError, ImpressionReader

# The bad value sits in row 4 of the file: row 1 of row group 1 (row groups of 3 rows).
ROW_GROUPS = [3, 3]
BAD = 4


def _read_all(path, schema, **kwargs):
    return list(ImpressionReader(path, schema, batch_size=4, shuffle=False, **kwargs))


def _replace(columns, name, values, type_=None):
    out = dict(columns)
    out[name] = pa.array(values, type_ if type_ is not None else columns[name].type)
    return out


def _assert_names(
    message: str, path, column: str, row_group: int | None = None, row: int | None = None
):
    assert str(path) in message
    assert f"column {column!r}" in message
    if row_group is not None:
        assert f"row group {row_group}" in message
    if row is not None:
        file_row = sum(ROW_GROUPS[:row_group]) + row
        assert f"row {row} (file row {file_row})" in message, message


@pytest.fixture
def good(tiny_columns):
    return tiny_columns(6)


# Value errors: found while reading, located to the row -----------------------------------------


@pytest.mark.parametrize(
    "column, values, type_, reason",
    [
        ("click", [0, 1, 0, 0, None, 0], None, "null value"),
        ("click", [0, 0, 0, 0, 2, 0], None, "value 2 is not 0 or 1"),
        ("conversion", [0, 0, 0, 0, 1, 0], None, "conversion is 1 but 'click' is 0"),
        ("price", [1.0, 1.0, 1.0, 1.0, float("nan"), 1.0], None, "not finite"),
        ("activity", [1.0, 1.0, 1.0, 1.0, float("-inf"), 1.0], None, "not finite"),
        (
            "activity",
            [1.0, 1.0, 1.0, 1.0, 1e40, 1.0],
            pa.float64(),
            "value 1e+40 is out of range: its standard normalisation does not fit a float32",
        ),
        ("rid", [0, 1, 2, 3, None, 5], None, "null group id"),
    ],
)
def test_bad_values_name_file_row_group_column_and_row(
    tmp_path, tiny_schema, good, write_parquet, column, values, type_, reason
):
    columns = _replace(good, column, values, type_)
    if column == "click":
        columns = _replace(columns, "conversion", [0] * 6)  # keep the conversion rule out of it
    path = write_parquet(tmp_path / "bad.parquet", columns, ROW_GROUPS)
    reader = ImpressionReader(path, tiny_schema, batch_size=4, shuffle=False)  # opening succeeds
    with pytest.raises(DataError, match=re.escape(reason)) as err:
        list(reader)
    _assert_names(str(err.value), path, column, row_group=1, row=BAD - 3)


def test_conversion_without_click_counts_and_names_the_first_row(
    tmp_path, tiny_schema, good, write_parquet
):
    columns = _replace(good, "click", [1, 0, 0, 1, 0, 0])
    columns = _replace(columns, "conversion", [1, 1, 1, 0, 0, 0])
    path = write_parquet(tmp_path / "orphans.parquet", columns, ROW_GROUPS)
    with pytest.raises(DataError, match=r"\(2 such row\(s\) in this piece\)") as err:
        _read_all(path, tiny_schema)
    _assert_names(str(err.value), path, "conversion", row_group=0, row=1)


def test_out_of_vocabulary_under_the_error_policy(tmp_path, tiny_schema_data, good, write_parquet):
    for feature in tiny_schema_data["sparse"]:
        if feature["name"] in ("cat", "hist"):
            feature["oov"] = "error"
    schema = FeatureSchema.from_dict(tiny_schema_data)
    path = write_parquet(
        tmp_path / "oov.parquet", _replace(good, "cat", [1, 2, 3, 4, 10, 5]), ROW_GROUPS
    )
    with pytest.raises(DataError, match="value 10 is out of vocabulary") as err:
        _read_all(path, schema)
    _assert_names(str(err.value), path, "cat", row_group=1, row=1)

    lists = [[1], [2], [3], [4], [5, None], [6]]
    path = write_parquet(tmp_path / "oov_list.parquet", _replace(good, "hist", lists), ROW_GROUPS)
    with pytest.raises(DataError, match="missing value") as err:
        _read_all(path, schema)
    _assert_names(str(err.value), path, "hist", row_group=1, row=1)


def test_invalid_ground_truth(tmp_path, tiny_schema, good, write_parquet):
    columns = dict(good)
    columns["true_ctr"] = pa.array([0.1, 0.1, 0.1, 0.1, 1.5, 0.1], pa.float32())
    columns["true_cvr"] = pa.array([0.1] * 6, pa.float32())
    columns["cf_conversion"] = pa.array([0] * 6, pa.int8())
    path = write_parquet(tmp_path / "truth.parquet", columns, ROW_GROUPS)
    with pytest.raises(DataError, match=r"value 1\.5 is not a probability") as err:
        _read_all(path, tiny_schema)
    _assert_names(str(err.value), path, "true_ctr", row_group=1, row=1)
    assert len(_read_all(path, tiny_schema, with_truth=False)) == 2  # ignored when not read


# Schema errors: found when the reader opens the files -------------------------------------------


@pytest.mark.parametrize(
    "column, array, expected",
    [
        (
            "uid",
            pa.array([str(i) for i in range(6)]),
            "expected an integer type (int64) for sparse feature",
        ),
        ("city", pa.array(range(6), pa.int64()), "expected a string type"),
        ("uid", pa.array([[i] for i in range(6)]), "a list column for a single-valued feature"),
        ("hist", pa.array(range(6), pa.int64()), "a scalar column for a multi-valued feature"),
        ("hist", pa.array([["a"]] * 6), "expected list<int64>"),
        ("price", pa.array(["1.0"] * 6), "expected a float type"),
        ("click", pa.array([0.0] * 6), "expected an integer or bool type holding 0/1"),
        ("rid", pa.array([0.5] * 6), "expected an integer or string type for group"),
    ],
)
def test_wrong_column_type_fails_on_open(
    tmp_path, tiny_schema, good, write_parquet, column, array, expected
):
    columns = dict(good)
    columns[column] = array
    path = write_parquet(tmp_path / "typed.parquet", columns, ROW_GROUPS)
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        ImpressionReader(path, tiny_schema, batch_size=4)
    _assert_names(str(err.value), path, column)
    assert "every row group" in str(err.value)


def test_missing_column_fails_on_open_naming_the_file(tmp_path, tiny_schema, good, write_parquet):
    ok = write_parquet(tmp_path / "a.parquet", good, ROW_GROUPS)
    columns = dict(good)
    del columns["conversion"]
    bad = write_parquet(tmp_path / "b.parquet", columns, ROW_GROUPS)
    with pytest.raises(DataError, match=r"missing column, needed as labels\.conversion") as err:
        ImpressionReader([ok, bad], tiny_schema, batch_size=4)
    _assert_names(str(err.value), bad, "conversion")
    assert str(ok) not in str(err.value)


def test_truth_in_only_some_files(tmp_path, tiny_schema, good, write_parquet):
    with_truth = dict(good)
    with_truth["true_ctr"] = pa.array([0.1] * 6, pa.float32())
    with_truth["true_cvr"] = pa.array([0.1] * 6, pa.float32())
    with_truth["cf_conversion"] = pa.array([0] * 6, pa.int8())
    a = write_parquet(tmp_path / "a.parquet", with_truth)
    b = write_parquet(tmp_path / "b.parquet", good)
    with pytest.raises(DataError, match="lacks") as err:
        ImpressionReader([a, b], tiny_schema, batch_size=4)
    _assert_names(str(err.value), b, "true_ctr")
    assert not ImpressionReader([a, b], tiny_schema, batch_size=4, with_truth=False).with_truth
    with pytest.raises(DataError, match="missing column, needed as ground truth"):
        ImpressionReader([a, b], tiny_schema, batch_size=4, with_truth=True)


# Files ------------------------------------------------------------------------------------------


def test_empty_and_missing_file_lists(tmp_path, tiny_schema):
    with pytest.raises(DataError, match="empty file list"):
        ImpressionReader([], tiny_schema, batch_size=4)
    with pytest.raises(DataError, match="no such file or directory"):
        ImpressionReader(tmp_path / "nowhere", tiny_schema, batch_size=4)
    (tmp_path / "train").mkdir()
    with pytest.raises(
        DataError, match=r"holds no \*\.parquet file; it has subdirectories \['train'\]"
    ):
        ImpressionReader(tmp_path, tiny_schema, batch_size=4)


def test_the_same_file_twice(tmp_path, tiny_schema, good, write_parquet):
    path = write_parquet(tmp_path / "a.parquet", good)
    with pytest.raises(DataError, match="named twice"):
        ImpressionReader([path, tmp_path / "." / "a.parquet"], tiny_schema, batch_size=4)


def test_not_parquet_and_truncated_files(tmp_path, tiny_schema, good, write_parquet):
    text = tmp_path / "notes.parquet"
    text.write_text("this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        ImpressionReader(text, tiny_schema, batch_size=4)
    assert str(text) in str(err.value)
    whole = write_parquet(tmp_path / "whole.parquet", good).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        ImpressionReader(cut, tiny_schema, batch_size=4)
    assert str(cut) in str(err.value)


def test_corrupt_row_group_names_the_row_group(tmp_path, tiny_schema, good, write_parquet):
    path = write_parquet(tmp_path / "c.parquet", good, ROW_GROUPS)
    reader = ImpressionReader(path, tiny_schema, batch_size=4, shuffle=False)
    data = bytearray(path.read_bytes())
    data[4:60] = b"\xff" * 56  # overwrite page headers of row group 0, keep the footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot decode row group") as err:
        list(reader)
    assert str(path) in str(err.value) and "row group 0" in str(err.value)


def test_invalid_reader_arguments(tmp_path, tiny_schema, good, write_parquet):
    path = write_parquet(tmp_path / "a.parquet", good)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ImpressionReader(path, tiny_schema, batch_size=0)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0, got -1"):
        ImpressionReader(path, tiny_schema, batch_size=4, shuffle_buffer=-1)


def test_a_schema_cannot_read_ground_truth_as_a_feature(
    tmp_path, tiny_schema_data, good, write_parquet
):
    tiny_schema_data["dense"].append({"name": "true_ctr"})
    schema = FeatureSchema.from_dict(tiny_schema_data)
    columns = dict(good)
    columns["true_ctr"] = pa.array([0.5] * 6, pa.float32())
    path = write_parquet(tmp_path / "leak.parquet", columns)
    with pytest.raises(DataError, match=r"reads ground-truth column\(s\) \['true_ctr'\]"):
        ImpressionReader(path, schema, batch_size=4)
