"""The scoring API's request and response models, shared by the service and its clients.

``POST /v1/score`` takes impressions as *raw* feature values, exactly as the impression logs hold
them (ids, category strings, lists, prices); the schema's hashing maps them to embedding rows::

    {"rows": [{"user_id": 961223854891, "city": "city_209", "recent_categories": [4, 35],
               "price": 25.34}]}

and answers one score per row, in order::

    {"model_version": "demo-step00000150-3f2a9c1b0d",
     "scores": [{"pctr": 0.041, "pcvr": 0.052, "pctcvr": 0.0021}]}

``POST /v1/score/columns`` takes the same values column by column, as feature stores and batch
jobs hold them (one list per feature, one entry per row), and answers columns::

    {"columns": {"user_id": [961223854891, 7], "city": ["city_209", null],
                 "recent_categories": [[4, 35], []], "price": [25.34, 3.0]}}
    {"model_version": "demo-step00000150-3f2a9c1b0d",
     "pctr": [0.041, 0.038], "pcvr": [0.052, 0.06], "pctcvr": [0.0021, 0.0023]}

``POST /v1/rank`` is a ranking call: the user's and the request's features once (``context``),
the items' for each candidate (``candidates``: one object per candidate, or one list per
feature), optionally the ``top_k`` best by ``order_by`` (``pctcvr`` by default)::

    {"context": {"user_id": 961223854891, "city": "city_209", "recent_categories": [4, 35]},
     "candidates": [{"item_id": 31, "price": 25.34}, {"item_id": 7, "price": 3.0}],
     "top_k": 1}
    {"model_version": "demo-step00000150-3f2a9c1b0d", "pctr": [0.041, 0.038],
     "pcvr": [0.052, 0.06], "pctcvr": [0.0021, 0.0023], "top": [1]}

Each feature's ``scope`` in the schema says where it goes: ``context`` features only in the
context, ``candidate`` features only with the candidates, ``any`` in either place but one per
request. The scores are those of ``/v1/score`` for the rows that repeat the context in every
candidate.

:class:`ScoreRequest`, :class:`ScoreColumnsRequest` and :class:`RankRequest` are the forms every
service accepts; :func:`score_request_model`, :func:`score_columns_model` and
:func:`rank_request_model` narrow them to one feature schema,
which is what the service validates with and documents in its OpenAPI spec. Both are built from
:func:`feature_rules`, the one statement of what a request may hold for each feature (the service's
vectorised check of the columnar form enforces the same rules). A feature left out, or ``null``,
is missing: a single-valued sparse feature then reads its table's OOV row (under ``oov: error`` it
is required), a list is empty, a dense feature takes its ``default``.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, unique
from typing import Annotated, Any, NotRequired, Required

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    create_model,
)
from typing_extensions import TypedDict

from schemas.artifact import Int8Layout, Quantization
from schemas.features import (
    FeatureSchema,
    FeatureScope,
    Normalization,
    NormalizationKind,
    OOVPolicy,
    SparseDType,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LIST_VALUES",
    "MAX_ROWS_LIMIT",
    "MAX_STRING_CHARS",
    "ErrorResponse",
    "FeatureInfo",
    "FeatureRule",
    "ModelInfo",
    "RankOrder",
    "RankRequest",
    "RankResponse",
    "ReloadRequest",
    "ReloadResponse",
    "RepositoryStatus",
    "Score",
    "ScoreColumnsRequest",
    "ScoreColumnsResponse",
    "ScoreRequest",
    "ScoreResponse",
    "ValidationErrorItem",
    "ValidationErrorResponse",
    "ValueKind",
    "candidates_form",
    "feature_rules",
    "rank_request_model",
    "score_columns_model",
    "score_request_model",
]

MAX_ROWS_LIMIT = 10_000  # the most rows per request any service may be configured to accept
MAX_STRING_CHARS = 1_024  # longest string value
MAX_LIST_VALUES = 1_000  # longest list value (lists longer than a feature's max_len are cut)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38

RawValue = StrictInt | StrictFloat | StrictStr | list[StrictInt | StrictStr | None] | None

_EXAMPLE_ROW = {
    "user_id": 961223854891,
    "city": "city_209",
    "recent_categories": [4, 35],
    "price": 25.34,
}


class ScoreRequest(BaseModel):
    """Impressions to score: one object per impression, raw feature values keyed by name."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"rows": [_EXAMPLE_ROW]}]}
    )

    rows: list[dict[str, RawValue]] = Field(min_length=1, max_length=MAX_ROWS_LIMIT)


