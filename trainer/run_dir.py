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
file name. Every file-system call of both classes goes through :class:`_LocalFiles`, so that
moving runs to object storage (``s3://`` URIs) replaces that one class. Writes that readers
may race (the ``latest`` pointer) are atomic.

Example::

    run = RunDir("runs/esmm")
    config, schema = run.load_config(), run.load_schema()
    checkpoint = run.latest_checkpoint()  # CheckpointDir or None
    meta = checkpoint.read_meta()  # CheckpointMeta(step, schema_fingerprint, config)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas import FeatureSchema, storage
from schemas.layout import SCHEMA_FILE
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


class _LocalFiles:
    """Every file-system call of this module: local paths today, a URI scheme's file system
    (fsspec / ``pyarrow.fs``) when runs move to object storage."""

    @staticmethod
    def read_bytes(path: Path) -> bytes:
        return path.read_bytes()

    @staticmethod
    def write_bytes(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    @staticmethod
    def append_bytes(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)

    @staticmethod
    def write_atomic(path: Path, data: bytes) -> None:
        """Readers see the old content or the new, never a part (rename over the old file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    @staticmethod
    def is_file(path: Path) -> bool:
        return path.is_file()

    @staticmethod
    def is_dir(path: Path) -> bool:
        return path.is_dir()

    @staticmethod
    def list_dirs(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    @staticmethod
    def list_files(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    @staticmethod
    def make_dirs(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


_FILES = _LocalFiles()


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint's directory: DCP's files (written and read by ``trainer.checkpoint`` at
    :attr:`location`), ``meta.json`` and each rank's own state.

    Attributes:
        path: the directory.
    """

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def location(self) -> str:
        """Where DCP writes and reads this checkpoint (its ``checkpoint_id``)."""
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return _FILES.is_dir(self.path)

    def has_file(self, name: str) -> bool:
        return _FILES.is_file(self.path / name)

    def is_complete(self) -> bool:
        """``meta.json`` is written last, once every rank has written its files."""
        return self.has_file(CHECKPOINT_META)

    def write_meta(self, meta: CheckpointMeta) -> None:
        _FILES.write_bytes(self.path / CHECKPOINT_META, meta.to_json().encode())

    def read_meta(self) -> CheckpointMeta:
        """This checkpoint's checked metadata.

        Raises:
            CheckpointError: ``meta.json`` is missing, unreadable or malformed (named).
        """
        path = self.path / CHECKPOINT_META
        try:
            text = _FILES.read_bytes(path).decode()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        return CheckpointMeta.from_json(text, source=str(path))

    def write_rank_state(self, rank: int, data: bytes) -> None:
        _FILES.write_bytes(self.path / _rank_file(rank), data)

    def read_rank_state(self, rank: int) -> bytes | None:
        """Rank ``rank``'s state, or None if the checkpoint was written by fewer ranks."""
        path = self.path / _rank_file(rank)
        return _FILES.read_bytes(path) if _FILES.is_file(path) else None


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


class RunDir:
    """A training run's directory (see the module docstring for its layout).

    Args:
        root: the directory (``TrainConfig.output_dir``); it need not exist yet.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
        return self.root.resolve().name

    @property
    def location(self) -> str:
        """The run's absolute location, as recorded in exported models."""
        return str(self.root.resolve())

    # Generic files, by path relative to the run -------------------------------------------------

    def exists(self, name: str) -> bool:
        return _FILES.is_file(self.root / name)

    def read_text(self, name: str) -> str:
        """Raises: RunDirError: the file is missing or unreadable (named)."""
        path = self.root / name
        try:
            return _FILES.read_bytes(path).decode()
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"cannot read {path}: {err}") from None

    def write_text(self, name: str, text: str) -> None:
        _FILES.write_bytes(self.root / name, text.encode())

    def append_text(self, name: str, text: str) -> None:
        _FILES.append_bytes(self.root / name, text.encode())

    def read_json(self, name: str) -> Any:
        """Raises: RunDirError: the file is missing, unreadable or not JSON (named)."""
        try:
            return json.loads(self.read_text(name))
        except ValueError as err:
            raise RunDirError(f"{self.root / name}: not valid JSON ({err})") from None

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
        # trainer.config writes a local file; with object storage this becomes write_text.
        save_config(config, self.root / CONFIG_FILE)

    def load_config(self, overrides: Sequence[str] = ()) -> TrainConfig:
        """The run's resolved config with ``overrides`` (``key=value``) applied; its
        ``output_dir`` is this directory, wherever the run was written.

        Raises:
            RunDirError: not a run directory.
            ConfigError: the config (or an override) is invalid.
        """
        self.check_is_run()
        # trainer.config reads a local file; with object storage this becomes read_text.
        return load_config(self.root / CONFIG_FILE, [f"output_dir={self.root}", *overrides])

    def save_schema(self, schema: FeatureSchema) -> None:
        self.write_text(SCHEMA_FILE, schema.to_yaml())

    def load_schema(self) -> FeatureSchema:
        """Raises: RunDirError: missing or unreadable. SchemaError: not a valid schema."""
        path = self.root / SCHEMA_FILE
        if not _FILES.is_file(path):
            raise RunDirError(f"{path} is missing: is {self.root} a run directory?")
        return FeatureSchema.from_yaml(self.read_text(SCHEMA_FILE), source=str(path))

    def write_sharding_plan(self, plan: str) -> None:
        self.write_text(SHARDING_PLAN_FILE, plan)

    def read_sharding_plan(self) -> str:
        return self.read_text(SHARDING_PLAN_FILE)

    def write_rank_shards(self, rank: int, shards: Mapping[str, Any]) -> None:
        self.write_json(f"{SHARDS_DIR}/rank{rank}.json", dict(shards), indent=1)

    def read_rank_shards(self) -> dict[int, dict[str, Any]]:
        """Every rank's shards file: rank -> its content."""
        ranks = {}
        for name in _FILES.list_files(self.root / SHARDS_DIR):
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
    def evaluation_dir(self) -> Path:
        return self.root / EVAL_DIR

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
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> CheckpointDir:
        """The checkpoint directory of ``step`` (it may not exist)."""
        return CheckpointDir(self.checkpoints_dir / f"step_{step:08d}")

    def checkpoints(self) -> list[CheckpointDir]:
        """Every checkpoint directory, complete or not, oldest first."""
        names = [n for n in _FILES.list_dirs(self.checkpoints_dir) if _CHECKPOINT_NAME.match(n)]
        return [CheckpointDir(self.checkpoints_dir / name) for name in names]

    def new_checkpoint(self, step: int) -> CheckpointDir:
        """An empty directory for ``step``'s checkpoint (what an interrupted save left is gone)."""
        checkpoint = self.checkpoint(step)
        _FILES.remove_tree(checkpoint.path)
        _FILES.make_dirs(checkpoint.path)
        return checkpoint

    def latest_checkpoint(self) -> CheckpointDir | None:
        """The newest complete checkpoint, or None before the first.

        Raises:
            CheckpointError: ``latest`` names a checkpoint that is incomplete or gone.
        """
        pointer = self.checkpoints_dir / LATEST_POINTER
        if not _FILES.is_file(pointer):
            return None
        checkpoint = CheckpointDir(self.checkpoints_dir / self.read_text(_LATEST).strip())
        if not checkpoint.is_complete():
            raise CheckpointError(
                f"{pointer} names {checkpoint.name}, which is incomplete or missing"
            )
        return checkpoint

    def set_latest(self, checkpoint: CheckpointDir) -> None:
        """Point ``latest`` at ``checkpoint``, atomically: a reader sees the old or the new one."""
        _FILES.write_atomic(self.checkpoints_dir / LATEST_POINTER, checkpoint.name.encode())

    def delete_old_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints."""
        for checkpoint in self.checkpoints()[:-keep]:
            _FILES.remove_tree(checkpoint.path)

    def find_checkpoint(self, checkpoint: str | Path | None = None) -> CheckpointDir:
        """A complete checkpoint of this run.

        Args:
            checkpoint: None for the latest; a checkpoint's name (``step_00000100``); or a
                checkpoint directory's path.

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
        found = CheckpointDir(Path(checkpoint))
        if not found.exists():
            found = CheckpointDir(self.checkpoints_dir / str(checkpoint))
        if not found.is_complete():
            raise CheckpointError(
                f"{found} is not a complete checkpoint ({CHECKPOINT_META} missing)"
            )
        return found


_LATEST = f"{CHECKPOINTS_DIR}/{LATEST_POINTER}"
