"""Everything about ranks and sharding, kept apart from the model.

The model is built unsharded (its embedding tables on the ``meta`` device); this module starts
the process group, plans how the tables are split between ranks, fuses the sparse optimizer
into the backward pass, and wraps the finished model in ``DistributedModelParallel``. Dense
parameters are replicated and synchronised by DMP's data-parallel wrapper.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.config import (
    DenseOptimizerConfig,
    ShardingConfig,
    ShardingType,
    SparseOptimizer,
    SparseOptimizerConfig,
)

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "build_optimizer",
    "dense_lr_at",
    "fuse_sparse_optimizer",
    "init_distributed",
    "local_shards",
    "quiet_library_warnings",
    "set_dense_lr",
    "shard_model",
]

_TIMEOUT = timedelta(minutes=10)

# Backends that can run each sharding type (TorchRec on CPU/gloo has no row-wise kernels).
_SUPPORTED = {
    "gloo": {ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.DATA_PARALLEL},
    "nccl": set(ShardingType),
}


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank, the world size, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 does the printing and the single-writer file output."""
        return self.rank == 0


def quiet_library_warnings() -> None:
    """Silence TorchRec/torch notices that speak to TorchRec's developers, not to our users.

    They concern how TorchRec builds its own objects (topology construction, DDP's deprecated
    ``broadcast_buffers`` argument, fx tracing flags) and appear on every start of every rank.
    """
    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*`broadcast_buffers` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")


def init_distributed(backend: str = "auto", device: str = "auto") -> DistContext:
    """Start (or join) the process group. Without ``torchrun`` it makes a 1-rank group.

    ``backend="auto"`` picks nccl when CUDA is available and gloo otherwise; ``device="auto"``
    picks ``cuda:<LOCAL_RANK>`` or cpu accordingly.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("sharding.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch_device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=backend,
                store=_attempt_store(rank, world_size),
                rank=rank,
                world_size=world_size,
                timeout=_TIMEOUT,
            )
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, backend)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store, with keys scoped to this torchrun restart attempt.

    torchrun keeps one store across ``--max-restarts`` attempts, and the process group writes
    its peers' addresses under the same keys every time: a fast rank of a restarted group can
    read the address of a peer that died in the previous attempt and fail to connect. A prefix
    per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps each attempt's keys apart.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=_TIMEOUT,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ctcvr/attempt_{attempt}", store)


def fuse_sparse_optimizer(model: nn.Module, config: SparseOptimizerConfig) -> None:
    """Attach the sparse optimizer to every embedding table, to run inside the backward pass.

    TorchRec's sharded tables then update only the rows a batch touched (FBGEMM fused kernels)
    instead of a dense optimizer stepping every row. Call before :func:`shard_model`.
    """
    optimizer_class, kwargs = {
        SparseOptimizer.ROWWISE_ADAGRAD: (RowWiseAdagrad, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.ADAGRAD: (torch.optim.Adagrad, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.ADAM: (torch.optim.Adam, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.SGD: (torch.optim.SGD, {"lr": config.lr}),
    }[SparseOptimizer(config.name)]
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(optimizer_class, module.parameters(), kwargs)


def shard_model(
    model: nn.Module, ctx: DistContext, config: ShardingConfig
) -> DistributedModelParallel:
    """Plan the sharding of every embedding table and wrap ``model`` in DMP.

    Raises:
        ValueError: a sharding type the backend cannot run (e.g. row-wise on gloo).
    """
    allowed = [ShardingType(t) for t in config.types]
    unsupported = [t.value for t in allowed if t not in _SUPPORTED[ctx.backend]]
    if unsupported:
        raise ValueError(
            f"sharding.types {unsupported} cannot run on the {ctx.backend} backend; "
            f"use {sorted(t.value for t in _SUPPORTED[ctx.backend])} on CPU, or train on GPUs (nccl)"
        )
    constraints = {
        table.name: ParameterConstraints(sharding_types=[t.value for t in allowed])
        for module in model.modules()
        if isinstance(module, EmbeddingBagCollection)
        for table in module.embedding_bag_configs()
    }
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    topology = Topology(
        world_size=ctx.world_size, local_world_size=local_world_size, compute_device=ctx.device.type
    )
    # A fixed reserve for dense parameters and activations; the default heuristic estimates them
    # from meta tensors and warns that it over-estimates.
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )
    sharders = get_default_sharders()
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders)


def build_optimizer(
    model: DistributedModelParallel, config: DenseOptimizerConfig
) -> CombinedOptimizer:
    """Adam over the dense parameters, combined with the fused sparse optimizer of the tables.

    One ``step()``/``zero_grad()``/``state_dict()`` then covers both; the sparse part has already
    updated its rows during ``backward()``.
    """
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense_optimizer = KeyedOptimizerWrapper(
        dense,
        lambda params: torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay),
    )
    return CombinedOptimizer([("sparse", model.fused_optimizer), ("dense", dense_optimizer)])


def dense_lr_at(config: DenseOptimizerConfig, step: int, steps: int) -> float:
    """The dense learning rate for the step after ``step`` of ``steps``: ``lr`` decayed linearly
    to ``lr * final_lr_scale`` at the last step."""
    progress = min(step / max(steps - 1, 1), 1.0)
    return config.lr * (1.0 - (1.0 - config.final_lr_scale) * progress)


def set_dense_lr(optimizer: CombinedOptimizer, lr: float) -> None:
    """Set the learning rate of the dense part of ``build_optimizer``'s optimizer (the fused
    sparse optimizer keeps its own)."""
    for name, part in optimizer.optimizers:
        if name == "dense":
            for group in part.param_groups:
                group["lr"] = lr


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a no-op copy with one rank)."""
    value = value.detach().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def local_shards(model: nn.Module) -> dict[str, list[dict[str, list[int]]]]:
    """The embedding shards this rank holds: table weight name -> [{offsets, sizes}, ...].

    Read from the sharded state dict, so it shows what the rank really stores; a table held by
    other ranks only maps to an empty list.
    """
    summary: dict[str, list[dict[str, list[int]]]] = {}
    for name, value in model.state_dict().items():
        if hasattr(value, "local_shards") and "embedding_bags" in name:
            summary[name] = [
                {"offsets": list(s.metadata.shard_offsets), "sizes": list(s.metadata.shard_sizes)}
                for s in value.local_shards()
            ]
    return summary
