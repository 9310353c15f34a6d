"""Any MNAR rating log with a random-exposure test set, as impression logs over user x item.

The input is the shape of Coat, Yahoo! R3 and KuaiRec: ratings users chose to give (missing not
at random), and ratings of items shown to users at random. With threshold ``t``:

=============== ======================================================================
split           rows
=============== ======================================================================
``train``       every (user, item) pair of the impression space, users x items:
                ``click = 1`` where the user rated the item in the training ratings,
                ``conversion = 1`` where that rating is ``>= t`` (0 where not rated)
``valid``       optional: a seeded share of the pairs, taken out of ``train`` whole
                (clicked and unclicked alike), with the same labels, for tuning
``test``        the random-exposure ratings: ``click = 1`` (every pair was exposed and
                rated), ``conversion = 1`` where the rating is ``>= t``
=============== ======================================================================

Columns: ``user_id``, ``item_id`` (raw ids: integers when every id is one, else strings), one
column per user attribute (``user_<name>``) and item attribute (``item_<name>``), ``click``,
``conversion``, ``group`` (the user id, for per-user metrics) and ``rating`` (the raw rating,
null where there is none). The users and items are those of the training and test ratings
together, unless the caller fixes them (Coat: 290 x 300). The user's features have
``scope: context`` and the item's ``scope: candidate`` (a ranking request gives the user once).

Because the test pairs were exposed at random, ranking them by pCVR measures how well a model
ranks the whole impression space, not only the clicked part; the trainer's ``cvr_auc`` on the
test split is the AUC of the BADR / Adap-SL protocol (every test row is "clicked"), and
``data.ranking_k`` adds their per-user NDCG@k / Recall@k.

Run it::

    python -m trainer.data convert ratings --train R3/train.txt --test R3/test.txt \\
        --threshold 4 --out data/yahoo_r3
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.features import FeatureSchema
from schemas.hashing import splitmix64
from schemas.layout import TEST_SPLIT, TRAIN_SPLIT, VALID_SPLIT
from trainer.data.converters._output import (
    ConversionError,
    ConversionResult,
    MalformedLines,
    SplitWriter,
    finish_dataset,
    hash_buckets_for,
    numbered_lines,
    prepare_dataset_dir,
)

__all__ = [
    "AttributeTable",
    "MnarConfig",
    "RatingsSource",
    "TripleFormat",
    "Triples",
    "convert_ratings",
    "read_attribute_table",
    "read_triples",
    "write_mnar_dataset",
]

# Integer ids and attribute values up to this bound index an embedding table directly
# (vocab_size = max + 1); anything else is hashed.
_MAX_VOCAB = 1 << 22
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class TripleFormat:
    """How a (user, item, rating) file is laid out.

    ``user``, ``item`` and ``rating`` are 0-based column positions, or column names when the
    file has a header line.

    Example::

        TripleFormat()                                   # "12 345 4" per line (Yahoo! R3)
        TripleFormat(delimiter=",", header=True, user="user_id", item="video_id",
                     rating="watch_ratio")               # KuaiRec's big_matrix.csv
    """

    delimiter: str | None = None  # None: runs of whitespace
    header: bool = False  # the first line names the columns
    user: int | str = 0
    item: int | str = 1
    rating: int | str = 2

    def __post_init__(self) -> None:
        for role in ("user", "item", "rating"):
            column = getattr(self, role)
            if isinstance(column, str) and not self.header:
                raise ValueError(f"{role} column {column!r} is a name: set header=True")
            if isinstance(column, int) and column < 0:
                raise ValueError(f"{role} column must be >= 0, got {column}")
        if self.delimiter == "":
            raise ValueError("delimiter must be a non-empty string or None (whitespace)")


@dataclass(frozen=True)
class Triples:
    """Ratings as read: one entry per kept line.

    Attributes:
        path: the file they come from (for messages).
        users: raw user ids, ``int64`` or ``object`` (str).
        items: raw item ids, same convention.
        ratings: ``float64`` ratings.
        lines: 1-based source line of each rating.
    """

    path: str
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.ratings)


@dataclass(frozen=True)
class AttributeTable:
    """Categorical attributes of users (or items): one row per id, one array per attribute.

    Attributes:
        path: where they come from.
        ids: raw ids, ``int64`` or ``object`` (str).
        columns: attribute name -> ``pa.Array`` of ``int64`` or ``string`` values aligned with
            ``ids``, null where unknown.
        vocabularies: attribute name -> the names of its integer values ``0..k-1``, when known
            (then the table has exactly ``k`` rows).
    """

    path: str
    ids: np.ndarray
    columns: dict[str, pa.Array]
    vocabularies: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RatingsSource:
    """Everything a conversion reads, already parsed.

    Attributes:
        train: the self-selected ratings (clicks).
        test: the random-exposure ratings.
        users: the impression space's users (raw ids), or None for those of train and test.
        items: its items, or None likewise.
        user_attributes: optional user attribute table.
        item_attributes: optional item attribute table.
        malformed: the lines skipped while reading (conversion adds duplicate pairs).
    """

    train: Triples
    test: Triples
    users: np.ndarray | None = None
    items: np.ndarray | None = None
    user_attributes: AttributeTable | None = None
    item_attributes: AttributeTable | None = None
    malformed: MalformedLines = field(default_factory=MalformedLines)


VALIDATION_SOURCES = (TRAIN_SPLIT, TEST_SPLIT)  # the splits valid/ may be drawn from


@dataclass(frozen=True)
class MnarConfig:
    """How ratings become impressions.

    Raises:
        ValueError: (on construction) a field out of range, naming it.
    """

    threshold: float = 3.0  # conversion = rating >= threshold
    dim: int = 16  # embedding dimension of every feature in the schema
    validation_fraction: float = 0.0  # share of pairs moved to valid/ (from validation_from)
    # where valid/ is drawn from: "train" (the self-selected pairs: tuning never sees a
    # random-exposure rating) or "test" (the random-exposure ratings, as the BADR paper splits
    # Coat's: test/ keeps the rest)
    validation_from: str = TRAIN_SPLIT
    seed: int = 0  # seeds the validation split (nothing else is random)
    name: str = "mnar_ratings"  # schema name
    row_group_rows: int = 200_000  # rows per row group, about (whole users per group)
    file_rows: int = 2_000_000  # rows per part file at most

    def __post_init__(self) -> None:
        checks = {
            "threshold": math.isfinite(self.threshold),
            "dim": self.dim >= 1,
            "validation_fraction": 0.0 <= self.validation_fraction < 1.0,
            "validation_from": self.validation_from in VALIDATION_SOURCES,
            "row_group_rows": self.row_group_rows >= 1,
            "file_rows": self.file_rows >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"invalid MNAR conversion config: {values} (need a finite threshold, dim >= 1, "
                f"0 <= validation_fraction < 1, validation_from one of {list(VALIDATION_SOURCES)}, "
                "row_group_rows and file_rows >= 1)"
            )


# Reading -----------------------------------------------------------------------------------------


def read_triples(
    path: str | Path, fmt: TripleFormat = TripleFormat(), malformed: MalformedLines | None = None
) -> Triples:
    """Read a (user, item, rating) file; malformed lines are counted in ``malformed`` and skipped.

    Blank lines are ignored. A line is malformed when it has too few fields, an empty id, or a
    rating that is not a finite number.

    Raises:
        ConversionError: the file cannot be read, its header lacks a named column, or (strict
            ``malformed``) a line is malformed.
    """
    path = Path(path)
    malformed = malformed if malformed is not None else MalformedLines()
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    numbers: list[int] = []
    positions: tuple[int, int, int] | None = (
        None if fmt.header else (fmt.user, fmt.item, fmt.rating)
    )  # type: ignore[assignment]
    for number, line in numbered_lines(path):
        fields = _split(line, fmt.delimiter)
        if positions is None:
            positions = _header_positions(path, fields, fmt)
            continue
        if len(fields) <= max(positions):
            malformed.add(f"fewer than {max(positions) + 1} fields", path, number, line)
            continue
        user, item, rating_text = (fields[p] for p in positions)
        if not user or not item:
            malformed.add("empty user or item id", path, number, line)
            continue
        rating = _float(rating_text)
        if rating is None:
            malformed.add("rating is not a finite number", path, number, line)
            continue
        users.append(user)
        items.append(item)
        ratings.append(rating)
        numbers.append(number)
    if positions is None:
        raise ConversionError(f"{path}: empty file, expected a header line")
    return Triples(
        path=str(path),
        users=_ids(users),
        items=_ids(items),
        ratings=np.asarray(ratings, dtype=np.float64),
        lines=np.asarray(numbers, dtype=np.int64),
    )


def read_attribute_table(
    path: str | Path,
    *,
    id_column: str | None = None,
    delimiter: str | None = ",",
    malformed: MalformedLines | None = None,
) -> AttributeTable:
    """Read a table of categorical attributes with a header line: an id column, then attributes.

    Every column but the id is an attribute; an empty field is a missing value. A line with
    the wrong number of fields or an id seen before is malformed (counted and skipped).

    Args:
        path: the file.
        id_column: the id column's name; default the first column.
        delimiter: the field separator (None: runs of whitespace).
        malformed: where to count malformed lines.

    Raises:
        ConversionError: unreadable or empty file, an unknown ``id_column``, no attribute column.
    """
    path = Path(path)
    malformed = malformed if malformed is not None else MalformedLines()
    header: list[str] | None = None
    id_at = 0
    ids: list[str] = []
    rows: list[list[str]] = []
    seen: set[str] = set()
    for number, line in numbered_lines(path):
        fields = _split(line, delimiter)
        if header is None:
            header = fields
            if id_column is not None:
                if id_column not in header:
                    raise ConversionError(
                        f"{path}, line {number}: no column {id_column!r} in {header}"
                    )
                id_at = header.index(id_column)
            if len(header) < 2:
                raise ConversionError(
                    f"{path}, line {number}: an id column and at least one attribute are needed"
                )
            continue
        if len(fields) != len(header):
            malformed.add(f"{len(fields)} fields, the header has {len(header)}", path, number, line)
            continue
        if not fields[id_at]:
            malformed.add("empty id", path, number, line)
            continue
        if fields[id_at] in seen:
            malformed.add("id seen on an earlier line (the first is kept)", path, number, line)
            continue
        seen.add(fields[id_at])
        ids.append(fields[id_at])
        rows.append(fields)
    if header is None:
        raise ConversionError(f"{path}: empty file, expected a header line")
    columns = {
        name: _attribute_array([row[j] for row in rows])
        for j, name in enumerate(header)
        if j != id_at
    }
    return AttributeTable(path=str(path), ids=_ids(ids), columns=columns)


def _split(line: str, delimiter: str | None) -> list[str]:
    return [f.strip() for f in line.rstrip("\r\n").split(delimiter)] if delimiter else line.split()


def _header_positions(path: Path, header: list[str], fmt: TripleFormat) -> tuple[int, int, int]:
    positions = []
    for role in ("user", "item", "rating"):
        column = getattr(fmt, role)
        if isinstance(column, int):
            positions.append(column)
        elif column in header:
            positions.append(header.index(column))
        else:
            raise ConversionError(
                f"{path}, line 1: no {role} column {column!r} in the header {header}"
            )
    return positions[0], positions[1], positions[2]


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ids(tokens: Sequence[str]) -> np.ndarray:
    """``int64`` when every token is an integer, else the strings (``object``)."""
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        return np.array(tokens, dtype=object)


def _attribute_array(values: list[str]) -> pa.Array:
    """Integer values when every present value is a non-negative integer, else strings."""
    present = [v for v in values if v]
    try:
        ints = [int(v) for v in present]
    except ValueError:
        ints = None
    if ints is not None and all(0 <= v < _MAX_VOCAB for v in ints):
        return pa.array([int(v) if v else None for v in values], pa.int64())
    return pa.array([v if v else None for v in values], pa.string())


# Conversion --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Space:
    """The impression space and the ratings as (user index, item index) pairs."""

    users: np.ndarray
    items: np.ndarray
    train_pairs: np.ndarray  # sorted linear indices user * num_items + item, no duplicates
    train_ratings: np.ndarray
    test_pairs: np.ndarray
    test_ratings: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.items)


def convert_ratings(
    train: str | Path,
    test: str | Path,
    out_dir: str | Path,
    cfg: MnarConfig = MnarConfig(),
    *,
    fmt: TripleFormat = TripleFormat(),
    user_attributes: str | Path | None = None,
    item_attributes: str | Path | None = None,
    attribute_id_column: str | None = None,
    attribute_delimiter: str | None = ",",
    strict: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Read (user, item, rating) files (and attribute tables) and write the data set.

    Args:
        train: the self-selected ratings.
        test: the random-exposure ratings (same format).
        out_dir: the data set directory, a local path or a storage URI.
        cfg: threshold, embedding dimension, validation split.
        fmt: the layout of both rating files.
        user_attributes: optional table of user attributes (header line, id column first).
        item_attributes: optional table of item attributes.
        attribute_id_column: the id column of the attribute tables (default: the first).
        attribute_delimiter: their separator.
        strict: stop at the first malformed line instead of counting and skipping it.
        overwrite: replace part files already in ``out_dir``.

    Raises:
        ConversionError: unreadable input, or (strict) a malformed line.
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.

    Example::

        result = convert_ratings("R3/train.txt", "R3/test.txt", "data/r3", MnarConfig(threshold=4))
        print(result.format())
    """
    malformed = MalformedLines(strict=strict)
    tables = [
        None
        if path is None
        else read_attribute_table(
            path, id_column=attribute_id_column, delimiter=attribute_delimiter, malformed=malformed
        )
        for path in (user_attributes, item_attributes)
    ]
    source = RatingsSource(
        train=read_triples(train, fmt, malformed),
        test=read_triples(test, fmt, malformed),
        user_attributes=tables[0],
        item_attributes=tables[1],
        malformed=malformed,
    )
    return write_mnar_dataset(
        source, out_dir, cfg, overwrite=overwrite, record={"format": asdict(fmt)}
    )


