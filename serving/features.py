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

A ranking request's two parts (:meth:`Featurizer.map_ranking`) are mapped in one pass: each
feature once, where it was given (the context's on its one row, the candidates' on theirs), into
a one-row context and the candidates' rows; what the other part gives is a placeholder (the OOV
row, an empty list, 0) that the model does not read.

This module arranges the calls and turns the positions the rules refuse into
:class:`RowError` errors naming row, feature and list position. The work is arranged by feature
group, not by value: all single-valued integer ids of a request, hashed and vocabulary ones, are
one ``(B, k)`` matrix mapped in one call, so a request costs a few numpy calls whatever its
number of features. String ids are hashed (blake2b) once per distinct value and remembered
across requests (:class:`StringRows`).

Types and ranges were already checked (``serving.columns``); the rules that need the tables are
applied here, for in-process callers too: the OOV policy, strings that cannot be encoded as
UTF-8, non-finite dense values, and dense values whose normalisation overflows float32.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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
RANK_PLAN_LIMIT = 64  # ranking splits remembered (one per set of features the candidates give)


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
        return np.array(self._found(values), dtype=np.int64)

    def lookup(self, values: Sequence[str | None]) -> SparseRows:
        """:func:`schemas.rules.string_rows` of ``values``, from the cache (``invalid`` is None
        when every string is valid UTF-8, the usual case)."""
        found = self._found(values)
        rows = np.array(found, dtype=np.int64)
        if self.UNENCODABLE not in found:
            return SparseRows(rows, rows == self.missing_row)
        invalid = rows == self.UNENCODABLE
        rows[invalid] = self.missing_row
        return SparseRows(rows, (rows == self.missing_row) & ~invalid, invalid)

    def _found(self, values: Sequence[str | None]) -> list[int]:
        found = list(map(self._young.get, values))
        if None in found:
            self._fill(values, found)
        return found  # type: ignore[return-value]

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
    hashed: np.ndarray  # (k,) bool: a hash_buckets table (else a vocab_size one)
    strict: np.ndarray  # (k,) bool: oov policy 'error'
    any_strict: bool  # strict.any(), asked on every request
    rule: bool | np.ndarray  # int_rows' hashed: one flag for a group of one kind, else hashed

    def subset(self, members: Sequence[int]) -> _IdGroup:
        """The group of the members at ``members`` (positions in :attr:`names`)."""
        index = np.asarray(members, dtype=np.int64)
        return _IdGroup(
            names=tuple(self.names[k] for k in members),
            tables=tuple(self.tables[k] for k in members),
            slots=self.slots[index],
            buckets=self.buckets[index],
            hashed=self.hashed[index],
            strict=self.strict[index],
            any_strict=bool(self.strict[index].any()),
            rule=_rule(self.hashed[index]),
        )


