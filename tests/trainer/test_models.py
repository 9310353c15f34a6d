"""``python -m trainer.models``: list, promote, rollback and current over a model repository, with
clear errors for an unknown version, an empty repository and a version that fails verification."""

from __future__ import annotations

import json

import pytest

from schemas import storage
from schemas.repository import Change, ModelRepository
from tests.serving.artifacts import truncated_copy
from trainer.models import main
from trainer.publish import PublishError, publish


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def two_versions(exports, repository) -> ModelRepository:
    """A repository where b is current and a the previous version."""
    publish(exports["a"], repository, log=None)
    publish(exports["b"], repository, log=None)
    return ModelRepository(repository)


def test_list_shows_versions_roles_and_metrics(exports, two_versions, capsys):
    repo = two_versions
    code, out, _ = run(capsys, "list", "--repository", repo.uri)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"repository {repo.uri}: current {exports['version_b']}")
    assert f"previous {exports['version_a']}" in lines[0]
    assert lines[1].split() == ["version", "state", "created", "(UTC)", "step", "ctr_auc",
                                "cvr_auc", "ctcvr_auc", "role"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows[exports["version_b"]][-1] == "current"
    assert rows[exports["version_a"]][-1] == "previous"
    assert rows[exports["version_a"]][1] == "ready" and "0.6100" in rows[exports["version_a"]]
    code, out, _ = run(capsys, "list", "--repository", repo.uri, "--json")
    listing = json.loads(out)
    assert listing["pointer"]["version"] == exports["version_b"]
    assert [v["role"] for v in listing["versions"]] == ["current", "previous"]
    assert listing["versions"][0]["metrics"]["ctr_auc"] == pytest.approx(0.61)


def test_list_of_an_empty_repository(tmp_path, capsys):
    assert run(capsys, "list", "--repository", str(tmp_path / "none"))[:2] == (
        0,
        f"repository {tmp_path / 'none'} is empty\n",
    )


def test_rollback_then_promote(exports, two_versions, capsys):
    repo = two_versions
    code, out, _ = run(capsys, "rollback", "--repository", repo.uri)
    assert code == 0
    assert f"rolled back from {exports['version_b']} to {exports['version_a']}" in out
    pointer = repo.read_pointer().pointer
    assert (pointer.version, pointer.change) == (exports["version_a"], Change.ROLLBACK)
    code, _, err = run(capsys, "rollback", "--repository", repo.uri)
    assert code == 1 and f"no earlier version to roll back to from {exports['version_a']}" in err
    code, out, _ = run(capsys, "promote", exports["version_b"], "--repository", repo.uri)
    assert code == 0 and f"promoted {exports['version_b']}" in out
    assert repo.current() == exports["version_b"]
    code, out, _ = run(capsys, "promote", exports["version_b"], "--repository", repo.uri)
    assert code == 0 and "is current already" in out


def test_promote_refuses_unknown_rejected_and_corrupt_versions(
    exports, two_versions, tmp_path, capsys
):
    repo = two_versions
    code, _, err = run(capsys, "promote", "nope", "--repository", repo.uri)
    assert code == 1 and "error: no version 'nope' in repository" in err
    assert exports["version_a"] in err  # the message lists what there is
    rejected = truncated_copy(exports["a"], tmp_path / "bad")
    (rejected / "manifest.json").write_text(
        (rejected / "manifest.json").read_text().replace(exports["version_a"], "bad-version")
    )
    with pytest.raises(PublishError, match="failed verification"):
        publish(rejected, repo.uri, log=None)
    code, _, err = run(capsys, "promote", "bad-version", "--repository", repo.uri)
    assert code == 1 and "bad-version" in err and "was rejected: it failed verification" in err
    # A version corrupted in the store after it was published (so not marked) fails the
    # verification of promote, and the pointer stays.
    version_a = repo.version_location(exports["version_a"])
    table = version_a.join(repo.read_ready(exports["version_a"]).manifest.table_path("user"))
    storage.write_bytes(table, storage.read_bytes(table)[:50])
    code, _, err = run(capsys, "promote", exports["version_a"], "--repository", repo.uri)
    assert code == 1 and "checksum mismatch" in err
    assert repo.current() == exports["version_b"]
    code, _, err = run(capsys, "rollback", "--repository", repo.uri)
    assert code == 1 and "checksum mismatch" in err
    assert repo.current() == exports["version_b"]


def test_commands_on_an_empty_repository(tmp_path, capsys):
    empty = str(tmp_path / "empty")
    code, _, err = run(capsys, "rollback", "--repository", empty)
    assert code == 1 and "is empty: there is nothing to roll back" in err
    code, _, err = run(capsys, "current", "--repository", empty)
    assert code == 1 and "is empty: no version was published to it" in err
    assert run(capsys, "current", "--repository", empty, "--allow-empty") == (0, "", "")
    code, _, err = run(capsys, "promote", "v1", "--repository", empty)
    assert code == 1 and "(it is empty)" in err


def test_current_prints_the_version_or_its_uri(exports, two_versions, capsys):
    repo = two_versions
    assert run(capsys, "current", "--repository", repo.uri)[1] == exports["version_b"] + "\n"
    uri = run(capsys, "current", "--repository", repo.uri, "--uri")[1].strip()
    assert uri == repo.version_location(exports["version_b"]).uri
    assert storage.is_file(storage.join(uri, "manifest.json"))


def test_a_storage_fault_is_an_error_message(s3, monkeypatch, capsys):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with s3.server.stopped():
        code, _, err = run(capsys, "list", "--repository", s3.uri("models"))
    assert code == 1 and "unreachable" in err and "AWS_ENDPOINT_URL" in err
