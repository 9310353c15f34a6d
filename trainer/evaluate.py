"""Evaluate a trained model: predictions on every rank, metrics on rank 0.

Run on a finished (or interrupted) training run; it reads the run's resolved config and its
latest checkpoint, and writes ``eval/metrics.json`` and ``eval/metrics.md`` into the run::

    python -m trainer.evaluate --run runs/esmm_sim
    torchrun --nproc_per_node=2 -m trainer.evaluate --run runs/esmm_sim --data data/sim/test

Training runs the same :func:`evaluate` at its end.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.data.batch import Batch
from trainer.distributed import DistContext
from trainer.evaluation import compute_metrics, format_table, ranking_metrics, write_report

__all__ = ["Predictions", "evaluate", "predict"]


@dataclass
class Predictions:
    """Predictions and labels of one evaluation set, ``(N,)`` numpy arrays."""

    pctr: np.ndarray
    pcvr: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    group: np.ndarray | None = None
    truth: dict[str, np.ndarray] | None = None

    def metrics(self, ranking_k: int = 0) -> dict[str, float]:
        """``compute_metrics``; with ``ranking_k > 0`` also the random-exposure ranking metrics.

        Those rank each user's clicked (rated) rows by pCVR against conversion, users from
        ``group``, users without a positive counted as the debiasing papers' code does (NDCG 1,
        Recall 0; see ``ranking_metrics``). Their AUC is ``cvr_auc`` and is not repeated.
        """
        metrics = compute_metrics(
            self.pctr, self.pcvr, self.click, self.conversion, group=self.group, truth=self.truth
        )
        if ranking_k > 0:
            if self.group is None:
                raise ValueError("ranking metrics need the schema's group column (the user id)")
            rated = self.click == 1
            ranking = ranking_metrics(
                self.pcvr[rated],
                self.conversion[rated],
                self.group[rated],
                k=ranking_k,
                users_without_positives="count",
            )
            metrics.update({key: value for key, value in ranking.items() if key != "auc"})
        return metrics


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], ctx: DistContext) -> Predictions | None:
    """Score every batch of this rank's share; return all ranks' predictions on rank 0.

    ``model`` is the (sharded) ``TrainModule``: every rank must run the same number of forward
    passes, because the sharded embedding lookup is a collective. A rank that runs out of data
    first replays its last batch and throws the result away.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    iterator: Iterator[Batch] = iter(batches)
    last: Batch | None = None
    while True:
        batch = next(iterator, None)
        if not _any_rank(batch is not None, ctx):
            break
        if batch is None and last is None:
            raise RuntimeError(
                f"rank {ctx.rank} has no evaluation rows; use fewer ranks or more data"
            )
        _, (_, outputs) = model((batch if batch is not None else last).to(ctx.device))
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
    gathered: list[dict[str, np.ndarray]] = [{} for _ in range(ctx.world_size)]
    if ctx.world_size > 1:
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if not ctx.is_main:
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
    model: nn.Module,
    batches: Iterable[Batch],
    ctx: DistContext,
    out_dir: str | Path | None = None,
    *,
    ranking_k: int = 0,
) -> dict[str, float] | None:
    """Predict, compute the metrics and (on rank 0) write them to ``out_dir`` and return them.

    ``ranking_k > 0`` adds the per-user ranking metrics of a random-exposure test set
    (:meth:`Predictions.metrics`).
    """
    predictions = predict(model, batches, ctx)
    if predictions is None:
        return None
    metrics = predictions.metrics(ranking_k)
    if out_dir is not None:
        write_report(metrics, out_dir)
    return metrics


def _any_rank(flag: bool, ctx: DistContext) -> bool:
    value = torch.tensor([int(flag)], dtype=torch.int64)
    if ctx.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _append(
    parts: dict[str, list[np.ndarray]], name: str, tensor: torch.Tensor, *, exact: bool = False
) -> None:
    """Collect a tensor as numpy; float32 unless ``exact`` (ids: 64-bit user ids and string
    hashes do not survive float32, which would merge users in GAUC and ranking metrics)."""
    tensor = tensor.detach().cpu()
    parts.setdefault(name, []).append((tensor if exact else tensor.float()).numpy())


def main(argv: list[str] | None = None) -> int:
    from trainer.recipe import TrainRecipe  # the recipe builds and shards the model as in training

    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--run", required=True, type=Path, help="run directory written by trainer.train"
    )
    parser.add_argument(
        "--data", help="Parquet file or directory to evaluate (default: the run's data.test)"
    )
    parser.add_argument("--out", type=Path, help="where to write metrics (default: RUN/eval)")
    args = parser.parse_args(argv)
    config_file = args.run / "config.yaml"
    if not config_file.is_file():
        parser.error(f"{config_file} not found: is {args.run} a run directory of trainer.train?")
    overrides = [f"output_dir={args.run}"] + ([f"data.test={args.data}"] if args.data else [])
    recipe = TrainRecipe.from_files(
        config_file, overrides, resume=True, require_checkpoint=True, read_only=True
    )
    try:
        metrics = recipe.evaluate(out_dir=args.out or args.run / "eval")
        if metrics is not None:
            print(format_table(metrics))
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
