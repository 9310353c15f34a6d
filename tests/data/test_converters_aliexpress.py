"""AliExpress -> impression logs on a tiny country directory in the benchmark's CSV layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from schemas.features import NormalizationKind, load_schema
from trainer.data.__main__ import app
from trainer.data.converters import AliExpressConfig, ConversionError, convert_aliexpress

HEADER = "search_id,categorical_1,categorical_2,numerical_1,numerical_2,click,conversion"
TRAIN = [
    HEADER,
    "100,3,7,0.5,10,1,1",
    "100,1,-2,1.5,20,0,0",
    "101,0,5,2.5,30,1,0",
    "101,2,5,0.1",  # 4 fields
    "102,x,5,0.1,1,0,0",  # categorical not an integer
    "102,1,5,nan,1,0,0",  # numerical not finite
    "102,1,5,0.2,1,0,1",  # conversion without a click
    "102,1,5,0.2,1,2,0",  # label not 0/1
]
TEST = [HEADER, "200,9,5,1.0,15,1,0", "201,4,6,0.0,5,0,0"]


@pytest.fixture
def country(tmp_path: Path) -> Path:
    src = tmp_path / "AliExpress_NL"
    src.mkdir()
    (src / "train.csv").write_text("\n".join(TRAIN) + "\n")
    (src / "test.csv").write_text("\n".join(TEST) + "\n")
    return src


def test_columns_labels_and_groups_are_converted(tmp_path: Path, country: Path) -> None:
    result = convert_aliexpress(country, tmp_path / "out", AliExpressConfig(row_group_rows=2))
    train = pq.read_table(tmp_path / "out" / "train")
    assert train.column("categorical_1").to_pylist() == [3, 1, 0]
    assert train.column("numerical_2").to_pylist() == [10.0, 20.0, 30.0]
    assert train.column("click").to_pylist() == [1, 0, 1] and train.column(
        "conversion"
    ).to_pylist() == [1, 0, 0]
    assert train.column("group").to_pylist() == [100, 100, 101]
    assert pq.ParquetFile(next((tmp_path / "out" / "train").glob("*.parquet"))).num_row_groups == 2
    assert pq.read_table(tmp_path / "out" / "test").num_rows == 2
    assert (result.splits["train"].clicks, result.splits["test"].rows) == (2, 2)


def test_malformed_lines_are_counted_by_reason(tmp_path: Path, country: Path) -> None:
    result = convert_aliexpress(country, tmp_path / "out")
    assert result.malformed.counts == {
        "4 fields, the header has 7": 1,
        "search_id or a categorical value is not an integer": 1,
        "a numerical value is not a finite number": 1,
        "conversion without a click": 1,
        "a label is not 0/1": 1,
    }
    assert "train.csv, line 5: 4 fields" in result.malformed.examples[0]
    with pytest.raises(ConversionError, match=r"train\.csv, line 5: 4 fields"):
        convert_aliexpress(country, tmp_path / "strict", strict=True)


def test_schema_vocabularies_and_training_split_standardisation(
    tmp_path: Path, country: Path
) -> None:
    convert_aliexpress(country, tmp_path / "out", AliExpressConfig(dim=4))
    schema = load_schema(tmp_path / "out" / "schema.yaml")
    assert schema.table_of("categorical_1").vocab_size == 10  # largest value, 9, is in test
    assert schema.table_of("categorical_2").is_hashed  # -2: not an index
    numerical_2 = next(f for f in schema.dense if f.name == "numerical_2")
    assert numerical_2.normalization.kind is NormalizationKind.STANDARD
    assert numerical_2.normalization.mean == pytest.approx(20.0)  # training rows only
    assert numerical_2.normalization.std == pytest.approx(math.sqrt(200 / 3))
    assert schema.group == "group" and schema.table_of("categorical_1").dim == 4


def test_the_trainer_reader_reads_the_conversion(tmp_path: Path, country: Path) -> None:
    from trainer.data import ImpressionReader

    convert_aliexpress(country, tmp_path / "out")
    batch = next(
        iter(ImpressionReader.from_dataset(tmp_path / "out", "train", batch_size=8, shuffle=False))
    )
    expected = (np.array([10.0, 20.0, 30.0]) - 20.0) / math.sqrt(200 / 3)
    np.testing.assert_allclose(batch.dense[:, 1].numpy(), expected, rtol=1e-5)


def test_missing_files_and_headers_are_named(tmp_path: Path, country: Path) -> None:
    (country / "test.csv").write_text("search_id,categorical_1,numerical_1,click\n")
    with pytest.raises(ConversionError, match=r"test\.csv, line 1: header lacks \['conversion'\]"):
        convert_aliexpress(country, tmp_path / "out")
    (country / "test.csv").unlink()
    with pytest.raises(ConversionError, match=r"AliExpress files not found: .*test\.csv"):
        convert_aliexpress(country, tmp_path / "out")


def test_cli_converts_a_country(tmp_path: Path, country: Path) -> None:
    result = CliRunner().invoke(
        app, ["convert", "aliexpress", "--src", str(country), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert "malformed lines skipped: 5" in result.output
    assert (tmp_path / "c" / "conversion.json").is_file()
