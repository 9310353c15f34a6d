"""Bodies of one object per row, decoded against the feature rules in C (msgspec).

``{"rows": [...]}`` (``POST /v1/score``) and a ranking request whose candidates are objects
(``POST /v1/rank``) repeat every feature name beside each value. Parsed into dicts, their values
need a Python pass to learn their types before numpy may convert them (a ``true`` must not pass
for a ``1``: :mod:`serving.columns`). :class:`ObjectBodies` decodes them instead into structs whose
fields are typed by the rules of ``schemas.api.feature_rules`` (an id ``int``, a dense value
``float``, a string id ``str``, a list feature a list of those; ``null`` only where the rule
allows it), so msgspec refuses a boolean, a fractional id or an unknown feature while it parses.
The structs are then transposed into columns (``operator.attrgetter`` and ``zip``, in C) for
:class:`~serving.columns.ColumnReader`, which checks ranges and lengths without a type pass
(``booleans=False``).

Like the reader, the decoder only says whether a body is ordinary: a body it refuses
(:class:`~serving.columns.Unreadable`) takes the untyped path (``orjson`` and the reader's type
pass), and then the request model, which names what is wrong. It refuses some valid bodies (an id
written ``1.0``, which the request model converts; features misplaced in a ranking request,
which the untyped path names) and accepts none that the request model refuses: the tests hold it
to that on generated bodies.

Example::

    bodies = ObjectBodies(schema)
    rows = bodies.rows(b'{"rows": [{"user_id": 7, "price": 1.5}, {"user_id": 8}]}')
    rows.columns["price"]  # (1.5, None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec

from schemas.api import FeatureRule, ValueKind, feature_rules
from schemas.features import FeatureSchema
from serving.columns import Unreadable

__all__ = ["ObjectBodies", "RankObjects", "RowObjects"]

_VALUE_TYPES = {ValueKind.INT: int, ValueKind.FLOAT: float, ValueKind.STRING: str}


@dataclass(frozen=True)
class RowObjects:
    """The rows of a body, as columns.

    Attributes:
        columns: feature name to one value per row (``None`` where a row gives none); a
            feature no row gives a value for is left out.
        rows: the number of rows.
    """

    columns: dict[str, Sequence[Any]]
    rows: int


@dataclass(frozen=True)
class RankObjects:
    """A ranking request whose candidates are objects, typed.

    Attributes:
        context: the context's features as given (``null`` included).
        candidates: the candidates, as :class:`RowObjects`.
        top_k: as given.
        order_by: as given.
    """

    context: dict[str, Any]
    candidates: RowObjects
    top_k: int | None
    order_by: str | None


class _Rows:
    """The struct type of one row of some features, and how to read rows of it back."""

    def __init__(self, name: str, fields: Sequence[tuple[FeatureRule, Any, Any]]) -> None:
        # Attributes f0, f1, ... named as the features in JSON: a feature's name need not be a
        # Python identifier. ``fields``: each feature's rule, value type and default.
        self.type = msgspec.defstruct(
            name,
            [
                (f"f{i}", kind, msgspec.field(name=rule.name, default=default))
                for i, (rule, kind, default) in enumerate(fields)
            ],
            forbid_unknown_fields=True,
            kw_only=True,
            gc=False,  # the structs hold no references the collector needs to follow
        )
        self.names = tuple(rule.name for rule, _, _ in fields)
        self._get = attrgetter(*(f"f{i}" for i in range(len(fields)))) if fields else None

    def values(self, row: msgspec.Struct) -> dict[str, Any]:
        """One row's fields by feature name."""
        if len(self.names) < 2:
            return {self.names[0]: self._get(row)} if self.names else {}
        return dict(zip(self.names, self._get(row)))

    def columns(self, rows: list[msgspec.Struct]) -> RowObjects:
        """The rows as columns, leaving out a feature that is ``None`` in every row (absent or
        ``null``: the same to the reader and to the request model's dump)."""
        if len(self.names) < 2:
            table = [tuple(map(self._get, rows))] if self.names else []
        else:
            table = list(zip(*map(self._get, rows)))
        columns = {
            name: column
            for name, column in zip(self.names, table)
            if column[0] is not None or column.count(None) < len(column)
        }
        return RowObjects(columns, len(rows))


def _entry_type(rule: FeatureRule) -> Any:
    """What one row may hold for ``rule``'s feature (``FeatureRule.entry_type`` without its
    bounds: the reader checks ranges and lengths)."""
    value = _VALUE_TYPES[rule.kind]
    if rule.multi_valued:
        return list[value if rule.strict else value | None] | None  # type: ignore[operator]
    return value if rule.strict else value | None


class ObjectBodies:
    """msgspec decoders of one schema's bodies of row objects.

    Args:
        schema: the served model's feature schema.
    """

    def __init__(self, schema: FeatureSchema) -> None:
        rules = feature_rules(schema)
        self._rows = _Rows(
            "Row",
            [(r, _entry_type(r), msgspec.NODEFAULT if r.required else None) for r in rules],
        )
        # The context tells what was given (null included) from what was not: a feature given
        # in both places is an error even when the context's value is null.
        self._context = _Rows(
            "Context",
            [(r, _entry_type(r) | msgspec.UnsetType, msgspec.UNSET) for r in rules if r.in_context],
        )
        # A candidate may leave out even a required feature: the context may give it.
        self._candidate = _Rows(
            "Candidate", [(r, _entry_type(r), None) for r in rules if r.in_candidates]
        )
        rows_body = msgspec.defstruct(
            "RowsBody", [("rows", list[self._rows.type])], forbid_unknown_fields=True
        )
        rank_body = msgspec.defstruct(
            "RankBody",
            [
                ("context", self._context.type, msgspec.field(default_factory=self._context.type)),
                ("candidates", list[self._candidate.type]),
                ("top_k", int | None, None),
                ("order_by", str | None, None),
            ],
            forbid_unknown_fields=True,
            kw_only=True,
        )
        self._rows_decoder = msgspec.json.Decoder(rows_body)
        self._rank_decoder = msgspec.json.Decoder(rank_body)

    def rows(self, body: bytes) -> RowObjects:
        """The rows of a ``{"rows": [...]}`` body.

        Raises:
            Unreadable: a body the decoder does not take (see the module's docstring).
        """
        try:
            rows = self._rows_decoder.decode(body).rows
        except msgspec.MsgspecError as err:
            raise Unreadable(str(err)) from None
        if not rows:
            raise Unreadable("no rows")
        return self._rows.columns(rows)

    def rank(self, body: bytes) -> RankObjects:
        """A ranking body whose candidates are objects.

        Raises:
            Unreadable: a body the decoder does not take: candidates as columns, features given
                where their scope does not allow, ... (see the module's docstring).
        """
        try:
            request = self._rank_decoder.decode(body)
        except msgspec.MsgspecError as err:
            raise Unreadable(str(err)) from None
        if not request.candidates:
            raise Unreadable("no candidates")
        context = {
            name: value
            for name, value in self._context.values(request.context).items()
            if value is not msgspec.UNSET
        }
        candidates = self._candidate.columns(request.candidates)
        return RankObjects(context, candidates, request.top_k, request.order_by)
