"""Training throughput: ctcvr against the strongest plain-PyTorch path and the head-only limit.

Run from the repository root (about 4 minutes on 2 idle CPU cores with the defaults)::

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --wait-idle 600 --rounds 3   # a shared machine
    .venv/bin/python benchmarks/train_throughput.py --tables small --out benchmarks/results/small
    .venv/bin/python benchmarks/train_throughput.py --allocator default --out /tmp/no_tuning

Outputs, under ``--out`` (default ``benchmarks/results``):

- ``train_throughput.md``: one row per variant: samples/s (min / median / max over the timed
  steps of all rounds), median step, ratios to the strongest plain path and to the head-only
  limit, the matrix products' GFLOP/s and their share of the sgemm peak, peak RSS, and the share
  of the CPUs other processes took meanwhile; then the sgemm peak, the settings, and each target
  met, missed, or inconclusive (measured under outside load, or on a host whose speed varied).
  The same table is printed.
- ``train_throughput.png``: median samples/s per variant, min and max as whiskers.
- ``train_throughput.json``: the resolved settings, the rows, and every worker's raw times.

Each variant is a worker subprocess of this file; with ``--rounds N`` they take turns N times
(in order, then in reverse order, and so on), so a burst of outside load is spread over all.

- ``ctcvr_1p``: the product's path, 1 process at the default threads: ``init_distributed`` ->
  ``build_model`` on ``meta`` -> ``TrainModule`` -> ``fuse_sparse_optimizer`` (FBGEMM's row-wise
  Adagrad inside backward, touching only the rows a batch reads) -> ``shard_model`` (DMP) ->
  ``build_optimizer`` (Adam on the rest).
- ``ctcvr_2p``: the same under ``torchrun --standalone --nproc_per_node=2``, one thread per rank,
  each rank training ``--batch-size`` rows a step, bound to its own core as the trainer binds
  ranks by default (``cpu_binding: auto``, ``trainer.cpu_binding``).
- ``ctcvr_1p_pair``: two ``ctcvr_1p`` processes of one thread each at once, each its own
  1-rank group (no collective) bound to its own core as ``ctcvr_2p``'s ranks are, timed side by
  side (:class:`Partner`) and counted as
  ``ctcvr_2p`` is: what 2 processes could gain over 1 on these cores if their collectives cost
  nothing, the ceiling of ``ctcvr_2p`` here.
- ``plain_sparse_adam``: the same ``CtcvrModel`` over one ``nn.EmbeddingBag(sparse=True)`` per
  table, ``torch.optim.SparseAdam`` for the tables, Adam for the rest.
- ``plain_adagrad``: the same with ``torch.optim.Adagrad`` (which takes sparse gradients) for the
  tables.
- ``plain_dense_adam`` (extra row, the former reference): the same bags with dense gradients and
  one Adam over every parameter, so every step updates every row.
- ``head_only``: the dense model alone (MMoE, towers, objective and Adam), fed a fixed
  ``(B, F * D)`` input that still takes gradients: the limit of any embedding stage.
- ``ctcvr_1p_head_paired``: ``ctcvr_1p`` and ``head_only`` built in one process, their timed
  steps taking turns in blocks of 5 (which goes first alternates): each block's ratio compares
  the two at the same moment's machine speed, where separate workers minutes apart see a VM
  whose speed drifts by more than the 5 % the target allows.
- ``sgemm``: ``--sgemm-reps`` square float32 matmuls of ``--sgemm-size`` at the default threads:
  this machine's peak, measured in the same run.

The dense head's compute paths, run only when named in ``--variants``, each measured against
``head_only`` in the same run (a second table: ratio per round, compile time, last loss, and
whether it pays, that is, is at least 1.10x ``head_only`` in every round):

- ``head_only_compile``: ``head_only`` under ``torch.compile`` (inductor, default mode); it
  compiles in the first warmup step, whose time is reported apart.
- ``head_only_bf16``: ``head_only`` with its forward under ``torch.autocast("cpu",
  dtype=torch.bfloat16)``: the products in bfloat16 (oneDNN's bf16 kernels), float32 weights
  and Adam.
- ``head_only_onednn``: ``head_only`` with ``torch.backends.mkldnn.matmul.fp32_precision =
  "bf16"``, which sends the float32 products to oneDNN instead of MKL; without AMX oneDNN keeps
  float32 math, so this is oneDNN's float32 matmul against MKL's.
- ``bf16_gemm``: the sgemm in bfloat16: the peak the bf16 path is also compared with.
- ``ctcvr_1p_bf16``: ``ctcvr_1p`` with the training setting this kept, ``train.precision=bf16``
  (``TrainModule(..., autocast_dtype=torch.bfloat16)``), measured against ``ctcvr_1p``.
- ``ctcvr_1p_adagrad``: ``ctcvr_1p`` with ``sparse_optimizer.name=adagrad`` (FBGEMM's fused
  Adagrad with an accumulator per element, D times the row-wise state) instead of row-wise
  Adagrad, measured against ``ctcvr_1p``: FBGEMM runs another CPU update kernel for each, and on
  some CPUs the row-wise one is most of what the embedding stage costs (``benchmarks/README.md``).

Every training variant runs the same ``CtcvrModel`` (``ModelConfig(num_experts=8,
expert_sizes=[256], tower_sizes=[128, 64])`` over 20 single-valued sparse fields of dim 16 and
2 dense features) with the ESMM objective through ``TrainModule``, from the same seed, on the
same pool of synthetic batches (Zipf-distributed ids, ~4 % clicks, ~5 % of clicks convert) made
before the timed loop; the dense parameters' optimizer is the product's (``dense_adam``) in every
variant, and every worker process tunes the host allocator as the trainer does
(``schemas.host_memory``, unless ``--allocator default``). The variants differ in the embedding
stage only, so:

- **ctcvr over the strongest plain path** (the faster of ``plain_sparse_adam`` and
  ``plain_adagrad`` in the same run) is what TorchRec and FBGEMM win over the embedding stage a
  PyTorch user would write; with the same dense code it can only win what that stage costs there.
- **ctcvr over the head-only limit** is what the embedding and sharding stage costs in ctcvr
  (target: at least 0.95), from the separate workers and, paired in time, as the median of
  ``ctcvr_1p_head_paired``'s block ratios.
- **GFLOP/s** counts the multiply-adds of the dense model's matrix products, forward and
  backward, exactly (:func:`matmul_flops_per_row`; elementwise work is not counted), over the
  whole step; its share of the sgemm peak measured in the same run, at the same threads, says how
  well the dense model uses the machine (target for ``head_only``: at least 0.6).
- **ctcvr_2p over ctcvr_1p**: target above 1 (2 processes ahead of 1 on the same cores); the
  line also gives ``ctcvr_1p_pair`` over ``ctcvr_1p``, the most the target could be.

A step is forward + ``zero_grad`` + backward + ``step``, timed with ``time.perf_counter``; the
warmup steps are not reported. With 2 processes a step lasts as long as its slowest rank and
samples/s counts both ranks' rows. Peak memory is ``ru_maxrss`` of the worker process (the
largest rank). Other processes on the machine stretch the steps, so each worker records the share
of all CPUs other processes took during its timed steps (from ``/proc/stat``); a target whose
variants saw more than 10 % is called inconclusive. ``--wait-idle`` waits for a quiet machine
before each variant. A virtual machine's host can also take the CPUs without any process or the
steal counter showing it: the sgemm's calls then run at different speeds, and when its slowest
call is below 80 % of its median every target is called inconclusive too.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum, unique
from functools import partial
from itertools import chain, pairwise
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from schemas import FeatureSchema
from schemas.host_memory import tune_host_allocator
from trainer.builders import build_model
from trainer.config import (
    DenseOptimizerConfig,
    ModelConfig,
    ShardingConfig,
    SparseOptimizer,
    SparseOptimizerConfig,
)
from trainer.data.batch import Batch
from trainer.distributed import (
    DistContext,
    barrier,
    build_optimizer,
    dense_adam,
    fuse_sparse_optimizer,
    gather_objects,
    init_distributed,
    shard_model,
    shutdown_distributed,
)
from trainer.model import CtcvrModel, embedding_bag_configs
from trainer.objectives import build_objective
from trainer.train_module import TrainModule

__all__ = [
    "BFloat16Autocast",
    "EmbeddingBagArch",
    "FixedInputArch",
    "Partner",
    "Settings",
    "Variant",
    "bench_schema",
    "head_path_verdict",
    "head_paths_table",
    "host_was_steady",
    "main",
    "markdown_table",
    "matmul_flops_per_row",
    "summarize",
    "synthetic_batches",
    "wait_stopping_on_failure",
]

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
_HEADS = ("ctr", "cvr")  # ESMM's
_EMBEDDING_DIM = 16
_ZIPF_EXPONENT = 1.2  # id popularity ~ rank^-1.2: a few hot rows and a long tail
_CLICK_RATE = 0.04
_CONVERSION_RATE = 0.05  # of clicks
_HEAD_ONLY_TARGET = 0.95  # ctcvr_1p median / head_only median
_SGEMM_SHARE_TARGET = 0.6  # head_only GFLOP/s / sgemm GFLOP/s
_BUSY_SHARE = 0.10  # CPU share taken by other processes above which a verdict is inconclusive
# The sgemm's slowest call below this share of its median: the host's speed varied during the run
# (a VM's host can take CPU time that /proc shows neither as other processes nor as steal), and
# ratios between variants run at different times are not trusted. Quiet runs here: 0.86, 0.94.
_STEADY_HOST_SHARE = 0.80
_TICK = os.sysconf("SC_CLK_TCK")  # /proc/stat counts in these ticks per second
_PAIR = 2  # processes of ctcvr_1p_pair
_PAIR_DIR_ENV = "CTCVR_BENCH_PAIR_DIR"  # the directory a pair's workers meet in (Partner)


@unique
class Variant(str, Enum):
    CTCVR_1P = "ctcvr_1p"  # the product's path in one process
    CTCVR_2P = "ctcvr_2p"  # the product's path, torchrun with 2 processes of 1 thread each
    # two ctcvr_1p processes of 1 thread each at once, each its own group: ctcvr_2p without
    # collectives, its ceiling on this machine
    CTCVR_1P_PAIR = "ctcvr_1p_pair"
    PLAIN_SPARSE_ADAM = "plain_sparse_adam"  # EmbeddingBag(sparse=True) + SparseAdam
    PLAIN_ADAGRAD = "plain_adagrad"  # EmbeddingBag(sparse=True) + Adagrad
    PLAIN_DENSE_ADAM = "plain_dense_adam"  # EmbeddingBag + one Adam over every row (extra row)
    HEAD_ONLY = "head_only"  # the dense model on a fixed input: the limit
    # ctcvr_1p and head_only in one process, their steps taking turns in short blocks: the
    # head-only ratio measured with both at the same moment's machine speed
    CTCVR_1P_HEAD_PAIRED = "ctcvr_1p_head_paired"
    SGEMM = "sgemm"  # a square matmul: the machine's peak
    # The dense head's compute paths, measured against head_only (not run by default):
    HEAD_ONLY_COMPILE = "head_only_compile"  # head_only under torch.compile (inductor)
    HEAD_ONLY_BF16 = "head_only_bf16"  # head_only's forward under CPU autocast to bfloat16
    HEAD_ONLY_ONEDNN = "head_only_onednn"  # head_only's float32 products by oneDNN, not MKL
    BF16_GEMM = "bf16_gemm"  # the sgemm in bfloat16: the bf16 variants' peak
    CTCVR_1P_BF16 = "ctcvr_1p_bf16"  # ctcvr_1p with train.precision=bf16, against ctcvr_1p
    # ctcvr_1p with sparse_optimizer.name=adagrad (an accumulator per element, not per row),
    # against ctcvr_1p: FBGEMM runs another CPU update kernel for it (benchmarks/README.md)
    CTCVR_1P_ADAGRAD = "ctcvr_1p_adagrad"


# The plain paths a PyTorch user would write with sparse gradients; the faster is "the strongest".
_PLAIN_SPARSE = (Variant.PLAIN_SPARSE_ADAM, Variant.PLAIN_ADAGRAD)
_HEAD_PATHS = (
    Variant.HEAD_ONLY_COMPILE,
    Variant.HEAD_ONLY_BF16,
    Variant.HEAD_ONLY_ONEDNN,
    Variant.CTCVR_1P_BF16,
    Variant.CTCVR_1P_ADAGRAD,
)
# What each path is measured against: the same code in float32, with row-wise Adagrad.
_REFERENCE = {v: Variant.HEAD_ONLY for v in _HEAD_PATHS} | {
    Variant.CTCVR_1P_BF16: Variant.CTCVR_1P,
    Variant.CTCVR_1P_ADAGRAD: Variant.CTCVR_1P,
}
_PEAKS = {Variant.SGEMM: torch.float32, Variant.BF16_GEMM: torch.bfloat16}  # gemm dtype
_ONE_THREAD = (Variant.CTCVR_2P, Variant.CTCVR_1P_PAIR)  # 2 processes, a core each
_DEFAULT = tuple(v for v in Variant if v not in _HEAD_PATHS and v is not Variant.BF16_GEMM)
_TRAINING = tuple(v for v in Variant if v not in _PEAKS)
_PAYS = 1.10  # a head path pays when faster than head_only by this factor in every round
_PAIRED_BLOCK = 5  # ctcvr_1p_head_paired: steps of one model before the other's turn


@unique
class Allocator(str, Enum):
    TUNED = "tuned"  # schemas.host_memory.tune_host_allocator(), as the trainer runs
    DEFAULT = "default"  # the C library's defaults


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
    sgemm_size: int = 2048  # n of the n x n x n sgemm
    sgemm_reps: int = 10  # timed sgemm calls per round
    allocator: str = Allocator.TUNED.value  # see Allocator
    rounds: int = 2  # the variants take turns this many times; their steps are pooled
    wait_idle: float = 0.0  # seconds to wait, before each variant, for other processes to go quiet
    variants: list[str] = field(default_factory=lambda: [v.value for v in _DEFAULT])

    def check(self) -> None:
        """Raises: ValueError naming the flag of an out-of-range setting."""
        for name in (
            "steps",
            "batch_size",
            "pool_batches",
            "num_experts",
            "rounds",
            "sgemm_size",
            "sgemm_reps",
        ):
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
            f"--sgemm-size={self.sgemm_size}",
            f"--sgemm-reps={self.sgemm_reps}",
            f"--allocator={self.allocator}",
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


# FLOPs ---------------------------------------------------------------------------------------


def matmul_flops_per_row(
    in_features: int,
    num_experts: int,
    expert_sizes: Sequence[int],
    tower_sizes: Sequence[int],
    heads: int = len(_HEADS),
) -> int:
    """FLOPs of the dense model's matrix products, forward and backward, per training row.

    Counts ``2 * multiply-adds`` of every product of ``CtcvrModel`` with plain towers: the
    experts' layers, each head's gate, the gates' mixing of the experts (a batched product of
    ``heads x E`` weights with ``E x H`` outputs) and each head's tower down to its logit. The
    backward pass computes two products per forward product, of the same size: the gradient of
    the weights and the gradient of the input (every input takes gradients, the MMoE's too,
    since the embeddings train). Elementwise work (biases, activations, softmax, the loss) is
    not counted. Padding the first layer's width (``trainer.model.experts.INPUT_ALIGN``) is the
    implementation's cost, not the model's, and not counted either.

    Args:
        in_features: the MMoE's input width ``D``.
        num_experts: ``E``.
        expert_sizes: each expert's layer widths.
        tower_sizes: each tower's hidden widths (a logit layer follows).
        heads: number of heads, each with a gate and a tower.

    Returns:
        FLOPs per row of a step (forward + backward).
    """
    experts = [in_features, *expert_sizes]
    towers = [expert_sizes[-1], *tower_sizes, 1]
    multiply_adds = (
        num_experts * sum(a * b for a, b in pairwise(experts))
        + heads * in_features * num_experts  # gates
        + heads * num_experts * expert_sizes[-1]  # mixing
        + heads * sum(a * b for a, b in pairwise(towers))
    )
    return 3 * 2 * multiply_adds  # forward, then the weights' and the input's gradients


def _flops_per_row(settings: Settings) -> int:
    return matmul_flops_per_row(
        len(_SPARSE_FIELDS) * _EMBEDDING_DIM + len(_DENSE_FIELDS),
        settings.num_experts,
        settings.expert_sizes,
        settings.tower_sizes,
    )


# Plain PyTorch and the head-only limit -------------------------------------------------------


class EmbeddingBagArch(nn.Module):
    """Plain-PyTorch twin of ``SparseArch``: one ``nn.EmbeddingBag`` per table, fed from the KJT.

    Its output ``(B, F * D)`` has the features in the order of ``SparseArch``'s (the configs'
    order), so it can replace ``CtcvrModel.sparse_arch``.

    Args:
        configs: the tables, as ``embedding_bag_configs(schema)`` gives them.
        sparse: sparse gradients (a ``torch.sparse_coo`` gradient of the rows a batch read, for
            ``torch.optim.SparseAdam`` or ``Adagrad``) instead of dense ones (every row).

    Example::

        arch = EmbeddingBagArch(embedding_bag_configs(schema), sparse=True)
        arch(batch.sparse).shape  # (B, sum of embedding dims over features)
    """

    def __init__(self, configs: Sequence[EmbeddingBagConfig], sparse: bool = False) -> None:
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
                sparse=sparse,
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


class FixedInputArch(nn.Module):
    """The embedding stage replaced by a constant: the head-only limit's input.

    Returns the same ``(B, F * D)`` tensor for every batch, as a new leaf that takes gradients,
    so the dense model's backward computes the input's gradient as it does for embeddings, and
    nothing else happens.

    Args:
        pooled: the input, e.g. the pooled embeddings of one batch.
    """

    def __init__(self, pooled: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pooled", pooled.detach().clone())
        self.out_features = pooled.shape[1]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features (ignored). Returns the fixed ``(B, F * D)`` input, taking gradients."""
        return self.pooled.detach().requires_grad_()


