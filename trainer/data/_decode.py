"""From Arrow columns to model-ready numpy rows: column checks, then the feature rules.

Two steps, at two times:

* :func:`plan_columns`, when the reader opens the files: every file's column types are checked
  against the schema, so a wrong file fails before training starts, not hours in.
* :func:`decode_rows`, per row group piece: labels and ground truth are checked here (null or
  non-binary labels, a conversion without a click); sparse and dense values go through the
  feature rules of ``schemas.rules`` (OOV policy, list truncation, default then normalisation,
  NaN / inf refused), the functions the service's featurizer calls too. This module only turns
  Arrow arrays into the numpy columns the rules take, and the positions they refuse into a
  :class:`DataError`. Everything is vectorised over the piece; string columns are dictionary
  encoded, so each distinct value is hashed once.

Every error names the file, the row group, the column and, for a value, the row (counted from
the start of the row group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.features import (
    TRUTH_COLUMNS,
    DenseFeature,
    FeatureSchema,
    Normalization,
    OOVPolicy,
    SparseDType,
    SparseFeature,
    TableSpec,
)
from schemas.hashing import hash_string
from schemas.rules import (
    SparseRows,
    dense_values,
    list_positions,
    oov_reason,
    sparse_rows,
    truncate_lists,
)
from trainer.data._parquet import DataError, ParquetPart, locate
from trainer.data._rows import Rows

__all__ = [
    "TRUTH_COLUMNS",
    "ColumnPlan",
    "ReaderStats",
    "Site",
    "SparseColumn",
    "binary_column",
    "column_array",
    "decode_rows",
    "normalize_dense",
    "plan_columns",
    "truth_columns",
]

_MAX_LISTED_COLUMNS = 40


@dataclass
class ReaderStats:
    """What the reader did to the data, so that no policy acts silently.

    Attributes:
        rows_read: rows decoded from the files.
        rows_yielded: rows delivered in batches.
        rows_dropped: rows of last partial batches dropped because of ``drop_last``.
        rows_skipped: rows of batches skipped to resume in the middle of an epoch.
        batches: batches delivered.
        truncated_rows: per multi-valued feature, rows whose list was cut to ``max_len``.
        truncated_values: per multi-valued feature, values cut away.
        oov_values: per sparse feature, values mapped to the OOV row (missing ones included).
        missing_values: per sparse feature, null values; per dense feature, nulls replaced by
            the feature's default.
    """

    rows_read: int = 0
    rows_yielded: int = 0
    rows_dropped: int = 0
    rows_skipped: int = 0
    batches: int = 0
    truncated_rows: dict[str, int] = field(default_factory=dict)
    truncated_values: dict[str, int] = field(default_factory=dict)
    oov_values: dict[str, int] = field(default_factory=dict)
    missing_values: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_schema(cls, schema: FeatureSchema) -> ReaderStats:
        """Zeroed counters with every feature listed, so that a zero is visible as a zero."""
        multi = [f.name for f in schema.sparse if f.multi_valued]
        return cls(
            truncated_rows=dict.fromkeys(multi, 0),
            truncated_values=dict.fromkeys(multi, 0),
            oov_values=dict.fromkeys(schema.sparse_names, 0),
            missing_values=dict.fromkeys(schema.sparse_names + schema.dense_names, 0),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "rows_read": self.rows_read,
            "rows_yielded": self.rows_yielded,
            "rows_dropped": self.rows_dropped,
            "rows_skipped": self.rows_skipped,
            "batches": self.batches,
            "truncated_rows": dict(self.truncated_rows),
            "truncated_values": dict(self.truncated_values),
            "oov_values": dict(self.oov_values),
            "missing_values": dict(self.missing_values),
        }

    def format(self) -> str:
        """A short multi-line report; per-feature counters list only the non-zero ones."""
        lines = [
            (
                f"rows read {self.rows_read:,}, yielded {self.rows_yielded:,} in {self.batches:,} "
                f"batches, dropped {self.rows_dropped:,} (drop_last), skipped {self.rows_skipped:,} "
                "(resume)"
            )
        ]
        for title, counts in (
            ("truncated lists (rows)", self.truncated_rows),
            ("truncated values", self.truncated_values),
            ("OOV values", self.oov_values),
            ("missing values", self.missing_values),
        ):
            nonzero = {k: v for k, v in counts.items() if v}
            body = ", ".join(f"{k}={v:,}" for k, v in nonzero.items()) if nonzero else "none"
            lines.append(f"{title}: {body}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SparseColumn:
    """How one sparse feature is read.

    Attributes:
        feature: the feature as the schema declares it.
        table: the table whose rows the feature reads.
        slot: its index in ``Rows.single`` or ``Rows.multi_*``.
    """

    feature: SparseFeature
    table: TableSpec
    slot: int

    @property
    def strict(self) -> bool:
        """The ``error`` OOV policy: missing and out-of-vocabulary values are refused."""
        return self.feature.oov is OOVPolicy.ERROR


@dataclass(frozen=True)
class ColumnPlan:
    """The columns to read and how to decode them, checked against every file."""

    sparse: tuple[SparseColumn, ...]
    dense: tuple[DenseFeature, ...]
    click: str
    conversion: str
    group: str | None
    truth: bool

    @property
    def columns(self) -> list[str]:
        """Columns read from the files, nothing else."""
        names = [c.feature.name for c in self.sparse] + [f.name for f in self.dense]
        names += [self.click, self.conversion]
        if self.group is not None:
            names.append(self.group)
        if self.truth:
            names += list(TRUTH_COLUMNS)
        return names

    @property
    def num_single(self) -> int:
        return sum(not c.feature.multi_valued for c in self.sparse)


# Column checks (when the files are opened) ----------------------------------------------------


@dataclass(frozen=True)
class _Expect:
    what: str  # e.g. "an integer type", for the error message
    accepts: Callable[[pa.DataType], bool]


def _unwrap(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(_unwrap(t))


def _is_str(t: pa.DataType) -> bool:
    t = _unwrap(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return _is_int(t) or pa.types.is_boolean(_unwrap(t))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(_unwrap(t)) or _is_int(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


_INT = _Expect("an integer type (int64)", _is_int)
_STR = _Expect("a string type", _is_str)
_INT_LIST = _Expect("list<int64>", lambda t: _is_list(t) and _is_int(t.value_type))
_STR_LIST = _Expect("list<string>", lambda t: _is_list(t) and _is_str(t.value_type))
_BINARY = _Expect("an integer or bool type holding 0/1", _is_binary)
_NUMBER = _Expect("a float type (float32/float64; integers are cast)", _is_number)
_FLOAT = _Expect("a float type", lambda t: pa.types.is_floating(_unwrap(t)))
_GROUP = _Expect("an integer or string type", lambda t: _is_int(t) or _is_str(t))


def _sparse_expectation(feature: SparseFeature) -> _Expect:
    if feature.multi_valued:
        return _STR_LIST if feature.dtype is SparseDType.STRING else _INT_LIST
    return _STR if feature.dtype is SparseDType.STRING else _INT


def plan_columns(
    schema: FeatureSchema, parts: Sequence[ParquetPart], with_truth: bool | None
) -> ColumnPlan:
    """Check every file's columns against the schema and decide what to read.

    Args:
        schema: the feature schema.
        parts: the files, as inspected.
        with_truth: True: every file must have the truth columns; False: they are not read;
            None: read them if every file has all of them, not if no file has any.

    Raises:
        DataError: naming the file and the column, for a missing column, a column of the wrong
            type, or truth columns present in only some files (or only some of them); or a
            schema that reads a ground-truth column as a feature, label or group.
    """
    inputs = (
        schema.sparse_names + schema.dense_names + [schema.labels.click, schema.labels.conversion]
    )
    leaked = sorted(set(TRUTH_COLUMNS) & {*inputs, schema.group})
    if leaked:
        raise DataError(
            f"schema {schema.name!r} reads ground-truth column(s) {leaked} as features, labels or "
            "group; only evaluation may see them (they are read into Batch.truth)"
        )
    truth = _truth_available(parts, with_truth)
    expected: list[tuple[str, _Expect, str]] = [
        (f.name, _sparse_expectation(f), f"sparse feature ({_shape(f)} {f.dtype.value})")
        for f in schema.sparse
    ]
    expected += [(f.name, _NUMBER, "dense feature") for f in schema.dense]
    expected += [
        (schema.labels.click, _BINARY, "labels.click"),
        (schema.labels.conversion, _BINARY, "labels.conversion"),
    ]
    if schema.group is not None:
        expected.append((schema.group, _GROUP, "group"))
    if truth:
        expected += [
            ("true_ctr", _FLOAT, "ground truth"),
            ("true_cvr", _FLOAT, "ground truth"),
            ("cf_conversion", _BINARY, "ground truth"),
        ]
    for part in parts:
        for column, expect, role in expected:
            _check_column(part, column, expect, role)
    single = multi = 0
    sparse: list[SparseColumn] = []
    for feature in schema.sparse:
        slot = multi if feature.multi_valued else single
        sparse.append(SparseColumn(feature=feature, table=schema.table_of(feature.name), slot=slot))
        multi, single = (multi + 1, single) if feature.multi_valued else (multi, single + 1)
    return ColumnPlan(
        sparse=tuple(sparse),
        dense=tuple(schema.dense),
        click=schema.labels.click,
        conversion=schema.labels.conversion,
        group=schema.group,
        truth=truth,
    )


def _shape(feature: SparseFeature) -> str:
    return f"multi-valued (max_len {feature.max_len})" if feature.multi_valued else "single-valued"


def _check_column(part: ParquetPart, column: str, expect: _Expect, role: str) -> None:
    where = f"{locate(part.path, column=column)} (file schema, every row group)"
    index = part.arrow_schema.get_field_index(column)
    if index < 0:
        names = part.arrow_schema.names
        listed = ", ".join(names[:_MAX_LISTED_COLUMNS]) + (
            ", ..." if len(names) > _MAX_LISTED_COLUMNS else ""
        )
        raise DataError(f"{where}: missing column, needed as {role}; the file has: {listed}")
    found = part.arrow_schema.field(index).type
    if not expect.accepts(found):
        wants_list = expect in (_INT_LIST, _STR_LIST)
        hint = ""
        if _is_list(found) and not wants_list:
            hint = "; a list column for a single-valued feature (should it be multi_valued?)"
        elif wants_list and not _is_list(found):
            hint = "; a scalar column for a multi-valued feature"
        raise DataError(f"{where}: expected {expect.what} for {role}, found {found}{hint}")


def _truth_available(parts: Sequence[ParquetPart], with_truth: bool | None) -> bool:
    if with_truth is not None:
        return with_truth
    has = [[c in part.arrow_schema.names for c in TRUTH_COLUMNS] for part in parts]
    if all(all(h) for h in has):
        return True
    if not any(any(h) for h in has):
        return False
    for part, h in zip(parts, has, strict=True):
        if not all(h):
            lacking = [c for c, present in zip(TRUTH_COLUMNS, h, strict=True) if not present]
            raise DataError(
                f"{locate(part.path, column=lacking[0])} (file schema, every row group): "
                f"ground-truth columns {list(TRUTH_COLUMNS)} are in some files but this one "
                f"lacks {lacking}; pass with_truth=False to ignore them everywhere"
            )
    raise AssertionError("unreachable")  # pragma: no cover


# Decoding (per row group piece) --------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where a piece of a row group comes from, to name it in errors.

    Attributes:
        path: the file.
        row_group: the row group.
        first_row: the row of the piece's first row inside its row group.
        group_start: the file row of the row group's first row.
    """

    path: Path
    row_group: int
    first_row: int = 0
    group_start: int = 0

    def at(self, column: str, row: int | None = None) -> str:
        """Names ``column`` and, if given, row ``row`` of the piece."""
        in_group = None if row is None else self.first_row + row
        return locate(
            self.path,
            row_group=self.row_group,
            column=column,
            row=in_group,
            file_row=None if in_group is None else self.group_start + in_group,
        )