def write_mnar_dataset(
    source: RatingsSource,
    out_dir: str | Path,
    cfg: MnarConfig,
    *,
    overwrite: bool = False,
    record: dict[str, object] | None = None,
) -> ConversionResult:
    """Write the impression log of parsed ratings: ``train/``, ``valid/`` (optional), ``test/``.

    Duplicate (user, item) pairs within a rating set are malformed lines (the first is kept).

    Raises:
        ConversionError: no training or test rating, ids outside fixed ``users`` / ``items``,
            attribute ids of another type than the ratings' ids, or (strict) a duplicate pair.
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    for triples in (source.train, source.test):
        if len(triples) == 0:
            raise ConversionError(f"{triples.path}: no rating could be read")
    space = _impression_space(source)
    user_columns = _aligned_attributes("user", source.user_attributes, space.users)
    item_columns = _aligned_attributes("item", source.item_attributes, space.items)
    schema = _schema(cfg, space, user_columns, item_columns)
    arrow_schema = _arrow_schema(space, user_columns, item_columns)
    splits = (
        (TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT)
        if cfg.validation_fraction > 0
        else (TRAIN_SPLIT, TEST_SPLIT)
    )
    out = prepare_dataset_dir(out_dir, splits, overwrite)
    rows = _Rows(arrow_schema, space, user_columns, item_columns, cfg.threshold)
    writers = {
        split: SplitWriter(out.join(split), arrow_schema, file_rows=cfg.file_rows)
        for split in splits
    }
    try:
        _write_splits(rows, space, cfg, writers)
    finally:
        for writer in writers.values():
            writer.close()
    summaries = {split: writer.summary for split, writer in writers.items()}
    details = {**_record(source, cfg, space), **(record or {})}
    return finish_dataset(out, schema, summaries, source.malformed, details, started)


def _write_splits(
    rows: _Rows, space: _Space, cfg: MnarConfig, writers: dict[str, SplitWriter]
) -> None:
    """Train: every pair, whole users at a time; test: the random-exposure ratings; valid: a
    seeded share of the pairs of ``cfg.validation_from``'s split, moved out of it."""
    held_out_of = cfg.validation_from if cfg.validation_fraction > 0 else None
    for lin, click, rating in _train_blocks(space, cfg.row_group_rows):
        _write_split(rows(lin, click, rating), lin, cfg, writers, TRAIN_SPLIT, held_out_of)
    for start in range(0, len(space.test_pairs), cfg.row_group_rows):
        lin = space.test_pairs[start : start + cfg.row_group_rows]
        ratings = space.test_ratings[start : start + cfg.row_group_rows]
        table = rows(lin, np.ones(len(lin), dtype=np.int8), ratings)
        _write_split(table, lin, cfg, writers, TEST_SPLIT, held_out_of)


