"""The training recipe: config -> process group -> sharded model -> loop -> checkpoints -> eval.

Read top to bottom, ``setup`` is the order things must happen in; ``train`` is the loop. The
entry point with its command line is ``trainer.train``.
"""

from __future__ import annotations

import gc
import json
import signal
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from tqdm import tqdm

from schemas import FeatureSchema, load_schema
from trainer.builders import build_model
from trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer.config import TrainConfig, load_config, save_config, to_dict
from trainer.data import ImpressionReader, infinite
from trainer.distributed import (
    all_reduce_mean,
    build_optimizer,
    dense_lr_at,
    fuse_sparse_optimizer,
    init_distributed,
    local_shards,
    quiet_library_warnings,
    set_dense_lr,
    shard_model,
)
from trainer.evaluate import evaluate
from trainer.evaluation import format_table
from trainer.objectives import build_objective, detached_heads, model_structure
from trainer.pruning import PRUNING_FILE, AdaptivePruner, density_report, format_density
from trainer.train_module import TrainModule

__all__ = ["TrainRecipe"]


class TrainRecipe:
    """One training run. ``setup()`` builds everything, ``train()`` runs the loop.

    Args:
        config: the resolved configuration.
        resume: continue from the run's latest checkpoint when there is one (a fresh start
            otherwise, so the same command works for the first launch and every restart under
            ``torchrun --max-restarts``).
        require_checkpoint: with ``resume``, fail if the run has no checkpoint.
        read_only: write nothing into the run directory (evaluating a finished run).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        require_checkpoint: bool = False,
        read_only: bool = False,
    ) -> None:
        self.config = config
        self.resume = resume
        self.require_checkpoint = require_checkpoint
        self.read_only = read_only
        self.run_dir = Path(config.output_dir)
        self.step = 0
        self._stop_signal: int | None = None
        self.setup()

    @classmethod
    def from_files(
        cls, config_file: str | Path | None, overrides: list[str], **kwargs: bool
    ) -> TrainRecipe:
        return cls(load_config(config_file, overrides), **kwargs)

    # Setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        quiet_library_warnings()
        self.ctx = init_distributed(cfg.sharding.backend, cfg.device)
        # The same seed on every rank: dense parameters start identical (DMP also broadcasts).
        torch.manual_seed(cfg.seed)
        self.schema = self._load_schema()
        self.objective = build_objective(cfg.objective.name, **cfg.objective.params)
        # Tables are built on "meta": DMP allocates only this rank's shards.
        model = build_model(
            self.schema,
            cfg.model,
            structure=model_structure(self.objective),
            detached_heads=detached_heads(self.objective),
        )
        # Adap-SL: the pruner holds the towers themselves; sharding wraps them without copying.
        self.pruner = (
            AdaptivePruner(model.partially_shared, cfg.model.adap_sl)
            if model.partially_shared is not None
            else None
        )
        module = TrainModule(model, self.objective)
        # The sparse optimizer must be attached before sharding, which fuses it into the kernels.
        fuse_sparse_optimizer(module, cfg.sparse_optimizer)
        self.model = shard_model(module, self.ctx, cfg.sharding)
        self.optimizer = build_optimizer(self.model, cfg.dense_optimizer)
        self.train_reader = self._reader(
            cfg.data.train, shuffle=True, batch_size=cfg.data.batch_size, filter=cfg.data.filter
        )
        self.batches = infinite(self.train_reader)
        if not self.read_only:
            self._write_run_files()
        if self.resume:
            self._restore()

    def _write_run_files(self) -> None:
        """The resolved config, the schema, the sharding plan and each rank's shards."""
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            self.schema.save(self.run_dir / "schema.yaml")
            (self.run_dir / "sharding_plan.txt").write_text(str(self.model.plan))
        dist.barrier()
        shards = self.run_dir / "shards" / f"rank{self.ctx.rank}.json"
        shards.parent.mkdir(exist_ok=True)
        shards.write_text(json.dumps(local_shards(self.model), indent=1))

    def _load_schema(self) -> FeatureSchema:
        path = self.config.data.schema
        if path is None:
            train = Path(self.config.data.train)
            path = (train.parent if train.is_dir() else train.parent.parent) / "schema.yaml"
            if not path.is_file():
                path = (train if train.is_dir() else train.parent) / "schema.yaml"
        return load_schema(path)

    def _reader(
        self, source: str, *, shuffle: bool, batch_size: int, filter: str | None = None
    ) -> ImpressionReader:
        return ImpressionReader(
            source,
            self.schema,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_buffer=self.config.data.shuffle_buffer,
            seed=self.config.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            filter=filter,
        )

    def _restore(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.require_checkpoint:
                raise CheckpointError(f"{self.run_dir} has no checkpoint to load")
            return
        meta, rank_state = load_checkpoint(
            path, self.ctx, self.model, self.optimizer, self.schema.fingerprint()
        )
        self.step = meta.step
        if "data" in rank_state:
            self.batches.load_state_dict(rank_state["data"])
        else:  # saved by another number of ranks: replay the data stream from the start
            self._log(f"rank {self.ctx.rank}: no data position in {path}; the data order restarts")
        self._log(f"resumed from {path} at step {self.step}")

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
        window_loss, window_terms, window_rows, window_start = 0.0, {}, 0, time.perf_counter()
        self.model.train()
        while self.step < cfg.steps:
            batch = next(self.batches).to(self.ctx.device)
            loss, (loss_out, _) = self.model(batch)
            self.optimizer.zero_grad()
            loss.backward()
            set_dense_lr(
                self.optimizer, dense_lr_at(self.config.dense_optimizer, self.step, cfg.steps)
            )
            self.optimizer.step()
            self.step += 1
            if self.pruner is not None:
                self._prune()
            bar.update(1)
            window_loss += loss_out.total.item()
            for name, value in loss_out.terms.items():
                window_terms[name] = window_terms.get(name, 0.0) + value.item()
            window_rows += batch.size
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                steps = (
                    cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                )
                record = self._log_metrics(
                    steps, window_loss, window_terms, window_rows, window_start
                )
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:,.0f}"
                )
                window_loss, window_terms, window_rows, window_start = (
                    0.0,
                    {},
                    0,
                    time.perf_counter(),
                )
            if self._should_stop():
                bar.close()
                self.save_checkpoint()
                self._log(
                    f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved"
                )
                raise SystemExit(128 + (self._stop_signal or signal.SIGTERM))
            if (
                cfg.checkpoint_every
                and self.step % cfg.checkpoint_every == 0
                and self.step < cfg.steps
            ):
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if self.pruner is not None:
            self._log(
                f"weights left after {self.step} steps: "
                + format_density(density_report(self.pruner.towers))
            )
        if cfg.evaluate and self.config.data.test:
            return self.evaluate(out_dir=self.run_dir / "eval")
        return None

    def save_checkpoint(self) -> Path:
        meta = CheckpointMeta(
            step=self.step,
            schema_fingerprint=self.schema.fingerprint(),
            config=to_dict(self.config),
        )
        # The reader's order depends only on (seed, epoch, rank): its position restores the stream.
        rank_state = {"data": self.batches.state_dict()}
        path = save_checkpoint(
            self.run_dir,
            self.ctx,
            self.model,
            self.optimizer,
            meta,
            rank_state,
            self.config.train.keep_checkpoints,
        )
        if self.pruner is not None and self.ctx.is_main:
            report = {"step": self.step, "towers": density_report(self.pruner.towers)}
            (self.run_dir / PRUNING_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return path

    def evaluate(self, out_dir: Path | None = None) -> dict[str, float] | None:
        """Metrics of the model on ``data.test`` (computed and returned on rank 0)."""
        if not self.config.data.test:
            raise ValueError("data.test is not set: nothing to evaluate")
        reader = self._reader(
            self.config.data.test, shuffle=False, batch_size=self.config.data.eval_batch_size
        )
        metrics = evaluate(
            self.model, reader, self.ctx, out_dir, ranking_k=self.config.data.ranking_k
        )
        if metrics is not None and out_dir is not None:
            self._log(f"evaluation written to {out_dir}\n{format_table(metrics)}")
        return metrics

    def cleanup(self) -> None:
        """Release the sharded model, then leave the process group.

        The model goes first: torchrun ranks that tear down the process group while sharded
        modules are still alive now and then abort at exit ("terminate called without an
        active exception").
        """
        for name in ("optimizer", "model", "batches", "train_reader"):
            self.__dict__.pop(name, None)
        gc.collect()
        # No barrier here: after a failure on one rank the others may never reach it.
        if dist.is_initialized():
            dist.destroy_process_group()

    # Helpers ----------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Adap-SL's pruning step (``trainer.pruning``); logs the towers' density when it prunes."""
        pruned = self.pruner.after_step(self.step)
        if pruned:
            self._log(
                f"step {self.step}: pruned {', '.join(pruned)}; weights left: "
                + format_density(density_report(self.pruner.towers))
            )

    def _log_metrics(
        self, steps: int, loss: float, terms: dict[str, float], rows: int, start: float
    ) -> dict[str, float]:
        elapsed = max(time.perf_counter() - start, 1e-9)
        local = torch.tensor([loss / steps, *(v / steps for v in terms.values())])
        mean = all_reduce_mean(local).tolist()
        record = {
            "step": self.step,
            "loss": mean[0],
            **{f"loss/{name}": value for name, value in zip(terms, mean[1:])},
            "samples_per_s": rows * self.ctx.world_size / elapsed,
            "time": time.time(),
        }
        if self.pruner is not None:
            for tower, report in density_report(self.pruner.towers).items():
                record[f"density/{tower}"] = report["total"]
        if self.ctx.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self._stop_signal = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, request_stop)

    def _should_stop(self) -> bool:
        # Ranks agree, so they all reach the (collective) checkpoint save together.
        flag = torch.tensor(
            [0 if self._stop_signal is None else self._stop_signal], dtype=torch.int64
        )
        if self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)
