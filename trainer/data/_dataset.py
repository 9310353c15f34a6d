"""The data set layout, and writing it to a local path or a storage URI.

The simulator and every converter write the same layout, which the reader takes unchanged::

    OUT/schema.yaml              the feature schema
    OUT/<split>/part-*.parquet   impressions (train/, test/, optionally valid/)
    OUT/<record>                 simulation.json or conversion.json: how the data was made

**Publishing.** Part files are written first; ``schema.yaml`` and then the record come last, and
when a data set is replaced (``overwrite``) both are deleted before any part file is touched. A
data set without ``schema.yaml`` is therefore incomplete (being written, or its writer failed):
:func:`load_dataset_schema` refuses it, and so does every reader that looks for the schema beside
the data. On an object store each file is one atomic PUT, so this holds there too.

A split may later hold partition directories (``train/day=2026-12-01/part-*.parquet``): a
:class:`SplitWriter` per partition directory, and the stale-part check already looks below them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import storage
from schemas.features import TRUTH_COLUMNS, FeatureSchema, load_schema
from schemas.layout import SCHEMA_FILE, SPLITS
from schemas.storage import Kind, Location, UriLike
from trainer.data._parquet import DataError
from trainer.data.summary import LogSummary

__all__ = [
    "SplitWriter",
    "find_schema",
    "load_dataset_schema",
    "prepare_dataset",
    "publish_dataset",
    "result_dir",
]

# Every split name a writer may write; stale part files under any of them are refused or removed.
# Records of how a data set was made, written last (see the module docstring).
RECORD_FILES = ("simulation.json", "conversion.json")


class SplitWriter:
    """Writes one split as ``part-NNNNN.parquet`` files; every table written is one row group.

    A new part file starts when the next table would take the current one past ``file_rows``.
    Label sums (and ground truth, when the columns have it) are kept as the tables go by.

    Args:
        directory: the split directory, a local path or a URI (created where directories exist).
        arrow_schema: the columns of every table written.
        click: name of the click column.
        conversion: name of the conversion column.
        file_rows: rows per part file at most (a larger single table still gets a file alone).

    Raises:
        StorageError: (from ``write`` / ``close``) the store refused or failed a write.

    Example::

        with SplitWriter("s3://bucket/sim/train", table.schema) as writer:
            writer.write(table)
        writer.summary.ctr
    """

    def __init__(
        self,
        directory: UriLike,
        arrow_schema: pa.Schema,
        *,
        click: str = "click",
        conversion: str = "conversion",
        file_rows: int = 1_000_000,
    ) -> None:
        if file_rows < 1:
            raise ValueError(f"file_rows must be >= 1, got {file_rows}")
        self.directory = storage.resolve(directory)
        self.arrow_schema = arrow_schema
        self.click = click
        self.conversion = conversion
        self.file_rows = file_rows
        self.with_truth = set(TRUTH_COLUMNS) <= set(arrow_schema.names)
        self.summary = LogSummary()
        self._writer: pq.ParquetWriter | None = None
        self._path: Location | None = None
        self._files = 0
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (columns as ``arrow_schema``) as one row group; empty tables are skipped."""
        if table.num_rows == 0:
            return
        table = table.select(self.arrow_schema.names).cast(self.arrow_schema)
        if self._writer is None or self._rows_in_file + table.num_rows > self.file_rows:
            self._close_file()
            self._open_file()
        assert self._writer is not None and self._path is not None
        with storage.storage_errors(self._path, "write"):
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._rows_in_file += table.num_rows
        truth = None
        if self.with_truth:
            truth = np.stack([table.column(c).to_numpy() for c in TRUTH_COLUMNS], axis=1)
        self.summary.add(
            table.column(self.click).to_numpy(), table.column(self.conversion).to_numpy(), truth
        )

    def close(self) -> None:
        self._close_file()

    def _open_file(self) -> None:
        if self._files == 0:
            storage.make_dirs(self.directory)
        self._path = self.directory.join(f"part-{self._files:05d}.parquet")
        with storage.storage_errors(self._path, "write"):
            self._writer = pq.ParquetWriter(
                self._path.path,
                self.arrow_schema,
                filesystem=self._path.filesystem,
                compression="zstd",
            )
        self._files += 1

    def _close_file(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with storage.storage_errors(self._path, "write"):  # type: ignore[arg-type]
                writer.close()  # an object store stores the object here
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


def prepare_dataset(out: UriLike, splits: Iterable[str], *, overwrite: bool) -> Location:
    """Make ``out`` ready for a new data set: unpublish it, refuse or remove old part files.

    Part files of any known split are considered (also below partition directories), so that a
    data set without a validation split never leaves an older ``valid/`` behind.

    Args:
        out: the data set directory, a local path or a URI.
        splits: the splits about to be written.
        overwrite: remove old part files instead of refusing.

    Returns:
        The location of ``out``.

    Raises:
        FileExistsError: ``out`` holds part files and ``overwrite`` is False (nothing is changed).
        StorageError: the store cannot be reached or refuses.
    """
    out = storage.resolve(out)
    stale = [
        entry.location
        for split in SPLITS
        if storage.kind(out.join(split)) is Kind.DIRECTORY
        for entry in storage.list_dir(out.join(split), recursive=True)
        if entry.kind is Kind.FILE and entry.name.endswith(".parquet")
    ]
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(stale)} part file(s) (e.g. {stale[0]}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    # Unpublish first: from here until publish_dataset, readers see an incomplete data set.
    for name in (*RECORD_FILES, SCHEMA_FILE):
        storage.delete_file(out.join(name))
    for location in stale:
        storage.delete_file(location)
    if out.is_local:
        for split in SPLITS:
            directory = Path(out.join(split).path)
            if directory.is_dir() and split not in splits and not any(directory.iterdir()):
                directory.rmdir()
    for split in splits:
        storage.make_dirs(out.join(split))
    return out


def publish_dataset(
    out: UriLike, schema: FeatureSchema, record_file: str, record: Mapping[str, object]
) -> None:
    """Write ``schema.yaml``, then the record: after this the data set is complete."""
    out = storage.resolve(out)
    storage.write_text(out.join(SCHEMA_FILE), schema.to_yaml())
    storage.write_text(out.join(record_file), json.dumps(record, indent=2, default=str) + "\n")


def load_dataset_schema(root: UriLike) -> FeatureSchema:
    """The schema of the data set at ``root``.

    Raises:
        DataError: ``root`` has no ``schema.yaml`` (not a data set, or an incomplete one).
        SchemaError: the schema is invalid.
    """
    root = storage.resolve(root)
    path = root.join(SCHEMA_FILE)
    if not storage.is_file(path):
        raise DataError(
            f"{root}: no {SCHEMA_FILE}, so not a complete data set: its writer may still be "
            "running or have failed (the schema is published after every part file; rerun it "
            "with --overwrite), or the schema lives elsewhere (pass it explicitly)"
        )
    return load_schema(path)


def find_schema(data: UriLike) -> Location | None:
    """``schema.yaml`` beside or above the data: in a directory or its parent, or a file's
    directory or that one's parent. None if there is none."""
    location = storage.resolve(data)
    start = location if storage.kind(location) is Kind.DIRECTORY else location.parent
    for directory in (start, start.parent):
        candidate = directory.join(SCHEMA_FILE)
        if storage.is_file(candidate):
            return candidate
    return None


def result_dir(location: Location) -> Path | str:
    """How results report where a data set went: a ``Path`` for a local path, else the URI."""
    return Path(location.uri) if location.scheme == "" else location.uri
