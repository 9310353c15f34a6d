"""A model directory on a real S3 server: fetched into the local cache, verified, loaded and
served; the cache shared and bounded; every fault refused with the URI and what to check, and a
bad remote model never replacing the one being served."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from schemas import storage
from schemas.artifact import MANIFEST_FILE, Manifest
from serving import fetch
from serving.artifact import ArtifactError, load_artifact
from serving.fetch import CACHE_KEEP, local_model_dir
from tests.serving.artifacts import REPO
from tests.serving.conftest import ADMIN, ADMIN_TOKEN
from trainer.export import export_run


@pytest.fixture
def remote(s3, edge_model) -> str:
    """The edge model, exported to the test bucket."""
    uri = s3.uri("models", "edge")
    export_run(edge_model.run, uri, log=None)
    return uri


def _manifest(model_uri: str) -> Manifest:
    return Manifest.model_validate_json(storage.read_text(storage.join(model_uri, MANIFEST_FILE)))


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _scores(artifact, rows) -> np.ndarray:
    return artifact.model.predict(artifact.featurizer(rows))


def test_a_model_on_s3_is_fetched_once_verified_and_scores_like_the_local_one(
    remote, edge_model, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    local = local_model_dir(remote, cache)
    assert local.parent == cache and local.name.startswith(f"{edge_model.version}-")
    assert _entries(cache) == [local.name]  # no staging directory left
    artifact = load_artifact(local)
    assert artifact.version == edge_model.version
    np.testing.assert_array_equal(
        _scores(artifact, edge_model.rows),
        _scores(load_artifact(edge_model.model), edge_model.rows),
    )

    def no_download(*_args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(fetch, "_download", no_download)
    assert local_model_dir(remote, cache) == local  # the same manifest: the cached copy


def test_local_directories_are_loaded_where_they_are(edge_model, tmp_path):
    assert local_model_dir(edge_model.model, tmp_path / "cache") == edge_model.model
    assert local_model_dir(f"file://{edge_model.model}", tmp_path / "c") == edge_model.model
    assert not (tmp_path / "cache").exists()


def test_processes_fetching_the_same_model_at_once_share_one_copy(remote, tmp_path):
    cache, results, errors = tmp_path / "cache", [], []

    def fetch_it():
        try:
            results.append(local_model_dir(remote, cache))
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=fetch_it) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(results)) == 1
    assert _entries(cache) == [results[0].name]
    load_artifact(results[0])


def test_a_replaced_model_is_a_new_cache_entry_and_old_entries_are_evicted(
    s3, remote, edge_model, tmp_path
):
    cache = tmp_path / "cache"
    manifest = json.loads(storage.read_text(storage.join(remote, MANIFEST_FILE)))
    fetched = []
    for i in range(CACHE_KEEP + 2):
        manifest["version"] = f"v{i}"
        storage.write_text(storage.join(remote, MANIFEST_FILE), json.dumps(manifest))
        fetched.append(local_model_dir(remote, cache))
        assert fetched[-1].name.startswith(f"v{i}-")
    assert _entries(cache) == sorted(p.name for p in fetched[-CACHE_KEEP:])
    assert load_artifact(fetched[-1]).version == f"v{CACHE_KEEP + 1}"


def test_a_half_written_cache_entry_of_a_dead_process_is_cleaned_up(remote, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / ".v1-0123456789abcdef.999999999.deadbeef.tmp"
    stale.mkdir(parents=True)
    (stale / "partial").write_bytes(b"x")
    local_model_dir(remote, cache)
    assert not stale.exists()


def _truncate(uri: str) -> None:
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 2])


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("no manifest", r"manifest.json not found: s3://.*in progress or failed"),
        (
            "truncated table",
            (
                r"checksum mismatch for s3://.*/weights/embeddings/dim\d+\.safetensors: .*"
                r"the object is truncated, corrupt or was changed after export"
            ),
        ),
        ("truncated manifest", r"manifest.json is not valid JSON"),
        ("unsafe name", r"lists the file name '\.\./\.\./escape', which is not inside it"),
        (
            "wrong credentials",
            (
                r"cannot fetch model s3://.*: access denied by endpoint .*"
                r"check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
            ),
        ),
        (
            "missing bucket",
            r"bucket 'no-such-bucket-ctcvr' does not exist at endpoint .*check the bucket name",
        ),
        (
            "server down",
            r"cannot fetch model s3://.*unreachable after 2 attempt\(s\).*check AWS_ENDPOINT_URL",
        ),
    ],
)
def test_every_fault_is_named_and_leaves_nothing_in_the_cache(
    s3, remote, tmp_path, monkeypatch, fault, message
):
    target = remote
    manifest_uri = storage.join(remote, MANIFEST_FILE)
    if fault == "no manifest":
        storage.delete_file(manifest_uri)
    elif fault == "truncated table":
        _truncate(storage.join(remote, _manifest(remote).table_path("user")))
    elif fault == "truncated manifest":
        _truncate(manifest_uri)
    elif fault == "unsafe name":
        manifest = json.loads(storage.read_text(manifest_uri))
        manifest["files"]["../../escape"] = {"sha256": "0" * 64, "bytes": 1}
        storage.write_text(manifest_uri, json.dumps(manifest))
    elif fault == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123")
    elif fault == "missing bucket":
        target = "s3://no-such-bucket-ctcvr/models/edge"
    cache = tmp_path / "cache"
    if fault == "server down":
        with s3.server.stopped(), pytest.raises(ArtifactError, match=message) as caught:
            local_model_dir(target, cache)
    else:
        with pytest.raises(ArtifactError, match=message) as caught:
            local_model_dir(target, cache)
    assert "wrong-secret-0123" not in str(caught.value)
    assert _entries(cache) == []  # nothing half-fetched, nothing that would load


def test_the_service_serves_and_reloads_models_from_s3(
    s3, remote, edge_model, edge_model_b, make_client, tmp_path
):
    cache = tmp_path / "cache"
    client = make_client(model_dir=remote, model_cache=cache, admin_token=ADMIN_TOKEN)
    info = client.get("/v1/model").json()
    assert info["model_dir"] == remote and info["version"] == edge_model.version
    response = client.post("/v1/score", json={"rows": edge_model.rows[:5]})
    assert response.status_code == 200
    np.testing.assert_allclose(
        [[s["pctr"], s["pcvr"], s["pctcvr"]] for s in response.json()["scores"]],
        edge_model.expected[:5],
        atol=1e-5,
    )
    other = s3.uri("models", "edge_b")
    export_run(edge_model_b.run, other, log=None)
    reloaded = client.post("/admin/reload", json={"model_dir": other}, headers=ADMIN)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["model_dir"] == other
    assert client.get("/v1/model").json()["version"] == edge_model_b.version

    # A bad remote model never replaces the one being served.
    bad = s3.uri("models", "bad")
    export_run(edge_model.run, bad, version="bad", log=None)
    _truncate(storage.join(bad, _manifest(bad).table_path("user")))
    failed = client.post("/admin/reload", json={"model_dir": bad}, headers=ADMIN)
    assert failed.status_code == 422
    assert f"still serving {edge_model_b.version}" in failed.json()["detail"]
    assert "checksum mismatch for s3://" in failed.json()["detail"]
    info = client.get("/v1/model").json()
    assert info["version"] == edge_model_b.version and info["model_dir"] == other
    assert "checksum mismatch" in info["last_reload_error"]
    with s3.server.stopped():
        down = client.post("/admin/reload", headers=ADMIN)  # re-read the served URI
    assert down.status_code == 422 and "unreachable" in down.json()["detail"]
    assert client.post("/v1/score", json={"rows": edge_model.rows[:2]}).status_code == 200


def test_the_command_line_checks_a_model_on_s3_and_names_faults(remote, edge_model, tmp_path):
    def check(model_dir: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "serving",
                "--model-dir",
                model_dir,
                "--model-cache",
                str(tmp_path / "cache"),
                "--check",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    good = check(remote)
    assert good.returncode == 0, good.stderr
    assert f"model {edge_model.version} from {remote}" in good.stdout
    bad = check("s3://no-such-bucket-ctcvr/models/edge")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(
        "error: cannot fetch model s3://no-such-bucket-ctcvr/models/edge: "
    )
    assert "does not exist at endpoint" in bad.stderr
