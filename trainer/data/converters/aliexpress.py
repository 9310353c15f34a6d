"""AliExpress (Li et al., CIKM 2020; the AITM / MTReclib benchmark) as impression logs.

Expected files in ``SRC``, one directory per country (``AliExpress_NL``, ``_ES``, ``_FR``,
``_US``, ``_RU``), as distributed for the multi-task benchmarks::

    train.csv   search_id,categorical_1,...,categorical_16,numerical_1,...,numerical_63,click,conversion
    test.csv    (same columns)

Columns are found by name, so another number of ``categorical_*`` / ``numerical_*`` columns
works too; ``search_id``, ``click`` and ``conversion`` are required. The files are streamed
line by line.

The result (``python -m trainer.data convert aliexpress --src SRC --out OUT``): ``OUT/train/``
and ``OUT/test/`` with the categorical columns as ``int64`` sparse features, the numerical
columns as ``float32`` dense features, ``click``, ``conversion`` and ``group`` (the search id,
for GAUC over the items of one search). Each sparse feature indexes its table with its value
(``vocab_size`` = the largest value seen in either split + 1) when every value is a
non-negative integer below 2^22, else it is hashed into 2^20 buckets. Dense features are
standardised with the mean and standard deviation of the training split (1 where a column
is constant), computed while converting. The release does not say which columns describe the
user and which the item, so every feature keeps the default ``scope: any`` (a ranking request
may give each in its context or per candidate).

Malformed lines are counted per reason and skipped (``--strict`` stops at the first): a wrong
number of fields, a categorical value or search id that is not an integer, a numerical value
that is not a finite number, a label that is not 0/1, a conversion without a click.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.features import FeatureSchema
from schemas.layout import TEST_SPLIT, TRAIN_SPLIT
from trainer.data.converters._output import (
    ConversionError,
    ConversionResult,
    MalformedLines,
    SplitWriter,
    finish_dataset,
    numbered_lines,
    prepare_dataset_dir,
)
from trainer.data.summary import LogSummary

__all__ = ["AliExpressConfig", "convert_aliexpress"]

_SPLITS = (TRAIN_SPLIT, TEST_SPLIT)
_MAX_VOCAB = 1 << 22
_HASH_BUCKETS = 1 << 20
_LABELS = ("click", "conversion")


@dataclass(frozen=True)
class AliExpressConfig:
    """Embedding dimension and file layout.

    Raises:
        ValueError: (on construction) a size below 1.
    """

    dim: int = 16
    row_group_rows: int = 100_000
    file_rows: int = 2_000_000

    def __post_init__(self) -> None:
        small = {k: v for k, v in asdict(self).items() if v < 1}
        if small:
            raise ValueError(f"invalid AliExpress config: {small} (every size must be >= 1)")


@dataclass(frozen=True)
class _Layout:
    """Where each role sits in a line, from the header."""

    width: int
    search_id: int
    categorical: tuple[tuple[str, int], ...]
    numerical: tuple[tuple[str, int], ...]
    click: int
    conversion: int

    @classmethod
    def from_header(cls, path: Path, header: list[str]) -> _Layout:
        required = ("search_id", *_LABELS)
        missing = [name for name in required if name not in header]
        if missing:
            raise ConversionError(f"{path}, line 1: header lacks {missing}; it has {header[:8]}...")
        categorical = tuple((n, j) for j, n in enumerate(header) if n.startswith("categorical_"))
        numerical = tuple((n, j) for j, n in enumerate(header) if n.startswith("numerical_"))
        if not categorical:
            raise ConversionError(f"{path}, line 1: no categorical_* column in the header")
        return cls(
            width=len(header),
            search_id=header.index("search_id"),
            categorical=categorical,
            numerical=numerical,
            click=header.index("click"),
            conversion=header.index("conversion"),
        )


@dataclass
class _Statistics:
    """Running value ranges of the categorical columns and moments of the numerical ones."""

    low: np.ndarray
    high: np.ndarray
    count: int
    total: np.ndarray
    total_squares: np.ndarray

    @classmethod
    def empty(cls, layout: _Layout) -> _Statistics:
        k, d = len(layout.categorical), len(layout.numerical)
        big = np.iinfo(np.int64).max
        return cls(np.full(k, big), np.full(k, -big), 0, np.zeros(d), np.zeros(d))

    def add_categorical(self, values: np.ndarray) -> None:
        self.low = np.minimum(self.low, values.min(axis=0))
        self.high = np.maximum(self.high, values.max(axis=0))

    def add_numerical(self, values: np.ndarray) -> None:
        self.count += len(values)
        self.total += values.sum(axis=0)
        self.total_squares += np.square(values).sum(axis=0)


def convert_aliexpress(
    src: str | Path,
    out_dir: str | Path,
    cfg: AliExpressConfig = AliExpressConfig(),
    *,
    strict: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert one AliExpress country directory (``train.csv``, ``test.csv``) into ``out_dir``.

    Raises:
        ConversionError: a missing file, a header without the required columns, the two files
            with different headers, or (strict) a malformed line.
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    src = Path(src)
    files = {split: src / f"{split}.csv" for split in _SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConversionError(
            f"AliExpress files not found: {missing} (expected train.csv and test.csv in {src})"
        )
    layouts = {split: _Layout.from_header(path, _header(path)) for split, path in files.items()}
    if layouts["train"] != layouts["test"]:
        raise ConversionError(f"{files['train']} and {files['test']} have different headers")
    layout = layouts["train"]
    out = prepare_dataset_dir(out_dir, _SPLITS, overwrite)
    malformed = MalformedLines(strict=strict)
    arrow_schema = _arrow_schema(layout)
    statistics = {split: _Statistics.empty(layout) for split in _SPLITS}
    summaries: dict[str, LogSummary] = {}
    for split, path in files.items():
        with SplitWriter(out.join(split), arrow_schema, file_rows=cfg.file_rows) as writer:
            for chunk in _chunks(path, layout, cfg.row_group_rows, malformed):
                statistics[split].add_categorical(chunk.categorical)
                statistics[split].add_numerical(chunk.numerical)
                writer.write(chunk.table(layout, arrow_schema))
        summaries[split] = writer.summary
    if summaries["train"].rows == 0:
        raise ConversionError(
            f"{files['train']}: no line could be converted ({malformed.format()})"
        )
    schema = _schema(layout, statistics, cfg.dim)
    record = {
        "converter": "aliexpress",
        "source": {s: str(p) for s, p in files.items()},
        "config": asdict(cfg),
    }
    return finish_dataset(out, schema, summaries, malformed, record, started)


def _header(path: Path) -> list[str]:
    for _, line in numbered_lines(path):
        return [name.strip() for name in line.rstrip("\r\n").split(",")]
    raise ConversionError(f"{path}: empty file, expected a header line")


@dataclass(frozen=True)
class _Chunk:
    search_id: np.ndarray
    categorical: np.ndarray  # (n, K) int64
    numerical: np.ndarray  # (n, D) float64
    labels: np.ndarray  # (n, 2) int8

    def table(self, layout: _Layout, arrow_schema: pa.Schema) -> pa.Table:
        columns = [pa.array(self.categorical[:, k]) for k in range(len(layout.categorical))]
        columns += [
            pa.array(self.numerical[:, d].astype(np.float32)) for d in range(len(layout.numerical))
        ]
        columns += [
            pa.array(self.labels[:, 0]),
            pa.array(self.labels[:, 1]),
            pa.array(self.search_id),
        ]
        return pa.Table.from_arrays(columns, schema=arrow_schema)


def _chunks(
    path: Path, layout: _Layout, rows_per_chunk: int, malformed: MalformedLines
) -> Iterator[_Chunk]:
    """Parsed lines, ``rows_per_chunk`` at a time; the header line is skipped."""
    search_ids: list[int] = []
    categorical: list[list[int]] = []
    numerical: list[list[float]] = []
    labels: list[tuple[int, int]] = []
    lines = numbered_lines(path)
    next(lines)  # the header, read by _header
    for number, line in lines:
        parsed = _parse(path, number, line, layout, malformed)
        if parsed is None:
            continue
        search_ids.append(parsed[0])
        categorical.append(parsed[1])
        numerical.append(parsed[2])
        labels.append(parsed[3])
        if len(labels) == rows_per_chunk:
            yield _chunk(search_ids, categorical, numerical, labels, layout)
            search_ids, categorical, numerical, labels = [], [], [], []
    if labels:
        yield _chunk(search_ids, categorical, numerical, labels, layout)


def _chunk(
    search_ids: list, categorical: list, numerical: list, labels: list, layout: _Layout
) -> _Chunk:
    return _Chunk(
        search_id=np.asarray(search_ids, dtype=np.int64),
        categorical=np.asarray(categorical, dtype=np.int64).reshape(-1, len(layout.categorical)),
        numerical=np.asarray(numerical, dtype=np.float64).reshape(-1, len(layout.numerical)),
        labels=np.asarray(labels, dtype=np.int8).reshape(-1, 2),
    )


def _parse(
    path: Path, number: int, line: str, layout: _Layout, malformed: MalformedLines
) -> tuple[int, list[int], list[float], tuple[int, int]] | None:
    fields = line.rstrip("\r\n").split(",")
    if len(fields) != layout.width:
        malformed.add(f"{len(fields)} fields, the header has {layout.width}", path, number, line)
        return None
    click, conversion = fields[layout.click].strip(), fields[layout.conversion].strip()
    if click not in ("0", "1") or conversion not in ("0", "1"):
        malformed.add("a label is not 0/1", path, number, line)
        return None
    if conversion == "1" and click == "0":
        malformed.add("conversion without a click", path, number, line)
        return None
    try:
        search_id = int(fields[layout.search_id])
        categorical = [int(fields[j]) for _, j in layout.categorical]
    except ValueError:
        malformed.add("search_id or a categorical value is not an integer", path, number, line)
        return None
    try:
        numerical = [float(fields[j]) for _, j in layout.numerical]
    except ValueError:
        numerical = []
    if len(numerical) != len(layout.numerical) or not all(math.isfinite(x) for x in numerical):
        malformed.add("a numerical value is not a finite number", path, number, line)
        return None
    return search_id, categorical, numerical, (int(click), int(conversion))


def _arrow_schema(layout: _Layout) -> pa.Schema:
    fields = [pa.field(name, pa.int64()) for name, _ in layout.categorical]
    fields += [pa.field(name, pa.float32()) for name, _ in layout.numerical]
    fields += [
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
        pa.field("group", pa.int64()),
    ]
    return pa.schema(fields)


def _schema(layout: _Layout, statistics: dict[str, _Statistics], dim: int) -> FeatureSchema:
    train, test = statistics["train"], statistics["test"]
    low, high = np.minimum(train.low, test.low), np.maximum(train.high, test.high)
    sparse = []
    for k, (name, _) in enumerate(layout.categorical):
        if low[k] >= 0 and high[k] < _MAX_VOCAB:
            sparse.append(
                {"name": name, "dtype": "int", "vocab_size": int(high[k]) + 1, "dim": dim}
            )
        else:
            sparse.append({"name": name, "dtype": "int", "hash_buckets": _HASH_BUCKETS, "dim": dim})
    mean = train.total / train.count
    std = np.sqrt(np.maximum(train.total_squares / train.count - np.square(mean), 0.0))
    dense = [
        {
            "name": name,
            "default": float(mean[d]),
            "normalization": {
                "kind": "standard",
                "mean": float(mean[d]),
                "std": float(std[d]) if std[d] > 0 else 1.0,
            },
        }
        for d, (name, _) in enumerate(layout.numerical)
    ]
    return FeatureSchema.from_dict(
        {
            "name": "aliexpress",
            "sparse": sparse,
            "dense": dense,
            "labels": {"click": "click", "conversion": "conversion"},
            "group": "group",
        },
        source="AliExpress conversion",
    )
