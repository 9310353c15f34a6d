"""Training throughput: the TorchRec path (1 and 2 processes) against a plain-PyTorch reference.

Run from the repository root (about a minute on 2 idle CPU cores; `--rounds 3` about 3)::

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --steps 30 --warmup 5 --batch-size 4096 \\
        --out benchmarks/results
    .venv/bin/python benchmarks/train_throughput.py --tables small --out benchmarks/results/small
    .venv/bin/python benchmarks/train_throughput.py --wait-idle 600 --rounds 2   # a shared machine

Outputs, under ``--out`` (default ``benchmarks/results``):

- ``train_throughput.md``: a markdown table of samples/s (min / median / max over the timed
  steps), each median's ratio to the reference median, threads, peak RSS, and the share of the
  CPUs other processes took meanwhile; then the settings and whether torchrec_1p reached the
  1.25x target. The same table is printed.
- ``train_throughput.png``: median samples/s per variant, min and max as whiskers.
- ``train_throughput.json``: the resolved settings, the rows, and every worker's raw step times.

The orchestrator runs three workers one after another, each a subprocess of this file:

===========  ======================================================================  ==========
variant      command                                                                 threads
===========  ======================================================================  ==========
torchrec_1p  ``python train_throughput.py --worker torchrec``                        default
torchrec_2p  ``torchrun --standalone --nproc_per_node=2 train_throughput.py          1 per rank
             --worker torchrec`` (each rank trains ``--batch-size`` rows a step)
reference    ``python train_throughput.py --worker reference``                       default
===========  ======================================================================  ==========

All three train the same model (``ModelConfig(num_experts=8, expert_sizes=[256],
tower_sizes=[128, 64])`` over 20 single-valued sparse fields of dim 16 and 2 dense features)
with the ESMM objective through ``TrainModule``, from the same seed, on the same pool of
synthetic batches (Zipf-distributed ids, ~4 % clicks, ~5 % of clicks convert) made before the
timed loop.

- **TorchRec** is the product's path: ``init_distributed`` -> ``build_model`` on ``meta`` ->
  ``TrainModule`` -> ``fuse_sparse_optimizer`` (row-wise Adagrad inside backward, touching only
  the rows a batch reads) -> ``shard_model`` (table-wise / column-wise, DMP on gloo) ->
  ``build_optimizer`` (Adam on the dense parameters).
- **reference** is the same ``CtcvrModel`` whose sparse stage is one ``nn.EmbeddingBag`` per
  table (:class:`EmbeddingBagArch`), trained by one ``torch.optim.Adam`` over every parameter,
  so every step updates every embedding row.

A step is forward + ``zero_grad`` + backward + ``step``, timed with ``time.perf_counter``; the
warmup steps are not reported. With 2 processes a step lasts as long as its slowest rank and
samples/s counts both ranks' rows (``world_size * batch / step``); the per-process figure is
``batch / step``. Peak memory is ``ru_maxrss`` of the worker process (the largest rank).

Other processes on the machine stretch the steps, so each worker also records the share of all
CPUs that other processes took during its timed steps (from ``/proc/stat``); the table shows it
and calls the target inconclusive above 10 %. ``--wait-idle`` waits for a quiet machine before
each variant, and ``--rounds`` lets the variants take turns so a burst of load is shared.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum, unique
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from schemas import FeatureSchema
from trainer.builders import build_model
from trainer.config import DenseOptimizerConfig, ModelConfig, ShardingConfig, SparseOptimizerConfig
from trainer.data.batch import Batch
from trainer.distributed import (
    DistContext,
    barrier,
    build_optimizer,
    fuse_sparse_optimizer,
    gather_objects,
    init_distributed,
    shard_model,
    shutdown_distributed,
)
from trainer.model import embedding_bag_configs
from trainer.objectives import build_objective
from trainer.train_module import TrainModule

__all__ = ["EmbeddingBagArch", "Settings", "Variant", "bench_schema", "main", "synthetic_batches"]

log = logging.getLogger("train_throughput")

_ROOT = Path(__file__).resolve().parent.parent
_RESULT_PREFIX = "TRAIN_THROUGHPUT_RESULT "  # marks the worker's one JSON line on stdout

# Sparse fields and their hash buckets ("small" preset): 2 id fields, then 18 attribute/context
# fields.
_SPARSE_FIELDS: tuple[tuple[str, int], ...] = (
    ("user_id", 200_000),
    ("item_id", 100_000),
    ("shop_id", 20_000),
    ("brand_id", 10_000),
    ("campaign_id", 8_000),
    ("category_id", 4_000),
    ("user_city", 2_000),
    ("item_city", 2_000),
    ("query_category", 1_000),
    ("user_tag", 500),
    ("item_tag", 500),
    ("user_segment", 200),
    ("price_bucket", 100),
    ("page", 50),
    ("hour", 24),
    ("age_bucket", 20),
    ("position", 20),
    ("os", 10),
    ("device_type", 10),
    ("channel", 10),
)
# Table-size presets: hash buckets that replace the "small" ones above.
_TABLE_PRESETS: dict[str, dict[str, int]] = {
    # The public Ali-CCP data set's 0.4M users and 4.3M items (Ma et al., ESMM, SIGIR 2018,
    # Table 1): the smallest real vocabulary this product is built for. 4.8M rows in all.
    "ali-ccp": {"user_id": 400_000, "item_id": 4_300_000},
    # 348k rows in all: the MMoE dominates a step and the embedding update is a few % of it.
    "small": {},
}
_DENSE_FIELDS = ("price", "dwell_time")
_EMBEDDING_DIM = 16
_ZIPF_EXPONENT = 1.2  # id popularity ~ rank^-1.2: a few hot rows and a long tail
_CLICK_RATE = 0.04
_CONVERSION_RATE = 0.05  # of clicks
_TARGET_RATIO = 1.25  # torchrec_1p median / reference median that the issue asks for
_BUSY_SHARE = 0.10  # CPU share taken by other processes above which the table carries a warning
_TICK = os.sysconf("SC_CLK_TCK")  # /proc/stat counts in these ticks per second


@unique
class Variant(str, Enum):
    TORCHREC_1P = "torchrec_1p"  # the TorchRec path in one process
    TORCHREC_2P = "torchrec_2p"  # the TorchRec path, torchrun with 2 processes of 1 thread each
    REFERENCE = "reference"  # nn.EmbeddingBag + dense Adam over every row, one process


@unique
class Worker(str, Enum):
    TORCHREC = "torchrec"  # product path: DMP, fused row-wise Adagrad, dense Adam
    REFERENCE = "reference"  # EmbeddingBagArch, one Adam over all parameters


@dataclass
class Settings:
    steps: int = 30  # timed steps per worker
    warmup: int = 5  # untimed steps before them
    batch_size: int = 4096  # rows per step per process
    pool_batches: int = 8  # distinct synthetic batches, cycled
    seed: int = 0  # data and initial weights
    tables: str = "ali-ccp"  # table-size preset, see _TABLE_PRESETS
    table_scale: float = 1.0  # multiplies every table's rows (0.001: tests)
    num_experts: int = 8
    expert_sizes: list[int] = field(default_factory=lambda: [256])
    tower_sizes: list[int] = field(default_factory=lambda: [128, 64])
    rounds: int = 1  # the variants take turns this many times; their steps are pooled
    wait_idle: float = 0.0  # seconds to wait, before each variant, for other processes to go quiet
    variants: list[str] = field(default_factory=lambda: [v.value for v in Variant])

    def check(self) -> None:
        """Raises: ValueError naming the flag of an out-of-range setting."""
        for name in ("steps", "batch_size", "pool_batches", "num_experts", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.wait_idle < 0:
            raise ValueError(f"--wait-idle must be >= 0, got {self.wait_idle}")
        if self.tables not in _TABLE_PRESETS:
            raise ValueError(
                f"--tables must be one of {sorted(_TABLE_PRESETS)}, got {self.tables!r}"
            )
        if self.table_scale <= 0:
            raise ValueError(f"--table-scale must be > 0, got {self.table_scale}")
        if (
            not self.expert_sizes
            or min(self.expert_sizes) < 1
            or min(self.tower_sizes, default=1) < 1
        ):
            raise ValueError(
                "--expert-sizes and --tower-sizes must be positive, "
                f"got {self.expert_sizes} and {self.tower_sizes}"
            )

    def worker_args(self) -> list[str]:
        """The flags that give a worker these settings (rounds and variants stay here)."""
        return [
            f"--steps={self.steps}",
            f"--warmup={self.warmup}",
            f"--batch-size={self.batch_size}",
            f"--pool-batches={self.pool_batches}",
            f"--seed={self.seed}",
            f"--tables={self.tables}",
            f"--table-scale={self.table_scale}",
            f"--num-experts={self.num_experts}",
            "--expert-sizes",
            *map(str, self.expert_sizes),
            "--tower-sizes",
            *map(str, self.tower_sizes),
        ]

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            num_experts=self.num_experts,
            expert_sizes=list(self.expert_sizes),
            tower_sizes=list(self.tower_sizes),
            dropout=0.0,
        )


# Data ----------------------------------------------------------------------------------------


def bench_schema(tables: str = "ali-ccp", table_scale: float = 1.0) -> FeatureSchema:
    """20 single-valued sparse fields of dim 16 and 2 dense features.

    Args:
        tables: table-size preset (``_TABLE_PRESETS``).
        table_scale: multiplies every field's hash buckets (at least 10 buckets are kept).
    """
    buckets_of = dict(_SPARSE_FIELDS) | _TABLE_PRESETS[tables]
    return FeatureSchema.from_dict(
        {
            "name": "train_throughput",
            "sparse": [
                {
                    "name": name,
                    "hash_buckets": max(10, round(buckets_of[name] * table_scale)),
                    "dim": _EMBEDDING_DIM,
                }
                for name, _ in _SPARSE_FIELDS
            ],
            "dense": [{"name": name} for name in _DENSE_FIELDS],
            "labels": {"click": "click", "conversion": "conversion"},
        }
    )


def synthetic_batches(schema: FeatureSchema, batch_size: int, count: int, seed: int) -> list[Batch]:
    """``count`` batches of ``batch_size`` rows of single-valued features (seeded)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        # KJT layout: all rows of the first key, then all rows of the next; one value per row.
        ids = [
            (rng.zipf(_ZIPF_EXPONENT, batch_size) - 1) % schema.table_of(name).buckets
            for name in schema.sparse_names
        ]
        click = rng.random(batch_size) < _CLICK_RATE
        conversion = click & (rng.random(batch_size) < _CONVERSION_RATE)
        dense = rng.standard_normal((batch_size, len(schema.dense)), dtype=np.float32)
        batches.append(
            Batch(
                sparse=KeyedJaggedTensor.from_lengths_sync(
                    keys=schema.sparse_names,
                    values=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
                    lengths=torch.ones(len(ids) * batch_size, dtype=torch.int64),
                ),
                dense=torch.from_numpy(dense),
                click=torch.from_numpy(click.astype(np.float32)),
                conversion=torch.from_numpy(conversion.astype(np.float32)),
            )
        )
    return batches