class ScoreColumnsRequest(BaseModel):
    """Impressions to score, column by column: one list per feature, one entry per impression."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"columns": {k: [v] for k, v in _EXAMPLE_ROW.items()}}]},
    )

    columns: dict[str, list[RawValue]] = Field(min_length=1)


class Score(BaseModel):
    """Predictions for one impression."""

    pctr: float = Field(ge=0.0, le=1.0, description="P(click | impression)")
    pcvr: float = Field(ge=0.0, le=1.0, description="P(conversion | click, impression)")
    pctcvr: float = Field(
        ge=0.0, le=1.0, description="P(click and conversion | impression) = pctr * pcvr"
    )


class ScoreResponse(BaseModel):
    model_version: str = Field(description="version id of the model that computed every score")
    scores: list[Score] = Field(description="one per request row, in request order")


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ScoreColumnsResponse(BaseModel):
    model_version: str = Field(description="version id of the model that computed every score")
    pctr: list[Probability] = Field(
        description="P(click | impression), one per request row, in order"
    )
    pcvr: list[Probability] = Field(description="P(conversion | click, impression), one per row")
    pctcvr: list[Probability] = Field(
        description="P(click and conversion | impression) = pctr * pcvr"
    )


@unique
class RankOrder(str, Enum):
    """The score a ranking request's ``top`` is ordered by (highest first)."""

    PCTCVR = "pctcvr"  # P(click and conversion | impression): the default
    PCTR = "pctr"  # P(click | impression)
    PCVR = "pcvr"  # P(conversion | click, impression)

    @property
    def column(self) -> int:
        """The score's column in ``(pctr, pcvr, pctcvr)``."""
        return ("pctr", "pcvr", "pctcvr").index(self.value)


_EXAMPLE_CONTEXT = {k: v for k, v in _EXAMPLE_ROW.items() if k != "price"}
_TOP_K_DESCRIPTION = (
    "answer the indices of the top_k best candidates too, best first (at most as many as there "
    "are candidates; ties in request order)"
)
_ORDER_BY_DESCRIPTION = "the score top_k orders by (needs top_k); default pctcvr"


