"""schemas.repository: versions, the pointer's compare-and-swap, rollback and retention, on the
local disk and on a real S3 server (no torch: model directories here are files with a valid
manifest; loading them is tested in tests/trainer/test_publish.py and tests/serving)."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import storage
from schemas.artifact import DENSE_FILE, MANIFEST_FILE, SCHEMA_FILE, Manifest, table_file
from schemas.repository import (
    INCOMPLETE_GRACE,
    POINTER_FILE,
    REJECTED_FILE,
    VERSION_PATTERN,
    Change,
    ModelRepository,
    PointerConflict,
    RepositoryError,
    VersionState,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def model_dir(root: Path, version: str, day: int = 0, payload: bytes = b"") -> Path:
    """A directory laid out as trainer.export writes one (files of arbitrary bytes)."""
    out = root / version
    contents = {
        SCHEMA_FILE: b"name: fake\n",
        DENSE_FILE: b"dense" + payload + version.encode(),
        table_file("t"): b"table" + payload + version.encode() * 50,
    }
    for name, data in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    manifest = {
        "format_version": 1,  # one file per table, as laid out above
        "version": version,
        "created_at": (T0 + timedelta(days=day)).isoformat(),
        "source": {"run_dir": "runs/x", "checkpoint": "step_1", "step": day, "objective": "esmm"},
        "schema_fingerprint": "0" * 64,
        "model": {
            "num_experts": 1,
            "expert_sizes": [2],
            "tables": [{"name": "t", "num_rows": 3, "dim": 2, "pooling": "sum", "features": ["f"]}],
        },
        "metrics": {"ctr_auc": 0.5 + day / 100},
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in contents.items()
        },
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


@pytest.fixture(params=["local", "s3"])
def repo(request, tmp_path) -> ModelRepository:
    if request.param == "local":
        return ModelRepository(tmp_path / "repo")
    s3 = request.getfixturevalue("s3")
    return ModelRepository(s3.uri("models"))


def publish(repo: ModelRepository, tmp_path: Path, version: str, day: int) -> str:
    uploaded = repo.upload(model_dir(tmp_path / "exports", version, day))
    repo.promote(uploaded, change=Change.PUBLISH)
    return uploaded


def test_the_version_pattern_is_the_manifests():
    assert Manifest.model_json_schema()["properties"]["version"]["pattern"] == VERSION_PATTERN


def test_an_empty_repository(repo):
    assert repo.read_pointer().pointer is None and repo.current() is None
    assert repo.versions() == []
    with pytest.raises(RepositoryError, match="is empty: there is nothing to roll back"):
        repo.rollback()
    with pytest.raises(RepositoryError, match=r"no version 'v1' in repository .* \(it is empty\)"):
        repo.promote("v1")


def test_upload_promote_and_list(repo, tmp_path):
    publish(repo, tmp_path, "v1", day=1)
    publish(repo, tmp_path, "v2", day=2)
    pointer = repo.read_pointer().pointer
    assert (pointer.version, pointer.previous, pointer.generation) == ("v2", "v1", 2)
    assert pointer.change is Change.PUBLISH
    infos = repo.versions()
    assert [(i.version, i.state) for i in infos] == [
        ("v2", VersionState.READY),
        ("v1", VersionState.READY),
    ]
    assert infos[0].manifest.metrics == {"ctr_auc": 0.52}
    with pytest.raises(
        RepositoryError, match=r"no version 'v9' .*\(versions, newest first: v2, v1\)"
    ):
        repo.version_info("v9")
    with pytest.raises(RepositoryError, match="already in"):
        repo.upload(model_dir(tmp_path / "again", "v1", day=1))
    with pytest.raises(RepositoryError, match="is not a version id"):
        repo.version_location("../etc")
    with pytest.raises(RepositoryError, match="names the pointer file"):
        repo.version_location(POINTER_FILE)


def test_a_version_is_incomplete_until_its_manifest_is_written(repo, tmp_path):
    source = model_dir(tmp_path / "exports", "v1")
    location = repo.version_location("v1")
    storage.upload_file(source / DENSE_FILE, location.join(DENSE_FILE))
    (info,) = repo.versions()
    assert info.state is VersionState.INCOMPLETE and info.modified is not None
    with pytest.raises(RepositoryError, match="is incomplete: it has no manifest"):
        repo.promote("v1")


def test_a_rejected_version_cannot_be_promoted_and_says_why(repo, tmp_path):
    repo.upload(model_dir(tmp_path / "exports", "v1"))
    repo.mark_rejected("v1", "checksum mismatch for weights/dense.safetensors")
    assert storage.exists(repo.version_location("v1").join(REJECTED_FILE))
    (info,) = repo.versions()
    assert info.state is VersionState.REJECTED and "checksum mismatch" in info.detail
    with pytest.raises(RepositoryError, match="was rejected: it failed verification"):
        repo.promote("v1")
    assert repo.current() is None


def test_a_manifest_naming_another_version_is_invalid(repo, tmp_path):
    source = model_dir(tmp_path / "exports", "v1")
    location = repo.version_location("v2")
    storage.upload_file(source / MANIFEST_FILE, location.join(MANIFEST_FILE))
    (info,) = repo.versions()
    assert info.state is VersionState.INVALID and "names version 'v1'" in info.detail


def test_promote_and_rollback_walk_the_history(repo, tmp_path):
    for day, version in enumerate(["v1", "v2", "v3"]):
        publish(repo, tmp_path, version, day)
    pointer = repo.rollback()
    assert (pointer.version, pointer.history, pointer.change) == ("v2", ("v1",), Change.ROLLBACK)
    assert repo.rollback().version == "v1"  # an undo stack: one further back each time
    with pytest.raises(RepositoryError, match="no earlier version to roll back to from v1"):
        repo.rollback()
    pointer = repo.promote("v3")
    assert (pointer.version, pointer.history) == ("v3", ("v1",))
    assert repo.promote("v3") == pointer  # already current: nothing changes
    assert repo.read_pointer().pointer.generation == pointer.generation == 6


def test_rollback_skips_deleted_and_rejected_versions(repo, tmp_path):
    for day, version in enumerate(["v1", "v2", "v3", "v4"]):
        publish(repo, tmp_path, version, day)
    repo.mark_rejected("v2", "bad")
    storage.delete_tree(repo.version_location("v3"))  # deleted by hand
    assert repo.rollback_target() == "v1"
    pointer = repo.rollback()
    assert (pointer.version, pointer.history) == ("v1", ())


def test_the_pointer_is_a_compare_and_swap(repo, tmp_path):
    publish(repo, tmp_path, "v1", day=1)
    repo.upload(model_dir(tmp_path / "exports", "v2", day=2))
    repo.upload(model_dir(tmp_path / "exports", "v3", day=3))
    base = repo.read_pointer()  # two writers read the same pointer
    repo.promote("v2", base=base)
    with pytest.raises(PointerConflict, match=r"named v1 when read, now v2\): v3 was not made"):
        repo.promote("v3", base=base)
    assert repo.current() == "v2"


def test_concurrent_writers_never_lose_an_update(repo, tmp_path):
    """Writers that each read the pointer and move it: every move either lands on the pointer it
    read (generations grow by one per success) or fails with a conflict; none is lost."""
    versions = [f"v{i}" for i in range(6)]
    for day, version in enumerate(versions):
        repo.upload(model_dir(tmp_path / "exports", version, day))
    repo.promote("v0")
    outcomes: list[str] = []
    barrier = threading.Barrier(len(versions) - 1)

    def writer(version: str) -> None:
        base = repo.read_pointer()
        barrier.wait()
        try:
            repo.promote(version, base=base)
            outcomes.append("moved")
        except PointerConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("moved") == 1 and outcomes.count("conflict") == len(versions) - 2
    assert repo.read_pointer().pointer.generation == 2


def test_creating_the_pointer_is_guarded_too(repo, tmp_path):
    repo.upload(model_dir(tmp_path / "exports", "v1"))
    repo.upload(model_dir(tmp_path / "exports", "v2"))
    empty = repo.read_pointer()
    repo.promote("v1", base=empty)
    with pytest.raises(PointerConflict, match="named no version when read, now v1"):
        repo.promote("v2", base=empty)


def test_prune_keeps_the_newest_and_the_current_and_previous(repo, tmp_path):
    for day, version in enumerate(["v1", "v2", "v3", "v4", "v5", "v6"]):
        publish(repo, tmp_path, version, day)
    repo.rollback()  # current v5, previous v4
    repo.rollback()  # current v4, previous v3
    repo.rollback()  # current v3, previous v2
    deleted = repo.prune(keep=2)  # newest ready: v6, v5
    assert sorted(deleted) == ["v1", "v4"]
    assert [i.version for i in repo.versions()] == ["v6", "v5", "v3", "v2"]
    assert not storage.exists(repo.version_location("v1"))
    with pytest.raises(RepositoryError, match="keep must be at least 1"):
        repo.prune(keep=0)


def test_prune_keeps_recent_failures_and_uploads_in_progress(repo, tmp_path):
    for day, version in enumerate(["v1", "v2", "v3"]):
        publish(repo, tmp_path, version, day)
    repo.upload(model_dir(tmp_path / "exports", "bad-old", day=0))
    repo.mark_rejected("bad-old", "old failure")
    repo.upload(model_dir(tmp_path / "exports", "bad-new", day=5))
    repo.mark_rejected("bad-new", "new failure")
    source = model_dir(tmp_path / "exports", "partial")
    storage.upload_file(source / DENSE_FILE, repo.version_location("partial").join(DENSE_FILE))
    assert sorted(repo.prune(keep=2)) == ["bad-old", "v1"]  # v3 current, v2 previous and kept
    assert {i.version for i in repo.versions()} == {"v3", "v2", "bad-new", "partial"}
    later = datetime.now(UTC) + INCOMPLETE_GRACE + timedelta(minutes=1)
    assert repo.prune(keep=2, now=later) == ["partial"]


def test_delete_version_refuses_the_current_and_previous(repo, tmp_path):
    publish(repo, tmp_path, "v1", day=1)
    publish(repo, tmp_path, "v2", day=2)
    with pytest.raises(RepositoryError, match="is the current one"):
        repo.delete_version("v2")
    with pytest.raises(RepositoryError, match="is the previous one"):
        repo.delete_version("v1")


def test_download_checks_every_file_against_the_manifest(repo, tmp_path):
    publish(repo, tmp_path, "v1", day=1)
    manifest = repo.download(repo.read_ready("v1"), tmp_path / "copy")
    for name in manifest.files:
        assert (tmp_path / "copy" / name).read_bytes() == (
            tmp_path / "exports" / "v1" / name
        ).read_bytes()
    table = repo.version_location("v1").join(table_file("t"))
    storage.write_bytes(table, storage.read_bytes(table)[:-7])  # truncated in the store
    with pytest.raises(RepositoryError, match=r"checksum mismatch for .*t\.safetensors.*truncated"):
        repo.download(repo.read_ready("v1"), tmp_path / "copy2")


def test_a_pointer_file_that_is_not_a_pointer_is_named(repo):
    storage.write_text(repo.root.join(POINTER_FILE), '{"version": "v1"}')
    with pytest.raises(RepositoryError, match=r"CURRENT is not a ctcvr repository pointer"):
        repo.read_pointer()


def test_a_storage_fault_is_a_storage_error(s3):
    repo = ModelRepository("s3://no-such-bucket-for-ctcvr/models")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-for-ctcvr' does not"):
        repo.read_pointer()
