"""Service settings: environment variables with the ``CTCVR_`` prefix, each with a default.

==============================  ===============  =================================================
variable                        default          meaning
==============================  ===============  =================================================
``CTCVR_MODEL_DIR``             (one of the two) model directory written by ``trainer.export``: a
                                                 path or a URI (``s3://bucket/models/x``)
``CTCVR_MODEL_REPOSITORY``      (one of the two) model repository to follow (a path or a URI):
                                                 serve its current version, swap in new ones
``CTCVR_POLL_SECONDS``          ``10``           how often the repository's pointer is read
``CTCVR_MODEL_CACHE``           ``$TMPDIR/...``  where models and versions named by a URI are
                                                 fetched to (``<system temp dir>/ctcvr-models``)
``CTCVR_HOST``                  ``127.0.0.1``    address ``python -m serving`` listens on
``CTCVR_PORT``                  ``8000``         port
``CTCVR_WORKERS``               ``1``            worker processes (uvicorn's), sharing the tables
``CTCVR_WORKER_TIMEOUT_S``      ``120``          longest a worker may take to load the model
``CTCVR_API_TOKEN``             unset            bearer token required on ``/v1/*``; unset: open
``CTCVR_ADMIN_TOKEN``           unset            bearer token of ``/admin/*``; unset: admin off
``CTCVR_MAX_ROWS``              ``1024``         most rows per request (422 beyond)
``CTCVR_MAX_BODY_BYTES``        ``4194304``      largest request body (413 beyond)
``CTCVR_BATCH_MAX_ROWS``        ``4096``         most rows per model call
``CTCVR_BATCH_MAX_WAIT_MS``     ``2.0``          how long a request waits for others to batch with
``CTCVR_BATCH_MIN_ROWS``        ``64``           a batch this large runs in the worker at once; smaller on the loop
``CTCVR_MAX_QUEUE_ROWS``        ``65536``        rows allowed to wait for the model (503 beyond)
``CTCVR_REQUEST_TIMEOUT_S``     ``10.0``         longest wait for a score (503 beyond)
``CTCVR_TORCH_THREADS``         ``1``            intra-op threads of the model call
``CTCVR_GIL_SWITCH_MS``         ``0.1``          longest a thread holds the GIL while another
                                                 waits for it (Python's default: 5 ms)
``CTCVR_LOG_LEVEL``             ``info``         log level
``CTCVR_ENVIRONMENT``           ``development``  ``production`` refuses missing or short tokens
==============================  ===============  =================================================
"""

from __future__ import annotations

import os
import tempfile
from enum import Enum, unique
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import storage
from schemas.api import MAX_ROWS_LIMIT

__all__ = ["DEFAULT_MODEL_CACHE", "Environment", "ServingSettings", "get_settings"]

DEFAULT_MODEL_CACHE = Path(tempfile.gettempdir()) / "ctcvr-models"

_MIN_TOKEN_CHARS = 16


@unique
class Environment(str, Enum):
    DEVELOPMENT = "development"  # tokens optional
    PRODUCTION = "production"  # both tokens required, at least 16 characters


class ServingSettings(BaseSettings):
    """Configuration of the scoring service (see the module docstring for the variables)."""

    model_config = SettingsConfigDict(env_prefix="CTCVR_", extra="ignore", protected_namespaces=())

    model_dir: str | None = Field(
        default=None,
        description="model directory written by trainer.export: a path or a URI (s3://...)",
    )
    model_repository: str | None = Field(
        default=None,
        description="model repository to follow (a path or a URI): its current version is served",
    )
    poll_seconds: float = Field(
        default=10.0, gt=0.0, le=86_400.0, description="seconds between reads of the pointer"
    )
    model_cache: Path = Field(
        default=DEFAULT_MODEL_CACHE,
        description="directory that models and repository versions named by a URI are fetched to",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65_535)
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="worker processes; each loads the model, the embedding tables are shared",
    )
    worker_timeout_s: int = Field(
        default=120,
        ge=1,
        description="with workers: how long a new worker may take to load the model and a "
        "running one to answer the main process's health check before it is replaced",
    )
    api_token: SecretStr | None = None
    admin_token: SecretStr | None = None
    max_rows: int = Field(default=1024, ge=1, le=MAX_ROWS_LIMIT)
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    batch_max_rows: int = Field(default=4096, ge=1)
    batch_max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    batch_min_rows: int = Field(default=64, ge=1)
    max_queue_rows: int = Field(default=65_536, ge=1)
    request_timeout_s: float = Field(default=10.0, gt=0.0)
    torch_threads: int = Field(default=1, ge=1, le=256)
    gil_switch_ms: float = Field(
        default=0.1,
        gt=0.0,
        le=1000.0,
        description="Python's switch interval: how long the thread holding the GIL keeps it "
        "while another waits. The micro-batcher's thread takes the GIL back after every torch "
        "operation; with Python's 5 ms it waited behind the parsing of other requests (see "
        "serving.main)",
    )
    log_level: str = Field(default="info", pattern=r"^(critical|error|warning|info|debug|trace)$")
    environment: Environment = Environment.DEVELOPMENT

    @field_validator("model_dir", "model_repository", mode="before")
    @classmethod
    def _path_or_uri(cls, value: Any) -> Any:
        """A ``Path`` is accepted as its text; a URI with credentials in it is refused."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and value:
            try:
                storage.resolve(value)
            except storage.StorageError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _safe(self) -> ServingSettings:
        if self.model_dir is not None and self.model_repository is not None:
            raise ValueError(
                "CTCVR_MODEL_DIR (--model-dir) and CTCVR_MODEL_REPOSITORY (--repository) are "
                "mutually exclusive: serve one model directory, or follow a repository"
            )
        for name in ("api_token", "admin_token"):
            token = getattr(self, name)
            if token is not None and not token.get_secret_value().strip():
                raise ValueError(f"CTCVR_{name.upper()} is set but empty; unset it or give a token")
        if self.environment is Environment.PRODUCTION:
            for name in ("api_token", "admin_token"):
                token = getattr(self, name)
                if token is None or len(token.get_secret_value()) < _MIN_TOKEN_CHARS:
                    raise ValueError(
                        f"CTCVR_{name.upper()} must be set to at least {_MIN_TOKEN_CHARS} characters "
                        "when CTCVR_ENVIRONMENT=production"
                    )
        if self.batch_max_rows < self.max_rows:
            raise ValueError(
                f"CTCVR_BATCH_MAX_ROWS ({self.batch_max_rows}) must be >= CTCVR_MAX_ROWS ({self.max_rows})"
            )
        return self


@lru_cache
def get_settings() -> ServingSettings:
    """The settings from the environment, read once (tests override this dependency)."""
    return ServingSettings()
