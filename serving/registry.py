"""The model being served, and hot reload: load beside the old model, then swap one reference.

Requests take ``registry.current`` once and keep that scorer to the end, so a swap never changes
the model under a request; requests already queued for the old model are still scored by it. A
reload that fails leaves the old model serving and records why.

A model directory named by a URI (``s3://...``) is fetched into the local cache and verified
first (``serving.fetch``), then loaded from there like any local directory.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from schemas.api import ReloadResponse
from schemas.host_memory import release_free_memory
from serving.artifact import ArtifactError, load_artifact
from serving.config import DEFAULT_MODEL_CACHE
from serving.fetch import is_remote, local_model_dir
from serving.metrics import ServiceMetrics
from serving.scorer import Scorer

__all__ = ["ModelRegistry", "ReloadInProgress"]

log = logging.getLogger("ctcvr.serving")


class ReloadInProgress(RuntimeError):
    """Another reload is running (HTTP 409)."""


class ModelRegistry:
    """Holds the current :class:`Scorer`.

    Args:
        model_dir: the directory loaded at startup and by a reload that names none: a path or a
            URI.
        max_rows: the most rows per request, for the request model.
        metrics: updated on every load.
        model_cache: where models named by a URI are fetched to.
    """

    def __init__(
        self,
        model_dir: str | Path | None,
        max_rows: int,
        metrics: ServiceMetrics,
        model_cache: Path = DEFAULT_MODEL_CACHE,
    ) -> None:
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.max_rows = max_rows
        self.metrics = metrics
        self.model_cache = model_cache
        self.current: Scorer | None = None
        self.last_reload_error: str | None = None
        self._reload_lock = threading.Lock()

    def load(self) -> Scorer:
        """Load ``model_dir`` at startup.

        Raises:
            ArtifactError: no directory configured, or the artifact cannot be served.
        """
        if self.model_dir is None:
            raise ArtifactError("no model directory: set CTCVR_MODEL_DIR or pass --model-dir")
        scorer = self._scorer(self.model_dir)
        self._swap(scorer)
        return scorer

    def reload(self, model_dir: str | Path | None = None) -> ReloadResponse:
        """Load ``model_dir`` (default: the directory last loaded) and serve it from now on.

        Raises:
            ReloadInProgress: another reload is running.
            ArtifactError: the new artifact cannot be served; the old model keeps serving.
        """
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadInProgress("a reload is already in progress")
        try:
            target = str(model_dir) if model_dir is not None else self.model_dir
            previous = self.current.version if self.current is not None else None
            start = time.perf_counter()
            try:
                if target is None:
                    raise ArtifactError("no model directory given and none configured")
                scorer = self._scorer(target)
            except ArtifactError as err:
                self.last_reload_error = str(err)
                self.metrics.reloads.labels(result="failure").inc()
                log.error("reload of %s failed, still serving %s: %s", target, previous, err)
                raise
            seconds = time.perf_counter() - start
            self.model_dir = target
            self.last_reload_error = None
            self._swap(scorer)
            self.metrics.reloads.labels(result="success").inc()
            log.info("reloaded %s: now serving %s (was %s)", target, scorer.version, previous)
            return ReloadResponse(
                version=scorer.version,
                previous_version=previous,
                model_dir=str(target),
                seconds=seconds,
            )
        finally:
            self._reload_lock.release()

    def _scorer(self, model_dir: str) -> Scorer:
        """Fetch (a URI), verify and load ``model_dir``.

        Raises:
            ArtifactError: it cannot be fetched or served (named).
        """
        artifact = load_artifact(local_model_dir(model_dir, self.model_cache))
        release_free_memory()  # the load's temporaries: the heaps keep freed memory otherwise
        return Scorer(
            artifact, self.max_rows, model_dir=model_dir if is_remote(model_dir) else None
        )

    def _swap(self, scorer: Scorer) -> None:
        self.current = scorer  # one reference assignment: atomic for readers
        manifest = scorer.artifact.manifest
        self.metrics.set_model(manifest.version, manifest.schema_fingerprint)
