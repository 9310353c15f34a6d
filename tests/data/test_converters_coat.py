"""Coat -> impression logs: the shipped copy converts to the papers' protocol; bad files are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import Result

from trainer.data.converters import COAT_DIR, ConversionError, MnarConfig, convert_coat
from trainer.data.converters.coat import read_coat
from trainer.data.converters.mnar import write_mnar_dataset


@pytest.fixture(scope="module")
def coat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coat")
    convert_coat(out)
    return out


def _raw(name: str) -> np.ndarray:
    return np.loadtxt(COAT_DIR / name, dtype=np.int64)


def test_the_shipped_files_are_coat() -> None:
    train, test = _raw("train.ascii"), _raw("test.ascii")
    assert train.shape == test.shape == (290, 300)
    assert (train > 0).sum() == 6_960 and (test > 0).sum() == 4_640
    assert (COAT_DIR / "README.md").read_text().count("Schnabel") >= 1


def test_train_is_every_user_item_pair_click_rated_conversion_at_least_3(coat: Path) -> None:
    table = pq.read_table(coat / "train")
    assert table.num_rows == 290 * 300
    user = table.column("user_id").to_numpy()
    item = table.column("item_id").to_numpy()
    assert len(set(zip(user.tolist(), item.tolist()))) == 290 * 300
    ratings = _raw("train.ascii")[user, item]
    np.testing.assert_array_equal(table.column("click").to_numpy(), ratings > 0)
    np.testing.assert_array_equal(table.column("conversion").to_numpy(), ratings >= 3)
    np.testing.assert_array_equal(table.column("group").to_numpy(), user)
    rating = table.column("rating")
    assert rating.null_count == 290 * 300 - 6_960
    assert rating.drop_null().to_numpy().sum() == ratings.sum()


def test_test_split_is_the_random_exposure_ratings(coat: Path) -> None:
    table = pq.read_table(coat / "test")
    raw = _raw("test.ascii")
    user, item = table.column("user_id").to_numpy(), table.column("item_id").to_numpy()
    assert table.num_rows == 4_640 and (raw[user, item] > 0).all()
    assert table.column("click").to_numpy().all()  # every test pair was exposed and rated
    np.testing.assert_array_equal(table.column("conversion").to_numpy(), raw[user, item] >= 3)
    assert table.column("conversion").to_numpy().sum() == 1_862


def test_attributes_are_the_index_of_the_one_hot_column_set(coat: Path) -> None:
    table = pq.read_table(coat / "train")
    users = _raw("user_features.ascii")  # gender 2, age 6, location 3, fashioninterest 3
    items = _raw("item_features.ascii")  # gender 2, jackettype 16, color 13, onfrontpage 2
    user, item = table.column("user_id").to_numpy(), table.column("item_id").to_numpy()
    np.testing.assert_array_equal(
        table.column("user_age").to_numpy(), users[user, 2:8].argmax(axis=1)
    )
    np.testing.assert_array_equal(
        table.column("item_color").to_numpy(), items[item, 18:31].argmax(axis=1)
    )
    record = json.loads((coat / "conversion.json").read_text())
    assert record["vocabularies"]["user_gender"] == ["men", "women"]
    assert record["vocabularies"]["item_onfrontpage"] == ["yes", "no"]
    assert record["malformed_lines"]["total"] == 0
    schema = (coat / "schema.yaml").read_text()
    for name, size in (
        ("user_id", 290),
        ("item_id", 300),
        ("item_jackettype", 16),
        ("user_location", 3),
    ):
        assert f"name: {name}\n  dim: 16\n  vocab_size: {size}\n" in schema


def test_the_trainer_reader_reads_the_conversion(coat: Path) -> None:
    from trainer.data import ImpressionReader

    reader = ImpressionReader.from_dataset(coat, "test", batch_size=1_000)
    batches = list(reader)
    assert sum(b.size for b in batches) == 4_640
    assert batches[0].sparse.keys()[:2] == ["user_id", "item_id"] and batches[0].dense.shape == (
        1_000,
        0,
    )
    assert reader.stats.oov_values == dict.fromkeys(reader.schema.sparse_names, 0)


def test_validation_split_is_a_seeded_share_of_pairs_independent_of_chunking(
    tmp_path: Path,
) -> None:
    source = read_coat()
    one = write_mnar_dataset(
        source, tmp_path / "a", MnarConfig(name="coat", validation_fraction=0.2, seed=5)
    )
    write_mnar_dataset(
        source,
        tmp_path / "b",
        MnarConfig(name="coat", validation_fraction=0.2, seed=5, row_group_rows=7_000),
    )
    assert one.splits["train"].rows + one.splits["valid"].rows == 87_000
    assert one.splits["train"].clicks + one.splits["valid"].clicks == 6_960
    assert 0.18 < one.splits["valid"].rows / 87_000 < 0.22

    def pairs(root: Path) -> set[tuple[int, int]]:
        table = pq.read_table(root / "valid", columns=["user_id", "item_id"])
        return set(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))

    assert pairs(tmp_path / "a") == pairs(tmp_path / "b")

    def row_groups(root: Path) -> int:
        return sum(pq.ParquetFile(p).num_row_groups for p in (root / "train").glob("*.parquet"))

    assert row_groups(tmp_path / "b") > row_groups(
        tmp_path / "a"
    )  # chunked differently, same split
    reseeded = write_mnar_dataset(
        source, tmp_path / "c", MnarConfig(name="coat", validation_fraction=0.2, seed=6)
    )
    assert pairs(tmp_path / "c") != pairs(tmp_path / "a") and reseeded.splits["test"].rows == 4_640


def test_a_validation_split_from_the_test_ratings_leaves_train_whole(tmp_path: Path) -> None:
    """``validation_from="test"``: valid/ is a seeded share of the random-exposure ratings (the
    BADR paper's Coat validation set), test/ the rest, train/ every pair as without a split."""
    cfg = MnarConfig(name="coat", validation_fraction=0.2, validation_from="test", seed=5)
    result = write_mnar_dataset(read_coat(), tmp_path / "a", cfg)
    assert result.splits["train"].rows == 87_000 and result.splits["train"].clicks == 6_960
    valid, test = (pq.read_table(tmp_path / "a" / split) for split in ("valid", "test"))
    assert valid.num_rows + test.num_rows == 4_640 and 0.17 < valid.num_rows / 4_640 < 0.23
    raw = _raw("test.ascii")

    def rated(table: pa.Table) -> dict[tuple[int, int], bool]:
        user, item = table.column("user_id").to_numpy(), table.column("item_id").to_numpy()
        assert table.column("click").to_numpy().all() and (raw[user, item] > 0).all()
        conversion = table.column("conversion").to_numpy()
        np.testing.assert_array_equal(conversion, raw[user, item] >= 3)
        return dict(zip(zip(user.tolist(), item.tolist()), conversion.tolist()))

    held_out, kept = rated(valid), rated(test)
    assert not held_out.keys() & kept.keys() and len(held_out) + len(kept) == 4_640
    assert sum(held_out.values()) + sum(kept.values()) == 1_862
    assert len({user for user, _ in held_out}) > 250  # drawn over all ratings, not by user
    again = write_mnar_dataset(read_coat(), tmp_path / "b", cfg)
    assert again.splits["valid"].rows == valid.num_rows
    assert rated(pq.read_table(tmp_path / "b" / "valid")) == held_out


def test_validation_from_must_name_a_split() -> None:
    with pytest.raises(ValueError, match=r"validation_from='valid'.*\['train', 'test'\]"):
        MnarConfig(validation_fraction=0.2, validation_from="valid")


def test_an_existing_conversion_is_not_overwritten_silently(coat: Path) -> None:
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_coat(coat)


def _copy(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    shutil.copytree(COAT_DIR, src)
    for path in src.iterdir():
        path.chmod(0o644)
    return src


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("file", "line", "text", "message"),
    [
        (
            "train.ascii",
            5,
            " ".join(["0"] * 299),
            r"train\.ascii, line 5: 299 values, expected 300",
        ),
        (
            "test.ascii",
            7,
            " ".join(["0"] * 299 + ["x"]),
            r"test\.ascii, line 7: 'x' is not an integer",
        ),
        (
            "train.ascii",
            2,
            " ".join(["0"] * 299 + ["6"]),
            r"train\.ascii, line 2: value 6 outside \[0, 5\]",
        ),
        (
            "user_features.ascii",
            3,
            "1 1 1 0 0 0 0 0 1 0 0 1 0 0",
            r"user_features\.ascii, line 3: more than one 'gender:' column",
        ),
        (
            "item_features_map.txt",
            4,
            "cropped",
            r"item_features_map\.txt, line 4: 'cropped' is not 'group:value'",
        ),
    ],
)
def test_a_malformed_coat_file_is_an_error_naming_file_and_line(
    tmp_path: Path, file: str, line: int, text: str, message: str
) -> None:
    src = _copy(tmp_path)
    _replace_line(src / file, line, text)
    with pytest.raises(ConversionError, match=message):
        convert_coat(tmp_path / "out", src)


def test_a_missing_coat_file_is_named(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    (src / "test.ascii").unlink()
    with pytest.raises(ConversionError, match=r"test\.ascii: cannot read"):
        convert_coat(tmp_path / "out", src)


def _convert_coat_cli(out: Path, *flags: str) -> Result:
    from typer.testing import CliRunner

    from trainer.data.__main__ import app

    return CliRunner().invoke(app, ["convert", "coat", "--out", str(out), *flags])


def test_cli_converts_the_shipped_coat(tmp_path: Path) -> None:
    result = _convert_coat_cli(tmp_path / "c", "--validation-fraction", "0.1", "--dim", "8")
    assert result.exit_code == 0, result.output
    assert "malformed lines: none" in result.output and "test    4,640   4,640" in result.output
    assert "dim: 8" in (tmp_path / "c" / "schema.yaml").read_text()
    assert (
        json.loads((tmp_path / "c" / "conversion.json").read_text())["config"][
            "validation_fraction"
        ]
        == 0.1
    )


def test_ids_only_keeps_user_and_item_ids(tmp_path: Path) -> None:
    result = convert_coat(tmp_path / "ids", attributes=False)
    assert result.schema.sparse_names == ["user_id", "item_id"]
    assert [f.scope.value for f in result.schema.sparse] == ["context", "candidate"]
    assert pq.read_table(tmp_path / "ids" / "train").num_rows == 87_000
    assert json.loads((tmp_path / "ids" / "conversion.json").read_text())["attributes"] is False


def test_cli_names_a_bad_validation_source_without_a_traceback(tmp_path: Path) -> None:
    result = _convert_coat_cli(
        tmp_path / "c", "--validation-fraction", "0.2", "--validation-from", "valid"
    )
    assert result.exit_code == 1
    assert "validation_from='valid'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()
