"""Rows are split between ranks (and DataLoader workers) exactly once, in balanced slices."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

import trainer.data.reader as reader_module
from trainer.data._sharding import Piece, plan_pieces, shard_bounds
from trainer.data.reader import ImpressionReader

# Three files, uneven row groups, one of them a single row: 31 rows.
FILES_ROW_GROUPS = [[5, 3], [1], [7, 2, 13]]
TOTAL = 31


@pytest.fixture
def log_dir(tmp_path, tiny_columns, write_parquet):
    start = 0
    for index, groups in enumerate(FILES_ROW_GROUPS):
        rows = sum(groups)
        write_parquet(tmp_path / f"part-{index}.parquet", tiny_columns(rows, start), groups)
        start += rows
    return tmp_path


def test_shard_bounds_tile_the_rows_in_balanced_slices():
    # 10 rows over 4 shards: sizes 2, 3, 2, 3 (10 * s // 4 = 0, 2, 5, 7, 10).
    assert [shard_bounds(10, s, 4) for s in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [shard_bounds(2, s, 3) for s in range(3)] == [(0, 0), (0, 1), (1, 2)]


@pytest.mark.parametrize("bad", [(10, 0, 0), (10, 3, 3), (10, -1, 2), (-1, 0, 1)])
def test_shard_bounds_rejects_invalid_arguments(bad):
    with pytest.raises(ValueError):
        shard_bounds(*bad)


def test_plan_pieces_matches_the_worked_example():
    # The example of trainer/data/_sharding.py: a = [4, 3] rows, b = [3, 1] rows, 2 shards.
    groups = [[4, 3], [3, 1]]
    assert plan_pieces(groups, 0, 5) == [Piece(0, 0, 0, 4), Piece(0, 1, 0, 1)]
    assert plan_pieces(groups, 5, 11) == [Piece(0, 1, 1, 3), Piece(1, 0, 0, 3), Piece(1, 1, 0, 1)]
    assert plan_pieces(groups, 3, 3) == []


def _rows_read(reader: ImpressionReader) -> list[int]:
    return [int(r) for batch in reader for r in batch.group]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 40])
def test_every_row_is_read_exactly_once_across_ranks(log_dir, tiny_schema, world_size, shuffle):
    per_rank = [
        _rows_read(
            ImpressionReader(
                log_dir,
                tiny_schema,
                batch_size=4,
                shuffle=shuffle,
                shuffle_buffer=6,
                rank=rank,
                world_size=world_size,
            )
        )
        for rank in range(world_size)
    ]
    counts = Counter(r for rows in per_rank for r in rows)
    assert sorted(counts) == list(range(TOTAL))
    assert set(counts.values()) == {1}
    sizes = [len(rows) for rows in per_rank]
    assert max(sizes) - min(sizes) <= 1
    if not shuffle:
        # Contiguous slices, in order: rank r holds [r * 31 // W, (r + 1) * 31 // W).
        for rank, rows in enumerate(per_rank):
            lo, hi = rank * TOTAL // world_size, (rank + 1) * TOTAL // world_size
            assert rows == list(range(lo, hi))


def test_local_rows_and_batches_per_epoch(log_dir, tiny_schema):
    # 31 rows over 3 ranks: 10, 10, 11; batches of 4: 3, 3, 3 (or 2, 2, 2 with drop_last).
    readers = [
        ImpressionReader(log_dir, tiny_schema, batch_size=4, rank=r, world_size=3) for r in range(3)
    ]
    assert [r.local_rows for r in readers] == [10, 10, 11]
    assert [r.batches_per_epoch for r in readers] == [3, 3, 3]
    assert [len(list(r)) for r in readers] == [3, 3, 3]
    dropping = ImpressionReader(
        log_dir, tiny_schema, batch_size=4, drop_last=True, rank=0, world_size=3
    )
    assert dropping.batches_per_epoch == 2
    assert dropping.num_rows == TOTAL


def test_a_rank_reads_only_the_row_groups_its_slice_overlaps(log_dir, tiny_schema, monkeypatch):
    calls = []
    original = reader_module.read_row_group

    def spy(handle, part, row_group, columns):
        calls.append((part.source.location.name, row_group))
        return original(handle, part, row_group, columns)

    monkeypatch.setattr(reader_module, "read_row_group", spy)
    # Rank 1 of 2 owns rows [15, 31): file 2 only (rows 9..31), row groups 0, 1 and 2.
    reader = ImpressionReader(
        log_dir, tiny_schema, batch_size=8, shuffle=False, rank=1, world_size=2
    )
    assert _rows_read(reader) == list(range(15, 31))
    assert calls == [("part-2.parquet", 0), ("part-2.parquet", 1), ("part-2.parquet", 2)]


def test_dataloader_workers_split_a_ranks_rows_exactly_once(log_dir, tiny_schema):
    reader = ImpressionReader(
        log_dir, tiny_schema, batch_size=4, shuffle=True, rank=1, world_size=2
    )
    loader = DataLoader(reader, batch_size=None, num_workers=2, multiprocessing_context="fork")
    rows = sorted(int(r) for batch in loader for r in batch.group)
    assert rows == list(range(15, 31))


def test_rank_defaults_without_a_process_group(log_dir, tiny_schema):
    assert not torch.distributed.is_initialized()
    reader = ImpressionReader(log_dir, tiny_schema, batch_size=4)
    assert (reader.rank, reader.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ImpressionReader(log_dir, tiny_schema, batch_size=4, rank=2, world_size=2)
