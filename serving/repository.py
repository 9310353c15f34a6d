"""Follow a model repository: serve its current version, and swap in every new one.

``python -m serving --repository URI`` (``CTCVR_MODEL_REPOSITORY``; the layout and the pointer
are ``schemas.repository``'s):

1. **At startup** the version the pointer names is loaded. If it cannot be, the versions that were
   current before it are tried in turn (the pointer's history, at most
   :data:`STARTUP_FALLBACKS`), so that a new replica serves what the healthy ones still serve;
   an empty repository, or none of them loading, fails the startup.
2. **Then** a background thread reads the pointer every ``CTCVR_POLL_SECONDS``. When it names
   another version, that version is fetched (from a URI into ``CTCVR_MODEL_CACHE``, each file's
   checksum checked as it arrives; a local repository is read where it is), loaded and checked
   beside the served model, and swapped in by the hot-reload path (``ModelRegistry.reload``):
   requests in flight finish on the model they started with.
3. **A version that cannot be loaded is refused**: the served model stays, the refusal is logged
   with the version and the reason, counted (``ctcvr_repository_refused_versions_total``) and
   shown by ``/readyz`` and ``/v1/model``; the same version is not tried again until the pointer
   changes (a new generation). A storage fault (the store unreachable, denied) is not the
   version's fault: it is logged and the next poll tries again.

The thread is stopped at shutdown (it finishes a load in progress first).

Example::

    follower = RepositoryFollower(ModelRepository("s3://ml/models"), registry, metrics,
                                  poll_seconds=10, cache_dir=Path("/tmp/ctcvr-models"))
    follower.load_initial()
    follower.start()
    ...
    follower.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, unique
from pathlib import Path

from schemas.api import RepositoryStatus
from schemas.repository import ModelRepository, Pointer, RepositoryError
from schemas.storage import StorageError
from serving.artifact import ArtifactError
from serving.config import ServingSettings
from serving.fetch import CACHE_KEEP, StoreUnavailable, local_model_dir
from serving.metrics import ServiceMetrics
from serving.registry import ModelRegistry, ReloadInProgress
from serving.scorer import Scorer

__all__ = [
    "CACHE_KEEP",
    "STARTUP_FALLBACKS",
    "PollResult",
    "RepositoryFollower",
    "fetch_version",
    "follow_repository",
]

log = logging.getLogger("ctcvr.serving")

STARTUP_FALLBACKS = 3  # earlier versions tried at startup when the current one cannot be loaded
_STOP_TIMEOUT_S = 60.0


@unique
class PollResult(str, Enum):
    """What one read of the pointer came to (the ``result`` label of the polls counter)."""

    UNCHANGED = "unchanged"  # the served version is current
    LOADED = "loaded"  # a new version is served
    REFUSED = "refused"  # the version named cannot be loaded; the old one keeps serving
    SKIPPED = "skipped"  # the version named was refused before, and the pointer has not moved
    ERROR = "error"  # the pointer or the version could not be read (storage); retried
    BUSY = "busy"  # another reload was running; retried


@dataclass(frozen=True)
class _Refusal:
    version: str
    generation: int
    reason: str


def fetch_version(repository: ModelRepository, version: str, cache_dir: Path) -> Path:
    """The local directory of a ready version of ``repository``.

    A local repository's version is used where it is. A version named by a URI is fetched as
    any model URI is (``serving.fetch``): once into ``cache_dir``, every file's checksum checked
    as it arrives, an entry whole or absent and shared by the processes using the cache.

    Raises:
        RepositoryError: the version is not ready (rejected, incomplete, unknown).
        ArtifactError: a file does not match its checksum, or the cache cannot be written.
        StoreUnavailable: a storage fault while fetching (an ``ArtifactError``).
        StorageError: a storage fault while reading the version's state.
    """
    location = repository.version_location(version)
    repository.read_ready(version)
    return local_model_dir(str(location), cache_dir)


class RepositoryFollower:
    """Serves a repository's current version through a :class:`ModelRegistry`.

    Args:
        repository: the repository followed.
        registry: the service's registry; versions are loaded and swapped in through it.
        metrics: the service's metrics (the ``ctcvr_repository_*`` series).
        poll_seconds: time between reads of the pointer.
        cache_dir: where versions named by a URI are fetched to.
    """

    def __init__(
        self,
        repository: ModelRepository,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        *,
        poll_seconds: float,
        cache_dir: Path,
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.cache_dir = cache_dir
        self._lock = threading.Lock()  # the status fields below, read by request threads
        self._pointer: Pointer | None = None
        self._refusal: _Refusal | None = None
        self._last_poll_at: datetime | None = None
        self._last_poll_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Startup ------------------------------------------------------------------------------------

    def load_initial(self) -> Scorer:
        """Load the current version (or, if it cannot be loaded, the latest earlier one that
        can).

        Raises:
            ArtifactError: the pointer cannot be read, the repository is empty, or no version
                tried can be loaded (the message gives each one's reason).
        """
        uri = self.repository.uri
        try:
            state = self.repository.read_pointer()
        except (StorageError, RepositoryError) as err:
            raise ArtifactError(f"cannot read model repository {uri}: {err}") from None
        pointer = state.pointer
        if pointer is None:
            raise ArtifactError(
                f"model repository {uri} is empty (no pointer): publish a version first, with "
                f"python -m trainer.export --run RUN --repository {uri}"
            )
        with self._lock:
            self._pointer = pointer
        failures = []
        for version in (pointer.version, *pointer.history[:STARTUP_FALLBACKS]):
            try:
                self.registry.model_dir = fetch_version(self.repository, version, self.cache_dir)
                scorer = self.registry.load()
            except (ArtifactError, RepositoryError, StorageError, OSError) as err:
                reason = _reason(err)
                failures.append(f"{version}: {reason}")
                if version == pointer.version and not isinstance(
                    err, (StorageError, StoreUnavailable)
                ):
                    self._refuse(pointer, reason)
                log.error("cannot serve version %s of %s: %s", version, uri, reason)
                continue
            if version != pointer.version:
                log.warning(
                    "serving %s, an earlier version of %s: the current one, %s, cannot be loaded",
                    version,
                    uri,
                    pointer.version,
                )
            self._publish_metrics()
            return scorer
        raise ArtifactError(
            f"no version of model repository {uri} can be served: " + "; ".join(failures)
        )

    # Polling ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Poll in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ctcvr-repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; a load in progress finishes first."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                log.warning("the repository poll thread is still loading a model; not waiting")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the thread must outlive any one poll
                log.exception("polling model repository %s failed", self.repository.uri)

    def poll_once(self) -> PollResult:
        """Read the pointer; load and swap in the version it names if that is new."""
        result = self._poll()
        self.metrics.polls.labels(result=result.value).inc()
        self.metrics.last_poll.set(time.time())
        self._publish_metrics()
        return result

    def _poll(self) -> PollResult:
        uri = self.repository.uri
        served = self._served()
        try:
            pointer = self.repository.read_pointer().pointer
            if pointer is None:
                raise RepositoryError(f"{uri} has no pointer any more (emptied?)")
        except (StorageError, RepositoryError) as err:
            self._poll_failed(f"cannot read the pointer: {err}")
            log.warning("cannot read the pointer of %s, still serving %s: %s", uri, served, err)
            return PollResult.ERROR
        with self._lock:
            self._pointer = pointer
            self._last_poll_at = datetime.now(UTC)
            self._last_poll_error = None
            refusal = self._refusal
            if refusal is not None and (refusal.version, refusal.generation) != (
                pointer.version,
                pointer.generation,
            ):
                self._refusal = refusal = None  # the pointer moved on
        if pointer.version == served:
            return PollResult.UNCHANGED
        if refusal is not None:
            return PollResult.SKIPPED
        return self._load(pointer, served)

    def _load(self, pointer: Pointer, served: str | None) -> PollResult:
        version, uri = pointer.version, self.repository.uri
        log.info("model repository %s names %s (serving %s): loading it", uri, version, served)
        start = time.perf_counter()
        try:
            local = fetch_version(self.repository, version, self.cache_dir)
            fetched = time.perf_counter()
            self.registry.reload(local)
        except ReloadInProgress:
            return PollResult.BUSY
        except (StorageError, StoreUnavailable) as err:
            self._poll_failed(f"cannot fetch {version}: {err}")
            log.warning("cannot fetch %s of %s, still serving %s: %s", version, uri, served, err)
            return PollResult.ERROR
        except (ArtifactError, RepositoryError, OSError) as err:
            reason = _reason(err)
            self._refuse(pointer, reason)
            log.error(
                "refused version %s of %s, still serving %s: %s (not tried again until the "
                "pointer moves)",
                version,
                uri,
                served,
                reason,
            )
            return PollResult.REFUSED
        log.info(
            "now serving %s of %s (was %s): fetched in %.2f s, loaded in %.2f s",
            version,
            uri,
            served,
            fetched - start,
            time.perf_counter() - fetched,
        )
        return PollResult.LOADED

    def _refuse(self, pointer: Pointer, reason: str) -> None:
        with self._lock:
            self._refusal = _Refusal(pointer.version, pointer.generation, reason)
        self.metrics.refused_versions.inc()

    def _poll_failed(self, reason: str) -> None:
        with self._lock:
            self._last_poll_at = datetime.now(UTC)
            self._last_poll_error = reason

    # Status -------------------------------------------------------------------------------------

    def _served(self) -> str | None:
        scorer = self.registry.current
        return scorer.version if scorer is not None else None

    def status(self) -> RepositoryStatus:
        """What ``/v1/model`` and ``/readyz`` show of the repository."""
        served = self._served()
        with self._lock:
            pointer, refusal = self._pointer, self._refusal
            return RepositoryStatus(
                uri=self.repository.uri,
                current=pointer.version if pointer is not None else None,
                generation=pointer.generation if pointer is not None else None,
                in_sync=pointer is not None and pointer.version == served,
                refused_version=refusal.version if refusal is not None else None,
                refused_reason=refusal.reason if refusal is not None else None,
                last_poll_at=self._last_poll_at,
                last_poll_error=self._last_poll_error,
            )

    def detail(self) -> str | None:
        """One line for ``/readyz`` when the replica is not serving the current version."""
        status = self.status()
        served = self._served()
        if status.refused_version is not None:
            return (
                f"repository {status.uri}: version {status.refused_version} refused, serving "
                f"{served}: {status.refused_reason}"
            )
        if status.last_poll_error is not None:
            return f"repository {status.uri}: {status.last_poll_error}; serving {served}"
        if not status.in_sync:
            return f"repository {status.uri}: current is {status.current}, serving {served}"
        return None

    def _publish_metrics(self) -> None:
        status = self.status()
        self.metrics.set_repository(status.current, self._served(), status.refused_version)


def follow_repository(settings: ServingSettings, registry: ModelRegistry) -> RepositoryFollower:
    """The follower of ``settings.model_repository`` that loads versions into ``registry``.

    Raises:
        ValueError: no repository is configured.
    """
    if settings.model_repository is None:
        raise ValueError("no model repository configured (CTCVR_MODEL_REPOSITORY)")
    return RepositoryFollower(
        ModelRepository(settings.model_repository),
        registry,
        registry.metrics,
        poll_seconds=settings.poll_seconds,
        cache_dir=settings.model_cache,
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, StorageError):
        return f"cannot write the model cache: {err}"
    return str(err)