def decode_rows(
    table: pa.Table,
    plan: ColumnPlan,
    part: ParquetPart,
    row_group: int,
    first_row: int,
    stats: ReaderStats,
) -> Rows:
    """Check and convert one piece of a row group.

    Args:
        table: the piece's rows, only ``plan.columns``.
        plan: from :func:`plan_columns`.
        part: the file the piece comes from (for messages).
        row_group: its row group (for messages).
        first_row: the row of ``table``'s first row inside the row group (for messages).
        stats: counters updated in place.

    Returns:
        The decoded rows.

    Raises:
        DataError: a null or non-binary label, ``conversion = 1`` where ``click = 0``, a NaN or
            infinite dense value, a missing or out-of-vocabulary sparse value under the
            ``error`` policy, invalid ground truth.
    """
    site = Site(part.path, row_group, first_row, part.first_row(row_group))
    n = table.num_rows
    click = binary_column(column_array(table, plan.click), site, plan.click)
    conversion = binary_column(column_array(table, plan.conversion), site, plan.conversion)
    orphan = np.flatnonzero((conversion != 0) & (click == 0))
    if orphan.size:
        raise DataError(
            f"{site.at(plan.conversion, int(orphan[0]))}: conversion is 1 but {plan.click!r} is 0 "
            f"({orphan.size} such row(s) in this piece); a conversion needs a click"
        )
    single = np.empty((n, plan.num_single), dtype=np.int64)
    multi_values: list[np.ndarray] = []
    multi_offsets: list[np.ndarray] = []
    for column in plan.sparse:
        array = column_array(table, column.feature.name)
        if column.feature.multi_valued:
            values, offsets = _map_lists(array, column, site, stats)
            multi_values.append(values)
            multi_offsets.append(offsets)
        else:
            single[:, column.slot] = _map_sparse(array, column, site, stats)
    dense = np.empty((n, len(plan.dense)), dtype=np.float32)
    for j, feature in enumerate(plan.dense):
        dense[:, j] = _dense(column_array(table, feature.name), feature, site, stats)
    group = (
        None if plan.group is None else _group(column_array(table, plan.group), site, plan.group)
    )
    truth = truth_columns(table, site) if plan.truth else None
    stats.rows_read += n
    return Rows(
        single=single,
        multi_values=tuple(multi_values),
        multi_offsets=tuple(multi_offsets),
        dense=dense,
        labels=np.stack([click, conversion], axis=1),
        group=group,
        truth=truth,
    )