class RankRequest(BaseModel):
    """A ranking call: the context's features once, the candidates' as objects or columns."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "context": _EXAMPLE_CONTEXT,
                    "candidates": [{"price": 25.34}, {"price": 3.0}],
                    "top_k": 1,
                }
            ]
        },
    )

    context: dict[str, RawValue] = Field(default_factory=dict)
    candidates: list[dict[str, RawValue]] | dict[str, list[RawValue]]
    top_k: int | None = Field(default=None, ge=1, le=MAX_ROWS_LIMIT, description=_TOP_K_DESCRIPTION)
    order_by: RankOrder | None = Field(default=None, description=_ORDER_BY_DESCRIPTION)


class RankResponse(BaseModel):
    model_version: str = Field(description="version id of the model that computed every score")
    pctr: list[Probability] = Field(
        description="P(click | impression), one per candidate, in order"
    )
    pcvr: list[Probability] = Field(description="P(conversion | click, impression), per candidate")
    pctcvr: list[Probability] = Field(
        description="P(click and conversion | impression) = pctr * pcvr, per candidate"
    )
    top: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        description="with top_k: the indices of the best candidates by order_by, best first; "
        "equal scores in request order",
    )


class ValidationErrorItem(BaseModel):
    """One invalid value: ``loc`` is ``["body", "rows", <row>, <feature>(, <list position>)]``, or
    ``["body", "columns", <feature>, <row>(, <list position>)]`` for the columnar form; for a
    ranking call ``["body", "context", <feature>(, ...)]``, ``["body", "candidates", <candidate>,
    <feature>(, ...)]`` or, candidates given as columns, ``["body", "candidates", <feature>,
    <candidate>(, ...)]``."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """422: every invalid value of the request (the first 50, then a count)."""

    detail: list[ValidationErrorItem]


class ErrorResponse(BaseModel):
    detail: str | list[ValidationErrorItem]


class FeatureInfo(BaseModel):
    """How the service reads one feature of a request row."""

    name: str
    kind: str = Field(description="sparse or dense")
    dtype: str = Field(description="int or string (sparse); float (dense)")
    multi_valued: bool = False
    max_len: int | None = Field(default=None, description="list values kept (multi-valued only)")
    oov: str | None = Field(default=None, description="oov_row or error (sparse only)")
    default: float | None = Field(default=None, description="value used when missing (dense only)")
    normalization: dict[str, Any] | None = None
    scope: str = Field(
        default="any",
        description="where a ranking request gives it: context, candidate or any (either place)",
    )


class RepositoryStatus(BaseModel):
    """What a service following a model repository knows of it (``/v1/model``, ``/readyz``)."""

    uri: str = Field(description="the repository followed")
    current: str | None = Field(
        default=None, description="the version its pointer named when last read"
    )
    generation: int | None = Field(default=None, description="the pointer's generation")
    in_sync: bool = Field(description="whether the served version is the current one")
    refused_version: str | None = Field(
        default=None, description="a version that could not be loaded, while the pointer names it"
    )
    refused_reason: str | None = None
    last_poll_at: datetime | None = None
    last_poll_error: str | None = Field(
        default=None, description="why the last read of the pointer failed, if it did"
    )


class ModelInfo(BaseModel):
    """``GET /v1/model``: the model being served."""

    version: str
    created_at: datetime
    loaded_at: datetime
    model_dir: str
    schema_name: str
    schema_fingerprint: str
    heads: list[str]
    quantization: Quantization = Field(
        description="how the embedding rows are stored: none (float32), int8 or int4"
    )
    int8_layout: Int8Layout | None = Field(
        default=None,
        description="int8 only: scale-index-zero-point (D + 2 bytes a row), or "
        "float32-scale-offset (D + 8, models exported before it)",
    )
    int8_kernel: bool | None = Field(
        default=None,
        description="scale-index-zero-point rows only: whether the service's C kernel reads them "
        "(false: torch operations stand in, slower; the install found no C compiler)",
    )
    source: dict[str, Any]
    metrics: dict[str, float | None]
    features: list[FeatureInfo]
    max_rows: int = Field(description="most rows accepted per request")
    last_reload_error: str | None = Field(
        default=None, description="why the last reload failed, if it did"
    )
    repository: RepositoryStatus | None = Field(
        default=None, description="the model repository followed (--repository), if any"
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="model directory to load; default: the directory of the model being served (re-read)",
    )


class ReloadResponse(BaseModel):
    version: str
    previous_version: str | None
    model_dir: str
    seconds: float = Field(description="time taken to load and check the new model")


@unique
class ValueKind(str, Enum):
    INT = "int"  # an id: a JSON integer, or an integral number up to 2**53
    STRING = "string"  # a string of at most MAX_STRING_CHARS characters
    FLOAT = "float"  # a finite number (dense features)


@dataclass(frozen=True)
class FeatureRule:
    """What a request may hold for one feature, whichever form it takes.

    A value (or, for a list feature, each element) is of ``kind``; ids and dense values lie in
    ``[low, high]``. ``strict`` (``oov: error``): a single value is required and never ``null``,
    list elements are never ``null``. Otherwise ``null`` or absent means missing.
    """

    name: str
    kind: ValueKind
    multi_valued: bool
    strict: bool
    low: float = -math.inf
    high: float = math.inf
    description: str = ""
    scope: FeatureScope = FeatureScope.ANY

    @property
    def in_context(self) -> bool:
        """May be given in a ranking request's context."""
        return self.scope is not FeatureScope.CANDIDATE

    @property
    def in_candidates(self) -> bool:
        """May be given for a ranking request's candidates."""
        return self.scope is not FeatureScope.CONTEXT

    @property
    def required(self) -> bool:
        """Must be given in every row (a single value under ``oov: error``)."""
        return self.strict and not self.multi_valued

    def value_type(self) -> Any:
        """The pydantic type of one value (of one list element, for a list feature)."""
        if self.kind is ValueKind.STRING:
            return Annotated[str, Field(strict=True, max_length=MAX_STRING_CHARS)]
        if self.kind is ValueKind.INT:
            return _integer(int(self.low), int(self.high))
        return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=self.low, le=self.high)]

    def entry_type(self) -> Any:
        """The pydantic type of what one row holds for the feature (``null`` included if allowed)."""
        value = self.value_type()
        if self.multi_valued:
            element = value if self.strict else value | None
            return Annotated[list[element], Field(max_length=MAX_LIST_VALUES)] | None  # type: ignore[valid-type]
        return value if self.strict else value | None


