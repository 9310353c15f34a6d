"""Request rows (raw JSON values) to model inputs, exactly as the trainer's Parquet reader does.

The reader (``trainer/data/_decode.py``) and this module follow the same rules, and the parity
tests hold them to it:

* sparse values are mapped by :func:`schemas.hashing.map_values`, the one mapping function;
* a missing single-valued value (``null`` or an absent key) reads the OOV row; a missing list is
  an empty bag; a ``null`` inside a list reads the OOV row; lists are cut to ``max_len``;
* under ``oov: error`` a missing or out-of-vocabulary value is refused, naming row and feature;
* a missing dense value takes the feature's ``default``, then ``Normalization.apply`` (the
  reader's own function: ``none``: x, ``log1p``: sign(x) log(1 + |x|), ``standard``:
  (x - mean) / std) runs in float64, and the result is stored as float32.

Types and ranges were already checked by the request model (``schemas.api``); what is left here
are the rules that need the tables: the OOV policy, and dense values that overflow float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
from schemas.hashing import map_values
from serving.model import Features

__all__ = ["Featurizer", "RowError", "RowErrors"]

_STRING_CACHE_LIMIT = 200_000  # distinct strings remembered per feature (then the cache restarts)


@dataclass(frozen=True)
class RowError:
    """One invalid value: where (``("rows", i, feature[, position])``) and why."""

    loc: tuple[str | int, ...]
    msg: str
    type: str


class RowErrors(ValueError):
    """Rows that cannot be scored; each error names the row and the feature."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:5]))
        self.errors = list(errors)


@dataclass
class _Sparse:
    feature: SparseFeature
    mapping: SparseFeature  # the same feature under oov_row: mapping never raises, we name the row
    table: TableSpec
    missing_row: int  # what map_values gives a missing value
    cache: dict[str, int] = field(default_factory=dict)  # string features only