@dataclass(frozen=True)
class _RankPlan:
    """Where each feature of a ranking request comes from, for one set of candidate features:
    each id group split into the candidates' members and the context's (the rest)."""

    ids: tuple[_IdGroup, _IdGroup]  # (candidates', context's)


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
        ids: list[tuple[str, int, TableSpec, bool]] = []
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
                    ids.append((name, singles, table, feature.oov is OOVPolicy.ERROR))
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
        self.ids = _group(ids)
        self.dense: list[DenseFeature] = list(schema.dense)
        self.reader = ColumnReader(schema, max_rows=sys.maxsize)  # rows of in-process callers
        self._rank_plans: dict[frozenset[str], _RankPlan] = {}
        self._oov_rows = np.empty((1, singles), dtype=np.int64)  # every single's OOV row
        self._oov_rows[0, self.ids.slots] = self.ids.buckets
        for sparse in self.strings:
            self._oov_rows[0, sparse.slot] = sparse.table.buckets

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

    def map(self, columns: Columns) -> tuple[Features, list[RowError]]:
        """Like calling the featurizer, but returns the errors (sorted by row) instead of raising.
        Rows with errors get valid placeholder inputs (their scores are meaningless)."""
        n, errors = columns.rows, []
        single = np.empty((n, self.singles), dtype=np.int64)
        if self.ids.names:
            single[:, self.ids.slots] = self._ids(columns, self.ids, errors)
        for sparse in self.strings:
            single[:, sparse.slot] = self._strings(
                columns.values.get(sparse.feature.name), n, sparse, errors
            )
        multi_values, multi_lengths = [], []
        for sparse in self.multi:
            values, lengths = self._list(columns.values.get(sparse.feature.name), n, sparse, errors)
            multi_values.append(values)
            multi_lengths.append(lengths)
        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for j, feature in enumerate(self.dense):
            dense[:, j] = self._dense(columns.values.get(feature.name), n, feature, errors)
        features = Features(
            single=single, multi_values=multi_values, multi_lengths=multi_lengths, dense=dense
        )
        return features, sorted(errors, key=lambda e: e.row)

    def map_ranking(
        self, context: Columns, candidates: Columns
    ) -> tuple[Features, Features, list[RowError], list[RowError]]:
        """Map a ranking request: each feature once, from the part that gives it.

        A feature the candidates give is mapped on their rows, any other on the context's one
        row (a feature given nowhere: its missing value, the same for every candidate). The other
        part gets placeholders (the OOV row, an empty list, 0).

        Args:
            context: the context's values, one row.
            candidates: the candidates' values, one row per candidate.

        Returns:
            The context's inputs (one row), the candidates' (``candidates.rows``), and the errors
            of each part (rows of the context are 0), as :meth:`map` gives them.
        """
        n, own = candidates.rows, candidates.values
        plan = self._rank_plan(frozenset(own))
        context_errors: list[RowError] = []
        errors: list[RowError] = []
        shared = self._oov_rows.copy()  # placeholders, then each part's own
        single = np.empty((n, self.singles), dtype=np.int64)
        single[:] = self._oov_rows
        mine, theirs = plan.ids
        if mine.names:
            single[:, mine.slots] = self._ids(candidates, mine, errors)
        if theirs.names:
            shared[:, theirs.slots] = self._ids(context, theirs, context_errors)
        for sparse in self.strings:
            column = own.get(sparse.feature.name)
            if column is not None:
                single[:, sparse.slot] = self._strings(column, n, sparse, errors)
            else:
                column = context.values.get(sparse.feature.name)
                shared[:, sparse.slot] = self._strings(column, 1, sparse, context_errors)
        lists: tuple[list[np.ndarray], ...] = ([], [], [], [])  # values, lengths: mine, shared
        empty = np.empty(0, dtype=np.int64)
        for sparse in self.multi:
            column = own.get(sparse.feature.name)
            if column is not None:
                values, lengths = self._list(column, n, sparse, errors)
                shared_values, shared_lengths = empty, np.zeros(1, dtype=np.int64)
            else:
                column = context.values.get(sparse.feature.name)
                shared_values, shared_lengths = self._list(column, 1, sparse, context_errors)
                values, lengths = empty, np.zeros(n, dtype=np.int64)
            for out, array in zip(lists, (values, lengths, shared_values, shared_lengths)):
                out.append(array)
        dense = np.zeros((n, len(self.dense)), dtype=np.float32)
        shared_dense = np.zeros((1, len(self.dense)), dtype=np.float32)
        for j, feature in enumerate(self.dense):
            column = own.get(feature.name)
            if column is not None:
                dense[:, j] = self._dense(column, n, feature, errors)
            else:
                column = context.values.get(feature.name)
                shared_dense[:, j] = self._dense(column, 1, feature, context_errors)
        return (
            Features(shared, lists[2], lists[3], shared_dense),
            Features(single, lists[0], lists[1], dense),
            context_errors,
            sorted(errors, key=lambda e: e.row),
        )

    def _rank_plan(self, own: frozenset[str]) -> _RankPlan:
        """The id groups split for candidates giving ``own`` (remembered: few sets occur)."""
        plan = self._rank_plans.get(own)
        if plan is None:

            def split(group: _IdGroup) -> tuple[_IdGroup, _IdGroup]:
                mine = [k for k, name in enumerate(group.names) if name in own]
                theirs = [k for k, name in enumerate(group.names) if name not in own]
                return group.subset(mine), group.subset(theirs)

            plan = _RankPlan(ids=split(self.ids))
            if len(self._rank_plans) >= RANK_PLAN_LIMIT:
                self._rank_plans.clear()
            self._rank_plans[own] = plan
        return plan

    # Sparse ------------------------------------------------------------------------------------

    def _ids(self, columns: Columns, group: _IdGroup, errors: list[RowError]) -> np.ndarray:
        """``(n, k)`` rows of a group of single-valued int features, mapped in one call."""
        n, given = columns.rows, [columns.values.get(name) for name in group.names]
        if len(given) == 1 and given[0] is not None:  # no copy for a group of one
            ints, present = given[0].values.reshape(n, 1), given[0].present  # type: ignore[union-attr]
            present = None if present is None else present.reshape(n, 1)
        else:
            ints, present = np.empty((n, len(given)), dtype=np.int64), None
            for j, column in enumerate(given):
                ints[:, j] = 0 if column is None else column.values
                if column is None or column.present is not None:
                    if present is None:  # only when some value is missing
                        present = np.ones(ints.shape, dtype=bool)
                    present[:, j] = False if column is None else column.present
        ids = int_rows(ints, group.buckets, hashed=group.rule, present=present)
        if group.any_strict:
            for i, j in zip(*np.nonzero(ids.refused(group.strict))):
                value = int(ints[i, j]) if present is None or present[i, j] else None
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
        hashed=np.array([m[2].is_hashed for m in members], dtype=bool),
        strict=np.array([m[3] for m in members], dtype=bool),
        any_strict=any(m[3] for m in members),
        rule=_rule(np.array([m[2].is_hashed for m in members], dtype=bool)),
    )


def _rule(hashed: np.ndarray) -> bool | np.ndarray:
    """``int_rows``' ``hashed`` for a group: a flag if its tables are of one kind, else each's."""
    if hashed.all() or not hashed.any():
        return bool(hashed.any())
    return hashed


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