def feature_rules(schema: FeatureSchema) -> tuple[FeatureRule, ...]:
    """The request rules of every feature of ``schema``, sparse then dense, in schema order.

    Ids are integers (``1.0`` counts; booleans, numeric strings and ``1.5`` do not) that fit
    int64, or the vocabulary under ``oov: error``; strings are at most :data:`MAX_STRING_CHARS`
    long, lists at most :data:`MAX_LIST_VALUES`; dense values are finite numbers whose
    normalisation fits a float32 (the model's input type).
    """
    rules = []
    for feature in schema.sparse:
        table = schema.table_of(feature.name)
        strict = feature.oov is OOVPolicy.ERROR  # unknown and missing values are refused
        if feature.dtype is SparseDType.STRING:
            kind, low, high = ValueKind.STRING, -math.inf, math.inf
        elif strict and not table.is_hashed:  # the vocabulary is the valid range
            kind, low, high = ValueKind.INT, 0, table.buckets - 1
        else:
            kind, low, high = ValueKind.INT, INT64_MIN, INT64_MAX
        if strict:
            unknown = "required; ids outside the vocabulary are refused (oov policy 'error')"
        elif table.is_hashed:
            unknown = f"missing: the OOV row {table.buckets}"
        else:
            unknown = (
                f"ids outside [0, {table.buckets}) and missing ones: the OOV row {table.buckets}"
            )
        if feature.multi_valued:
            description = (
                f"list of {feature.dtype.value} ids, the first {feature.max_len} kept; null or absent: "
                f"empty list; elements {unknown.removeprefix('required; ')}"
            )
        else:
            description = f"{feature.dtype.value} id; {unknown}"
        rules.append(
            FeatureRule(
                feature.name,
                kind,
                feature.multi_valued,
                strict,
                low,
                high,
                description,
                feature.scope,
            )
        )
    for feature in schema.dense:
        norm = feature.normalization
        low, high = _dense_range(norm)
        description = f"number; null or absent: {feature.default}; normalisation {norm.kind.value}"
        rules.append(
            FeatureRule(
                feature.name, ValueKind.FLOAT, False, False, low, high, description, feature.scope
            )
        )
    return tuple(rules)


def _integer(low: int, high: int) -> Any:
    """An id: a JSON integer, or a number with no fractional part up to 2**53 (JSON Schema's
    ``integer`` admits ``1.0``); never a boolean or a numeric string."""
    # Floats are exact integers only up to 2**53: beyond it, an id written as a float has
    # already lost digits, so the float form is bounded by 2**53 (JSON integers, up to int64,
    # take the first branch).
    exact = 2**53
    return (
        Annotated[int, Field(strict=True, ge=low, le=high)]
        | Annotated[
            float,
            Field(strict=True, ge=max(low, -exact), le=min(high, exact), multiple_of=1),
            AfterValidator(_integral),  # pydantic's multiple_of has a tolerance (1e-42 passes it)
        ]
    )


def _integral(value: float) -> int:
    if not value.is_integer():
        raise ValueError("Input should be an integer")
    return int(value)


