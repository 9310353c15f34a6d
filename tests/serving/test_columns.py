"""The fast paths (msgspec's typed decoding of row objects, orjson; the vectorised column reader)
against the pydantic request models they stand in for, the row transposition, and the string-row
cache."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.rules import map_values, string_rows
from serving.artifact import load_artifact
from serving.columns import ColumnReader, Columns, Unreadable, may_hold_booleans, transpose
from serving.features import StringRows
from serving.scorer import RequestForm, RequestInvalid, Scorer
from tests.serving.artifacts import edge_schema

MAX_ROWS = 6


@pytest.fixture(scope="module")
def scorer(edge_model) -> Scorer:
    return Scorer(load_artifact(edge_model.model), max_rows=MAX_ROWS)


# Values on both sides of every rule's edges, for each kind of feature of the edge schema. Half of
# the bodies draw only valid values (some unusual: ids written 2.0, long strings, huge numbers).
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.just([]),
    st.just({}),
)
VALID = {
    "id": st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=-3, max_value=15),
        st.sampled_from([1.0, -7.0, 2.0**53, -(2.0**53)]),
    ),
    "string": st.one_of(st.text(max_size=4), st.sampled_from(["é" * 1024, "\x00", "😀" * 1024])),
    "number": st.one_of(
        st.floats(min_value=-3.3e38, max_value=3.3e38),
        st.integers(min_value=-(2**64), max_value=2**64),
    ),
}
INVALID = {
    "id": st.sampled_from([2**63, -(2**63) - 1, 2.0**60, 1.5, 2.5e-42, True, False, "3", [1]]),
    "string": st.sampled_from(["x" * 1025, 1, True, ["a"]]),
    "number": st.sampled_from(
        [3.5e38, -3.5e38, 1e39, 1.7e308, float("nan"), float("inf"), True, "1.5", [1.0]]
    ),
}
KIND = {
    "user": "id",
    "level": "id",
    "tag": "id",
    "strict_cat": "id",
    "recent_tags": "id",
    "city": "string",
    "words": "string",
    "price": "number",
    "activity": "number",
    "raw": "number",
}
LISTS = {"recent_tags", "words"}
FEATURE = st.sampled_from(sorted(KIND))


def entries(name: str, clean: bool) -> st.SearchStrategy:
    """What one row may hold for feature ``name``."""
    value = (
        VALID[KIND[name]]
        if clean
        else st.one_of(*[VALID[KIND[name]]] * 8, INVALID[KIND[name]], anything)
    )
    if name == "strict_cat":
        return st.integers(min_value=0, max_value=3) if clean else st.one_of(value, st.none())
    if name in LISTS:
        lists = st.lists(st.one_of(value, st.none()), max_size=5)
        return (
            st.one_of(lists, lists, st.none())
            if clean
            else st.one_of(lists, lists, st.none(), anything)
        )
    return st.one_of(value, value, st.none())


@st.composite
def row_bodies(draw) -> dict:
    clean = draw(st.booleans())
    n = draw(
        st.integers(min_value=1, max_value=MAX_ROWS)
        if clean
        else st.integers(min_value=0, max_value=MAX_ROWS + 1)
    )
    rows = []
    for _ in range(n):
        names = draw(st.sets(FEATURE, max_size=len(KIND))) | {"strict_cat"}
        if not clean and draw(st.integers(0, 10)) == 0:
            names.discard("strict_cat")
        row = {name: draw(entries(name, clean)) for name in names}
        if not clean and draw(st.integers(0, 10)) == 0:
            row[draw(st.text(max_size=4))] = 1  # an unknown feature
        rows.append(row)
    return {"rows": rows}


@st.composite
def column_bodies(draw) -> dict:
    clean = draw(st.booleans())
    n = draw(
        st.integers(min_value=1, max_value=MAX_ROWS)
        if clean
        else st.integers(min_value=0, max_value=MAX_ROWS + 1)
    )
    columns = {}
    for name in draw(st.sets(FEATURE, max_size=len(KIND))) | {"strict_cat"}:
        length = (
            n if clean or draw(st.integers(0, 10)) else draw(st.integers(0, MAX_ROWS))
        )  # ragged
        columns[name] = [draw(entries(name, clean)) for _ in range(length)]
    if not clean and draw(st.integers(0, 10)) == 0:
        columns.pop("strict_cat")
    return {"columns": columns}


def _features(scorer: Scorer, columns) -> list[np.ndarray]:
    f = scorer.artifact.featurizer(columns)
    return [f.single, f.dense, *f.multi_values, *f.multi_lengths]


def _check_agreement(scorer: Scorer, form: RequestForm, body: dict) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    read = scorer.reader.rows_request if form is RequestForm.ROWS else scorer.reader.columns_request
    model = scorer.request_model if form is RequestForm.ROWS else scorer.columns_model
    try:
        validated = model.model_validate_json(raw)
    except ValidationError:
        validated = None
    fast_paths = [
        lambda booleans=booleans: read(orjson.loads(raw), booleans=booleans)
        for booleans in {True, may_hold_booleans(raw)}  # the type check per value, or numpy's
    ]
    if form is RequestForm.ROWS:  # the typed decoder's columns, read without a type check
        fast_paths.append(lambda: _typed_rows(scorer, raw))
    for fast_path in fast_paths:
        try:
            fast = fast_path()
        except (orjson.JSONDecodeError, Unreadable):
            continue
        # the reader accepts only what the model accepts, with the same values
        assert validated is not None, body
        slow = read({form.value: getattr(validated, form.value)})
        for a, b in zip(_features(scorer, fast), _features(scorer, slow), strict=True):
            np.testing.assert_array_equal(a, b)
    if validated is not None:  # and whatever the model accepts (converted), the reader takes
        scorer.parse(raw, form)
    else:
        with pytest.raises(RequestInvalid):
            scorer.parse(raw, form)


def _typed_rows(scorer: Scorer, raw: bytes):
    rows = scorer.objects.rows(raw)
    return scorer.reader.read(rows.columns, rows.rows, typed=True)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=row_bodies())
def test_the_fast_path_accepts_exactly_what_the_row_model_accepts(scorer, body):
    _check_agreement(scorer, RequestForm.ROWS, body)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=column_bodies())
def test_the_fast_path_accepts_exactly_what_the_columns_model_accepts(scorer, body):
    _check_agreement(scorer, RequestForm.COLUMNS, body)


def test_valid_requests_take_the_fast_path(scorer, edge_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the request model was called")

    monkeypatch.setattr(scorer.request_model, "model_validate_json", refuse)
    monkeypatch.setattr(scorer.columns_model, "model_validate_json", refuse)
    rows = edge_model.rows[:MAX_ROWS]
    names = {name for row in rows for name in row}
    columns = {name: [row.get(name) for row in rows] for name in names}
    a = scorer.prepare(orjson.dumps({"rows": rows}))
    b = scorer.prepare(orjson.dumps({"columns": columns}), RequestForm.COLUMNS)
    np.testing.assert_array_equal(a.single, b.single)
    np.testing.assert_array_equal(a.dense, b.dense)


def test_transpose_fills_what_rows_leave_out():
    assert transpose([{"a": 1, "b": 2}, {"b": 3, "a": 4}]) == {"a": (1, 4), "b": (2, 3)}
    assert transpose([{"a": 1}, {"b": 3}]) == {"a": [1, None], "b": [None, 3]}
    assert transpose([{"a": 1}, {"a": None}]) == {"a": [1, None]}
    assert transpose([{}, {}]) == {}
    with pytest.raises(Unreadable):
        transpose([{"a": 1}, [1]])


def test_the_reader_counts_rows_without_columns():
    # A schema without an oov:error feature takes rows of missing values; the columnar form needs
    # at least one column to count its rows.
    data = edge_schema().model_dump(mode="json")
    for feature in data["sparse"]:
        feature["oov"] = "oov_row"
    from schemas import FeatureSchema
    from schemas.api import score_columns_model

    schema = FeatureSchema.from_dict(data)
    reader = ColumnReader(schema, max_rows=4)
    assert reader.rows_request({"rows": [{}, {}, {}]}).rows == 3
    with pytest.raises(Unreadable):
        reader.columns_request({"columns": {}})
    with pytest.raises(ValidationError, match="give at least one feature column"):
        score_columns_model(schema, 4).model_validate({"columns": {}})
    assert reader.columns_request({"columns": {"price": [None, 2]}}).rows == 2


def test_string_rows_match_the_schema_hashing_and_stay_bounded(monkeypatch):
    schema = edge_schema()
    feature, table = schema.sparse_feature("city"), schema.table_of("city")
    cache = StringRows(feature, table, limit=4)
    values = ["a", None, "b", "a", "c", "\ud800"]
    got = cache.rows(values)
    present = [v for v in values if v is not None and v != "\ud800"]
    assert got.tolist() == [
        *map_values(present[:1], feature, table),
        table.buckets,
        *map_values(present[1:], feature, table),
        StringRows.UNENCODABLE,
    ]
    hashed = []
    monkeypatch.setattr(
        "serving.features.string_rows", lambda v, *a: hashed.extend(v) or string_rows(v, *a)
    )
    for k in range(40):  # "a" is used all the time: hashed once, never again; the rest come and go
        assert cache.rows(["a", f"v{k}"])[0] == got[0]
        assert len(cache) <= 2 * (4 + 1)
    assert "a" not in hashed and len(hashed) == 40


def test_string_rows_are_safe_to_share_between_threads():
    schema = edge_schema()
    feature, table = schema.sparse_feature("city"), schema.table_of("city")
    cache = StringRows(feature, table, limit=50)
    values = [f"city_{k % 300}" for k in range(3000)]
    expected = map_values(values, feature, table)
    results = {}

    def work(k: int) -> None:
        results[k] = cache.rows(values[k * 100 :] + values[: k * 100])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, rows in results.items():
        np.testing.assert_array_equal(
            rows, np.concatenate([expected[k * 100 :], expected[: k * 100]])
        )


def test_in_process_rows_are_checked_like_a_request(scorer, edge_model):
    featurizer = scorer.artifact.featurizer
    rows = edge_model.rows[:40]  # more than the scorer's max_rows: in process, any number
    via_rows = featurizer(rows)
    via_columns = featurizer(scorer.reader.read(transpose(rows[:MAX_ROWS]), rows=MAX_ROWS))
    np.testing.assert_array_equal(via_rows.single[:MAX_ROWS], via_columns.single)
    with pytest.raises(Unreadable):
        featurizer([{"strict_cat": 0, "user": True}])


@pytest.mark.parametrize(
    "values",
    [
        [1, 2, 3],
        [1, None, 3],
        [None, None, None],
        [1, 2.0, 3],
        [1, 1.5, 3],
        [2**63, -1, 0],
        [2**64, 1, 0],
        [-(2**63) - 1, 1, 0],
        [5, [1], 2],
        [[1], [2, 3], [4]],
        [[1, 2], [3, 4], [5, 6]],
        [1, "2", 3],
        [1, {}, 3],
        [0.5, 2.5e-42, 1e39],
        [3.3e38, -3.3e38, 7],
    ],
)
def test_numpys_inference_decides_as_the_type_check_does_without_booleans(scorer, values):
    """``booleans=False`` (no ``true``/``false`` in the body) lets numpy infer the numbers' types:
    every feature kind must come out as the value-by-value check gives it, or be refused by both."""
    for name in ("user", "tag", "price", "activity"):
        # three rows, and each value as a one-row request (read a kind at a time, like a context)
        cases = [{"strict_cat": [0, 1, 2], name: values}]
        cases += [{"strict_cat": [0], "user": [7], "tag": [v], "activity": [v]} for v in values]
        for columns in cases:
            checked = _outcome(lambda c=columns: scorer.reader.read(c, booleans=True))
            inferred = _outcome(lambda c=columns: scorer.reader.read(c, booleans=False))
            assert checked == inferred, columns


@pytest.mark.parametrize(
    "values",
    [
        (1, 2, 3),
        (None, 2, None),
        (None, None, None),
        (2**63 - 1, -(2**63), 0),
        (2**63, 1, 0),
        (-(2**63) - 1, 1, None),
    ],
)
def test_typed_id_columns_read_as_the_type_check_reads_them(scorer, values):
    """``typed=True`` (values decoded against the rules: an id is an int or None) converts id
    columns without numpy's inference; every column must come out as the value-by-value check
    gives it (a null in the strict feature refused, an int beyond int64 refused), beside clean
    columns and alone."""
    cases = [
        {"strict_cat": (0, 1, 2), "user": values},
        {"strict_cat": values, "user": (0, 1, 2)},
        {"strict_cat": (0,), "user": values[:1]},
    ]
    for columns in cases:
        checked = _outcome(lambda c=columns: scorer.reader.read(c))
        assert _outcome(lambda c=columns: scorer.reader.read(c, typed=True)) == checked, columns
    assert scorer.reader.read({"strict_cat": (0, 1, 2), "user": (5, None, 7)}, typed=True).values[
        "user"
    ].present.tolist() == [True, False, True]


def _outcome(read: Callable[[], Columns]) -> dict | str:
    """What a read gives, comparably: each column's values and where they are present, or
    ``"unreadable"``."""
    try:
        columns = read().values
    except Unreadable:
        return "unreadable"
    return {name: (c.values.tolist(), _listed(c.present)) for name, c in columns.items()}


def _listed(present: np.ndarray | None) -> list[bool] | None:
    return None if present is None else present.tolist()


def test_a_body_without_true_or_false_holds_no_boolean():
    assert may_hold_booleans(b'{"rows": [{"a": true}]}')
    assert may_hold_booleans(b'{"rows": [{"a": false}]}')
    assert may_hold_booleans(b'{"rows": [{"a": "untrue"}]}')  # a string: the careful check runs
    assert not may_hold_booleans(b'{"rows": [{"a": 1, "b": "x", "c": null}]}')
