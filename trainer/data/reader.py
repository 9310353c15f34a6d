"""Streaming, rank-sharded reader of Parquet impression logs that yields TorchRec-ready batches.

Every rank (and every ``DataLoader`` worker) reads a contiguous, balanced slice of the rows of all
files together, so each row is read exactly once per epoch across ranks. Only the row groups that
overlap the slice are read, one at a time, with only the columns the schema needs; memory holds
one row group plus the shuffle buffer, never a whole file. Files are local paths or storage URIs
(``s3://bucket/logs``, read with ranged requests; see :mod:`schemas.storage`), and a directory of
hive partitions (``day=2026-12-01/``) is one log that a filter narrows.

Example::

    schema = load_schema("data/sim/schema.yaml")
    reader = ImpressionReader("data/sim/train", schema, batch_size=4096, shuffle=True, seed=0)
    for epoch in range(2):
        reader.set_epoch(epoch)
        for batch in reader:            # Batch(sparse=KJT, dense=(B, D), click=(B,), ...)
            ...

    # the last week of a day-partitioned log in object storage
    week = ImpressionReader("s3://logs/impressions", schema, batch_size=4096,
                            filter="day >= '2026-11-25'")

    # step-based training: epochs loop forever and the position can be checkpointed
    batches = infinite(reader)
    batch = next(batches)
    state = batches.state_dict()        # {"epoch": 0, "batch_in_epoch": 1}

The sparse batch, for keys ``user_id`` (single-valued) and ``recent_cats`` (``max_len`` 5)::

    rows            0            1        2
    user_id         [17]         [903]    [17]
    recent_cats     [3, 9, 41]   []       [9]
    KJT values      17 903 17 | 3 9 41 9       lengths 1 1 1 | 3 0 1
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from schemas import storage
from schemas.features import FeatureSchema
from trainer.data._dataset import load_dataset_schema
from trainer.data._decode import ColumnPlan, ReaderStats, decode_rows, plan_columns
from trainer.data._parquet import (
    DataError,
    ParquetPart,
    PathsLike,
    inspect_files,
    open_file,
    read_row_group,
    resolve_files,
)
from trainer.data._rows import Rows
from trainer.data._sharding import Piece, plan_pieces, shard_bounds
from trainer.data.batch import Batch, GroundTruth

__all__ = ["DataError", "EpochLoop", "ImpressionReader", "ReaderStats", "infinite"]


class ImpressionReader(IterableDataset[Batch]):
    """Reads Parquet impression logs as :class:`~trainer.data.batch.Batch` es of ``B`` rows.

    Files are validated against the schema when the reader is built (footers only: missing
    columns and wrong types fail here, before training); values are validated as they are read.

    With ``DataLoader(reader, batch_size=None, num_workers=k)`` each worker reads its own
    share of the rank's rows (still exactly once) and keeps its own ``stats``.

    Shuffling mixes at two levels, both seeded by ``(seed, epoch, shard)``: the order of the
    row-group pieces, and rows through a buffer of ``shuffle_buffer`` rows. The buffer is shuffled
    and drained in bulk, so it peaks at about ``shuffle_buffer + max(batch_size,
    shuffle_buffer // 2)`` rows plus one row group.

    With ``group_rows`` the buffer is shuffled by group instead of by row: the rows of one group
    (the schema's group column, e.g. the user) come out together, in runs of at most
    ``group_rows`` rows, runs in random order and rows in random order within a run. A batch
    then holds a few groups' rows, which a within-group loss needs (a pairwise ranking term
    compares a user's items with each other; random batches of a large log rarely hold two
    rated items of one user).

    Args:
        paths: a directory of ``*.parquet`` files, a file, or a list of either, as local paths
            or storage URIs (``s3://bucket/logs``, see :mod:`schemas.storage`). A directory of
            hive partitions (``day=2026-12-01/part-0.parquet``) is read as one log; its partition
            columns are read only if the schema names them.
        schema: the feature schema the files follow.
        batch_size: rows per batch ``B``.
        shuffle: shuffle rows (training); False keeps file order (evaluation). Default True.
        shuffle_buffer: rows held to shuffle across row groups; 0 shuffles within row groups
            only. Default 200_000.
        seed: base seed of the shuffle. Default 0.
        group_rows: > 0: shuffle in runs of at most this many rows of one group (see above);
            needs a schema with a group column and ``shuffle``. Default 0 (rows shuffled alone).
        drop_last: drop the last partial batch of each epoch (counted in ``stats.rows_dropped``)
            instead of yielding it. Default False.
        with_truth: read the ground-truth columns: None reads them if every file has them,
            True requires them, False ignores them. Default None.
        rank: this process's rank; default ``torch.distributed.get_rank()`` if initialised, else 0.
        world_size: number of ranks; default ``torch.distributed.get_world_size()`` if
            initialised, else 1.
        filter: keeps the hive partitions it selects, e.g. ``"day >= '2026-11-25'"``: Python
            comparisons of partition columns with constants, ``in``, ``and``, ``or``, ``not``.
            Default None (every file).

    Raises:
        DataError: no files, unreadable files, a column missing or of the wrong type, ground
            truth in only some files, an invalid filter or one that selects no file.
        StorageError: a missing bucket, denied access, an unreachable store (also while
            iterating, after the store's retries).
        ValueError: a non-positive ``batch_size``, a negative ``shuffle_buffer`` or
            ``group_rows``, ``group_rows`` without a group column or without ``shuffle``, an
            invalid ``rank`` / ``world_size``.
    """

    def __init__(
        self,
        paths: PathsLike,
        schema: FeatureSchema,
        *,
        batch_size: int,
        shuffle: bool = True,
        shuffle_buffer: int = 200_000,
        seed: int = 0,
        group_rows: int = 0,
        drop_last: bool = False,
        with_truth: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        filter: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if group_rows < 0:
            raise ValueError(f"group_rows must be >= 0, got {group_rows}")
        if group_rows and schema.group is None:
            raise ValueError(
                f"group_rows={group_rows} shuffles by group, but the schema names no group column"
            )
        if group_rows and not shuffle:
            raise ValueError(f"group_rows={group_rows} applies to shuffled reading only")
        self.schema = schema
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.group_rows = group_rows
        self.drop_last = drop_last
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.filter = filter
        self.parts: list[ParquetPart] = inspect_files(resolve_files(paths, filter=filter))
        self.files: list[str] = [part.path for part in self.parts]
        self.plan: ColumnPlan = plan_columns(schema, self.parts, with_truth)
        self.stats = ReaderStats.for_schema(schema)
        self.epoch = 0

    @classmethod
    def from_dataset(
        cls, root: str | Path | storage.Location, split: str, **kwargs: Any
    ) -> ImpressionReader:
        """A reader of ``root/<split>/*.parquet`` with the schema in ``root/schema.yaml``.

        ``root`` is a local path or a URI. ``shuffle`` defaults to ``split == "train"``; other
        keyword arguments go to the constructor.

        Raises:
            DataError: ``root`` holds no ``schema.yaml``: not a data set, or one whose writer is
                still running or failed (writers publish the schema after every part file).

        Example::

            train = ImpressionReader.from_dataset("data/sim", "train", batch_size=4096)
            test = ImpressionReader.from_dataset("s3://bucket/sim", "test", batch_size=8192)
        """
        root = storage.resolve(root)
        kwargs.setdefault("shuffle", split == "train")
        return cls(root.join(split), load_dataset_schema(root), **kwargs)

    # Sizes -------------------------------------------------------------------------------------

    @property
    def with_truth(self) -> bool:
        """Whether batches carry ground truth."""
        return self.plan.truth

    @property
    def num_rows(self) -> int:
        """Rows of all files together, across all ranks."""
        return sum(part.num_rows for part in self.parts)

    @property
    def local_rows(self) -> int:
        """Rows this rank reads per epoch."""
        start, stop = shard_bounds(self.num_rows, self.rank, self.world_size)
        return stop - start

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (without ``DataLoader`` workers)."""
        full, rest = divmod(self.local_rows, self.batch_size)
        return full + int(rest > 0 and not self.drop_last)

    # Iteration ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter(reader)`` reads; it seeds the shuffle."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, *, skip_batches: int = 0) -> Iterator[Batch]:
        """The batches of one epoch of this rank (and ``DataLoader`` worker).

        Args:
            epoch: the epoch; with ``seed`` and the shard it fixes the shuffle.
            skip_batches: batches to skip, to resume mid-epoch. Their rows are still read (the
                shuffle depends on them) but no batch is built.
        """
        shard, num_shards = self._shard()
        start, stop = shard_bounds(self.num_rows, shard, num_shards)
        pieces = plan_pieces([p.row_group_rows for p in self.parts], start, stop)
        rng = np.random.default_rng([self.seed, epoch, shard]) if self.shuffle else None
        if rng is not None:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        for index, rows in enumerate(self._cut(self._decode(pieces), rng)):
            if index < skip_batches:
                self.stats.rows_skipped += len(rows)
                continue
            self.stats.batches += 1
            self.stats.rows_yielded += len(rows)
            yield self._to_batch(rows)

    def _shard(self) -> tuple[int, int]:
        """This rank's shard; ``DataLoader`` workers split their rank's share further."""
        worker = get_worker_info()
        if worker is None:
            return self.rank, self.world_size
        return self.rank * worker.num_workers + worker.id, self.world_size * worker.num_workers

    def _decode(self, pieces: list[Piece]) -> Iterator[Rows]:
        """Decoded pieces, in order, holding one file open at a time."""
        handle: pq.ParquetFile | None = None
        handle_file = -1
        columns = self.plan.columns
        try:
            for piece in pieces:
                part = self.parts[piece.file]
                if piece.file != handle_file:
                    if handle is not None:
                        handle.close(force=True)
                    handle, handle_file = open_file(part), piece.file
                table = read_row_group(handle, part, piece.row_group, columns)
                if piece.num_rows != table.num_rows:
                    table = table.slice(piece.start, piece.num_rows)
                yield decode_rows(table, self.plan, part, piece.row_group, piece.start, self.stats)
        finally:
            if handle is not None:
                handle.close(force=True)

    def _cut(self, chunks: Iterator[Rows], rng: np.random.Generator | None) -> Iterator[Rows]:
        """Rows of ``batch_size`` (the last one possibly smaller), through the shuffle buffer.

        Without shuffling the buffer only carries the remainder of a chunk to the next one.
        """
        keep = self.shuffle_buffer if rng is not None else 0
        # Shuffling the buffer costs O(len); draining at least keep // 2 rows per shuffle keeps
        # that at a few copies per row even when row groups are small.
        drain_at = keep + max(self.batch_size, keep // 2)
        size = self.batch_size
        pending: list[Rows] = []
        held = 0
        for chunk in chunks:
            pending.append(chunk)
            held += len(chunk)
            if held < drain_at:
                continue
            buffer = self._mix(Rows.concat(pending), rng)
            ready = (held - keep) // size * size
            for start in range(0, ready, size):
                yield buffer.slice(start, start + size)
            pending, held = [buffer.slice(ready, held)], held - ready
        if not held:
            return
        buffer = self._mix(Rows.concat(pending), rng)
        tail = held % size
        for start in range(0, held - tail, size):
            yield buffer.slice(start, start + size)
        if tail and self.drop_last:
            self.stats.rows_dropped += tail
        elif tail:
            yield buffer.slice(held - tail, held)

    def _mix(self, rows: Rows, rng: np.random.Generator | None) -> Rows:
        if rng is None:
            return rows
        if self.group_rows:
            return rows.take(group_runs_order(rows.group, self.group_rows, rng))
        return rows.take(rng.permutation(len(rows)))

    def _to_batch(self, rows: Rows) -> Batch:
        n = len(rows)
        single = np.ascontiguousarray(rows.single.T)  # (S, B): KJT values are key-major
        values: list[np.ndarray] = []
        lengths = np.ones((len(self.plan.sparse), n), dtype=np.int32)
        for key, column in enumerate(self.plan.sparse):
            if column.feature.multi_valued:
                values.append(rows.multi_values[column.slot])
                lengths[key] = rows.lengths(column.slot)
            else:
                values.append(single[column.slot])
        sparse = KeyedJaggedTensor(
            keys=self.schema.sparse_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(lengths.reshape(-1)),
            stride=n,
        )
        labels = np.ascontiguousarray(rows.labels.T)
        truth = None
        if rows.truth is not None:
            t = np.ascontiguousarray(rows.truth.T)
            truth = GroundTruth(*(torch.from_numpy(t[j]) for j in range(3)))
        return Batch(
            sparse=sparse,
            dense=torch.from_numpy(np.ascontiguousarray(rows.dense)),
            click=torch.from_numpy(labels[0]),
            conversion=torch.from_numpy(labels[1]),
            group=None
            if rows.group is None
            else torch.from_numpy(np.ascontiguousarray(rows.group)),
            truth=truth,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(files={len(self.files)}, rows={self.num_rows:,}, "
            f"rank={self.rank}/{self.world_size}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, shuffle_buffer={self.shuffle_buffer}, seed={self.seed}, "
            + (f"group_rows={self.group_rows}, " if self.group_rows else "")
            + f"truth={self.with_truth}"
            + (f", filter={self.filter!r})" if self.filter else ")")
        )


def group_runs_order(group: np.ndarray, run: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``len(group)`` rows that keeps each group's rows together in runs of at
    most ``run`` rows: rows shuffled within their group, each group cut into runs, the runs
    shuffled. Every row appears exactly once."""
    order = rng.permutation(len(group))
    order = order[np.argsort(group[order], kind="stable")]  # by group, random within a group
    position = np.arange(len(order))
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = group[order][1:] != group[order][:-1]
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    new_run = new_group | ((position - group_start) % run == 0)
    run_id = np.cumsum(new_run) - 1
    run_key = rng.permutation(run_id[-1] + 1) if len(order) else run_id
    return order[np.argsort(run_key[run_id], kind="stable")]


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class EpochLoop(Iterator[Batch]):
    """Loops a reader's epochs forever, for step-based training where ranks must not run dry.

    Ranks' shares differ by at most one row, so their epochs end within one batch of each
    other; each simply starts its next epoch. The position is a checkpointable state.

    Args:
        reader: the reader.
        start_epoch: the epoch to start with. Default 0.
        skip_batches: batches of ``start_epoch`` to skip (resume). Default 0.

    Raises:
        DataError: (from ``next``) an epoch yields no batch on this rank, so looping would never
            produce one (fewer rows than ranks, or fewer than ``batch_size`` with ``drop_last``).
    """

    def __init__(
        self, reader: ImpressionReader, start_epoch: int = 0, skip_batches: int = 0
    ) -> None:
        self.reader = reader
        self.epoch = start_epoch
        self.batch_in_epoch = skip_batches
        self._batches: Iterator[Batch] | None = None

    def __next__(self) -> Batch:
        for _ in range(2):
            if self._batches is None:
                self.reader.set_epoch(self.epoch)
                self._batches = self.reader.iter_epoch(self.epoch, skip_batches=self.batch_in_epoch)
            batch = next(self._batches, None)
            if batch is not None:
                self.batch_in_epoch += 1
                return batch
            self.epoch, self.batch_in_epoch, self._batches = self.epoch + 1, 0, None
        raise DataError(
            f"rank {self.reader.rank} of {self.reader.world_size} got no batch in a whole epoch "
            f"({self.reader.local_rows} rows, batch_size {self.reader.batch_size}, drop_last "
            f"{self.reader.drop_last}); use fewer ranks, more data or drop_last=False"
        )

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch_in_epoch"}``: batches already taken from the current epoch."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position from :meth:`state_dict` (the next batch is the one after it)."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._batches = None


def infinite(reader: ImpressionReader, *, start_epoch: int = 0, skip_batches: int = 0) -> EpochLoop:
    """Batches of ``reader`` over epochs ``start_epoch, start_epoch + 1, ...`` without end.

    Example::

        batches = infinite(reader)
        for step in range(num_steps):
            batch = next(batches)
    """
    return EpochLoop(reader, start_epoch=start_epoch, skip_batches=skip_batches)