def _write_split(
    table: pa.Table,
    lin: np.ndarray,
    cfg: MnarConfig,
    writers: dict[str, SplitWriter],
    split: str,
    held_out_of: str | None,
) -> None:
    """Write ``table`` to ``split``, less the validation share when valid/ is drawn from it."""
    if split == held_out_of:
        held_out = pa.array(_validation_mask(lin, cfg))
        writers[VALID_SPLIT].write(table.filter(held_out))
        table = table.filter(pc.invert(held_out))
    writers[split].write(table)


def _record(source: RatingsSource, cfg: MnarConfig, space: _Space) -> dict[str, object]:
    """What ``conversion.json`` says about the source and the space."""
    tables = {"user": source.user_attributes, "item": source.item_attributes}
    return {
        "converter": "mnar_ratings",
        "source": {
            "train": source.train.path,
            "test": source.test.path,
            **{f"{role}_attributes": None if t is None else t.path for role, t in tables.items()},
        },
        "config": asdict(cfg),
        "users": len(space.users),
        "items": len(space.items),
        "train_ratings": len(space.train_pairs),
        "test_ratings": len(space.test_pairs),
        "vocabularies": {
            f"{role}_{name}": vocab
            for role, table in tables.items()
            if table is not None
            for name, vocab in table.vocabularies.items()
        },
    }


