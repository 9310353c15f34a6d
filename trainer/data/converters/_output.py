"""What every converter shares: the data set directory, its part files, malformed-line accounting.

A converted data set has the layout the simulator writes and the trainer reads unchanged::

    OUT/schema.yaml             the feature schema
    OUT/train/part-*.parquet    impressions, one row group per converted chunk
    OUT/valid/part-*.parquet    (MNAR converters, with a validation fraction only)
    OUT/test/part-*.parquet
    OUT/conversion.json         source files, settings, label rates per split, malformed lines
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas import storage
from schemas.features import FeatureSchema
from schemas.storage import Location, UriLike
from trainer.data._dataset import (
    SplitWriter,
    prepare_dataset,
    publish_dataset,
    result_dir,
)
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


@dataclass(frozen=True)
class ConversionResult:
    """What a converter wrote.

    Attributes:
        out_dir: the data set directory (a ``Path``, or the URI it was written to).
        schema: its feature schema (also in ``out_dir/schema.yaml``).
        splits: label summary per split.
        malformed: the malformed source lines, counted and sampled.
        seconds: wall time.
    """

    out_dir: Path | str
    schema: FeatureSchema
    splits: dict[str, LogSummary]
    malformed: MalformedLines
    seconds: float

    def format(self) -> str:
        """Label rates per split and the malformed-line report, for the command line."""
        return format_summaries(self.splits) + "\n" + self.malformed.format()


def prepare_dataset_dir(out_dir: UriLike, splits: Iterable[str], overwrite: bool) -> Location:
    """Create ``out_dir/<split>/`` for ``splits``; refuse (or, with ``overwrite``, remove) old parts.

    The data set is unpublished first (see :mod:`trainer.data._dataset`); ``out_dir`` is a local
    path or a storage URI.

    Returns:
        The location of ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` holds part files and ``overwrite`` is False.
    """
    return prepare_dataset(out_dir, splits, overwrite=overwrite)


def finish_dataset(
    out_dir: UriLike,
    schema: FeatureSchema,
    splits: Mapping[str, LogSummary],
    malformed: MalformedLines,
    record: Mapping[str, object],
    started: float,
) -> ConversionResult:
    """Publish ``schema.yaml`` and then ``conversion.json`` (``record`` plus splits and malformed
    lines): the data set is complete after this."""
    out = storage.resolve(out_dir)
    full = {
        **record,
        "splits": {name: summary.as_dict() for name, summary in splits.items()},
        "malformed_lines": malformed.as_dict(),
    }
    publish_dataset(out, schema, CONVERSION_FILE, full)
    return ConversionResult(
        out_dir=result_dir(out),
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
