"""Start the scoring service: ``python -m serving --model-dir DIR [--host H] [--port P]
[--workers N]``, or ``python -m serving --repository URI [--poll-seconds S]`` to follow a model
repository.

Every option can also be given as an environment variable (``CTCVR_MODEL_DIR``,
``CTCVR_MODEL_REPOSITORY``, ``CTCVR_POLL_SECONDS``, ``CTCVR_HOST``, ``CTCVR_PORT``,
``CTCVR_WORKERS``; the others are listed in ``serving/config.py``); an option wins over its
variable. A model directory and a repository are mutually exclusive, as options or variables. ``DIR`` may be a URI
(``s3://bucket/models/x``): it is fetched into ``CTCVR_MODEL_CACHE`` and verified first
(``serving.fetch``). ``--check`` loads and verifies the model directory (or the repository's
current version), prints what it holds, and exits.

With ``--workers N`` (N > 1) uvicorn runs N worker processes on one socket, each with its own
model (``serving.main.worker_app``), whose embedding tables are memory-mapped from the model
directory, so the workers share one copy of them. This process only supervises: it verifies the
model directory first in a child process (``--check``: a bad model is one plain error, and this
process never holds a model), passes its options to the workers as ``CTCVR_*`` variables,
restarts a worker that dies, and on SIGHUP replaces every worker, one at a time, with one that
loads ``CTCVR_MODEL_DIR`` again (the way to reload a multi-worker service: ``/admin/reload``
would reach one worker only, so it answers 409 there). Following a repository, every worker
polls the pointer itself and loads each new version from the same cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from serving.config import ServingSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model-dir", help="model directory written by trainer.export: a path or a URI (s3://...)"
    )
    model.add_argument(
        "--repository",
        help="model repository to follow (a path or a URI): serve its current version and swap "
        "in new ones",
    )
    parser.add_argument(
        "--poll-seconds", type=float, help="seconds between reads of the repository's pointer"
    )
    parser.add_argument(
        "--model-cache", type=Path, help="where models and versions named by a URI are fetched to"
    )
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument(
        "--workers", type=int, help="worker processes sharing the embedding tables (default 1)"
    )
    parser.add_argument("--log-level", help="critical, error, warning, info, debug")
    parser.add_argument("--check", action="store_true", help="verify the model directory and exit")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "model_dir": args.model_dir,
            "model_cache": args.model_cache,
            "model_repository": args.repository,
            "poll_seconds": args.poll_seconds,
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    try:
        settings = ServingSettings(**overrides)
    except ValidationError as err:
        for item in err.errors():
            print(
                f"error: {'.'.join(map(str, item['loc'])) or 'settings'}: {item['msg']}",
                file=sys.stderr,
            )
        return 2
    if settings.workers > 1 and not args.check:
        return _serve_with_workers(settings, overrides)
    from serving.artifact import ArtifactError
    from serving.main import configure_logging
    from serving.metrics import ServiceMetrics
    from serving.registry import ModelRegistry
    from serving.repository import follow_repository

    configure_logging(settings.log_level)
    registry = ModelRegistry(
        settings.model_dir, settings.max_rows, ServiceMetrics(), settings.model_cache
    )
    follower = (
        follow_repository(settings, registry) if settings.model_repository is not None else None
    )
    try:  # before the server starts: a bad artifact is a plain error
        scorer = follower.load_initial() if follower is not None else registry.load()
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    manifest = scorer.artifact.manifest
    print(
        f"model {manifest.version} from {scorer.model_dir}: step {manifest.source.step} of "
        f"{manifest.source.run_dir} "
        f"({manifest.source.objective}), {len(scorer.artifact.schema.sparse)} sparse and "
        f"{len(scorer.artifact.schema.dense)} dense features",
        flush=True,
    )
    if args.check:
        return 0

    import uvicorn

    from serving.main import create_app

    uvicorn.run(
        create_app(settings, registry, follower),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    return 0


def _serve_with_workers(settings: ServingSettings, overrides: dict[str, object]) -> int:
    """uvicorn's worker processes, each building :func:`serving.main.worker_app`."""
    # The workers are new interpreters: they read the settings from the environment.
    os.environ.update({f"CTCVR_{key.upper()}": str(value) for key, value in overrides.items()})
    check = subprocess.run([sys.executable, "-m", "serving", "--check"], check=False)
    if check.returncode != 0:
        return check.returncode
    import uvicorn

    uvicorn.run(
        "serving.main:worker_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_worker_healthcheck=settings.worker_timeout_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
