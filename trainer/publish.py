"""Publish an exported model to a model repository: upload, verify, then move the pointer.

``python -m trainer.export --run RUN --repository REPO [--keep K]`` exports the run into a local
temporary directory and calls :func:`publish`, which

1. reads the pointer (the base of the optimistic check in step 4);
2. uploads the model directory as ``REPO/<version>/``, its manifest last (the version id is the
   manifest's: ``<run>-step<N>-<content hash>``, or ``--version``);
3. verifies it as the service will load it (:func:`verify_version`): every file read back from
   the store with its checksum checked, the service's own loader (``serving.artifact``), and a
   scoring smoke check on synthetic rows (``serving.smoke``: finite scores in [0, 1]). A version
   that fails is marked rejected (``rejected.json`` in its directory, kept for inspection,
   deleted by retention later) and never becomes current;
4. makes it current by a compare-and-swap of the pointer against the pointer read in step 1: if
   another publisher, a promote or a rollback moved it meanwhile, nothing is overwritten and the
   new version stays published but not current (:class:`PublishError` says how to promote it);
5. deletes old versions, keeping the ``keep`` newest, the current and the previous ones
   (``ModelRepository.prune``).

Publishing a version that is already in the repository (the same run and checkpoint exported
again) uploads nothing; it is verified and made current like a new one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import storage
from schemas.artifact import MANIFEST_FILE, Manifest
from schemas.repository import (
    Change,
    ModelRepository,
    Pointer,
    PointerConflict,
    RepositoryError,
    VersionState,
)
from schemas.storage import StorageError
from serving.artifact import ArtifactError, load_artifact
from serving.smoke import smoke_check

__all__ = [
    "DEFAULT_KEEP",
    "PublishError",
    "Published",
    "VerificationError",
    "publish",
    "verify_version",
]

DEFAULT_KEEP = 5


class PublishError(RuntimeError):
    """The version was not made current; the message says why and what state it is in."""


class VerificationError(RuntimeError):
    """A version of a repository that must not be served; the message names the problem."""


@dataclass(frozen=True)
class Published:
    """The outcome of :func:`publish`.

    Attributes:
        version: the version id.
        pointer: the repository's pointer, naming ``version``.
        uploaded: False when the version was in the repository already.
        deleted: versions deleted by retention.
    """

    version: str
    pointer: Pointer
    uploaded: bool
    deleted: tuple[str, ...]


def publish(
    model_dir: str | os.PathLike[str],
    repository: str | os.PathLike[str],
    *,
    keep: int = DEFAULT_KEEP,
    log: Any = print,
) -> Published:
    """Publish an exported model directory as the repository's current version.

    Args:
        model_dir: a local model directory written by ``trainer.export``.
        repository: the repository (a path or a URI); created by the first publish.
        keep: how many of the newest ready versions retention keeps (at least 1).
        log: where progress lines go (``print``; ``None`` for silence).

    Returns:
        What was published.

    Raises:
        PublishError: the version failed verification (marked rejected), another writer moved
            the pointer meanwhile, the version id is taken by another model, or a storage fault.
    """
    say = log or (lambda *_: None)
    if keep < 1:
        raise PublishError(f"--keep must be at least 1, got {keep}")
    repo = ModelRepository(repository)
    try:
        base = repo.read_pointer()
        version, uploaded = _upload(repo, Path(model_dir))
        say(f"[publish] {'uploaded' if uploaded else 'found'} {repo.version_location(version)}")
    except (RepositoryError, StorageError) as err:
        raise PublishError(f"cannot publish to {repo.uri}: {err}") from None
    try:
        verify_version(repo, version)
    except VerificationError as err:
        what = _reject(repo, version, str(err))
        raise PublishError(
            f"version {version} failed verification and was not made current ({what}): {err}"
        ) from None
    except StorageError as err:
        raise PublishError(
            f"version {version} is uploaded but could not be verified, so it is not current: "
            f"{err}; publish again once the store answers"
        ) from None
    try:
        pointer = repo.promote(version, base=base, change=Change.PUBLISH)
    except PointerConflict as err:
        raise PublishError(
            f"version {version} is published and verified but not current: {err}. To serve it: "
            f"python -m trainer.models promote {version} --repository {repo.uri}"
        ) from None
    except (RepositoryError, StorageError) as err:
        raise PublishError(f"version {version} was not made current: {err}") from None
    say(
        f"[publish] {version} is current in {repo.uri} (generation {pointer.generation}, "
        f"previous {pointer.previous or 'none'})"
    )
    try:
        deleted = tuple(repo.prune(keep))
    except (RepositoryError, StorageError) as err:  # the version is current: only say so
        say(f"[publish] retention failed, no version deleted: {err}")
        deleted = ()
    if deleted:
        say(f"[publish] deleted {len(deleted)} old version(s): {', '.join(deleted)}")
    return Published(version=version, pointer=pointer, uploaded=uploaded, deleted=deleted)


def verify_version(repository: ModelRepository, version: str) -> Manifest:
    """Check a version as a replica will load it.

    Every file is read back from the store and its sha256 and size checked against the manifest
    (for a repository named by a URI, by downloading it into a temporary directory), then the
    service's loader builds the model from it (checksums again, schema, tensor names, shapes,
    finiteness, a probe row) and scores synthetic rows of its schema, each score a finite
    probability.

    Returns:
        The version's manifest.

    Raises:
        VerificationError: the version is not ready, or any check fails (named).
        StorageError: a storage fault (the version's fault is unknown then).
    """
    try:
        ready = repository.read_ready(version)
        with tempfile.TemporaryDirectory(prefix="ctcvr-verify-") as tmp:
            if repository.is_local:
                local = Path(repository.version_location(version).path)
            else:
                local = Path(tmp) / version
                repository.download(ready, local)
            smoke_check(load_artifact(local))
    except (RepositoryError, ArtifactError) as err:
        raise VerificationError(str(err)) from None
    return ready.manifest


def _upload(repo: ModelRepository, model_dir: Path) -> tuple[str, bool]:
    """Upload ``model_dir`` unless the repository has its version already; the version id and
    whether it was uploaded."""
    try:
        manifest = Manifest.model_validate_json((model_dir / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError) as err:
        raise RepositoryError(
            f"{model_dir / MANIFEST_FILE}: not a model directory written by trainer.export ({err})"
        ) from None
    if not storage.exists(repo.version_location(manifest.version)):
        return repo.upload(model_dir), True
    info = repo.version_info(manifest.version)
    if info.state is VersionState.READY and info.manifest is not None:
        if info.manifest.files != manifest.files:
            raise RepositoryError(
                f"version {manifest.version} is already in {repo.uri} with other files: give "
                "this export another version id (--version)"
            )
        return manifest.version, False
    # A failed earlier attempt (incomplete, rejected or invalid): replaced by this one.
    repo.delete_version(manifest.version)
    return repo.upload(model_dir), True


def _reject(repo: ModelRepository, version: str, reason: str) -> str:
    """Mark ``version`` rejected; what became of it, for the error message."""
    try:
        repo.mark_rejected(version, reason)
    except StorageError as err:
        return f"it could not be marked rejected ({err}); it is not current all the same"
    return f"marked rejected in {repo.version_location(version)}"
