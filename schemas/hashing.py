"""Raw feature values to embedding row ids: one function, used by trainer and service alike.

The mapping is deterministic and independent of the process, the platform and
``PYTHONHASHSEED`` (Python's ``hash()`` is never used):

* integer values: ``splitmix64(value as uint64)``;
* string values: the first 8 bytes of ``blake2b(utf-8 bytes)`` read little-endian, then
  ``splitmix64``;

and a hashed table takes that 64-bit number modulo ``hash_buckets``. A ``vocab_size`` table uses
integer values as row ids directly. Values that do not fit (outside ``[0, vocab_size)``, or of the
wrong type) and missing values go to the table's reserved OOV row ``buckets`` under
``OOVPolicy.OOV_ROW``, and raise :class:`HashingError` under ``OOVPolicy.ERROR``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from schemas.features import OOVPolicy, SparseDType, SparseFeature, TableSpec

__all__ = ["HashingError", "hash_ints", "hash_string", "map_values", "splitmix64", "vocab_rows"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class HashingError(ValueError):
    """A raw value cannot be mapped to a row under the feature's ``OOVPolicy.ERROR``."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on a uint64 array (wraps modulo 2**64)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_string(value: str) -> int:
    """The 64-bit pre-hash of one string (before splitmix64)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_ints(values: np.ndarray, buckets: int | np.ndarray) -> np.ndarray:
    """Rows of integer values in hashed tables: ``splitmix64(value as uint64) % buckets``.

    Args:
        values: int64 array of any shape.
        buckets: the tables' ``hash_buckets``; broadcast against ``values`` (a ``(B, k)`` matrix of
            k features takes one count per column).

    Returns:
        int64 row ids, the shape of ``values``.
    """
    return (splitmix64(values.view(np.uint64)) % np.asarray(buckets, dtype=np.uint64)).astype(
        np.int64
    )


def vocab_rows(values: np.ndarray, buckets: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of integer values in ``vocab_size`` tables: the value itself within ``[0, buckets)``,
    else the OOV row ``buckets`` (broadcast as in :func:`hash_ints`).

    Returns:
        int64 row ids, and the mask of values within the vocabulary.
    """
    found = (values >= 0) & (values < buckets)
    return np.where(found, values, buckets), found


def map_values(
    values: np.ndarray | Sequence[object],
    feature: SparseFeature,
    table: TableSpec,
    *,
    valid: np.ndarray | None = None,
    where: str = "",
) -> np.ndarray:
    """Map raw values of one sparse feature to row ids of its table.

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
        HashingError: under ``OOVPolicy.ERROR``, for the first value that has no row.
    """
    n = len(values)
    present = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = np.full(n, table.buckets, dtype=np.int64)  # the OOV row
    if feature.dtype is SparseDType.STRING:
        found = _hash_strings(values, present, table.buckets, rows)
    else:
        found = _map_ints(np.asarray(values), present, table, rows)
    if feature.oov is OOVPolicy.ERROR and not found.all():
        bad = int(np.flatnonzero(~found)[0])
        reason = (
            "missing value"
            if not present[bad]
            else f"value {_plain(values[bad])!r} is out of vocabulary"
        )
        raise HashingError(
            f"{where + ': ' if where else ''}feature {feature.name!r} at position {bad}: "
            f"{reason} (oov policy is 'error'; table {table.name!r} has {table.buckets} rows)"
        )
    return rows


def _map_ints(
    values: np.ndarray, present: np.ndarray, table: TableSpec, rows: np.ndarray
) -> np.ndarray:
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise HashingError(f"expected integer values, got dtype {values.dtype}")
    ints = values.astype(np.int64, copy=False).reshape(-1)
    if table.is_hashed:
        rows[present] = hash_ints(ints, table.buckets)[present]
        return present
    _, in_range = vocab_rows(ints, table.buckets)
    in_range &= present
    rows[in_range] = ints[in_range]
    return in_range


def _hash_strings(
    values: np.ndarray | Sequence[object], present: np.ndarray, buckets: int, rows: np.ndarray
) -> np.ndarray:
    # Logs repeat values heavily (Zipf-like ids), so each distinct value is hashed once.
    cache: dict[str, int] = {}
    found = present.copy()
    for i in np.flatnonzero(present):
        value = values[i]
        if not isinstance(value, str):
            raise HashingError(
                f"expected a string at position {i}, got {type(value).__name__} {value!r}"
            )
        row = cache.get(value)
        if row is None:
            pre = np.array([hash_string(value)], dtype=np.uint64)
            row = int(splitmix64(pre)[0] % np.uint64(buckets))
            cache[value] = row
        rows[i] = row
    return found


def _plain(value: object) -> object:
    """A numpy scalar as the Python value a user wrote (``7``, not ``np.int64(7)``)."""
    return value.item() if isinstance(value, np.generic) else value
