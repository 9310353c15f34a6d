"""Shared fixtures of the data tests: a tiny hand-checkable schema and log, a small simulation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.features import FeatureSchema
from trainer.data.simulator import SimulationResult, SimulatorConfig, simulate

# Every row carries its index in ``rid`` (the group column), so tests can follow rows through
# sharding and shuffling.
TINY_SCHEMA = {
    "tables": [{"name": "cats", "vocab_size": 10, "dim": 4}],
    "sparse": [
        {"name": "uid", "dtype": "int", "hash_buckets": 1000, "dim": 4},
        {"name": "city", "dtype": "string", "hash_buckets": 50, "dim": 4},
        {"name": "cat", "table": "cats"},
        {"name": "hist", "table": "cats", "multi_valued": True, "max_len": 2},
    ],
    "dense": [
        {"name": "price", "default": 2.0, "normalization": {"kind": "log1p"}},
        {
            "name": "activity",
            "default": 10.0,
            "normalization": {"kind": "standard", "mean": 2.0, "std": 4.0},
        },
    ],
    "labels": {"click": "click", "conversion": "conversion"},
    "group": "rid",
}


@pytest.fixture
def tiny_schema_data() -> dict:
    """The tiny schema as a dict, a fresh copy to edit."""
    return copy.deepcopy(TINY_SCHEMA)


@pytest.fixture
def tiny_schema() -> FeatureSchema:
    return FeatureSchema.from_dict(TINY_SCHEMA)


def _tiny_columns(n: int, start: int = 0) -> dict[str, pa.Array]:
    """Valid columns of rows ``start .. start + n``: click on rid % 3 == 0, conversion on
    rid % 6 == 0 (a subset of the clicks)."""
    rid = list(range(start, start + n))
    return {
        "rid": pa.array(rid, pa.int64()),
        "uid": pa.array([7 * r for r in rid], pa.int64()),
        "city": pa.array([f"c{r % 5}" for r in rid], pa.string()),
        "cat": pa.array([r % 10 for r in rid], pa.int64()),
        "hist": pa.array([[r % 10] for r in rid], pa.list_(pa.int64())),
        "price": pa.array([float(r) for r in rid], pa.float64()),
        "activity": pa.array([2.0] * n, pa.float32()),
        "click": pa.array([int(r % 3 == 0) for r in rid], pa.int8()),
        "conversion": pa.array([int(r % 6 == 0) for r in rid], pa.int8()),
    }


def _write_parquet(
    path: Path, columns: dict[str, pa.Array | list], row_groups: Sequence[int] | None = None
) -> Path:
    """Write ``columns`` with the given row group sizes (default: one row group)."""
    table = pa.table(columns)
    sizes = list(row_groups) if row_groups is not None else [table.num_rows]
    assert sum(sizes) == table.num_rows, "row group sizes must add up to the rows"
    with pq.ParquetWriter(path, table.schema) as writer:
        offset = 0
        for size in sizes:
            writer.write_table(table.slice(offset, size), row_group_size=max(size, 1))
            offset += size
    return path


def _small_config(**overrides: object) -> SimulatorConfig:
    """A fast simulation: small population, several row groups and part files."""
    base = {
        "rows": 20_000,
        "seed": 7,
        "num_users": 3_000,
        "num_items": 2_000,
        "row_group_rows": 3_000,
        "file_rows": 9_000,
        "calibration_rows": 50_000,
    }
    base.update(overrides)
    return SimulatorConfig(**base)


# Helpers are handed out as fixtures (factories): test modules here have no package to import
# shared code from.


@pytest.fixture
def tiny_columns() -> Callable[..., dict[str, pa.Array]]:
    return _tiny_columns


@pytest.fixture
def write_parquet() -> Callable[..., Path]:
    return _write_parquet


@pytest.fixture(scope="session")
def small_config() -> Callable[..., SimulatorConfig]:
    return _small_config


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    return simulate(_small_config(), tmp_path_factory.mktemp("sim"), progress=False)
