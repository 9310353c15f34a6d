"""Carrying a plan out on the new run's sharded model, rank by rank.

Each rank writes only what it holds: for every table, the rows and columns of its own shards
(TorchRec's sharded state dict gives each local shard's offsets, whatever the sharding and the
world size), reading the source table whole, one table at a time, and only if it holds a piece
of it; then the dense tensors, which every rank holds whole. The optimizer state, when asked
for, is loaded by DCP from the source checkpoint, which reshards it for this world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from schemas import FeatureSchema
from trainer.checkpoint import CheckpointError, load_training_state
from trainer.config import TrainConfig
from trainer.run_model import TrainingModel
from trainer.warm_start._layout import ModelLayout, model_layout, reference_model
from trainer.warm_start._plan import Fate, WarmStartPlan, plan_warm_start
from trainer.warm_start._source import WarmSource, WarmStartError, open_source

__all__ = ["run_layout", "warm_start"]


def run_layout(config: TrainConfig, schema: FeatureSchema) -> ModelLayout:
    """The layout of the model a run with ``config`` over ``schema`` trains."""
    model = reference_model(
        schema, config.model, config.objective.name, dict(config.objective.params)
    )
    return model_layout(model, schema, config.model)


def warm_start(
    training: TrainingModel, optimizer: Any, config: TrainConfig, schema: FeatureSchema
) -> WarmStartPlan:
    """Start a new run's freshly built model from ``config.train.init_from``, in place.

    Every rank must call it (with ``train.init_optimizer`` DCP loads collectively).

    Args:
        training: the new run's sharded model (``build_training_model``), just built.
        optimizer: its optimizer (``build_optimizer``).
        config: the run's config; ``train.init_from`` names the source.
        schema: the run's feature schema.

    Returns:
        The plan carried out (its ``report()`` is the run's ``warm_start.json``).

    Raises:
        WarmStartError: the source cannot be read or its model cannot be carried over (see
            ``plan_warm_start``).
    """
    source = open_source(config.train.init_from)
    objective_parameters = isinstance(training.objective, nn.Module) and any(
        True for _ in training.objective.parameters()
    )
    target = run_layout(config, schema)
    plan = plan_warm_start(
        source,
        target,
        init_optimizer=config.train.init_optimizer,
        objective=config.objective.name,
        sparse_optimizer=config.sparse_optimizer.name,
        objective_parameters=objective_parameters,
    )
    if plan.with_optimizer:
        try:
            load_training_state(source.checkpoint, training.module, optimizer)
        except CheckpointError as err:
            raise WarmStartError(f"train.init_optimizer=true: {err}") from None
    else:
        _load_weights(plan, source, training.model, target)
    return plan


def _load_weights(
    plan: WarmStartPlan, source: WarmSource, model: nn.Module, target: ModelLayout
) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for table in plan.tables:
            if table.rows_from is None:
                continue
            pieces = _local_pieces(state[target.tables[table.name].key])
            if not pieces:  # other ranks hold this table
                continue
            weights = source.read_table(table.name)
            rows = table.rows_from.sources
            for row, column, piece in pieces:
                index = rows[row : row + piece.shape[0]]
                kept = index >= 0
                block = weights.index_select(0, index[kept])[:, column : column + piece.shape[1]]
                piece[kept.to(piece.device)] = block.to(piece.device, piece.dtype)
            del weights
        wanted = [t for t in plan.tensors if t.fate is not Fate.INITIALISED]
        values = source.read_dense(t.key for t in wanted)
        for tensor in wanted:
            own, theirs = state[tensor.key], values[tensor.key].to(state[tensor.key].device)
            if tensor.fate is Fate.CARRIED:
                own.copy_(theirs)
            else:  # an input weight: matched columns only, the new ones keep their initialisation
                columns = tensor.columns
                kept = columns >= 0
                own[..., kept] = theirs[..., columns[kept]]
    model.load_state_dict(state)


def _local_pieces(tensor: Any) -> list[tuple[int, int, torch.Tensor]]:
    """The parts of a table this rank holds: ``(first row, first column, tensor)`` each."""
    if hasattr(tensor, "local_shards"):  # ShardedTensor: table-, column- or row-wise
        return [
            (shard.metadata.shard_offsets[0], shard.metadata.shard_offsets[1], shard.tensor)
            for shard in tensor.local_shards()
        ]
    return [(0, 0, tensor)]  # replicated (data-parallel) or unsharded
