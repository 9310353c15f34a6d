"""Decoded impressions held column by column in numpy, with the few vectorised row operations the
reader needs (take, slice, concatenate) to shuffle and cut batches without Python per-row loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Rows"]


@dataclass(frozen=True)
class Rows:
    """``n`` impressions, already mapped to embedding rows and normalised.

    Attributes:
        single: ``(n, S)`` int64 row ids of the ``S`` single-valued sparse features; row-major
            so that shuffling gathers whole rows (a random gather per feature column is several
            times slower).
        multi_values: per multi-valued sparse feature, the flat int64 row ids of all its lists.
        multi_offsets: per multi-valued sparse feature, ``(n + 1,)`` int64 offsets into
            ``multi_values``; row ``i`` holds ``values[offsets[i]:offsets[i + 1]]``.
        dense: ``(n, D)`` float32 normalised dense features.
        labels: ``(n, 2)`` float32 click and conversion labels.
        group: ``(n,)`` int64 group ids, or None.
        truth: ``(n, 3)`` float32 ``true_ctr``, ``true_cvr``, ``cf_conversion``, or None.
    """

    single: np.ndarray
    multi_values: tuple[np.ndarray, ...]
    multi_offsets: tuple[np.ndarray, ...]
    dense: np.ndarray
    labels: np.ndarray
    group: np.ndarray | None = None
    truth: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def lengths(self, feature: int) -> np.ndarray:
        """``(n,)`` list lengths of multi-valued feature ``feature``."""
        return np.diff(self.multi_offsets[feature])

    def take(self, index: np.ndarray) -> Rows:
        """The rows at ``index`` (int array), in that order."""
        multi = [
            _take_jagged(v, o, index)
            for v, o in zip(self.multi_values, self.multi_offsets, strict=True)
        ]
        return Rows(
            single=self.single[index],
            multi_values=tuple(v for v, _ in multi),
            multi_offsets=tuple(o for _, o in multi),
            dense=self.dense[index],
            labels=self.labels[index],
            group=None if self.group is None else self.group[index],
            truth=None if self.truth is None else self.truth[index],
        )

    def slice(self, start: int, stop: int) -> Rows:
        """Rows ``[start, stop)`` as views, no copy."""
        return Rows(
            single=self.single[start:stop],
            multi_values=tuple(
                v[o[start] : o[stop]]
                for v, o in zip(self.multi_values, self.multi_offsets, strict=True)
            ),
            multi_offsets=tuple(o[start : stop + 1] - o[start] for o in self.multi_offsets),
            dense=self.dense[start:stop],
            labels=self.labels[start:stop],
            group=None if self.group is None else self.group[start:stop],
            truth=None if self.truth is None else self.truth[start:stop],
        )

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` one after another (all parts come from one reader)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        num_multi = len(first.multi_values)
        return Rows(
            single=np.concatenate([p.single for p in parts]),
            multi_values=tuple(
                np.concatenate([p.multi_values[k] for p in parts]) for k in range(num_multi)
            ),
            multi_offsets=tuple(
                _concat_offsets([p.multi_offsets[k] for p in parts]) for k in range(num_multi)
            ),
            dense=np.concatenate([p.dense for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            group=None if first.group is None else np.concatenate([p.group for p in parts]),
            truth=None if first.truth is None else np.concatenate([p.truth for p in parts]),
        )


def _take_jagged(
    values: np.ndarray, offsets: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    new_offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # Output element j of row i sits at new_offsets[i] + r and comes from starts[i] + r, so its
    # source is j + (starts[i] - new_offsets[i]).
    shift = np.repeat(starts - new_offsets[:-1], lengths)
    source = np.arange(new_offsets[-1], dtype=np.int64) + shift
    return values[source], new_offsets


def _concat_offsets(offsets: Sequence[np.ndarray]) -> np.ndarray:
    out = [offsets[0]]
    base = offsets[0][-1]
    for o in offsets[1:]:
        out.append(o[1:] + base)
        base = base + o[-1]
    return np.concatenate(out)
