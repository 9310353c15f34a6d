"""The score routes' class: a direct handler for the routes the app owns, FastAPI's own for any
inclusion (whose dependencies it must run), and no other endpoint shape accepted."""

from __future__ import annotations

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.testclient import TestClient

from serving.config import ServingSettings
from serving.deps import ScoringDep
from serving.main import create_app
from serving.routes._scoring import ScoringRoute
from tests.serving.conftest import API_TOKEN, AUTH

ROW = {"rows": [{"strict_cat": 0}]}
RANK = {"context": {}, "candidates": [{"strict_cat": 0}]}


@pytest.fixture
def solved(monkeypatch) -> list[str]:
    """The paths of the requests whose dependencies FastAPI's generic handler solved."""
    paths: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        paths.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return paths


def test_the_score_routes_are_served_by_the_direct_handler(client, solved):
    assert client.post("/v1/score", json=ROW).status_code == 200
    assert (
        client.post("/v1/score/columns", json={"columns": {"strict_cat": [0]}}).status_code == 200
    )
    assert client.post("/v1/rank", json=RANK).status_code == 200
    assert solved == []
    assert client.get("/v1/model").status_code == 200  # an ordinary route: FastAPI's handler
    assert solved == ["/v1/model"]


def test_the_direct_handler_keeps_the_dependency_s_errors(make_client):
    client = make_client(api_token=API_TOKEN)
    response = client.post("/v1/rank", json=RANK)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    response = client.post(
        "/v1/score", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert response.status_code == 415 and "send JSON" in response.json()["detail"]


async def _teapot() -> None:
    raise HTTPException(418, "the inclusion's own dependency ran")


def _scoring_router() -> APIRouter:
    router = APIRouter(route_class=ScoringRoute)

    @router.post("/echo")
    async def echo(scoring: ScoringDep) -> Response:
        return Response(scoring.body, media_type="application/json")

    return router


def test_an_included_scoring_route_runs_the_inclusion_s_dependencies(edge_model, solved):
    app = create_app(ServingSettings(model_dir=edge_model.model))
    app.include_router(_scoring_router(), prefix="/guarded", dependencies=[Depends(_teapot)])
    app.include_router(_scoring_router(), prefix="/open")
    with TestClient(app) as client:
        response = client.post("/guarded/echo", json=ROW)
        assert response.status_code == 418, response.text
        response = client.post("/open/echo", json=ROW)
        assert response.status_code == 200 and response.json() == ROW
    assert solved == ["/guarded/echo", "/open/echo"]  # FastAPI's handler, both times


@pytest.mark.parametrize(
    "declare",
    [
        lambda router: router.post("/extra-parameter")(_with_query),
        lambda router: router.post("/extra-dependency", dependencies=[Depends(_teapot)])(_plain),
        lambda router: router.post("/no-scoring")(_no_scoring),
    ],
    ids=["extra parameter", "extra dependency", "no scoring"],
)
def test_a_scoring_route_of_another_shape_is_refused(declare):
    with pytest.raises(TypeError, match="takes one parameter, ScoringDep"):
        declare(APIRouter(route_class=ScoringRoute))


async def _with_query(scoring: ScoringDep, top: int = 3) -> Response:
    return Response(b"{}")


async def _plain(scoring: ScoringDep) -> Response:
    return Response(b"{}")


async def _no_scoring() -> Response:
    return Response(b"{}")