def _impression_space(source: RatingsSource) -> _Space:
    train, test = source.train, source.test
    as_strings = any(a.dtype == object for a in (train.users, test.users, train.items, test.items))
    user_ids = [_as_type(a, as_strings) for a in (train.users, test.users)]
    item_ids = [_as_type(a, as_strings) for a in (train.items, test.items)]
    users = _universe("user", source.users, user_ids, [train.path, test.path], as_strings)
    items = _universe("item", source.items, item_ids, [train.path, test.path], as_strings)
    pairs = []
    for triples, u_raw, i_raw in zip((train, test), user_ids, item_ids, strict=True):
        lin = np.searchsorted(users, u_raw).astype(np.int64) * len(items) + np.searchsorted(
            items, i_raw
        )
        pairs.append(_unique_pairs(triples, lin, source.malformed))
    return _Space(users, items, pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1])


def _as_type(ids: np.ndarray, as_strings: bool) -> np.ndarray:
    return (
        np.array([str(v) for v in ids], dtype=object) if as_strings and ids.dtype != object else ids
    )


def _universe(
    role: str, fixed: np.ndarray | None, seen: list[np.ndarray], paths: list[str], as_strings: bool
) -> np.ndarray:
    """The sorted distinct ids of the space: ``fixed`` (checked to cover every rating) or those seen."""
    if fixed is None:
        return np.unique(np.concatenate(seen))
    universe = np.unique(_as_type(np.asarray(fixed), as_strings))
    for ids, path in zip(seen, paths, strict=True):
        outside = ~np.isin(ids, universe)
        if outside.any():
            raise ConversionError(
                f"{path}: {role} id {ids[np.argmax(outside)]!r} is not among the {len(universe)} "
                f"{role}s of the impression space"
            )
    return universe


