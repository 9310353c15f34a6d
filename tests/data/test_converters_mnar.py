"""The generic MNAR rating converter on tiny rating files written here, in the raw formats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from schemas.features import load_schema
from trainer.data.__main__ import app
from trainer.data.converters import ConversionError, MnarConfig, TripleFormat, convert_ratings

# Yahoo! R3 layout: "user item rating", whitespace separated. Users 1, 2, 5; items 10, 20, 30.
TRAIN = """\
1 10 5
1 20 2
2 30 4

5 10 3
2 30 1
bad line
5 20 x
"""
TEST = """\
1 30 4
2 10 2
5 30 5
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def ratings(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path, "train.txt", TRAIN), _write(tmp_path, "test.txt", TEST)


def _rows(root: Path, split: str) -> dict[tuple, dict]:
    table = pq.read_table(root / split).to_pylist()
    return {(row["user_id"], row["item_id"]): row for row in table}


def test_impression_space_is_users_times_items_with_clicks_and_thresholded_conversions(
    tmp_path: Path, ratings: tuple[Path, Path]
) -> None:
    result = convert_ratings(*ratings, tmp_path / "out", MnarConfig(threshold=3))
    train = _rows(tmp_path / "out", "train")
    assert set(train) == {(u, i) for u in (1, 2, 5) for i in (10, 20, 30)}
    clicked = {pair: row["rating"] for pair, row in train.items() if row["click"]}
    assert clicked == {
        (1, 10): 5.0,
        (1, 20): 2.0,
        (2, 30): 4.0,
        (5, 10): 3.0,
    }  # the first 2-30 kept
    assert {pair for pair, row in train.items() if row["conversion"]} == {(1, 10), (2, 30), (5, 10)}
    assert all(row["rating"] is None for pair, row in train.items() if not row["click"])
    assert all(row["group"] == pair[0] for pair, row in train.items())
    test = _rows(tmp_path / "out", "test")
    assert {pair: (row["click"], row["conversion"]) for pair, row in test.items()} == {
        (1, 30): (1, 1),
        (2, 10): (1, 0),
        (5, 30): (1, 1),
    }
    assert (result.splits["train"].rows, result.splits["train"].clicks) == (9, 4)


def test_malformed_lines_are_counted_with_their_line_numbers(
    tmp_path: Path, ratings: tuple[Path, Path]
) -> None:
    result = convert_ratings(*ratings, tmp_path / "out")
    assert result.malformed.counts == {
        "fewer than 3 fields": 1,
        "rating is not a finite number": 1,
        "(user, item) pair rated on an earlier line (the first rating is kept)": 1,
    }
    examples = "\n".join(result.malformed.examples)
    assert "train.txt, line 7: fewer than 3 fields: 'bad line'" in examples
    assert "train.txt, line 8: rating is not a finite number: '5 20 x'" in examples
    assert "train.txt, line 6: (user, item) pair rated on an earlier line" in examples
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["malformed_lines"]["total"] == 3
    assert "malformed lines skipped: 3" in result.format()


def test_strict_stops_at_the_first_malformed_line(
    tmp_path: Path, ratings: tuple[Path, Path]
) -> None:
    from trainer.data.converters import MalformedLines
    from trainer.data.converters.mnar import read_triples

    with pytest.raises(ConversionError, match=r"train\.txt, line 7: fewer than 3 fields.*strict"):
        read_triples(ratings[0], malformed=MalformedLines(strict=True))
    with pytest.raises(ConversionError, match=r"line 7"):
        convert_ratings(*ratings, tmp_path / "out", strict=True)


