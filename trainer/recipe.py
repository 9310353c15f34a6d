"""The training recipe: config -> process group -> sharded model -> loop -> checkpoints -> eval.

Read top to bottom, ``setup`` is the order things must happen in; ``train`` is the loop. The
entry point with its command line is ``trainer.train``. The pieces live elsewhere: the sharded
model in ``trainer.run_model``, the run directory's files in ``trainer.run_dir``, checkpoints in
``trainer.checkpoint``, collectives in ``trainer.distributed``, evaluation in
``trainer.evaluation``, a start from a previous model's weights in ``trainer.warm_start``.

**Host synchronisation.** A step queues its work on the device and moves on: loss terms are
summed on the device and read (one transfer, one collective) every ``train.log_every`` steps.
The collective that agrees on a stop signal runs at those steps and at checkpoint steps, the
same steps on every rank, so a SIGTERM or Ctrl-C takes effect at the next such step: up to
``train.log_every`` steps after it arrives, plus the checkpoint's writing time. (TorchRec's
sharded lookup still reads each batch's split sizes on the host every step.)
"""

from __future__ import annotations

import gc
import signal
import time
from pathlib import Path
from types import FrameType

import torch
from tqdm import tqdm

from schemas import FeatureSchema, load_schema
from schemas.host_memory import tune_host_allocator
from schemas.layout import SCHEMA_FILE
from trainer.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, config_warnings, load_config, to_dict
from trainer.data import DataError, ImpressionReader, find_schema, infinite
from trainer.data.batch import Batch
from trainer.distributed import (
    all_reduce_mean,
    barrier,
    build_optimizer,
    dense_lr_at,
    init_distributed,
    local_shards,
    max_over_ranks,
    quiet_library_warnings,
    set_dense_lr,
    shutdown_distributed,
)
from trainer.evaluation import format_table
from trainer.evaluation.predict import evaluate, evaluation_reader
from trainer.objectives import LossOutput
from trainer.pruning import density_report, format_density
from trainer.run_dir import CheckpointDir, RunDir
from trainer.run_model import build_training_model
from trainer.warm_start import warm_start

__all__ = ["TrainRecipe"]


