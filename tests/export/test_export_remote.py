"""trainer.export on a real S3 server: a run read from s3://, a model written to s3://, published
manifest last so that nothing ever loads a half-written model, and every fault named."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from schemas import storage
from schemas.artifact import MANIFEST_FILE, Manifest
from schemas.storage import StorageError
from serving.artifact import ArtifactError, load_artifact
from serving.fetch import local_model_dir
from tests.object_store import download_tree, upload_tree
from tests.serving.artifacts import REPO, make_edge_run
from trainer import export as export_module
from trainer.export import ExportError, export_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_edge_run(tmp_path_factory.mktemp("export_s3"), seed=4)


@pytest.fixture
def s3_run(s3, run) -> str:
    """The run directory, uploaded to the test bucket."""
    uri = s3.uri("runs", "run")
    upload_tree(run, uri)
    return uri


def _objects(uri: str) -> list[str]:
    root = storage.resolve(uri)
    return sorted(
        e.location.relative_to(root)
        for e in storage.list_dir(root, recursive=True)
        if e.kind is storage.Kind.FILE
    )


def test_a_run_on_s3_exports_to_s3_the_same_model_as_on_local_disk(s3, run, s3_run, tmp_path):
    local = export_run(run, tmp_path / "model", log=None)
    out = s3.uri("models", "edge")
    remote = export_run(s3_run, out, log=None)
    assert remote.files == local.files  # the same bytes, file by file
    assert remote.version == local.version and remote.source.run_dir == s3_run
    assert _objects(out) == sorted([MANIFEST_FILE, *remote.files])
    on_store = Manifest.model_validate_json(storage.read_bytes(storage.join(out, MANIFEST_FILE)))
    assert on_store == remote
    artifact = load_artifact(download_tree(out, tmp_path / "fetched"))
    assert artifact.version == local.version


def test_an_existing_model_on_s3_is_replaced_only_with_force(s3, run, tmp_path):
    out = s3.uri("models", "edge")
    export_run(run, out, log=None)
    storage.write_text(storage.join(out, "weights", "stale.safetensors"), "old file")
    with pytest.raises(ExportError, match=rf"{out} already exists; pass --force"):
        export_run(run, out, log=None)
    manifest = export_run(run, out, force=True, version="second", log=None)
    assert _objects(out) == sorted([MANIFEST_FILE, *manifest.files])  # the old files are gone
    assert json.loads(storage.read_text(storage.join(out, MANIFEST_FILE)))["version"] == "second"


def test_publishing_deletes_the_old_manifest_first_and_writes_the_new_one_last(
    s3, run, monkeypatch
):
    out = s3.uri("models", "edge")
    export_run(run, out, log=None)
    calls: list[tuple[str, str]] = []
    real_delete, real_upload = storage.delete_file, storage.upload_file
    monkeypatch.setattr(
        storage,
        "delete_file",
        lambda uri, **kw: (calls.append(("delete", str(uri))), real_delete(uri, **kw))[1],
    )
    monkeypatch.setattr(
        storage,
        "upload_file",
        lambda src, uri: (calls.append(("upload", str(uri))), real_upload(src, uri))[1],
    )
    export_run(run, out, force=True, log=None)
    manifest = storage.join(out, MANIFEST_FILE)
    assert calls[0] == ("delete", manifest) and calls[-1] == ("upload", manifest)
    assert [c for c in calls if c[1] == manifest] == [calls[0], calls[-1]]


def test_an_export_cut_off_while_publishing_leaves_nothing_a_service_would_load(
    s3, run, tmp_path, monkeypatch
):
    out = s3.uri("models", "edge")
    export_run(run, out, log=None)
    (tmp_path / "staging").mkdir()
    monkeypatch.setattr(export_module.tempfile, "tempdir", str(tmp_path / "staging"))
    real_upload, uploads = storage.upload_file, []

    def fail_on_the_third(source, uri):
        uploads.append(uri)
        if len(uploads) == 3:
            raise StorageError(f"{uri}: cannot write: the store went away")
        real_upload(source, uri)

    monkeypatch.setattr(storage, "upload_file", fail_on_the_third)
    with pytest.raises(StorageError, match="the store went away"):
        export_run(run, out, force=True, log=None)
    assert MANIFEST_FILE not in _objects(out) and len(_objects(out)) == 2
    with pytest.raises(ArtifactError, match=r"manifest.json not found: .*in progress or failed"):
        local_model_dir(out, tmp_path / "cache")
    assert list((tmp_path / "staging").iterdir()) == []  # the local staging directory is gone


def test_a_truncated_shard_of_a_run_on_s3_is_named(s3_run, s3):
    checkpoint = storage.join(s3_run, "checkpoints", "step_00000007")
    shard = next(name for name in _objects(checkpoint) if name.endswith(".distcp"))
    shard_uri = storage.join(checkpoint, shard)
    whole = storage.read_bytes(shard_uri)
    storage.write_bytes(shard_uri, whole[:-10])
    with pytest.raises(ExportError, match=rf"^{shard_uri} is truncated: {len(whole) - 10} bytes"):
        export_run(s3_run, s3.uri("models", "x"), log=None)
    assert not storage.exists(s3.uri("models"))  # nothing was published


def test_storage_faults_of_an_export_are_named_on_the_command_line(s3, s3_run, monkeypatch):
    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainer.export", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    missing = export("--run", s3_run, "--out", "s3://no-such-bucket-ctcvr/models/x")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert (
        "error: s3://no-such-bucket-ctcvr/models/x: bucket 'no-such-bucket-ctcvr' does not "
        "exist at endpoint http://127.0.0.1:"
    ) in missing.stderr
    assert "check the bucket name, AWS_ENDPOINT_URL and AWS_REGION" in missing.stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123")
    denied = export("--run", s3_run, "--out", s3.uri("models", "x"))
    assert denied.returncode == 1 and "Traceback" not in denied.stderr
    assert f"error: {s3.uri('models', 'x')}: access denied by endpoint" in denied.stderr
    assert "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in denied.stderr
    assert "wrong-secret-0123" not in denied.stderr


def test_exported_table_files_on_s3_are_the_checksummed_ones(s3, run):
    out = s3.uri("models", "edge")
    manifest = export_run(run, out, log=None)
    path = manifest.table_path("user")
    data = storage.read_bytes(storage.join(out, path))
    assert hashlib.sha256(data).hexdigest() == manifest.files[path].sha256


def test_the_staging_directory_of_a_remote_export_is_under_tmpdir(s3, run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module.tempfile, "tempdir", str(tmp_path))
    export_run(run, s3.uri("models", "edge"), log=None)
    assert list(tmp_path.iterdir()) == []  # staged there, uploaded, removed
