"""Bearer-token auth from the environment, and settings that refuse unsafe values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.config import ServingSettings
from tests.serving.conftest import ADMIN, ADMIN_TOKEN, API_TOKEN, AUTH

ROW = {"rows": [{"strict_cat": 0}]}


def test_without_a_token_configured_the_api_is_open(client):
    assert client.post("/v1/score", json=ROW).status_code == 200
    assert client.get("/v1/model").status_code == 200


def test_with_a_token_configured_v1_needs_it(make_client):
    client = make_client(api_token=API_TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_TOKEN},
        {"Authorization": "Basic x"},
    ):
        for response in (
            client.post("/v1/score", json=ROW, headers=headers),
            client.get("/v1/model", headers=headers),
        ):
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or invalid bearer token"}
    assert client.post("/v1/score", json=ROW, headers=AUTH).status_code == 200
    assert client.get("/v1/model", headers=AUTH).status_code == 200
    # probes and scrapers need no token
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_admin_endpoints_are_off_without_an_admin_token(make_client):
    client = make_client(api_token=API_TOKEN)
    response = client.post("/admin/reload", headers=AUTH)
    assert response.status_code == 403 and "set CTCVR_ADMIN_TOKEN" in response.json()["detail"]


def test_admin_endpoints_need_the_admin_token(make_client):
    client = make_client(api_token=API_TOKEN, admin_token=ADMIN_TOKEN)
    assert client.post("/admin/reload").status_code == 401
    assert (
        client.post("/admin/reload", headers=AUTH).status_code == 401
    )  # the API token is not enough
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTCVR_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("CTCVR_MAX_ROWS", "7")
    monkeypatch.setenv("CTCVR_API_TOKEN", API_TOKEN)
    settings = ServingSettings()
    assert (settings.model_dir, settings.max_rows, settings.api_token.get_secret_value()) == (
        str(tmp_path),
        7,
        API_TOKEN,
    )
    assert API_TOKEN not in repr(settings)  # secrets stay out of logs
    monkeypatch.setenv("CTCVR_MODEL_DIR", "s3://models/demo")  # a URI stays one
    monkeypatch.setenv("CTCVR_MODEL_CACHE", str(tmp_path / "cache"))
    settings = ServingSettings()
    assert (settings.model_dir, settings.model_cache) == ("s3://models/demo", tmp_path / "cache")
    with pytest.raises(ValidationError, match="credentials in a URI are not accepted"):
        ServingSettings(model_dir="s3://AKIA:secret@models/demo")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"environment": "production"}, "CTCVR_API_TOKEN must be set to at least 16 characters"),
        (
            {"environment": "production", "api_token": API_TOKEN, "admin_token": "short"},
            "CTCVR_ADMIN_TOKEN must be set",
        ),
        ({"api_token": "  "}, "CTCVR_API_TOKEN is set but empty"),
        ({"max_rows": 0}, "greater than or equal to 1"),
        ({"max_rows": 20_000}, "less than or equal to 10000"),
        ({"max_rows": 2000, "batch_max_rows": 1000}, "must be >= CTCVR_MAX_ROWS"),
        ({"batch_max_wait_ms": -1}, "greater than or equal to 0"),
        ({"log_level": "loud"}, "should match pattern"),
    ],
)
def test_unsafe_or_invalid_settings_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        ServingSettings(**values)


def test_production_accepts_long_tokens():
    settings = ServingSettings(
        environment="production", api_token=API_TOKEN, admin_token=ADMIN_TOKEN
    )
    assert settings.environment.value == "production"


def test_openapi_says_which_routes_need_the_bearer_token(client):
    spec = client.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, method in (
        ("/v1/score", "post"),
        ("/v1/score/columns", "post"),
        ("/v1/rank", "post"),
        ("/v1/model", "get"),
    ):
        assert spec["paths"][path][method]["security"] == [{"HTTPBearer": []}], path
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"], path


def test_the_score_routes_check_the_token_before_the_body(make_client):
    client = make_client(api_token=API_TOKEN)
    for path in ("/v1/score", "/v1/score/columns", "/v1/rank"):
        response = client.post(path, content=b"rows=1", headers={"Content-Type": "text/plain"})
        assert response.status_code == 401, path
        response = client.post(
            path, content=b"rows=1", headers={"Content-Type": "text/plain", **AUTH}
        )
        assert response.status_code == 415, path
