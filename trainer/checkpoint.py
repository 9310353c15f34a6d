"""Sharded checkpoints with ``torch.distributed.checkpoint``: each rank writes only its shards.

Layout of a run directory::

    checkpoints/step_00000500/   DCP files (model + optimizer state, sharded) and
                                 meta.json (step, schema fingerprint, resolved config),
                                 rank<R>.pt (each rank's RNG and data-stream position)
    checkpoints/latest           name of the newest complete checkpoint

``latest`` is replaced atomically after every rank has finished writing, so a run killed while
saving resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.distributed import DistContext

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or belongs to another schema."""


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    schema_fingerprint: str
    config: dict[str, Any]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none."""
    pointer = checkpoint_root(run_dir) / _LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def save_checkpoint(
    run_dir: str | Path,
    ctx: DistContext,
    model: nn.Module,
    optimizer: Any,
    meta: CheckpointMeta,
    rank_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint collectively (every rank must call it) and point ``latest`` at it.

    ``rank_state`` is this rank's own small state (e.g. its data-stream position); it is saved
    with the rank's RNG states and handed back by :func:`load_checkpoint`.
    """
    root = checkpoint_root(run_dir)
    path = root / f"step_{meta.step:08d}"
    if ctx.is_main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    dcp.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(path)
    )
    torch.save({"rng": _rng_state(), "state": rank_state or {}}, path / f"rank{ctx.rank}.pt")
    dist.barrier()
    if ctx.is_main:
        (path / "meta.json").write_text(json.dumps(meta.__dict__, indent=2, default=str))
        tmp = root / f".{_LATEST}.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / _LATEST)
        _prune(root, keep)
    dist.barrier()
    return path


def load_checkpoint(
    path: Path, ctx: DistContext, model: nn.Module, optimizer: Any, schema_fingerprint: str
) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Load a checkpoint in place into the (sharded) model and optimizer; restore RNG states.

    Returns:
        The checkpoint's metadata and this rank's ``rank_state`` (empty if the checkpoint was
        written by fewer ranks than there are now).

    Raises:
        CheckpointError: the checkpoint was written for another feature schema.
    """
    meta = CheckpointMeta(**json.loads((path / "meta.json").read_text()))
    if meta.schema_fingerprint != schema_fingerprint:
        raise CheckpointError(
            f"{path} was trained on another feature schema "
            f"({meta.schema_fingerprint[:12]} != {schema_fingerprint[:12]}); refusing to resume"
        )
    # Optimizer state (Adam's moments) is created lazily at the first step, and DCP only loads
    # keys the target already has: a zero-gradient step creates them. The parameters it touches
    # are overwritten by the checkpoint right after.
    optimizer.init_state()
    optimizer.zero_grad(set_to_none=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rank_file = path / f"rank{ctx.rank}.pt"
    if not rank_file.is_file():  # resuming with more ranks than were saved
        return meta, {}
    saved = torch.load(rank_file, weights_only=True)
    _set_rng_state(saved["rng"])
    return meta, saved["state"]


# Only torch's generators drive training randomness (dropout); the reader seeds its own
# generator from (seed, epoch, rank), so these tensors are the whole random state of a rank.
def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
