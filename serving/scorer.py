"""One served model: request validation, feature mapping and the model call, without HTTP.

``Scorer.parse(body, form)`` validates request bytes of either form (``rows`` or ``columns``)
against the model's feature rules and ``Scorer.featurize(columns)`` maps them to model inputs
(each raises :class:`RequestInvalid` naming every bad row and field); ``Scorer.predict`` scores
mapped inputs. The service parses and maps in the request's thread, and the micro-batcher
scores several requests' inputs in one model call.

Parsing takes the fast path first: a body of row objects is decoded against the feature rules
by msgspec (:class:`~serving.typed_json.ObjectBodies`), a body of columns by ``orjson``, and
either is checked by the vectorised :class:`~serving.columns.ColumnReader`. A body of objects the
typed decoder refuses takes the ``orjson`` path next, and only a body that path refuses goes
through the pydantic request model of its form, which names every bad value (or, for what is
unusual but valid, such as an id written ``1.0``, converts it), so the paths accept the same
requests with the same values and refuse them with the same messages.

Ranking requests (one context, many candidates) have their own three steps:
``Scorer.parse_rank``, ``Scorer.featurize_rank`` (the context mapped once) and
``Scorer.prepare_rank``; ``Scorer.predict`` scores either kind of inputs.

Example::

    scorer = Scorer(load_artifact("runs/demo/model"), max_rows=1024)
    features = scorer.prepare(b'{"rows": [{"user_id": 7, "price": 12.5}]}')
    scorer.predict(features)  # (1, 3) float32: pctr, pcvr, pctcvr
    scorer.prepare(b'{"columns": {"user_id": [7, 8]}}', RequestForm.COLUMNS).size  # 2
    ranking = scorer.prepare_rank(b'{"context": {"user_id": 7}, "candidates": [{"price": 1.5}]}')
    scorer.predict(ranking.features)  # (1, 3): the candidate's scores
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, unique
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from schemas.api import (
    FeatureInfo,
    rank_request_model,
    score_columns_model,
    score_request_model,
)
from schemas.features import FeatureScope
from serving.artifact import Artifact
from serving.columns import ColumnReader, Columns, Unreadable, may_hold_booleans
from serving.features import RowError
from serving.model import Features, RankFeatures
from serving.ranking import (
    Misplaced,
    RankInputs,
    RankReader,
    RankValues,
    misplaced,
    rank_error_items,
)
from serving.typed_json import ObjectBodies

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
        self.rank_model: type[BaseModel] = rank_request_model(artifact.schema, max_rows)
        self.reader = ColumnReader(artifact.schema, max_rows)
        self.rank_reader = RankReader(artifact.schema, max_rows)
        self.objects = ObjectBodies(artifact.schema)
        schema = artifact.schema
        # every feature in one fixed order: the features a ranking batch takes from its contexts
        self._names = tuple(schema.sparse_names + schema.dense_names)
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
        if form is RequestForm.ROWS:
            try:
                rows = self.objects.rows(body)
                return self.reader.read(rows.columns, rows.rows, typed=True)
            except Unreadable:
                pass  # the untyped path, then the request model
        read = self.reader.rows_request if form is RequestForm.ROWS else self.reader.columns_request
        try:
            booleans = form is RequestForm.ROWS or may_hold_booleans(body)  # see may_hold_booleans
            return read(orjson.loads(body), booleans=booleans)
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

    def parse_rank(self, body: bytes) -> RankValues:
        """Validate a ranking request's JSON body; return its values.

        Raises:
            RequestInvalid: what :meth:`parse` refuses, each error naming ``context.<field>`` or
                ``candidates[<i>].<field>``; a feature given where its scope does not allow, or
                in both places; a required feature (``oov: error``) given nowhere; ``order_by``
                without ``top_k``.
        """
        try:
            return self.rank_reader.read_objects(self.objects.rank(body))
        except Unreadable:
            pass  # candidates as columns, or what the untyped path names or converts
        try:
            parsed = orjson.loads(body)
            booleans = not _candidate_columns(parsed) or may_hold_booleans(body)
            return self.rank_reader.read(parsed, booleans=booleans)
        except (orjson.JSONDecodeError, Unreadable):
            pass  # the request model says what is wrong, or converts what is unusual but valid
        except Misplaced as err:
            raise RequestInvalid(
                _capped(err.errors[:MAX_REPORTED_ERRORS], len(err.errors))
            ) from None
        try:
            request = self.rank_model.model_validate_json(body)
        except ValidationError as err:
            raise RequestInvalid(self._rank_errors(_pydantic_errors(err))) from None
        try:
            return self.rank_reader.read(request.model_dump(mode="json", exclude_none=True))
        except Misplaced as err:  # what JSON Schema cannot say: scope any given twice...
            raise RequestInvalid(
                _capped(err.errors[:MAX_REPORTED_ERRORS], len(err.errors))
            ) from None
        except Unreadable as err:  # the two disagree: refuse, saying what the reader found
            raise RequestInvalid(
                [{"loc": ["body", "candidates"], "msg": str(err), "type": "value_error"}]
            ) from None

    def featurize_rank(self, values: RankValues) -> Features | RankFeatures:
        """Map a ranking request's values to model inputs: the context once, the candidates
        once, each feature from where it was given (a feature given nowhere from the context:
        its missing value is the same for every candidate). A single candidate and its context
        are one impression: they map to one row, as ``/v1/score`` maps it (broadcasting pays
        from two candidates on; one row is cheaper to map and to score, and batches with rows).

        Raises:
            RequestInvalid: as :meth:`featurize`, naming ``context.<field>`` or
                ``candidates[<i>].<field>``.
        """
        own = values.candidates.values
        if values.candidates.rows == 1:
            return self._featurize_impression(values)
        from_context = tuple(name for name in self._names if name not in own)
        context, candidates, context_errors, candidate_errors = (
            self.artifact.featurizer.map_ranking(values.context, values.candidates)
        )
        if context_errors or candidate_errors:
            items = rank_error_items(context_errors, candidate_errors, values.form)
            raise RequestInvalid(_capped(items[:MAX_REPORTED_ERRORS], len(items)))
        counts = np.array([candidates.size], dtype=np.int64)
        return RankFeatures(context, candidates, counts, from_context)

    def _featurize_impression(self, values: RankValues) -> Features:
        """One candidate and its context as one row, errors named by where each feature was
        given."""
        own = values.candidates.values
        features, errors = self.artifact.featurizer.map(
            Columns(1, {**values.context.values, **own})
        )
        if errors:
            candidate_errors = [e for e in errors if e.feature in own]
            context_errors = [e for e in errors if e.feature not in own]
            items = rank_error_items(context_errors, candidate_errors, values.form)
            raise RequestInvalid(_capped(items[:MAX_REPORTED_ERRORS], len(items)))
        return features

    def prepare_rank(self, body: bytes) -> RankInputs:
        """:meth:`parse_rank` then :meth:`featurize_rank`."""
        values = self.parse_rank(body)
        return RankInputs(self.featurize_rank(values), values.top_k, values.order_by)

    def predict(self, features: Features | RankFeatures) -> np.ndarray:
        """``(B, 3)`` float32 scores (pctr, pcvr, pctcvr): of the rows, or of a ranking's
        candidates."""
        if isinstance(features, RankFeatures):
            return self.artifact.model.predict_ranking(features)
        return self.artifact.model.predict(features)

    def _rank_errors(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The request model's errors in the request's terms: without the candidates' form tag
        (``objects``, ``columns``), and a feature refused for its scope said so."""
        schema = self.artifact.schema
        for item in items:
            loc = item["loc"]
            if loc[1:2] == ["candidates"] and loc[2:3] in (["objects"], ["columns"]):
                del loc[2]
            if item["type"] != "extra_forbidden" or not isinstance(loc[-1], str):
                continue
            name = loc[-1]
            try:
                scope = schema.scope_of(name)
            except ValueError:
                continue  # not a feature at all
            if (loc[1] == "context" and scope is FeatureScope.CANDIDATE) or (
                loc[1] == "candidates" and scope is FeatureScope.CONTEXT
            ):
                item["msg"], item["type"] = misplaced(name, scope), "feature_scope"
        return items

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
                scope=f.scope.value,
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
                scope=f.scope.value,
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


def _candidate_columns(body: Any) -> bool:
    """Whether a parsed ranking body gives its candidates as columns (see
    :func:`~serving.columns.may_hold_booleans`)."""
    return type(body) is dict and type(body.get("candidates")) is dict
