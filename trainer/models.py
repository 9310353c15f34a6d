"""Manage a model repository: list its versions, promote one, roll back, print the current one.

::

    python -m trainer.models list --repository s3://ml/models/demo [--json]
    python -m trainer.models promote demo-step00000200-3f2a9c1b0d --repository s3://ml/models/demo
    python -m trainer.models rollback --repository s3://ml/models/demo
    python -m trainer.models current --repository s3://ml/models/demo [--uri] [--allow-empty]

Versions are published by ``python -m trainer.export --run RUN --repository REPO``; the layout and
the pointer are ``schemas.repository``'s. ``promote`` and ``rollback`` verify the version they
make current as publishing does (checksums read back from the store, the service's loader, a
scoring smoke check): one that fails cannot be made current. Both move the pointer with a
compare-and-swap against the pointer read before verifying, so a publish or another operator's
change in the meantime is never overwritten (the command fails and says so). Every replica
following the repository (``python -m serving --repository REPO``) serves the new current
version within about one poll interval.

``current`` prints the current version (``--uri``: its directory, e.g. to warm-start the next
training run from it); an empty repository is an error unless ``--allow-empty``, which prints
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from schemas.repository import (
    ModelRepository,
    PointerState,
    RepositoryError,
    VersionInfo,
)
from schemas.storage import StorageError
from trainer.publish import VerificationError, verify_version

__all__ = ["main"]

LISTED_METRICS = ("ctr_auc", "cvr_auc", "ctcvr_auc")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        repo = ModelRepository(args.repository)
        return args.command(repo, args)
    except (RepositoryError, StorageError, VerificationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.models", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--repository", required=True, help="the model repository (a path or a URI)"
        )
        sub.set_defaults(command=run)
        return sub

    listing = command("list", "list the versions, newest first", _list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    promote = command("promote", "verify a version and make it current", _promote)
    promote.add_argument("version", help="the version id (see list)")
    command("rollback", "verify the previous version and make it current again", _rollback)
    current = command("current", "print the current version", _current)
    current.add_argument("--uri", action="store_true", help="print its directory's path or URI")
    current.add_argument(
        "--allow-empty", action="store_true", help="print nothing for an empty repository"
    )
    return parser


def _list(repo: ModelRepository, args: argparse.Namespace) -> int:
    state = repo.read_pointer()
    versions = repo.versions()
    if args.json:
        print(json.dumps(_as_json(repo, state, versions), indent=2))
        return 0
    if not versions and state.pointer is None:
        print(f"repository {repo.uri} is empty")
        return 0
    pointer = state.pointer
    if pointer is not None:
        print(
            f"repository {repo.uri}: current {pointer.version} (generation {pointer.generation}, "
            f"{pointer.change.value} at {pointer.updated_at:%Y-%m-%d %H:%M:%S} UTC), previous "
            f"{pointer.previous or 'none'}"
        )
    else:
        print(f"repository {repo.uri}: no current version")
    rows = [_row(info, state) for info in versions]
    header = ["version", "state", "created (UTC)", "step", *LISTED_METRICS, "role"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for info in versions:
        if info.detail is not None:
            print(f"{info.version} {info.state.value}: {info.detail}")
    return 0


def _row(info: VersionInfo, state: PointerState) -> list[str]:
    manifest = info.manifest
    created = f"{info.time:%Y-%m-%d %H:%M:%S}" if info.time is not None else "-"
    metrics = [
        _number(manifest.metrics.get(name)) if manifest is not None else "-"
        for name in LISTED_METRICS
    ]
    step = str(manifest.source.step) if manifest is not None else "-"
    return [info.version, info.state.value, created, step, *metrics, _role(info.version, state)]


def _role(version: str, state: PointerState) -> str:
    pointer = state.pointer
    if pointer is None:
        return ""
    if version == pointer.version:
        return "current"
    return "previous" if version == pointer.previous else ""


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _as_json(
    repo: ModelRepository, state: PointerState, versions: list[VersionInfo]
) -> dict[str, Any]:
    return {
        "repository": repo.uri,
        "pointer": state.pointer.model_dump(mode="json") if state.pointer is not None else None,
        "versions": [
            {
                "version": info.version,
                "state": info.state.value,
                "role": _role(info.version, state) or None,
                "created_at": info.time.isoformat() if info.time is not None else None,
                "step": info.manifest.source.step if info.manifest is not None else None,
                "run_dir": info.manifest.source.run_dir if info.manifest is not None else None,
                "metrics": info.manifest.metrics if info.manifest is not None else {},
                "detail": info.detail,
            }
            for info in versions
        ],
    }


def _promote(repo: ModelRepository, args: argparse.Namespace) -> int:
    base = repo.read_pointer()  # the pointer the change is based on: checked when written
    if base.version == args.version:
        print(f"{args.version} is current already in {repo.uri}")
        return 0
    verify_version(repo, args.version)
    pointer = repo.promote(args.version, base=base)
    print(
        f"promoted {pointer.version}: current in {repo.uri} (generation {pointer.generation}), "
        f"previous {pointer.previous or 'none'}"
    )
    return 0


def _rollback(repo: ModelRepository, args: argparse.Namespace) -> int:
    base = repo.read_pointer()
    target = repo.rollback_target(base)
    verify_version(repo, target)
    pointer = repo.rollback(base=base)
    print(
        f"rolled back from {base.version} to {pointer.version} in {repo.uri} (generation "
        f"{pointer.generation}), previous now {pointer.previous or 'none'}"
    )
    return 0


def _current(repo: ModelRepository, args: argparse.Namespace) -> int:
    version = repo.current()
    if version is None:
        if args.allow_empty:
            return 0
        raise RepositoryError(f"repository {repo.uri} is empty: no version was published to it")
    print(repo.version_location(version).uri if args.uri else version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
