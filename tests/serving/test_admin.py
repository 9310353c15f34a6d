"""Hot reload through POST /admin/reload: success, failure keeping the old model, the schema."""

from __future__ import annotations

import shutil

import numpy as np

from tests.serving.conftest import ADMIN, ADMIN_TOKEN


def _scores(client, rows):
    response = client.post("/v1/score", json={"rows": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model_version"], np.array(
        [[s["pctr"], s["pcvr"], s["pctcvr"]] for s in body["scores"]]
    )


def test_reload_serves_the_new_model(make_client, edge_model, edge_model_b):
    client = make_client(admin_token=ADMIN_TOKEN)
    version, got = _scores(client, edge_model.rows[:20])
    assert version == edge_model.version
    np.testing.assert_allclose(got, edge_model.expected[:20], atol=1e-5)

    response = client.post(
        "/admin/reload", json={"model_dir": str(edge_model_b.model)}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["version"], body["previous_version"]) == (edge_model_b.version, edge_model.version)
    assert body["model_dir"] == str(edge_model_b.model) and body["seconds"] > 0
    version, got = _scores(client, edge_model.rows[:20])
    assert version == edge_model_b.version
    np.testing.assert_allclose(got, edge_model_b.expected[:20], atol=1e-5)
    assert client.get("/v1/model").json()["version"] == edge_model_b.version
    assert client.get("/readyz").json() == {
        "status": "ready",
        "model_version": edge_model_b.version,
    }


def test_reload_without_a_body_rereads_the_configured_directory(
    make_client, edge_model, edge_model_b, tmp_path
):
    live = tmp_path / "current"
    shutil.copytree(edge_model.model, live)
    client = make_client(model_dir=live, admin_token=ADMIN_TOKEN)
    shutil.rmtree(live)
    shutil.copytree(edge_model_b.model, live)  # a new export in place
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200 and response.json()["version"] == edge_model_b.version
    assert _scores(client, edge_model.rows[:3])[0] == edge_model_b.version


def test_a_failed_reload_keeps_the_old_model_and_says_why(
    make_client, edge_model, edge_model_b, tmp_path
):
    client = make_client(admin_token=ADMIN_TOKEN)
    broken = tmp_path / "broken"
    shutil.copytree(edge_model_b.model, broken)
    (broken / "weights" / "dense.safetensors").write_bytes(b"garbage")
    for target, reason in ((broken, "checksum mismatch"), (tmp_path / "missing", "does not exist")):
        response = client.post("/admin/reload", json={"model_dir": str(target)}, headers=ADMIN)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert (
            detail.startswith(f"reload failed, still serving {edge_model.version}: ")
            and reason in detail
        )
        assert "Traceback" not in detail
        version, got = _scores(client, edge_model.rows[:5])
        assert version == edge_model.version
        np.testing.assert_allclose(got, edge_model.expected[:5], atol=1e-5)
        info = client.get("/v1/model").json()
        assert info["version"] == edge_model.version and reason in info["last_reload_error"]
    metrics = client.get("/metrics").text
    assert 'ctcvr_model_reloads_total{result="failure"} 2.0' in metrics
    assert (
        'ctcvr_model_info{schema_fingerprint="' in metrics
        and f'version="{edge_model.version}"' in metrics
    )
    # a good reload afterwards clears the error
    assert (
        client.post(
            "/admin/reload", json={"model_dir": str(edge_model_b.model)}, headers=ADMIN
        ).status_code
        == 200
    )
    assert client.get("/v1/model").json()["last_reload_error"] is None


def test_reload_body_is_validated(make_client):
    client = make_client(admin_token=ADMIN_TOKEN)
    for body in ({"model_dir": ""}, {"model_dir": 3}, {"other": "x"}):
        assert client.post("/admin/reload", json=body, headers=ADMIN).status_code == 422


def test_a_concurrent_reload_is_refused(make_client, edge_model):
    client = make_client(admin_token=ADMIN_TOKEN)
    registry = client.app.state.registry
    registry._reload_lock.acquire()  # as if another reload were running
    try:
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 409 and "already in progress" in response.json()["detail"]
    finally:
        registry._reload_lock.release()


def test_the_openapi_request_schema_follows_the_served_schema(
    make_client, edge_model, edge_model_b
):
    client = make_client(admin_token=ADMIN_TOKEN)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    features = {
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
    }
    for name in ("Impression", "ImpressionColumns"):
        assert set(schemas[name]["properties"]) == features
        assert schemas[name]["additionalProperties"] is False and schemas[name]["required"] == [
            "strict_cat"
        ]
    price = schemas["Impression"]["properties"]["price"]
    assert schemas["ImpressionColumns"]["properties"]["price"]["items"] == {"anyOf": price["anyOf"]}
    client.post("/admin/reload", json={"model_dir": str(edge_model_b.model)}, headers=ADMIN)
    after = client.get("/openapi.json").json()["components"]["schemas"]
    assert {k: after[k] for k in ("Impression", "ImpressionColumns")} == {
        k: schemas[k] for k in ("Impression", "ImpressionColumns")
    }


def test_a_reload_lets_the_previous_model_go(make_client, edge_model, edge_model_b):
    import gc
    import weakref

    client = make_client(admin_token=ADMIN_TOKEN)
    assert client.post("/v1/score", json={"rows": edge_model.rows[:3]}).status_code == 200
    previous = weakref.ref(client.app.state.registry.current)
    assert (
        client.post(
            "/admin/reload", json={"model_dir": str(edge_model_b.model)}, headers=ADMIN
        ).status_code
        == 200
    )
    gc.collect()
    assert previous() is None  # nothing (the batcher's last batch included) keeps it alive
