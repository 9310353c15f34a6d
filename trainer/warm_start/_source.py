"""Where a warm start's weights come from: a run, one of its checkpoints, or an exported model.

:func:`open_source` tells the three apart by what they hold (``manifest.json``: an exported
model; ``config.yaml``: a run, read at its latest checkpoint; ``RUN/checkpoints/step_<N>``: that
checkpoint) and reads only metadata; tensors are read on demand, tables one at a time. Runs and
checkpoints are read through ``trainer.run_dir`` and ``trainer.checkpoint`` (whole tensors,
gathered from however many ranks wrote them); exported models through ``schemas.storage`` and
``schemas.artifact``, each file checked against the manifest's sha256 before it is used.

An exported model holds only what the service computes with (``CtcvrModel.serving_tensors``):
its dense tensors are loaded into the model the manifest describes, built with ordinary towers
(an Adap-SL CVR tower is exported folded into one), and what that fills is what the source has.
Training-only heads (imputation, teachers...) are not in it, and a warm start initialises them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, unique
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from schemas import FeatureSchema, SchemaError, storage
from schemas.artifact import (
    DENSE_FILE,
    MANIFEST_FILE,
    SCHEMA_FILE,
    TABLE_TENSOR,
    Manifest,
    Quantization,
)
from trainer.checkpoint import (
    CheckpointError,
    TensorSpec,
    check_schema,
    find_checkpoint,
    model_tensor_specs,
    read_model_tensors,
)
from trainer.config import ConfigError, ModelConfig, TowerSharing, model_config_from_dict
from trainer.model import CtcvrModel
from trainer.run_dir import CheckpointDir, RunDir, RunDirError
from trainer.warm_start._layout import ModelLayout, TableLayout, model_layout, reference_model

__all__ = ["SourceKind", "WarmSource", "WarmStartError", "open_source"]


class WarmStartError(ValueError):
    """A warm start cannot be done as asked; the message names the source, table, head or file."""


@unique
class SourceKind(str, Enum):
    RUN = "run"  # a run directory, read at its latest checkpoint
    CHECKPOINT = "checkpoint"  # one checkpoint of a run
    MODEL = "model"  # a model directory written by trainer.export


class _CheckpointTensors:
    """A checkpoint's model tensors, each read whole (from however many ranks' shards)."""

    def __init__(self, checkpoint: CheckpointDir, specs: Mapping[str, TensorSpec]) -> None:
        self.checkpoint = checkpoint
        self.specs = specs

    def dense(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return read_model_tensors(self.checkpoint, {key: self.specs[key] for key in keys})

    def table(self, table: TableLayout) -> torch.Tensor:
        return read_model_tensors(self.checkpoint, {table.key: self.specs[table.key]})[table.key]


class _ModelTensors:
    """An exported model's tensors: the dense ones as loaded, tables read (and checked) on
    demand."""

    def __init__(
        self, root: storage.Location, manifest: Manifest, dense: Mapping[str, torch.Tensor]
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.values = dense
        self._files: dict[str, dict[str, torch.Tensor]] = {}  # format 2: one file, many tables

    def dense(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: self.values[key] for key in keys}

    def table(self, table: TableLayout) -> torch.Tensor:
        if self.manifest.quantization is not Quantization.NONE:
            raise WarmStartError(
                f"{self.root}: its tables are stored as {self.manifest.quantization.value} (a "
                "quantised export); a warm start needs float weights: start from the run or a "
                "float export"
            )
        path = self.manifest.table_path(table.name)
        if path not in self._files:
            self._files[path] = _safetensors(self.root, self.manifest, path)
        stored = self._files[path].get(TABLE_TENSOR)
        first, rows = 0, table.rows
        if self.manifest.embeddings is not None:  # format 2: every table of its dim, in a row
            _, placed = self.manifest.embeddings.table(table.name)
            first, rows = placed.row_offset, placed.num_rows
        if stored is None or rows != table.rows or tuple(stored.shape[1:]) != (table.dim,):
            raise WarmStartError(
                f"{self.root.join(path)}: expected table {table.name!r} of shape "
                f"{(table.rows, table.dim)} in tensor {TABLE_TENSOR!r}, as its manifest says"
            )
        return stored[first : first + rows]


@dataclass(frozen=True)
class WarmSource:
    """A previous model: what it is, its layout, and its tensors (read on demand).

    Attributes:
        kind: run, checkpoint or exported model.
        location: as given (``train.init_from``).
        step: the training step of its weights.
        schema: the feature schema it was trained on.
        config: its resolved training config (as a dict).
        layout: the layout of its model (an exported model's: with ordinary towers).
        dense: the dense tensors it holds, by model key (an exported model: the served ones).
        tensors: where they are read from.
        checkpoint: the checkpoint read (None for an exported model).
        version: an exported model's version id.
    """

    kind: SourceKind
    location: str
    step: int
    schema: FeatureSchema
    config: Mapping[str, Any]
    layout: ModelLayout
    dense: Mapping[str, TensorSpec]
    tensors: _CheckpointTensors | _ModelTensors = field(repr=False)
    checkpoint: CheckpointDir | None = None
    version: str | None = None

    @property
    def objective(self) -> str:
        return str(self.config["objective"]["name"])

    def describe(self) -> str:
        """``run runs/day1 (step_00000400, step 400)``, ``exported model models/v3 (version
        v3, step 400)``."""
        if self.kind is SourceKind.MODEL:
            return f"exported model {self.location} (version {self.version}, step {self.step})"
        return f"{self.kind.value} {self.location} ({self.checkpoint.name}, step {self.step})"

    def read_dense(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Whole dense tensors by model key (all of them small)."""
        return self.tensors.dense(list(keys))

    def read_table(self, name: str) -> torch.Tensor:
        """One whole embedding table ``(rows, dim)``.

        Raises:
            WarmStartError: an exported table file fails its checksum, or is not a float table
                of the manifest's shape.
        """
        return self.tensors.table(self.layout.tables[name])


def open_source(location: str) -> WarmSource:
    """The warm-start source at ``location`` (a path or URI), metadata only.

    Raises:
        WarmStartError: nothing there, or not a run, checkpoint or exported model; an
            incomplete checkpoint; a schema that does not match its fingerprint; a model
            directory whose files fail their checksums.
    """
    try:
        where = storage.resolve(location)
        if not storage.exists(where):
            raise WarmStartError(f"train.init_from={location}: no such file or directory")
        if storage.is_file(where.join(MANIFEST_FILE)):
            return _model_source(location, where)
        run = RunDir(location)
        if run.is_run():
            return _checkpoint_source(location, run, None, SourceKind.RUN)
        holding = RunDir.holding(location)
        if holding is not None and holding[0].is_run():
            return _checkpoint_source(location, holding[0], holding[1], SourceKind.CHECKPOINT)
    except storage.StorageError as err:
        raise WarmStartError(f"train.init_from: {err}") from None
    raise WarmStartError(
        f"train.init_from={location} is not a run directory (no config.yaml), a checkpoint "
        f"(RUN/checkpoints/step_<N>) or a model directory of trainer.export (no {MANIFEST_FILE})"
    )


# Runs and checkpoints ----------------------------------------------------------------------------


def _checkpoint_source(
    location: str, run: RunDir, name: str | None, kind: SourceKind
) -> WarmSource:
    try:
        checkpoint = find_checkpoint(run, name)
        meta = checkpoint.read_meta()
        schema = run.load_schema()
        check_schema(checkpoint, meta, schema.fingerprint(), f"the run's {SCHEMA_FILE} differs")
    except (CheckpointError, RunDirError, SchemaError) as err:
        raise WarmStartError(f"train.init_from={location}: {err}") from None
    config = meta.config
    model_config = _model_config(location, config.get("model", {}))
    model = _reference(location, schema, model_config, config)
    layout = model_layout(model, schema, model_config)
    stored = model_tensor_specs(checkpoint)
    expected = {**layout.dense, **{t.key: (t.rows, t.dim) for t in layout.tables.values()}}
    for key, shape in expected.items():
        found = stored.get(key)
        if found is None or found.shape != shape:
            held = "no such tensor" if found is None else f"shape {found.shape}"
            raise WarmStartError(
                f"train.init_from={location}: {checkpoint} holds {held} for {key!r}, but its "
                f"config gives {shape}; was the config changed after training?"
            )
    return WarmSource(
        kind=kind,
        location=location,
        step=meta.step,
        schema=schema,
        config=config,
        layout=layout,
        dense={key: stored[key] for key in layout.dense},
        tensors=_CheckpointTensors(checkpoint, stored),
        checkpoint=checkpoint,
    )


# Exported models ---------------------------------------------------------------------------------


def _model_source(location: str, root: storage.Location) -> WarmSource:
    try:
        manifest = Manifest.model_validate_json(storage.read_bytes(root.join(MANIFEST_FILE)))
    except ValidationError as err:
        raise WarmStartError(
            f"{root.join(MANIFEST_FILE)}: not a valid manifest: {_first_error(err)}"
        ) from None
    try:
        schema = FeatureSchema.from_yaml(
            _verified(root, manifest, SCHEMA_FILE).decode(), source=str(root.join(SCHEMA_FILE))
        )
    except SchemaError as err:
        raise WarmStartError(str(err)) from None
    if schema.fingerprint() != manifest.schema_fingerprint:
        raise WarmStartError(
            f"{root.join(SCHEMA_FILE)}: its fingerprint differs from the manifest's "
            f"({schema.fingerprint()[:12]} != {manifest.schema_fingerprint[:12]})"
        )
    spec = manifest.model
    # The service's model: the spec's sizes, and ordinary towers (Adap-SL's are exported folded).
    model_config = ModelConfig(
        num_experts=spec.num_experts,
        expert_sizes=list(spec.expert_sizes),
        tower_sizes=list(spec.tower_sizes),
        interaction=spec.interaction,
        tower_sharing=TowerSharing.NONE.value,
    )
    config = {
        **manifest.training_config,
        "objective": {
            "name": manifest.source.objective,
            "params": manifest.source.objective_params,
        },
    }
    model = _reference(location, schema, model_config, config, dense_device="cpu")
    served = _load_served(model, _safetensors(root, manifest, DENSE_FILE), root.join(DENSE_FILE))
    state = model.state_dict()
    return WarmSource(
        kind=SourceKind.MODEL,
        location=location,
        step=manifest.source.step,
        schema=schema,
        config=config,
        layout=model_layout(model, schema, model_config),
        dense={key: TensorSpec(tuple(state[key].shape), state[key].dtype) for key in served},
        tensors=_ModelTensors(root, manifest, {key: state[key].detach() for key in served}),
        version=manifest.version,
    )


def _load_served(
    model: CtcvrModel, tensors: Mapping[str, torch.Tensor], where: storage.Location
) -> set[str]:
    """Load an exported model's dense tensors into ``model`` through its serving declaration.

    ``serving_tensors`` returns views of the model's own parameters, so writing into a view
    writes the parameter; a parameter is the source's once every element of it was written.

    Returns:
        The state-dict keys filled.

    Raises:
        WarmStartError: the file's tensors are not those the manifest's model serves with.
    """
    views = model.serving_tensors()
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    expected = {name: tuple(t.shape) for name, t in views.items()}
    if got != expected:
        raise WarmStartError(
            f"{where}: not the tensors of its manifest's model: missing "
            f"{sorted(set(expected) - set(got))}, unexpected {sorted(set(got) - set(expected))}, "
            f"other shape {sorted(n for n in set(got) & set(expected) if got[n] != expected[n])}"
        )
    own = {key: t for key, t in model.state_dict(keep_vars=True).items() if not t.is_meta}
    owner = {t.untyped_storage().data_ptr(): key for key, t in own.items()}
    filled: Counter[str] = Counter()
    with torch.no_grad():
        for name, view in views.items():
            key = owner.get(view.untyped_storage().data_ptr())
            if key is None:  # an ordinary model's serving tensors are all its own
                raise RuntimeError(f"serving tensor {name!r} is computed, not a model tensor")
            view.copy_(tensors[name])
            filled[key] += view.numel()
    return {key for key, count in filled.items() if count == own[key].numel()}


def _verified(root: storage.Location, manifest: Manifest, path: str) -> bytes:
    """A model file's bytes, checked against the manifest's size and sha256."""
    entry = manifest.files.get(path)
    if entry is None:
        raise WarmStartError(f"{root.join(MANIFEST_FILE)}: lists no checksum for {path}")
    data = storage.read_bytes(root.join(path))
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise WarmStartError(
            f"{root.join(path)}: checksum mismatch with {MANIFEST_FILE} (a corrupt or "
            "half-copied model directory)"
        )
    return data


def _safetensors(root: storage.Location, manifest: Manifest, path: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(_verified(root, manifest, path))
    except SafetensorError as err:
        raise WarmStartError(f"{root.join(path)}: not a safetensors file ({err})") from None


# Shared ------------------------------------------------------------------------------------------


def _model_config(location: str, values: Mapping[str, Any]) -> ModelConfig:
    try:
        return model_config_from_dict(dict(values))
    except ConfigError as err:
        raise WarmStartError(f"train.init_from={location}: {err}") from None


def _reference(
    location: str,
    schema: FeatureSchema,
    model_config: ModelConfig,
    config: Mapping[str, Any],
    *,
    dense_device: str = "meta",
) -> CtcvrModel:
    objective = config["objective"]
    try:
        return reference_model(
            schema,
            model_config,
            objective["name"],
            dict(objective.get("params") or {}),
            dense_device=dense_device,
        )
    except ValueError as err:  # ConfigError, ParamsError, an unknown objective
        raise WarmStartError(
            f"train.init_from={location}: its model cannot be rebuilt here: {err}"
        ) from None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
