"""Liveness, readiness, /v1/model, Prometheus metrics, and startup failures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from schemas.artifact import SCHEMA_FILE
from serving.artifact import ArtifactError
from serving.config import ServingSettings
from serving.main import create_app
from tests.serving.artifacts import REPO


def test_health_and_readiness(client, edge_model):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": edge_model.version}


def test_not_ready_without_a_model(edge_model):
    app = create_app(ServingSettings(model_dir=edge_model.model))
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: nothing loaded
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["status"] == "not ready"
    response = client.post("/v1/score", json={"rows": [{}]})
    assert response.status_code == 503 and response.json() == {"detail": "no model is loaded"}
    assert client.get("/v1/model").status_code == 503


def test_model_metadata(client, edge_model):
    info = client.get("/v1/model").json()
    assert info["version"] == edge_model.version
    assert info["schema_name"] == "edge" and info["heads"] == ["ctr", "cvr"]
    assert info["quantization"] == "none"
    assert info["source"]["step"] == 7 and info["source"]["checkpoint"] == "step_00000007"
    assert info["metrics"] == {"ctr_auc": 0.61, "cvr_gauc": None, "impressions": 240.0}
    features = {f["name"]: f for f in info["features"]}
    assert features["strict_cat"]["oov"] == "error"
    assert features["recent_tags"]["multi_valued"] and features["recent_tags"]["max_len"] == 3
    assert features["activity"]["normalization"] == {"kind": "standard", "mean": 3.0, "std": 2.5}
    assert info["max_rows"] == 1024 and info["last_reload_error"] is None


def _metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match[1])


def test_metrics_count_requests_by_status_latency_batches_and_model(client, edge_model):
    for _ in range(3):
        client.post("/v1/score", json={"rows": edge_model.rows[:4]})
    client.post("/v1/score", json={"rows": []})
    client.post("/v1/score", content=b"x", headers={"content-type": "text/plain"})
    client.get("/nope")
    text = client.get("/metrics").text
    assert (
        _metric(text, "ctcvr_http_requests_total", method="POST", route="/v1/score", status="200")
        == 3
    )
    assert (
        _metric(text, "ctcvr_http_requests_total", method="POST", route="/v1/score", status="422")
        == 1
    )
    assert (
        _metric(text, "ctcvr_http_requests_total", method="POST", route="/v1/score", status="415")
        == 1
    )
    assert (
        _metric(text, "ctcvr_http_requests_total", method="GET", route="other", status="404") == 1
    )
    assert (
        _metric(text, "ctcvr_http_request_duration_seconds_count", method="POST", route="/v1/score")
        == 5
    )
    assert (
        _metric(
            text,
            "ctcvr_http_request_duration_seconds_bucket",
            method="POST",
            route="/v1/score",
            le="+Inf",
        )
        == 5
    )
    assert _metric(text, "ctcvr_score_rows_total") == 12
    assert (
        _metric(text, "ctcvr_batch_rows_count") == 3 and _metric(text, "ctcvr_batch_rows_sum") == 12
    )
    assert _metric(text, "ctcvr_batch_duration_seconds_count") == 3
    assert _metric(text, "ctcvr_queue_rows") == 0
    info = re.search(
        r'^ctcvr_model_info\{schema_fingerprint="([0-9a-f]{64})",version="([^"]+)"\} 1.0$',
        text,
        re.MULTILINE,
    )
    assert info and info[2] == edge_model.version


def test_startup_fails_on_a_bad_artifact(edge_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(edge_model.model, broken)
    (broken / SCHEMA_FILE).write_text("name: changed\n")
    app = create_app(ServingSettings(model_dir=broken))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*schema.yaml"), TestClient(app):
        pass
    with (
        pytest.raises(ArtifactError, match="no model directory: set CTCVR_MODEL_DIR"),
        TestClient(create_app(ServingSettings())),
    ):
        pass


def test_the_command_line_refuses_a_bad_artifact_with_a_plain_message(edge_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(edge_model.model, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 9
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(broken)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "format_version 9" in result.stderr
    assert "Traceback" not in result.stderr
    check = subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(edge_model.model), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and edge_model.version in check.stdout


def test_the_service_collects_garbage_less_often(client):
    # Parsed request bodies are freed by reference counting; see serving.main.GC_YOUNG_THRESHOLD.
    import gc

    from serving.main import GC_YOUNG_THRESHOLD

    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


def test_startup_sets_the_gil_switch_interval(make_client):
    before = sys.getswitchinterval()
    try:
        make_client(gil_switch_ms=0.25)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)
