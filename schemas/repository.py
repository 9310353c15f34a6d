"""The model repository: the published versions of a model and the pointer every replica follows.

No torch here: the trainer (``trainer.export --repository``, ``python -m trainer.models``) and the
service (``serving.repository``) share this module. A repository is a directory, a local path or
any URI of :mod:`schemas.storage` (``s3://bucket/models``)::

    REPOSITORY/
      CURRENT                 the pointer (JSON): the version to serve and the ones served before
      <version>/              a model directory (schemas.artifact), named by its manifest's version
        manifest.json         written last: a version without one is incomplete
        rejected.json         written when the version failed verification (kept for inspection)
        schema.yaml, weights/...

**The pointer** (:class:`Pointer`) names the current version, the versions that were current
before it (most recent first; :attr:`Pointer.previous` is the first of them), a generation that
grows by one at every change, and what the change was. It is one small file, so a reader sees
the old pointer or the new one, never a mix. It is only ever moved by a compare-and-swap against
the exact bytes its writer read (:func:`schemas.storage.write_bytes_if`: a lock locally, a
conditional PUT on S3), so of two writers that read the same pointer the second one gets a
:class:`PointerConflict` instead of silently undoing the first one's change.

**Versions** are written once. A version is :attr:`~VersionState.READY` (a manifest, not
rejected), :attr:`~VersionState.REJECTED` (it failed verification: ``rejected.json`` says why;
it never becomes current and cannot be promoted), :attr:`~VersionState.INCOMPLETE` (no manifest
yet: an upload in progress, or one that failed) or :attr:`~VersionState.INVALID` (a manifest this
code cannot read, or one naming another version).

**Retention** (:meth:`ModelRepository.prune`): the ``keep`` newest ready versions stay, and the
current and the previous versions whatever their age. Rejected and invalid versions stay while
they are newer than the oldest ready version kept (recent failures, for inspection), incomplete
ones for :data:`INCOMPLETE_GRACE` after their last write (an upload may be in progress). The rest
is deleted, each version's manifest first, so that nothing loads a half-deleted version.

Example::

    repo = ModelRepository("s3://ml/models/ctcvr")
    base = repo.read_pointer()              # what the pointer held before this change
    version = repo.upload(Path("exported"))  # manifest last
    ...                                     # verify the version (trainer.publish)
    repo.promote(version, base=base, change=Change.PUBLISH)
    repo.prune(keep=5)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, unique
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import storage
from schemas.artifact import MANIFEST_FILE, Manifest
from schemas.storage import Location, StorageError, WriteConflict

__all__ = [
    "INCOMPLETE_GRACE",
    "MAX_HISTORY",
    "POINTER_FILE",
    "REJECTED_FILE",
    "VERSION_PATTERN",
    "Change",
    "ModelRepository",
    "Pointer",
    "PointerConflict",
    "PointerState",
    "ReadyVersion",
    "Rejection",
    "RepositoryError",
    "VersionInfo",
    "VersionState",
]

POINTER_FILE = "CURRENT"
REJECTED_FILE = "rejected.json"
POINTER_FORMAT = "ctcvr-repository-pointer"
MAX_HISTORY = 20  # versions remembered for rollback, most recent first
INCOMPLETE_GRACE = timedelta(days=1)  # an incomplete version younger than this may be uploading
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"  # the manifest's version ids
_VERSION = re.compile(VERSION_PATTERN)
_CHUNK_BYTES = 4 * 2**20

VersionId = Annotated[str, Field(pattern=VERSION_PATTERN)]


class RepositoryError(ValueError):
    """The repository cannot do what was asked; the message names the repository and why."""


class PointerConflict(RepositoryError):
    """The pointer changed between reading it and writing it: another writer moved it."""


@unique
class Change(str, Enum):
    """What moved the pointer."""

    PUBLISH = "publish"  # trainer.export --repository made a new version current
    PROMOTE = "promote"  # python -m trainer.models promote
    ROLLBACK = "rollback"  # python -m trainer.models rollback


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Pointer(_Frozen):
    """``CURRENT``: the version every replica serves, and the ones served before it."""

    format: Literal["ctcvr-repository-pointer"] = POINTER_FORMAT
    version: VersionId
    history: tuple[VersionId, ...] = Field(
        default=(), max_length=MAX_HISTORY, description="earlier current versions, newest first"
    )
    generation: int = Field(ge=1, description="grows by one at every change")
    updated_at: datetime
    change: Change

    @property
    def previous(self) -> str | None:
        """The version that was current before this one (where a rollback goes)."""
        return self.history[0] if self.history else None


class Rejection(_Frozen):
    """``rejected.json``: why a version failed verification."""

    reason: str
    rejected_at: datetime


@dataclass(frozen=True)
class PointerState:
    """The pointer as read, with its exact bytes (what a compare-and-swap compares against).

    Attributes:
        pointer: the pointer; None in an empty repository.
        raw: its bytes; None when there is no pointer file.
    """

    pointer: Pointer | None
    raw: bytes | None

    @property
    def version(self) -> str | None:
        return self.pointer.version if self.pointer is not None else None


@dataclass(frozen=True)
class ReadyVersion:
    """A version that may be served, as read (:meth:`ModelRepository.read_ready`).

    Attributes:
        version: its id.
        manifest: its manifest.
        raw: the manifest's exact bytes (what a copy writes, and a cache key).
    """

    version: str
    manifest: Manifest
    raw: bytes


@unique
class VersionState(str, Enum):
    READY = "ready"  # complete and not rejected: may be served
    REJECTED = "rejected"  # failed verification; never current
    INCOMPLETE = "incomplete"  # no manifest: being uploaded, or its upload failed
    INVALID = "invalid"  # a manifest that cannot be read, or that names another version


@dataclass(frozen=True)
class VersionInfo:
    """One version directory of a repository.

    Attributes:
        version: its name (the manifest's version id).
        state: see :class:`VersionState`.
        manifest: the manifest, when it could be read.
        detail: why it is rejected or invalid.
        modified: when its newest file was written (versions without a readable manifest).
    """

    version: str
    state: VersionState
    manifest: Manifest | None = None
    detail: str | None = None
    modified: datetime | None = None

    @property
    def time(self) -> datetime | None:
        """When it was made: the manifest's creation time, else its newest file's."""
        return self.manifest.created_at if self.manifest is not None else self.modified


class ModelRepository:
    """A model repository at a local path or URI (see the module docstring).

    Args:
        uri: the repository directory; it need not exist yet (it is empty then).

    Raises:
        StorageError: not a usable path or URI.
    """

    def __init__(self, uri: storage.UriLike) -> None:
        self.root: Location = storage.resolve(uri)

    def __repr__(self) -> str:
        return f"ModelRepository({self.root.uri!r})"

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def is_local(self) -> bool:
        """On this machine's disk: versions can be loaded where they are."""
        return self.root.is_local

    @property
    def pointer_location(self) -> Location:
        return self.root.join(POINTER_FILE)

    def version_location(self, version: str) -> Location:
        """Where ``version`` lives.

        Raises:
            RepositoryError: ``version`` is not a version id.
        """
        if not isinstance(version, str) or not _VERSION.match(version):
            raise RepositoryError(
                f"{version!r} is not a version id (letters, digits, '.', '_', '-'; at most 128)"
            )
        if version == POINTER_FILE:
            raise RepositoryError(
                f"{version!r} names the pointer file; give the version another id"
            )
        return self.root.join(version)

    # Reading ------------------------------------------------------------------------------------

    def read_pointer(self) -> PointerState:
        """The pointer and its bytes (both None in an empty repository).

        Raises:
            RepositoryError: the pointer file is not a pointer.
            StorageError: a storage fault.
        """
        location = self.pointer_location
        try:
            raw = storage.read_bytes(location)
        except StorageError:
            if storage.kind(location) is None:
                return PointerState(None, None)
            raise
        try:
            return PointerState(Pointer.model_validate_json(raw), raw)
        except ValidationError as err:
            raise RepositoryError(
                f"{location} is not a ctcvr repository pointer: {_first_error(err)}"
            ) from None

    def current(self) -> str | None:
        """The current version, or None in an empty repository."""
        return self.read_pointer().version

    def versions(self) -> list[VersionInfo]:
        """Every version directory, newest first (an absent repository has none).

        Raises:
            StorageError: a storage fault.
        """
        if storage.kind(self.root) is not storage.Kind.DIRECTORY:
            return []
        names = [
            entry.name
            for entry in storage.list_dir(self.root)
            if entry.kind is storage.Kind.DIRECTORY and _VERSION.match(entry.name)
        ]
        infos = [self._inspect(name)[0] for name in names]
        oldest = datetime.min.replace(tzinfo=UTC)
        return sorted(infos, key=lambda i: (i.time or oldest, i.version), reverse=True)

    def version_info(self, version: str) -> VersionInfo:
        """One version.

        Raises:
            RepositoryError: no such version (the message lists the ones there are).
        """
        return self._inspect(version)[0]

    def read_ready(self, version: str) -> ReadyVersion:
        """A version that may be served: its manifest and the manifest's bytes.

        Raises:
            RepositoryError: no such version, or it is rejected, incomplete or invalid.
        """
        info, raw = self._inspect(version)
        if info.state is VersionState.READY and info.manifest is not None and raw is not None:
            return ReadyVersion(version, info.manifest, raw)
        why = {
            VersionState.REJECTED: f"was rejected: it failed verification ({info.detail})",
            VersionState.INCOMPLETE: "is incomplete: it has no manifest (an upload in progress, "
            "or one that failed)",
            VersionState.INVALID: f"is invalid: {info.detail}",
        }[info.state]
        raise RepositoryError(f"version {version} of {self.uri} {why}")

    def ready_manifest(self, version: str) -> Manifest:
        """The manifest of a version that may be served (see :meth:`read_ready`)."""
        return self.read_ready(version).manifest

    def _inspect(self, version: str) -> tuple[VersionInfo, bytes | None]:
        """A version's state from one listing of its files, and its manifest's bytes (a few
        requests: this runs at every new version a replica loads)."""
        location = self.version_location(version)
        try:
            entries = storage.list_dir(location, recursive=True)
        except StorageError:
            if storage.kind(location) is not None:
                raise
            raise self._unknown(version) from None
        files = {
            e.location.relative_to(location): e for e in entries if e.kind is storage.Kind.FILE
        }
        modified = max((e.modified for e in files.values() if e.modified), default=None)
        if not files and storage.kind(location) is None:
            raise self._unknown(version)
        if MANIFEST_FILE not in files:
            return VersionInfo(version, VersionState.INCOMPLETE, modified=modified), None
        manifest_location = location.join(MANIFEST_FILE)
        raw = storage.read_bytes(manifest_location)
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as err:
            detail = f"{manifest_location}: {_first_error(err)}"
            return VersionInfo(version, VersionState.INVALID, detail=detail, modified=modified), raw
        if manifest.version != version:
            detail = f"{manifest_location} names version {manifest.version!r}"
            return VersionInfo(version, VersionState.INVALID, manifest, detail), raw
        if REJECTED_FILE in files:
            reason = self._rejection(location.join(REJECTED_FILE)).reason
            return VersionInfo(version, VersionState.REJECTED, manifest, reason), raw
        return VersionInfo(version, VersionState.READY, manifest), raw

    def _unknown(self, version: str) -> RepositoryError:
        known = [i.version for i in self.versions()]
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        return RepositoryError(
            f"no version {version!r} in repository {self.uri} "
            + (f"(versions, newest first: {listed})" if known else "(it is empty)")
        )

    @staticmethod
    def _rejection(marker: Location) -> Rejection:
        raw = storage.read_bytes(marker)
        try:
            return Rejection.model_validate_json(raw)
        except ValidationError:
            # Whatever it says, the marker means rejected; its text is the best reason there is.
            return Rejection(reason=raw[:500].decode("utf-8", "replace"), rejected_at=_now())

    # Writing versions ---------------------------------------------------------------------------

    def upload(self, model_dir: str | Path) -> str:
        """Copy an exported model directory into the repository as a new version, the manifest
        last (until then the version is incomplete, and nothing serves it).

        Args:
            model_dir: a local directory written by ``trainer.export``.

        Returns:
            The version id (the manifest's).

        Raises:
            RepositoryError: ``model_dir`` has no readable manifest, or the version is already
                in the repository with a manifest.
            StorageError: a storage fault (the version is then incomplete).
        """
        source = Path(model_dir)
        manifest = _local_manifest(source)
        location = self.version_location(manifest.version)
        if storage.exists(location.join(MANIFEST_FILE)):
            raise RepositoryError(f"version {manifest.version} is already in {self.uri}")
        for name in sorted(manifest.files):
            storage.upload_file(source / name, location.join(name))
        storage.upload_file(source / MANIFEST_FILE, location.join(MANIFEST_FILE))
        return manifest.version

    def download(self, ready: ReadyVersion, target: str | Path) -> Manifest:
        """Copy a ready version (:meth:`read_ready`) into the local directory ``target``,
        reading every file from the store and checking its sha256 and size against the
        manifest; the manifest's bytes are written last.

        Raises:
            RepositoryError: a file does not match its manifest (corrupt, truncated, or changed
                after publishing).
            StorageError: a storage fault.
        """
        location = self.version_location(ready.version)
        target = Path(target)
        for name, entry in sorted(ready.manifest.files.items()):
            digest, size = _copy_hashing(location.join(name), target / name)
            if (digest, size) != (entry.sha256, entry.bytes):
                raise RepositoryError(
                    f"checksum mismatch for {location.join(name)}: sha256 {digest[:16]}... "
                    f"({size} bytes), the manifest says {entry.sha256[:16]}... ({entry.bytes} "
                    "bytes): the file is corrupt, truncated or was changed after publishing"
                )
        (target / MANIFEST_FILE).write_bytes(ready.raw)
        return ready.manifest

    def mark_rejected(self, version: str, reason: str) -> None:
        """Record that ``version`` failed verification; it can then never be promoted."""
        rejection = Rejection(reason=reason, rejected_at=_now())
        storage.write_text(
            self.version_location(version).join(REJECTED_FILE), rejection.model_dump_json(indent=2)
        )

    def delete_version(self, version: str) -> None:
        """Delete a version: its manifest first (nothing loads it from then on), then the rest.

        Raises:
            RepositoryError: it is the current or the previous version.
        """
        pointer = self.read_pointer().pointer
        if pointer is not None and version in (pointer.version, pointer.previous):
            role = "current" if version == pointer.version else "previous"
            raise RepositoryError(f"version {version} is the {role} one of {self.uri}: kept")
        location = self.version_location(version)
        storage.delete_file(location.join(MANIFEST_FILE))
        storage.delete_tree(location)

    # Moving the pointer -------------------------------------------------------------------------

    def promote(
        self, version: str, *, base: PointerState | None = None, change: Change = Change.PROMOTE
    ) -> Pointer:
        """Make a ready version current; the one current before becomes the previous one.

        Args:
            version: the version to serve.
            base: the pointer this change is based on (read earlier, e.g. before a publish
                started); default: read now. The write fails if the pointer is no longer that.
            change: recorded in the pointer.

        Returns:
            The new pointer (the old one if ``version`` is current already).

        Raises:
            RepositoryError: no such version, or it is not ready.
            PointerConflict: the pointer is no longer ``base``.
        """
        self.ready_manifest(version)
        base = base if base is not None else self.read_pointer()
        old = base.pointer
        if old is not None and old.version == version:
            return old
        earlier = (old.version, *old.history) if old is not None else ()
        history = tuple(v for v in earlier if v != version)[:MAX_HISTORY]
        return self._move(base, version, history, change)

    def rollback_target(self, base: PointerState | None = None) -> str:
        """The version a rollback would make current: the most recent earlier current version
        that is still ready.

        Raises:
            RepositoryError: an empty repository, or no earlier version is left.
        """
        base = base if base is not None else self.read_pointer()
        return self._rollback(base)[0]

    def rollback(self, *, base: PointerState | None = None) -> Pointer:
        """Make the previous version current again (undo the last change of the pointer).

        Earlier versions that were deleted or rejected since are skipped. The version rolled
        back from leaves the history: a second rollback goes one version further back.

        Raises:
            RepositoryError: an empty repository, or no earlier version is left.
            PointerConflict: the pointer is no longer ``base``.
        """
        base = base if base is not None else self.read_pointer()
        target, history = self._rollback(base)
        return self._move(base, target, history, Change.ROLLBACK)

    def _rollback(self, base: PointerState) -> tuple[str, tuple[str, ...]]:
        if base.pointer is None:
            raise RepositoryError(f"repository {self.uri} is empty: there is nothing to roll back")
        skipped = []
        for i, version in enumerate(base.pointer.history):
            try:
                state = self.version_info(version).state
            except RepositoryError:  # deleted since
                skipped.append(f"{version} (deleted)")
                continue
            if state is VersionState.READY:
                return version, base.pointer.history[i + 1 :]
            skipped.append(f"{version} ({state.value})")
        raise RepositoryError(
            f"repository {self.uri}: no earlier version to roll back to from "
            f"{base.pointer.version}"
            + (f"; skipped {', '.join(skipped)}" if skipped else " (it is the only one served)")
        )

    def _move(
        self, base: PointerState, version: str, history: tuple[str, ...], change: Change
    ) -> Pointer:
        generation = base.pointer.generation + 1 if base.pointer is not None else 1
        pointer = Pointer(
            version=version,
            history=history,
            generation=generation,
            updated_at=_now(),
            change=change,
        )
        data = (pointer.model_dump_json(indent=2) + "\n").encode()
        try:
            storage.write_bytes_if(self.pointer_location, data, expected=base.raw)
        except WriteConflict:
            now = self.read_pointer().version
            raise PointerConflict(
                f"{self.pointer_location} was moved by another writer (it named "
                f"{base.version or 'no version'} when read, now {now or 'no version'}): "
                f"{version} was not made current; look again (python -m trainer.models list "
                f"--repository {self.uri}) and retry"
            ) from None
        return pointer

    # Retention ----------------------------------------------------------------------------------

    def prune(self, keep: int, *, now: datetime | None = None) -> list[str]:
        """Delete old versions (see the module docstring for what stays).

        Args:
            keep: how many of the newest ready versions to keep (at least 1).
            now: the present, for the age of incomplete versions (tests).

        Returns:
            The versions deleted.
        """
        if keep < 1:
            raise RepositoryError(f"keep must be at least 1, got {keep}")
        now = now or _now()
        pointer = self.read_pointer().pointer
        protected = {pointer.version, pointer.previous} if pointer is not None else set()
        infos = self.versions()
        kept_ready = [i for i in infos if i.state is VersionState.READY][:keep]
        oldest_kept = min((i.time for i in kept_ready if i.time), default=None)
        protected |= {i.version for i in kept_ready}
        deleted = []
        for info in infos:
            if info.version in protected or not _expendable(info, oldest_kept, now):
                continue
            location = self.version_location(info.version)
            storage.delete_file(location.join(MANIFEST_FILE))
            storage.delete_tree(location)
            deleted.append(info.version)
        return deleted


def _expendable(info: VersionInfo, oldest_kept: datetime | None, now: datetime) -> bool:
    """Whether prune may delete a version that is neither protected nor among those kept."""
    if info.state is VersionState.READY:
        return True
    if info.state is VersionState.INCOMPLETE:  # its upload may still be running
        return info.modified is not None and now - info.modified >= INCOMPLETE_GRACE
    # Rejected or invalid: kept for inspection while newer than the oldest ready version kept.
    return oldest_kept is not None and (info.time is None or info.time <= oldest_kept)


def _local_manifest(model_dir: Path) -> Manifest:
    file = model_dir / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(file.read_bytes())
    except OSError as err:
        raise RepositoryError(
            f"{file}: cannot read it ({err.strerror}): is {model_dir} a model directory written "
            "by trainer.export?"
        ) from None
    except ValidationError as err:
        raise RepositoryError(f"{file} is not a model manifest: {_first_error(err)}") from None


def _copy_hashing(source: Location, target: Path) -> tuple[str, int]:
    """Stream ``source`` into the local file ``target``; its sha256 and size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    stream = storage.open_input_stream(source)
    with stream, open(target, "wb") as out:
        while True:
            with storage.storage_errors(source, "read"):
                chunk = stream.read(_CHUNK_BYTES)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]


def _now() -> datetime:
    return datetime.now(UTC)