class Featurizer:
    """Maps validated request rows to :class:`~serving.model.Features`.

    Args:
        schema: the artifact's feature schema.
        spec: the artifact's model spec (its feature order is the model's input order).

    Raises:
        ValueError: the spec names a feature the schema does not have, or disagrees with the
            schema on a table's size.
    """

    def __init__(self, schema: FeatureSchema, spec: ModelSpec) -> None:
        self.schema = schema
        self.single: list[_Sparse] = []
        self.multi: list[_Sparse] = []
        known = set(schema.sparse_names)
        for entry in spec.tables:
            for name in entry.features:
                if name not in known:
                    raise ValueError(f"model spec table {entry.name!r} reads {name!r}, which the schema lacks")
                feature = schema.sparse_feature(name)
                table = schema.table_of(name)
                if (table.name, table.num_rows, table.dim) != (entry.name, entry.num_rows, entry.dim):
                    raise ValueError(
                        f"feature {name!r}: the schema's table is {table.name!r} ({table.num_rows} x "
                        f"{table.dim}), the model spec's {entry.name!r} ({entry.num_rows} x {entry.dim})"
                    )
                mapping = feature.model_copy(update={"oov": OOVPolicy.OOV_ROW})
                probe = [""] if feature.dtype is SparseDType.STRING else np.zeros(1, dtype=np.int64)
                missing = int(map_values(probe, mapping, table, valid=np.zeros(1, dtype=bool))[0])
                (self.multi if feature.multi_valued else self.single).append(_Sparse(feature, mapping, table, missing))
        if set(spec.sparse_features) != known:
            raise ValueError(f"the model spec lacks sparse features {sorted(known - set(spec.sparse_features))}")
        if tuple(schema.dense_names) != tuple(spec.dense_features):
            raise ValueError(
                f"dense features differ: schema {schema.dense_names}, model spec {list(spec.dense_features)}"
            )
        self.dense: list[DenseFeature] = list(schema.dense)

    @property
    def multi_valued(self) -> list[str]:
        return [s.feature.name for s in self.multi]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> Features:
        """Map rows (already type-checked by the request model) to model inputs.

        Raises:
            RowErrors: values refused by an ``oov: error`` policy, strings that are not valid
                UTF-8, dense values whose normalised value overflows float32.
        """
        features, errors = self.map(rows)
        if errors:
            raise RowErrors(errors)
        return features

    def map(self, rows: Sequence[dict[str, Any]]) -> tuple[Features, list[RowError]]:
        """Like calling the featurizer, but returns the errors instead of raising: the micro-
        batcher maps several requests' rows at once and fails only the requests with errors.
        Rows with errors get valid placeholder inputs (their scores are meaningless)."""
        n = len(rows)
        errors: list[RowError] = []
        single = np.empty((n, len(self.single)), dtype=np.int64)
        for slot, sparse in enumerate(self.single):
            single[:, slot] = self._single(rows, sparse, errors)
        multi_values, multi_lengths = [], []
        for sparse in self.multi:
            values, lengths = self._multi(rows, sparse, errors)
            multi_values.append(values)
            multi_lengths.append(lengths)
        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for j, feature in enumerate(self.dense):
            dense[:, j] = self._dense(rows, feature, errors)
        if errors:
            dense[~np.isfinite(dense)] = 0.0
        features = Features(single=single, multi_values=multi_values, multi_lengths=multi_lengths, dense=dense)
        return features, errors

    # Sparse ------------------------------------------------------------------------------------

    def _map(self, values: list[Any], sparse: _Sparse) -> np.ndarray:
        """Row ids of raw values (``None``: missing) of one feature."""
        if sparse.feature.dtype is SparseDType.STRING:
            return self._map_strings(values, sparse)
        if None in values:
            valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
            ints = np.fromiter((0 if v is None else v for v in values), dtype=np.int64, count=len(values))
        else:
            valid, ints = None, np.fromiter(values, dtype=np.int64, count=len(values))
        return map_values(ints, sparse.mapping, sparse.table, valid=valid)

    def _map_strings(self, values: list[Any], sparse: _Sparse) -> np.ndarray:
        # Each distinct string is hashed once, and remembered: requests repeat values heavily.
        cache = sparse.cache
        new = [v for v in set(values) if v is not None and v not in cache]
        if new:
            if len(cache) + len(new) > _STRING_CACHE_LIMIT:
                cache.clear()
            encodable = [v for v in new if _utf8(v)]
            if encodable:
                rows = map_values(np.array(encodable, dtype=object), sparse.mapping, sparse.table)
                cache.update(zip(encodable, rows.tolist()))
        missing = sparse.missing_row
        # A string that is not valid UTF-8 (a lone surrogate) cannot be hashed: -1 marks it.
        return np.fromiter(
            (missing if v is None else cache.get(v, -1) for v in values), dtype=np.int64, count=len(values)
        )

    def _single(self, rows: Sequence[dict[str, Any]], sparse: _Sparse, errors: list[RowError]) -> np.ndarray:
        name = sparse.feature.name
        values = [row.get(name) for row in rows]
        ids = self._map(values, sparse)
        self._check(ids, sparse, errors, lambda k: (k, None), values)
        return ids

    def _multi(
        self, rows: Sequence[dict[str, Any]], sparse: _Sparse, errors: list[RowError]
    ) -> tuple[np.ndarray, np.ndarray]:
        name, max_len = sparse.feature.name, sparse.feature.max_len
        lists = [row.get(name) or () for row in rows]
        lengths = np.fromiter((min(len(v), max_len) for v in lists), dtype=np.int64, count=len(lists))
        flat = [x for values in lists for x in values[:max_len]]
        ids = self._map(flat, sparse)
        if ids.size:
            ends = np.cumsum(lengths)

            def where(k: int) -> tuple[int, int]:  # flat position -> (row, position in its list)
                row = int(np.searchsorted(ends, k, side="right"))
                return row, int(k - (ends[row] - lengths[row]))

            self._check(ids, sparse, errors, where, flat)
        return ids, lengths

    def _check(self, ids: np.ndarray, sparse: _Sparse, errors: list[RowError], where: Any, values: list[Any]) -> None:
        """Record unhashable strings, and OOV values under the ``error`` policy."""
        feature, table = sparse.feature, sparse.table
        if feature.dtype is SparseDType.STRING:
            unhashable = np.flatnonzero(ids < 0)
            for k in unhashable:
                row, position = where(int(k))
                errors.append(RowError(_loc(row, feature.name, position), "string is not valid UTF-8", "string_unicode"))
            ids[unhashable] = sparse.missing_row  # a valid placeholder; the row is refused
        if feature.oov is not OOVPolicy.ERROR:
            return
        for k in np.flatnonzero(ids == table.buckets):
            row, position = where(int(k))
            value = values[k]
            reason = "missing value" if value is None else f"value {value!r} is out of vocabulary"
            errors.append(
                RowError(
                    _loc(row, feature.name, position),
                    f"{reason}; the feature's oov policy is 'error' (table {table.name!r} has "
                    f"{table.buckets} rows)",
                    "out_of_vocabulary",
                )
            )

    # Dense -------------------------------------------------------------------------------------

    def _dense(self, rows: Sequence[dict[str, Any]], feature: DenseFeature, errors: list[RowError]) -> np.ndarray:
        name, default = feature.name, feature.default
        raw = np.fromiter(
            (default if (v := row.get(name)) is None else v for row in rows), dtype=np.float64, count=len(rows)
        )
        with np.errstate(over="ignore", invalid="ignore"):
            values = feature.normalization.apply(raw).astype(np.float32)
        for i in np.flatnonzero(~np.isfinite(values)):
            errors.append(
                RowError(
                    _loc(int(i), name, None),
                    f"value {float(raw[i])!r} is out of range: its {feature.normalization.kind.value} "
                    "normalisation does not fit a float32",
                    "value_out_of_range",
                )
            )
        return values


def _loc(row: int, name: str, position: int | None) -> tuple[str | int, ...]:
    return ("rows", row, name) if position is None else ("rows", row, name, position)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
