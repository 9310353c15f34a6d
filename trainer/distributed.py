"""Everything about ranks, sharding and collectives, kept apart from the model.

The model is built unsharded (its embedding tables on the ``meta`` device); this module starts
the process group, plans how the tables are split between ranks, fuses the sparse optimizer
into the backward pass, and wraps the finished model in ``DistributedModelParallel``. Dense
parameters are replicated and synchronised by DDP, DMP's data-parallel wrapper, when there are
ranks to synchronise them with (:class:`DataParallelAcrossRanks`).

It is also the only module that talks to the process group: the trainer's own collectives (loss
means, the stop signal, evaluation's end-of-data agreement and gathering predictions, barriers
around checkpoints, Adap-SL's mask broadcast) are the named helpers at the end of this file.
(TorchRec's sharded modules and ``torch.distributed.checkpoint`` run their own collectives.)

On GPUs the process group has two backends, ``"cpu:gloo,cuda:nccl"``: nccl carries the
sharded model's CUDA tensors and gloo the CPU tensors of those helpers, which are host values
(a flag, a few loss means, pickled predictions). An nccl-only group would fail on the first of
them. :attr:`DistContext.collective_device` says where the helpers put their tensors. The GPU
path is written for but has not been run here (no GPU on the machines this was built on).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.config import (
    CpuBinding,
    DenseOptimizerConfig,
    ShardingConfig,
    ShardingType,
    SparseOptimizer,
    SparseOptimizerConfig,
)
from trainer.cpu_binding import bind_local_rank

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_from_main_",
    "build_optimizer",
    "dense_adam",
    "dense_lr_at",
    "fuse_sparse_optimizer",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "local_shards",
    "max_over_ranks",
    "process_group_backend",
    "quiet_library_warnings",
    "set_dense_lr",
    "shard_model",
    "shutdown_distributed",
]

_TIMEOUT = timedelta(minutes=10)

# Backends that can run each sharding type (TorchRec on CPU/gloo has no row-wise kernels).
_SUPPORTED = {
    "gloo": {ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.DATA_PARALLEL},
    "nccl": set(ShardingType),
}


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank, the world size, devices and backends.

    Attributes:
        rank: this process's global rank.
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index on GPUs).
        device: where the model and its batches live (``cuda:<local_rank>`` or ``cpu``).
        backend: the backend of ``device``'s collectives, which the sharded model uses
            (``"nccl"`` or ``"gloo"``); it decides which sharding types can run.
        collective_device: where this module's helpers put their tensors: ``cpu`` when the
            group has gloo for CPU tensors (always, for a group :func:`init_distributed`
            creates), else ``device``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    collective_device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 does the printing and the single-writer file output."""
        return self.rank == 0


def quiet_library_warnings() -> None:
    """Silence TorchRec/torch notices that speak to TorchRec's developers, not to our users.

    They concern how TorchRec builds its own objects (topology construction, DDP's deprecated
    ``broadcast_buffers`` argument, fx tracing flags, ShardedTensor) and appear on every start
    of every rank.
    """
    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*`broadcast_buffers` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")
    # TorchRec's sharded state dicts still hold ShardedTensors, which DCP warns about.
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*")


def init_distributed(
    backend: str = "auto", device: str = "auto", cpu_binding: str = CpuBinding.AUTO.value
) -> DistContext:
    """Start (or join) the process group. Without ``torchrun`` it makes a 1-rank group.

    Args:
        backend: the sharded model's backend: ``"auto"`` (nccl when the device is CUDA, else
            gloo), ``"nccl"`` or ``"gloo"``. An nccl group is created as
            ``"cpu:gloo,cuda:nccl"`` (:func:`process_group_backend`).
        device: ``"auto"`` (``cuda:<LOCAL_RANK>`` when CUDA is available, else cpu), or a
            device string.
        cpu_binding: on CPU with several ranks on this machine, ``"auto"`` runs each on its
            own share of the cores (:mod:`trainer.cpu_binding`); ``"none"`` leaves them to the
            kernel.

    Returns:
        This process's :class:`DistContext`.

    Raises:
        RuntimeError: ``backend="nccl"`` without CUDA.
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
        if CpuBinding(cpu_binding) is CpuBinding.AUTO:
            bind_local_rank(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not dist.is_initialized():
        group_backend = process_group_backend(backend)
        if "RANK" in os.environ:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=group_backend,
                store=_attempt_store(rank, world_size),
                rank=rank,
                world_size=world_size,
                timeout=_TIMEOUT,
            )
        else:
            dist.init_process_group(
                backend=group_backend, store=dist.HashStore(), rank=0, world_size=1
            )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch_device,
        backend=backend,
        collective_device=_collective_device(str(dist.get_backend()), torch_device),
    )


def process_group_backend(backend: str) -> str:
    """The ``init_process_group`` backend for a sharded model on ``backend``.

    nccl has no CPU collectives, and the trainer's own (:func:`all_reduce_mean`,
    :func:`any_rank`, ...) work on host values, so an nccl group also gets gloo for CPU
    tensors: ``"cpu:gloo,cuda:nccl"``. Each collective then runs on the backend of its
    tensor's device.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _collective_device(group_backend: str, device: torch.device) -> torch.device:
    """``cpu`` when the group has gloo (for CPU tensors), else the model's device."""
    return torch.device("cpu") if "gloo" in group_backend else device


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


