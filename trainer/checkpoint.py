"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes only its shards.

A checkpoint (a :class:`~trainer.run_dir.CheckpointDir` of the run) holds DCP's files of::

    {"model": TrainModule.state_dict(), "optimizer": CombinedOptimizer.state_dict()}

then ``meta.json`` (:class:`~trainer.run_dir.CheckpointMeta`: step, schema fingerprint, resolved
config) and each rank's RNG and data-stream position; the run's ``latest`` pointer moves to it
atomically once every rank has finished, so a run killed while saving resumes from the previous
complete checkpoint.

**Storage.** A checkpoint on the local disk is written and read with DCP's
``FileSystemWriter`` / ``FileSystemReader``; one named by a URI (``s3://...``, any
``schemas.storage`` scheme) with its fsspec twins ``FsspecWriter`` / ``FsspecReader``
configured by ``schemas.storage.fsspec_options`` (endpoint, region, ``AWS_MAX_ATTEMPTS``
retries; credentials from the environment). Either way each rank writes only its own files.
A storage fault (the store unreachable after its retries, denied access, a missing bucket) is a
``schemas.storage.StorageError`` naming the checkpoint and what to check; a checkpoint whose
files are truncated or corrupt is a :class:`CheckpointError` naming the file, found before
anything is loaded where the sizes tell (DCP's ``.metadata`` records where every tensor ends).

A CTR/CVR model's tensor ``mmoe.gates.ctr.weight`` is ``model.model.mmoe.gates.ctr.weight`` in
the checkpoint (the checkpoint's ``model`` entry, then ``TrainModule.model``);
:func:`checkpoint_key` and :func:`model_key` map between the two, and no other module spells the
prefix. Readers that need only the model (evaluation, export, the benchmarks) use
:func:`load_model_weights`, :func:`model_tensor_specs` and :func:`read_model_tensors`, which load
no optimizer state.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import (
    FileSystemReader,
    FileSystemWriter,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from schemas import storage
from schemas.storage import StorageError
from trainer.distributed import DistContext, barrier, is_distributed
from trainer.run_dir import CheckpointDir, CheckpointError, CheckpointMeta, RunDir

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "TensorSpec",
    "check_files",
    "check_schema",
    "checkpoint_key",
    "find_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "load_training_state",
    "model_key",
    "model_tensor_specs",
    "read_model_tensors",
    "save_checkpoint",
    "save_model_checkpoint",
]

_MODEL = "model"  # the checkpoint's entry holding the TrainModule's state dict
_OPTIMIZER = "optimizer"
# TrainModule keeps the CTR/CVR model as its ``model`` attribute.
_MODEL_PREFIX = f"{_MODEL}.model."
_DCP_METADATA = ".metadata"  # the file DCP writes last, naming every tensor and its shards


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor stored in a checkpoint."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_key(model_key: str) -> str:
    """The checkpoint key of a CTR/CVR model's state-dict key (``model.model.<key>``)."""
    return _MODEL_PREFIX + model_key


def model_key(checkpoint_key: str) -> str | None:
    """The model's state-dict key of a checkpoint key; None for what is not the model's (an
    objective's parameters, the optimizer state)."""
    return (
        checkpoint_key.removeprefix(_MODEL_PREFIX)
        if checkpoint_key.startswith(_MODEL_PREFIX)
        else None
    )


# Training: the whole state, every rank ---------------------------------------------------------


def save_checkpoint(
    run: RunDir,
    ctx: DistContext,
    model: nn.Module,
    optimizer: Any,
    meta: CheckpointMeta,
    rank_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> CheckpointDir:
    """Write a checkpoint collectively (every rank must call it) and point ``latest`` at it.

    Args:
        run: the run directory.
        ctx: this process's distributed context.
        model: the sharded ``TrainModule`` (DMP).
        optimizer: its optimizer (``build_optimizer``).
        meta: the checkpoint's metadata; its step names the checkpoint.
        rank_state: this rank's own small state (e.g. its data-stream position), saved with
            the rank's RNG states and handed back by :func:`load_checkpoint`.
        keep: checkpoints kept; older ones are deleted.

    Returns:
        The checkpoint written.
    """
    checkpoint = run.new_checkpoint(meta.step) if ctx.is_main else run.checkpoint(meta.step)
    barrier(ctx)
    with _dcp_errors(checkpoint, "write"):
        dcp.save(
            {_MODEL: model.state_dict(), _OPTIMIZER: optimizer.state_dict()},
            storage_writer=_writer(checkpoint),
        )
    checkpoint.write_rank_state(
        ctx.rank, _to_bytes({"rng": _rng_state(), "state": rank_state or {}})
    )
    barrier(ctx)
    if ctx.is_main:
        checkpoint.write_meta(meta)
        run.set_latest(checkpoint)
        run.delete_old_checkpoints(keep)
    barrier(ctx)
    return checkpoint


def load_checkpoint(
    checkpoint: CheckpointDir,
    ctx: DistContext,
    model: nn.Module,
    optimizer: Any,
    schema_fingerprint: str,
) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Load a checkpoint in place into the (sharded) model and optimizer; restore RNG states.

    Returns:
        The checkpoint's metadata and this rank's ``rank_state`` (empty if the checkpoint was
        written by fewer ranks than there are now).

    Raises:
        CheckpointError: malformed metadata, a checkpoint of another feature schema, a
            truncated or corrupt file (named).
        StorageError: a storage fault reading it.
    """
    meta = checkpoint.read_meta()
    check_schema(checkpoint, meta, schema_fingerprint, "refusing to resume")
    check_files(checkpoint)
    load_training_state(checkpoint, model, optimizer)
    data = checkpoint.read_rank_state(ctx.rank)
    if data is None:  # resuming with more ranks than were saved
        return meta, {}
    saved = torch.load(io.BytesIO(data), weights_only=True)
    _set_rng_state(saved["rng"])
    return meta, saved["state"]


def load_training_state(checkpoint: CheckpointDir, model: nn.Module, optimizer: Any) -> None:
    """Load a checkpoint's weights (model and objective) and optimizer state in place; nothing
    of the run's progress (step, RNG, data position). Every rank must call it; the checkpoint
    may have been written by any number of ranks (DCP reshards).

    What :func:`load_checkpoint` resumes with, and what a warm start with the optimizer state
    (``trainer.warm_start``) starts from.

    Args:
        checkpoint: a complete checkpoint.
        model: the sharded ``TrainModule`` (DMP).
        optimizer: its optimizer (``build_optimizer``).

    Raises:
        CheckpointError: a tensor of ``model`` or of the optimizer state that the checkpoint
            does not hold, or holds with another shape (named).
    """
    # Optimizer state (Adam's moments) is created lazily at the first step, and DCP only loads
    # keys the target already has: a zero-gradient step creates them. The parameters it touches
    # are overwritten by the checkpoint right after.
    optimizer.init_state()
    optimizer.zero_grad(set_to_none=True)
    state = {_MODEL: model.state_dict(), _OPTIMIZER: optimizer.state_dict()}
    with _dcp_errors(checkpoint, "read"):
        dcp.load(state, storage_reader=_reader(checkpoint))
    model.load_state_dict(state[_MODEL])
    optimizer.load_state_dict(state[_OPTIMIZER])


def check_schema(
    checkpoint: CheckpointDir, meta: CheckpointMeta, schema_fingerprint: str, consequence: str
) -> None:
    """Raises: CheckpointError: ``checkpoint`` was trained on another feature schema."""
    if meta.schema_fingerprint != schema_fingerprint:
        raise CheckpointError(
            f"{checkpoint} was trained on another feature schema "
            f"({meta.schema_fingerprint[:12]} != {schema_fingerprint[:12]}); {consequence}"
        )


# The model alone: evaluation, export, tools -----------------------------------------------------


def find_checkpoint(run: RunDir, checkpoint: str | os.PathLike[str] | None = None) -> CheckpointDir:
    """A complete checkpoint of ``run`` whose DCP files are all there, none truncated.

    Args:
        run: the run directory.
        checkpoint: None for the latest, a checkpoint's name, or a checkpoint directory (a
            path or a URI).

    Raises:
        CheckpointError: none yet, the one named is missing or incomplete, or one of its DCP
            files is truncated or unreadable (named).
        StorageError: a storage fault reading it.
    """
    found = run.find_checkpoint(checkpoint)
    check_files(found)
    return found


def check_files(checkpoint: CheckpointDir) -> None:
    """Check that DCP's ``.metadata`` is there and readable and that every data file it names
    is there and long enough for the tensors it locates in it.

    Raises:
        CheckpointError: ``.metadata`` missing or unreadable, a data file missing or truncated;
            the message names the file.
        StorageError: a storage fault listing or reading the checkpoint.
    """
    if not checkpoint.has_file(_DCP_METADATA):
        raise CheckpointError(
            f"{checkpoint} is not a complete checkpoint ({_DCP_METADATA} missing)"
        )
    needed: dict[str, int] = {}
    for info in (_read_metadata(checkpoint).storage_data or {}).values():
        name = os.fspath(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    sizes = checkpoint.file_sizes()
    for name, size in sorted(needed.items()):
        if name not in sizes:
            raise CheckpointError(
                f"{checkpoint.file(name)} is missing: the checkpoint is incomplete or was "
                "changed after it was written; resume or export from another checkpoint"
            )
        if sizes[name] < size:
            raise CheckpointError(
                f"{checkpoint.file(name)} is truncated: {sizes[name]} bytes, its checkpoint's "
                f"{_DCP_METADATA} locates data up to byte {size}; resume or export from "
                "another checkpoint"
            )


def load_model_weights(checkpoint: CheckpointDir, model: nn.Module) -> None:
    """Load the CTR/CVR model's weights of ``checkpoint`` into ``model`` in place: nothing else
    (no objective parameters, no optimizer state).

    ``model`` is a ``CtcvrModel``, whole or sharded (inside ``DistributedModelParallel``, when
    every rank must call this); the checkpoint may have been written by any number of ranks.
    """
    own = model.state_dict()
    state = {checkpoint_key(key): value for key, value in own.items()}
    with _single_process_notice_silenced(), _dcp_errors(checkpoint, "read"):
        dcp.load(state, storage_reader=_reader(checkpoint), no_dist=not is_distributed())
    model.load_state_dict({key: state[checkpoint_key(key)] for key in own})


def model_tensor_specs(checkpoint: CheckpointDir) -> dict[str, TensorSpec]:
    """The CTR/CVR model's tensors stored in ``checkpoint``: model key -> shape and dtype."""
    stored = _read_metadata(checkpoint).state_dict_metadata
    specs = {}
    for key, found in stored.items():
        name = model_key(key)
        if name is not None and hasattr(found, "size"):  # tensors, not pickled objects
            specs[name] = TensorSpec(tuple(found.size), found.properties.dtype)
    return specs


def read_model_tensors(
    checkpoint: CheckpointDir, specs: Mapping[str, TensorSpec]
) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors of the model keys in ``specs``, in this process without a
    process group; DCP gathers each from every rank's shards."""
    state = {checkpoint_key(k): torch.empty(s.shape, dtype=s.dtype) for k, s in specs.items()}
    with _single_process_notice_silenced(), _dcp_errors(checkpoint, "read"):
        dcp.load(state, storage_reader=_reader(checkpoint), no_dist=True)
    return {key: state[checkpoint_key(key)] for key in specs}


def save_model_checkpoint(run: RunDir, module: nn.Module, meta: CheckpointMeta) -> CheckpointDir:
    """Write an unsharded ``TrainModule``'s weights as the run's latest checkpoint, in this
    process (no process group, no optimizer state): a model made by a tool rather than trained,
    such as the serving benchmark's random one, in the layout every reader expects."""
    checkpoint = run.new_checkpoint(meta.step)
    with _single_process_notice_silenced(), _dcp_errors(checkpoint, "write"):
        dcp.save({_MODEL: module.state_dict()}, storage_writer=_writer(checkpoint), no_dist=True)
    checkpoint.write_meta(meta)
    run.set_latest(checkpoint)
    return checkpoint


# Storage ----------------------------------------------------------------------------------------


def _writer(checkpoint: CheckpointDir) -> StorageWriter:
    """DCP's writer of ``checkpoint``: one file per rank, on the local disk or through fsspec."""
    if checkpoint.is_local:
        return FileSystemWriter(checkpoint.location)
    # An object is durable once its upload completes: there is nothing to fsync (and DCP would
    # fall back to os.sync(), flushing every disk of the machine).
    return FsspecWriter(
        checkpoint.location, sync_files=False, **storage.fsspec_options(checkpoint.location)
    )


def _reader(checkpoint: CheckpointDir) -> StorageReader:
    """DCP's reader of ``checkpoint`` (ranged reads of each rank's file on an object store).

    Handed to DCP without a ``checkpoint_id``, which would make DCP re-create the reader's
    filesystem without :func:`schemas.storage.fsspec_options`."""
    if checkpoint.is_local:
        return FileSystemReader(checkpoint.location)
    return FsspecReader(checkpoint.location, **storage.fsspec_options(checkpoint.location))


def _read_metadata(checkpoint: CheckpointDir) -> Metadata:
    """DCP's ``.metadata`` of ``checkpoint``: every tensor's shape and where its bytes are.

    Raises:
        CheckpointError: missing, truncated or not DCP metadata (named).
        StorageError: a storage fault.
    """
    location = checkpoint.file(_DCP_METADATA)
    try:
        with _dcp_errors(checkpoint, "read"):
            return _reader(checkpoint).read_metadata()
    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
        if isinstance(err, StorageError):
            raise
        raise CheckpointError(
            f"{location} is not readable DCP metadata (truncated or corrupt: "
            f"{type(err).__name__}: {err}); resume or export from another checkpoint"
        ) from None


@contextmanager
def _dcp_errors(checkpoint: CheckpointDir, action: str) -> Iterator[None]:
    """Turn what DCP raises into an error naming ``checkpoint`` and what to check.

    DCP gathers every rank's exception into one ``CheckpointException`` (a ``BaseException``)
    raised on all ranks, with each rank's traceback in its text; the first storage fault among
    them becomes a ``StorageError`` (unreachable store after its retries, denied access, missing
    bucket), anything else about the files a :class:`CheckpointError`.
    """
    try:
        yield
    except CheckpointException as err:
        _raise_translated(checkpoint, action, [cause for cause, _ in err.failures.values()], err)
    except (OSError, RuntimeError) as err:  # raised outside DCP's gathered steps
        _raise_translated(checkpoint, action, [err], err)


def _raise_translated(
    checkpoint: CheckpointDir, action: str, causes: list[BaseException], err: BaseException
) -> None:
    translated = _translate(checkpoint, action, causes)
    if isinstance(translated, StorageError):
        raise translated from None  # the message says it all; DCP's text repeats every rank's
    raise translated from err


def _translate(
    checkpoint: CheckpointDir, action: str, causes: list[BaseException]
) -> BaseException:
    for cause in causes:
        if isinstance(cause, (StorageError, CheckpointError)):
            return cause
        fault = storage.fault(cause, checkpoint.location, action)
        if fault is not None:
            return fault
    first = causes[0] if causes else RuntimeError("unknown failure")
    if isinstance(first, KeyboardInterrupt):
        return first
    reason = str(first).strip().splitlines()[0] if str(first).strip() else ""
    hint = (
        "a truncated or corrupt file of the checkpoint, or a model that does not match it"
        if action == "read"
        else "another rank failed, or the storage refused a file"
    )
    return CheckpointError(
        f"cannot {action} checkpoint {checkpoint}: {type(first).__name__}"
        f"{': ' + storage.redact(reason) if reason else ''} ({hint})"
    )


@contextmanager
def _single_process_notice_silenced() -> Iterator[None]:
    # DCP warns "assuming the intent is to ... in a single process" without a group: it is.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        yield


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


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
