"""Property-based: any JSON body, of any shape, to any scoring route gets a 200 or 422, never a 500."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FEATURES = [
    "user",
    "city",
    "level",
    "strict_cat",
    "recent_tags",
    "tag",
    "words",
    "price",
    "activity",
    "raw",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
rows = st.dictionaries(st.sampled_from(FEATURES) | st.text(max_size=6), values, max_size=6)
columns = st.dictionaries(
    st.sampled_from(FEATURES) | st.text(max_size=6),
    st.lists(values, max_size=4) | values,
    max_size=6,
)
rankings = st.fixed_dictionaries(
    {"candidates": st.lists(rows, max_size=5) | columns},
    optional={
        "context": rows | values,
        "top_k": st.integers(min_value=-2, max_value=7) | values,
        "order_by": st.sampled_from(["pctr", "pcvr", "pctcvr"]) | values,
    },
)
bodies = st.one_of(
    st.fixed_dictionaries({"rows": st.lists(rows, max_size=5)}),
    st.fixed_dictionaries({"columns": columns}),
    rankings,
    st.dictionaries(st.text(max_size=6), values, max_size=3),
    values,
)
ROUTES = st.sampled_from(["/v1/score", "/v1/score/columns", "/v1/rank"])


@pytest.fixture(scope="module")
def app_client(edge_model):
    from fastapi.testclient import TestClient

    from serving.config import ServingSettings
    from serving.main import create_app

    with TestClient(
        create_app(ServingSettings(model_dir=edge_model.model)), raise_server_exceptions=False
    ) as client:
        yield client


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, route=ROUTES)
def test_no_body_gets_a_server_error(app_client, body, route):
    content = json.dumps(body, allow_nan=True)
    response = app_client.post(route, content=content, headers={"content-type": "application/json"})
    assert response.status_code in (200, 422), (response.status_code, response.text[:500])
    if response.status_code == 200 and route == "/v1/score":
        assert len(response.json()["scores"]) == len(body["rows"])
    elif response.status_code == 200 and route == "/v1/score/columns":
        assert len(response.json()["pctr"]) == len(next(iter(body["columns"].values())))
    elif response.status_code == 200:
        candidates = body["candidates"]
        n = len(candidates if isinstance(candidates, list) else next(iter(candidates.values())))
        answer = response.json()
        assert len(answer["pctr"]) == n
        assert ("top" in answer) == (body.get("top_k") is not None)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200), route=ROUTES)
def test_no_bytes_get_a_server_error(app_client, raw, route):
    response = app_client.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:500]
