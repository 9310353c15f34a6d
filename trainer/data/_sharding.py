"""Which rows each reader shard reads: contiguous, balanced slices of the global row range.

The files, in the reader's order, are seen as one table of ``N`` rows. Shard ``s`` of ``S`` owns
rows ``[s * N // S, (s + 1) * N // S)``: the slices tile ``[0, N)`` without gap or overlap and
their sizes differ by at most one row. A shard then reads only the row groups its slice overlaps,
and of the two at its ends only the overlapping rows::

    file        a.parquet           b.parquet
    row groups  [0 .. 4)[4 .. 7)    [7 .. 10)[10 .. 11)
    shard 0     [0 ........ 5)                                  pieces (a,0,0,4) (a,1,0,1)
    shard 1               [5 ............ 11)                   pieces (a,1,1,3) (b,0,0,3) (b,1,0,1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Piece", "plan_pieces", "shard_bounds"]


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one row group of one file (row indices inside the row group)."""

    file: int
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def shard_bounds(total_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The global row range ``[start, stop)`` owned by ``shard`` of ``num_shards``.

    Raises:
        ValueError: ``num_shards < 1``, ``shard`` outside ``[0, num_shards)`` or negative rows.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if total_rows < 0:
        raise ValueError(f"total_rows must be >= 0, got {total_rows}")
    return total_rows * shard // num_shards, total_rows * (shard + 1) // num_shards


def plan_pieces(row_group_rows: Sequence[Sequence[int]], start: int, stop: int) -> list[Piece]:
    """The pieces of row groups that cover global rows ``[start, stop)``, in file order.

    Args:
        row_group_rows: for each file, the row count of each of its row groups.
        start: first global row (inclusive).
        stop: last global row (exclusive).

    Returns:
        Non-empty pieces whose row counts sum to ``stop - start``.
    """
    pieces: list[Piece] = []
    offset = 0  # global index of the current row group's first row
    for file, groups in enumerate(row_group_rows):
        for row_group, rows in enumerate(groups):
            lo, hi = max(start, offset), min(stop, offset + rows)
            if lo < hi:
                pieces.append(Piece(file, row_group, lo - offset, hi - offset))
            offset += rows
            if offset >= stop:
                return pieces
    return pieces