class _Optimizers:
    """Several optimizers stepped as one (the plain paths': one for the tables, one dense)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


# Workers -------------------------------------------------------------------------------------


def _model(schema: FeatureSchema, settings: Settings) -> CtcvrModel:
    # Tables on meta draw no random numbers: every variant's dense layers start from the same
    # weights, whatever it then puts in place of the tables.
    torch.manual_seed(settings.seed)
    return build_model(schema, settings.model_config())


def _setup_ctcvr(
    schema: FeatureSchema,
    settings: Settings,
    _pool: list[Batch],
    autocast_dtype: torch.dtype | None = None,
    sparse_optimizer: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD,
) -> tuple[DistContext, nn.Module, object, dict]:
    # The recipe's order: process group, model on meta, sparse optimizer in backward, shard, dense.
    ctx = init_distributed("gloo", "cpu")
    module = TrainModule(_model(schema, settings), build_objective("esmm"), autocast_dtype)
    fuse_sparse_optimizer(module, SparseOptimizerConfig(name=sparse_optimizer.value), ctx.device)
    model = shard_model(module, ctx, ShardingConfig(backend="gloo"))
    optimizer = build_optimizer(model, DenseOptimizerConfig())
    plan = {
        table: f"{p.sharding_type}/{p.compute_kernel}/ranks={p.ranks}"
        for module_plan in model.plan.plan.values()
        for table, p in module_plan.items()
    }
    return ctx, model, optimizer, {"plan": plan}


def _setup_plain(
    variant: Variant,
) -> Callable[[FeatureSchema, Settings, list[Batch]], tuple[DistContext, nn.Module, object, dict]]:
    def setup(
        schema: FeatureSchema, settings: Settings, _pool: list[Batch]
    ) -> tuple[DistContext, nn.Module, object, dict]:
        ctx = init_distributed("gloo", "cpu")  # a 1-rank group: results gathered as for ctcvr
        model = _model(schema, settings)
        sparse = variant is not Variant.PLAIN_DENSE_ADAM
        model.sparse_arch = EmbeddingBagArch(embedding_bag_configs(schema), sparse=sparse)
        module = TrainModule(model, build_objective("esmm"))
        dense_config, sparse_config = DenseOptimizerConfig(), SparseOptimizerConfig()
        if not sparse:  # one Adam over every parameter, embedding rows included
            return ctx, module, dense_adam(module.parameters(), dense_config), {}
        tables = list(model.sparse_arch.parameters())
        ids = {id(t) for t in tables}
        rest = [p for p in module.parameters() if id(p) not in ids]
        table_optimizer = (
            torch.optim.SparseAdam(tables, lr=sparse_config.lr, eps=sparse_config.eps)
            if variant is Variant.PLAIN_SPARSE_ADAM
            else torch.optim.Adagrad(tables, lr=sparse_config.lr, eps=sparse_config.eps)
        )
        return ctx, module, _Optimizers(table_optimizer, dense_adam(rest, dense_config)), {}

    return setup


def _setup_head_only(
    schema: FeatureSchema, settings: Settings, _pool: list[Batch]
) -> tuple[DistContext, nn.Module, object, dict]:
    ctx = init_distributed("gloo", "cpu")
    return ctx, *_head_only(schema, settings), {}


def _head_only(schema: FeatureSchema, settings: Settings) -> tuple[nn.Module, object]:
    """The dense model on its fixed input, and its optimizer."""
    model = _model(schema, settings)
    model.sparse_arch = FixedInputArch(_initial_pooled(schema, settings))
    module = TrainModule(model, build_objective("esmm"))
    return module, dense_adam(module.parameters(), DenseOptimizerConfig())


def _initial_pooled(schema: FeatureSchema, settings: Settings) -> torch.Tensor:
    """``(B, F * D)`` values distributed as the pooled embeddings of single-valued features at
    TorchRec's initialisation (each table's rows uniform in +-1/sqrt(rows)), without the tables."""
    generator = torch.Generator().manual_seed(settings.seed)
    columns = []
    for config in embedding_bag_configs(schema):
        bound = 1.0 / config.num_embeddings**0.5
        for _ in config.feature_names:
            uniform = torch.rand(settings.batch_size, config.embedding_dim, generator=generator)
            columns.append((2 * uniform - 1) * bound)
    return torch.cat(columns, dim=1)


def _setup_head_only_compiled(
    schema: FeatureSchema, settings: Settings, pool: list[Batch]
) -> tuple[DistContext, nn.Module, object, dict]:
    # Inductor compiles forward and backward at the first step, a warmup step: the compile time
    # is the first step's (reported), never a timed one's. The fused Adam step stays eager.
    ctx, module, optimizer, extra = _setup_head_only(schema, settings, pool)
    return ctx, torch.compile(module), optimizer, extra


class BFloat16Autocast(nn.Module):
    """Runs ``module``'s forward under CPU autocast to bfloat16.

    The parameters stay float32 (Adam updates them in float32); the products autocast lists run
    in bfloat16 on casts of them, and the backward runs each product in the forward's dtype.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(*args)


