"""Request columns (raw values) to model inputs, by the trainer's own feature rules.

The rules are ``schemas.rules``, the functions the trainer's Parquet reader
(``trainer/data/_decode.py``) calls too, so a value becomes the same model input in both by
construction (the parity tests check it):

* sparse values are hashed or looked up in their vocabulary; a missing single value (``null``
  or absent) reads the OOV row, a missing list is an empty bag, a ``null`` inside a list reads
  the OOV row, lists are cut to ``max_len`` (:func:`~schemas.rules.int_rows`,
  :func:`~schemas.rules.string_rows`, :func:`~schemas.rules.truncate_lists`);
* under ``oov: error`` a missing or out-of-vocabulary value is refused;
* a missing dense value takes the feature's ``default``, then the normalisation runs in float64
  and the result is stored as float32 (:func:`~schemas.rules.dense_values`).

This module arranges the calls and turns the positions the rules refuse into
:class:`RowError` errors naming row, feature and list position. The work is arranged by feature
group, not by value: all single-valued hashed ids of a request are one ``(B, k)`` matrix mapped
in one call, the vocabulary ids another, so a request costs a few numpy calls whatever its
number of features. String ids are hashed (blake2b) once per distinct value and remembered
across requests (:class:`StringRows`).

Types and ranges were already checked (``serving.columns``); the rules that need the tables are
applied here, for in-process callers too: the OOV policy, strings that cannot be encoded as
UTF-8, non-finite dense values, and dense values whose normalisation overflows float32.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np

from schemas.artifact import ModelSpec
from schemas.features import (
    DenseFeature,
    FeatureSchema,
    OOVPolicy,
    SparseDType,
    SparseFeature,
    TableSpec,
)
from schemas.rules import (
    SparseRows,
    dense_values,
    int_rows,
    list_positions,
    oov_reason,
    sparse_rows,
    string_rows,
    truncate_lists,
)
from serving.columns import Column, ColumnReader, Columns
from serving.model import Features

__all__ = ["Featurizer", "RowError", "RowErrors", "StringRows"]

STRING_CACHE_LIMIT = 100_000  # distinct strings per feature and generation (see StringRows)


@dataclass(frozen=True)
class RowError:
    """One invalid value: its row, feature and list position (list features), and why."""

    row: int
    feature: str
    position: int | None
    msg: str
    type: str

    def loc(self, form: str) -> tuple[str | int, ...]:
        """Where it is in a request of ``form`` ``"rows"`` (``("rows", 3, "price")``) or
        ``"columns"`` (``("columns", "price", 3)``)."""
        where = (
            ("rows", self.row, self.feature)
            if form == "rows"
            else ("columns", self.feature, self.row)
        )
        return where if self.position is None else (*where, self.position)


class RowErrors(ValueError):
    """Rows that cannot be scored; each error names the row and the feature."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        super().__init__(
            "; ".join(f"{'.'.join(map(str, e.loc('rows')))}: {e.msg}" for e in errors[:5])
        )
        self.errors = list(errors)


