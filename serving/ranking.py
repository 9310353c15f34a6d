"""Ranking requests (``POST /v1/rank``): one context, many candidates, read and placed.

A ranking request gives the features of the user and the request once (``context``) and those
of each item per candidate (``candidates``: one object per candidate, or one list per feature),
where each feature's ``scope`` in the schema allows::

    {"context": {"user_id": 7, "city": "c_3"},
     "candidates": [{"item_id": 31, "price": 2.5}, {"item_id": 8}],
     "top_k": 1, "order_by": "pctcvr"}

:class:`RankReader` checks where every feature is given (:meth:`RankReader.placement`: a
candidate feature in the context, a context feature with the candidates, a feature in both
places, a required feature in neither, ``order_by`` without ``top_k``; each an error naming the
feature) and then reads both parts with the columnar fast path
(:class:`~serving.columns.ColumnReader`): the context as a column of one entry, the candidates
as columns. Anything else it cannot vouch for is :class:`~serving.columns.Unreadable`, and the
service then validates the body with the request model of ``schemas.api.rank_request_model``,
as for the other routes. The featurizer maps the context once and the candidates once
(``Scorer.featurize_rank``), and the model broadcasts the context's inputs to the candidates
(``ScoringModel.predict_ranking``).

:func:`top_indices` orders the candidates (highest first; equal scores in request order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, unique
from typing import Any

import numpy as np

from schemas.api import RankOrder, feature_rules
from schemas.features import FeatureSchema, FeatureScope
from serving.columns import ColumnReader, Columns, Unreadable, transpose
from serving.features import RowError
from serving.model import Features, RankFeatures
from serving.typed_json import RankObjects

__all__ = [
    "CandidatesForm",
    "Misplaced",
    "RankInputs",
    "RankReader",
    "RankValues",
    "misplaced",
    "rank_error_items",
    "top_indices",
]

_KEYS = frozenset({"context", "candidates", "top_k", "order_by"})
_ORDERS = frozenset(order.value for order in RankOrder)


@unique
class CandidatesForm(str, Enum):
    OBJECTS = "objects"  # [{feature: value, ...}, ...]: one object per candidate
    COLUMNS = "columns"  # {feature: [value, ...], ...}: one list per feature


class Misplaced(ValueError):
    """Features given where their scope or rule does not allow; ``errors`` name each one as
    FastAPI-style ``{loc, msg, type}`` items."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} misplaced feature(s)")
        self.errors = errors


@dataclass(frozen=True)
class RankValues:
    """A ranking request's checked values.

    Attributes:
        context: the context's features, one row.
        candidates: the candidates' features, one row per candidate.
        form: how the candidates were given (errors name them accordingly).
        top_k: how many of the best candidates to answer, if any.
        order_by: the score ``top_k`` orders by.
    """

    context: Columns
    candidates: Columns
    form: CandidatesForm
    top_k: int | None
    order_by: RankOrder


@dataclass(frozen=True)
class RankInputs:
    """A ranking request ready to score: model inputs (one row for a single candidate), and
    what to answer besides the scores."""

    features: Features | RankFeatures
    top_k: int | None
    order_by: RankOrder


