"""Ali-CCP (Alibaba Click and Conversion Prediction; Ma et al., ESMM, SIGIR 2018) as impression logs.

Expected files in ``SRC`` (the public release; tens of GB, streamed, never loaded whole)::

    sample_skeleton_train.csv   sample_id,click,conversion,common_feature_index,feature_num,feature_list
    common_features_train.csv   common_feature_index,feature_num,feature_list
    sample_skeleton_test.csv    (same, test split)
    common_features_test.csv

A ``feature_list`` holds ``feature_num`` features separated by ``\\x01``; a feature is
``field_id \\x02 feature_id \\x03 value``. The skeleton line carries the impression's item and
context features and points (``common_feature_index``) at a line of the common-features file
with the user's features; a sample's features are the union of both.

Conversion, per split: the common features are first streamed into an on-disk SQLite table
(a temporary file in ``OUT``, removed afterwards), then the skeleton is streamed and joined
with it, so memory holds one chunk of rows and a cache of recent users, whatever the file
sizes. Skeleton lines usually come grouped by user, so the cache hits.

The result (``python -m trainer.data convert aliccp --src SRC --out OUT``): ``OUT/train/`` and
``OUT/test/``, one column per field of :data:`ALICCP_FIELDS` (the 23 fields of the ESMM paper,
named below), ``click``, ``conversion``, ``group`` (the user id, field 101) and ``sample_id``.
Feature ids are global integers, so every field is hashed into its own table
(``hash_buckets`` below, override with ``--buckets FIELD=N``); single-valued fields are
``int64``, the four behaviour histories ``list<int64>`` (``max_len`` kept ids, the first
ones). Feature values (the ``\\x03`` part: counts in the histories, 1.0 elsewhere) are
dropped: the embedding bags are unweighted. A field missing from a sample is null (the
table's OOV row).

Malformed lines are counted per reason and skipped (``--strict`` stops at the first): a wrong
number of columns, a label that is not 0/1, a conversion without a click (the release has a
few; the ESMM / AITM preprocessing drops them too), a feature that is not
``field\\x02id\\x03value`` with an integer id, ``feature_num`` not matching the list, a
``common_feature_index`` absent from the common-features file (or present twice there), and a
sample without a user id (field 101), which the ``group`` column needs.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import pyarrow as pa

from schemas.features import FeatureSchema
from schemas.layout import TEST_SPLIT, TRAIN_SPLIT
from trainer.data.converters._output import (
    ConversionError,
    ConversionResult,
    MalformedLines,
    SplitWriter,
    finish_dataset,
    numbered_lines,
    prepare_dataset_dir,
)
from trainer.data.summary import LogSummary

__all__ = ["ALICCP_FIELDS", "AliCcpConfig", "AliCcpField", "convert_aliccp", "parse_features"]


@dataclass(frozen=True)
class AliCcpField:
    """One Ali-CCP field: its id in the raw files, its column name, its hashed table size.

    ``history`` fields are lists (a user's recent categories, shops, brands, intentions).
    """

    field_id: str
    name: str
    hash_buckets: int
    history: bool = False

    @property
    def scope(self) -> str:
        """``context`` for the user's fields (given once per ranking request), ``candidate`` for
        the item's, its match with the user's history and its position."""
        return "context" if self.name.startswith("user_") else "candidate"


# The 23 fields of the ESMM paper's Ali-CCP release, with the release's descriptions.
ALICCP_FIELDS: tuple[AliCcpField, ...] = (
    AliCcpField("101", "user_id", 1 << 20),  # user ID
    AliCcpField("109_14", "user_category_history", 1 << 15, history=True),  # category ID and count
    AliCcpField("110_14", "user_shop_history", 1 << 20, history=True),  # shop ID and count
    AliCcpField("127_14", "user_brand_history", 1 << 20, history=True),  # brand ID and count
    AliCcpField(
        "150_14", "user_intention_history", 1 << 18, history=True
    ),  # intention node ID and count
    AliCcpField("121", "user_profile_id", 1 << 12),  # categorical ID of the user profile
    AliCcpField("122", "user_group_id", 1 << 12),  # categorical group ID of the user profile
    AliCcpField("124", "user_gender", 1 << 12),
    AliCcpField("125", "user_age", 1 << 12),
    AliCcpField("126", "user_consumption_1", 1 << 12),  # consumption level, type I
    AliCcpField("127", "user_consumption_2", 1 << 12),  # consumption level, type II
    AliCcpField("128", "user_occupation", 1 << 12),  # whether the user works
    AliCcpField("129", "user_geography", 1 << 12),
    AliCcpField("205", "item_id", 1 << 21),
    AliCcpField("206", "item_category", 1 << 15),
    AliCcpField("207", "item_shop", 1 << 20),
    AliCcpField("210", "item_intention", 1 << 18),  # intention node of the item
    AliCcpField("216", "item_brand", 1 << 20),
    AliCcpField("508", "category_match", 1 << 15),  # combination of 109_14 and 206
    AliCcpField("509", "shop_match", 1 << 20),  # combination of 110_14 and 207
    AliCcpField("702", "brand_match", 1 << 20),  # combination of 127_14 and 216
    AliCcpField("853", "intention_match", 1 << 18),  # combination of 150_14 and 210
    AliCcpField("301", "position", 1 << 12),  # a categorical expression of position
)
_USER_FIELD = "101"
_SPLITS = (TRAIN_SPLIT, TEST_SPLIT)
_SKELETON_COLUMNS, _COMMON_COLUMNS = 6, 3


@dataclass(frozen=True)
class AliCcpConfig:
    """What to keep of Ali-CCP and how to lay it out.

    Raises:
        ValueError: (on construction) an unknown field name, a bucket override of an unknown
            field or below 1, a size below 1.
    """

    fields: tuple[str, ...] = tuple(f.name for f in ALICCP_FIELDS)  # column names to keep
    dim: int = 16  # embedding dimension of every field
    history_max_len: int = 50  # ids kept per history list
    buckets: Mapping[str, int] = field(default_factory=dict)  # field name -> hash buckets override
    row_group_rows: int = 100_000
    file_rows: int = 2_000_000
    cache_users: int = 100_000  # parsed common-feature lines kept in memory

    def __post_init__(self) -> None:
        known = {f.name for f in ALICCP_FIELDS}
        unknown = sorted((set(self.fields) | set(self.buckets)) - known)
        if unknown:
            raise ValueError(f"unknown Ali-CCP field(s) {unknown}; known: {sorted(known)}")
        if not self.fields:
            raise ValueError("fields: keep at least one Ali-CCP field")
        sizes = {
            "dim": self.dim,
            "history_max_len": self.history_max_len,
            "row_group_rows": self.row_group_rows,
            "file_rows": self.file_rows,
            "cache_users": self.cache_users,
            **{f"buckets[{name}]": n for name, n in self.buckets.items()},
        }
        small = {name: n for name, n in sizes.items() if n < 1}
        if small:
            raise ValueError(f"invalid Ali-CCP config: {small} (every size must be >= 1)")

    @property
    def kept(self) -> tuple[AliCcpField, ...]:
        return tuple(f for f in ALICCP_FIELDS if f.name in self.fields)


def parse_features(feature_list: str, expected: int) -> dict[str, list[int]]:
    """``field\\x02id\\x03value`` features separated by ``\\x01`` -> field id -> feature ids.

    Raises:
        ValueError: a feature without both separators, a non-integer id, a value that is not a
            number, or ``expected`` features announced but another number found.

    Example::

        parse_features("101\\x021234\\x031.0\\x01109_14\\x027\\x033.0", 2)
        # {"101": [1234], "109_14": [7]}
    """
    tokens = feature_list.split("\x01") if feature_list else []
    if len(tokens) != expected:
        raise ValueError(f"feature_num says {expected}, the list has {len(tokens)}")
    features: dict[str, list[int]] = {}
    for token in tokens:
        field_id, sep1, rest = token.partition("\x02")
        feature_id, sep2, value = rest.partition("\x03")
        if not (sep1 and sep2 and field_id):
            raise ValueError(f"feature {token[:40]!r} is not field\\x02id\\x03value")
        try:
            ids = int(feature_id)
            float(value)
        except ValueError:
            raise ValueError(f"feature {token[:40]!r}: id or value is not a number") from None
        features.setdefault(field_id, []).append(ids)
    return features


def convert_aliccp(
    src: str | Path,
    out_dir: str | Path,
    cfg: AliCcpConfig = AliCcpConfig(),
    *,
    strict: bool = False,
    overwrite: bool = False,
    max_lines: int | None = None,
) -> ConversionResult:
    """Join and convert the Ali-CCP files of ``src`` into ``out_dir/train`` and ``out_dir/test``.

    Args:
        src: directory with the four files named in the module docstring.
        out_dir: the data set directory, a local path or a storage URI.
        cfg: fields, embedding dimension, table sizes.
        strict: stop at the first malformed line instead of counting and skipping it.
        overwrite: replace part files already in ``out_dir``.
        max_lines: convert only the first ``max_lines`` skeleton lines of each split (a sample).

    Raises:
        ConversionError: a missing file, or (strict) a malformed line.
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    src = Path(src)
    files = {
        split: (src / f"sample_skeleton_{split}.csv", src / f"common_features_{split}.csv")
        for split in _SPLITS
    }
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise ConversionError(
            f"Ali-CCP files not found: {missing} (expected in {src}, see the module docstring)"
        )
    out = prepare_dataset_dir(out_dir, _SPLITS, overwrite)
    malformed = MalformedLines(strict=strict)
    arrow_schema = _arrow_schema(cfg)
    summaries: dict[str, LogSummary] = {}
    # The user table is a local SQLite file: beside a local output (it can be large), else in
    # the temporary directory.
    scratch = Path(out.path) if out.is_local else Path(tempfile.gettempdir())
    for split, (skeleton, common) in files.items():
        store = scratch / f".common_features_{split}.{uuid.uuid4().hex[:8]}.sqlite"
        try:
            with _CommonFeatures(store, cfg) as users:
                users.load(common, malformed)
                with SplitWriter(out.join(split), arrow_schema, file_rows=cfg.file_rows) as writer:
                    for table in _samples(skeleton, users, cfg, arrow_schema, malformed, max_lines):
                        writer.write(table)
                summaries[split] = writer.summary
        finally:
            store.unlink(missing_ok=True)
    record = {
        "converter": "aliccp",
        "source": {split: [str(p) for p in pair] for split, pair in files.items()},
        "config": {**asdict(cfg), "buckets": dict(cfg.buckets)},
        "max_lines": max_lines,
    }
    return finish_dataset(out, _schema(cfg), summaries, malformed, record, started)


class _CommonFeatures:
    """The user-side features of one split, by ``common_feature_index``, in an SQLite file."""

    def __init__(self, path: Path, cfg: AliCcpConfig) -> None:
        path.unlink(missing_ok=True)
        self.connection = sqlite3.connect(path)
        self.connection.execute(
            "CREATE TABLE common (key TEXT PRIMARY KEY, features TEXT NOT NULL)"
        )
        self.wanted = {f.field_id for f in cfg.kept} | {_USER_FIELD}
        self.lookup = functools.lru_cache(maxsize=cfg.cache_users)(self._fetch)

    def load(self, path: Path, malformed: MalformedLines) -> None:
        """Stream the common-features file in; malformed lines and repeated keys are counted."""
        with self.connection:  # one transaction
            for number, line in numbered_lines(path):
                columns = line.rstrip("\r\n").split(",")
                if len(columns) != _COMMON_COLUMNS:
                    malformed.add(
                        f"{len(columns)} columns, expected {_COMMON_COLUMNS}", path, number, line
                    )
                    continue
                key, count, feature_list = columns
                try:
                    features = parse_features(feature_list, int(count))
                except ValueError as err:
                    malformed.add(f"bad feature list: {err}", path, number, line)
                    continue
                kept = {k: v for k, v in features.items() if k in self.wanted}
                cursor = self.connection.execute(
                    "INSERT OR IGNORE INTO common VALUES (?, ?)",
                    (key, json.dumps(kept, separators=(",", ":"))),
                )
                if cursor.rowcount == 0:
                    malformed.add(
                        "common_feature_index seen on an earlier line (the first is kept)",
                        path,
                        number,
                        line,
                    )

    def _fetch(self, key: str) -> dict[str, list[int]] | None:
        row = self.connection.execute(
            "SELECT features FROM common WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()


def _samples(
    path: Path,
    users: _CommonFeatures,
    cfg: AliCcpConfig,
    arrow_schema: pa.Schema,
    malformed: MalformedLines,
    max_lines: int | None,
) -> Iterator[pa.Table]:
    """Tables of ``row_group_rows`` joined samples, streamed from the skeleton file."""
    kept = cfg.kept
    rows: dict[str, list] = {name: [] for name in arrow_schema.names}
    for number, line in numbered_lines(path):
        if max_lines is not None and number > max_lines:
            break
        sample = _join(path, number, line, users, malformed)
        if sample is None:
            continue
        sample_id, click, conversion, features = sample
        for f in kept:
            ids = features.get(f.field_id)
            rows[f.name].append(
                None if ids is None else ids[: cfg.history_max_len] if f.history else ids[0]
            )
        rows["click"].append(click)
        rows["conversion"].append(conversion)
        rows["group"].append(features[_USER_FIELD][0])
        rows["sample_id"].append(sample_id)
        if len(rows["click"]) == cfg.row_group_rows:
            yield pa.table(rows, schema=arrow_schema)
            rows = {name: [] for name in arrow_schema.names}
    if rows["click"]:
        yield pa.table(rows, schema=arrow_schema)


def _join(
    path: Path, number: int, line: str, users: _CommonFeatures, malformed: MalformedLines
) -> tuple[int, int, int, dict[str, list[int]]] | None:
    """One skeleton line joined with its user's features, or None (counted) if malformed."""
    columns = line.rstrip("\r\n").split(",")
    if len(columns) != _SKELETON_COLUMNS:
        malformed.add(f"{len(columns)} columns, expected {_SKELETON_COLUMNS}", path, number, line)
        return None
    sample_id, click, conversion, key, count, feature_list = columns
    if click not in ("0", "1") or conversion not in ("0", "1") or not sample_id.isdigit():
        malformed.add("sample_id not an integer or a label not 0/1", path, number, line)
        return None
    if conversion == "1" and click == "0":
        malformed.add("conversion without a click", path, number, line)
        return None
    try:
        features = parse_features(feature_list, int(count))
    except ValueError as err:
        malformed.add(f"bad feature list: {err}", path, number, line)
        return None
    common = users.lookup(key)
    if common is None:
        malformed.add("common_feature_index not in the common-features file", path, number, line)
        return None
    joined = {**common, **features}
    if _USER_FIELD not in joined:
        malformed.add("no user id (field 101)", path, number, line)
        return None
    return int(sample_id), int(click), int(conversion), joined


def _arrow_schema(cfg: AliCcpConfig) -> pa.Schema:
    fields = [pa.field(f.name, pa.list_(pa.int64()) if f.history else pa.int64()) for f in cfg.kept]
    fields += [
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
        pa.field("group", pa.int64()),
        pa.field("sample_id", pa.int64()),
    ]
    return pa.schema(fields)


def _schema(cfg: AliCcpConfig) -> FeatureSchema:
    sparse = []
    for f in cfg.kept:
        feature: dict[str, object] = {
            "name": f.name,
            "dtype": "int",
            "hash_buckets": cfg.buckets.get(f.name, f.hash_buckets),
            "dim": cfg.dim,
            "scope": f.scope,
        }
        if f.history:
            feature.update(multi_valued=True, max_len=cfg.history_max_len)
        sparse.append(feature)
    return FeatureSchema.from_dict(
        {
            "name": "aliccp",
            "sparse": sparse,
            "labels": {"click": "click", "conversion": "conversion"},
            "group": "group",
        },
        source="Ali-CCP conversion",
    )