def _setup_head_only_bf16(
    schema: FeatureSchema, settings: Settings, pool: list[Batch]
) -> tuple[DistContext, nn.Module, object, dict]:
    ctx, module, optimizer, extra = _setup_head_only(schema, settings, pool)
    return ctx, BFloat16Autocast(module), optimizer, extra


def _setup_head_only_onednn(
    schema: FeatureSchema, settings: Settings, pool: list[Batch]
) -> tuple[DistContext, nn.Module, object, dict]:
    # Routes every float32 mm/addmm/bmm/baddbmm to oneDNN (MKL's sgemm otherwise), allowing it
    # bfloat16 math. On a CPU without AMX oneDNN keeps float32 math (ONEDNN_VERBOSE=1 shows its
    # brg_matmul:avx512_core f32 kernel with attr-fpmath:bf16): oneDNN against MKL in float32.
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    return _setup_head_only(schema, settings, pool)


_SETUP = {
    Variant.CTCVR_1P: _setup_ctcvr,
    Variant.CTCVR_2P: _setup_ctcvr,
    Variant.CTCVR_1P_PAIR: _setup_ctcvr,
    Variant.CTCVR_1P_BF16: partial(_setup_ctcvr, autocast_dtype=torch.bfloat16),
    Variant.CTCVR_1P_ADAGRAD: partial(_setup_ctcvr, sparse_optimizer=SparseOptimizer.ADAGRAD),
    Variant.PLAIN_SPARSE_ADAM: _setup_plain(Variant.PLAIN_SPARSE_ADAM),
    Variant.PLAIN_ADAGRAD: _setup_plain(Variant.PLAIN_ADAGRAD),
    Variant.PLAIN_DENSE_ADAM: _setup_plain(Variant.PLAIN_DENSE_ADAM),
    Variant.HEAD_ONLY: _setup_head_only,
    Variant.CTCVR_1P_HEAD_PAIRED: _setup_ctcvr,  # and head_only beside it (run_worker)
    Variant.HEAD_ONLY_COMPILE: _setup_head_only_compiled,
    Variant.HEAD_ONLY_BF16: _setup_head_only_bf16,
    Variant.HEAD_ONLY_ONEDNN: _setup_head_only_onednn,
}


