"""Parquet files of an impression log: finding them, reading their footers, reading row groups.

Everything that touches a file goes through here, so every failure becomes one :class:`DataError`
whose message starts with where it happened (file, row group, column, row), or, for a fault of
the store itself (missing bucket, denied access, unreachable endpoint), a
:class:`schemas.storage.StorageError` naming the URI and what to check.

Files are named by local paths or storage URIs (``s3://bucket/logs``, see :mod:`schemas.storage`)
and read with ranged reads: a footer, then the column chunks of one row group at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import storage
from schemas.storage import Kind, Location, StorageError
from trainer.data._partitions import (
    FilterError,
    PartitionFilter,
    partition_types,
    partition_values,
    select_partitions,
    typed_value,
)

__all__ = [
    "DataError",
    "ParquetPart",
    "ParquetSource",
    "PathsLike",
    "StorageError",
    "inspect_files",
    "locate",
    "open_file",
    "read_row_group",
    "resolve_files",
]

PathsLike = str | Path | Location | Sequence[str | Path | Location]

# Hidden and underscore names are not data (staging files, _SUCCESS, _metadata), as in pyarrow.
_IGNORED_PREFIXES = (".", "_")


class DataError(ValueError):
    """An impression log cannot be read as the schema describes; the message says where and why."""


def locate(
    path: Path | str,
    *,
    row_group: int | None = None,
    column: str | None = None,
    row: int | None = None,
    file_row: int | None = None,
) -> str:
    """``"part-0.parquet, row group 2, column 'click', row 17 (file row 200017)"``.

    The prefix of every data error. ``row`` counts from the start of the row group, so
    ``pq.ParquetFile(path).read_row_group(row_group).slice(row, 1)`` is the offending row;
    ``file_row`` counts from the start of the file.
    """
    parts = [str(path)]
    if row_group is not None:
        parts.append(f"row group {row_group}")
    if column is not None:
        parts.append(f"column {column!r}")
    if row is not None:
        parts.append(f"row {row}" + (f" (file row {file_row})" if file_row is not None else ""))
    return ", ".join(parts)


@dataclass(frozen=True)
class ParquetSource:
    """One Parquet file to read, with the values its hive partition directories give it.

    Attributes:
        location: the file.
        partition: partition column -> value (typed as in ``partition_schema``).
        partition_schema: the partition columns and their types (string or int64).
    """

    location: Location
    partition: Mapping[str, Any] = field(default_factory=dict)
    partition_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))


@dataclass(frozen=True)
class ParquetPart:
    """What the footer of one Parquet file says: enough to plan reads without touching data.

    Attributes:
        source: the file and its partition values.
        row_group_rows: rows in each row group, in file order.
        arrow_schema: the file's columns and their Arrow types, then its partition columns.
    """

    source: ParquetSource
    row_group_rows: tuple[int, ...]
    arrow_schema: pa.Schema

    @property
    def path(self) -> str:
        """The file's path or URI, as messages name it."""
        return self.source.location.uri

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    def first_row(self, row_group: int) -> int:
        """The file row of ``row_group``'s first row."""
        return sum(self.row_group_rows[:row_group])


def resolve_files(paths: PathsLike, *, filter: str | None = None) -> list[ParquetSource]:
    """The Parquet files named by directories, files or a list of them, in a stable order.

    A directory contributes its ``*.parquet`` files (not those of subdirectories), sorted by
    name. A directory holding only ``key=value`` subdirectories is a hive-partitioned log: every
    ``*.parquet`` file below it, sorted by path, each with its partition values; ``filter``
    selects partitions (see :mod:`trainer.data._partitions`). Explicitly listed files keep the
    order given. Names starting with ``.`` or ``_`` are skipped.

    Args:
        paths: local paths or storage URIs.
        filter: a partition filter such as ``"day >= '2026-11-25'"``; every directory named must
            then be partitioned.

    Raises:
        DataError: nothing is named, a path does not exist, a directory holds no Parquet file,
            the same file is named twice (its rows would be read twice per epoch), an invalid
            filter, a filter on unpartitioned data, or a filter that selects no file.
        StorageError: a missing bucket, denied access, an unreachable store.
    """
    items = [paths] if isinstance(paths, (str, Path, Location)) else list(paths)
    if not items:
        raise DataError("no impression log files given (empty file list)")
    try:
        predicate = PartitionFilter.parse(filter) if filter else None
    except FilterError as err:
        raise DataError(str(err)) from None
    sources: list[ParquetSource] = []
    for item in items:
        location = storage.resolve(item)
        found = storage.kind(location)
        if found is Kind.DIRECTORY:
            sources.extend(_directory(location, predicate))
        elif found is Kind.FILE:
            if predicate is not None:
                raise DataError(
                    f"{location}: a filter ({predicate.text!r}) selects partitions of a "
                    "directory, not a single file"
                )
            sources.append(ParquetSource(location))
        else:
            raise DataError(f"{location}: no such file or directory")
    _refuse_duplicates(sources)
    return sources


def _directory(location: Location, predicate: PartitionFilter | None) -> list[ParquetSource]:
    entries = [e for e in storage.list_dir(location) if not e.name.startswith(_IGNORED_PREFIXES)]
    files = [e for e in entries if e.kind is Kind.FILE and e.name.endswith(".parquet")]
    subdirs = [e.name for e in entries if e.kind is Kind.DIRECTORY]
    if files:
        if predicate is not None:
            raise DataError(
                f"{location}: a filter ({predicate.text!r}) needs hive partitions (key=value "
                "directories), but the directory holds Parquet files itself"
            )
        return [ParquetSource(e.location) for e in files]
    if subdirs and all("=" in name for name in subdirs):
        return _partitioned(location, predicate)
    hint = f"; it has subdirectories {subdirs}, pass one of them" if subdirs else ""
    raise DataError(f"{location}: directory holds no *.parquet file{hint}")


