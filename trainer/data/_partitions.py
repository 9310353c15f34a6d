"""Hive-style partitions (``.../day=2026-12-01/part-0.parquet``) and the filter that selects them.

A partitioned log is one data set: every Parquet file below its root, whose directory names
``key=value`` give each file its partition values. A filter such as
``day >= '2026-11-25' and day < '2026-12-02'`` is Python syntax restricted to comparisons of a
partition column with constants, ``in`` / ``not in`` a list of constants, ``and``, ``or``, ``not``
and parentheses; it becomes a ``pyarrow.dataset`` expression evaluated over the files' partition
values, so no file outside the selection is ever opened.

Example::

    f = PartitionFilter.parse("day >= '2026-11-25'")
    f.columns                                        # ('day',)
    f.expression({"day": pa.string()})              # pc.field('day') >= '2026-11-25'
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

__all__ = [
    "FilterError",
    "PartitionFilter",
    "partition_types",
    "partition_values",
    "select_partitions",
    "typed_value",
]

# Hive's name for a null partition value.
_NULL_VALUE = "__HIVE_DEFAULT_PARTITION__"

_COMPARISONS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
# ``a < b`` read from the other side, for ``'2026-11-25' <= day``.
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class FilterError(ValueError):
    """A partition filter is not valid; the message quotes the filter and the offending part."""


@dataclass(frozen=True)
class PartitionFilter:
    """A parsed partition filter: checked syntax, bound to columns only when files are known.

    Attributes:
        text: the filter as written.
        columns: the partition columns it names, in order of appearance.
    """

    text: str
    tree: ast.expr
    columns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PartitionFilter:
        """Parse and check the syntax.

        Raises:
            FilterError: not an expression, or a construct other than those listed in the module
                docstring (calls, attributes, arithmetic, ...), quoted.
        """
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as err:
            raise FilterError(f"filter {text!r}: not a valid expression ({err.msg})") from None
        columns: list[str] = []
        _check(tree, text, columns)
        return cls(text=text, tree=tree, columns=tuple(dict.fromkeys(columns)))

    def expression(self, types: Mapping[str, pa.DataType]) -> ds.Expression:
        """The ``pyarrow.dataset`` expression over partition columns of ``types``.

        Raises:
            FilterError: a column that is not a partition column, or a constant whose type does
                not match its column (``day == 1`` for a string ``day``).
        """
        unknown = [c for c in self.columns if c not in types]
        if unknown:
            raise FilterError(
                f"filter {self.text!r}: unknown column {unknown[0]!r}; the partition columns "
                f"are {list(types)}" + ("" if types else " (the data is not partitioned)")
            )
        return _build(self.tree, self.text, types)


def _segment(text: str, node: ast.AST) -> str:
    return ast.get_source_segment(text.strip(), node) or ast.dump(node)


def _check(node: ast.expr, text: str, columns: list[str]) -> None:
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text, columns)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, text, columns)
    elif isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            column = _column_side(left, right, op, text)
            columns.append(column)
    else:
        raise FilterError(
            f"filter {text!r}: {_segment(text, node)!r} is not allowed; use comparisons of "
            "partition columns with constants, 'in', 'and', 'or', 'not'"
        )


def _column_side(left: ast.expr, right: ast.expr, op: ast.cmpop, text: str) -> str:
    """The column of one comparison, checking that the other side is a constant (or a list)."""
    pair = f"{_segment(text, left)} ... {_segment(text, right)}"
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(left, ast.Name):
            raise FilterError(f"filter {text!r}: {pair!r}: 'in' needs a column on its left")
        if not (isinstance(right, (ast.List, ast.Tuple, ast.Set)) and right.elts):
            raise FilterError(
                f"filter {text!r}: {_segment(text, right)!r}: 'in' needs a non-empty list of "
                "constants, e.g. day in ('2026-12-01', '2026-12-02')"
            )
        for element in right.elts:
            _constant(element, text)
        return left.id
    if type(op) not in _COMPARISONS:
        raise FilterError(f"filter {text!r}: {pair!r}: 'is' comparisons are not allowed")
    names = [side for side in (left, right) if isinstance(side, ast.Name)]
    if len(names) != 1:
        raise FilterError(
            f"filter {text!r}: {pair!r}: a comparison needs one partition column and one constant"
        )
    _constant(right if names[0] is left else left, text)
    return names[0].id


def _constant(node: ast.expr, text: str) -> str | int | float:
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    inner = node.operand if negative else node  # type: ignore[attr-defined]
    if isinstance(inner, ast.Constant) and type(inner.value) in (str, int, float):
        if negative and isinstance(inner.value, str):
            raise FilterError(f"filter {text!r}: {_segment(text, node)!r} is not a constant")
        return -inner.value if negative else inner.value
    raise FilterError(
        f"filter {text!r}: {_segment(text, node)!r} is not a constant (a quoted string or a number)"
    )


def _build(node: ast.expr, text: str, types: Mapping[str, pa.DataType]) -> ds.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_build(value, text, types) for value in node.values]
        combined = parts[0]
        for part in parts[1:]:
            combined = (combined & part) if isinstance(node.op, ast.And) else (combined | part)
        return combined
    if isinstance(node, ast.UnaryOp):
        return ~_build(node.operand, text, types)
    assert isinstance(node, ast.Compare)  # _check allowed nothing else
    operands = [node.left, *node.comparators]
    terms = [
        _comparison(op, left, right, text, types)
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True)
    ]
    combined = terms[0]
    for term in terms[1:]:  # a < day < b is a < day and day < b
        combined = combined & term
    return combined


def _comparison(
    op: ast.cmpop, left: ast.expr, right: ast.expr, text: str, types: Mapping[str, pa.DataType]
) -> ds.Expression:
    if isinstance(op, (ast.In, ast.NotIn)):
        name = left.id  # type: ignore[attr-defined]
        values = [_typed(_constant(e, text), name, types, text) for e in right.elts]  # type: ignore[attr-defined]
        member = pc.field(name).isin(pa.array(values, types[name]))
        return ~member if isinstance(op, ast.NotIn) else member
    symbol = _COMPARISONS[type(op)]
    if isinstance(left, ast.Name):
        name, value = left.id, _constant(right, text)
    else:
        name, value, symbol = right.id, _constant(left, text), _MIRRORED[symbol]  # type: ignore[attr-defined]
    scalar = pa.scalar(_typed(value, name, types, text), types[name])
    field = pc.field(name)
    return {
        "==": field == scalar,
        "!=": field != scalar,
        "<": field < scalar,
        "<=": field <= scalar,
        ">": field > scalar,
        ">=": field >= scalar,
    }[symbol]


def _typed(
    value: str | float, name: str, types: Mapping[str, pa.DataType], text: str
) -> str | int | float:
    kind = types[name]
    ok = isinstance(value, str) if pa.types.is_string(kind) else not isinstance(value, str)
    if not ok:
        hint = "quote it" if pa.types.is_string(kind) else "do not quote it"
        raise FilterError(
            f"filter {text!r}: column {name!r} holds {'strings' if pa.types.is_string(kind) else 'integers'}, "
            f"compared with {value!r}; {hint}"
        )
    return value


# Partition values -----------------------------------------------------------------------------


def partition_values(relative_path: str) -> dict[str, str | None]:
    """The ``key=value`` directories of a file's path below the root, in order.

    ``"day=2026-12-01/hour=03/part-0.parquet"`` gives ``{"day": "2026-12-01", "hour": "03"}``;
    values are URL-decoded as Hive and pyarrow write them; ``__HIVE_DEFAULT_PARTITION__`` is None.
    """
    values: dict[str, str | None] = {}
    for segment in relative_path.split("/")[:-1]:
        key, sep, value = segment.partition("=")
        if sep and key:
            decoded = unquote(value)
            values[unquote(key)] = None if decoded == _NULL_VALUE else decoded
    return values


def partition_types(values: Sequence[Mapping[str, str | None]]) -> dict[str, pa.DataType]:
    """Each partition column's type: int64 if every value is an integer, else string.

    This is pyarrow's hive inference (with int64 rather than int32), so that ``day=2026-12-01``
    is a string compared as text (ISO dates sort as text) and ``hour=3`` a number.
    """
    keys = list(dict.fromkeys(k for v in values for k in v))
    types: dict[str, pa.DataType] = {}
    for key in keys:
        seen = [v.get(key) for v in values if v.get(key) is not None]
        numeric = bool(seen) and all(_is_int(s) for s in seen)  # type: ignore[arg-type]
        types[key] = pa.int64() if numeric else pa.string()
    return types


def typed_value(value: str | None, kind: pa.DataType) -> Any:
    """A partition value as its column's Python type."""
    if value is None or pa.types.is_string(kind):
        return value
    return int(value)


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def select_partitions(
    values: Sequence[Mapping[str, Any]],
    types: Mapping[str, pa.DataType],
    partition_filter: PartitionFilter,
) -> list[int]:
    """Indices of the files whose (typed) partition values pass the filter, in order."""
    expression = partition_filter.expression(types)
    table = pa.table(
        {
            **{key: pa.array([v.get(key) for v in values], kind) for key, kind in types.items()},
            "__file": pa.array(range(len(values)), pa.int64()),
        }
    )
    return table.filter(expression).column("__file").to_pylist()