def _dense_range(normalization: Normalization) -> tuple[float, float]:
    """Raw values whose normalised value fits a float32 (the model's input type)."""
    limit = 0.999 * FLOAT32_MAX  # margin for float64 rounding at the edge
    if normalization.kind is NormalizationKind.LOG1P:
        return -sys.float_info.max, sys.float_info.max  # log1p(|x|) <= 710
    if normalization.kind is NormalizationKind.STANDARD:
        span = limit * normalization.std
        return normalization.mean - span, normalization.mean + span
    return -limit, limit


def _check_rows(max_rows: int) -> None:
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise ValueError(f"max_rows must be in [1, {MAX_ROWS_LIMIT}], got {max_rows}")


def _features_dict(
    name: str,
    rules: Iterable[FeatureRule],
    field: Callable[[FeatureRule], Any],
    required: Callable[[FeatureRule], bool] = lambda rule: rule.required,
    **config: Any,
) -> type:
    """A TypedDict with one ``field(rule)`` per rule (``required(rule)``: a required key) and no
    other key."""
    fields = {
        rule.name: (Required if required(rule) else NotRequired)[field(rule)] for rule in rules
    }
    typed = TypedDict(name, fields, total=False)  # type: ignore[misc]
    typed.__pydantic_config__ = ConfigDict(extra="forbid", **config)  # type: ignore[attr-defined]
    return typed