def run_worker(variant: Variant, settings: Settings) -> None:
    """Run ``variant``; rank 0 prints one result line with every rank's times."""
    if settings.allocator == Allocator.TUNED.value:
        tune_host_allocator()
    if variant in _PEAKS:
        print(_RESULT_PREFIX + json.dumps(_gemm(settings, _PEAKS[variant])), flush=True)
        return
    start = time.perf_counter()
    schema = bench_schema(settings.tables, settings.table_scale)
    pool = synthetic_batches(schema, settings.batch_size, settings.pool_batches, settings.seed)
    ctx, model, optimizer, extra = _SETUP[variant](schema, settings, pool)
    if variant is Variant.CTCVR_1P_HEAD_PAIRED:
        head, head_optimizer = _head_only(schema, settings)
    setup_s = time.perf_counter() - start
    if variant is Variant.CTCVR_1P_HEAD_PAIRED:
        mine = _paired_steps((model, optimizer), (head, head_optimizer), pool, settings)
        del head, head_optimizer
    else:
        mine = _timed_steps(model, optimizer, pool, ctx, settings)
    mine.update(rank=ctx.rank, setup_s=setup_s)
    # Free the sharded model before the process group and the interpreter go: torchrun ranks
    # otherwise abort now and then at exit ("terminate called without an active exception").
    del model, optimizer
    gc.collect()

    ranks = gather_objects(mine, ctx)
    if ranks is not None:
        result = {
            "world_size": ctx.world_size,
            "batch_size": settings.batch_size,
            "ranks": ranks,
            **extra,
        }
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
    barrier(ctx)
    shutdown_distributed()


def timed_step(
    model: nn.Module, optimizer: torch.optim.Optimizer | _Optimizers, batch: Batch
) -> tuple[float, torch.Tensor]:
    """One training step (forward, ``zero_grad``, backward, ``step``) and its seconds on the
    clock; the loss, to be read off the clock."""
    t0 = time.perf_counter()
    loss, _ = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0, loss


def _timed_steps(
    model: nn.Module, optimizer, pool: list[Batch], ctx: DistContext, settings: Settings
) -> dict:
    """The warmup steps, then the timed ones: step times, memory, threads and CPU use."""

    def train_step(step: int) -> float:
        # Ranks read different batches of the one pool, as data-parallel ranks read different rows.
        batch = pool[(step * ctx.world_size + ctx.rank) % len(pool)]
        elapsed, loss = timed_step(model, optimizer, batch)
        losses.append(loss.item())  # off the clock: on a GPU this would be a sync point
        return elapsed

    model.train()
    losses: list[float] = []
    partner = Partner.from_env()
    warmup_s = [train_step(step) for step in range(settings.warmup)]
    if partner:
        partner.wait("ready")
    end = settings.warmup + settings.steps
    with _CpuWatch() as watch:
        step_s = [train_step(step) for step in range(settings.warmup, end)]
    first_loss, last_loss = losses[0], losses[-1]
    if partner:  # train on, untimed, while the other process still times its steps
        partner.arrive("done")
        while not partner.all_arrived("done"):
            train_step(end)
    return {
        "step_s": step_s,
        "warmup_s": warmup_s,  # the first one holds torch.compile's compile time
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "threads": torch.get_num_threads(),
        **watch.result,
        "first_loss": first_loss,
        "last_loss": last_loss,
    }


