"""Storage URIs: the one place that turns a path or URI into a filesystem.

Everything ctcvr reads or writes (impression logs, data sets, run directories and their
checkpoints, exported models, the models a service fetches) is named by a local path or a URI,
and reaches its bytes through this module:

============================  ====================================================================
``data/sim``, ``/abs/path``   the local disk
``file:///abs/path``          the local disk
``s3://bucket/prefix``        S3 or any S3-compatible store (MinIO, Ceph, moto), ``pyarrow.fs``
``gs://bucket/prefix``        Google Cloud Storage, ``pyarrow.fs`` (credentials: Google's own)
``hdfs://host:port/path``     HDFS, ``pyarrow.fs`` (needs libhdfs and a JVM)
``memory://x``, other         any protocol fsspec knows (``memory://`` for tests), wrapped for
                              ``pyarrow.fs``
============================  ====================================================================

Parquet is read through :mod:`pyarrow.fs` with ranged reads (never a whole object); fsspec is
offered where pyarrow does not reach (:func:`fsspec_options` for ``torch.distributed.checkpoint``'s
``FsspecWriter`` / ``FsspecReader``, which ``trainer.checkpoint`` uses for checkpoints on URIs).

**Credentials and endpoint** come only from the standard AWS environment variables, never from
configs: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` (and the SDKs'
other default sources: ``AWS_PROFILE``, instance and web-identity roles), which both pyarrow and
botocore read by themselves; ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` and ``AWS_MAX_ATTEMPTS``, which this module reads and passes explicitly
(``pyarrow.fs.S3FileSystem()`` ignores ``AWS_ENDPOINT_URL`` and ``AWS_MAX_ATTEMPTS``, and botocore
ignores ``AWS_REGION``). A URI with credentials in it is refused, and every message is redacted.

**Faults** become one :class:`StorageError` naming the URI, the endpoint and what to check:
a missing bucket, denied access (wrong or expired credentials), a missing object, an unreachable
store. Requests are retried by the SDK with exponential backoff, ``AWS_MAX_ATTEMPTS`` attempts
(default 5, about 10 s of outage) before the error.

**Publishing.** :func:`write_bytes` never lets a reader see half an object (a local file is
written beside its name and renamed; an object store's PUT is atomic). A directory of objects is
published by writing a marker last (and deleting it first when it is replaced); readers trust the
directory only once the marker is there. A pointer that several writers move (a model repository's
``CURRENT``) is written with :func:`write_bytes_if`, a compare-and-swap.

Example::

    from schemas import storage

    root = storage.resolve("s3://logs/impressions")
    storage.write_text(root.join("schema.yaml"), text)
    for entry in storage.list_dir(root, recursive=True):
        print(entry.location, entry.size)
    table = pq.ParquetFile(root.join("part-0.parquet").path, filesystem=root.filesystem)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, unique
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    import fsspec

_log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "Entry",
    "Kind",
    "Location",
    "S3Settings",
    "StorageError",
    "UriLike",
    "WriteConflict",
    "delete_file",
    "delete_tree",
    "exists",
    "fault",
    "fsspec_filesystem",
    "fsspec_options",
    "is_dir",
    "is_file",
    "join",
    "kind",
    "list_dir",
    "make_dirs",
    "open_input_file",
    "open_input_stream",
    "read_bytes",
    "read_text",
    "redact",
    "resolve",
    "storage_errors",
    "upload_file",
    "write_bytes",
    "write_bytes_if",
    "write_text",
]

DEFAULT_MAX_ATTEMPTS = 5  # per request, first try included; about 10 s of backoff in all
LOCAL_SCHEMES = ("", "file")
_OBJECT_STORES = ("s3", "gs", "gcs")  # bucket/key paths: no real directories
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_CREDENTIAL_VARIABLES = (*_SECRET_VARIABLES, "AWS_PROFILE")


class StorageError(ValueError):
    """A path or URI cannot be used, or its store failed; the message names it and what to check."""


class WriteConflict(StorageError):
    """A conditional write (:func:`write_bytes_if`) found the file changed since it was read."""


@unique
class Kind(str, Enum):
    FILE = "file"  # a file or an object
    DIRECTORY = "directory"  # a directory, or an object-store prefix with objects under it


# Locations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A file or directory named by a local path or a URI.

    Attributes:
        uri: how messages name it: a local path as given (normalised like ``pathlib``), or
            ``scheme://bucket/key`` (never credentials).
        scheme: ``""`` for a local path, else the URI scheme (``file``, ``s3``, ``memory``...).
        path: the path inside :attr:`filesystem`: an absolute local path, ``bucket/key`` on an
            object store.
    """

    uri: str
    scheme: str
    path: str

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        """On this machine's disk (a path or ``file://``)."""
        return self.scheme in LOCAL_SCHEMES

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem of this location (cached per process and environment)."""
        return _filesystem(self)

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The directory (or prefix) holding this location."""
        if self.scheme == "":
            parent = Path(self.uri).parent
            path = os.path.dirname(self.path)
            # "." and ".." have no lexical parent; name the directory by its absolute path then.
            shown = path if parent == Path(self.uri) or parent.name == ".." else str(parent)
            return Location(shown, "", path)
        uri_head, _, _ = self.uri.rstrip("/").rpartition("/")
        path_head, _, _ = self.path.rstrip("/").rpartition("/")
        if uri_head.endswith((":/", ":")):  # already at the root
            return self
        return Location(uri_head, self.scheme, path_head or "/")

    def join(self, *names: str) -> Location:
        """The location of ``names`` (``"train"``, ``"part-0.parquet"`` or ``"a/b"``) under this one."""
        parts = [p for name in names for p in str(name).split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"{self}: cannot join {list(names)}: '.' and '..' are not allowed")
        if not parts:
            return self
        if self.scheme == "":
            return Location(str(Path(self.uri, *parts)), "", os.path.join(self.path, *parts))
        tail = "/".join(parts)
        return Location(
            f"{self.uri.rstrip('/')}/{tail}", self.scheme, f"{self.path.rstrip('/')}/{tail}"
        )

    def relative_to(self, root: Location) -> str:
        """This location's path below ``root`` (``"day=2026-12-01/part-0.parquet"``)."""
        base = root.path.rstrip("/") + "/"
        if not self.path.startswith(base):
            raise StorageError(f"{self} is not below {root}")
        return self.path[len(base) :]