def _partitioned(root: Location, predicate: PartitionFilter | None) -> list[ParquetSource]:
    """Every Parquet file below ``root`` with its partition values, those ``predicate`` keeps."""
    files = []
    for entry in storage.list_dir(root, recursive=True):
        relative = entry.location.relative_to(root)
        hidden = any(part.startswith(_IGNORED_PREFIXES) for part in relative.split("/"))
        if entry.kind is Kind.FILE and entry.name.endswith(".parquet") and not hidden:
            files.append((entry, partition_values(relative)))
    if not files:
        raise DataError(f"{root}: no *.parquet file in its partition directories")
    keys = list(files[0][1])
    for entry, values in files:
        if list(values) != keys:
            raise DataError(
                f"{entry.location}: partition columns {list(values)} differ from {keys} of "
                f"{files[0][0].location}; every file of a partitioned log needs the same ones"
            )
    types = partition_types([values for _, values in files])
    typed = [{k: typed_value(v, types[k]) for k, v in values.items()} for _, values in files]
    selected = list(range(len(files)))
    if predicate is not None:
        try:
            selected = select_partitions(typed, types, predicate)
        except FilterError as err:
            raise DataError(f"{root}: {err}") from None
        if not selected:
            raise DataError(
                f"{root}: filter {predicate.text!r} selects none of its {len(files)} file(s); "
                f"the partitions hold {_value_ranges(typed, types)}"
            )
    schema = pa.schema(list(types.items()))
    return [ParquetSource(files[i][0].location, typed[i], schema) for i in selected]


def _value_ranges(values: Sequence[Mapping[str, Any]], types: Mapping[str, pa.DataType]) -> str:
    ranges = []
    for key in types:
        seen = sorted({v[key] for v in values if v[key] is not None})
        shown = f"{seen[0]!r}" if len(seen) == 1 else f"{seen[0]!r} to {seen[-1]!r}"
        ranges.append(f"{key} {shown} ({len(seen)} value(s))")
    return ", ".join(ranges)


def _refuse_duplicates(sources: Sequence[ParquetSource]) -> None:
    seen: dict[str, Location] = {}
    for source in sources:
        location = source.location
        key = os.path.realpath(location.path) if location.is_local else location.uri
        if key in seen:
            raise DataError(
                f"{location}: named twice (also as {seen[key]}); its rows would be read twice"
            )
        seen[key] = location


def inspect_files(sources: Sequence[ParquetSource]) -> list[ParquetPart]:
    """Read the footer of every file (row group sizes and column types), no data pages.

    Raises:
        DataError: a file is not Parquet, is truncated, or has a column its partition path names.
        StorageError: the file cannot be reached (missing, denied, store unreachable).
    """
    return [_inspect(source) for source in sources]


def _inspect(source: ParquetSource) -> ParquetPart:
    location = source.location
    try:
        with storage.open_input_file(location) as handle:
            metadata = pq.read_metadata(handle)
        arrow_schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise storage.fault(err, location, "read") or DataError(
            f"{location}: not a readable Parquet file (corrupt, truncated or another format): {err}"
        ) from None
    for column in source.partition_schema:
        if column.name in arrow_schema.names:
            raise DataError(
                f"{locate(location, column=column.name)}: the column is in the file and in its "
                f"partition directory ({column.name}={source.partition[column.name]}); keep one"
            )
        arrow_schema = arrow_schema.append(column)
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return ParquetPart(source=source, row_group_rows=rows, arrow_schema=arrow_schema)


def read_row_group(
    handle: pq.ParquetFile, part: ParquetPart, row_group: int, columns: Sequence[str]
) -> pa.Table:
    """Read only ``columns`` of one row group; partition columns are filled from the path.

    Raises:
        DataError: the row group's pages are corrupt, or the file changed since it was inspected.
        StorageError: the store failed (after its retries).
    """
    partition = part.source.partition
    stored = [c for c in columns if c not in partition]
    try:
        table = handle.read_row_group(row_group, columns=stored)
    except (pa.ArrowException, OSError) as err:
        raise storage.fault(err, part.source.location, "read") or DataError(
            f"{locate(part.path, row_group=row_group)}: cannot decode row group: {err}"
        ) from None
    expected = part.row_group_rows[row_group]
    if table.num_rows != expected:
        raise DataError(
            f"{locate(part.path, row_group=row_group)}: read {table.num_rows} rows, the footer "
            f"said {expected} when the reader opened it; was the file rewritten?"
        )
    for column in columns:
        if column in partition:
            kind = part.source.partition_schema.field(column).type
            table = table.append_column(
                pa.field(column, kind), pa.repeat(pa.scalar(partition[column], kind), expected)
            )
    return table.select(list(columns))


def open_file(part: ParquetPart) -> pq.ParquetFile:
    """Open a file for reading row groups (ranged reads; close it with ``close(force=True)``).

    Raises:
        DataError: the file became unreadable since it was inspected.
        StorageError: the file disappeared, or the store failed.
    """
    location = part.source.location
    try:
        return pq.ParquetFile(storage.open_input_file(location))
    except (pa.ArrowException, OSError) as err:
        raise storage.fault(err, location, "read") or DataError(
            f"{part.path}: cannot open Parquet file: {err}"
        ) from None
