"""The train/serve feature rules: raw values of one feature to model inputs, written once.

The trainer's Parquet decoder (``trainer/data/_decode.py``, Arrow columns) and the service's
featurizer (``serving/features.py``, request columns) both call these functions, so a raw value
becomes the same model input in training and in serving by construction; the parity tests check
it rather than being the only guard.

The rules:

* **Sparse values** (:func:`sparse_rows`, or :func:`int_rows` and :func:`string_rows` directly):
  integers of a hashed table go through ``splitmix64`` modulo ``hash_buckets``, strings through
  blake2b and then the same (``schemas.hashing``); integers of a ``vocab_size`` table are their
  own row within ``[0, vocab_size)``. A missing value, or an id outside the vocabulary, reads the
  table's OOV row ``buckets`` (``oov``); under ``oov: error`` those positions are refused. A
  string that cannot be encoded as UTF-8 is ``invalid`` under either policy.
* **Lists** (:func:`truncate_lists`): a missing list is an empty bag, a list keeps its first
  ``max_len`` values, and a missing element follows the rule of a missing value.
* **Dense values** (:func:`dense_values`): a missing value takes the feature's ``default``, then
  ``Normalization.apply`` runs in float64 and the result is stored as float32. A present value
  that is NaN or infinite is refused, and so is one whose normalised value does not fit a
  float32.

Every function takes a whole column and works with numpy (no loop over rows in Python); it
returns arrays and boolean masks of the offending positions and never raises for a value. The
caller turns positions into its own error: the reader's ``DataError`` names file, row group and
row, the service's ``RowError`` row, feature and list position. :func:`map_values` is the one
exception, a convenience that raises :class:`~schemas.hashing.HashingError` for the first one.

The functions are element-wise: calling one on a column's distinct values and indexing the
result with the inverse (:meth:`SparseRows.take`) gives what calling it on the column gives, so
a caller that deduplicates (Arrow dictionaries, the service's string cache, a ranking request's
shared context) hashes each distinct value once.

Nothing here imports torch or pyarrow.

Example::

    ids = sparse_rows(np.array([7, -1, 3]), feature, table, present=np.array([1, 1, 0], bool))
    ids.rows                              # row ids, the OOV row where missing or unknown
    ids.refused(feature.oov is OOVPolicy.ERROR)  # where the OOV policy refuses the value
    dense = dense_values(np.array([1.0, 0.0]), price, present=np.array([True, False]))
    dense.values                          # float32: log1p(1.0), then log1p(default)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from schemas.features import DenseFeature, OOVPolicy, SparseDType, SparseFeature, TableSpec
from schemas.hashing import HashingError, hash_ints, hash_strings, vocab_rows

__all__ = [
    "DenseValues",
    "SparseRows",
    "Truncation",
    "dense_values",
    "int_rows",
    "list_positions",
    "map_values",
    "oov_reason",
    "sparse_rows",
    "string_rows",
    "truncate_lists",
]

_MISSING = -2  # codes of string_rows before the OOV row is filled in
_INVALID = -1


class SparseRows(NamedTuple):
    """Row ids of a column of sparse values, and the positions that have no row of their own.

    Attributes:
        rows: int64 row ids; the table's OOV row where ``oov`` or ``invalid``.
        oov: True where the value is missing or outside the vocabulary (it reads the OOV row
            under ``oov: oov_row`` and is refused under ``oov: error``).
        invalid: True where a string cannot be encoded as UTF-8 (refused under every policy);
            None when no value can be invalid (integers) or none is.
    """

    rows: np.ndarray
    oov: np.ndarray
    invalid: np.ndarray | None = None

    def refused(self, strict: bool | np.ndarray) -> np.ndarray:
        """The positions the OOV policy refuses: ``oov`` where ``strict``.

        Args:
            strict: ``feature.oov is OOVPolicy.ERROR``; for a ``(B, k)`` matrix of k features,
                one flag per column.
        """
        return self.oov & strict

    def take(self, index: np.ndarray) -> SparseRows:
        """The result at ``index``: from the rows of distinct values to those of the column."""
        return SparseRows(
            self.rows[index],
            self.oov[index],
            None if self.invalid is None else self.invalid[index],
        )


def int_rows(
    values: np.ndarray,
    buckets: int | np.ndarray,
    *,
    hashed: bool | np.ndarray,
    present: np.ndarray | None = None,
) -> SparseRows:
    """Rows of integer values: hashed, or used as rows of a vocabulary.

    Args:
        values: integer array of any shape (entries under ``present == False`` are ignored).
        buckets: the tables' ``buckets`` (the OOV row), broadcast against ``values``: a
            ``(B, k)`` matrix of k features takes one count per column.
        hashed: True for ``hash_buckets`` tables, False for ``vocab_size`` ones; for a
            ``(B, k)`` matrix of features of both kinds, a boolean array of one flag per column
            (both rules run on every column, in one call each, and each column keeps its own).
        present: False where a value is missing; None when none is.

    Returns:
        Row ids and OOV positions, the shape of ``values``.

    Raises:
        HashingError: ``values`` is not an integer array.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "iu" and values.size:
        raise HashingError(f"expected integer values, got dtype {values.dtype}")
    ints = values.astype(np.int64, copy=False)
    if isinstance(hashed, np.ndarray):  # a flag per column: each keeps its own rule
        hashed_rows = hash_ints(ints, buckets)
        vocab, found = vocab_rows(ints, buckets, present)
        if present is not None:
            hashed_rows = np.where(present, hashed_rows, buckets)
        # a hashed value is out of vocabulary only when missing, a vocabulary id when not found
        oov = ~found & ~hashed if present is None else np.where(hashed, ~present, ~found)
        return SparseRows(np.where(hashed, hashed_rows, vocab), oov)
    if hashed:
        rows = hash_ints(ints, buckets)
        if present is None:
            return SparseRows(rows, np.zeros(ints.shape, dtype=bool))
        return SparseRows(np.where(present, rows, buckets), ~present)
    rows, found = vocab_rows(ints, buckets, present)
    return SparseRows(rows, ~found)


