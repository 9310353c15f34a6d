"""Request values checked and converted a column at a time with numpy: the service's fast path.

Both request forms become :class:`Columns`: the columnar form directly, the row form once its
rows are transposed (:func:`transpose`). :class:`ColumnReader` holds every value to the rules of
``schemas.api.feature_rules``, the rules the request models document, a kind of values at a time
(every single-valued id column together, every dense column together, then each string and list
column): a single pass over the Python values learns their types (``set(map(type, values))``, so
a ``true`` is never taken for a ``1``), then one numpy conversion and vectorised range checks
replace a validator call per value. When no value can be a boolean, numpy's own type inference,
in C, settles the numbers of a column without that pass: when the JSON text holds no ``true`` or
``false`` at all (:func:`may_hold_booleans`), and for the row objects that
:class:`~serving.typed_json.ObjectBodies` has decoded against the same rules.

The reader only says *whether* a request is valid. When it is not (:class:`Unreadable`), the
service validates the body again with the pydantic request model, whose messages name every bad
value by row and feature. The reader is the stricter of the two: what is unusual but valid (ids
written as ``1.0``, JSON the fast parser refuses) it leaves to the request model, which converts
it and hands the reader values it accepts. So a request the reader accepts is one the request
model accepts, with the same values; the tests hold it to that on generated bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

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

__all__ = ["Column", "ColumnReader", "Columns", "Unreadable", "may_hold_booleans", "transpose"]

_NONE = type(None)
_MAX_REMEMBERED = 256  # sets of dense features whose bounds a reader keeps


class Unreadable(ValueError):
    """Values the fast path does not take; the request model says what is wrong with them."""


class Column(NamedTuple):
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


class Columns(NamedTuple):
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
        self._bounds_of: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def columns_request(self, body: Any, *, booleans: bool = True) -> Columns:
        """The columns of a parsed ``{"columns": {...}}`` body (``booleans``: as :meth:`read`).

        Raises:
            Unreadable: anything the request model should look at.
        """
        if type(body) is not dict or len(body) != 1 or "columns" not in body:
            raise Unreadable("the body is not {'columns': {...}}")
        return self.read(body["columns"], booleans=booleans)

    def rows_request(self, body: Any, *, booleans: bool = True) -> Columns:
        """The columns of a parsed ``{"rows": [...]}`` body (``booleans``: as :meth:`read`).

        Raises:
            Unreadable: anything the request model should look at.
        """
        if type(body) is not dict or len(body) != 1 or "rows" not in body:
            raise Unreadable("the body is not {'rows': [...]}")
        rows = body["rows"]
        if type(rows) is not list or not 1 <= len(rows) <= self.max_rows:
            raise Unreadable(f"rows must be a list of 1 to {self.max_rows} objects")
        return self.read(transpose(rows), rows=len(rows), booleans=booleans)

    def read(
        self,
        columns: Mapping[str, Sequence[Any]],
        rows: int | None = None,
        required: frozenset[str] | None = None,
        *,
        booleans: bool = True,
        typed: bool = False,
    ) -> Columns:
        """Check and convert every column.

        Args:
            columns: feature name to one entry per row.
            rows: the number of rows, when ``columns`` may be empty (transposed rows); default:
                the length of the columns, which must then be given.
            required: the features that must be given; default: every one under ``oov: error``
                (a ranking request's parts require what the other part does not give).
            booleans: whether a value may be a boolean; False when the JSON text holds no
                ``true`` or ``false`` (:func:`may_hold_booleans`) or a typed decoder refused
                them, which lets numpy's own type inference check numbers.
            typed: the values were decoded against the feature rules
                (:class:`~serving.typed_json.ObjectBodies`): they hold no booleans, and an id
                is an ``int`` (or ``None`` where its rule allows), so id columns convert
                without type inference.

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
        booleans = booleans and not typed
        out: dict[str, Column] = {}
        ids, numbers = [], []  # single-valued ids and dense values: read a kind at a time
        for name, values in columns.items():
            if type(values) not in (list, tuple) or len(values) != rows:
                raise Unreadable(f"column {name!r} is not a list of {rows} entries")
            rule = self.rules[name]
            if rule.multi_valued or rule.kind is ValueKind.STRING:
                out[name] = _read(values, rule)
            else:
                (ids if rule.kind is ValueKind.INT else numbers).append(rule)
        if ids:
            out.update(_id_block(ids, columns, booleans, typed))
        if numbers:
            out.update(_float_block(numbers, columns, *self._bounds(numbers), booleans))
        return Columns(rows, out)

    def _bounds(self, rules: list[FeatureRule]) -> tuple[np.ndarray, np.ndarray]:
        """``(k, 1)`` lowest and highest values of dense features (remembered per set)."""
        key = tuple(rule.name for rule in rules)
        bounds = self._bounds_of.get(key)
        if bounds is None:
            bounds = (
                np.array([[rule.low] for rule in rules]),
                np.array([[rule.high] for rule in rules]),
            )
            if len(self._bounds_of) < _MAX_REMEMBERED:
                self._bounds_of[key] = bounds
        return bounds


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


def _id_block(
    rules: list[FeatureRule], columns: Mapping[str, Sequence[Any]], booleans: bool, typed: bool
) -> dict[str, Column]:
    """Single-valued id columns of several features, checked and converted at once."""
    # Only JSON integers: 1.0 is a valid id too, but the request model converts it (it is rare).
    nullable = [not rule.strict for rule in rules]
    values = [columns[rule.name] for rule in rules]
    if typed:
        ints, present = _typed_ints(values, any(nullable))
    else:
        ints, present = _numbers(
            values, {int}, any(nullable), np.int64, block=True, booleans=booleans
        )
    if present is not None and not all(nullable):
        for j, rule in enumerate(rules):
            if rule.strict and not present[j].all():
                raise Unreadable(f"{rule.name}: a required id is null")
    for j, rule in enumerate(rules):
        if rule.low > INT64_MIN or rule.high < INT64_MAX:
            inside = (ints[j] >= rule.low) & (ints[j] <= rule.high)
            if not (inside if present is None else inside | ~present[j]).all():
                raise Unreadable(f"{rule.name}: ids outside [{rule.low}, {rule.high}]")
    return _split(rules, ints, present)


def _float_block(
    rules: list[FeatureRule],
    columns: Mapping[str, Sequence[Any]],
    low: np.ndarray,
    high: np.ndarray,
    booleans: bool,
) -> dict[str, Column]:
    """Dense columns of several features, checked (against ``(k, 1)`` bounds) and converted at
    once."""
    values = [columns[rule.name] for rule in rules]
    floats, present = _numbers(
        values, {float, int}, True, np.float64, block=True, booleans=booleans
    )
    inside = (floats >= low) & (floats <= high)  # False for NaN
    if not (inside if present is None else inside | ~present).all():
        raise Unreadable("dense values must be finite and within their features' ranges")
    return _split(rules, floats, present)


def _split(
    rules: list[FeatureRule], values: np.ndarray, present: np.ndarray | None
) -> dict[str, Column]:
    """One column per feature (row of ``values``); ``present`` only where a value is missing."""
    if present is None:
        return {rule.name: Column(values[j]) for j, rule in enumerate(rules)}
    partial = (~present).any(axis=1).tolist()
    return {
        rule.name: Column(values[j], present[j] if partial[j] else None)
        for j, rule in enumerate(rules)
    }


def _read(values: Sequence[Any], rule: FeatureRule) -> Column:
    """A list feature's column, or a single-valued string feature's."""
    if rule.multi_valued:
        return _read_lists(values, rule)
    return Column(_strings(values, nullable=not rule.strict))


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


def _numbers(
    values: Sequence[Any],
    allowed: set[type],
    nullable: bool,
    dtype: type[np.generic],
    *,
    block: bool = False,
    booleans: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` as a ``dtype`` array (0 where null) and where they are present.

    ``values`` is one column, or with ``block`` a list of columns of one length (2-D out);
    ``booleans``: whether a value may be a boolean (see :meth:`ColumnReader.read`).
    """
    if not booleans:
        return _inferred(values if block else [values], allowed, nullable, dtype, block)
    types = set(map(type, chain.from_iterable(values) if block else values))
    # bool is not int here: true and false are refused
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


def _typed_ints(
    columns: Sequence[Sequence[Any]], nullable: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_numbers` of id columns whose values are ``int`` or ``None`` (decoded against the
    rules): numpy converts a column of ints to int64 without inferring its type first, in half
    the time; a ``None`` (or an int beyond int64) makes it refuse, and that column alone takes
    the null-aware path."""
    out = np.empty((len(columns), len(columns[0])), dtype=np.int64)
    present = None
    for j, column in enumerate(columns):
        try:
            out[j] = column
        except (TypeError, OverflowError):
            out[j], mask = _numbers(column, {int}, nullable, np.int64)
            if mask is not None:
                if present is None:
                    present = np.ones(out.shape, dtype=bool)
                present[j] = mask
    return out, present


def _inferred(
    columns: Sequence[Sequence[Any]],
    allowed: set[type],
    nullable: bool,
    dtype: type[np.generic],
    block: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_numbers` of values known to hold no boolean: numpy infers each column's type in
    C, and only a column it cannot settle (a null, a float among ids, a string, an integer beyond
    int64) has its values' types checked one by one."""
    settled = {np.dtype(np.int64)} | ({np.dtype(np.float64)} if float in allowed else set())
    if len(columns[0]) == 1:  # one row (a ranking context): one inference for every column
        try:
            array = np.array(columns)
        except ValueError:
            array = None
        if array is not None and array.dtype in settled and array.ndim == 2:
            out = array.astype(dtype, copy=False)
            return (out, None) if block else (out[0], None)
    out = np.empty((len(columns), len(columns[0])), dtype=dtype)
    present = None
    for j, column in enumerate(columns):
        try:
            array = np.array(column)
        except ValueError:  # lists of different lengths among the values
            raise Unreadable("values of types list and others") from None
        if array.dtype in settled and array.ndim == 1:  # without booleans: ints (or numbers)
            out[j] = array
            continue
        out[j], mask = _numbers(column, allowed, nullable, dtype)
        if mask is not None:
            if present is None:
                present = np.ones(out.shape, dtype=bool)
            present[j] = mask
    if block:
        return out, present
    return out[0], None if present is None else present[0]


def may_hold_booleans(body: bytes) -> bool:
    """Whether a JSON text may hold a boolean: it does not when neither ``true`` nor ``false``
    occurs in it, even inside a string.

    The search (about 1.2 ns a byte here) pays where the text is mostly values: columns. Rows and
    candidate objects repeat every feature name beside each value, so there the type check per
    value is cheaper than searching the text, and the scorer skips the search (measured on
    256-row bodies: objects 40 us faster with the type check, columns 15-90 us faster with the
    search). Ordinary bodies of objects do not come here: msgspec types them
    (:mod:`serving.typed_json`)."""
    return b"true" in body or b"false" in body
