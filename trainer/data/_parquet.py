"""Parquet files of an impression log: finding them, reading their footers, reading row groups.

Everything that touches a file goes through here, so every failure becomes one :class:`DataError`
whose message starts with where it happened (file, row group, column, row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DataError",
    "ParquetPart",
    "PathsLike",
    "inspect_files",
    "locate",
    "open_file",
    "read_row_group",
    "resolve_files",
]

PathsLike = str | Path | Sequence[str | Path]


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
class ParquetPart:
    """What the footer of one Parquet file says: enough to plan reads without touching data.

    Attributes:
        path: the file.
        row_group_rows: rows in each row group, in file order.
        arrow_schema: the file's columns and their Arrow types.
    """

    path: Path
    row_group_rows: tuple[int, ...]
    arrow_schema: pa.Schema

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    def first_row(self, row_group: int) -> int:
        """The file row of ``row_group``'s first row."""
        return sum(self.row_group_rows[:row_group])


def resolve_files(paths: PathsLike) -> list[Path]:
    """The Parquet files named by a directory, a file, or a list of them, in a stable order.

    A directory contributes its ``*.parquet`` files (not those of subdirectories), sorted by name;
    explicitly listed files keep the order given.

    Raises:
        DataError: nothing is named, a path does not exist, a directory holds no Parquet file,
            or the same file is named twice (its rows would be read twice per epoch).
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DataError("no impression log files given (empty file list)")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.parquet") if p.is_file())
            if not found:
                subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
                hint = f"; it has subdirectories {subdirs}, pass one of them" if subdirs else ""
                raise DataError(f"{path}: directory holds no *.parquet file{hint}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    seen: dict[Path, Path] = {}
    for file in files:
        key = file.resolve()
        if key in seen:
            raise DataError(
                f"{file}: named twice (also as {seen[key]}); its rows would be read twice"
            )
        seen[key] = file
    return files


def inspect_files(files: Sequence[Path]) -> list[ParquetPart]:
    """Read the footer of every file (row group sizes and column types), no data pages.

    Raises:
        DataError: a file is not Parquet, is truncated, or cannot be opened.
    """
    return [_inspect(path) for path in files]


def _inspect(path: Path) -> ParquetPart:
    try:
        metadata = pq.read_metadata(path)
        arrow_schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: not a readable Parquet file (corrupt, truncated or another format): {err}"
        ) from None
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return ParquetPart(path=path, row_group_rows=rows, arrow_schema=arrow_schema)


def read_row_group(
    handle: pq.ParquetFile, part: ParquetPart, row_group: int, columns: Sequence[str]
) -> pa.Table:
    """Read only ``columns`` of one row group.

    Raises:
        DataError: the row group's pages are corrupt, or the file changed since it was inspected.
    """
    try:
        table = handle.read_row_group(row_group, columns=list(columns))
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{locate(part.path, row_group=row_group)}: cannot decode row group: {err}"
        ) from None
    expected = part.row_group_rows[row_group]
    if table.num_rows != expected:
        raise DataError(
            f"{locate(part.path, row_group=row_group)}: read {table.num_rows} rows, the footer "
            f"said {expected} when the reader opened it; was the file rewritten?"
        )
    return table


def open_file(part: ParquetPart) -> pq.ParquetFile:
    """Open a file for reading row groups.

    Raises:
        DataError: the file disappeared or became unreadable since it was inspected.
    """
    try:
        return pq.ParquetFile(part.path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{part.path}: cannot open Parquet file: {err}") from None