def string_rows(values: Sequence[str | None], buckets: int) -> SparseRows:
    """Rows of strings in a hashed table; ``None`` is a missing value.

    Each distinct string is hashed once, whatever the number of times it occurs.

    Args:
        values: strings, ``None`` where missing (a list, tuple or object array).
        buckets: the table's ``hash_buckets`` (its OOV row).

    Returns:
        Row ids, OOV positions (the missing values) and invalid positions (strings that cannot
        be encoded as UTF-8).

    Raises:
        HashingError: a value that is neither a string nor ``None``, naming its position.
    """
    _check_strings(values)
    distinct = dict.fromkeys(values)
    distinct.pop(None, None)
    rows, encodable = hash_strings(list(distinct), buckets)
    codes = dict(zip(distinct, np.where(encodable, rows, _INVALID).tolist()))
    codes[None] = _MISSING
    found = np.fromiter(map(codes.__getitem__, values), dtype=np.int64, count=len(values))
    invalid = found == _INVALID
    oov = found == _MISSING
    return SparseRows(np.where(oov | invalid, buckets, found), oov, invalid)


def sparse_rows(
    values: np.ndarray | Sequence[str | None],
    feature: SparseFeature,
    table: TableSpec,
    *,
    present: np.ndarray | None = None,
) -> SparseRows:
    """Rows of one sparse feature's values (single values, or the flat elements of lists).

    Args:
        values: an integer array for ``int`` features; strings (``None`` where missing) for
            ``string`` features.
        feature: the feature.
        table: its table (``schema.table_of(feature.name)``).
        present: False where a value is missing; None when none is (string features may also
            mark missing values with ``None``).

    Raises:
        HashingError: values of the wrong type.
    """
    if feature.dtype is SparseDType.STRING:
        if present is not None:
            values = np.where(present, np.asarray(values, dtype=object), None)
        return string_rows(values, table.buckets)  # type: ignore[arg-type]
    return int_rows(values, table.buckets, hashed=table.is_hashed, present=present)  # type: ignore[arg-type]


class Truncation(NamedTuple):
    """Lists cut to ``max_len``.

    Attributes:
        keep: over the flat elements, False for those cut away; None when no list was cut.
        lengths: ``(n,)`` int64 list lengths after the cut.
        rows: lists that were cut.
        values: elements cut away.
    """

    keep: np.ndarray | None
    lengths: np.ndarray
    rows: int
    values: int