class RankReader:
    """Reads ranking requests of one feature schema.

    Args:
        schema: the served model's feature schema.
        max_rows: the most candidates per request.

    Example::

        reader = RankReader(schema, max_rows=1024)
        values = reader.read({"context": {"user_id": 7}, "candidates": [{"item_id": 3}]})
        values.candidates.rows  # 1
    """

    def __init__(self, schema: FeatureSchema, max_rows: int) -> None:
        self.columns = ColumnReader(schema, max_rows)
        self.rules = {rule.name: rule for rule in feature_rules(schema)}
        self.required = [rule for rule in self.rules.values() if rule.required]
        self.max_rows = max_rows
        scopes: dict[FeatureScope, frozenset[str]] = {
            scope: frozenset(n for n, r in self.rules.items() if r.scope is scope)
            for scope in FeatureScope
        }
        self._context_only = scopes[FeatureScope.CONTEXT]
        self._candidate_only = scopes[FeatureScope.CANDIDATE]
        self._either = scopes[FeatureScope.ANY]

    def read(self, body: Any, *, booleans: bool = True) -> RankValues:
        """Check and convert a parsed ``{"context": ..., "candidates": ...}`` body
        (``booleans``: as :meth:`~serving.columns.ColumnReader.read`).

        Raises:
            Misplaced: features given where the schema does not allow them, required ones
                missing, ``order_by`` without ``top_k``.
            Unreadable: anything else the request model should look at.
        """
        if type(body) is not dict or not body.keys() <= _KEYS or "candidates" not in body:
            raise Unreadable("the body is not {'context': {...}, 'candidates': ...}")
        context, candidates = body.get("context", {}), body["candidates"]
        top_k, order_by = body.get("top_k"), body.get("order_by")
        if type(context) is not dict:
            raise Unreadable("context must be an object")
        self._check_options(top_k, order_by)
        if type(candidates) is list:
            self._check_count(len(candidates))
            form, columns, rows = CandidatesForm.OBJECTS, transpose(candidates), len(candidates)
        elif type(candidates) is dict:
            form, columns, rows = CandidatesForm.COLUMNS, candidates, None
        else:
            raise Unreadable("candidates must be a list of objects or an object of columns")
        errors = self.placement(context, columns, candidates, form, top_k, order_by)
        if errors:
            raise Misplaced(errors)
        return self._values(context, columns, rows, form, top_k, order_by, booleans=booleans)

    def read_objects(self, request: RankObjects) -> RankValues:
        """Check and convert a request of candidate objects decoded by
        :class:`~serving.typed_json.ObjectBodies` (its values hold no booleans).

        Raises:
            Unreadable: anything :meth:`read` refuses, misplaced features included (:meth:`read`
                names them by candidate).
        """
        candidates = request.candidates
        self._check_options(request.top_k, request.order_by)
        self._check_count(candidates.rows)
        form = CandidatesForm.COLUMNS  # placement only says whether, from the columns
        if self.placement(
            request.context,
            candidates.columns,
            candidates.columns,
            form,
            request.top_k,
            request.order_by,
        ):
            raise Unreadable("features given where they may not be")
        return self._values(
            request.context,
            candidates.columns,
            candidates.rows,
            CandidatesForm.OBJECTS,
            request.top_k,
            request.order_by,
            typed=True,
        )

    def _check_options(self, top_k: Any, order_by: Any) -> None:
        if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= self.max_rows):
            raise Unreadable(f"top_k must be an integer in [1, {self.max_rows}]")
        if order_by is not None and (type(order_by) is not str or order_by not in _ORDERS):
            raise Unreadable(f"order_by must be one of {sorted(_ORDERS)}")

    def _check_count(self, rows: int) -> None:
        if not 1 <= rows <= self.max_rows:
            raise Unreadable(f"candidates must be a list of 1 to {self.max_rows} objects")

    def _values(
        self,
        context: dict[str, Any],
        columns: Mapping[str, Any],
        rows: int | None,
        form: CandidatesForm,
        top_k: int | None,
        order_by: str | None,
        *,
        booleans: bool = True,
        typed: bool = False,
    ) -> RankValues:
        """Both parts read, once placement has checked what each must give (``booleans`` and
        ``typed``: as :meth:`~serving.columns.ColumnReader.read`'s)."""
        none: frozenset[str] = frozenset()  # placement checked what each part must give
        context_columns = {k: [v] for k, v in context.items()}
        if _one_entry(columns):
            # one candidate: both parts read as one row (placement kept them apart), then split
            row = self.columns.read(
                {**context_columns, **columns}, 1, none, booleans=booleans, typed=typed
            )
            context_values = Columns(1, {k: row.values[k] for k in context_columns})
            candidate_values = Columns(1, {k: row.values[k] for k in columns})
        else:
            context_values = self.columns.read(
                context_columns, 1, none, booleans=booleans, typed=typed
            )
            candidate_values = self.columns.read(
                columns, rows, none, booleans=booleans, typed=typed
            )
        return RankValues(
            context=context_values,
            candidates=candidate_values,
            form=form,
            top_k=top_k,
            order_by=RankOrder(order_by or RankOrder.PCTCVR),
        )

    def placement(
        self,
        context: Mapping[str, Any],
        columns: Mapping[str, Any],
        candidates: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        form: CandidatesForm,
        top_k: int | None,
        order_by: str | None,
    ) -> list[dict[str, Any]]:
        """What is given in the wrong place, or not at all, each named (features unknown to the
        schema are left to the request model).

        Args:
            context: the context object.
            columns: the candidates' features (transposed, for objects).
            candidates: the candidates as given.
            form: how they were given.
            top_k: the request's ``top_k``.
            order_by: the request's ``order_by``.
        """
        errors = []
        for name in context.keys() & self._candidate_only:
            scope = FeatureScope.CANDIDATE
            errors.append(_error(("context", name), misplaced(name, scope), "feature_scope"))
        for name in columns.keys() & self._context_only:
            where = _where(candidates, form, name)
            errors.append(_error(where, misplaced(name, FeatureScope.CONTEXT), "feature_scope"))
        for name in context.keys() & columns.keys() & self._either:
            errors.append(
                _error(
                    ("context", name),
                    f"{name!r} is given in the context and for the candidates: give it in "
                    "one place",
                    "feature_twice",
                )
            )
        for rule in self.required:
            errors += _required(rule.name, rule.scope, context, columns, candidates, form)
        if order_by is not None and top_k is None:
            errors.append(
                _error(
                    ("order_by",),
                    "order_by orders the top_k best candidates: give top_k too",
                    "missing_top_k",
                )
            )
        return errors


