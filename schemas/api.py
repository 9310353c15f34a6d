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
``null``, is missing: a single-valued sparse feature then reads its table's OOV row (or is
refused under ``oov: error``), a list is empty, a dense feature takes its ``default``.

Nothing here imports torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model
from typing_extensions import TypedDict

from schemas.features import FeatureSchema, SparseDType

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
MAX_LIST_VALUES = 10_000  # longest list value (lists longer than a feature's max_len are cut)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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
        description="model directory to load; default: the one the service was started with",
    )


class ReloadResponse(BaseModel):
    version: str
    previous_version: str | None
    model_dir: str
    seconds: float = Field(description="time taken to load and check the new model")


def score_request_model(schema: FeatureSchema, max_rows: int) -> type[BaseModel]:
    """:class:`ScoreRequest` narrowed to ``schema``: each row is an ``Impression`` object.

    Integers are strict (no floats, booleans or numeric strings) and must fit int64; strings are
    at most :data:`MAX_STRING_CHARS` long; dense values are finite numbers; an unknown feature
    name is refused. Every error names the row and the feature (``("rows", 3, "price")``).

    Args:
        schema: the feature schema the model was trained on.
        max_rows: the most rows accepted per request (``<= MAX_ROWS_LIMIT``).

    Raises:
        ValueError: ``max_rows`` out of ``[1, MAX_ROWS_LIMIT]``.
    """
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise ValueError(f"max_rows must be in [1, {MAX_ROWS_LIMIT}], got {max_rows}")
    int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
    string = Annotated[str, Field(strict=True, max_length=MAX_STRING_CHARS)]
    number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    fields: dict[str, Any] = {}
    for feature in schema.sparse:
        value = string if feature.dtype is SparseDType.STRING else int64
        table = schema.table_of(feature.name)
        unknown = "refused (oov policy 'error')" if feature.oov.value == "error" else f"the OOV row {table.buckets}"
        if not table.is_hashed:
            unknown = f"ids outside [0, {table.buckets}) and missing ones: {unknown}"
        else:
            unknown = f"missing: {unknown}"
        if feature.multi_valued:
            kind: Any = Annotated[list[value | None], Field(max_length=MAX_LIST_VALUES)]  # type: ignore[valid-type]
            about = f"list of {feature.dtype.value} ids, the first {feature.max_len} kept; null or absent: empty list"
            description = f"{about}; list elements {unknown}"
        else:
            kind = value
            description = f"{feature.dtype.value} id, null or absent when missing; {unknown}"
        fields[feature.name] = Annotated[kind | None, Field(description=description)]
    for feature in schema.dense:
        norm = feature.normalization
        description = f"number; null or absent: {feature.default}; normalisation {norm.kind.value}"
        fields[feature.name] = Annotated[number | None, Field(description=description)]
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