UriLike = str | os.PathLike[str] | Location  # what every function here accepts


def resolve(uri: UriLike) -> Location:
    """The :class:`Location` of a local path or a URI.

    Args:
        uri: ``data/sim``, ``/abs/path``, ``file:///abs/path``, ``s3://bucket/prefix``,
            ``gs://...``, ``hdfs://...``, ``memory://...`` or any protocol fsspec knows.

    Raises:
        StorageError: credentials, a query or a fragment in the URI, or an object-store URI
            without a bucket.

    Example::

        resolve("s3://logs/impressions/").join("day=2026-12-01").uri
        # 's3://logs/impressions/day=2026-12-01'
    """
    if isinstance(uri, Location):
        return uri
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty path or URI")
    scheme = _scheme(text)
    if scheme == "":
        return Location(str(Path(text)), "", os.path.abspath(text))
    parts = urlsplit(text)
    shown = redact(text.split("?", 1)[0].split("#", 1)[0])
    if "@" in parts.netloc:
        raise StorageError(
            f"{shown}: credentials in a URI are not accepted (they would end up in configs and "
            "logs); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's own variables)"
        )
    if parts.query or parts.fragment:
        raise StorageError(
            f"{shown}: a query or fragment in a storage URI is not accepted; the endpoint and "
            "region come from AWS_ENDPOINT_URL and AWS_REGION"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{shown}: a file:// URI names a local path (file:///abs/path)")
        path = os.path.normpath(unquote(parts.path)) if parts.path else "/"
        return Location(f"file://{path}", "file", path)
    key = parts.path.strip("/")
    if scheme in _OBJECT_STORES:
        if not parts.netloc:
            raise StorageError(f"{shown}: no bucket (expected {scheme}://bucket/prefix)")
        path = f"{parts.netloc}/{key}" if key else parts.netloc
        return Location(f"{scheme}://{path}", scheme, path)
    if scheme == "hdfs":
        return Location(f"hdfs://{parts.netloc}/{key}", scheme, f"/{key}")
    path = f"{parts.netloc}/{key}".strip("/")
    # fsspec's memory filesystem roots its paths at "/"; other protocols start at the netloc.
    return Location(f"{scheme}://{path}", scheme, f"/{path}" if scheme == "memory" else path)


def join(uri: UriLike, *names: str) -> str:
    """``join("s3://b/data", "train", "part-0.parquet") == "s3://b/data/train/part-0.parquet"``."""
    return resolve(uri).join(*names).uri


def _scheme(text: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match is None:
        return ""  # a path, including Windows drives (C:\...)
    return match.group(1).lower()


# Settings and filesystems -----------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """What the environment says about S3; a new value means a new client.

    Attributes:
        endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; None for AWS itself.
        region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``; None: ``us-east-1`` with a custom
            endpoint, else looked up from the bucket.
        max_attempts: ``AWS_MAX_ATTEMPTS``: tries per request (first included), with
            exponential backoff between them.
        credentials_id: a digest of the credential variables (never the values), so that a
            client is rebuilt when they change.
    """

    endpoint: str | None
    region: str | None
    max_attempts: int
    credentials_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the settings.

        Raises:
            StorageError: ``AWS_MAX_ATTEMPTS`` is not a positive integer, or the endpoint has no
                ``http://`` / ``https://`` scheme.
        """
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and not re.match(r"^https?://", endpoint):
            raise StorageError(
                f"AWS_ENDPOINT_URL={redact(endpoint)!r} needs a scheme, e.g. http://{endpoint}"
            )
        raw_attempts = env.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
        if not raw_attempts.isdigit() or int(raw_attempts) < 1:
            raise StorageError(f"AWS_MAX_ATTEMPTS must be an integer >= 1, got {raw_attempts!r}")
        digest = hashlib.sha256(
            "\0".join(env.get(name, "") for name in _CREDENTIAL_VARIABLES).encode()
        ).hexdigest()[:16]
        return cls(
            endpoint=endpoint.rstrip("/") if endpoint else None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            max_attempts=int(raw_attempts),
            credentials_id=digest,
        )

    @property
    def where(self) -> str:
        """The store, for messages: ``endpoint http://127.0.0.1:9000`` or ``AWS S3``."""
        return f"endpoint {redact(self.endpoint)}" if self.endpoint else "AWS S3"


_FILESYSTEMS: dict[tuple[object, ...], pafs.FileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def _filesystem(location: Location) -> pafs.FileSystem:
    scheme = location.scheme
    if scheme in LOCAL_SCHEMES:
        key: tuple[object, ...] = ("local",)
    elif scheme == "s3":
        settings = S3Settings.from_env()
        needs_lookup = settings.region is None and settings.endpoint is None
        key = ("s3", settings, _bucket(location) if needs_lookup else None)
    elif scheme == "hdfs":
        key = ("hdfs", urlsplit(location.uri).netloc)
    else:
        key = (scheme,)
    # A forked child (a DataLoader worker) builds its own client: SDK clients are not fork-safe.
    key = (os.getpid(), *key)
    with _FILESYSTEMS_LOCK:
        cached = _FILESYSTEMS.get(key)
        if cached is None:
            cached = _FILESYSTEMS[key] = _new_filesystem(location)
        return cached


def _new_filesystem(location: Location) -> pafs.FileSystem:
    scheme = location.scheme
    if scheme in LOCAL_SCHEMES:
        return pafs.LocalFileSystem()
    if scheme == "s3":
        return _s3_filesystem(location)
    try:
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem()
        if scheme == "hdfs":
            return pafs.HadoopFileSystem.from_uri(f"hdfs://{urlsplit(location.uri).netloc}")
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError, OSError, pa.ArrowException) as err:
        raise StorageError(
            f"{location}: no filesystem for {scheme}:// here ({redact(str(err))}); ctcvr reads "
            "local paths, file://, s3://, gs://, hdfs:// (with libhdfs) and fsspec protocols "
            "whose package is installed"
        ) from None


def _s3_region(location: Location, settings: S3Settings) -> str:
    if settings.region is not None:
        return settings.region
    if settings.endpoint is not None:
        return "us-east-1"  # S3-compatible stores ignore it; the SDK must not go looking
    try:
        return pafs.resolve_s3_region(_bucket(location))
    except (OSError, pa.ArrowException) as err:
        raise StorageError(
            f"{location}: cannot find the region of bucket {_bucket(location)!r} "
            f"({redact(str(err))}); set AWS_REGION"
        ) from None


def _s3_filesystem(location: Location) -> pafs.S3FileSystem:
    settings = S3Settings.from_env()
    # Credentials are left to the SDK's default chain, which reads AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN first and also knows profiles and roles.
    return pafs.S3FileSystem(
        region=_s3_region(location, settings),
        endpoint_override=settings.endpoint,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    )


def _bucket(location: Location) -> str:
    return location.path.split("/", 1)[0]


def fsspec_options(uri: UriLike) -> dict[str, Any]:
    """Storage options for fsspec (``fsspec.url_to_fs(uri, **options)``) matching this module.

    For ``torch.distributed.checkpoint.FsspecWriter(uri, **fsspec_options(uri))``: the same
    endpoint, region and retries as the ``pyarrow.fs`` side; credentials from the environment.
    """
    location = resolve(uri)
    if location.scheme != "s3":
        return {}
    settings = S3Settings.from_env()
    region = settings.region or ("us-east-1" if settings.endpoint else None)
    _report_orphaned_connection_errors_briefly()
    return {
        "endpoint_url": settings.endpoint,
        "client_kwargs": {"region_name": region} if region else {},
        "config_kwargs": {"retries": {"max_attempts": settings.max_attempts, "mode": "standard"}},
        # fsspec caches a filesystem per set of options, and with it its S3 client, whose
        # creation costs most of a small read. One session per settings (credentials included)
        # makes new settings a new filesystem, which never uses the credentials of the old one.
        "session": _aio_session(settings),
        "use_listings_cache": False,
    }


_SESSIONS: dict[tuple[object, ...], Any] = {}


def _aio_session(settings: S3Settings) -> Any:
    """The aiobotocore session of ``settings`` in this process (s3fs creates its clients in it;
    credentials are read from the environment when a client is created)."""
    from aiobotocore.session import AioSession

    key = (os.getpid(), settings)
    with _FILESYSTEMS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = _SESSIONS[key] = AioSession()
        return session


def _report_orphaned_connection_errors_briefly() -> None:
    """Log a connection error left in an orphaned aiohttp task as one line, not a traceback.

    When a store becomes unreachable while a request's body waits for ``100-continue``, aiohttp
    (3.14) keeps the connection error in the task that writes the body, which nobody awaits, and
    asyncio logs it at garbage collection as "Task exception was never retrieved" with a
    traceback. The request itself already failed with that error, which reaches the caller as a
    :class:`StorageError` naming the URI; the orphan's copy is only noise on stderr. Every other
    exception on fsspec's loop still goes to the loop's own handler.
    """
    import fsspec.asyn

    loop = fsspec.asyn.get_loop()
    with _FILESYSTEMS_LOCK:
        previous = loop.get_exception_handler()
        if getattr(previous, "func", None) is _handle_loop_exception:
            return
        loop.set_exception_handler(functools.partial(_handle_loop_exception, previous=previous))


def _handle_loop_exception(
    loop: Any, context: dict[str, Any], previous: Callable[..., None] | None = None
) -> None:
    if "future" in context and _is_connection_error(context.get("exception")):
        _log.debug("%s: %r", context.get("message"), context["exception"])
    elif previous is not None:
        previous(loop, context)
    else:
        loop.default_exception_handler(context)


def _is_connection_error(error: BaseException | None) -> bool:
    try:
        from aiohttp import ClientConnectionError
    except ImportError:  # an fsspec filesystem that does not use aiohttp
        return False
    return isinstance(error, ClientConnectionError)


def fsspec_filesystem(
    uri: UriLike,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path in it, configured as :func:`fsspec_options` says."""
    import fsspec.core

    location = resolve(uri)
    target = location.path if location.is_local else location.uri
    try:
        return fsspec.core.url_to_fs(target, **fsspec_options(location))
    except (ImportError, ValueError) as err:
        raise StorageError(f"{location}: no fsspec filesystem: {redact(str(err))}") from None


# Faults -----------------------------------------------------------------------------------------


@unique
class _Fault(str, Enum):
    NOT_FOUND = "not found"
    NO_BUCKET = "no such bucket"
    DENIED = "access denied"
    UNREACHABLE = "unreachable"
    STORE = "store error"  # any other answer of the store, or an I/O error of the disk


_DENIED = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "EXPIRED_TOKEN",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "Forbidden",
    "HTTP status 403",
)
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Could not connect",
    "Could not resolve host",
    "Connection refused",
    "Connection reset",
    "timed out",
    "Timeout",
    "curlCode",
)


def _classify(err: BaseException) -> _Fault | None:
    text = str(err)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text:
        return _Fault.NO_BUCKET
    if isinstance(err, PermissionError) or any(marker in text for marker in _DENIED):
        return _Fault.DENIED
    if isinstance(err, (ConnectionError, TimeoutError)) or any(m in text for m in _UNREACHABLE):
        return _Fault.UNREACHABLE
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return _Fault.NOT_FOUND
    if "NO_SUCH_KEY" in text or "NoSuchKey" in text or "Path does not exist" in text:
        return _Fault.NOT_FOUND
    if "AWS Error" in text or "HTTP status" in text:
        return _Fault.STORE
    if isinstance(err, OSError) and err.errno is not None:
        return _Fault.STORE  # the disk or the operating system: full, read-only, I/O error...
    return None


def fault(err: BaseException, uri: UriLike, action: str) -> StorageError | None:
    """The :class:`StorageError` for ``err`` if it is a storage fault, else None.

    A storage fault is a missing bucket or object, denied access, an unreachable store or any
    other error answer of the store. Anything else (bytes that are not what the caller expected,
    such as a truncated Parquet footer) is the caller's to report.

    Args:
        err: what the filesystem raised.
        uri: what was being accessed.
        action: the verb for the message, e.g. ``"read"`` or ``"write"``.
    """
    if isinstance(err, StorageError):
        return err
    location = resolve(uri)
    reason = _classify(err)
    if reason is None:
        return None
    detail = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if location.scheme != "s3":
        if reason is _Fault.NOT_FOUND:
            return StorageError(f"{location}: no such file or directory")
        if reason is _Fault.DENIED:
            return StorageError(f"{location}: permission denied to {action}: check its permissions")
        return StorageError(f"{location}: cannot {action}: {detail}")
    settings = S3Settings.from_env()
    bucket = _bucket(location)
    if reason is _Fault.NOT_FOUND and _bucket_missing(location):
        reason = _Fault.NO_BUCKET
    if reason is _Fault.NO_BUCKET:
        return _no_bucket(location)
    if reason is _Fault.NOT_FOUND:
        return StorageError(f"{location}: no such object or prefix in bucket {bucket!r}")
    if reason is _Fault.DENIED:
        return StorageError(
            f"{location}: access denied by {settings.where} ({detail}): check AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (wrong or expired credentials?) and "
            f"that they may {action} in bucket {bucket!r}"
        )
    if reason is _Fault.UNREACHABLE:
        return StorageError(
            f"{location}: cannot {action}: {settings.where} unreachable after "
            f"{settings.max_attempts} attempt(s) ({detail}): check AWS_ENDPOINT_URL and the "
            "network (AWS_MAX_ATTEMPTS sets the attempts)"
        )
    return StorageError(f"{location}: cannot {action}: {settings.where} answered: {detail}")


def _no_bucket(location: Location) -> StorageError:
    return StorageError(
        f"{location}: bucket {_bucket(location)!r} does not exist at "
        f"{S3Settings.from_env().where}: check the bucket name, AWS_ENDPOINT_URL and AWS_REGION"
    )


def _bucket_missing(location: Location) -> bool:
    try:
        info = location.filesystem.get_file_info(_bucket(location))
    except (OSError, pa.ArrowException):
        return False
    return info.type == pafs.FileType.NotFound


@contextmanager
def storage_errors(uri: UriLike, action: str) -> Iterator[None]:
    """Turn the storage faults raised inside into :class:`StorageError` naming ``uri``.

    Errors that are not storage faults (see :func:`fault`) pass through unchanged.
    """
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        translated = fault(err, uri, action)
        if translated is None:
            raise
        raise translated from None


def redact(text: str | None) -> str:
    """``text`` without the values of the AWS credential variables or URL credentials."""
    if text is None:
        return ""
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


# Operations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One item of a directory listing.

    Attributes:
        location: where it is.
        kind: file or directory.
        size: bytes, for files.
        modified: when it was last written, where the store says (files; UTC).
    """

    location: Location
    kind: Kind
    size: int | None = None
    modified: datetime | None = None

    @property
    def name(self) -> str:
        return self.location.name


def kind(uri: UriLike) -> Kind | None:
    """Whether ``uri`` is a file, a directory (an object-store prefix with objects), or nothing.

    Raises:
        StorageError: the bucket does not exist, access is denied, the store is unreachable.
    """
    location = resolve(uri)
    with storage_errors(location, "look up"):
        info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        return Kind.FILE
    if info.type == pafs.FileType.Directory:
        return Kind.DIRECTORY
    if location.scheme == "s3" and _bucket_missing(location):
        raise _no_bucket(location)
    return None


def exists(uri: UriLike) -> bool:
    """Whether ``uri`` names a file or a directory (see :func:`kind`)."""
    return kind(uri) is not None


def is_file(uri: UriLike) -> bool:
    return kind(uri) is Kind.FILE


def is_dir(uri: UriLike) -> bool:
    return kind(uri) is Kind.DIRECTORY


def list_dir(uri: UriLike, *, recursive: bool = False) -> list[Entry]:
    """The files and directories under ``uri``, sorted by path.

    Raises:
        StorageError: ``uri`` is not a directory, or a storage fault.
    """
    location = resolve(uri)
    with storage_errors(location, "list"):
        infos = location.filesystem.get_file_info(
            pafs.FileSelector(location.path, recursive=recursive)
        )
    base = location.path.rstrip("/") + "/"
    entries = []
    for info in sorted(infos, key=lambda i: i.path):
        relative = info.path[len(base) :] if info.path.startswith(base) else info.base_name
        is_file_ = info.type == pafs.FileType.File
        entries.append(
            Entry(
                location=location.join(relative),
                kind=Kind.FILE if is_file_ else Kind.DIRECTORY,
                size=info.size if is_file_ else None,
                modified=info.mtime if is_file_ else None,
            )
        )
    return entries


def read_bytes(uri: UriLike) -> bytes:
    """The whole content of a (small) file; Parquet goes through :func:`open_input_file`."""
    location = resolve(uri)
    with (
        storage_errors(location, "read"),
        location.filesystem.open_input_stream(location.path) as stream,
    ):
        return stream.read()


def read_text(uri: UriLike) -> str:
    """The content of a UTF-8 text file."""
    location = resolve(uri)
    data = read_bytes(location)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StorageError(f"{location}: not UTF-8 text ({err})") from None


def write_bytes(uri: UriLike, data: bytes) -> None:
    """Write a file whole: a reader sees the old content or the new one, never a part.

    Locally the bytes go to a hidden file beside the target, renamed over it; an object store
    stores an object in one PUT.
    """
    location = resolve(uri)
    filesystem = location.filesystem
    with storage_errors(location, "write"):
        if not location.is_local:
            with filesystem.open_output_stream(location.path) as stream:
                stream.write(data)
            return
        directory = os.path.dirname(location.path)
        os.makedirs(directory, exist_ok=True)
        staging = os.path.join(directory, f".{location.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(staging, "wb") as handle:
                handle.write(data)
            os.replace(staging, location.path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)


def write_text(uri: UriLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(uri, text.encode("utf-8"))


def upload_file(source: str | os.PathLike[str], uri: UriLike) -> None:
    """Copy a local file to ``uri`` in chunks (never whole in memory), published like
    :func:`write_bytes`: a reader sees the old content or the new one, never a part.

    Raises:
        StorageError: ``source`` cannot be read, or a storage fault writing ``uri``.
    """
    location = resolve(uri)
    if not os.path.isfile(source):
        raise StorageError(f"{source}: no such file to copy to {location}")
    with storage_errors(location, "write"):
        if not location.is_local:
            # An object appears when its (multipart) upload completes, whole.
            with (
                open(source, "rb") as handle,
                location.filesystem.open_output_stream(location.path) as stream,
            ):
                stream.upload(handle)
            return
        directory = os.path.dirname(location.path)
        os.makedirs(directory, exist_ok=True)
        staging = os.path.join(directory, f".{location.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            shutil.copyfile(source, staging)
            os.replace(staging, location.path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)


def open_input_stream(uri: UriLike) -> pa.NativeFile:
    """A sequential stream of a file's bytes (one GET on S3, read as it arrives); wrap reads in
    :func:`storage_errors` to name a fault mid-stream."""
    location = resolve(uri)
    with storage_errors(location, "read"):
        return location.filesystem.open_input_stream(location.path)


def open_input_file(uri: UriLike) -> pa.NativeFile:
    """A random-access file: reads fetch only the ranges asked for (ranged GETs on S3)."""
    location = resolve(uri)
    with storage_errors(location, "open"):
        return location.filesystem.open_input_file(location.path)


def make_dirs(uri: UriLike) -> None:
    """Create a directory and its parents where directories exist (not on object stores)."""
    location = resolve(uri)
    if location.scheme in _OBJECT_STORES:
        return  # a prefix exists once an object is under it; a marker object would only confuse
    with storage_errors(location, "create"):
        location.filesystem.create_dir(location.path, recursive=True)


def delete_file(uri: UriLike, *, missing_ok: bool = True) -> None:
    """Delete one file or object.

    Raises:
        StorageError: it does not exist and ``missing_ok`` is False, or a storage fault.
    """
    location = resolve(uri)
    try:
        with storage_errors(location, "delete"):
            location.filesystem.delete_file(location.path)
    except StorageError:
        if missing_ok and kind(location) is None:
            return
        raise


def delete_tree(uri: UriLike) -> None:
    """Delete a directory (every object under a prefix) or a file; nothing there is fine.

    Raises:
        StorageError: ``uri`` is a whole bucket (refused), or a storage fault.
    """
    location = resolve(uri)
    if location.scheme in _OBJECT_STORES and "/" not in location.path.strip("/"):
        raise StorageError(f"{location}: refusing to delete a whole bucket")
    found = kind(location)
    if found is None:
        return
    with storage_errors(location, "delete"):
        if found is Kind.FILE:
            location.filesystem.delete_file(location.path)
        else:
            location.filesystem.delete_dir(location.path)


# Conditional writes -----------------------------------------------------------------------------

# What S3 answers when the condition of a conditional PUT does not hold (412), or when another
# conditional write of the same key is in flight (409).
_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")
_S3_CLIENTS: dict[tuple[object, ...], Any] = {}


def write_bytes_if(uri: UriLike, data: bytes, *, expected: bytes | None) -> None:
    """Write a small file whole, only if it still holds ``expected`` (``None``: only if it does
    not exist): a compare-and-swap, so that two writers of one pointer never silently overwrite
    each other.

    Locally the check and the rename run under an exclusive lock (``flock``) on a hidden file
    beside the target, which every :func:`write_bytes_if` of that file takes. On S3 the PUT is
    conditional on the ETag read with the content (``If-Match``, or ``If-None-Match: *`` to
    create), so the store itself refuses a write that lost a race. Other stores are checked,
    then written: there a writer that reads between the two can still be overwritten.

    Raises:
        WriteConflict: the file does not hold ``expected``.
        StorageError: a storage fault.
    """
    location = resolve(uri)
    if location.is_local:
        _local_write_if(location, data, expected)
    elif location.scheme == "s3":
        _s3_write_if(location, data, expected)
    else:
        _check_unchanged(location, _read_or_none(location), expected)
        write_bytes(location, data)


def _check_unchanged(location: Location, current: bytes | None, expected: bytes | None) -> None:
    if current == expected:
        return
    if expected is None:
        raise WriteConflict(f"{location}: already exists (another writer created it)")
    if current is None:
        raise WriteConflict(f"{location}: was deleted by another writer since it was read")
    raise WriteConflict(f"{location}: was changed by another writer since it was read")


def _read_or_none(location: Location) -> bytes | None:
    try:
        return read_bytes(location)
    except StorageError:
        if kind(location) is None:
            return None
        raise


def _local_write_if(location: Location, data: bytes, expected: bytes | None) -> None:
    import fcntl  # POSIX, like the rest of the local-disk handling

    directory = os.path.dirname(location.path)
    with storage_errors(location, "write"):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f".{location.name}.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            _check_unchanged(location, _read_or_none(location), expected)
            write_bytes(location, data)


def _s3_write_if(location: Location, data: bytes, expected: bytes | None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(location)
    bucket, _, key = location.path.partition("/")
    try:
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
            current, etag = answer["Body"].read(), answer["ETag"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            current, etag = None, None
    except (BotoCoreError, ClientError) as err:
        raise _boto_fault(err, location, "read") from None
    _check_unchanged(location, current, expected)
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in _CONFLICT_CODES:
            raise WriteConflict(
                f"{location}: another writer changed it while this one wrote it (the store "
                "refused the conditional write)"
            ) from None
        raise _boto_fault(err, location, "write") from None
    except BotoCoreError as err:
        raise _boto_fault(err, location, "write") from None


def _s3_client(location: Location) -> Any:
    """A botocore S3 client with this module's endpoint, region and retries (pyarrow's
    filesystem cannot make a conditional PUT); cached per process and environment."""
    import botocore.session
    from botocore.config import Config

    settings = S3Settings.from_env()
    region = _s3_region(location, settings)
    key = (os.getpid(), settings, region)
    with _FILESYSTEMS_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            client = _S3_CLIENTS[key] = botocore.session.get_session().create_client(
                "s3",
                region_name=region,
                endpoint_url=settings.endpoint,
                config=Config(
                    retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=30,
                ),
            )
        return client


def _boto_fault(err: Exception, location: Location, action: str) -> StorageError:
    from botocore import exceptions

    # botocore's errors are not OSErrors: name the connection and credential ones as what they are.
    cause: Exception = err
    if isinstance(err, (exceptions.ConnectionError, exceptions.HTTPClientError)):
        cause = ConnectionError(str(err))
    elif isinstance(err, exceptions.NoCredentialsError):
        cause = PermissionError(str(err))
    translated = fault(cause, location, action)
    if translated is not None:
        return translated
    return StorageError(
        f"{location}: cannot {action}: {S3Settings.from_env().where} answered: {redact(str(err))}"
    )
