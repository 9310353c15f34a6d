"""The scoring API's request and response models, shared by the service and its clients.

``POST /v1/score`` takes impressions as *raw* feature values, exactly as the impression logs hold
them (ids, category strings, lists, prices); the schema's hashing maps them to embedding rows::

    {"rows": [{"user_id": 961223854891, "city": "city_209", "recent_categories": [4, 35],
               "price": 25.34}]}

and answers one score per row, in order::

    {"model_version": "demo-step00000150-3f2a9c1b0d",
     "scores": [{"pctr": 0.041, "pcvr": 0.052, "pctcvr": 0.0021}]}

:class:`ScoreRequest` is the form every service accepts; :func:`score_request_model` narrows it
to one feature schema (each row a typed object of that schema's features), which is what the
service validates with and documents in its OpenAPI spec. A feature left out of a row, or
``null``, is missing: a single-valued sparse feature then reads its table's OOV row (under
``oov: error`` it is required), a list is empty, a dense feature takes its ``default``.

Nothing here imports torch.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model
from typing_extensions import NotRequired, Required, TypedDict

from schemas.features import FeatureSchema, Normalization, NormalizationKind, OOVPolicy, SparseDType

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LIST_VALUES",
    "MAX_ROWS_LIMIT",
    "MAX_STRING_CHARS",
    "ErrorResponse",
    "FeatureInfo",
    "ModelInfo",
    "ReloadRequest",
    "ReloadResponse",
    "Score",
    "ScoreRequest",
    "ScoreResponse",
    "ValidationErrorItem",
    "ValidationErrorResponse",
    "score_request_model",
]

MAX_ROWS_LIMIT = 10_000  # the most rows per request any service may be configured to accept
MAX_STRING_CHARS = 1_024  # longest string value
MAX_LIST_VALUES = 1_000  # longest list value (lists longer than a feature's max_len are cut)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38

RawValue = StrictInt | StrictFloat | StrictStr | list[StrictInt | StrictStr | None] | None

_EXAMPLE_ROW = {"user_id": 961223854891, "city": "city_209", "recent_categories": [4, 35], "price": 25.34}


class ScoreRequest(BaseModel):
    """Impressions to score: one object per impression, raw feature values keyed by name."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"rows": [_EXAMPLE_ROW]}]})

    rows: list[dict[str, RawValue]] = Field(min_length=1, max_length=MAX_ROWS_LIMIT)


class Score(BaseModel):
    """Predictions for one impression."""

    pctr: float = Field(ge=0.0, le=1.0, description="P(click | impression)")
    pcvr: float = Field(ge=0.0, le=1.0, description="P(conversion | click, impression)")
    pctcvr: float = Field(ge=0.0, le=1.0, description="P(click and conversion | impression) = pctr * pcvr")


class ScoreResponse(BaseModel):
    model_version: str = Field(description="version id of the model that computed every score")
    scores: list[Score] = Field(description="one per request row, in request order")


class ValidationErrorItem(BaseModel):
    """One invalid value: ``loc`` is ``["body", "rows", <row>, <feature>(, <list position>)]``."""

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


class ModelInfo(BaseModel):
    """``GET /v1/model``: the model being served."""

    version: str
    created_at: datetime
    loaded_at: datetime
    model_dir: str
    schema_name: str
    schema_fingerprint: str
    heads: list[str]
    source: dict[str, Any]
    metrics: dict[str, float | None]
    features: list[FeatureInfo]
    max_rows: int = Field(description="most rows accepted per request")
    last_reload_error: str | None = Field(default=None, description="why the last reload failed, if it did")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="model directory to load; default: the directory of the model being served (re-read)",
    )


class ReloadResponse(BaseModel):
    version: str
    previous_version: str | None
    model_dir: str
    seconds: float = Field(description="time taken to load and check the new model")


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


def score_request_model(schema: FeatureSchema, max_rows: int) -> type[BaseModel]:
    """:class:`ScoreRequest` narrowed to ``schema``: each row is an ``Impression`` object.

    Ids are integers (``1.0`` counts; booleans, numeric strings and ``1.5`` do not) that fit int64; strings are
    at most :data:`MAX_STRING_CHARS` long, lists at most :data:`MAX_LIST_VALUES`; dense values are
    finite numbers whose normalisation fits a float32; an unknown feature name is refused. A feature under ``oov: error`` is
    required (non-null, ids within the vocabulary), as the reader would refuse it in a log. Every
    error names the row and the feature (``("rows", 3, "price")``).

    Args:
        schema: the feature schema the model was trained on.
        max_rows: the most rows accepted per request (``<= MAX_ROWS_LIMIT``).

    Raises:
        ValueError: ``max_rows`` out of ``[1, MAX_ROWS_LIMIT]``.
    """
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise ValueError(f"max_rows must be in [1, {MAX_ROWS_LIMIT}], got {max_rows}")
    string = Annotated[str, Field(strict=True, max_length=MAX_STRING_CHARS)]
    fields: dict[str, Any] = {}
    for feature in schema.sparse:
        table = schema.table_of(feature.name)
        strict = feature.oov is OOVPolicy.ERROR  # unknown and missing values are refused
        if feature.dtype is SparseDType.STRING:
            value: Any = string
        elif strict and not table.is_hashed:  # the vocabulary is the valid range
            value = _integer(0, table.buckets - 1)
        else:
            value = _integer(INT64_MIN, INT64_MAX)
        if strict:
            unknown = "required; ids outside the vocabulary are refused (oov policy 'error')"
        elif table.is_hashed:
            unknown = f"missing: the OOV row {table.buckets}"
        else:
            unknown = f"ids outside [0, {table.buckets}) and missing ones: the OOV row {table.buckets}"
        if feature.multi_valued:
            element = value if strict else value | None
            kind = Annotated[list[element], Field(max_length=MAX_LIST_VALUES)] | None  # type: ignore[valid-type]
            description = (
                f"list of {feature.dtype.value} ids, the first {feature.max_len} kept; null or absent: "
                f"empty list; elements {unknown.removeprefix('required; ')}"
            )
            fields[feature.name] = NotRequired[Annotated[kind, Field(description=description)]]
        else:
            description = f"{feature.dtype.value} id; {unknown}"
            if strict:
                fields[feature.name] = Required[Annotated[value, Field(description=description)]]
            else:
                fields[feature.name] = NotRequired[Annotated[value | None, Field(description=description)]]
    for feature in schema.dense:
        norm = feature.normalization
        description = f"number; null or absent: {feature.default}; normalisation {norm.kind.value}"
        low, high = _dense_range(norm)
        value = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=low, le=high)]
        fields[feature.name] = NotRequired[Annotated[value | None, Field(description=description)]]
    impression = TypedDict("Impression", fields, total=False)  # type: ignore[misc]
    impression.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]

    return create_model(
        "ScoreRequest",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"description": f"Impressions to score, with the features of schema {schema.name!r}."},
        ),
        rows=(list[impression], Field(min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
    )
