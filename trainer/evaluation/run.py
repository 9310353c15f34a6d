"""Evaluating a finished (or interrupted) training run: ``python -m trainer.evaluate``.

The run's model is restored from its checkpoint for inference (``trainer.run_model``): its
config, schema and weights come from the run directory alone, so a run can be evaluated after
its training data is gone, on any number of ranks.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from schemas import storage
from schemas.host_memory import tune_host_allocator
from trainer.distributed import init_distributed, quiet_library_warnings, shutdown_distributed
from trainer.evaluation.predict import evaluate, evaluation_reader
from trainer.evaluation.report import report_files
from trainer.run_dir import RunDir
from trainer.run_model import restore_model

__all__ = ["RunEvaluation", "evaluate_run"]


@dataclass(frozen=True)
class RunEvaluation:
    """What :func:`evaluate_run` did (on rank 0).

    Attributes:
        metrics: the metrics.
        step: the training step of the checkpoint evaluated.
        written_to: the directory holding ``metrics.json`` and ``metrics.md`` (a path or URI).
    """

    metrics: dict[str, float]
    step: int
    written_to: str


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    out_dir: str | Path | None = None,
    checkpoint: str | None = None,
) -> RunEvaluation | None:
    """Score ``data`` with a run's checkpoint and write the metrics.

    Starts (or joins) the process group of the run's config, and leaves it at the end.

    Args:
        run_dir: a run directory written by ``trainer.train`` (a path or a URI).
        data: Parquet file or directory to evaluate; default the run's ``data.test``.
        out_dir: where ``metrics.json`` and ``metrics.md`` go (a path or a URI); default the
            run's ``eval/``.
        checkpoint: a checkpoint's name or directory; default the run's latest.

    Returns:
        The evaluation on rank 0, None on the other ranks.

    Raises:
        RunDirError: not a run directory. CheckpointError: no usable checkpoint.
        ConfigError: the run's config is invalid. ValueError: no data to evaluate.
        DataError: the data does not match the run's schema.
    """
    run = RunDir(run_dir)
    config = run.load_config()  # fails before a process group exists
    quiet_library_warnings()
    tune_host_allocator()  # large evaluation batches reuse the previous batch's memory
    ctx = init_distributed(config.sharding.backend, config.device, config.cpu_binding)
    restored = None
    try:
        restored = restore_model(run, ctx, checkpoint=checkpoint)
        reader = evaluation_reader(restored.config, restored.schema, ctx, data)
        metrics = evaluate(restored.model, reader, ctx, ranking_k=config.data.ranking_k)
        step = restored.step
    finally:
        # The sharded model goes before the process group: torchrun ranks that tear the group
        # down under live sharded modules now and then abort at exit.
        del restored
        gc.collect()
        shutdown_distributed()
    if metrics is None:
        return None
    if out_dir is None:
        run.write_evaluation(metrics)
        return RunEvaluation(metrics, step, str(run.evaluation_dir))
    out = storage.resolve(out_dir)
    for name, text in report_files(metrics).items():
        storage.write_text(out.join(name), text)
    return RunEvaluation(metrics, step, str(out))
