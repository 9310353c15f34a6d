"""Scoring an evaluation set with a (sharded) model: predictions on every rank, metrics on rank 0.

Training evaluates its model with these at its end (``trainer.recipe``), and
``python -m trainer.evaluate`` a finished run's restored one (``trainer.evaluation.run``).

Example::

    reader = evaluation_reader(config, schema, ctx)
    metrics = evaluate(model, reader, ctx, ranking_k=config.data.ranking_k)  # None off rank 0
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from schemas import FeatureSchema
from trainer.config import TrainConfig
from trainer.data import ImpressionReader
from trainer.data.batch import Batch
from trainer.distributed import DistContext, any_rank, gather_objects
from trainer.evaluation.predictions import Predictions

__all__ = ["evaluate", "evaluation_reader", "predict"]


def evaluation_reader(
    config: TrainConfig, schema: FeatureSchema, ctx: DistContext, source: str | None = None
) -> ImpressionReader:
    """This rank's share of an evaluation set, in file order, ``data.eval_batch_size`` rows a
    batch.

    Args:
        config: the run's config.
        schema: its feature schema.
        ctx: this process's distributed context.
        source: Parquet file or directory; default ``data.test``.

    Raises:
        ValueError: no ``source`` and no ``data.test``.
        DataError: unreadable files, or columns that do not match the schema.
    """
    source = source or config.data.test
    if not source:
        raise ValueError("data.test is not set: nothing to evaluate (pass the data to evaluate)")
    return ImpressionReader(
        source,
        schema,
        batch_size=config.data.eval_batch_size,
        shuffle=False,
        shuffle_buffer=config.data.shuffle_buffer,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], ctx: DistContext) -> Predictions | None:
    """Score every batch of this rank's share; return all ranks' predictions on rank 0.

    Args:
        model: a ``CtcvrModel``, ``model(sparse, dense) -> TaskOutputs``, sharded or whole.
            It is put in eval mode and back.
        batches: this rank's batches.
        ctx: this process's distributed context.

    Every rank must run the same number of forward passes, because the sharded embedding
    lookup is a collective: a rank that runs out of data first replays its last batch and
    throws the result away.

    Raises:
        RuntimeError: a rank has no rows at all while others have some.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    iterator: Iterator[Batch] = iter(batches)
    last: Batch | None = None
    while True:
        batch = next(iterator, None)
        if not any_rank(batch is not None, ctx):
            break
        if batch is None and last is None:
            raise RuntimeError(
                f"rank {ctx.rank} has no evaluation rows; use fewer ranks or more data"
            )
        scored = (batch if batch is not None else last).to(ctx.device)
        outputs = model(scored.sparse, scored.dense)
        if batch is None:
            continue
        last = batch
        _append(parts, "pctr", outputs.pctr)
        _append(parts, "pcvr", outputs.pcvr)
        _append(parts, "click", batch.click)
        _append(parts, "conversion", batch.conversion)
        if batch.group is not None:
            _append(parts, "group", batch.group, exact=True)
        if batch.truth is not None:
            _append(parts, "true_cvr", batch.truth.true_cvr)
            _append(parts, "cf_conversion", batch.truth.cf_conversion)
    model.train(was_training)
    local = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    gathered = gather_objects(local, ctx)
    if gathered is None:
        return None
    joined = {
        name: np.concatenate([g[name] for g in gathered if name in g]) for name in gathered[0]
    }
    truth = (
        {"true_cvr": joined["true_cvr"], "cf_conversion": joined["cf_conversion"]}
        if "true_cvr" in joined
        else None
    )
    return Predictions(
        pctr=joined["pctr"],
        pcvr=joined["pcvr"],
        click=joined["click"],
        conversion=joined["conversion"],
        group=joined.get("group"),
        truth=truth,
    )


def evaluate(
    model: nn.Module, batches: Iterable[Batch], ctx: DistContext, *, ranking_k: int = 0
) -> dict[str, float] | None:
    """:func:`predict`, then the metrics (:meth:`Predictions.metrics`) on rank 0.

    Args:
        model: as for :func:`predict`.
        batches: this rank's batches.
        ctx: this process's distributed context.
        ranking_k: > 0 adds the per-user ranking metrics of a random-exposure test set.

    Returns:
        The metrics on rank 0, None on the other ranks.
    """
    predictions = predict(model, batches, ctx)
    return None if predictions is None else predictions.metrics(ranking_k)


def _append(
    parts: dict[str, list[np.ndarray]], name: str, tensor: torch.Tensor, *, exact: bool = False
) -> None:
    """Collect a tensor as numpy; float32 unless ``exact`` (ids: 64-bit user ids and string
    hashes do not survive float32, which would merge users in GAUC and ranking metrics)."""
    tensor = tensor.detach().cpu()
    parts.setdefault(name, []).append((tensor if exact else tensor.float()).numpy())
