"""Request values checked and converted a column at a time with numpy: the service's fast path.

Both request forms become :class:`Columns`: the columnar form directly, the row form once its
rows are transposed (:func:`transpose`). :class:`ColumnReader` holds every value to the rules of
``schemas.api.feature_rules``, the rules the request models document, one column at a time: a
single pass over the Python values learns their types (``set(map(type, values))``, so a ``true``
is never taken for a ``1``), then one numpy conversion and vectorised range checks replace a
validator call per value.

The reader only says *whether* a request is valid. When it is not (:class:`Unreadable`), the
service validates the body again with the pydantic request model, whose messages name every bad
value by row and feature. The reader is the stricter of the two: what is unusual but valid (ids
written as ``1.0``, JSON the fast parser refuses) it leaves to the request model, which converts
it and hands the reader values it accepts. So a request the reader accepts is one the request
model accepts, with the same values; the tests hold it to that on generated bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from schemas.api import (
    INT64_MAX,
    INT64_MIN,
    MAX_LIST_VALUES,
    MAX_STRING_CHARS,
    FeatureRule,
    ValueKind,
    feature_rules,
)
from schemas.features import FeatureSchema

__all__ = ["Column", "ColumnReader", "Columns", "Unreadable", "transpose"]

_NONE = type(None)


class Unreadable(ValueError):
    """Values the fast path does not take; the request model says what is wrong with them."""


@dataclass(frozen=True)
class Column:
    """One feature's values in ``n`` rows, as the request gave them.

    Attributes:
        values: ids as an int64 array, dense values as a float64 array, string ids as a sequence
            of ``str`` with ``None`` where missing; for a list feature, the elements of every
            row, flat, in row order.
        present: for ids and dense values, False where a value (an element) is missing; None
            when none is. Entries under False hold 0.
        lengths: list features only: ``(n,)`` int64 number of elements of each row (all of
            them: cutting to ``max_len`` is the featurizer's).
    """

    values: np.ndarray | Sequence[str | None]
    present: np.ndarray | None = None
    lengths: np.ndarray | None = None


@dataclass(frozen=True)
class Columns:
    """``rows`` impressions by feature; a feature the request left out is missing in every row."""

    rows: int
    values: dict[str, Column]


class ColumnReader:
    """Checks and converts request columns of one feature schema.

    Args:
        schema: the served model's feature schema.
        max_rows: the most rows per request.

    Example::

        reader = ColumnReader(schema, max_rows=1024)
        columns = reader.read({"user_id": [7, None], "price": [1.5, 2.0]})
        columns.values["user_id"].present  # array([ True, False])
    """

    def __init__(self, schema: FeatureSchema, max_rows: int) -> None:
        self.rules = {rule.name: rule for rule in feature_rules(schema)}
        self.required = frozenset(name for name, rule in self.rules.items() if rule.required)
        self.max_rows = max_rows

    def columns_request(self, body: Any) -> Columns:
        """The columns of a parsed ``{"columns": {...}}`` body.

        Raises:
            Unreadable: anything the request model should look at.
        """
        if type(body) is not dict or len(body) != 1 or "columns" not in body:
            raise Unreadable("the body is not {'columns': {...}}")
        return self.read(body["columns"])

    def rows_request(self, body: Any) -> Columns:
        """The columns of a parsed ``{"rows": [...]}`` body.

        Raises:
            Unreadable: anything the request model should look at.
        """
        if type(body) is not dict or len(body) != 1 or "rows" not in body:
            raise Unreadable("the body is not {'rows': [...]}")
        rows = body["rows"]
        if type(rows) is not list or not 1 <= len(rows) <= self.max_rows:
            raise Unreadable(f"rows must be a list of 1 to {self.max_rows} objects")
        return self.read(transpose(rows), rows=len(rows))

    def read(
        self,
        columns: Mapping[str, Sequence[Any]],
        rows: int | None = None,
        required: frozenset[str] | None = None,
    ) -> Columns:
        """Check and convert every column.

        Args:
            columns: feature name to one entry per row.
            rows: the number of rows, when ``columns`` may be empty (transposed rows); default:
                the length of the columns, which must then be given.
            required: the features that must be given; default: every one under ``oov: error``
                (a ranking request's parts require what the other part does not give).

        Raises:
            Unreadable: an unknown or missing required feature, columns of different or
                out-of-range lengths, or a value that breaks its feature's rule.
        """
        if not isinstance(columns, dict) or (rows is None and not columns):
            raise Unreadable("columns must be a non-empty object")
        unknown = columns.keys() - self.rules.keys()
        if unknown or not (self.required if required is None else required) <= columns.keys():
            raise Unreadable(f"unknown features {sorted(unknown)} or required ones missing")
        if rows is None:
            first = next(iter(columns.values()))
            rows = len(first) if type(first) in (list, tuple) else 0
        if not 1 <= rows <= self.max_rows:
            raise Unreadable(f"a request holds 1 to {self.max_rows} rows")
        out = {}
        for name, values in columns.items():
            if type(values) not in (list, tuple) or len(values) != rows:
                raise Unreadable(f"column {name!r} is not a list of {rows} entries")
            out[name] = _read(values, self.rules[name])
        return Columns(rows, out)


def transpose(rows: list[Any]) -> dict[str, Sequence[Any]]:
    """Row objects to columns (``None`` where a row leaves a feature out).

    Raises:
        Unreadable: a row that is not an object.
    """
    if set(map(type, rows)) != {dict}:
        raise Unreadable("every row must be an object")
    names = list(rows[0])
    if names and len(set(map(len, rows))) == 1:
        try:  # every row names the first row's features, and no other (the usual case)
            table = list(map(itemgetter(*names), rows))  # itemgetter and zip run in C
            return {names[0]: table} if len(names) == 1 else dict(zip(names, zip(*table)))
        except KeyError:
            pass
    names = list(set().union(*rows))
    return {name: [row.get(name) for row in rows] for name in names}


def _read(values: Sequence[Any], rule: FeatureRule) -> Column:
    if rule.multi_valued:
        return _read_lists(values, rule)
    if rule.kind is ValueKind.STRING:
        return Column(_strings(values, nullable=not rule.strict))
    if rule.kind is ValueKind.INT:
        return Column(*_ints(values, rule, nullable=not rule.strict))
    return Column(*_floats(values, rule))


def _read_lists(values: Sequence[Any], rule: FeatureRule) -> Column:
    types = set(map(type, values))
    if types <= {list}:
        lists = values
    elif types <= {list, _NONE}:
        lists = [() if v is None else v for v in values]
    else:
        raise Unreadable(f"{rule.name}: entries must be lists or null")
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    if lengths.max(initial=0) > MAX_LIST_VALUES:
        raise Unreadable(f"{rule.name}: a list longer than {MAX_LIST_VALUES}")
    flat = list(chain.from_iterable(lists))
    nullable = not rule.strict
    if rule.kind is ValueKind.STRING:
        return Column(_strings(flat, nullable), lengths=lengths)
    return Column(*_ints(flat, rule, nullable), lengths=lengths)


def _strings(values: Sequence[Any], nullable: bool) -> Sequence[str | None]:
    types = set(map(type, values))
    if not (types <= {str} or (nullable and types <= {str, _NONE})):
        raise Unreadable("string values expected")
    if max(map(len, filter(None, values)), default=0) > MAX_STRING_CHARS:
        raise Unreadable(f"a string longer than {MAX_STRING_CHARS} characters")
    return values


def _ints(
    values: Sequence[Any], rule: FeatureRule, nullable: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    # Only JSON integers: 1.0 is a valid id too, but the request model converts it (it is rare).
    ints, present = _numbers(values, {int}, nullable, np.int64)
    if rule.low > INT64_MIN or rule.high < INT64_MAX:
        inside = (ints >= rule.low) & (ints <= rule.high)
        if not (inside if present is None else inside | ~present).all():
            raise Unreadable(f"{rule.name}: ids outside [{rule.low}, {rule.high}]")
    return ints, present


def _floats(values: Sequence[Any], rule: FeatureRule) -> tuple[np.ndarray, np.ndarray | None]:
    floats, present = _numbers(values, {float, int}, True, np.float64)
    with np.errstate(invalid="ignore"):
        inside = (floats >= rule.low) & (floats <= rule.high)  # False for NaN
    if not (inside if present is None else inside | ~present).all():
        raise Unreadable(f"{rule.name}: values must be finite and within [{rule.low}, {rule.high}]")
    return floats, present


def _numbers(
    values: Sequence[Any], allowed: set[type], nullable: bool, dtype: type[np.generic]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` as a ``dtype`` array (0 where null) and where they are present."""
    types = set(map(type, values))  # bool is not int here: true and false are refused
    try:
        if types <= allowed:
            return np.array(values, dtype=dtype), None
        if nullable and types <= allowed | {_NONE}:
            objects = np.array(values, dtype=object)
            present = objects != None
            objects[~present] = 0
            return objects.astype(dtype), present
    except OverflowError:  # an int beyond int64 (or float64)
        raise Unreadable("a number out of range") from None
    raise Unreadable(f"values of types {sorted(t.__name__ for t in types)}")
