"""Coat (Schnabel et al., ICML 2016) as impression logs: the MNAR conversion of its matrices.

The raw files (a copy ships in ``trainer/data/datasets/coat/``, README there)::

    train.ascii                 290 lines x 300 ratings 0-5 that users chose to give (0: none)
    test.ascii                  290 x 300: 16 ratings per user on coats shown at random
    user_features.ascii         290 lines x 14 binary columns, one-hot per attribute group
    user_features_map.txt       the 14 column names, "group:value" (gender:men, age:20-30, ...)
    item_features.ascii         300 x 33 binary columns
    item_features_map.txt       their names (gender, jackettype, color, onfrontpage)

Impression space: every (user, item) pair, 290 x 300 = 87,000 rows in ``train/``; click = rated
in ``train.ascii``; conversion = that rating ``>= 3``. ``test/`` holds the 4,640 random-exposure
ratings with ``click = 1`` and conversion = rating ``>= 3``. Features: ``user_id`` (0-289),
``item_id`` (0-299), and one field per one-hot group, its value the index of the group's column
that is set (``user_gender``, ``user_age``, ``user_location``, ``user_fashioninterest``,
``item_gender``, ``item_jackettype``, ``item_color``, ``item_onfrontpage``); the value names are
in ``conversion.json`` under ``vocabularies``.

The files have a fixed shape, so a malformed line is an error (naming file and line), never
skipped: dropping a matrix row would shift every user after it.

Run it::

    python -m trainer.data convert coat --out data/coat
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.data.converters._output import ConversionError, ConversionResult
from trainer.data.converters.mnar import (
    AttributeTable,
    MnarConfig,
    RatingsSource,
    Triples,
    write_mnar_dataset,
)

__all__ = ["COAT_DIR", "COAT_ITEMS", "COAT_USERS", "convert_coat", "read_coat"]

COAT_DIR = Path(__file__).resolve().parent.parent / "datasets" / "coat"
COAT_USERS, COAT_ITEMS = 290, 300
_MAX_RATING = 5


@dataclass(frozen=True)
class _OneHotFile:
    values: str
    names: str
    rows: int


_TRAIN, _TEST = "train.ascii", "test.ascii"
_USER_FEATURES = _OneHotFile("user_features.ascii", "user_features_map.txt", COAT_USERS)
_ITEM_FEATURES = _OneHotFile("item_features.ascii", "item_features_map.txt", COAT_ITEMS)


def read_coat(src: str | Path = COAT_DIR, *, attributes: bool = True) -> RatingsSource:
    """Parse the Coat files in ``src`` into ratings and (with ``attributes``) attribute tables.

    ``attributes=False`` keeps the ids only, the input of the papers' MF and NCF backbones.

    Raises:
        ConversionError: a missing file, a line with the wrong number of values, a value that
            is not an integer in range, or a one-hot group with more than one column set.
    """
    src = Path(src)
    return RatingsSource(
        train=_ratings(src / _TRAIN),
        test=_ratings(src / _TEST),
        users=np.arange(COAT_USERS, dtype=np.int64),
        items=np.arange(COAT_ITEMS, dtype=np.int64),
        user_attributes=_one_hot_table(src, _USER_FEATURES) if attributes else None,
        item_attributes=_one_hot_table(src, _ITEM_FEATURES) if attributes else None,
    )


def convert_coat(
    out_dir: str | Path,
    src: str | Path = COAT_DIR,
    cfg: MnarConfig = MnarConfig(name="coat"),
    *,
    attributes: bool = True,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert Coat into ``out_dir`` (``train/``, ``test/``, optional ``valid/``).

    Args:
        out_dir: the data set directory, a local path or a storage URI.
        src: the directory of the raw files (default: the copy in this repository).
        cfg: threshold (3 in the papers), embedding dimension, validation split.
        attributes: add the user and item attribute fields (False: ``user_id`` and ``item_id``
            only, as the papers' backbones).
        overwrite: replace part files already in ``out_dir``.

    Example::

        result = convert_coat("data/coat")
        result.splits["train"].ctr  # 0.08: 6,960 ratings over 87,000 pairs
    """
    record = {"converter": "coat", "coat_dir": str(src), "attributes": attributes}
    return write_mnar_dataset(
        read_coat(src, attributes=attributes), out_dir, cfg, overwrite=overwrite, record=record
    )


def _matrix(path: Path, rows: int, columns: int, high: int) -> np.ndarray:
    """A whitespace-separated ``rows x columns`` matrix of integers in ``[0, high]``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: cannot read: {err}") from None
    lines = [line for line in lines if line.strip()]
    if len(lines) != rows:
        raise ConversionError(f"{path}: {len(lines)} non-empty lines, expected {rows}")
    matrix = np.zeros((rows, columns), dtype=np.int64)
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) != columns:
            raise ConversionError(
                f"{path}, line {number}: {len(fields)} values, expected {columns}"
            )
        try:
            values = [int(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not f.lstrip("-").isdigit())
            raise ConversionError(f"{path}, line {number}: {bad!r} is not an integer") from None
        outside = [v for v in values if not 0 <= v <= high]
        if outside:
            raise ConversionError(f"{path}, line {number}: value {outside[0]} outside [0, {high}]")
        matrix[number - 1] = values
    return matrix


def _ratings(path: Path) -> Triples:
    matrix = _matrix(path, COAT_USERS, COAT_ITEMS, _MAX_RATING)
    users, items = np.nonzero(matrix)
    return Triples(
        path=str(path),
        users=users.astype(np.int64),
        items=items.astype(np.int64),
        ratings=matrix[users, items].astype(np.float64),
        lines=users.astype(np.int64) + 1,
    )


def _one_hot_table(src: Path, spec: _OneHotFile) -> AttributeTable:
    """One integer attribute per one-hot group: the index, within the group, of the column set."""
    names_path = src / spec.names
    try:
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"{names_path}: cannot read: {err}") from None
    groups: dict[str, list[int]] = {}
    labels: dict[str, list[str]] = {}
    for column, name in enumerate(names):
        group, sep, value = name.partition(":")
        if not (sep and group and value):
            raise ConversionError(f"{names_path}, line {column + 1}: {name!r} is not 'group:value'")
        groups.setdefault(group, []).append(column)
        labels.setdefault(group, []).append(value)
    path = src / spec.values
    matrix = _matrix(path, spec.rows, len(names), 1)
    columns = {}
    for group, group_columns in groups.items():
        block = matrix[:, group_columns]
        several = np.flatnonzero(block.sum(axis=1) > 1)
        if several.size:
            raise ConversionError(
                f"{path}, line {several[0] + 1}: more than one '{group}:' column is set in a one-hot group"
            )
        unset = block.sum(axis=1) == 0
        columns[group] = pa.array(block.argmax(axis=1), pa.int64(), mask=unset)
    return AttributeTable(
        path=str(path),
        ids=np.arange(spec.rows, dtype=np.int64),
        columns=columns,
        vocabularies=labels,
    )
