"""Which trained row each row of a (possibly resized) embedding table starts from.

A table has ``buckets + 1`` rows; the last is the OOV row (a missing value, an id outside the
vocabulary, see ``schemas.rules``). What "the same row" means depends on how ids reach rows:

- **vocabulary** (``vocab_size``): an id *is* its row, so rows ``0 .. min(V, V') - 1`` keep
  their trained values; a grown table initialises the new ids' rows as usual, a shrunk one
  drops the rows of the ids it no longer has (they read the OOV row from now on).
- **hashed** (``hash_buckets``): an id reads row ``splitmix64(id) mod B``; changing ``B``
  moves ids. When the new bucket count is a whole multiple of the old one (``B' = k B``),
  ``h mod B = (h mod B') mod B``, so new row ``r`` starts from old row ``r mod B`` and **every
  id keeps its trained embedding** (ids that shared a bucket start equal and drift apart as
  they train): the way to grow a hashed table. Otherwise rows are kept by position (row ``r``
  from row ``r`` for ``r < min(B, B')``, the rest initialised as usual), which is only what it
  says: an id keeps its trained row when its bucket happens not to move, ``min(B, B') /
  lcm(B, B')`` of the ids (e.g. a third from 1000 to 1500 buckets, almost none from 1000 to
  1001); the others read some other bucket's trained row until they are retrained.
- **the OOV row** always starts from the old OOV row: it means the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, unique

import torch

from trainer.warm_start._layout import TableLayout

__all__ = ["RowMap", "RowRule", "row_map"]


@unique
class RowRule(str, Enum):
    SAME = "same"  # the same rows: every row from itself
    VOCABULARY = "vocabulary"  # vocabulary resized: every id still in both keeps its row
    MODULO = "modulo"  # hash buckets x k: row r from row r mod B, every id keeps its embedding
    POSITION = "position"  # hash buckets changed otherwise: rows kept by position only


@dataclass(frozen=True)
class RowMap:
    """Where each row of a resized table starts from.

    Attributes:
        rule: how the rows were matched.
        sources: ``(rows,)`` int64, the source row of each row, ``-1`` where the row keeps the
            new run's own initialisation.
        ids_kept: the share of ids whose row starts from their own trained values (for a
            hashed table, over uniformly spread hashes; for a vocabulary, of the new ids).
    """

    rule: RowRule
    sources: torch.Tensor
    ids_kept: float

    @property
    def carried(self) -> int:
        """Rows that start from a trained row."""
        return int((self.sources >= 0).sum())


def row_map(source: TableLayout, target: TableLayout) -> RowMap:
    """The rows of ``target`` that start from rows of ``source`` (same dim and kind of ids).

    Example::

        row_map(hashed(buckets=1000), hashed(buckets=2000)).sources[1500]  # 500
    """
    old, new = source.buckets, target.buckets
    rows = torch.full((target.rows,), -1, dtype=torch.int64)
    rows[new] = old  # the OOV row
    if old == new:
        return RowMap(RowRule.SAME, torch.arange(target.rows), 1.0)
    if not target.hashed:
        kept = min(old, new)
        rows[:kept] = torch.arange(kept)
        return RowMap(RowRule.VOCABULARY, rows, kept / new)
    if new % old == 0:
        rows[:new] = torch.arange(new) % old
        return RowMap(RowRule.MODULO, rows, 1.0)
    kept = min(old, new)
    rows[:kept] = torch.arange(kept)
    return RowMap(RowRule.POSITION, rows, kept / math.lcm(old, new))