class StringRows:
    """Row ids of one string feature's values, remembered across requests.

    Requests repeat values heavily (Zipf-like), so each distinct string is hashed once and then
    found by one dict lookup. Memory is bounded like an LRU cache, in two generations: when the
    young generation holds ``limit`` strings it becomes the old one (the previous old one is
    dropped), and a string found in the old generation moves back to the young one. A string
    used at least once every ``limit`` new strings is never hashed again; at most ``2 * limit``
    are held. Safe to share between threads (a lost update only means hashing a string twice).

    Args:
        feature: the feature.
        table: its table.
        limit: strings per generation.
    """

    UNENCODABLE = -1  # the row of a string that is not valid UTF-8 (a lone surrogate)

    def __init__(
        self, feature: SparseFeature, table: TableSpec, limit: int = STRING_CACHE_LIMIT
    ) -> None:
        self.feature, self.table, self.limit = feature, table, limit
        self.missing_row = table.buckets
        self._young: dict[str | None, int] = {None: self.missing_row}
        self._old: dict[str | None, int] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def rows(self, values: Sequence[str | None]) -> np.ndarray:
        """int64 rows of ``values`` (``None``: missing; :attr:`UNENCODABLE` for invalid strings)."""
        found = list(map(self._young.get, values))
        if None in found:
            self._fill(values, found)
        return np.array(found, dtype=np.int64)

    def lookup(self, values: Sequence[str | None]) -> SparseRows:
        """:func:`schemas.rules.string_rows` of ``values``, from the cache."""
        rows = self.rows(values)
        invalid = rows == self.UNENCODABLE
        rows[invalid] = self.missing_row
        return SparseRows(rows, (rows == self.missing_row) & ~invalid, invalid)

    def _fill(self, values: Sequence[str | None], found: list[int | None]) -> None:
        young, old = self._young, self._old
        new: dict[str, list[int]] = {}
        for i in (i for i, row in enumerate(found) if row is None):
            value = values[i]
            row = old.get(value)
            if row is None:
                new.setdefault(value, []).append(i)  # type: ignore[arg-type]
            else:
                young[value] = found[i] = row
        if new:
            ids = string_rows(list(new), self.table.buckets)
            young.update(
                (value, row)
                for value, row, bad in zip(new, ids.rows.tolist(), ids.invalid.tolist())  # type: ignore[union-attr]
                if not bad
            )
        for value, positions in new.items():
            row = young.get(value, self.UNENCODABLE)
            for i in positions:
                found[i] = row
        if len(young) > self.limit:
            self._old, self._young = young, {None: self.missing_row}


@dataclass(frozen=True)
class _IdGroup:
    """Single-valued int features mapped together: their columns of ``Features.single``."""

    names: tuple[str, ...]
    tables: tuple[str, ...]
    slots: np.ndarray  # (k,) columns of Features.single
    buckets: np.ndarray  # (k,) each table's buckets: the OOV row
    strict: np.ndarray  # (k,) bool: oov policy 'error'


@dataclass(frozen=True)
class _Sparse:
    feature: SparseFeature
    table: TableSpec
    slot: int  # column of Features.single, or index into Features.multi_*
    strings: StringRows | None  # string features only

    @property
    def strict(self) -> bool:
        return self.feature.oov is OOVPolicy.ERROR


