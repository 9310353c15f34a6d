"""A model directory named by a URI, fetched into a local cache and verified before it is loaded.

``CTCVR_MODEL_DIR`` (``--model-dir``, ``POST /admin/reload``) may be a local directory, which is
loaded where it is, or a URI (``s3://bucket/models/demo``, any ``schemas.storage`` scheme;
credentials and endpoint from the AWS environment variables). A URI is fetched first:

1. its ``manifest.json`` is read (``trainer.export`` writes it last, and deletes it first when it
   replaces a model: without one the directory is incomplete and is refused);
2. the cache entry is ``CTCVR_MODEL_CACHE/<version>-<sha256 of the manifest>``: the same bytes
   of the same model are fetched once, and every worker process of a pod shares them;
3. if the entry is missing, every file the manifest lists is streamed into a hidden directory
   beside it (never a whole file in memory), its sha256 and size checked against the manifest,
   then the manifest is written and the directory renamed into place: an entry is complete or
   absent, whoever reads it, and of processes fetching the same model at once the first rename
   wins and the others use its copy;
4. the caller loads the local copy with ``serving.artifact.load_artifact``, which verifies it
   again, as it does any directory.

Only the newest :data:`CACHE_KEEP` entries (by last use) are kept. Every failure is an
:class:`~serving.artifact.ArtifactError` naming the URI and what to check, so a reload that
fails keeps the model being served; a storage fault (the store unreachable, access denied, a
missing bucket) is its subclass :class:`StoreUnavailable`: nothing is wrong with the model, so
a follower of a model repository tries it again later instead of refusing the version.

Example::

    local = local_model_dir("s3://ml/models/demo", Path("/tmp/ctcvr-models"))
    artifact = load_artifact(local)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from schemas import storage
from schemas.artifact import MANIFEST_FILE
from schemas.storage import Location, StorageError
from serving.artifact import ArtifactError

__all__ = ["CACHE_KEEP", "StoreUnavailable", "is_remote", "local_model_dir"]

CACHE_KEEP = 3  # cache entries kept: the model being served, and the ones a reload may go back to
_CHUNK_BYTES = 4 * 2**20
_MAX_MANIFEST_BYTES = 16 * 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreUnavailable(ArtifactError):
    """The model could not be fetched because of a storage fault, not because of its bytes."""


def is_remote(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` is a URI to fetch rather than a directory on this machine.

    Raises:
        ArtifactError: not a usable path or URI (e.g. credentials in it).
    """
    return not _resolve(model_dir).is_local


def local_model_dir(model_dir: str | os.PathLike[str], cache_dir: Path) -> Path:
    """The local directory holding ``model_dir``: itself if it is local, else its verified copy
    in ``cache_dir`` (fetched if not there yet).

    Args:
        model_dir: a directory written by ``trainer.export``: a path or a URI.
        cache_dir: where fetched models are kept (created if needed).

    Raises:
        ArtifactError: no manifest (not a model directory, or an export in progress or failed),
            a file that does not match the manifest, a cache directory that cannot be written;
            the message names the URI and what to check.
        StoreUnavailable: a storage fault (the store unreachable, wrong credentials, a missing
            bucket), named likewise.
    """
    location = _resolve(model_dir)
    if location.scheme == "":
        return Path(model_dir)
    if location.is_local:  # file://
        return Path(location.path)
    manifest_bytes = _read_manifest(location)
    files = _listed_files(location, manifest_bytes)
    entry = cache_dir / _entry_name(manifest_bytes)
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _is_cached(entry, manifest_bytes):
            _fetch(location, manifest_bytes, files, entry)
        os.utime(entry)  # last use, for eviction
        _evict(cache_dir, keep=entry)
    except OSError as err:
        raise ArtifactError(
            f"cannot cache model {location} in {cache_dir}: {err.strerror or err}; check that "
            "CTCVR_MODEL_CACHE is a writable directory with room for the model"
        ) from None
    return entry


def _resolve(model_dir: str | os.PathLike[str]) -> Location:
    try:
        return storage.resolve(model_dir)
    except StorageError as err:
        raise ArtifactError(f"model directory: {err}") from None