def test_named_columns_string_ids_and_attribute_tables(tmp_path: Path) -> None:
    # KuaiRec-like CSV with a header, string ids, and attribute tables with a missing row and value.
    train = _write(
        tmp_path, "big.csv", "uid,vid,other,watch_ratio\nu1,v1,a,2.5\nu2,v2,b,0.4\nu2,v1,c,3\n"
    )
    test = _write(tmp_path, "small.csv", "uid,vid,other,watch_ratio\nu1,v2,a,1.0\nu3,v1,b,2.0\n")
    users = _write(tmp_path, "users.csv", "uid,age band,city\nu1,3,paris\nu2,,lyon\n")
    items = _write(tmp_path, "items.csv", "vid,genre\nv1,7\nv2,8\nv2,9\n")
    fmt = TripleFormat(delimiter=",", header=True, user="uid", item="vid", rating="watch_ratio")
    result = convert_ratings(
        train,
        test,
        tmp_path / "out",
        MnarConfig(threshold=2.0, name="kuai"),
        fmt=fmt,
        user_attributes=users,
        item_attributes=items,
        attribute_id_column=None,
    )
    rows = _rows(tmp_path / "out", "train")
    assert len(rows) == 3 * 2  # users u1 u2 u3 (u3 only in test) x items v1 v2
    assert rows[("u1", "v1")]["conversion"] == 1 and rows[("u2", "v2")]["conversion"] == 0
    assert rows[("u2", "v1")]["user_age_band"] is None  # empty value
    assert (
        rows[("u3", "v1")]["user_city"] is None and rows[("u3", "v1")]["click"] == 0
    )  # no attribute row
    assert rows[("u1", "v2")]["user_city"] == "paris" and rows[("u1", "v2")]["item_genre"] == 8
    assert result.malformed.counts == {"id seen on an earlier line (the first is kept)": 1}
    schema = load_schema(tmp_path / "out" / "schema.yaml")
    assert schema.name == "kuai"
    user_id = schema.sparse_feature("user_id")
    assert user_id.dtype.value == "string" and schema.table_of("user_id").hash_buckets == 64
    assert schema.table_of("user_age_band").vocab_size == 4  # integers: max 3 + 1
    assert schema.table_of("user_city").is_hashed  # strings
    assert schema.table_of("item_genre").vocab_size == 9
    scopes = {f.name: f.scope.value for f in schema.sparse}  # the user once, each item apart
    assert scopes == {
        name: "context" if name.startswith("user_") else "candidate" for name in scopes
    }


def test_the_trainer_reader_reads_a_string_id_conversion(tmp_path: Path) -> None:
    from trainer.data import ImpressionReader

    train = _write(tmp_path, "t.tsv", "a\tx\t4\nb\ty\t1\n")
    test = _write(tmp_path, "e.tsv", "a\ty\t5\n")
    convert_ratings(train, test, tmp_path / "out", fmt=TripleFormat(delimiter="\t"))
    batch = next(iter(ImpressionReader.from_dataset(tmp_path / "out", "train", batch_size=10)))
    assert batch.size == 4 and batch.click.sum().item() == 2 and batch.group is not None


def test_header_without_the_named_column_is_an_error(tmp_path: Path) -> None:
    train = _write(tmp_path, "t.csv", "user,item,score\n1,2,3\n")
    fmt = TripleFormat(delimiter=",", header=True, user="user", item="item", rating="rating")
    with pytest.raises(ConversionError, match=r"t\.csv, line 1: no rating column 'rating'"):
        convert_ratings(train, train, tmp_path / "out", fmt=fmt)


def test_a_file_without_a_single_rating_is_an_error(
    tmp_path: Path, ratings: tuple[Path, Path]
) -> None:
    empty = _write(tmp_path, "empty.txt", "\n\nnot a rating\n")
    with pytest.raises(ConversionError, match=r"empty\.txt: no rating could be read"):
        convert_ratings(ratings[0], empty, tmp_path / "out")


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="validation_fraction=1.0"):
        MnarConfig(validation_fraction=1.0)
    with pytest.raises(ValueError, match="is a name: set header=True"):
        TripleFormat(user="uid")


def test_cli_converts_ratings_and_reports_malformed_lines(
    tmp_path: Path, ratings: tuple[Path, Path]
) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "ratings",
            "--train",
            str(ratings[0]),
            "--test",
            str(ratings[1]),
            "--out",
            str(out),
            "--threshold",
            "4",
            "--validation-fraction",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "malformed lines skipped: 3" in result.output and "train.txt, line 7" in result.output
    assert {p.name for p in out.iterdir()} == {
        "schema.yaml",
        "conversion.json",
        "train",
        "valid",
        "test",
    }
    failed = CliRunner().invoke(
        app,
        [
            "convert",
            "ratings",
            "--train",
            str(ratings[0]),
            "--test",
            str(ratings[1]),
            "--out",
            str(out),
        ],
    )
    assert failed.exit_code == 1 and "--overwrite" in failed.output
