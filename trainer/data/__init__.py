"""Impression logs: the Parquet reader that feeds training, and a simulator with ground truth.

Example::

    from trainer.data import ImpressionReader, SimulatorConfig, infinite, simulate

    simulate(SimulatorConfig(rows=100_000, seed=0), "data/sim")   # or "s3://bucket/sim"
    reader = ImpressionReader.from_dataset("data/sim", "train", batch_size=4096)
    batch = next(infinite(reader))

Paths may be storage URIs (:mod:`schemas.storage`); a directory of hive partitions
(``day=2026-12-01/``) is one log, narrowed by ``ImpressionReader(..., filter="day >= '...'")``.

Public data sets and rating logs are converted to the same layout by
:mod:`trainer.data.converters` (Coat, any MNAR rating log, Ali-CCP, AliExpress).

The command line: ``python -m trainer.data --help``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "TRUTH_COLUMNS",
    "Batch",
    "DataError",
    "EpochLoop",
    "GroundTruth",
    "ImpressionReader",
    "LogSummary",
    "ReaderStats",
    "SimulationResult",
    "SimulatorConfig",
    "find_schema",
    "format_summaries",
    "infinite",
    "load_dataset_schema",
    "normalize_dense",
    "simulate",
    "simulated_schema",
    "summarize",
]

# Names are imported on first use: the simulator and the stats command need neither torch nor
# torchrec, whose import alone takes seconds.
_SOURCES = {
    "TRUTH_COLUMNS": "trainer.data.batch",
    "Batch": "trainer.data.batch",
    "GroundTruth": "trainer.data.batch",
    "DataError": "trainer.data._parquet",
    "find_schema": "trainer.data._dataset",
    "load_dataset_schema": "trainer.data._dataset",
    "ReaderStats": "trainer.data._decode",
    "normalize_dense": "trainer.data._decode",
    "EpochLoop": "trainer.data.reader",
    "ImpressionReader": "trainer.data.reader",
    "infinite": "trainer.data.reader",
    "LogSummary": "trainer.data.summary",
    "format_summaries": "trainer.data.summary",
    "summarize": "trainer.data.summary",
    "SimulationResult": "trainer.data.simulator",
    "SimulatorConfig": "trainer.data.simulator",
    "simulate": "trainer.data.simulator",
    "simulated_schema": "trainer.data.simulator",
}

if TYPE_CHECKING:
    from trainer.data._dataset import find_schema, load_dataset_schema
    from trainer.data._decode import ReaderStats, normalize_dense
    from trainer.data._parquet import DataError
    from trainer.data.batch import TRUTH_COLUMNS, Batch, GroundTruth
    from trainer.data.reader import EpochLoop, ImpressionReader, infinite
    from trainer.data.simulator import (
        SimulationResult,
        SimulatorConfig,
        simulate,
        simulated_schema,
    )
    from trainer.data.summary import LogSummary, format_summaries, summarize


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