def score_request_model(schema: FeatureSchema, max_rows: int) -> type[BaseModel]:
    """:class:`ScoreRequest` narrowed to ``schema``: each row is an ``Impression`` object.

    Each feature follows its :func:`feature_rules`; an unknown feature name is refused. A feature
    under ``oov: error`` is required (non-null, ids within the vocabulary), as the reader would
    refuse it in a log. Every error names the row and the feature (``("rows", 3, "price")``).

    Args:
        schema: the feature schema the model was trained on.
        max_rows: the most rows accepted per request (``<= MAX_ROWS_LIMIT``).

    Raises:
        ValueError: ``max_rows`` out of ``[1, MAX_ROWS_LIMIT]``.
    """
    _check_rows(max_rows)
    impression = _features_dict(
        "Impression",
        feature_rules(schema),
        lambda rule: Annotated[rule.entry_type(), Field(description=rule.description)],
    )
    return create_model(
        "ScoreRequest",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={
                "description": f"Impressions to score, with the features of schema {schema.name!r}."
            },
        ),
        rows=(list[impression], Field(min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
    )


def score_columns_model(schema: FeatureSchema, max_rows: int) -> type[BaseModel]:
    """:class:`ScoreColumnsRequest` narrowed to ``schema``: ``columns`` maps feature names to lists
    of one entry per row, each entry what a row of :func:`score_request_model` would hold.

    At least one column, every column of the same length (the number of rows, 1 to ``max_rows``);
    an absent column means missing in every row; a column under ``oov: error`` is required. Every
    error names the feature and the row (``("columns", "price", 3)``). JSON Schema cannot say that
    arrays are of equal length: that rule is stated in the description and checked on validation.

    Raises:
        ValueError: ``max_rows`` out of ``[1, MAX_ROWS_LIMIT]``.
    """
    _check_rows(max_rows)
    columns = _features_dict(
        "ImpressionColumns",
        feature_rules(schema),
        _column_field(max_rows, "row"),
        json_schema_extra={"minProperties": 1},
    )
    description = (
        f"Impressions to score, column by column, with the features of schema {schema.name!r}: one "
        "list per feature, every list with one entry per impression (all of the same length)."
    )
    return create_model(
        "ScoreColumnsRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"description": description}),
        columns=(Annotated[columns, AfterValidator(_one_entry_per_row)], ...),  # type: ignore[valid-type]
    )


def rank_request_model(schema: FeatureSchema, max_rows: int) -> type[BaseModel]:
    """:class:`RankRequest` narrowed to ``schema``.

    ``context`` holds the features whose ``scope`` is ``context`` or ``any``, ``candidates`` those
    whose scope is ``candidate`` or ``any``: a list of 1 to ``max_rows`` objects, one per
    candidate, or an object of columns (one list per feature, one entry per candidate, all of one
    length). A feature under ``oov: error`` is required where its scope puts it. What JSON Schema
    cannot say is stated in the description and checked by the service: a feature of scope
    ``any`` in one place only (and, under ``oov: error``, in one of them), ``order_by`` only
    with ``top_k``. Errors name ``("context", "user_id")``, ``("candidates", 3, "price")`` or,
    for columns, ``("candidates", "price", 3)``.

    Raises:
        ValueError: ``max_rows`` out of ``[1, MAX_ROWS_LIMIT]``.
    """
    _check_rows(max_rows)
    rules = feature_rules(schema)
    in_context = [rule for rule in rules if rule.in_context]
    in_candidates = [rule for rule in rules if rule.in_candidates]

    def entry(rule: FeatureRule) -> Any:
        return Annotated[rule.entry_type(), Field(description=rule.description)]

    context = _features_dict(
        "RankContext",
        in_context,
        entry,
        lambda rule: rule.required and rule.scope is FeatureScope.CONTEXT,
    )

    def for_candidates(rule: FeatureRule) -> bool:
        return rule.required and rule.scope is FeatureScope.CANDIDATE

    candidate = _features_dict("Candidate", in_candidates, entry, for_candidates)
    columns = _features_dict(
        "CandidateColumns",
        in_candidates,
        _column_field(max_rows, "candidate"),
        for_candidates,
        json_schema_extra={"minProperties": 1},
    )
    candidates = Annotated[
        Annotated[
            list[candidate],  # type: ignore[valid-type]
            Tag("objects"),
            Field(min_length=1, max_length=max_rows),
        ]
        | Annotated[columns, AfterValidator(_one_entry_per_row), Tag("columns")],  # type: ignore[valid-type]
        Discriminator(
            candidates_form,
            custom_error_type="candidates_type",
            custom_error_message="candidates must be a list of objects (one per candidate) or an "
            "object of columns (one list per feature)",
        ),
    ]
    scopes = "; ".join(
        f"{scope.value}: {', '.join(r.name for r in rules if r.scope is scope) or 'none'}"
        for scope in FeatureScope
    )
    description = (
        f"A ranking call with the features of schema {schema.name!r}: the context's once, the "
        "candidates' as one object per candidate or as columns. Where each feature goes "
        f"(its scope) is {scopes}. A feature of scope any is given in one place per request; "
        "order_by needs top_k."
    )
    return create_model(
        "RankRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"description": description}),
        context=(context, Field(default_factory=dict, description="the context's features")),
        candidates=(candidates, Field(description="the candidates' features")),
        top_k=(
            Annotated[int, Field(strict=True, ge=1, le=max_rows)] | None,
            Field(default=None, description=_TOP_K_DESCRIPTION),
        ),
        order_by=(RankOrder | None, Field(default=None, description=_ORDER_BY_DESCRIPTION)),
    )


def candidates_form(candidates: Any) -> str | None:
    """``objects`` for a list (one object per candidate), ``columns`` for an object, else None."""
    if isinstance(candidates, list):
        return "objects"
    if isinstance(candidates, dict):
        return "columns"
    return None


def _column_field(max_rows: int, entry: str) -> Callable[[FeatureRule], Any]:
    """The type of one feature's column: a list of one entry per ``entry`` (row, candidate)."""

    def field(rule: FeatureRule) -> Any:
        return Annotated[
            list[rule.entry_type()],  # type: ignore[misc]
            Field(
                min_length=1,
                max_length=max_rows,
                description=f"one per {entry}: {rule.description}",
            ),
        ]

    return field


def _one_entry_per_row(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if not columns:
        raise ValueError("give at least one feature column")
    (first, values), *others = columns.items()
    rows = len(values)
    for name, values in others:
        if len(values) != rows:
            raise ValueError(
                f"columns differ in length: {first!r} has {rows} entries, {name!r} has {len(values)} "
                "(every column holds one entry per row)"
            )
    return columns
