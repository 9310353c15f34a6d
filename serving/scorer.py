"""One served model: request validation, feature mapping and the model call, without HTTP.

``Scorer.parse(body, form)`` validates request bytes of either form (``rows`` or ``columns``)
against the model's feature rules and ``Scorer.featurize(columns)`` maps them to model inputs
(each raises :class:`RequestInvalid` naming every bad row and field); ``Scorer.predict`` scores
mapped inputs. The service parses and maps in the request's thread, and the micro-batcher
scores several requests' inputs in one model call.

Parsing takes the fast path first: ``orjson`` and the vectorised :class:`~serving.columns.ColumnReader`.
Only a body it refuses goes through the pydantic request model of its form, which names every bad
value (or, for what is unusual but valid, such as an id written ``1.0``, converts it), so both
paths accept the same requests with the same values and refuse them with the same messages.

Example::

    scorer = Scorer(load_artifact("runs/demo/model"), max_rows=1024)
    features = scorer.prepare(b'{"rows": [{"user_id": 7, "price": 12.5}]}')
    scorer.predict(features)  # (1, 3) float32: pctr, pcvr, pctcvr
    scorer.prepare(b'{"columns": {"user_id": [7, 8]}}', RequestForm.COLUMNS).size  # 2
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, unique
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from schemas.api import FeatureInfo, score_columns_model, score_request_model
from serving.artifact import Artifact
from serving.columns import ColumnReader, Columns, Unreadable
from serving.features import RowError
from serving.model import Features

__all__ = ["RequestForm", "RequestInvalid", "Scorer", "row_errors"]

MAX_REPORTED_ERRORS = 50


@unique
class RequestForm(str, Enum):
    ROWS = "rows"  # {"rows": [{feature: value, ...}, ...]}
    COLUMNS = "columns"  # {"columns": {feature: [value, ...], ...}}


class RequestInvalid(ValueError):
    """A request that cannot be scored; ``errors`` are FastAPI-style ``{loc, msg, type}`` items."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} invalid value(s)")
        self.errors = errors


class Scorer:
    """A loaded artifact ready to score requests.

    Args:
        artifact: the verified model directory.
        max_rows: the most rows per request.
        model_dir: where the model was loaded from when that is not ``artifact.path`` (the URI
            of a model fetched into the local cache).
    """

    def __init__(self, artifact: Artifact, max_rows: int, model_dir: str | None = None) -> None:
        self.artifact = artifact
        self.max_rows = max_rows
        self.model_dir = model_dir if model_dir is not None else str(artifact.path)
        self.request_model: type[BaseModel] = score_request_model(artifact.schema, max_rows)
        self.columns_model: type[BaseModel] = score_columns_model(artifact.schema, max_rows)
        self.reader = ColumnReader(artifact.schema, max_rows)
        self.loaded_at = datetime.now(UTC)

    @property
    def version(self) -> str:
        return self.artifact.version

    def parse(self, body: bytes, form: RequestForm = RequestForm.ROWS) -> Columns:
        """Validate a JSON request body of ``form``; return its values by feature.

        Raises:
            RequestInvalid: malformed JSON, an empty batch, too many rows, columns of different
                lengths, an unknown feature, a value of the wrong type, NaN or infinity, a string
                too long, an int beyond int64, a value out of its feature's range.
        """
        read = self.reader.rows_request if form is RequestForm.ROWS else self.reader.columns_request
        try:
            return read(orjson.loads(body))
        except (orjson.JSONDecodeError, Unreadable):
            pass  # the request model says what is wrong, or converts what is unusual but valid
        model = self.request_model if form is RequestForm.ROWS else self.columns_model
        try:
            request = model.model_validate_json(body)
        except ValidationError as err:
            raise RequestInvalid(_pydantic_errors(err)) from None
        try:
            return read({form.value: getattr(request, form.value)})
        except Unreadable as err:  # the two disagree: refuse, saying what the reader found
            raise RequestInvalid(
                [{"loc": ["body", form.value], "msg": str(err), "type": "value_error"}]
            ) from None

    def featurize(self, columns: Columns, form: RequestForm = RequestForm.ROWS) -> Features:
        """Map parsed values to model inputs.

        Raises:
            RequestInvalid: an out-of-vocabulary or missing value under ``oov: error``, a dense
                value out of float32 range after normalisation (``form`` says how to name them).
        """
        features, errors = self.artifact.featurizer.map(columns)
        if errors:
            raise RequestInvalid(row_errors(errors, form))
        return features

    def prepare(self, body: bytes, form: RequestForm = RequestForm.ROWS) -> Features:
        """:meth:`parse` then :meth:`featurize`."""
        return self.featurize(self.parse(body, form), form)

    def predict(self, features: Features) -> np.ndarray:
        """``(B, 3)`` float32 scores (pctr, pcvr, pctcvr)."""
        return self.artifact.model.predict(features)

    def features_info(self) -> list[FeatureInfo]:
        schema = self.artifact.schema
        out = [
            FeatureInfo(
                name=f.name,
                kind="sparse",
                dtype=f.dtype.value,
                multi_valued=f.multi_valued,
                max_len=f.max_len if f.multi_valued else None,
                oov=f.oov.value,
            )
            for f in schema.sparse
        ]
        out += [
            FeatureInfo(
                name=f.name,
                kind="dense",
                dtype="float",
                default=f.default,
                normalization=f.normalization.model_dump(mode="json"),
            )
            for f in schema.dense
        ]
        return out


# The two branches of schemas.api._integer, as pydantic names them in error locations.
_UNION_TAGS = ("constrained-int", "constrained-float", "function-after[")
_BOUNDS = ("greater_than_equal", "less_than_equal", "less_than")


def _pydantic_errors(err: ValidationError) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for item in err.errors(include_url=False, include_input=False):
        loc = list(item["loc"])
        if (
            loc and isinstance(loc[-1], str) and loc[-1].startswith(_UNION_TAGS)
        ):  # an id failed both branches
            loc.pop()
            merged = {
                "loc": ["body", *loc],
                "msg": "Input should be an integer",
                "type": "int_type",
            }
            if item["type"] in _BOUNDS:
                merged = {"loc": ["body", *loc], "msg": item["msg"], "type": item["type"]}
            if items and items[-1]["loc"] == merged["loc"]:
                if merged["type"] in _BOUNDS:
                    items[-1] = merged
                continue
            items.append(merged)
        else:
            items.append({"loc": ["body", *loc], "msg": item["msg"], "type": item["type"]})
    return _capped(items[:MAX_REPORTED_ERRORS], len(items))


def row_errors(
    errors: list[RowError], form: RequestForm = RequestForm.ROWS
) -> list[dict[str, Any]]:
    """FastAPI-style error items of mapping errors, by row, at most ``MAX_REPORTED_ERRORS``."""
    errors = sorted(errors, key=lambda e: e.row)
    items = [
        {"loc": ["body", *e.loc(form.value)], "msg": e.msg, "type": e.type}
        for e in errors[:MAX_REPORTED_ERRORS]
    ]
    return _capped(items, len(errors))


def _capped(items: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    if total > len(items):
        items.append(
            {
                "loc": ["body"],
                "msg": f"{total - len(items)} more error(s) not listed",
                "type": "too_many_errors",
            }
        )
    return items