def column_array(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _valid(array: pa.Array) -> np.ndarray:
    return array.is_valid().to_numpy(zero_copy_only=False)


def _decoded(array: pa.Array) -> pa.Array:
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _first_null(array: pa.Array) -> int:
    return int(np.flatnonzero(~_valid(array))[0])


def binary_column(array: pa.Array, site: Site, name: str) -> np.ndarray:
    """``(n,)`` float32 of a 0/1 column that must have no nulls."""
    array = _decoded(array)
    if array.null_count:
        raise DataError(
            f"{site.at(name, _first_null(array))}: null value ({array.null_count} in this piece)"
        )
    values = array.to_numpy(zero_copy_only=False)
    if values.dtype != np.bool_:
        bad = np.flatnonzero((values != 0) & (values != 1))
        if bad.size:
            raise DataError(f"{site.at(name, int(bad[0]))}: value {values[bad[0]]} is not 0 or 1")
    return values.astype(np.float32)


def _map_sparse(
    array: pa.Array, column: SparseColumn, site: Site, stats: ReaderStats
) -> np.ndarray:
    """``(n,)`` int64 row ids of a single-valued column."""
    name = column.feature.name
    ids = _rows(array, column)
    _enforce_policy(ids, column, site, lambda i: (i, array[i].as_py()))
    stats.missing_values[name] += array.null_count
    stats.oov_values[name] += int(np.count_nonzero(ids.oov))
    return ids.rows


def _map_lists(
    array: pa.Array, column: SparseColumn, site: Site, stats: ReaderStats
) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 row ids and ``(n + 1,)`` offsets of a list column cut to ``max_len``."""
    feature = column.feature
    lengths = pc.list_value_length(array).fill_null(0).to_numpy().astype(np.int64)
    flat = array.flatten()  # honours the slice offset and skips null lists
    cut = truncate_lists(lengths, feature.max_len)
    if cut.keep is not None:
        flat = flat.filter(pa.array(cut.keep))
        stats.truncated_rows[feature.name] += cut.rows
        stats.truncated_values[feature.name] += cut.values
    offsets = np.zeros(len(cut.lengths) + 1, dtype=np.int64)
    np.cumsum(cut.lengths, out=offsets[1:])
    ids = _rows(flat, column)

    def row_of(element: int) -> tuple[int, object]:
        rows, _ = list_positions(cut.lengths, np.array([element]))
        return int(rows[0]), flat[element].as_py()

    _enforce_policy(ids, column, site, row_of)
    stats.missing_values[feature.name] += flat.null_count
    stats.oov_values[feature.name] += int(np.count_nonzero(ids.oov))
    return ids.rows, offsets


def _rows(array: pa.Array, column: SparseColumn) -> SparseRows:
    """The feature rules (``schemas.rules.sparse_rows``) on an Arrow array of values."""
    if column.feature.dtype is SparseDType.STRING:
        # Each distinct string is mapped once; logs repeat values heavily. A missing value is one
        # extra dictionary entry, None, so that the rules apply the OOV policy to it.
        encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
        distinct = encoded.dictionary.to_pylist() + [None]
        by_entry = sparse_rows(distinct, column.feature, column.table)
        return by_entry.take(encoded.indices.fill_null(len(distinct) - 1).to_numpy())
    array = _decoded(array)
    if array.null_count:
        return sparse_rows(
            array.fill_null(0).to_numpy(), column.feature, column.table, present=_valid(array)
        )
    return sparse_rows(array.to_numpy(), column.feature, column.table)


def _enforce_policy(
    ids: SparseRows,
    column: SparseColumn,
    site: Site,
    row_and_value: Callable[[int], tuple[int, object]],
) -> None:
    invalid = np.flatnonzero(ids.invalid) if ids.invalid is not None else ()
    if len(invalid):  # cannot come from Arrow, which holds valid UTF-8; checked all the same
        row, value = row_and_value(int(invalid[0]))
        raise DataError(f"{site.at(column.feature.name, row)}: string {value!r} is not valid UTF-8")
    if not column.strict:
        return
    refused = np.flatnonzero(ids.refused(True))
    if not refused.size:
        return
    row, value = row_and_value(int(refused[0]))
    raise DataError(
        f"{site.at(column.feature.name, row)}: {oov_reason(value)} ({refused.size} in this "
        f"piece); the oov policy is 'error' and table {column.table.name!r} has "
        f"{column.table.buckets} rows"
    )


def normalize_dense(values: np.ndarray, normalization: Normalization) -> np.ndarray:
    """A dense feature's normalisation (``Normalization.apply``, shared with the service)."""
    return normalization.apply(values)


def _dense(array: pa.Array, feature: DenseFeature, site: Site, stats: ReaderStats) -> np.ndarray:
    """``(n,)`` float32 model inputs (``schemas.rules.dense_values``: default, then normalise)."""
    array = _decoded(array)
    if not pa.types.is_float64(array.type):
        # safe=False: int64 ids beyond 2**53 lose precision rather than abort the read.
        array = array.cast(pa.float64(), safe=False)
    if array.null_count:
        raw = array.fill_null(0.0).to_numpy()
        dense = dense_values(raw, feature, present=_valid(array))
        stats.missing_values[feature.name] += array.null_count
    else:
        raw = array.to_numpy()
        dense = dense_values(raw, feature)
    if dense.not_finite.any():
        row = int(np.flatnonzero(dense.not_finite)[0])
        raise DataError(
            f"{site.at(feature.name, row)}: value {raw[row]} is not finite "
            f"({int(dense.not_finite.sum())} NaN/inf value(s) in this piece); write null for a "
            "missing value"
        )
    if dense.overflow.any():
        row = int(np.flatnonzero(dense.overflow)[0])
        raise DataError(
            f"{site.at(feature.name, row)}: value {raw[row]} is out of range: its "
            f"{feature.normalization.kind.value} normalisation does not fit a float32 "
            f"({int(dense.overflow.sum())} such value(s) in this piece)"
        )
    return dense.values


def _group(array: pa.Array, site: Site, name: str) -> np.ndarray:
    """``(n,)`` int64 group ids; strings become their 64-bit hash read as a signed int."""
    if array.null_count:
        raise DataError(
            f"{site.at(name, _first_null(array))}: null group id ({array.null_count} in this piece)"
        )
    if _is_str(array.type):
        encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
        hashes = np.array(
            [hash_string(s) for s in encoded.dictionary.to_pylist()], dtype=np.uint64
        ).view(np.int64)
        return hashes[encoded.indices.to_numpy().astype(np.intp)]
    values = _decoded(array).to_numpy()
    return values.view(np.int64) if values.dtype == np.uint64 else values.astype(np.int64)


def truth_columns(table: pa.Table, site: Site) -> np.ndarray:
    """``(n, 3)`` float32 of ``true_ctr``, ``true_cvr``, ``cf_conversion``."""
    out = np.empty((table.num_rows, 3), dtype=np.float32)
    for j, name in enumerate(TRUTH_COLUMNS[:2]):
        array = _decoded(column_array(table, name))
        if array.null_count:
            raise DataError(f"{site.at(name, _first_null(array))}: null probability")
        values = array.to_numpy()
        bad = np.flatnonzero(~((values >= 0) & (values <= 1)))  # NaN fails both comparisons
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f"{site.at(name, row)}: value {values[row]} is not a probability in [0, 1]"
            )
        out[:, j] = values
    out[:, 2] = binary_column(column_array(table, TRUTH_COLUMNS[2]), site, TRUTH_COLUMNS[2])
    return out