# The reference -------------------------------------------------------------------------------


class EmbeddingBagArch(nn.Module):
    """Plain-PyTorch twin of ``SparseArch``: one ``nn.EmbeddingBag`` per table, fed from the KJT.

    Its output ``(B, F * D)`` has the features in the order of ``SparseArch``'s (the configs'
    order), so it can replace ``CtcvrModel.sparse_arch``. With a dense optimizer every row of
    every table is updated on each step: that cost is what the benchmark compares against.

    Args:
        configs: the tables, as ``embedding_bag_configs(schema)`` gives them.

    Example::

        arch = EmbeddingBagArch(embedding_bag_configs(schema))
        arch(batch.sparse).shape  # (B, sum of embedding dims over features)
    """

    def __init__(self, configs: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.bags = nn.ModuleDict()
        self.feature_tables: list[tuple[str, str]] = []  # (feature, table) in output order
        for config in configs:
            # KJT offsets have B + 1 entries: the last one closes the last bag.
            bag = nn.EmbeddingBag(
                config.num_embeddings,
                config.embedding_dim,
                include_last_offset=True,
                mode="mean" if config.pooling == PoolingType.MEAN else "sum",
            )
            with torch.no_grad():
                config.init_fn(bag.weight)  # TorchRec's table init: uniform(+-1/sqrt(rows))
            self.bags[config.name] = bag
            self.feature_tables += [(feature, config.name) for feature in config.feature_names]
        self.out_features = sum(self.bags[table].embedding_dim for _, table in self.feature_tables)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features with one key per sparse feature. Returns ``(B, F * D)`` pooled."""
        jagged = features.to_dict()
        return torch.cat(
            [
                self.bags[table](jagged[f].values(), jagged[f].offsets())
                for f, table in self.feature_tables
            ],
            dim=1,
        )


# Workers -------------------------------------------------------------------------------------


def _setup_torchrec(
    schema: FeatureSchema, settings: Settings
) -> tuple[DistContext, nn.Module, object, dict]:
    # The recipe's order: process group, model on meta, sparse optimizer in backward, shard, dense.
    ctx = init_distributed("gloo", "cpu")
    torch.manual_seed(settings.seed)
    objective = build_objective("esmm")
    module = TrainModule(
        build_model(schema, settings.model_config(), objective.required_heads), objective
    )
    fuse_sparse_optimizer(module, SparseOptimizerConfig())
    model = shard_model(module, ctx, ShardingConfig(backend="gloo"))
    optimizer = build_optimizer(model, DenseOptimizerConfig())
    plan = {
        table: f"{p.sharding_type}/{p.compute_kernel}/ranks={p.ranks}"
        for module_plan in model.plan.plan.values()
        for table, p in module_plan.items()
    }
    return ctx, model, optimizer, {"plan": plan}


def _setup_reference(
    schema: FeatureSchema, settings: Settings
) -> tuple[DistContext, nn.Module, object, dict]:
    ctx = init_distributed("gloo", "cpu")  # a 1-rank group: the result is gathered as for TorchRec
    torch.manual_seed(settings.seed)
    objective = build_objective("esmm")
    # Built as the TorchRec worker builds it (tables on meta draw no random numbers), so the
    # dense layers start from the same weights; then the EBC is swapped for EmbeddingBags.
    model = build_model(schema, settings.model_config(), objective.required_heads)
    model.sparse_arch = EmbeddingBagArch(embedding_bag_configs(schema))
    module = TrainModule(model, objective)
    # The product's dense optimizer and settings, over every parameter, embedding rows included.
    config = DenseOptimizerConfig()
    optimizer = torch.optim.Adam(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    return ctx, module, optimizer, {}


def run_worker(worker: Worker, settings: Settings) -> None:
    """Train ``warmup + steps`` steps; rank 0 prints one result line with every rank's times."""
    start = time.perf_counter()
    schema = bench_schema(settings.tables, settings.table_scale)
    pool = synthetic_batches(schema, settings.batch_size, settings.pool_batches, settings.seed)
    setup = _setup_torchrec if worker is Worker.TORCHREC else _setup_reference
    ctx, model, optimizer, extra = setup(schema, settings)
    setup_s = time.perf_counter() - start
    mine = _timed_steps(model, optimizer, pool, ctx, settings)
    mine.update(rank=ctx.rank, setup_s=setup_s)
    # Free the sharded model before the process group and the interpreter go: torchrun ranks
    # otherwise abort now and then at exit ("terminate called without an active exception").
    del model, optimizer
    gc.collect()

    ranks = gather_objects(mine, ctx)
    if ranks is not None:
        result = {
            "worker": worker.value,
            "world_size": ctx.world_size,
            "batch_size": settings.batch_size,
            "ranks": ranks,
            **extra,
        }
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
    barrier(ctx)
    shutdown_distributed()


def _timed_steps(
    model: nn.Module, optimizer, pool: list[Batch], ctx: DistContext, settings: Settings
) -> dict:
    """The warmup steps, then the timed ones: step times, memory, threads and CPU use."""

    def train_step(step: int) -> float:
        # Ranks read different batches of the one pool, as data-parallel ranks read different rows.
        batch = pool[(step * ctx.world_size + ctx.rank) % len(pool)]
        t0 = time.perf_counter()
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - t0
        losses.append(loss.item())  # off the clock: on a GPU this would be a sync point
        return elapsed

    model.train()
    losses: list[float] = []
    for step in range(settings.warmup):
        train_step(step)
    machine, own = _cpu_ticks(), _own_cpu_s()
    timed = range(settings.warmup, settings.warmup + settings.steps)
    step_s = [train_step(step) for step in timed]
    machine_after = _cpu_ticks()
    measured = machine is not None and machine_after is not None
    return {
        "step_s": step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "threads": torch.get_num_threads(),
        "cpu_s": _own_cpu_s() - own,  # this process's CPU time over the timed steps
        # The whole machine's busy and elapsed CPU time over the timed steps (None off Linux).
        "machine_busy_s": (machine_after[0] - machine[0]) / _TICK if measured else None,
        "machine_total_s": (machine_after[1] - machine[1]) / _TICK if measured else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None off Linux."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Orchestrator --------------------------------------------------------------------------------


def _variant_command(variant: Variant, settings: Settings) -> tuple[list[str], dict[str, str]]:
    script = str(Path(__file__).resolve())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    if variant is Variant.TORCHREC_2P:
        # 2 processes on 2 cores: one intra-op thread each, or they oversubscribe the cores.
        env["OMP_NUM_THREADS"] = "1"
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
        ]
        return [*launcher, script, "--worker", Worker.TORCHREC.value, *settings.worker_args()], env
    worker = Worker.REFERENCE if variant is Variant.REFERENCE else Worker.TORCHREC
    return [sys.executable, script, "--worker", worker.value, *settings.worker_args()], env


def _wait_for_idle(timeout_s: float) -> None:
    """Wait, at most ``timeout_s``, until other processes use under ``_BUSY_SHARE`` of the CPUs."""
    deadline, logged = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        before = _cpu_ticks()
        time.sleep(2.0)
        after = _cpu_ticks()
        if before is None or after is None or after[1] == before[1]:
            return
        share = (after[0] - before[0]) / (after[1] - before[1])  # this process sleeps: all others'
        if share < _BUSY_SHARE:
            return
        if not logged:
            log.info("machine busy (other processes use %.0f%% of the CPUs); waiting", 100 * share)
            logged = True
    log.warning("machine still busy after %.0f s of --wait-idle; running anyway", timeout_s)


def _run_variant(variant: Variant, settings: Settings) -> dict:
    if settings.wait_idle > 0:
        _wait_for_idle(settings.wait_idle)
    command, env = _variant_command(variant, settings)
    prefix = "OMP_NUM_THREADS=1 " if variant is Variant.TORCHREC_2P else ""
    log.info("%s: %s%s", variant.value, prefix, " ".join(command))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=_ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{variant.value} worker failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(lines[-1][len(_RESULT_PREFIX) :])
    result.update(variant=variant.value, command=prefix + " ".join(command))
    result["others_cpu_share"] = _others_cpu_share(result)
    others = result["others_cpu_share"]
    log.info(
        "%s: done in %.1f s; other processes took %s of the CPUs during the timed steps",
        variant.value,
        time.perf_counter() - start,
        "?" if others is None else f"{others:.0%}",
    )
    return result


def _others_cpu_share(result: dict) -> float | None:
    """Share of all CPUs that other processes used while the worker's timed steps ran.

    Outside load stretches the steps, so the table reports it: the machine's busy time over
    rank 0's timed steps, minus the CPU time of every rank (their timed steps coincide).
    """
    main = result["ranks"][0]
    if not main["machine_total_s"]:
        return None
    own = sum(rank["cpu_s"] for rank in result["ranks"])
    return max(0.0, main["machine_busy_s"] - own) / main["machine_total_s"]


def summarize(runs: list[dict]) -> dict:
    """One table row from a variant's runs (one per round).

    A step lasts as long as its slowest rank; samples/s counts every rank's rows. Peak RSS is
    the largest over ranks and rounds, and so is the CPU share other processes took.
    """
    world, batch = runs[0]["world_size"], runs[0]["batch_size"]
    step_s = [
        max(times) for run in runs for times in zip(*(rank["step_s"] for rank in run["ranks"]))
    ]
    rates = [world * batch / s for s in step_s]
    return {
        "variant": runs[0]["variant"],
        "processes": world,
        "threads": runs[0]["ranks"][0]["threads"],
        "steps": len(step_s),
        "min": min(rates),
        "median": statistics.median(rates),
        "max": max(rates),
        "median_per_process": statistics.median(rates) / world,
        "median_step_ms": 1000 * statistics.median(step_s),
        "peak_rss_mib": max(rank["peak_rss_mib"] for run in runs for rank in run["ranks"]),
        "others_cpu_share": max((run.get("others_cpu_share") or 0.0) for run in runs),
    }


def _embedding_rows(settings: Settings) -> int:
    schema = bench_schema(settings.tables, settings.table_scale)
    return sum(table.num_rows for table in schema.all_tables)


def _reference_median(rows: list[dict]) -> float | None:
    return next((r["median"] for r in rows if r["variant"] == Variant.REFERENCE.value), None)


def markdown_table(rows: list[dict], settings: Settings) -> str:
    """The result table, then the settings, the 1.25x target's verdict and any contention."""
    reference = _reference_median(rows)
    columns = (
        "path",
        "processes",
        "threads / process",
        "samples/s min",
        "samples/s median",
        "samples/s max",
        "median per process",
        "median step (ms)",
        "x reference (median)",
        "peak RSS MiB",
        "CPU used by others",
    )
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for r in rows:
        ratio = f"{r['median'] / reference:.2f}x" if reference else "n/a"
        cells = (
            r["variant"],
            r["processes"],
            r["threads"],
            f"{r['min']:,.0f}",
            f"{r['median']:,.0f}",
            f"{r['max']:,.0f}",
            f"{r['median_per_process']:,.0f}",
            f"{r['median_step_ms']:.1f}",
            ratio,
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['others_cpu_share']:.0%}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    cfg = settings
    lines += [
        "",
        (
            f"{cfg.rounds} round(s) of {cfg.steps} timed steps after {cfg.warmup} warmup steps; "
            f"batch {cfg.batch_size} per process; {len(_SPARSE_FIELDS)} sparse fields of dim "
            f"{_EMBEDDING_DIM} "
            f"({_embedding_rows(cfg):,} embedding rows: tables {cfg.tables!r}, scale "
            f"{cfg.table_scale:g}); MMoE "
            f"{cfg.num_experts} experts of {cfg.expert_sizes}, towers {cfg.tower_sizes}; ESMM; "
            f"{os.cpu_count()} CPUs. samples/s counts the rows of all processes."
        ),
    ]
    busy = [r["variant"] for r in rows if r["others_cpu_share"] > _BUSY_SHARE]
    single = next((r for r in rows if r["variant"] == Variant.TORCHREC_1P.value), None)
    if single is not None and reference:
        ratio = single["median"] / reference
        if {Variant.TORCHREC_1P.value, Variant.REFERENCE.value} & set(busy):
            verdict = "inconclusive, measured under outside load"
        else:
            verdict = "met" if ratio >= _TARGET_RATIO else "NOT met"
        lines.append(
            f"\nTarget torchrec_1p >= {_TARGET_RATIO}x reference: {verdict} ({ratio:.2f}x)."
        )
    if busy:
        lines.append(
            f"\nWarning: other processes took more than {_BUSY_SHARE:.0%} of the CPUs during "
            f"{', '.join(busy)}; those steps were stretched. Rerun on an idle machine "
            "(see --wait-idle)."
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, subtitle: str = "") -> None:
    """Bar chart of median samples/s per variant, min and max as whiskers."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    reference = _reference_median(rows)
    names = [
        f"{r['variant']} ({r['processes']} proc)\n{r['median']:,.0f}/s"
        + (f", {r['median'] / reference:.2f}x ref" if reference else "")
        for r in rows
    ]
    colors = {v.value: c for v, c in zip(Variant, ("#4c72b0", "#55a868", "#c44e52"))}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(
        names,
        [r["median"] for r in rows],
        capsize=6,
        color=[colors[r["variant"]] for r in rows],
        yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]],
    )
    ax.set_ylabel("samples/s (median; whiskers: min, max)")
    ax.set_title(
        "Training throughput: TorchRec vs nn.EmbeddingBag + dense Adam"
        + (f"\n{subtitle}" if subtitle else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_all(
    settings: Settings, out: Path, command: str = "benchmarks/train_throughput.py"
) -> list[dict]:
    """Run every variant, write the table, the chart and the raw JSON; return the table rows.

    With several rounds the variants take turns (A B C A B C), so a burst of outside load is
    spread over all of them rather than landing on one.
    """
    log.info("settings: %s", json.dumps(asdict(settings)))
    variants = [Variant(v) for v in settings.variants]
    runs: dict[Variant, list[dict]] = {v: [] for v in variants}
    for _ in range(settings.rounds):
        for variant in variants:
            runs[variant].append(_run_variant(variant, settings))
    rows = [summarize(runs[v]) for v in variants]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, settings)
    header = f"# Training throughput\n\nCommand: `.venv/bin/python {command}`\n\n"
    (out / "train_throughput.md").write_text(header + table)
    raw = {
        "command": command,
        "settings": asdict(settings),
        "rows": rows,
        "runs": {v.value: runs[v] for v in variants},
    }
    (out / "train_throughput.json").write_text(json.dumps(raw, indent=1))
    subtitle = (
        f"{_embedding_rows(settings):,} embedding rows, batch {settings.batch_size} per process"
    )
    plot(rows, out / "train_throughput.png", subtitle)
    print(table)
    log.info(
        "wrote %s, %s and %s", *(out / f"train_throughput.{ext}" for ext in ("md", "png", "json"))
    )
    return rows


def _parse(argv: Sequence[str] | None) -> tuple[Settings, Worker | None, Path]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per worker")
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="untimed steps before them"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="rows per step per process"
    )
    parser.add_argument(
        "--pool-batches", type=int, default=defaults.pool_batches, help="distinct batches, cycled"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and initial weights")
    parser.add_argument(
        "--tables",
        choices=sorted(_TABLE_PRESETS),
        default=defaults.tables,
        help="table sizes: Ali-CCP's user and item vocabularies (4.8M rows), or small (348k rows)",
    )
    parser.add_argument(
        "--table-scale",
        type=float,
        default=defaults.table_scale,
        help="multiply every table's rows (0.001 for a quick test)",
    )
    parser.add_argument("--num-experts", type=int, default=defaults.num_experts)
    parser.add_argument("--expert-sizes", type=int, nargs="+", default=defaults.expert_sizes)
    parser.add_argument("--tower-sizes", type=int, nargs="*", default=defaults.tower_sizes)
    parser.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="turns per variant, steps pooled"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=defaults.wait_idle,
        help="before each variant, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.value for v in Variant],
        default=defaults.variants,
        help="variants to run, in this order (default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=_ROOT / "benchmarks" / "results", help="output folder"
    )
    parser.add_argument("--worker", choices=[w.value for w in Worker], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        pool_batches=args.pool_batches,
        seed=args.seed,
        tables=args.tables,
        table_scale=args.table_scale,
        num_experts=args.num_experts,
        expert_sizes=args.expert_sizes,
        tower_sizes=args.tower_sizes,
        rounds=args.rounds,
        wait_idle=args.wait_idle,
        variants=args.variants,
    )
    try:
        settings.check()
    except ValueError as err:
        parser.error(str(err))
    return settings, (Worker(args.worker) if args.worker else None), args.out


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, worker, out = _parse(argv)
    # Our own handler: importing torchrec has already configured the root logger (at WARNING).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if worker is not None:
        run_worker(worker, settings)
        # The result is printed and the process group gone. Skip the interpreter's teardown: a
        # torchrun rank now and then aborts in it ("terminate called without an active
        # exception", from a gloo thread), which would fail a finished measurement.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        run_all(settings, out, " ".join(["benchmarks/train_throughput.py", *argv]))


if __name__ == "__main__":
    main()
