"""Raw feature values to embedding row ids: the hash functions under the feature rules.

The mapping is deterministic and independent of the process, the platform and
``PYTHONHASHSEED`` (Python's ``hash()`` is never used):

* integer values: ``splitmix64(value as uint64)``;
* string values: the first 8 bytes of ``blake2b(utf-8 bytes)`` read little-endian, then
  ``splitmix64``;

and a hashed table takes that 64-bit number modulo ``hash_buckets``. A ``vocab_size`` table uses
integer values as row ids directly (:func:`vocab_rows`). What happens to missing and
out-of-vocabulary values, lists and dense values is ``schemas.rules``, built on these functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = [
    "HashingError",
    "hash_ints",
    "hash_string",
    "hash_strings",
    "splitmix64",
    "vocab_rows",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class HashingError(ValueError):
    """Raw values cannot be mapped to rows: values of the wrong type, or a value the feature's
    ``OOVPolicy.ERROR`` refuses (``schemas.rules.map_values``)."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on a uint64 array (wraps modulo 2**64)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_string(value: str) -> int:
    """The 64-bit pre-hash of one string (before splitmix64)."""
    return int.from_bytes(_digest(value), "little")


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


def vocab_rows(
    values: np.ndarray, buckets: int | np.ndarray, present: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of integer values in ``vocab_size`` tables: the value itself within ``[0, buckets)``,
    else the OOV row ``buckets`` (broadcast as in :func:`hash_ints`); a value under
    ``present == False`` (missing) reads the OOV row too.

    Returns:
        int64 row ids, and the mask of values present and within the vocabulary.
    """
    found = (values >= 0) & (values < buckets)
    if present is not None:
        found &= present
    return np.where(found, values, buckets), found


def hash_strings(values: Sequence[str], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of strings in a hashed table: ``splitmix64(hash_string(value)) % buckets``.

    Hashing costs one blake2b call per value, so callers pass distinct values (see
    ``schemas.rules.string_rows``).

    Args:
        values: strings (no ``None``).
        buckets: the table's ``hash_buckets``.

    Returns:
        int64 row ids, and a mask of the strings that could be hashed: False for a string that
        cannot be encoded as UTF-8 (a lone surrogate), whose row is then 0.
    """
    try:
        digests = b"".join([_digest(value) for value in values])
        encodable = np.ones(len(values), dtype=bool)
    except UnicodeEncodeError:
        encodable = np.fromiter(map(_is_utf8, values), dtype=bool, count=len(values))
        digests = b"".join(
            _digest(value) if ok else bytes(8) for value, ok in zip(values, encodable)
        )
    pre = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    rows = (splitmix64(pre) % np.uint64(buckets)).astype(np.int64)
    rows[~encodable] = 0
    return rows, encodable


def _digest(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