def _paired_steps(
    ctcvr: tuple[nn.Module, object],
    head: tuple[nn.Module, object],
    pool: list[Batch],
    settings: Settings,
) -> dict:
    """ctcvr_1p's and head_only's steps in one process, taking turns in blocks of
    ``_PAIRED_BLOCK`` (which goes first alternates), so that both see the machine at the same
    speed: each block's ratio (head_only's median step over ctcvr's) is ctcvr's samples/s as a
    share of head_only's at that moment.

    Returns ``_timed_steps``' keys for ctcvr (``step_s``: its timed steps), plus
    ``head_step_s`` and ``block_ratios``.
    """
    models = {"ctcvr": ctcvr, "head": head}
    steps: dict[str, list[float]] = {"ctcvr": [], "head": []}
    losses: list[float] = []

    def run(name: str, step: int) -> float:
        model, optimizer = models[name]
        elapsed, loss = timed_step(model, optimizer, pool[step % len(pool)])
        if name == "ctcvr":
            losses.append(loss.item())
        return elapsed

    for model, _ in models.values():
        model.train()
    for step in range(settings.warmup):
        run("ctcvr", step)
        run("head", step)
    ratios = []
    end = settings.warmup + settings.steps
    with _CpuWatch() as watch:
        for number, start in enumerate(range(settings.warmup, end, _PAIRED_BLOCK)):
            block = range(start, min(start + _PAIRED_BLOCK, end))
            timed = {}
            for name in ("ctcvr", "head") if number % 2 == 0 else ("head", "ctcvr"):
                timed[name] = [run(name, step) for step in block]
                steps[name] += timed[name]
            ratios.append(statistics.median(timed["head"]) / statistics.median(timed["ctcvr"]))
    return {
        "step_s": steps["ctcvr"],
        "head_step_s": steps["head"],
        "block_ratios": ratios,
        "warmup_s": [],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        **watch.result,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


class Partner:
    """Keeps a ``ctcvr_1p_pair`` worker in step with the other process of its pair, through
    marker files in a directory both share (``_PAIR_DIR_ENV``): both start their timed steps
    together, and the first to finish trains on until the other is done, so every timed step
    runs beside the other process's.

    Raises:
        TimeoutError: (``wait``) the other process did not arrive within ``timeout_s``.
    """

    def __init__(self, directory: Path, name: str, timeout_s: float = 600.0) -> None:
        self.directory, self.name, self.timeout_s = directory, name, timeout_s

    @classmethod
    def from_env(cls) -> Partner | None:
        directory = os.environ.get(_PAIR_DIR_ENV)
        return cls(Path(directory), name=str(os.getpid())) if directory else None

    def arrive(self, stage: str) -> None:
        (self.directory / f"{stage}-{self.name}").touch()

    def all_arrived(self, stage: str) -> bool:
        return len(list(self.directory.glob(f"{stage}-*"))) >= _PAIR

    def wait(self, stage: str) -> None:
        self.arrive(stage)
        deadline = time.monotonic() + self.timeout_s
        while not self.all_arrived(stage):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other process of the pair never reached {stage!r}")
            time.sleep(0.005)


def _gemm(settings: Settings, dtype: torch.dtype = torch.float32) -> dict:
    """``sgemm_reps`` timed ``n x n`` products in ``dtype`` (after 2 untimed), at the default
    threads."""
    n = settings.sgemm_size
    generator = torch.Generator().manual_seed(settings.seed)
    a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    with _CpuWatch() as watch:
        call_s = []
        for _ in range(settings.sgemm_reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            call_s.append(time.perf_counter() - t0)
    return {
        "size": n,
        "flops_per_call": 2 * n**3,
        "world_size": 1,
        "ranks": [{"call_s": call_s, "threads": torch.get_num_threads(), **watch.result}],
    }


class _CpuWatch:
    """This process's CPU time, and the whole machine's busy and elapsed CPU time, over a block.

    ``result`` holds ``cpu_s``, ``machine_busy_s`` and ``machine_total_s`` (the machine's are
    None off Linux) once the block has run.
    """

    def __enter__(self) -> Self:
        self._machine, self._own = _cpu_ticks(), _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        machine = _cpu_ticks()
        measured = self._machine is not None and machine is not None
        self.result = {
            "cpu_s": _own_cpu_s() - self._own,
            "machine_busy_s": (machine[0] - self._machine[0]) / _TICK if measured else None,
            "machine_total_s": (machine[1] - self._machine[1]) / _TICK if measured else None,
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
    worker = [script, "--worker", variant.value, *settings.worker_args()]
    if variant in _ONE_THREAD:
        # 2 processes on 2 cores: one intra-op thread each, or they oversubscribe the cores.
        env["OMP_NUM_THREADS"] = "1"
    if variant is Variant.CTCVR_2P:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
        ]
        return [*launcher, *worker], env
    return [sys.executable, *worker], env


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
    prefix = "OMP_NUM_THREADS=1 " if variant in _ONE_THREAD else ""
    log.info("%s: %s%s", variant.value, prefix, " ".join(command))
    start = time.perf_counter()
    if variant is Variant.CTCVR_1P_PAIR:
        result = _run_pair(command, env)
    else:
        proc = subprocess.run(
            command, env=env, cwd=_ROOT, capture_output=True, text=True, check=False
        )
        result = _worker_result(variant, proc.returncode, proc.stdout, proc.stderr)
    result.update(variant=variant.value, command=prefix + " ".join(command))
    result["others_cpu_share"] = _others_cpu_share(result)
    others = result["others_cpu_share"]
    log.info(
        "%s: done in %.1f s; other processes took %s of the CPUs during the timed part",
        variant.value,
        time.perf_counter() - start,
        "?" if others is None else f"{others:.0%}",
    )
    return result


def _run_pair(command: list[str], env: dict[str, str]) -> dict:
    """Two workers of ``command`` at once, meeting in a fresh directory (:class:`Partner`); one
    result whose ranks are the two processes (a step counted as long as the slower one's, as
    for ctcvr_2p's ranks). When one fails, the other is stopped rather than left waiting for
    it at the meeting."""
    with tempfile.TemporaryDirectory(prefix="ctcvr-pair-") as meeting:
        env = {**env, _PAIR_DIR_ENV: meeting}
        logs = [(Path(meeting) / f"out-{i}", Path(meeting) / f"err-{i}") for i in range(_PAIR)]
        procs = []
        for rank, (out, err) in enumerate(logs):  # files, not pipes: a chatty worker cannot
            # block on a full pipe; each is bound to its share of the cores as torchrun's ranks
            rank_env = {**env, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(_PAIR)}
            with open(out, "w") as stdout, open(err, "w") as stderr:
                procs.append(
                    subprocess.Popen(command, env=rank_env, cwd=_ROOT, stdout=stdout, stderr=stderr)
                )
        wait_stopping_on_failure(procs)
        # The worker that failed on its own is read first, so it is the one reported, not the
        # partner stopped for it (the sort is stable: with no failure the order is the launch's).
        outputs = sorted(
            zip(procs, logs, strict=True), key=lambda o: o[0].returncode == -signal.SIGKILL
        )
        results = [
            _worker_result(Variant.CTCVR_1P_PAIR, proc.returncode, out.read_text(), err.read_text())
            for proc, (out, err) in outputs
        ]
    return {**results[0], "world_size": _PAIR, "ranks": [r["ranks"][0] for r in results]}


def wait_stopping_on_failure(procs: Sequence[subprocess.Popen]) -> None:
    """Wait until every process has ended; once one fails, kill the others (a pair's partner
    would otherwise wait for it)."""
    while None in (codes := [proc.poll() for proc in procs]):  # poll every one, each time
        if any(code not in (None, 0) for code in codes):
            for proc in procs:
                proc.kill()
        time.sleep(0.1)


def _worker_result(variant: Variant, returncode: int, stdout: str, stderr: str) -> dict:
    """The result line a worker printed.

    Raises:
        RuntimeError: the worker failed or printed none, with the ends of its output.
    """
    lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if returncode != 0 or not lines:
        raise RuntimeError(
            f"{variant.value} worker failed (exit {returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(_RESULT_PREFIX) :])


def _others_cpu_share(result: dict) -> float | None:
    """Share of all CPUs that other processes used while the worker's timed part ran.

    Outside load stretches the steps, so the table reports it: the machine's busy time over
    rank 0's timed steps, minus the CPU time of every rank (their timed steps coincide).
    """
    main = result["ranks"][0]
    if not main["machine_total_s"]:
        return None
    own = sum(rank["cpu_s"] for rank in result["ranks"])
    return max(0.0, main["machine_busy_s"] - own) / main["machine_total_s"]


def summarize(runs: list[dict], flops_per_row: int) -> dict:
    """One table row from a training variant's runs (one per round).

    A step lasts as long as its slowest rank; samples/s counts every rank's rows. Peak RSS is
    the largest over ranks and rounds, and so is the CPU share other processes took.

    Args:
        runs: the variant's worker results.
        flops_per_row: :func:`matmul_flops_per_row` of the model.
    """
    world, batch = runs[0]["world_size"], runs[0]["batch_size"]
    step_s = [_slowest_rank(run, "step_s") for run in runs]
    rates = [world * batch / s for s in chain.from_iterable(step_s)]
    median = statistics.median(rates)
    first_steps = [times[0] for run in runs if (times := _slowest_rank(run, "warmup_s"))]
    return {
        "variant": runs[0]["variant"],
        "processes": world,
        "threads": runs[0]["ranks"][0]["threads"],
        "steps": len(step_s),
        "min": min(rates),
        "median": median,
        "max": max(rates),
        "median_step_ms": 1000 * statistics.median(chain.from_iterable(step_s)),
        "gflops": median * flops_per_row / 1e9,
        "peak_rss_mib": max(rank["peak_rss_mib"] for run in runs for rank in run["ranks"]),
        "others_cpu_share": _busiest(runs),
        # Each round's median samples/s: a head path pays only if it is ahead in every round.
        "round_medians": [statistics.median(world * batch / s for s in times) for times in step_s],
        # The first warmup step, slowest over rounds: torch.compile compiles in it.
        "first_step_s": max(first_steps, default=None),
        "last_loss": runs[0]["ranks"][0].get("last_loss"),
        # ctcvr_1p_head_paired: each block's ctcvr samples/s as a share of head_only's
        "paired_ratios": [r for run in runs for r in run["ranks"][0].get("block_ratios", [])],
    }


def _slowest_rank(run: dict, key: str) -> list[float]:
    """Each step's time in ``run``: its slowest rank's (ranks wait for each other)."""
    return [max(times) for times in zip(*(rank.get(key, []) for rank in run["ranks"]))]


def summarize_sgemm(runs: list[dict], variant: Variant = Variant.SGEMM) -> dict:
    """A gemm peak from its runs: GFLOP/s of each call; the median is the peak reported."""
    flops = runs[0]["flops_per_call"]
    rates = [flops / s / 1e9 for run in runs for s in run["ranks"][0]["call_s"]]
    return {
        "variant": variant.value,
        "size": runs[0]["size"],
        "threads": runs[0]["ranks"][0]["threads"],
        "calls": len(rates),
        "min": min(rates),
        "median": statistics.median(rates),
        "max": max(rates),
        "others_cpu_share": _busiest(runs),
    }


def _busiest(runs: Iterable[dict]) -> float:
    return max((run.get("others_cpu_share") or 0.0) for run in runs)


@dataclass(frozen=True)
class Headline:
    """The ratios the benchmark is for, each None when a variant it needs did not run.

    Attributes:
        strongest_plain: the faster of the plain sparse paths (its variant name).
        vs_plain: ctcvr_1p median / the strongest plain path's median.
        vs_head_only: ctcvr_1p median / head_only median.
        head_sgemm_share: head_only GFLOP/s / the sgemm peak.
        two_vs_one: ctcvr_2p median / ctcvr_1p median.
        pair_vs_one: ctcvr_1p_pair median / ctcvr_1p median: what 2 processes of 1 thread
            could gain over 1 of 2 threads without any collective (ctcvr_2p's ceiling).
        vs_head_only_paired: the median over ctcvr_1p_head_paired's blocks of ctcvr's
            samples/s over head_only's, the two taking turns in one process.
    """

    strongest_plain: str | None
    vs_plain: float | None
    vs_head_only: float | None
    head_sgemm_share: float | None
    two_vs_one: float | None
    pair_vs_one: float | None = None
    vs_head_only_paired: float | None = None


def headline(rows: dict[str, dict], sgemm: dict | None) -> Headline:
    """The headline ratios from the rows (by variant name) and the sgemm peak."""

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["median"] / rows[b]["median"] if a in rows and b in rows else None

    plain = [rows[v.value] for v in _PLAIN_SPARSE if v.value in rows]
    strongest = max(plain, key=lambda r: r["median"])["variant"] if plain else None
    head = rows.get(Variant.HEAD_ONLY.value)
    paired = rows.get(Variant.CTCVR_1P_HEAD_PAIRED.value)
    return Headline(
        strongest_plain=strongest,
        vs_plain=ratio(Variant.CTCVR_1P.value, strongest) if strongest else None,
        vs_head_only=ratio(Variant.CTCVR_1P.value, Variant.HEAD_ONLY.value),
        head_sgemm_share=head["gflops"] / sgemm["median"] if head and sgemm else None,
        two_vs_one=ratio(Variant.CTCVR_2P.value, Variant.CTCVR_1P.value),
        pair_vs_one=ratio(Variant.CTCVR_1P_PAIR.value, Variant.CTCVR_1P.value),
        vs_head_only_paired=(
            statistics.median(paired["paired_ratios"])
            if paired and paired.get("paired_ratios")
            else None
        ),
    )


def _verdict(
    value: float | None, met: bool, measured: Iterable[dict], sgemm: dict | None = None
) -> str:
    if value is None:
        return "not measured"
    if any(r["others_cpu_share"] > _BUSY_SHARE for r in measured):
        return "inconclusive, measured under outside load"
    if sgemm is not None and not host_was_steady(sgemm):
        return "inconclusive, the host's speed varied (see the sgemm line)"
    return "met" if met else "NOT met"


def host_was_steady(sgemm: dict) -> bool:
    """Whether the sgemm's calls ran at a steady speed: the slowest at least
    ``_STEADY_HOST_SHARE`` of the median. The same products at the same size should take the
    same time; when they do not, with no other process to blame, the host took the CPUs away."""
    return sgemm["min"] >= _STEADY_HOST_SHARE * sgemm["median"]


def markdown_table(rows: list[dict], sgemm: dict | None, settings: Settings) -> str:
    """The result table, the sgemm peak, the settings and the targets' verdicts."""
    by_name = {r["variant"]: r for r in rows}
    head = headline(by_name, sgemm)
    plain = by_name.get(head.strongest_plain) if head.strongest_plain else None
    head_only = by_name.get(Variant.HEAD_ONLY.value)
    columns = (
        "path",
        "processes",
        "threads / process",
        "samples/s min",
        "samples/s median",
        "samples/s max",
        "median step (ms)",
        "x strongest plain",
        "x head-only",
        "GFLOP/s",
        "of sgemm peak",
        "peak RSS MiB",
        "CPU used by others",
    )
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for r in rows:
        cells = (
            r["variant"],
            r["processes"],
            r["threads"],
            f"{r['min']:,.0f}",
            f"{r['median']:,.0f}",
            f"{r['max']:,.0f}",
            f"{r['median_step_ms']:.1f}",
            f"{r['median'] / plain['median']:.2f}x" if plain else "n/a",
            f"{r['median'] / head_only['median']:.2f}x" if head_only else "n/a",
            f"{r['gflops']:.1f}",
            f"{r['gflops'] / sgemm['median']:.2f}" if sgemm else "n/a",
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['others_cpu_share']:.0%}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    cfg = settings
    if sgemm:
        lines.append(
            f"\nsgemm peak: {sgemm['median']:.1f} GFLOP/s (median of {sgemm['calls']} calls of "
            f"{sgemm['size']} x {sgemm['size']} x {sgemm['size']} float32, "
            f"{sgemm['min']:.1f} to {sgemm['max']:.1f}; {sgemm['threads']} threads; other "
            f"processes took {sgemm['others_cpu_share']:.0%} of the CPUs)."
        )
    lines += [
        "",
        (
            f"{cfg.rounds} round(s) of {cfg.steps} timed steps after {cfg.warmup} warmup steps; "
            f"batch {cfg.batch_size} per process; {len(_SPARSE_FIELDS)} sparse fields of dim "
            f"{_EMBEDDING_DIM} "
            f"({_embedding_rows(cfg):,} embedding rows: tables {cfg.tables!r}, scale "
            f"{cfg.table_scale:g}); MMoE "
            f"{cfg.num_experts} experts of {cfg.expert_sizes}, towers {cfg.tower_sizes}; ESMM; "
            f"{_flops_per_row(cfg) / 1e6:.2f} MFLOP of matrix products per row; host allocator "
            f"{cfg.allocator}; {os.cpu_count()} CPUs. samples/s counts the rows of all processes."
        ),
        "",
        "| target | result |",
        "|---|---|",
    ]
    single = by_name.get(Variant.CTCVR_1P.value)
    double = by_name.get(Variant.CTCVR_2P.value)
    involved = [r for r in (single, plain) if r]
    lines.append(
        f"| ctcvr_1p over the strongest plain path ({head.strongest_plain or 'not run'}) | "
        + (
            f"{head.vs_plain:.2f}x (reported as it is)"
            + (
                "; measured under outside load"
                if any(r["others_cpu_share"] > _BUSY_SHARE for r in involved)
                else "; the host's speed varied"
                if sgemm and not host_was_steady(sgemm)
                else ""
            )
            if head.vs_plain is not None
            else "not measured"
        )
        + " |"
    )
    lines.append(
        f"| ctcvr_1p >= {_HEAD_ONLY_TARGET} x head_only | "
        + _verdict(
            head.vs_head_only,
            (head.vs_head_only or 0) >= _HEAD_ONLY_TARGET,
            [r for r in (single, head_only) if r],
            sgemm,
        )
        + (f" ({head.vs_head_only:.2f}x)" if head.vs_head_only is not None else "")
        + " |"
    )
    paired = by_name.get(Variant.CTCVR_1P_HEAD_PAIRED.value)
    lines.append(
        f"| ctcvr_1p >= {_HEAD_ONLY_TARGET} x head_only, taking turns in one process "
        "(ctcvr_1p_head_paired) | "
        + _verdict(
            head.vs_head_only_paired,
            (head.vs_head_only_paired or 0) >= _HEAD_ONLY_TARGET,
            [paired] if paired else [],
            sgemm,
        )
        + (
            f" ({head.vs_head_only_paired:.2f}x, median of {len(paired['paired_ratios'])} "
            f"blocks of {_PAIRED_BLOCK} steps each; {min(paired['paired_ratios']):.2f}x to "
            f"{max(paired['paired_ratios']):.2f}x)"
            if paired and head.vs_head_only_paired is not None
            else ""
        )
        + " |"
    )
    lines.append(
        f"| head_only >= {_SGEMM_SHARE_TARGET} x the sgemm peak | "
        + _verdict(
            head.head_sgemm_share,
            (head.head_sgemm_share or 0) >= _SGEMM_SHARE_TARGET,
            [r for r in (head_only, sgemm) if r],
            sgemm,
        )
        + (f" ({head.head_sgemm_share:.2f})" if head.head_sgemm_share is not None else "")
        + " |"
    )
    lines.append(
        "| ctcvr_2p ahead of ctcvr_1p | "
        + _verdict(
            head.two_vs_one,
            (head.two_vs_one or 0) > 1.0,
            [r for r in (single, double) if r],
            sgemm,
        )
        + (f" ({head.two_vs_one:.2f}x)" if head.two_vs_one is not None else "")
        + (
            f"; without collectives (ctcvr_1p_pair) 2 processes reach {head.pair_vs_one:.2f}x"
            if head.pair_vs_one is not None
            else ""
        )
        + " |"
    )
    busy = [
        r["variant"]
        for r in [*rows, *([sgemm] if sgemm else [])]
        if r["others_cpu_share"] > _BUSY_SHARE
    ]
    if busy:
        lines.append(
            f"\nWarning: other processes took more than {_BUSY_SHARE:.0%} of the CPUs during "
            f"{', '.join(busy)}; those steps were stretched. Rerun on an idle machine "
            "(see --wait-idle)."
        )
    if sgemm and not host_was_steady(sgemm):
        lines.append(
            f"\nWarning: the host's speed varied: the same sgemm ran at {sgemm['min']:.1f} to "
            f"{sgemm['max']:.1f} GFLOP/s (the slowest call below {_STEADY_HOST_SHARE:.0%} of the "
            "median) while other processes were quiet; the variants ran at different speeds of "
            "the machine, so the verdicts are inconclusive. Rerun later."
        )
    return "\n".join(lines) + "\n"


_BF16_PATHS = (Variant.HEAD_ONLY_BF16, Variant.CTCVR_1P_BF16)


def head_path_verdict(path: dict, reference: dict) -> str:
    """Whether a head path pays: ahead of its float32 reference (head_only, or ctcvr_1p) by
    ``_PAYS`` in every round of the run."""
    if max(path["others_cpu_share"], reference["others_cpu_share"]) > _BUSY_SHARE:
        return "inconclusive, measured under outside load"
    if min(_round_ratios(path, reference)) >= _PAYS:
        return f"pays (>= {_PAYS:.2f}x in every round)"
    return f"does not pay (< {_PAYS:.2f}x in some round)"


def _round_ratios(path: dict, reference: dict) -> list[float]:
    return [a / b for a, b in zip(path["round_medians"], reference["round_medians"])]


def head_paths_table(rows: list[dict], sgemm: dict | None, bf16_gemm: dict | None) -> str:
    """The dense head's compute paths against their float32 reference in the same run (head_only,
    or ctcvr_1p for ctcvr_1p_bf16), or "" if none ran beside its reference.

    The GFLOP/s count the same products as head_only's (:func:`matmul_flops_per_row`), so the
    shares of the float32 sgemm peak compare; the bf16 paths' share of the bf16 gemm peak is
    given too when that peak was measured.
    """
    by_name = {r["variant"]: r for r in rows}
    pairs = [
        (by_name[v.value], by_name[_REFERENCE[v].value])
        for v in _HEAD_PATHS
        if v.value in by_name and _REFERENCE[v].value in by_name
    ]
    if not pairs:
        return ""
    columns = (
        "path",
        "against",
        "samples/s median",
        "x against",
        "x against per round",
        "GFLOP/s",
        "of sgemm peak",
        "of bf16 gemm peak",
        "first step (s)",
        "last loss",
        "CPU used by others",
        "verdict",
    )
    lines = [
        "\n## Paths against their reference: the dense head's compute, the sparse optimizer\n",
        "| " + " | ".join(columns) + " |",
        "|---|---" + "|---:" * (len(columns) - 3) + "|---|",
    ]
    shown: set[str] = set()
    for path, reference in pairs:
        for r in (reference, path):
            if r["variant"] in shown:
                continue
            shown.add(r["variant"])
            lines.append("| " + " | ".join(_head_path_cells(r, reference, sgemm, bf16_gemm)) + " |")
    if bf16_gemm:
        lines.append(
            f"\nbf16 gemm peak: {bf16_gemm['median']:.1f} GFLOP/s (median of {bf16_gemm['calls']} "
            f"calls of {bf16_gemm['size']} x {bf16_gemm['size']} x {bf16_gemm['size']} bfloat16, "
            f"{bf16_gemm['min']:.1f} to {bf16_gemm['max']:.1f}; other processes took "
            f"{bf16_gemm['others_cpu_share']:.0%} of the CPUs)."
        )
    lines.append(
        "\nfirst step: the first warmup step (slowest round), compile time included for "
        "head_only_compile; last loss: round 1's last timed step, same data and initial weights "
        "in every path."
    )
    return "\n".join(lines) + "\n"


def _head_path_cells(
    r: dict, reference: dict, sgemm: dict | None, bf16_gemm: dict | None
) -> tuple[str, ...]:
    bf16 = Variant(r["variant"]) in _BF16_PATHS
    return (
        r["variant"],
        "-" if r is reference else reference["variant"],
        f"{r['median']:,.0f}",
        f"{r['median'] / reference['median']:.2f}x",
        ", ".join(f"{x:.2f}x" for x in _round_ratios(r, reference)),
        f"{r['gflops']:.1f}",
        f"{r['gflops'] / sgemm['median']:.2f}" if sgemm else "n/a",
        f"{r['gflops'] / bf16_gemm['median']:.2f}" if bf16 and bf16_gemm else "-",
        f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "n/a",
        f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "n/a",
        f"{r['others_cpu_share']:.0%}",
        "reference" if r is reference else head_path_verdict(r, reference),
    )


def _embedding_rows(settings: Settings) -> int:
    schema = bench_schema(settings.tables, settings.table_scale)
    return sum(table.num_rows for table in schema.all_tables)


def plot(rows: list[dict], path: Path, subtitle: str = "") -> None:
    """Bar chart of median samples/s per variant, min and max as whiskers."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    head_only = next((r for r in rows if r["variant"] == Variant.HEAD_ONLY.value), None)
    names = [
        f"{r['variant']}\n{r['median']:,.0f}/s"
        + (f"\n{r['median'] / head_only['median']:.2f}x head-only" if head_only else "")
        for r in rows
    ]
    colours = ("#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8c8c8c", "#937860", "#8172b3")
    palette = {v: colours[i % len(colours)] for i, v in enumerate(_TRAINING)}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.bar(
        names,
        [r["median"] for r in rows],
        capsize=6,
        color=[palette[Variant(r["variant"])] for r in rows],
        yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]],
    )
    ax.set_ylabel("samples/s (median; whiskers: min, max)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(
        "Training throughput: ctcvr, plain PyTorch and the head-only limit"
        + (f"\n{subtitle}" if subtitle else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _round_order(variants: list[Variant], round_index: int) -> list[Variant]:
    """In order on even rounds, reversed on odd ones: no variant always runs first or last."""
    return variants if round_index % 2 == 0 else variants[::-1]


def run_all(
    settings: Settings, out: Path, command: str = "benchmarks/train_throughput.py"
) -> list[dict]:
    """Run every variant, write the table, the chart and the raw JSON; return the table rows."""
    log.info("settings: %s", json.dumps(asdict(settings)))
    variants = [Variant(v) for v in settings.variants]
    runs: dict[Variant, list[dict]] = {v: [] for v in variants}
    for index in range(settings.rounds):
        for variant in _round_order(variants, index):
            runs[variant].append(_run_variant(variant, settings))
    flops = _flops_per_row(settings)
    rows = [summarize(runs[v], flops) for v in variants if v not in _PEAKS]
    sgemm, bf16_gemm = (
        summarize_sgemm(runs[v], v) if v in runs else None
        for v in (Variant.SGEMM, Variant.BF16_GEMM)
    )
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, sgemm, settings) + head_paths_table(rows, sgemm, bf16_gemm)
    header = f"# Training throughput\n\nCommand: `.venv/bin/python {command}`\n\n"
    (out / "train_throughput.md").write_text(header + table)
    raw = {
        "command": command,
        "settings": asdict(settings),
        "flops_per_row": flops,
        "rows": rows,
        "sgemm": sgemm,
        "bf16_gemm": bf16_gemm,
        "headline": asdict(headline({r["variant"]: r for r in rows}, sgemm)),
        "runs": {v.value: runs[v] for v in variants},
    }
    (out / "train_throughput.json").write_text(json.dumps(raw, indent=1))
    subtitle = (
        f"{_embedding_rows(settings):,} embedding rows, batch {settings.batch_size} per process"
    )
    if rows:
        plot(rows, out / "train_throughput.png", subtitle)
    print(table)
    log.info(
        "wrote %s", ", ".join(str(out / f"train_throughput.{e}") for e in ("md", "png", "json"))
    )
    return rows


def _parse(argv: Sequence[str] | None) -> tuple[Settings, Variant | None, Path]:
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
        "--sgemm-size", type=int, default=defaults.sgemm_size, help="n of the n x n sgemm"
    )
    parser.add_argument(
        "--sgemm-reps", type=int, default=defaults.sgemm_reps, help="timed sgemm calls per round"
    )
    parser.add_argument(
        "--allocator",
        choices=[a.value for a in Allocator],
        default=defaults.allocator,
        help="tuned: every worker tunes glibc's malloc as the trainer does; default: untouched",
    )
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
        help="variants to run, in this order (default: all but the head paths and bf16_gemm)",
    )
    parser.add_argument(
        "--out", type=Path, default=_ROOT / "benchmarks" / "results", help="output folder"
    )
    parser.add_argument("--worker", choices=[v.value for v in Variant], help=argparse.SUPPRESS)
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
        sgemm_size=args.sgemm_size,
        sgemm_reps=args.sgemm_reps,
        allocator=args.allocator,
        rounds=args.rounds,
        wait_idle=args.wait_idle,
        variants=args.variants,
    )
    try:
        settings.check()
    except ValueError as err:
        parser.error(str(err))
    return settings, (Variant(args.worker) if args.worker else None), args.out


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
