"""The run directory: the one owner of what a training run writes, where, and in what form.

::

    RUN/
      config.yaml                  the resolved TrainConfig (trainer.config)
      schema.yaml                  the FeatureSchema the run trained on
      sharding_plan.txt            TorchRec's sharding plan, as its planner prints it
      shards/rank<R>.json          the embedding shards rank R holds (offsets and sizes)
      metrics.jsonl                one JSON line of training metrics every train.log_every steps
      pruning.json                 Adap-SL runs: the weights left per tower (trainer.pruning)
      warm_start.json              warm-started runs: what was carried, grown and initialised
                                   (trainer.warm_start)
      eval/metrics.json, .md       the evaluation of data.test (trainer.evaluation)
      checkpoints/step_<8 digits>/ one checkpoint: DCP files (trainer.checkpoint),
                                   meta.json (CheckpointMeta), rank<R>.pt (a rank's own state)
      checkpoints/latest           the name of the newest complete checkpoint

Everything reads and writes these through :class:`RunDir` and :class:`CheckpointDir` (the DCP
files through ``trainer.checkpoint``, which takes their location from here); nothing else knows a
file name. ``RUN`` is a local path or a URI (``s3://bucket/runs/esmm``, any ``schemas.storage``
scheme): every file-system call of both classes goes through :class:`_Files`, which is
``schemas.storage``. Every file is written whole (locally beside its name and renamed; on an
object store one PUT), so a reader sees the old content or the new one, never a part; the
``latest`` pointer, written last, is what makes a checkpoint count. Storage faults are
``schemas.storage.StorageError`` naming the URI and what to check.

Example::

    run = RunDir("s3://ml/runs/esmm")  # or a local directory
    config, schema = run.load_config(), run.load_schema()
    checkpoint = run.latest_checkpoint()  # CheckpointDir or None
    meta = checkpoint.read_meta()  # CheckpointMeta(step, schema_fingerprint, config)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas import FeatureSchema, storage
from schemas.layout import SCHEMA_FILE
from schemas.storage import Kind, Location, StorageError
from trainer.config import TrainConfig, load_config, save_config
from trainer.evaluation.report import report_files

__all__ = [
    "CheckpointDir",
    "CheckpointError",
    "CheckpointMeta",
    "RunDir",
    "RunDirError",
]

CONFIG_FILE = "config.yaml"
SHARDING_PLAN_FILE = "sharding_plan.txt"
SHARDS_DIR = "shards"
METRICS_LOG = "metrics.jsonl"
PRUNING_FILE = "pruning.json"
WARM_START_FILE = "warm_start.json"
EVAL_DIR = "eval"
EVAL_METRICS = "metrics"  # eval/metrics.json and eval/metrics.md
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
CHECKPOINT_META = "meta.json"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
_SHARDS_FILE = re.compile(r"^rank(\d+)\.json$")


class RunDirError(RuntimeError):
    """A run directory, or a file in it, is missing or malformed; the message names the file."""


class CheckpointError(RunDirError):
    """A checkpoint is missing, incomplete, malformed, or belongs to another schema."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (``meta.json``), written after every rank's files.

    Attributes:
        step: optimizer steps done when it was written.
        schema_fingerprint: ``FeatureSchema.fingerprint()`` of the schema trained on.
        config: the resolved ``TrainConfig`` as a dict (``trainer.config.to_dict``).
    """

    step: int
    schema_fingerprint: str
    config: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> CheckpointMeta:
        """Parse and check a ``meta.json``.

        Args:
            text: the file's content.
            source: the file's location, for error messages.

        Raises:
            CheckpointError: not JSON, not an object, a missing, unknown or mistyped field;
                the message names ``source`` and every such field.
        """
        try:
            values = json.loads(text)
        except ValueError as err:
            raise CheckpointError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(values).__name__}")
        problems = [f"unknown field {key!r}" for key in sorted(set(values) - set(_META_FIELDS))]
        for key, (check, expected) in _META_FIELDS.items():
            if key not in values:
                problems.append(f"{key}: missing")
            elif not check(values[key]):
                problems.append(f"{key}: expected {expected}, got {values[key]!r:.60}")
        if problems:
            raise CheckpointError(f"{source}: invalid checkpoint metadata: {'; '.join(problems)}")
        return cls(**values)


_META_FIELDS = {
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "schema_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "config": (lambda v: isinstance(v, dict), "an object (the resolved config)"),
}


class _Files:
    """Every file-system call of this module: ``schemas.storage`` on a local path or a URI."""

    @staticmethod
    def read_bytes(location: Location) -> bytes:
        return storage.read_bytes(location)

    @staticmethod
    def write_bytes(location: Location, data: bytes) -> None:
        """Whole: a reader sees the old content or the new, never a part."""
        storage.write_bytes(location, data)

    @staticmethod
    def append_bytes(location: Location, data: bytes) -> None:
        """Append locally; an object store has no append, so the object is written again whole
        (one GET and one PUT per call: meant for small logs such as ``metrics.jsonl``)."""
        if location.is_local:
            os.makedirs(os.path.dirname(location.path), exist_ok=True)
            with storage.storage_errors(location, "append to"), open(location.path, "ab") as f:
                f.write(data)
            return
        before = storage.read_bytes(location) if storage.is_file(location) else b""
        storage.write_bytes(location, before + data)

    @staticmethod
    def is_file(location: Location) -> bool:
        return storage.kind(location) is Kind.FILE

    @staticmethod
    def is_dir(location: Location) -> bool:
        return storage.kind(location) is Kind.DIRECTORY

    @staticmethod
    def list_names(location: Location, kind: Kind) -> list[str]:
        """Names of the files (or directories) directly under ``location``; none if it is not a
        directory."""
        if storage.kind(location) is not Kind.DIRECTORY:
            return []
        return sorted(e.name for e in storage.list_dir(location) if e.kind is kind)

    @staticmethod
    def make_dirs(location: Location) -> None:
        storage.make_dirs(location)

    @staticmethod
    def remove_tree(location: Location) -> None:
        storage.delete_tree(location)


_FILES = _Files()


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint's directory: DCP's files (written and read by ``trainer.checkpoint`` at
    :attr:`location`), ``meta.json`` and each rank's own state.

    Attributes:
        root: the directory (a local path or a URI).
    """

    root: Location

    def __init__(self, root: str | os.PathLike[str] | Location) -> None:
        object.__setattr__(self, "root", storage.resolve(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def location(self) -> str:
        """Where DCP writes and reads this checkpoint (its ``checkpoint_id``): an absolute local
        path, or the URI."""
        return self.root.path if self.root.is_local else self.root.uri

    @property
    def is_local(self) -> bool:
        return self.root.is_local

    def __str__(self) -> str:
        return str(self.root)

    def file(self, name: str) -> Location:
        """The location of a file of this checkpoint (``meta.json``, a DCP file)."""
        return self.root.join(name)

    def exists(self) -> bool:
        return _FILES.is_dir(self.root)

    def has_file(self, name: str) -> bool:
        return _FILES.is_file(self.root.join(name))

    def file_sizes(self) -> dict[str, int]:
        """Every file directly in this checkpoint: name -> bytes."""
        return {
            entry.name: entry.size or 0
            for entry in storage.list_dir(self.root)
            if entry.kind is Kind.FILE
        }

    def is_complete(self) -> bool:
        """``meta.json`` is written last, once every rank has written its files."""
        return self.has_file(CHECKPOINT_META)

    def write_meta(self, meta: CheckpointMeta) -> None:
        _FILES.write_bytes(self.root.join(CHECKPOINT_META), meta.to_json().encode())

    def read_meta(self) -> CheckpointMeta:
        """This checkpoint's checked metadata.

        Raises:
            CheckpointError: ``meta.json`` is missing, unreadable or malformed (named).
        """
        location = self.root.join(CHECKPOINT_META)
        try:
            text = _FILES.read_bytes(location).decode()
        except StorageError as err:
            raise CheckpointError(f"cannot read {location}: {_reason(err, location)}") from None
        except UnicodeDecodeError as err:
            raise CheckpointError(f"cannot read {location}: {err}") from None
        return CheckpointMeta.from_json(text, source=str(location))

    def write_rank_state(self, rank: int, data: bytes) -> None:
        _FILES.write_bytes(self.root.join(_rank_file(rank)), data)

    def read_rank_state(self, rank: int) -> bytes | None:
        """Rank ``rank``'s state, or None if the checkpoint was written by fewer ranks."""
        location = self.root.join(_rank_file(rank))
        return _FILES.read_bytes(location) if _FILES.is_file(location) else None


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def _reason(err: StorageError, location: Location) -> str:
    """A storage message without its leading ``<location>: `` and ``cannot read: `` (the caller
    says ``cannot read <location>``)."""
    return str(err).removeprefix(f"{location}: ").removeprefix("cannot read: ")


class RunDir:
    """A training run's directory (see the module docstring for its layout).

    Args:
        root: the directory (``TrainConfig.output_dir``): a local path or a URI such as
            ``s3://bucket/runs/esmm``; it need not exist yet.

    Raises:
        StorageError: ``root`` is not a usable path or URI (e.g. credentials in it).
    """

    def __init__(self, root: str | os.PathLike[str] | Location) -> None:
        self.root: Location = storage.resolve(root)

    @classmethod
    def holding(cls, checkpoint: str | Path) -> tuple[RunDir, str] | None:
        """The run a checkpoint directory belongs to, and the checkpoint's name.

        Args:
            checkpoint: a path or URI that may name a checkpoint, ``RUN/checkpoints/step_<N>``.

        Returns:
            ``(RunDir(RUN), "step_<N>")``, or None if ``checkpoint`` is not named like one
            (nothing is read: whether it exists is for :meth:`find_checkpoint` to say).
        """
        where = storage.resolve(checkpoint)
        if not _CHECKPOINT_NAME.match(where.name) or where.parent.name != CHECKPOINTS_DIR:
            return None
        return cls(where.parent.parent.uri), where.name

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        """The run's name: its directory's, resolved (``runs/esmm/.`` is ``esmm``)."""
        if self.root.is_local:
            return Path(self.root.path).resolve().name
        return self.root.name

    @property
    def location(self) -> str:
        """The run's absolute location, as recorded in exported models: a resolved local path,
        or the URI."""
        return str(Path(self.root.path).resolve()) if self.root.is_local else self.root.uri

    def file(self, name: str) -> Location:
        """The location of a file of the run, by its path relative to the run."""
        return self.root.join(name)

    # Generic files, by path relative to the run -------------------------------------------------

    def exists(self, name: str) -> bool:
        return _FILES.is_file(self.root.join(name))

    def read_text(self, name: str) -> str:
        """Raises: RunDirError: the file is missing or unreadable (named)."""
        location = self.root.join(name)
        try:
            return _FILES.read_bytes(location).decode()
        except StorageError as err:
            raise RunDirError(f"cannot read {location}: {_reason(err, location)}") from None
        except UnicodeDecodeError as err:
            raise RunDirError(f"cannot read {location}: {err}") from None

    def write_text(self, name: str, text: str) -> None:
        _FILES.write_bytes(self.root.join(name), text.encode())

    def append_text(self, name: str, text: str) -> None:
        _FILES.append_bytes(self.root.join(name), text.encode())

    def read_json(self, name: str) -> Any:
        """Raises: RunDirError: the file is missing, unreadable or not JSON (named)."""
        try:
            return json.loads(self.read_text(name))
        except ValueError as err:
            raise RunDirError(f"{self.root.join(name)}: not valid JSON ({err})") from None

    def write_json(self, name: str, value: Any, *, indent: int | None = 2) -> None:
        self.write_text(name, json.dumps(value, indent=indent) + "\n")

    # The run's own files ---------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether ``trainer.train`` has started this run (its resolved config is there)."""
        return self.exists(CONFIG_FILE)

    def check_is_run(self) -> None:
        """Raises: RunDirError: this is not a run directory of ``trainer.train``."""
        if not self.is_run():
            raise RunDirError(
                f"{self.root} is not a run directory of trainer.train (no {CONFIG_FILE})"
            )

    def save_config(self, config: TrainConfig) -> None:
        _FILES.make_dirs(self.root)
        save_config(config, self.root.join(CONFIG_FILE).uri)

    def load_config(self, overrides: Sequence[str] = ()) -> TrainConfig:
        """The run's resolved config with ``overrides`` (``key=value``) applied; its
        ``output_dir`` is this directory, wherever the run was written.

        Raises:
            RunDirError: not a run directory.
            ConfigError: the config (or an override) is invalid.
        """
        self.check_is_run()
        return load_config(
            self.root.join(CONFIG_FILE).uri, [f"output_dir={self.root.uri}", *overrides]
        )

    def save_schema(self, schema: FeatureSchema) -> None:
        self.write_text(SCHEMA_FILE, schema.to_yaml())

    def load_schema(self) -> FeatureSchema:
        """Raises: RunDirError: missing or unreadable. SchemaError: not a valid schema."""
        location = self.root.join(SCHEMA_FILE)
        if not _FILES.is_file(location):
            raise RunDirError(f"{location} is missing: is {self.root} a run directory?")
        return FeatureSchema.from_yaml(self.read_text(SCHEMA_FILE), source=str(location))

    def write_sharding_plan(self, plan: str) -> None:
        self.write_text(SHARDING_PLAN_FILE, plan)

    def read_sharding_plan(self) -> str:
        return self.read_text(SHARDING_PLAN_FILE)

    def write_rank_shards(self, rank: int, shards: Mapping[str, Any]) -> None:
        self.write_json(f"{SHARDS_DIR}/rank{rank}.json", dict(shards), indent=1)

    def read_rank_shards(self) -> dict[int, dict[str, Any]]:
        """Every rank's shards file: rank -> its content."""
        ranks = {}
        for name in _FILES.list_names(self.root.join(SHARDS_DIR), Kind.FILE):
            if match := _SHARDS_FILE.match(name):
                ranks[int(match[1])] = self.read_json(f"{SHARDS_DIR}/{name}")
        return dict(sorted(ranks.items()))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """One line of ``metrics.jsonl``."""
        self.append_text(METRICS_LOG, json.dumps(dict(record)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty before the first)."""
        if not self.exists(METRICS_LOG):
            return []
        return [json.loads(line) for line in self.read_text(METRICS_LOG).splitlines() if line]

    def has_metrics(self) -> bool:
        return self.exists(METRICS_LOG)

    def write_pruning(self, report: Mapping[str, Any]) -> None:
        self.write_json(PRUNING_FILE, dict(report))

    def read_pruning(self) -> dict[str, Any] | None:
        """``pruning.json`` (``{"step", "towers"}``), or None for a run without pruning."""
        return self.read_json(PRUNING_FILE) if self.exists(PRUNING_FILE) else None

    def write_warm_start(self, report: Mapping[str, Any]) -> None:
        """``warm_start.json``: what a warm start carried, grown and initialised."""
        self.write_json(WARM_START_FILE, dict(report))

    def read_warm_start(self) -> dict[str, Any] | None:
        """``warm_start.json``, or None for a run that started from scratch."""
        return self.read_json(WARM_START_FILE) if self.exists(WARM_START_FILE) else None

    @property
    def evaluation_dir(self) -> Location:
        return self.root.join(EVAL_DIR)

    def write_evaluation(self, metrics: Mapping[str, float]) -> None:
        """``eval/metrics.json`` and ``eval/metrics.md`` (``trainer.evaluation.report``)."""
        for name, text in report_files(metrics, EVAL_METRICS).items():
            self.write_text(f"{EVAL_DIR}/{name}", text)

    def read_evaluation(self) -> dict[str, Any] | None:
        """``eval/metrics.json`` (NaN is ``None``), or None if the run was not evaluated."""
        name = f"{EVAL_DIR}/{EVAL_METRICS}.json"
        return self.read_json(name) if self.exists(name) else None

    # Checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Location:
        return self.root.join(CHECKPOINTS_DIR)

    def checkpoint(self, step: int) -> CheckpointDir:
        """The checkpoint directory of ``step`` (it may not exist)."""
        return CheckpointDir(self.checkpoints_dir.join(f"step_{step:08d}"))

    def checkpoints(self) -> list[CheckpointDir]:
        """Every checkpoint directory, complete or not, oldest first."""
        names = _FILES.list_names(self.checkpoints_dir, Kind.DIRECTORY)
        return [
            CheckpointDir(self.checkpoints_dir.join(name))
            for name in names
            if _CHECKPOINT_NAME.match(name)
        ]

    def new_checkpoint(self, step: int) -> CheckpointDir:
        """An empty directory for ``step``'s checkpoint (what an interrupted save left is gone)."""
        checkpoint = self.checkpoint(step)
        _FILES.remove_tree(checkpoint.root)
        _FILES.make_dirs(checkpoint.root)
        return checkpoint

    def latest_checkpoint(self) -> CheckpointDir | None:
        """The newest complete checkpoint, or None before the first.

        Raises:
            CheckpointError: ``latest`` names a checkpoint that is incomplete or gone.
        """
        pointer = self.checkpoints_dir.join(LATEST_POINTER)
        if not _FILES.is_file(pointer):
            return None
        checkpoint = CheckpointDir(self.checkpoints_dir.join(self.read_text(_LATEST).strip()))
        if not checkpoint.is_complete():
            raise CheckpointError(
                f"{pointer} names {checkpoint.name}, which is incomplete or missing"
            )
        return checkpoint

    def set_latest(self, checkpoint: CheckpointDir) -> None:
        """Point ``latest`` at ``checkpoint``, atomically: a reader sees the old or the new one."""
        _FILES.write_bytes(self.checkpoints_dir.join(LATEST_POINTER), checkpoint.name.encode())

    def delete_old_checkpoints(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints, none newer than the one ``latest``
        names (which is always kept); delete every other checkpoint directory, incomplete ones
        included: what a save that was killed, or cut off by a storage fault, left behind."""
        latest = self.latest_checkpoint()
        kept = 0
        for checkpoint in reversed(self.checkpoints()):
            in_time = latest is None or checkpoint.name <= latest.name
            usable = in_time and checkpoint.is_complete()
            if usable and kept < keep:
                kept += 1
                continue
            _FILES.remove_tree(checkpoint.root)

    def find_checkpoint(self, checkpoint: str | os.PathLike[str] | None = None) -> CheckpointDir:
        """A complete checkpoint of this run.

        Args:
            checkpoint: None for the latest; a checkpoint's name (``step_00000100``); or a
                checkpoint directory's path or URI.

        Raises:
            CheckpointError: the run has no checkpoint yet, or the one named is missing or
                incomplete.
        """
        if checkpoint is None:
            found = self.latest_checkpoint()
            if found is None:
                raise CheckpointError(
                    f"{self.root} has no checkpoint yet; train first "
                    f"({CHECKPOINTS_DIR}/{LATEST_POINTER} is missing)"
                )
            return found
        found = CheckpointDir(checkpoint)
        is_name = found.root.scheme == "" and "/" not in os.fspath(checkpoint)
        if is_name and not found.exists():
            found = CheckpointDir(self.checkpoints_dir.join(os.fspath(checkpoint)))
        if not found.is_complete():
            raise CheckpointError(
                f"{found} is not a complete checkpoint ({CHECKPOINT_META} missing)"
            )
        return found


_LATEST = f"{CHECKPOINTS_DIR}/{LATEST_POINTER}"
