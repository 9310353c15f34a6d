"""The sharded model of a run: built to train it, or restored from a checkpoint to score with it.

Both build the same ``CtcvrModel`` from the run's config and schema (the objective decides its
extra heads and structure), on the ``meta`` device, and shard it with
``DistributedModelParallel`` over the ranks of ``ctx``:

- :func:`build_training_model` wraps it with its objective in a ``TrainModule``, fuses the
  sparse optimizer into the tables' backward pass and shards that (``trainer.recipe``);
- :func:`restore_model` shards the model alone and loads its weights from a checkpoint: no
  objective parameters, no optimizer state, no training data (``trainer.evaluate``, the
  benchmarks). Any number of ranks can restore a checkpoint written by any other number.

Example::

    ctx = init_distributed()
    restored = restore_model(RunDir("runs/esmm"), ctx)
    outputs = restored.model(batch.sparse, batch.dense)  # TaskOutputs, in eval mode
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchrec.distributed import DistributedModelParallel

from schemas import FeatureSchema
from trainer.builders import build_model
from trainer.checkpoint import check_schema, find_checkpoint, load_model_weights
from trainer.config import Precision, TrainConfig
from trainer.distributed import DistContext, fuse_sparse_optimizer, shard_model
from trainer.model import CtcvrModel
from trainer.objectives import Objective, build_objective, detached_heads, model_structure
from trainer.pruning import AdaptivePruner
from trainer.run_dir import CheckpointDir, RunDir
from trainer.train_module import TrainModule

__all__ = ["RestoredModel", "TrainingModel", "build_training_model", "restore_model"]


@dataclass
class TrainingModel:
    """A run's model, sharded for training.

    Attributes:
        module: ``DistributedModelParallel`` around the ``TrainModule``:
            ``module(batch) -> (loss, (loss terms, outputs))``.
        objective: the objective inside it.
        pruner: Adap-SL's pruner of its partially shared towers (None without them).
    """

    module: DistributedModelParallel
    objective: Objective
    pruner: AdaptivePruner | None

    @property
    def model(self) -> CtcvrModel:
        """The sharded ``CtcvrModel`` inside: ``model(sparse, dense) -> TaskOutputs`` (what
        evaluation scores with; it shares every parameter with :attr:`module`)."""
        return self.module.module.model


@dataclass
class RestoredModel:
    """A run's trained model, sharded and loaded for inference (in eval mode).

    Attributes:
        model: ``DistributedModelParallel`` around the ``CtcvrModel``:
            ``model(sparse, dense) -> TaskOutputs``.
        config: the run's config (with the overrides given to :func:`restore_model`).
        schema: the run's feature schema.
        checkpoint: the checkpoint loaded.
        step: the training step it was written at.
    """

    model: DistributedModelParallel
    config: TrainConfig
    schema: FeatureSchema
    checkpoint: CheckpointDir
    step: int


def build_training_model(
    config: TrainConfig, schema: FeatureSchema, ctx: DistContext
) -> TrainingModel:
    """The model of a run with ``config`` over ``schema``, sharded for training.

    Consumes the global RNG in a fixed order (objective, model, objective parameters), so the
    same seed gives the same initial weights on every rank and every run.

    Raises:
        ValueError: an unknown objective or bad objective parameters; a sharding type the
            backend cannot run.
        ConfigError: a model option the objective cannot use (e.g. Adap-SL without an
            imputation head).
    """
    objective, model = _unsharded(config, schema)
    # Adap-SL: the pruner holds the towers themselves; sharding wraps them without copying.
    pruner = (
        AdaptivePruner(model.partially_shared, config.model.adap_sl)
        if model.partially_shared is not None
        else None
    )
    bf16 = config.train.precision == Precision.BF16.value
    module = TrainModule(model, objective, autocast_dtype=torch.bfloat16 if bf16 else None)
    # The sparse optimizer must be attached before sharding, which fuses it into the kernels.
    fuse_sparse_optimizer(module, config.sparse_optimizer, ctx.device)
    return TrainingModel(shard_model(module, ctx, config.sharding), objective, pruner)


def restore_model(
    run: RunDir,
    ctx: DistContext,
    *,
    checkpoint: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RestoredModel:
    """A run's trained model for inference: sharded over ``ctx``'s ranks, weights loaded from
    ``checkpoint`` (default the latest), in eval mode. Every rank must call it.

    Args:
        run: the run directory.
        ctx: this process's distributed context.
        checkpoint: a checkpoint's name or directory; None for the run's latest.
        overrides: ``key=value`` overrides of the run's config (e.g. ``data.test=...``).

    Raises:
        RunDirError: not a run directory, or its schema file is missing.
        CheckpointError: no checkpoint, an incomplete one, or one of another feature schema.
        ConfigError: the run's config or an override is invalid.
    """
    config = run.load_config(overrides or [])
    schema = run.load_schema()
    found = find_checkpoint(run, checkpoint)
    meta = found.read_meta()
    check_schema(found, meta, schema.fingerprint(), "it cannot score with the run's schema")
    _, model = _unsharded(config, schema)
    sharded = shard_model(model, ctx, config.sharding)
    load_model_weights(found, sharded)
    sharded.eval()
    return RestoredModel(sharded, config, schema, found, meta.step)


def _unsharded(config: TrainConfig, schema: FeatureSchema) -> tuple[Objective, CtcvrModel]:
    """The objective and the model it asks for, tables on ``meta`` (DMP allocates only each
    rank's shards)."""
    objective = build_objective(config.objective.name, **config.objective.params)
    model = build_model(
        schema,
        config.model,
        structure=model_structure(objective),
        detached_heads=detached_heads(objective),
    )
    return objective, model