def misplaced(name: str, scope: FeatureScope) -> str:
    """Why feature ``name`` of ``scope`` may not be given where it was."""
    if scope is FeatureScope.CANDIDATE:
        return f"{name!r} is a candidate feature (scope 'candidate'): give it for each candidate"
    return f"{name!r} is a context feature (scope 'context'): give it once, in the context"


def rank_error_items(
    context: Sequence[RowError], candidates: Sequence[RowError], form: CandidatesForm
) -> list[dict[str, Any]]:
    """FastAPI-style error items of the featurizer's errors, named in the request's terms:
    ``context.<feature>``, ``candidates[<i>].<feature>`` (or ``candidates.<feature>[<i>]`` for
    columns), with the list position last for list features."""
    items = []
    for e in context:
        where = ("context", e.feature)
        items.append(_error(where if e.position is None else (*where, e.position), e.msg, e.type))
    for e in sorted(candidates, key=lambda e: e.row):
        where = (
            ("candidates", e.row, e.feature)
            if form is CandidatesForm.OBJECTS
            else ("candidates", e.feature, e.row)
        )
        items.append(_error(where if e.position is None else (*where, e.position), e.msg, e.type))
    return items


def top_indices(scores: np.ndarray, k: int, order_by: RankOrder) -> list[int]:
    """The indices of the ``k`` highest ``order_by`` scores, best first; equal scores keep
    request order (a stable sort of the negated scores).

    Args:
        scores: ``(n, 3)`` pctr, pcvr, pctcvr of the candidates, in request order.
        k: how many (all of them if there are fewer).
        order_by: the score to order by.
    """
    order = np.argsort(-scores[:, order_by.column], kind="stable")
    return order[:k].tolist()


def _error(loc: tuple[str | int, ...], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": type_}


def _one_entry(columns: Mapping[str, Any]) -> bool:
    """Whether the candidates' first column holds one entry (the reader checks the others)."""
    first = next(iter(columns.values()), None)
    return type(first) in (list, tuple) and len(first) == 1


def _where(
    candidates: Sequence[Mapping[str, Any]] | Mapping[str, Any], form: CandidatesForm, name: str
) -> tuple[str | int, ...]:
    """Where the candidates give ``name``: the first candidate naming it, or its column."""
    if form is CandidatesForm.COLUMNS:
        return ("candidates", name)
    first = next(i for i, candidate in enumerate(candidates) if name in candidate)  # type: ignore[union-attr]
    return ("candidates", first, name)


def _required(
    name: str,
    scope: FeatureScope,
    context: Mapping[str, Any],
    columns: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    form: CandidatesForm,
) -> list[dict[str, Any]]:
    """Errors for a feature under ``oov: error`` that is missing where it should be given."""
    if name in context:
        return []
    by_candidates = name in columns or scope is FeatureScope.CANDIDATE
    if not by_candidates:
        where = (
            "in the context"
            if scope is FeatureScope.CONTEXT
            else "in the context or for every candidate"
        )
        return [
            _error(
                ("context", name),
                f"Field required: give it {where} (its oov policy is 'error')",
                "missing",
            )
        ]
    if form is CandidatesForm.COLUMNS:
        if name in columns:
            return []
        return [_error(("candidates", name), "Field required", "missing")]
    return [
        _error(("candidates", i, name), "Field required", "missing")
        for i, candidate in enumerate(candidates)  # type: ignore[arg-type]
        if name not in candidate
    ]