_GPU_ONLY_SPARSE_OPTIMIZERS = frozenset({SparseOptimizer.ADAM})


def fuse_sparse_optimizer(
    model: nn.Module, config: SparseOptimizerConfig, device: torch.device
) -> None:
    """Attach the sparse optimizer to every embedding table, to run inside the backward pass.

    TorchRec's sharded tables then update only the rows a batch touched (FBGEMM fused kernels)
    instead of a dense optimizer stepping every row. Call before :func:`shard_model`.

    Raises:
        ValueError: an optimizer FBGEMM has no kernel for on ``device`` (Adam on the CPU).
    """
    name = SparseOptimizer(config.name)
    if name in _GPU_ONLY_SPARSE_OPTIMIZERS and device.type == "cpu":
        on_cpu = [o.value for o in SparseOptimizer if o not in _GPU_ONLY_SPARSE_OPTIMIZERS]
        raise ValueError(
            f"sparse_optimizer.name {name.value!r} needs GPUs (FBGEMM has no CPU kernel for "
            f"it); on CPU use one of {on_cpu}"
        )
    optimizer_class, kwargs = {
        SparseOptimizer.ROWWISE_ADAGRAD: (RowWiseAdagrad, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.ADAGRAD: (torch.optim.Adagrad, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.ADAM: (torch.optim.Adam, {"lr": config.lr, "eps": config.eps}),
        SparseOptimizer.SGD: (torch.optim.SGD, {"lr": config.lr}),
    }[name]
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
    return DistributedModelParallel(
        model,
        device=ctx.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=DataParallelAcrossRanks(),
    )


class DataParallelAcrossRanks(DefaultDataParallelWrapper):
    """TorchRec's default data-parallel wrapper (DDP over the dense parameters), left out in a
    group of one rank.

    There DDP has no gradients to average: it would copy every dense gradient into its buckets
    and all-reduce them with itself each step (0.25-0.5 ms of a 108 ms step of the training
    benchmark's model on 2 CPU cores, both versions alternating in one process). DMP's state
    dict has the same keys either way, so checkpoints move between world sizes as before.
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        if env.world_size > 1:
            super().wrap(dmp, env, device)


def build_optimizer(
    model: DistributedModelParallel, config: DenseOptimizerConfig
) -> CombinedOptimizer:
    """Adam over the dense parameters, combined with the fused sparse optimizer of the tables.

    One ``step()``/``zero_grad()``/``state_dict()`` then covers both; the sparse part has already
    updated its rows during ``backward()``.
    """
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense_optimizer = KeyedOptimizerWrapper(dense, lambda params: dense_adam(params, config))
    return CombinedOptimizer([("sparse", model.fused_optimizer), ("dense", dense_optimizer)])


def dense_adam(params: Iterable[torch.Tensor], config: DenseOptimizerConfig) -> torch.optim.Adam:
    """The dense parameters' Adam, with ``config``'s learning rate and weight decay.

    Fused (one kernel per parameter for the whole update, on CPU as on GPU) rather than
    PyTorch's default on CPU, a loop of about ten small operations per parameter: the same
    update to float32 rounding, in a fraction of the time. Its state has the default's keys, so
    checkpoints of either load into the other.
    """
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


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


# Collectives -------------------------------------------------------------------------------------
# Every helper is called by every rank at the same point (a collective); with one rank they do
# no communication. Their tensors go to ``ctx.collective_device``; moving a CUDA value there is
# a host synchronisation, which is why the loop calls them only every ``train.log_every`` steps.


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise mean of ``values`` over ranks, on ``ctx.collective_device``.

    Example::

        means = all_reduce_mean(torch.stack([loss_sum, *term_sums]) / steps, ctx).tolist()
    """
    values = values.detach().to(ctx.collective_device, copy=True)
    if ctx.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def max_over_ranks(value: int, ctx: DistContext) -> int:
    """The largest ``value`` of any rank."""
    if ctx.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=ctx.collective_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` is true on at least one rank."""
    return bool(max_over_ranks(int(flag), ctx))


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if ctx.world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    # Object collectives pickle into a tensor on the group's object device: cpu with gloo.
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here."""
    if ctx.world_size > 1:
        dist.barrier()


def broadcast_from_main_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's, in place, each on its own device (a
    multi-backend group carries CUDA tensors on nccl, CPU tensors on gloo). Without a process
    group, or with one rank, nothing happens."""
    if is_distributed() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def is_distributed() -> bool:
    """Whether a process group is up (tools that read checkpoints run without one)."""
    return dist.is_available() and dist.is_initialized()


def shutdown_distributed() -> None:
    """Leave the process group, if one is up. No barrier: after a failure on one rank the others
    may never reach it."""
    if is_distributed():
        dist.destroy_process_group()