class TrainRecipe:
    """One training run. ``setup()`` builds everything, ``train()`` runs the loop.

    Args:
        config: the resolved configuration.
        resume: continue from the run's latest checkpoint when there is one (a fresh start
            otherwise, so the same command works for the first launch and every restart under
            ``torchrun --max-restarts``).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.run = RunDir(config.output_dir)
        self.step = 0
        self._stop_signal: int | None = None
        self.setup()

    @classmethod
    def from_files(
        cls, config_file: str | Path | None, overrides: list[str], *, resume: bool = False
    ) -> TrainRecipe:
        return cls(load_config(config_file, overrides), resume=resume)

    # Setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        quiet_library_warnings()
        tune_host_allocator()  # before the first large tensor: each step reuses the last's memory
        self.ctx = init_distributed(cfg.sharding.backend, cfg.device, cfg.cpu_binding)
        for warning in config_warnings(cfg):
            self._log(f"warning: {warning}")
        # The same seed on every rank: dense parameters start identical (DMP also broadcasts).
        torch.manual_seed(cfg.seed)
        self.schema = self._load_schema()
        # Tables are built on "meta": DMP allocates only this rank's shards.
        self.sharded = build_training_model(cfg, self.schema, self.ctx)
        self.model, self.pruner = self.sharded.module, self.sharded.pruner
        self.optimizer = build_optimizer(self.model, cfg.dense_optimizer)
        self.train_reader = ImpressionReader(
            cfg.data.train,
            self.schema,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            shuffle_buffer=cfg.data.shuffle_buffer,
            group_rows=cfg.data.group_rows,
            seed=cfg.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            filter=cfg.data.filter,
        )
        self.batches = infinite(self.train_reader)
        self._write_run_files()
        # A warm-started run that has checkpoints of its own continues from them.
        resumed = self.resume and self._restore()
        if not resumed and cfg.train.init_from is not None:
            self._warm_start()

    def _load_schema(self) -> FeatureSchema:
        """``data.schema``, else the data set's: beside the training split, or in it."""
        path = self.config.data.schema or find_schema(self.config.data.train)
        if path is None:
            raise DataError(
                f"no {SCHEMA_FILE} beside or above data.train={self.config.data.train}; "
                "pass data.schema=<path or URI of the schema>"
            )
        return load_schema(path)

    def _write_run_files(self) -> None:
        """The resolved config, the schema, the sharding plan and each rank's shards."""
        if self.ctx.is_main:
            self.run.save_config(self.config)
            self.run.save_schema(self.schema)
            self.run.write_sharding_plan(str(self.model.plan))
        barrier(self.ctx)
        self.run.write_rank_shards(self.ctx.rank, local_shards(self.model))

    def _restore(self) -> bool:
        """Continue from the run's latest checkpoint; False if it has none yet."""
        checkpoint = self.run.latest_checkpoint()
        if checkpoint is None:
            return False
        meta, rank_state = load_checkpoint(
            checkpoint, self.ctx, self.model, self.optimizer, self.schema.fingerprint()
        )
        self.step = meta.step
        if "data" in rank_state:
            self.batches.load_state_dict(rank_state["data"])
        else:  # saved by another number of ranks: replay the data stream from the start
            self._log(
                f"rank {self.ctx.rank}: no data position in {checkpoint}; the data order restarts"
            )
        self._log(f"resumed from {checkpoint} at step {self.step}")
        return True

    def _warm_start(self) -> None:
        """Start from ``train.init_from``'s weights (``trainer.warm_start``), at step 0, and
        say what was carried, grown and initialised (the log and ``warm_start.json``)."""
        plan = warm_start(self.sharded, self.optimizer, self.config, self.schema)
        if self.ctx.is_main:
            self.run.write_warm_start(plan.report())
        self._log(plan.summary())

    # Training ---------------------------------------------------------------------------------

    def train(self) -> dict[str, float] | None:
        """Run ``train.steps`` steps (from the resumed step), checkpoint, evaluate.

        Returns:
            The evaluation metrics on rank 0 (None elsewhere or without a test set).
        """
        cfg = self.config.train
        self._install_signal_handlers()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and self.ctx.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        window = _LossWindow()
        self.model.train()
        while self.step < cfg.steps:
            window.add(*self._train_step())
            bar.update(1)
            if self._is_log_step():
                record = self._log_metrics(window)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:,.0f}"
                )
                window = _LossWindow()
            if (self._is_log_step() or self._is_checkpoint_step()) and self._stop_requested():
                bar.close()
                self.save_checkpoint()
                self._log(
                    f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved"
                )
                raise SystemExit(128 + (self._stop_signal or signal.SIGTERM))
            if self._is_checkpoint_step():
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if self.pruner is not None:
            self._log(
                f"weights left after {self.step} steps: "
                + format_density(density_report(self.pruner.towers))
            )
        if cfg.evaluate and self.config.data.test:
            return self.evaluate()
        return None

    def _train_step(self) -> tuple[LossOutput, int]:
        """One optimizer step. Returns its (detached) loss terms and the rows it trained on."""
        batch = self._next_batch()
        loss, (loss_out, _) = self.model(batch)
        self.optimizer.zero_grad()
        loss.backward()
        set_dense_lr(
            self.optimizer,
            dense_lr_at(self.config.dense_optimizer, self.step, self.config.train.steps),
        )
        self.optimizer.step()
        self.step += 1
        if self.pruner is not None:
            self._prune()
        return loss_out, batch.size

    def _next_batch(self) -> Batch:
        batch = next(self.batches)
        if self.ctx.device.type == "cuda":
            # From pageable memory a copy blocks the host until the device has caught up; from
            # pinned memory it is queued like a kernel.
            return batch.pin_memory().to(self.ctx.device, non_blocking=True)
        return batch.to(self.ctx.device)

    def _is_log_step(self) -> bool:
        return self.step % self.config.train.log_every == 0 or self.step == self.config.train.steps

    def _is_checkpoint_step(self) -> bool:
        every = self.config.train.checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.config.train.steps

    def save_checkpoint(self) -> CheckpointDir:
        meta = CheckpointMeta(
            step=self.step,
            schema_fingerprint=self.schema.fingerprint(),
            config=to_dict(self.config),
        )
        # The reader's order depends only on (seed, epoch, rank): its position restores the stream.
        rank_state = {"data": self.batches.state_dict()}
        checkpoint = save_checkpoint(
            self.run,
            self.ctx,
            self.model,
            self.optimizer,
            meta,
            rank_state,
            self.config.train.keep_checkpoints,
        )
        if self.pruner is not None and self.ctx.is_main:
            self.run.write_pruning(
                {"step": self.step, "towers": density_report(self.pruner.towers)}
            )
        return checkpoint

    def evaluate(self) -> dict[str, float] | None:
        """Metrics of the model on ``data.test``, written to the run's ``eval/`` and returned
        on rank 0 (None elsewhere).

        Raises:
            ValueError: ``data.test`` is not set.
        """
        reader = evaluation_reader(self.config, self.schema, self.ctx)
        metrics = evaluate(
            self.sharded.model, reader, self.ctx, ranking_k=self.config.data.ranking_k
        )
        if metrics is not None:
            self.run.write_evaluation(metrics)
            self._log(f"evaluation written to {self.run.evaluation_dir}\n{format_table(metrics)}")
        return metrics

    def cleanup(self) -> None:
        """Release the sharded model, then leave the process group.

        The model goes first: torchrun ranks that tear down the process group while sharded
        modules are still alive now and then abort at exit ("terminate called without an
        active exception").
        """
        for name in ("optimizer", "model", "sharded", "pruner", "batches", "train_reader"):
            self.__dict__.pop(name, None)
        gc.collect()
        shutdown_distributed()

    # Helpers ----------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Adap-SL's pruning step (``trainer.pruning``); logs the towers' density when it prunes."""
        pruned = self.pruner.after_step(self.step)
        if pruned:
            self._log(
                f"step {self.step}: pruned {', '.join(pruned)}; weights left: "
                + format_density(density_report(self.pruner.towers))
            )

    def _log_metrics(self, window: _LossWindow) -> dict[str, float]:
        """Average the window's losses over steps and ranks (the host waits for the device
        here) and append them to ``metrics.jsonl`` on rank 0."""
        mean = all_reduce_mean(window.local_means(), self.ctx).tolist()
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        record = {
            "step": self.step,
            "loss": mean[0],
            **{f"loss/{name}": value for name, value in zip(window.terms, mean[1:])},
            "samples_per_s": window.rows * self.ctx.world_size / elapsed,
            "time": time.time(),
        }
        if self.pruner is not None:
            for tower, report in density_report(self.pruner.towers).items():
                record[f"density/{tower}"] = report["total"]
        if self.ctx.is_main:
            self.run.append_metrics(record)
        return record

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self._stop_signal = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, request_stop)

    def _stop_requested(self) -> bool:
        """Whether any rank has been asked to stop. A collective: the ranks agree, so they all
        reach the (collective) checkpoint save together."""
        signum = max_over_ranks(self._stop_signal or 0, self.ctx)
        if signum and self._stop_signal is None:
            self._stop_signal = signum
        return bool(signum)

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)


class _LossWindow:
    """The loss terms of the steps since the last log line, summed where they were computed.

    Sums are float64, as the Python floats they replace were, so the logged means are the
    same to the bit; reading them is the window's one host synchronisation.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.rows = 0
        self.total: torch.Tensor | None = None
        self.terms: dict[str, torch.Tensor] = {}

    def add(self, loss: LossOutput, rows: int) -> None:
        total = loss.total.detach().double()
        self.total = total if self.total is None else self.total + total
        for name, value in loss.terms.items():
            value = value.detach().double()
            self.terms[name] = value if name not in self.terms else self.terms[name] + value
        self.steps += 1
        self.rows += rows

    def local_means(self) -> torch.Tensor:
        """``[mean loss, mean of each term]`` of this rank's steps, float32, on the device."""
        return (torch.stack([self.total, *self.terms.values()]) / self.steps).float()
