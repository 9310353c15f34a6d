"""One served model: request validation, feature mapping and the model call, without HTTP.

``Scorer.parse(body)`` validates request bytes against the model's request schema and
``Scorer.featurize(rows)`` maps the rows to model inputs (each raises :class:`RequestInvalid`
naming every bad row and field); ``Scorer.predict`` scores mapped inputs. The service parses in
the request thread; the micro-batcher maps and scores several requests' rows at once.

Example::

    scorer = Scorer(load_artifact("runs/demo/model"), max_rows=1024)
    features = scorer.prepare(b'{"rows": [{"user_id": 7, "price": 12.5}]}')
    scorer.predict(features)  # (1, 3) float32: pctr, pcvr, pctcvr
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from schemas.api import FeatureInfo, score_request_model
from serving.artifact import Artifact
from serving.features import RowError, RowErrors
from serving.model import Features

__all__ = ["RequestInvalid", "Scorer", "row_errors"]

MAX_REPORTED_ERRORS = 50


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
    """

    def __init__(self, artifact: Artifact, max_rows: int) -> None:
        self.artifact = artifact
        self.max_rows = max_rows
        self.request_model: type[BaseModel] = score_request_model(artifact.schema, max_rows)
        self.loaded_at = datetime.now(timezone.utc)

    @property
    def version(self) -> str:
        return self.artifact.version

    def parse(self, body: bytes) -> list[dict[str, Any]]:
        """Validate a JSON request body against the model's request schema; return its rows.

        Raises:
            RequestInvalid: malformed JSON, an empty batch, too many rows, an unknown feature, a
                value of the wrong type, NaN or infinity, a string too long, an int beyond int64.
        """
        try:
            request = self.request_model.model_validate_json(body)
        except ValidationError as err:
            raise RequestInvalid(_pydantic_errors(err)) from None
        return request.rows  # type: ignore[attr-defined]

    def featurize(self, rows: list[dict[str, Any]]) -> Features:
        """Map parsed rows to model inputs.

        Raises:
            RequestInvalid: an out-of-vocabulary or missing value under ``oov: error``, a dense
                value out of float32 range after normalisation.
        """
        try:
            return self.artifact.featurizer(rows)
        except RowErrors as err:
            raise RequestInvalid(row_errors(err.errors)) from None

    def prepare(self, body: bytes) -> Features:
        """:meth:`parse` then :meth:`featurize`."""
        return self.featurize(self.parse(body))

    def predict(self, features: Features) -> np.ndarray:
        """``(B, 3)`` float32 scores (pctr, pcvr, pctcvr)."""
        return self.artifact.model.predict(features)

    def features_info(self) -> list[FeatureInfo]:
        schema = self.artifact.schema
        out = [
            FeatureInfo(
                name=f.name, kind="sparse", dtype=f.dtype.value, multi_valued=f.multi_valued,
                max_len=f.max_len if f.multi_valued else None, oov=f.oov.value,
            )
            for f in schema.sparse
        ]
        out += [
            FeatureInfo(
                name=f.name, kind="dense", dtype="float", default=f.default,
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
        if loc and isinstance(loc[-1], str) and loc[-1].startswith(_UNION_TAGS):  # an id failed both branches
            loc.pop()
            merged = {"loc": ["body", *loc], "msg": "Input should be an integer", "type": "int_type"}
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


def row_errors(errors: list[RowError]) -> list[dict[str, Any]]:
    """FastAPI-style error items of mapping errors, by row, at most ``MAX_REPORTED_ERRORS``."""
    errors = sorted(errors, key=lambda e: e.loc[1])
    items = [{"loc": ["body", *e.loc], "msg": e.msg, "type": e.type} for e in errors[:MAX_REPORTED_ERRORS]]
    return _capped(items, len(errors))


def _capped(items: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    if total > len(items):
        items.append(
            {"loc": ["body"], "msg": f"{total - len(items)} more error(s) not listed", "type": "too_many_errors"}
        )
    return items
