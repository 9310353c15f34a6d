"""trainer.publish and ``trainer.export --repository``: upload, verification with the service's
loader, the pointer moved last and only for a verified version, retention; local and S3."""

from __future__ import annotations

import pytest

from schemas import storage
from schemas.repository import Change, ModelRepository, VersionState
from serving.artifact import load_artifact
from serving.smoke import smoke_check
from tests.serving.artifacts import truncated_copy
from trainer import publish as publish_module
from trainer.export import export_run, main
from trainer.publish import PublishError, publish, verify_version


def test_publish_uploads_verifies_and_makes_the_version_current(exports, repository):
    lines: list[str] = []
    first = publish(exports["a"], repository, log=lines.append)
    assert first.version == exports["version_a"] and first.uploaded
    assert first.pointer.version == first.version and first.pointer.change is Change.PUBLISH
    assert any("is current in" in line for line in lines)
    second = publish(exports["b"], repository, log=None)
    repo = ModelRepository(repository)
    pointer = repo.read_pointer().pointer
    assert (pointer.version, pointer.previous) == (second.version, first.version)
    assert {i.version: i.state for i in repo.versions()} == {
        first.version: VersionState.READY,
        second.version: VersionState.READY,
    }
    # What was stored is what was exported, byte for byte.
    for name in (exports["a"] / "manifest.json", exports["a"] / "schema.yaml"):
        stored = repo.version_location(first.version).join(name.name)
        assert storage.read_bytes(stored) == name.read_bytes()
    assert verify_version(repo, second.version).version == second.version


def test_publishing_the_same_export_again_uploads_nothing(exports, repository):
    publish(exports["a"], repository, log=None)
    publish(exports["b"], repository, log=None)
    again = publish(exports["a"], repository, log=None)
    assert not again.uploaded and again.pointer.version == exports["version_a"]
    assert again.pointer.previous == exports["version_b"]


def test_a_corrupt_version_is_rejected_and_never_current(exports, repository, tmp_path):
    publish(exports["a"], repository, log=None)
    broken = truncated_copy(exports["b"], tmp_path / "broken")
    with pytest.raises(PublishError) as err:
        publish(broken, repository, log=None)
    message = str(err.value)
    assert f"version {exports['version_b']} failed verification and was not made current" in message
    assert "marked rejected in" in message and "checksum mismatch" in message
    repo = ModelRepository(repository)
    assert repo.current() == exports["version_a"]
    info = repo.version_info(exports["version_b"])
    assert info.state is VersionState.REJECTED and "checksum mismatch" in info.detail
    # Publishing the good export of that version again replaces the rejected one.
    assert publish(exports["b"], repository, log=None).uploaded
    assert repo.current() == exports["version_b"]


def test_a_version_whose_scores_are_not_probabilities_is_rejected(exports, tmp_path, monkeypatch):
    def no_scores(artifact):
        raise publish_module.ArtifactError(f"{artifact.path}: synthetic row 0 scored pctr=nan")

    monkeypatch.setattr(publish_module, "smoke_check", no_scores)
    with pytest.raises(PublishError, match="failed verification .* scored pctr=nan"):
        publish(exports["a"], tmp_path / "repo", log=None)
    assert ModelRepository(tmp_path / "repo").current() is None


def test_a_publisher_never_overwrites_a_change_made_while_it_verified(
    exports, repository, tmp_path, monkeypatch
):
    publish(exports["a"], repository, log=None)
    repo = ModelRepository(repository)
    repo.upload(exports["b"])  # ready, not current
    real_verify = publish_module.verify_version

    def meanwhile(repo_, version):  # an operator promotes b while this publish verifies
        repo.promote(exports["version_b"])
        return real_verify(repo_, version)

    monkeypatch.setattr(publish_module, "verify_version", meanwhile)
    export_run(exports["run"], tmp_path / "c", version="c-new", log=None)
    with pytest.raises(PublishError) as err:
        publish(tmp_path / "c", repository, log=None)
    message = str(err.value)
    assert "version c-new is published and verified but not current" in message
    assert f"now {exports['version_b']}" in message
    assert f"python -m trainer.models promote c-new --repository {repo.uri}" in message
    assert repo.current() == exports["version_b"]
    assert repo.version_info("c-new").state is VersionState.READY


def test_retention_keeps_the_newest_and_the_current_and_previous(exports, tmp_path):
    repository = tmp_path / "repo"
    deleted = []
    for i in range(4):
        out = tmp_path / f"export{i}"
        export_run(exports["run"], out, version=f"day{i}", log=None)
        deleted += publish(out, repository, keep=2, log=None).deleted
    assert deleted == ["day0", "day1"]
    remaining = [i.version for i in ModelRepository(repository).versions()]
    assert remaining == ["day3", "day2"]


def test_the_export_command_publishes_to_a_repository(exports, repository, capsys):
    assert main(["--run", str(exports["run"]), "--repository", repository, "--keep", "3"]) == 0
    out = capsys.readouterr().out
    assert "[export] wrote" in out and "is current in" in out
    repo = ModelRepository(repository)
    current = repo.current()
    assert current is not None and current.startswith("run-step00000007-")
    assert verify_version(repo, current).source.step == 7


def test_the_export_command_refuses_ambiguous_targets(exports, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--run", str(exports["run"]), "--out", str(tmp_path / "m"), "--repository", "r"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", str(exports["run"]), "--repository", str(tmp_path / "r"), "--force"])
    assert "--force applies to --out" in capsys.readouterr().err
    assert main(["--run", str(exports["run"]), "--repository", str(tmp_path), "--keep", "0"]) == 1
    assert "--keep must be at least 1" in capsys.readouterr().err


def test_smoke_check_scores_synthetic_rows_of_the_schema(exports):
    scores = smoke_check(load_artifact(exports["a"]))
    assert scores.shape == (16, 3) and ((scores >= 0) & (scores <= 1)).all()
