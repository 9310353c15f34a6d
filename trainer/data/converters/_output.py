"""What every converter shares: the data set directory, its part files, malformed-line accounting.

A converted data set has the layout the simulator writes and the trainer reads unchanged::

    OUT/schema.yaml             the feature schema
    OUT/train/part-*.parquet    impressions, one row group per converted chunk
    OUT/valid/part-*.parquet    (MNAR converters, with a validation fraction only)
    OUT/test/part-*.parquet
    OUT/conversion.json         source files, settings, label rates per split, malformed lines
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.features import FeatureSchema
from schemas.layout import SCHEMA_FILE, SPLITS
from trainer.data.summary import LogSummary, format_summaries

__all__ = [
    "CONVERSION_FILE",
    "ConversionError",
    "ConversionResult",
    "MalformedLines",
    "SplitWriter",
    "finish_dataset",
    "hash_buckets_for",
    "numbered_lines",
    "prepare_dataset_dir",
]

CONVERSION_FILE = "conversion.json"


class ConversionError(ValueError):
    """A source cannot be converted; the message names the file (and line) and the reason."""


@dataclass
class MalformedLines:
    """Source lines that could not be converted: counted per reason, the first few kept.

    Converters skip a malformed line and go on (the count and the examples land in
    ``conversion.json`` and in the printed report), or stop at the first one when ``strict``.

    Attributes:
        strict: raise :class:`ConversionError` at the first malformed line instead.
        max_examples: examples kept (file, line number, reason, the line's start).
        counts: reason -> lines.
        examples: the first ``max_examples`` malformed lines, described.
    """

    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, path: Path | str, line_number: int, line: str) -> None:
        """Count one malformed line (1-based ``line_number``) of ``path``."""
        shown = (
            line.rstrip("\r\n").replace("\x01", "^A").replace("\x02", "^B").replace("\x03", "^C")
        )
        if len(shown) > 120:
            shown = shown[:117] + "..."
        message = f"{path}, line {line_number}: {reason}: {shown!r}"
        if self.strict:
            raise ConversionError(message + " (strict: stopping at the first malformed line)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "by_reason": dict(self.counts),
            "examples": list(self.examples),
        }

    def format(self) -> str:
        if not self.total:
            return "malformed lines: none"
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.counts.items()))
        return "\n".join(
            [f"malformed lines skipped: {self.total:,} ({reasons})", "first ones:"]
            + [f"  {example}" for example in self.examples]
        )


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Stream the non-blank lines of a text file with their 1-based numbers.

    Raises:
        ConversionError: the file cannot be opened or is not UTF-8 (naming it).
    """
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield number, line
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: cannot read: {err}") from None


class SplitWriter:
    """Writes one split as ``part-NNNNN.parquet`` files; every table written is one row group.

    A new part file starts when the next table would take the current one past ``file_rows``.
    Label sums are kept as the tables go by.

    Args:
        directory: the split directory (created by :func:`prepare_dataset_dir`).
        arrow_schema: the columns of every table written.
        click: name of the click column.
        conversion: name of the conversion column.
        file_rows: rows per part file at most (a larger single table still gets a file alone).

    Example::

        with SplitWriter(out / "train", table.schema) as writer:
            writer.write(table)
        writer.summary.ctr
    """

    def __init__(
        self,
        directory: Path,
        arrow_schema: pa.Schema,
        *,
        click: str = "click",
        conversion: str = "conversion",
        file_rows: int = 1_000_000,
    ) -> None:
        if file_rows < 1:
            raise ValueError(f"file_rows must be >= 1, got {file_rows}")
        self.directory = directory
        self.arrow_schema = arrow_schema
        self.click = click
        self.conversion = conversion
        self.file_rows = file_rows
        self.summary = LogSummary()
        self._writer: pq.ParquetWriter | None = None
        self._files = 0
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (columns as ``arrow_schema``) as one row group; empty tables are skipped."""
        if table.num_rows == 0:
            return
        table = table.select(self.arrow_schema.names).cast(self.arrow_schema)
        if self._writer is None or self._rows_in_file + table.num_rows > self.file_rows:
            self._close_file()
            path = self.directory / f"part-{self._files:05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.arrow_schema, compression="zstd")
            self._files += 1
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._rows_in_file += table.num_rows
        self.summary.add(
            table.column(self.click).to_numpy(), table.column(self.conversion).to_numpy()
        )

    def close(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._rows_in_file = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class ConversionResult:
    """What a converter wrote.

    Attributes:
        out_dir: the data set directory.
        schema: its feature schema (also in ``out_dir/schema.yaml``).
        splits: label summary per split.
        malformed: the malformed source lines, counted and sampled.
        seconds: wall time.
    """

    out_dir: Path
    schema: FeatureSchema
    splits: dict[str, LogSummary]
    malformed: MalformedLines
    seconds: float

    def format(self) -> str:
        """Label rates per split and the malformed-line report, for the command line."""
        return format_summaries(self.splits) + "\n" + self.malformed.format()


def prepare_dataset_dir(out_dir: Path, splits: Iterable[str], overwrite: bool) -> None:
    """Create ``out_dir/<split>/`` for ``splits``; refuse (or, with ``overwrite``, remove) old parts.

    Part files of any known split are considered, so that a conversion without a validation
    split never leaves an older ``valid/`` behind.

    Raises:
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.
    """
    stale = sorted(p for split in SPLITS for p in (out_dir / split).glob("*.parquet"))
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(stale)} part file(s) (e.g. {stale[0]}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    for path in stale:
        path.unlink()
    for split in SPLITS:
        directory = out_dir / split
        if directory.is_dir() and split not in splits and not any(directory.iterdir()):
            directory.rmdir()
    for split in splits:
        (out_dir / split).mkdir(parents=True, exist_ok=True)


def finish_dataset(
    out_dir: Path,
    schema: FeatureSchema,
    splits: Mapping[str, LogSummary],
    malformed: MalformedLines,
    record: Mapping[str, object],
    started: float,
) -> ConversionResult:
    """Write ``schema.yaml`` and ``conversion.json`` (``record`` plus splits and malformed lines)."""
    schema.save(out_dir / SCHEMA_FILE)
    full = {
        **record,
        "splits": {name: summary.as_dict() for name, summary in splits.items()},
        "malformed_lines": malformed.as_dict(),
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return ConversionResult(
        out_dir=out_dir,
        schema=schema,
        splits=dict(splits),
        malformed=malformed,
        seconds=time.perf_counter() - started,
    )


def hash_buckets_for(distinct: int, *, per_value: int = 8, minimum: int = 64) -> int:
    """Hash buckets for ``distinct`` values: a power of two with ``per_value`` buckets per value.

    Eight buckets per value keep the expected share of values that collide with another
    under 1 / 8; the power of two keeps schemas readable.
    """
    wanted = max(minimum, per_value * max(distinct, 1))
    return 1 << (wanted - 1).bit_length()
