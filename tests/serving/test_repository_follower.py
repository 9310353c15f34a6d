"""The service following a model repository, in process: startup, polling, hot swaps, refusals of
versions that cannot be loaded (once per pointer change), storage faults, and what /readyz,
/v1/model, /metrics and the log say; settings and command-line checks. The two-replica test over
real uvicorn processes is tests/serving/test_repository_live.py."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from schemas.repository import ModelRepository, RepositoryError
from serving.artifact import ArtifactError
from serving.config import ServingSettings
from serving.main import create_app
from serving.repository import CACHE_KEEP, PollResult, fetch_version
from tests.serving.artifacts import REPO, truncated_copy
from tests.serving.conftest import ADMIN, ADMIN_TOKEN
from trainer.publish import publish


@pytest.fixture(params=["local", "s3"])
def repository(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue("s3").uri("models")


@pytest.fixture
def follow(tmp_path):
    """``follow(repository, **settings)``: a started app following ``repository`` (polling only
    when a test calls ``poll()``, unless it sets ``poll_seconds``)."""
    clients = []

    def make(repository: str, **overrides) -> TestClient:
        settings = ServingSettings(
            model_repository=repository,
            model_cache=tmp_path / "cache",
            admin_token=ADMIN_TOKEN,
            **{"poll_seconds": 3600.0, **overrides},
        )
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def poll(client: TestClient) -> PollResult:
    return client.app.state.follower.poll_once()


def metric(client: TestClient, name: str, **labels: str) -> float | None:
    text = client.get("/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else None


def corrupt_version(edge_model, tmp_path, name: str = "corrupt-v1"):
    return truncated_copy(edge_model.model, tmp_path / name, version=name)


def test_serves_the_current_version_and_swaps_in_new_ones(
    follow, repository, edge_model, edge_model_b
):
    publish(edge_model.model, repository, log=None)
    client = follow(repository)
    info = client.get("/v1/model").json()
    assert info["version"] == edge_model.version
    assert info["repository"]["uri"] == ModelRepository(repository).uri
    assert info["repository"]["current"] == edge_model.version and info["repository"]["in_sync"]
    assert client.get("/readyz").json()["repository"]["in_sync"] is True
    assert "detail" not in client.get("/readyz").json()
    assert poll(client) is PollResult.UNCHANGED

    publish(edge_model_b.model, repository, log=None)
    assert poll(client) is PollResult.LOADED
    response = client.post("/v1/score", json={"rows": edge_model_b.rows[:3]})
    assert response.json()["model_version"] == edge_model_b.version
    info = client.get("/v1/model").json()
    assert info["version"] == info["repository"]["current"] == edge_model_b.version
    assert metric(client, "ctcvr_repository_info", version=edge_model_b.version) == 1.0
    assert metric(client, "ctcvr_repository_info", version=edge_model.version) is None
    assert metric(client, "ctcvr_repository_in_sync") == 1.0
    assert metric(client, "ctcvr_repository_polls_total", result="loaded") == 1.0
    assert metric(client, "ctcvr_model_reloads_total", result="success") == 1.0


def test_a_version_that_cannot_be_loaded_is_refused_once_and_the_old_one_serves(
    follow, repository, edge_model, edge_model_b, tmp_path, caplog
):
    publish(edge_model.model, repository, log=None)
    client = follow(repository)
    repo = ModelRepository(repository)
    # A version corrupted after it was verified (or moved to by hand): the pointer names it.
    repo.upload(corrupt_version(edge_model, tmp_path))
    repo.promote("corrupt-v1")
    with caplog.at_level(logging.INFO, logger="ctcvr.serving"):
        assert poll(client) is PollResult.REFUSED
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        m.startswith(
            f"refused version corrupt-v1 of {repo.uri}, still serving {edge_model.version}"
        )
        and "checksum mismatch" in m
        for m in refusals
    ), refusals
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == edge_model.version
    assert ready.json()["detail"].startswith(
        f"repository {repo.uri}: version corrupt-v1 refused, serving {edge_model.version}: "
    )
    assert "checksum mismatch" in ready.json()["detail"]
    status = client.get("/v1/model").json()["repository"]
    assert (status["current"], status["in_sync"], status["refused_version"]) == (
        "corrupt-v1",
        False,
        "corrupt-v1",
    )
    assert client.post("/v1/score", json={"rows": edge_model.rows[:2]}).status_code == 200
    # Not tried again while the pointer stays.
    assert poll(client) is PollResult.SKIPPED and poll(client) is PollResult.SKIPPED
    assert metric(client, "ctcvr_repository_refused_versions_total") == 1.0
    assert metric(client, "ctcvr_repository_refused_info", version="corrupt-v1") == 1.0
    assert metric(client, "ctcvr_repository_in_sync") == 0.0
    # The pointer moves on: the refusal is forgotten and the new version loads.
    publish(edge_model_b.model, repository, log=None)
    assert poll(client) is PollResult.LOADED
    assert "detail" not in client.get("/readyz").json()
    assert client.get("/v1/model").json()["repository"].get("refused_version") is None
    assert metric(client, "ctcvr_repository_refused_info", version="corrupt-v1") is None


def test_a_rollback_brings_the_previous_version_back(follow, repository, edge_model, edge_model_b):
    publish(edge_model.model, repository, log=None)
    publish(edge_model_b.model, repository, log=None)
    client = follow(repository)
    assert client.get("/v1/model").json()["version"] == edge_model_b.version
    ModelRepository(repository).rollback()
    assert poll(client) is PollResult.LOADED
    assert client.get("/v1/model").json()["version"] == edge_model.version


def test_a_storage_outage_is_retried_at_the_next_poll(follow, s3, edge_model, edge_model_b):
    repository = s3.uri("models")
    publish(edge_model.model, repository, log=None)
    client = follow(repository)
    with s3.server.stopped():
        assert poll(client) is PollResult.ERROR
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and "cannot read the pointer" in ready["detail"]
        assert "unreachable" in client.get("/v1/model").json()["repository"]["last_poll_error"]
        assert client.post("/v1/score", json={"rows": edge_model.rows[:2]}).status_code == 200
    publish(edge_model_b.model, repository, log=None)
    assert poll(client) is PollResult.LOADED  # not refused: the store's fault, not the version's
    assert metric(client, "ctcvr_repository_refused_versions_total") == 0.0
    assert metric(client, "ctcvr_repository_polls_total", result="error") == 1.0


def test_startup_falls_back_to_an_earlier_version(follow, repository, edge_model, tmp_path):
    publish(edge_model.model, repository, log=None)
    repo = ModelRepository(repository)
    repo.upload(corrupt_version(edge_model, tmp_path))
    repo.promote("corrupt-v1")
    client = follow(repository)
    ready = client.get("/readyz").json()
    assert ready["model_version"] == edge_model.version
    assert ready["repository"]["refused_version"] == "corrupt-v1"
    assert poll(client) is PollResult.SKIPPED


def test_startup_fails_on_an_empty_repository_or_when_nothing_loads(
    repository, edge_model, tmp_path
):
    settings = ServingSettings(model_repository=repository, model_cache=tmp_path / "cache")
    with (
        pytest.raises(ArtifactError, match=r"is empty \(no pointer\): publish a version first"),
        TestClient(create_app(settings)),
    ):
        pass
    repo = ModelRepository(repository)
    repo.upload(corrupt_version(edge_model, tmp_path))
    repo.promote("corrupt-v1")
    with (
        pytest.raises(ArtifactError, match=r"no version .* can be served: corrupt-v1: checksum"),
        TestClient(create_app(settings)),
    ):
        pass


def test_the_poll_thread_follows_and_stops_at_shutdown(follow, tmp_path, edge_model, edge_model_b):
    repository = str(tmp_path / "repo")
    publish(edge_model.model, repository, log=None)
    client = follow(repository, poll_seconds=0.2)
    follower = client.app.state.follower
    thread = follower._thread
    assert thread is not None and thread.is_alive()
    publish(edge_model_b.model, repository, log=None)
    deadline = time.monotonic() + 60
    while client.get("/v1/model").json()["version"] != edge_model_b.version:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.1)
    client.__exit__(None, None, None)
    assert not thread.is_alive()


def test_admin_reload_of_another_directory_is_refused_while_following(
    follow, repository, edge_model, edge_model_b
):
    publish(edge_model.model, repository, log=None)
    client = follow(repository)
    response = client.post(
        "/admin/reload", json={"model_dir": str(edge_model_b.model)}, headers=ADMIN
    )
    assert response.status_code == 409
    assert "follows model repository" in response.json()["detail"]
    assert "trainer.models promote or rollback" in response.json()["detail"]
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200  # re-read: fine


def test_fetched_versions_are_cached_once_and_evicted(s3, edge_model, edge_model_b, tmp_path):
    repo = ModelRepository(s3.uri("models"))
    publish(edge_model.model, repo.uri, log=None)
    cache = tmp_path / "cache"
    first = fetch_version(repo, edge_model.version, cache)
    assert first.parent == cache and first.name.startswith(edge_model.version + "-")
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert fetch_version(repo, edge_model.version, cache) == first  # not fetched again
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    for i in range(CACHE_KEEP + 1):
        version = f"other-{i}"
        out = tmp_path / version
        shutil.copytree(edge_model_b.model, out)
        manifest = (out / "manifest.json").read_text().replace(edge_model_b.version, version)
        (out / "manifest.json").write_text(manifest)
        repo.upload(out)
        fetch_version(repo, version, cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == CACHE_KEEP and not any(e.startswith(".") for e in entries)
    assert not first.exists()


def test_fetch_refuses_versions_that_are_not_ready(s3, edge_model, tmp_path):
    repo = ModelRepository(s3.uri("models"))
    repo.upload(corrupt_version(edge_model, tmp_path))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for s3://.*corrupt-v1"):
        fetch_version(repo, "corrupt-v1", tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir()] == []  # no half-written entry
    repo.mark_rejected("corrupt-v1", "bad")
    with pytest.raises(RepositoryError, match="was rejected"):
        fetch_version(repo, "corrupt-v1", tmp_path / "cache")


def test_settings_refuse_a_model_dir_and_a_repository_together(edge_model, tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="mutually exclusive"):
        ServingSettings(model_dir=edge_model.model, model_repository=str(tmp_path))
    with pytest.raises(ValidationError, match="credentials in a URI are not accepted"):
        ServingSettings(model_repository="s3://key:secret@bucket/models")
    monkeypatch.setenv("CTCVR_MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("CTCVR_POLL_SECONDS", "2.5")
    settings = ServingSettings()
    assert settings.model_repository == str(tmp_path / "repo") and settings.poll_seconds == 2.5
    with pytest.raises(ValidationError, match="poll_seconds"):
        ServingSettings(poll_seconds=0)


def test_the_command_line_takes_a_repository(edge_model, tmp_path):
    repository = str(tmp_path / "repo")

    def serve(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "serving", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**_clean_env(), **env},
        )

    both = serve("--model-dir", str(edge_model.model), "--repository", repository)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    mixed = serve("--repository", repository, CTCVR_MODEL_DIR=str(edge_model.model))
    assert mixed.returncode == 2 and "mutually exclusive" in mixed.stderr
    empty = serve("--repository", repository, "--check")
    assert empty.returncode == 1 and "is empty (no pointer)" in empty.stderr
    assert "Traceback" not in empty.stderr
    publish(edge_model.model, repository, log=None)
    check = serve("--repository", repository, "--check")
    assert check.returncode == 0 and edge_model.version in check.stdout


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CTCVR_")}