class Featurizer:
    """Maps checked request :class:`~serving.columns.Columns` to :class:`~serving.model.Features`.

    Args:
        schema: the artifact's feature schema.
        spec: the artifact's model spec (its feature order is the model's input order).

    Raises:
        ValueError: the spec names a feature the schema does not have, or disagrees with the
            schema on a table's size.
    """

    def __init__(self, schema: FeatureSchema, spec: ModelSpec) -> None:
        self.schema = schema
        known = set(schema.sparse_names)
        hashed: list[tuple[str, int, TableSpec, bool]] = []
        vocab: list[tuple[str, int, TableSpec, bool]] = []
        self.strings: list[_Sparse] = []
        self.multi: list[_Sparse] = []
        singles = 0
        for entry in spec.tables:
            for name in entry.features:
                if name not in known:
                    raise ValueError(
                        f"model spec table {entry.name!r} reads {name!r}, which the schema lacks"
                    )
                feature = schema.sparse_feature(name)
                table = schema.table_of(name)
                if (table.name, table.num_rows, table.dim) != (
                    entry.name,
                    entry.num_rows,
                    entry.dim,
                ):
                    raise ValueError(
                        f"feature {name!r}: the schema's table is {table.name!r} ({table.num_rows} x "
                        f"{table.dim}), the model spec's {entry.name!r} ({entry.num_rows} x {entry.dim})"
                    )
                strings = (
                    StringRows(feature, table) if feature.dtype is SparseDType.STRING else None
                )
                if feature.multi_valued:
                    self.multi.append(_Sparse(feature, table, len(self.multi), strings))
                    continue
                if strings is not None:
                    self.strings.append(_Sparse(feature, table, singles, strings))
                else:
                    strict = feature.oov is OOVPolicy.ERROR
                    (hashed if table.is_hashed else vocab).append((name, singles, table, strict))
                singles += 1
        if set(spec.sparse_features) != known:
            raise ValueError(
                f"the model spec lacks sparse features {sorted(known - set(spec.sparse_features))}"
            )
        if tuple(schema.dense_names) != tuple(spec.dense_features):
            raise ValueError(
                f"dense features differ: schema {schema.dense_names}, model spec {list(spec.dense_features)}"
            )
        self.singles = singles
        self.hashed = _group(hashed)
        self.vocab = _group(vocab)
        self.dense: list[DenseFeature] = list(schema.dense)
        self.reader = ColumnReader(schema, max_rows=sys.maxsize)  # rows of in-process callers

    @property
    def multi_valued(self) -> list[str]:
        return [s.feature.name for s in self.multi]

    def __call__(self, values: Columns | Sequence[dict[str, Any]]) -> Features:
        """Map checked columns, or rows of raw values (in-process callers), to model inputs.

        Rows are checked first as a request's would be (any number of them).

        Raises:
            Unreadable: rows holding a value of the wrong type or out of range.
            RowErrors: values refused by an ``oov: error`` policy, strings that are not valid
                UTF-8, dense values that are not finite or whose normalised value overflows
                float32.
        """
        columns = (
            values
            if isinstance(values, Columns)
            else self.reader.rows_request({"rows": list(values)})
        )
        features, errors = self.map(columns)
        if errors:
            raise RowErrors(errors)
        return features

    def map(
        self, columns: Columns, placeholders: Collection[str] = ()
    ) -> tuple[Features, list[RowError]]:
        """Like calling the featurizer, but returns the errors (sorted by row) instead of raising.
        Rows with errors get valid placeholder inputs (their scores are meaningless).

        Args:
            columns: checked values.
            placeholders: features whose inputs come from elsewhere (the other part of a ranking
                request): absent from ``columns``, they get valid placeholder inputs (the OOV
                row, an empty list, 0) and no rule refuses them.
        """
        n, errors = columns.rows, []
        single = np.empty((n, self.singles), dtype=np.int64)
        for group, hashed in ((self.hashed, True), (self.vocab, False)):
            if group.names:
                single[:, group.slots] = self._ids(columns, group, hashed, errors, placeholders)
        for sparse in self.strings:
            column = columns.values.get(sparse.feature.name)
            if column is None and sparse.feature.name in placeholders:
                single[:, sparse.slot] = sparse.table.buckets
                continue
            single[:, sparse.slot] = self._strings(column, n, sparse, errors)
        multi_values, multi_lengths = [], []
        for sparse in self.multi:
            values, lengths = self._list(columns.values.get(sparse.feature.name), n, sparse, errors)
            multi_values.append(values)
            multi_lengths.append(lengths)
        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for j, feature in enumerate(self.dense):
            column = columns.values.get(feature.name)
            if column is None and feature.name in placeholders:
                dense[:, j] = 0.0
                continue
            dense[:, j] = self._dense(column, n, feature, errors)
        features = Features(
            single=single, multi_values=multi_values, multi_lengths=multi_lengths, dense=dense
        )
        return features, sorted(errors, key=lambda e: e.row)

    # Sparse ------------------------------------------------------------------------------------

    def _ids(
        self,
        columns: Columns,
        group: _IdGroup,
        hashed: bool,
        errors: list[RowError],
        placeholders: Collection[str],
    ) -> np.ndarray:
        """``(n, k)`` rows of a group of single-valued int features, mapped in one call."""
        n = columns.rows
        ints = np.zeros((n, len(group.names)), dtype=np.int64)
        present = np.ones((n, len(group.names)), dtype=bool)
        strict = group.strict
        for j, name in enumerate(group.names):
            column = columns.values.get(name)
            if column is None:
                present[:, j] = False
                if strict[j] and name in placeholders:
                    strict = strict.copy()
                    strict[j] = False
                continue
            ints[:, j] = column.values
            if column.present is not None:
                present[:, j] = column.present
        ids = int_rows(ints, group.buckets, hashed=hashed, present=present)
        if strict.any():
            for i, j in zip(*np.nonzero(ids.refused(strict))):
                value = int(ints[i, j]) if present[i, j] else None
                errors.append(
                    _oov_error(
                        int(i), group.names[j], None, value, group.tables[j], int(group.buckets[j])
                    )
                )
        return ids.rows

    def _strings(
        self, column: Column | None, n: int, sparse: _Sparse, errors: list[RowError]
    ) -> np.ndarray:
        values = [None] * n if column is None else column.values
        ids = sparse.strings.lookup(values)  # type: ignore[union-attr]
        self._refuse(ids, sparse, errors, lambda k: (k, None), lambda k: None)
        return ids.rows

    def _list(
        self, column: Column | None, n: int, sparse: _Sparse, errors: list[RowError]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat rows of a list feature, each list cut to ``max_len``, and the cut lengths."""
        if column is None:
            return np.empty(0, dtype=np.int64), np.zeros(n, dtype=np.int64)
        values, present = column.values, column.present
        cut = truncate_lists(column.lengths, sparse.feature.max_len)  # type: ignore[arg-type]
        if cut.keep is not None:
            values = (
                values[cut.keep]
                if isinstance(values, np.ndarray)
                else list(compress(values, cut.keep))
            )
            present = None if present is None else present[cut.keep]

        def where(k: int) -> tuple[int, int]:  # flat position -> (row, position in its list)
            rows, positions = list_positions(cut.lengths, np.array([k]))
            return int(rows[0]), int(positions[0])

        if sparse.strings is not None:
            ids = sparse.strings.lookup(values)  # type: ignore[arg-type]
            self._refuse(ids, sparse, errors, where, lambda k: None)  # a string is only missing
            return ids.rows, cut.lengths

        def value(k: int) -> int | None:
            return None if present is not None and not present[k] else int(values[k])  # type: ignore[index]

        ids = sparse_rows(values, sparse.feature, sparse.table, present=present)
        self._refuse(ids, sparse, errors, where, value)
        return ids.rows, cut.lengths

    @staticmethod
    def _refuse(
        ids: SparseRows,
        sparse: _Sparse,
        errors: list[RowError],
        where: Callable[[int], tuple[int, int | None]],
        value: Callable[[int], int | None],
    ) -> None:
        """Errors for the positions the rules refuse: invalid strings, and OOV values under the
        ``error`` policy (``where`` names a flat position's row and list position, ``value`` the
        raw value there, None if missing)."""
        feature, table = sparse.feature, sparse.table
        if ids.invalid is not None and ids.invalid.any():
            for k in np.flatnonzero(ids.invalid):
                row, position = where(int(k))
                errors.append(
                    RowError(
                        row, feature.name, position, "string is not valid UTF-8", "string_unicode"
                    )
                )
        if sparse.strict and ids.oov.any():
            for k in np.flatnonzero(ids.oov):
                row, position = where(int(k))
                errors.append(
                    _oov_error(
                        row, feature.name, position, value(int(k)), table.name, table.buckets
                    )
                )

    # Dense -------------------------------------------------------------------------------------

    def _dense(
        self, column: Column | None, n: int, feature: DenseFeature, errors: list[RowError]
    ) -> np.ndarray:
        if column is None:
            raw, present = np.full(n, feature.default, dtype=np.float64), None
        else:
            raw, present = column.values, column.present  # type: ignore[assignment]
        dense = dense_values(raw, feature, present=present)
        if not dense.any_refused:
            return dense.values
        for i in np.flatnonzero(dense.not_finite):
            errors.append(
                RowError(
                    int(i), feature.name, None, "Input should be a finite number", "finite_number"
                )
            )
        for i in np.flatnonzero(dense.overflow):
            given = present is None or present[i]
            errors.append(
                RowError(
                    int(i),
                    feature.name,
                    None,
                    f"value {float(raw[i] if given else feature.default)!r} is out of range: its {feature.normalization.kind.value} "
                    "normalisation does not fit a float32",
                    "value_out_of_range",
                )
            )
        return dense.values


def _group(members: list[tuple[str, int, TableSpec, bool]]) -> _IdGroup:
    return _IdGroup(
        names=tuple(m[0] for m in members),
        tables=tuple(m[2].name for m in members),
        slots=np.array([m[1] for m in members], dtype=np.int64),
        buckets=np.array([m[2].buckets for m in members], dtype=np.int64),
        strict=np.array([m[3] for m in members], dtype=bool),
    )


def _oov_error(
    row: int, name: str, position: int | None, value: int | None, table: str, buckets: int
) -> RowError:
    return RowError(
        row,
        name,
        position,
        f"{oov_reason(value)}; the feature's oov policy is 'error' (table {table!r} has {buckets} rows)",
        "out_of_vocabulary",
    )