def _read_manifest(location: Location) -> bytes:
    manifest = location.join(MANIFEST_FILE)
    try:
        if not storage.is_file(manifest):
            raise ArtifactError(
                f"{manifest} not found: {location} is not a model directory written by "
                "trainer.export, or an export to it is in progress or failed (the manifest is "
                "written last)"
            )
        data = storage.read_bytes(manifest)
    except StorageError as err:
        raise StoreUnavailable(f"cannot fetch model {location}: {err}") from None
    if len(data) > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest} is larger than {_MAX_MANIFEST_BYTES} bytes")
    return data


def _listed_files(location: Location, manifest_bytes: bytes) -> dict[str, tuple[str, int]]:
    """The manifest's files: name -> (sha256, bytes); only names inside the directory.

    The local loader checks the manifest whole; this reads just what fetching needs, and
    refuses names that would write outside the cache entry.
    """
    where = location.join(MANIFEST_FILE)
    try:
        raw = json.loads(manifest_bytes)
    except ValueError as err:
        raise ArtifactError(f"{where} is not valid JSON: {err}") from None
    listed = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(listed, Mapping) or not listed:
        raise ArtifactError(f"{where} lists no files: not a manifest written by trainer.export")
    files = {}
    for name, entry in listed.items():
        if not _is_safe_name(name):
            raise ArtifactError(f"{where} lists the file name {name!r}, which is not inside it")
        if not _is_file_entry(entry):
            raise ArtifactError(f"{where}: files.{name} needs a sha256 and a size in bytes")
        files[name] = (entry["sha256"], entry["bytes"])
    if MANIFEST_FILE in files:
        raise ArtifactError(f"{where} lists itself among its files")
    return files


def _is_safe_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _is_file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, Mapping)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.match(entry["sha256"]) is not None
        and isinstance(entry.get("bytes"), int)
        and entry["bytes"] >= 0
    )


def _entry_name(manifest_bytes: bytes) -> str:
    try:
        version = str(json.loads(manifest_bytes).get("version") or "model")
    except (ValueError, AttributeError):
        version = "model"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", version).strip("-.")[:64] or "model"
    return f"{slug}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"


def _is_cached(entry: Path, manifest_bytes: bytes) -> bool:
    """A complete entry of these manifest bytes (its files are verified by the loader)."""
    manifest = entry / MANIFEST_FILE
    return manifest.is_file() and manifest.read_bytes() == manifest_bytes


def _fetch(
    location: Location, manifest_bytes: bytes, files: dict[str, tuple[str, int]], entry: Path
) -> None:
    """Download and verify every file into a hidden directory, then rename it to ``entry``."""
    staging = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(mode=0o700)
    try:
        for name, (sha256, size) in sorted(files.items()):
            _download(location.join(name), staging / name, sha256, size)
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)  # last: the entry is complete
        try:
            staging.rename(entry)
        except OSError:
            # Another process of this pod fetched the same model first: use its copy.
            if not _is_cached(entry, manifest_bytes):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(source: Location, target: Path, sha256: str, size: int) -> None:
    """Stream ``source`` to ``target``, hashing as it goes.

    Raises:
        ArtifactError: a storage fault, or bytes that do not match the manifest.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    try:
        stream = storage.open_input_stream(source)
        with stream, open(target, "wb") as out:
            while True:
                with storage.storage_errors(source, "read"):  # local errors stay OSError
                    chunk = stream.read(_CHUNK_BYTES)
                if not chunk:
                    break
                digest.update(chunk)
                written += len(chunk)
                out.write(chunk)
    except StorageError as err:
        raise StoreUnavailable(f"cannot fetch the model: {err}") from None
    if written != size or digest.hexdigest() != sha256:
        raise ArtifactError(
            f"checksum mismatch for {source}: sha256 {digest.hexdigest()[:16]}... ({written} "
            f"bytes), the manifest says {sha256[:16]}... ({size} bytes): the object is truncated, "
            "corrupt or was changed after export (is an export replacing this model now?)"
        )


def _evict(cache_dir: Path, keep: Path) -> None:
    """Delete all but the newest :data:`CACHE_KEEP` entries (never ``keep``), and what fetches
    of processes that died left behind."""
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_KEEP:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for staging in cache_dir.glob(".*.tmp"):
        if not _pid_alive(staging.name.rsplit(".", 3)[-3]):
            shutil.rmtree(staging, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not ours: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