def _unique_pairs(
    triples: Triples, lin: np.ndarray, malformed: MalformedLines
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct pairs and their ratings; later duplicates are malformed lines."""
    order = np.argsort(lin, kind="stable")  # stable: among duplicates the earliest line comes first
    lin_sorted = lin[order]
    first = np.ones(len(lin), dtype=bool)
    first[1:] = lin_sorted[1:] != lin_sorted[:-1]
    for k in np.flatnonzero(~first):
        j = order[k]
        malformed.add(
            "(user, item) pair rated on an earlier line (the first rating is kept)",
            triples.path,
            int(triples.lines[j]),
            f"{triples.users[j]} {triples.items[j]} {triples.ratings[j]:g}",
        )
    return lin_sorted[first], triples.ratings[order][first]


def _aligned_attributes(
    prefix: str, table: AttributeTable | None, universe: np.ndarray
) -> dict[str, pa.Array]:
    """Feature name -> one value per id of ``universe`` (null where the table has no row)."""
    if table is None:
        return {}
    ids = _as_type(table.ids, universe.dtype == object)
    if (ids.dtype == object) != (universe.dtype == object):
        raise ConversionError(
            f"{table.path}: ids are {'strings' if ids.dtype == object else 'integers'} but the "
            f"ratings' {prefix} ids are {'strings' if universe.dtype == object else 'integers'}"
        )
    row_of = {value: row for row, value in enumerate(ids.tolist())}
    rows = pa.array([row_of.get(value) for value in universe.tolist()], pa.int64())
    aligned = {}
    for name, values in table.columns.items():
        feature = f"{prefix}_{_NAME_CHARS.sub('_', name)}"
        if feature in aligned or feature in ("user_id", "item_id"):
            raise ConversionError(
                f"{table.path}: attribute {name!r} gives feature name {feature!r} twice"
            )
        aligned[feature] = values.take(rows)
    return aligned


def _id_feature(name: str, ids: np.ndarray, dim: int) -> dict[str, object]:
    if ids.dtype != object and len(ids) and ids.min() >= 0 and ids.max() < _MAX_VOCAB:
        return {"name": name, "dtype": "int", "vocab_size": int(ids.max()) + 1, "dim": dim}
    dtype = "string" if ids.dtype == object else "int"
    return {"name": name, "dtype": dtype, "hash_buckets": hash_buckets_for(len(ids)), "dim": dim}


def _attribute_feature(name: str, values: pa.Array, dim: int) -> dict[str, object]:
    if pa.types.is_integer(values.type):
        top = pc.max(values).as_py()
        return {"name": name, "dtype": "int", "vocab_size": (top or 0) + 1, "dim": dim}
    distinct = len(pc.unique(values.drop_null()))
    return {"name": name, "dtype": "string", "hash_buckets": hash_buckets_for(distinct), "dim": dim}


def _schema(
    cfg: MnarConfig,
    space: _Space,
    user_columns: dict[str, pa.Array],
    item_columns: dict[str, pa.Array],
) -> FeatureSchema:
    # A ranking request gives the user once (context) and each item apart (candidate).
    sparse = [
        {**_id_feature("user_id", space.users, cfg.dim), "scope": "context"},
        {**_id_feature("item_id", space.items, cfg.dim), "scope": "candidate"},
    ]
    sparse += [
        {**_attribute_feature(n, v, cfg.dim), "scope": scope}
        for columns, scope in ((user_columns, "context"), (item_columns, "candidate"))
        for n, v in columns.items()
    ]
    return FeatureSchema.from_dict(
        {
            "name": _NAME_CHARS.sub("_", cfg.name),
            "sparse": sparse,
            "labels": {"click": "click", "conversion": "conversion"},
            "group": "group",
        },
        source=f"MNAR conversion {cfg.name!r}",
    )


def _arrow_schema(
    space: _Space, user_columns: dict[str, pa.Array], item_columns: dict[str, pa.Array]
) -> pa.Schema:
    def id_type(ids: np.ndarray) -> pa.DataType:
        return pa.string() if ids.dtype == object else pa.int64()

    fields = [pa.field("user_id", id_type(space.users)), pa.field("item_id", id_type(space.items))]
    fields += [
        pa.field(name, values.type) for name, values in {**user_columns, **item_columns}.items()
    ]
    fields += [
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
        pa.field("group", id_type(space.users)),
        pa.field("rating", pa.float32()),
    ]
    return pa.schema(fields)


def _train_blocks(
    space: _Space, row_group_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Whole users at a time: linear pair indices, clicks and ratings (NaN where not rated)."""
    users_per_block = max(1, row_group_rows // max(space.num_items, 1))
    for first_user in range(0, len(space.users), users_per_block):
        low = first_user * space.num_items
        high = min(first_user + users_per_block, len(space.users)) * space.num_items
        lin = np.arange(low, high, dtype=np.int64)
        a, b = np.searchsorted(space.train_pairs, [low, high])
        click = np.zeros(high - low, dtype=np.int8)
        rating = np.full(high - low, np.nan)
        click[space.train_pairs[a:b] - low] = 1
        rating[space.train_pairs[a:b] - low] = space.train_ratings[a:b]
        yield lin, click, rating


def _validation_mask(lin: np.ndarray, cfg: MnarConfig) -> np.ndarray:
    """A pair's split depends on the pair and the seed only, not on how rows are chunked."""
    salt = splitmix64(np.array([cfg.seed], dtype=np.uint64))[0]
    key = splitmix64(lin.astype(np.uint64) ^ salt)
    uniform = (key >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return uniform < cfg.validation_fraction


@dataclass(frozen=True)
class _Rows:
    """Builds the Arrow table of impressions given as (user index, item index) pairs."""

    arrow_schema: pa.Schema
    space: _Space
    user_columns: dict[str, pa.Array]
    item_columns: dict[str, pa.Array]
    threshold: float

    def __call__(self, lin: np.ndarray, click: np.ndarray, rating: np.ndarray) -> pa.Table:
        """Rows of pairs ``lin``; ``rating`` is NaN where there is none."""
        u, i = lin // self.space.num_items, lin % self.space.num_items
        users = _id_array(self.space.users[u])
        conversion = ((click == 1) & (rating >= self.threshold)).astype(np.int8)
        columns = {
            "user_id": users,
            "item_id": _id_array(self.space.items[i]),
            **{name: values.take(pa.array(u)) for name, values in self.user_columns.items()},
            **{name: values.take(pa.array(i)) for name, values in self.item_columns.items()},
            "click": pa.array(click, pa.int8()),
            "conversion": pa.array(conversion, pa.int8()),
            "group": users,
            "rating": pa.array(rating.astype(np.float32), pa.float32(), mask=np.isnan(rating)),
        }
        return pa.table(
            [columns[name] for name in self.arrow_schema.names], schema=self.arrow_schema
        )


def _id_array(ids: np.ndarray) -> pa.Array:
    return pa.array(ids.tolist(), pa.string()) if ids.dtype == object else pa.array(ids, pa.int64())