def truncate_lists(lengths: np.ndarray, max_len: int) -> Truncation:
    """Keep the first ``max_len`` elements of every list.

    Args:
        lengths: ``(n,)`` number of elements of each list (0 for an empty or missing one), whose
            elements are stored flat, list after list.
        max_len: the feature's ``max_len``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.max(initial=0) <= max_len:
        return Truncation(None, lengths, 0, 0)
    over = lengths > max_len
    starts = np.cumsum(lengths) - lengths
    position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return Truncation(
        keep=position < max_len,
        lengths=np.minimum(lengths, max_len),
        rows=int(np.count_nonzero(over)),
        values=int((lengths[over] - max_len).sum()),
    )


def list_positions(lengths: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where flat elements sit: the list (row) of each and its position within the list.

    Args:
        lengths: ``(n,)`` list lengths.
        flat: indices into the flat elements.

    Returns:
        int64 rows and positions, the shape of ``flat``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    rows = np.searchsorted(ends, flat, side="right")
    return rows, np.asarray(flat, dtype=np.int64) - (ends[rows] - lengths[rows])


class DenseValues(NamedTuple):
    """A dense feature's model inputs and the positions refused.

    Attributes:
        values: float32 normalised values; 0 where refused (a placeholder).
        not_finite: True where a present value is NaN or infinite.
        overflow: True where a value's normalisation does not fit a float32.
        any_refused: whether any position is refused (a cheap test for the usual case).
    """

    values: np.ndarray
    not_finite: np.ndarray
    overflow: np.ndarray
    any_refused: bool

    @property
    def refused(self) -> np.ndarray:
        return self.not_finite | self.overflow


def dense_values(
    raw: np.ndarray, feature: DenseFeature, *, present: np.ndarray | None = None
) -> DenseValues:
    """Default, then normalise in float64, then float32.

    Args:
        raw: numeric array (entries under ``present == False`` are ignored).
        feature: the dense feature: its ``default`` and ``normalization``.
        present: False where a value is missing; None when none is.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if present is not None:
        raw = np.where(present, raw, feature.default)
    with np.errstate(over="ignore", invalid="ignore"):
        values = feature.normalization.apply(raw).astype(np.float32)
    finite = np.isfinite(values)
    if finite.all():  # the usual case: nothing to refuse
        none = np.zeros(values.shape, dtype=bool)
        none.flags.writeable = False  # shared by both masks
        return DenseValues(values, none, none, any_refused=False)
    not_finite = ~np.isfinite(raw)
    if present is not None:
        not_finite &= present
    overflow = ~finite & ~not_finite
    values[~finite] = 0.0
    return DenseValues(values, not_finite, overflow, any_refused=True)


def oov_reason(value: object) -> str:
    """Why a refused value has no row: ``missing value`` (``None``) or ``value 7 is out of
    vocabulary``; the reader's and the service's error messages both start with it."""
    return "missing value" if value is None else f"value {_plain(value)!r} is out of vocabulary"


def map_values(
    values: np.ndarray | Sequence[object],
    feature: SparseFeature,
    table: TableSpec,
    *,
    valid: np.ndarray | None = None,
    where: str = "",
) -> np.ndarray:
    """:func:`sparse_rows`, raising for the first value refused.

    Args:
        values: raw values: an integer array for ``int`` features (any integer dtype), an
            array or sequence of ``str`` for ``string`` features.
        feature: the feature the values belong to.
        table: the table it reads (``schema.table_of(feature.name)``).
        valid: optional boolean mask, False where a value is missing (null); missing values
            follow the OOV policy. Entries of ``values`` under False are ignored.
        where: context for error messages (file, row group, request row...).

    Returns:
        int64 array of row ids in ``[0, table.num_rows)``, same length as ``values``.

    Raises:
        HashingError: values of the wrong type; under ``OOVPolicy.ERROR``, the first value that
            has no row; a string that cannot be encoded as UTF-8.
    """
    ids = sparse_rows(values, feature, table, present=valid)
    refused = ids.refused(feature.oov is OOVPolicy.ERROR)
    if ids.invalid is not None:
        refused |= ids.invalid
    if refused.any():
        bad = int(np.flatnonzero(refused)[0])
        missing = valid is not None and not valid[bad]
        if ids.invalid is not None and ids.invalid[bad]:
            reason = f"string {values[bad]!r} is not valid UTF-8"
        else:
            reason = oov_reason(None if missing else values[bad])
        raise HashingError(
            f"{where + ': ' if where else ''}feature {feature.name!r} at position {bad}: "
            f"{reason} (oov policy is '{feature.oov.value}'; table {table.name!r} has "
            f"{table.buckets} rows)"
        )
    return ids.rows


def _check_strings(values: Sequence[object]) -> None:
    if set(map(type, values)) <= {str, type(None)}:
        return
    for i, value in enumerate(values):  # the rare failure path only
        if value is not None and not isinstance(value, str):
            raise HashingError(
                f"expected a string at position {i}, got {type(value).__name__} {value!r}"
            )


def _plain(value: object) -> object:
    """A numpy scalar as the Python value a user wrote (``7``, not ``np.int64(7)``)."""
    return value.item() if isinstance(value, np.generic) else value
