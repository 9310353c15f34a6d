"""Ali-CCP -> impression logs on tiny files in the release's exact raw format, written here."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from schemas.features import load_schema
from trainer.data.__main__ import app
from trainer.data.converters import AliCcpConfig, ConversionError, convert_aliccp
from trainer.data.converters.aliccp import parse_features


def _features(*features: tuple[str, int, float]) -> str:
    """``field\\x02id\\x03value`` joined by ``\\x01``, as in the release."""
    return "\x01".join(f"{field}\x02{feature}\x03{value}" for field, feature, value in features)


def _skeleton(
    sample_id: int, click: int, conversion: int, key: str, *features: tuple[str, int, float]
) -> str:
    return f"{sample_id},{click},{conversion},{key},{len(features)},{_features(*features)}"


def _common(key: str, *features: tuple[str, int, float]) -> str:
    return f"{key},{len(features)},{_features(*features)}"


USER_A = _common(
    "aaa",
    ("101", 501, 1.0),
    ("124", 9001, 1.0),
    ("109_14", 71, 3.0),
    ("109_14", 72, 1.0),
    ("109_14", 73, 2.0),
)
USER_B = _common("bbb", ("101", 502, 1.0), ("125", 9101, 1.0))
ITEM_1 = (("205", 7001, 1.0), ("206", 8001, 1.0), ("301", 1, 1.0))
ITEM_2 = (("205", 7002, 1.0), ("216", 8101, 1.0))

TRAIN_SKELETON = [
    _skeleton(1, 1, 1, "aaa", *ITEM_1),
    _skeleton(2, 0, 0, "aaa", *ITEM_2),
    _skeleton(3, 1, 0, "bbb", *ITEM_2),
    "4,1,0,aaa,2",  # 5 columns
    _skeleton(5, 0, 1, "bbb", *ITEM_1),  # conversion without a click
    _skeleton(6, 2, 0, "bbb", *ITEM_1),  # label not 0/1
    "7,1,0,bbb,3," + _features(*ITEM_1[:2]),  # feature_num says 3, the list has 2
    "8,1,0,bbb,1,205\x027001",  # no \x03 value
    _skeleton(9, 1, 0, "zzz", *ITEM_1),  # unknown common_feature_index
    _skeleton(10, 0, 0, "ccc", *ITEM_1),  # a user without field 101
]
TRAIN_COMMON = [
    USER_A,
    USER_B,
    _common("ccc", ("124", 9002, 1.0)),
    _common("aaa", ("101", 999, 1.0)),
    "ddd,2",
]
TEST_SKELETON = [_skeleton(11, 1, 0, "bbb", *ITEM_1)]
TEST_COMMON = [USER_B]


@pytest.fixture
def aliccp_dir(tmp_path: Path) -> Path:
    src = tmp_path / "aliccp"
    src.mkdir()
    for name, lines in (
        ("sample_skeleton_train.csv", TRAIN_SKELETON),
        ("common_features_train.csv", TRAIN_COMMON),
        ("sample_skeleton_test.csv", TEST_SKELETON),
        ("common_features_test.csv", TEST_COMMON),
    ):
        (src / name).write_text("\n".join(lines) + "\n")
    return src


def test_parse_features_groups_ids_by_field() -> None:
    assert parse_features(
        _features(("101", 5, 1.0), ("109_14", 7, 2.0), ("109_14", 8, 1.0)), 3
    ) == {"101": [5], "109_14": [7, 8]}
    with pytest.raises(ValueError, match="feature_num says 2, the list has 1"):
        parse_features(_features(("101", 5, 1.0)), 2)
    with pytest.raises(ValueError, match="id or value is not a number"):
        parse_features("101\x02abc\x031.0", 1)


def test_samples_are_joined_with_their_user_features(tmp_path: Path, aliccp_dir: Path) -> None:
    cfg = AliCcpConfig(history_max_len=2)
    result = convert_aliccp(aliccp_dir, tmp_path / "out", cfg)
    rows = {row["sample_id"]: row for row in pq.read_table(tmp_path / "out" / "train").to_pylist()}
    assert sorted(rows) == [1, 2, 3]
    first = rows[1]
    assert (first["click"], first["conversion"], first["group"]) == (1, 1, 501)
    assert (
        first["user_id"],
        first["user_gender"],
        first["item_id"],
        first["item_category"],
        first["position"],
    ) == (501, 9001, 7001, 8001, 1)
    assert first["user_category_history"] == [71, 72]  # history_max_len 2: the first ids
    assert first["item_brand"] is None and first["user_age"] is None  # absent fields are null
    assert (rows[3]["user_id"], rows[3]["user_age"], rows[3]["item_brand"]) == (502, 9101, 8101)
    assert rows[3]["user_category_history"] is None
    test = pq.read_table(tmp_path / "out" / "test").to_pylist()
    assert [(r["sample_id"], r["user_id"]) for r in test] == [(11, 502)]
    assert (
        result.splits["train"].rows,
        result.splits["train"].clicks,
        result.splits["train"].conversions,
    ) == (3, 2, 1)
    assert not list((tmp_path / "out").glob(".common_features_*"))  # the join store is removed


def test_every_malformed_line_is_counted_by_reason(tmp_path: Path, aliccp_dir: Path) -> None:
    result = convert_aliccp(aliccp_dir, tmp_path / "out")
    counts = result.malformed.counts
    assert counts["5 columns, expected 6"] == 1
    assert counts["conversion without a click"] == 1
    assert counts["sample_id not an integer or a label not 0/1"] == 1
    assert counts["bad feature list: feature_num says 3, the list has 2"] == 1
    assert counts["common_feature_index not in the common-features file"] == 1
    assert counts["no user id (field 101)"] == 1
    assert counts["common_feature_index seen on an earlier line (the first is kept)"] == 1
    assert counts["2 columns, expected 3"] == 1  # common-features line "ddd,2"
    assert sum(v for k, v in counts.items() if "is not field" in k) == 1
    assert result.malformed.total == 9 == len(TRAIN_SKELETON) - 3 + 2
    assert (
        "sample_skeleton_train.csv, line 4: 5 columns, expected 6" in result.malformed.examples[2]
    )


def test_strict_stops_at_the_first_malformed_line(tmp_path: Path, aliccp_dir: Path) -> None:
    with pytest.raises(
        ConversionError, match=r"common_features_train\.csv, line 4: common_feature_index seen"
    ):
        convert_aliccp(aliccp_dir, tmp_path / "out", strict=True)


def test_schema_hashes_each_kept_field_and_the_reader_reads_it(
    tmp_path: Path, aliccp_dir: Path
) -> None:
    from trainer.data import ImpressionReader

    cfg = AliCcpConfig(
        fields=("user_id", "user_category_history", "item_id"), buckets={"item_id": 1000}, dim=8
    )
    convert_aliccp(aliccp_dir, tmp_path / "out", cfg)
    schema = load_schema(tmp_path / "out" / "schema.yaml")
    assert schema.sparse_names == ["user_id", "user_category_history", "item_id"]
    assert schema.table_of("item_id").hash_buckets == 1000 and schema.table_of("user_id").dim == 8
    history = schema.sparse_feature("user_category_history")
    assert history.multi_valued and history.max_len == cfg.history_max_len
    # a ranking request gives the user's fields once, the item's per candidate
    assert [f.scope.value for f in schema.sparse] == ["context", "context", "candidate"]
    reader = ImpressionReader.from_dataset(tmp_path / "out", "train", batch_size=8)
    batch = next(iter(reader))
    assert batch.size == 3 and reader.stats.oov_values["user_category_history"] == 0
    lengths = sorted(batch.sparse["user_category_history"].lengths().tolist())
    assert lengths == [0, 3, 3]  # user aaa's three ids on samples 1 and 2; user bbb has none


def test_missing_files_and_bad_configs_are_named(tmp_path: Path, aliccp_dir: Path) -> None:
    (aliccp_dir / "common_features_test.csv").unlink()
    with pytest.raises(ConversionError, match=r"common_features_test\.csv"):
        convert_aliccp(aliccp_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown Ali-CCP field\(s\) \['nope'\]"):
        AliCcpConfig(fields=("user_id", "nope"))
    with pytest.raises(ValueError, match=r"buckets\[item_id\]"):
        AliCcpConfig(buckets={"item_id": 0})


def test_cli_converts_a_sample_of_lines(tmp_path: Path, aliccp_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "aliccp",
            "--src",
            str(aliccp_dir),
            "--out",
            str(tmp_path / "cli"),
            "--max-lines",
            "2",
            "--fields",
            "user_id,item_id",
            "--buckets",
            "item_id=4096",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "cli" / "train").num_rows == 2
    assert "malformed lines skipped: 2" in result.output  # the two in the common-features file
    bad = CliRunner().invoke(
        app,
        [
            "convert",
            "aliccp",
            "--src",
            str(aliccp_dir),
            "--out",
            str(tmp_path / "x"),
            "--buckets",
            "item_id",
        ],
    )
    assert bad.exit_code == 1 and "expected FIELD=N" in bad.output
