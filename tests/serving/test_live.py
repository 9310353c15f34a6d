"""Through a real ``python -m serving`` (uvicorn) process on loopback: parity with the trainer,
hot reload under load, and a schemathesis run over the OpenAPI spec finding no server error."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from schemas import load_schema
from tests.serving.artifacts import (
    REPO,
    live_server,
    request_rows,
    score_over_http,
    trainer_predictions,
)
from tests.serving.conftest import ADMIN, ADMIN_TOKEN, API_TOKEN, AUTH

ENV = {"CTCVR_API_TOKEN": API_TOKEN, "CTCVR_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def trained_server(trained_model, tmp_path_factory):
    with live_server(
        trained_model.model, tmp_path_factory.mktemp("log") / "server.log", env=ENV
    ) as url:
        yield url


@pytest.fixture(scope="module")
def edge_server(edge_model, tmp_path_factory):
    with live_server(
        edge_model.model, tmp_path_factory.mktemp("log") / "server.log", env=ENV
    ) as url:
        yield url


def test_service_matches_the_trainer_on_a_sharded_training_run(trained_model, trained_server):
    """The 2-rank checkpoint, exported and served, scores the test split as the trainer's own
    model and reader do in process."""
    expected = trainer_predictions(trained_model.run, trained_model.test_data)
    rows = request_rows(trained_model.test_data, load_schema(trained_model.run / "schema.yaml"))
    assert len(rows) == len(expected) == 600
    with httpx.Client(base_url=trained_server, timeout=30) as client:
        got, versions = score_over_http(client, rows, chunk=256, headers=AUTH)
        columns, _ = score_over_http(client, rows, chunk=256, headers=AUTH, form="columns")
    assert len(versions) == 1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(columns, got)  # the columnar form scores exactly as the row form
    assert np.ptp(expected[:, 0]) > 1e-3  # the comparison is not between constants


def test_rank_scores_as_score_does_through_the_server(trained_model, trained_server):
    """Ranking calls (each user's context once, the items per candidate, as the simulator's
    schema scopes them) get the scores /v1/score gives the rows they stand for, and the order."""
    schema = load_schema(trained_model.run / "schema.yaml")
    context = {f.name for f in (*schema.sparse, *schema.dense) if f.scope.value == "context"}
    rows = request_rows(trained_model.test_data, schema)
    with httpx.Client(base_url=trained_server, timeout=30, headers=AUTH) as client:
        for start in range(0, 600, 200):
            first = rows[start]
            candidates = [
                {k: v for k, v in r.items() if k not in context} for r in rows[start:][:200]
            ]
            shared = {k: v for k, v in first.items() if k in context}
            body = {"context": shared, "candidates": candidates, "top_k": 10}
            ranked = client.post("/v1/rank", json=body)
            assert ranked.status_code == 200, ranked.text
            same = [{**c, **shared} for c in candidates]
            expected, _ = score_over_http(client, same, chunk=200)
            got = np.array([ranked.json()[k] for k in ("pctr", "pcvr", "pctcvr")]).T
            np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
            order = np.argsort(-got[:, 2], kind="stable")[:10].tolist()
            assert ranked.json()["top"] == order


def test_service_matches_the_trainer_on_every_edge_case(edge_model, edge_server):
    """Nulls, absent keys, OOV ids, negative hashed ids, long lists, null list items, strings; rows
    and columns."""
    with httpx.Client(base_url=edge_server, timeout=30) as client:
        got, versions = score_over_http(client, edge_model.rows, chunk=64, headers=AUTH)
        columns, column_versions = score_over_http(
            client, edge_model.rows, chunk=64, headers=AUTH, form="columns"
        )
    assert versions == column_versions == {edge_model.version}
    np.testing.assert_allclose(got, edge_model.expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(columns, got)


def test_hot_reload_under_load_drops_no_request(edge_model, edge_model_b, edge_server):
    """Clients score without pause while the model is swapped back and forth; every response is
    a 200 whose scores are exactly those of the model version it names."""
    expected = {
        edge_model.version: edge_model.expected,
        edge_model_b.version: edge_model_b.expected,
    }
    rows, stop, failures, seen = edge_model.rows, threading.Event(), [], []

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=edge_server, timeout=30, headers=AUTH) as client:
            i = k
            while not stop.is_set():
                start, size = (i * 13) % (len(rows) - 20), 1 + i % 20
                i += 1
                try:
                    response = client.post("/v1/score", json={"rows": rows[start : start + size]})
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                body = response.json()
                got = np.array([[s["pctr"], s["pcvr"], s["pctcvr"]] for s in body["scores"]])
                if not np.allclose(
                    got, expected[body["model_version"]][start : start + size], atol=1e-5
                ):
                    failures.append(
                        f"scores of rows {start}:{start + size} do not match {body['model_version']}"
                    )
                seen.append(body["model_version"])

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=edge_server, timeout=60, headers=ADMIN) as admin:
            for target in (edge_model_b, edge_model, edge_model_b, edge_model):
                time.sleep(0.4)
                response = admin.post("/admin/reload", json={"model_dir": str(target.model)})
                assert response.status_code == 200, response.text
                assert response.json()["version"] == target.version
            time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert len(seen) > 20 and set(seen) == set(expected)


def test_schemathesis_finds_no_server_error_and_no_contract_violation(trained_server, tmp_path):
    """Every schemathesis check (no 5xx, documented status codes and content types, responses
    matching their schemas, invalid data refused, valid data accepted) over the scoring API, both
    request forms and the ranking call (see schemathesis.toml for the one check that columns of
    one length cannot pass)."""
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        # every check is on by default; the config turns one off for one operation (see there)
        [
            str(schemathesis),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{trained_server}/openapi.json",
            "--header",
            f"Authorization: Bearer {API_TOKEN}",
            "--exclude-path",
            "/admin/reload",
            "--max-examples",
            "60",
            "--seed",
            "0",
            "--workers",
            "1",
            "--output-truncate",
            "true",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]
