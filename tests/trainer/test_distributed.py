"""The process group and the collective helpers, with CUDA and the group faked.

The GPU path cannot run on these machines: these tests check what ``init_distributed`` asks of
torch on a CUDA machine, and where the helpers put their tensors, not that nccl works.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trainer import distributed
from trainer.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    barrier,
    gather_objects,
    init_distributed,
    max_over_ranks,
    process_group_backend,
)


class FakeGroup:
    """Records what ``trainer.distributed`` asks of ``torch.distributed``."""

    def __init__(self, monkeypatch, *, cuda: bool, world_size: int = 2) -> None:
        self.calls: list[tuple[str, object]] = []
        self.backend: str | None = None
        self.world_size = world_size
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(
            torch.cuda, "set_device", lambda device: self.calls.append(("set_device", device))
        )
        monkeypatch.setattr(dist, "is_initialized", lambda: self.backend is not None)
        monkeypatch.setattr(dist, "init_process_group", self._init)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world_size)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: self.backend)
        monkeypatch.setattr(distributed, "_attempt_store", lambda rank, world_size: "store")
        for name in ("all_reduce", "gather_object", "barrier", "broadcast"):
            monkeypatch.setattr(dist, name, self._recorder(name))
        for key, value in {
            "RANK": "1",
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "localhost",
            "MASTER_PORT": "1",
        }.items():
            monkeypatch.setenv(key, value)

    def _init(self, backend: str, **kwargs: object) -> None:
        self.backend = backend
        self.calls.append(("init_process_group", backend))

    def _recorder(self, name: str):
        def record(*args: object, **kwargs: object) -> None:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.calls.append((name, tensor.device if tensor is not None else None))

        return record


def test_on_cuda_the_group_has_gloo_for_cpu_tensors_and_nccl_for_cuda_ones(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=True)
    ctx = init_distributed()
    assert ("init_process_group", "cpu:gloo,cuda:nccl") in group.calls
    assert ("set_device", torch.device("cuda:1")) in group.calls
    assert ctx.device == torch.device("cuda:1") and ctx.backend == "nccl"
    assert ctx.collective_device == torch.device("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 1)


def test_nccl_asked_for_by_name_gets_gloo_too(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=True)
    ctx = init_distributed("nccl", "auto")
    assert group.backend == "cpu:gloo,cuda:nccl" and ctx.backend == "nccl"


def test_on_cpu_the_group_is_gloo(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=False)
    ctx = init_distributed()
    assert group.backend == "gloo" and not any(c[0] == "set_device" for c in group.calls)
    assert ctx.device == ctx.collective_device == torch.device("cpu") and ctx.backend == "gloo"


def test_nccl_without_cuda_fails_naming_the_fix(monkeypatch):
    FakeGroup(monkeypatch, cuda=False)
    with pytest.raises(RuntimeError, match="nccl needs CUDA; use gloo"):
        init_distributed("nccl", "auto")


def test_a_group_started_elsewhere_decides_the_collective_device(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=True)
    group.backend = "nccl"  # already initialised, without gloo: collectives go to the GPU
    ctx = init_distributed()
    assert ctx.collective_device == torch.device("cuda:1")
    assert not any(c[0] == "init_process_group" for c in group.calls)


def test_process_group_backend():
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo") == "gloo"


def test_helpers_put_their_tensors_on_the_collective_device(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=True)
    ctx = init_distributed()  # device cuda:1, collectives on cpu
    means = all_reduce_mean(torch.tensor([2.0, 4.0]), ctx)
    assert means.device == ctx.collective_device
    torch.testing.assert_close(means, torch.tensor([1.0, 2.0]))  # the fake sums nothing: / 2
    max_over_ranks(3, ctx)
    any_rank(True, ctx)
    gather_objects({"rank": 1}, ctx)
    barrier(ctx)
    assert [c for c in group.calls if c[0] not in ("init_process_group", "set_device")] == [
        ("all_reduce", torch.device("cpu")),
        ("all_reduce", torch.device("cpu")),
        ("all_reduce", torch.device("cpu")),
        ("gather_object", None),
        ("barrier", None),
    ]


def test_with_one_rank_the_helpers_do_not_communicate(monkeypatch):
    group = FakeGroup(monkeypatch, cuda=False, world_size=1)
    ctx = init_distributed()
    assert all_reduce_mean(torch.tensor([3.0]), ctx).tolist() == [3.0]
    assert max_over_ranks(5, ctx) == 5 and any_rank(False, ctx) is False
    assert gather_objects("x", ctx) == ["x"]
    barrier(ctx)
    assert [c[0] for c in group.calls] == ["init_process_group"]


@pytest.fixture
def one_rank_group():
    """A real 1-rank gloo group as this process's default group, taken down after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
def test_dense_parameters_are_wrapped_in_ddp_only_when_there_are_ranks_to_sync_with(
    world_size, one_rank_group
):
    # The sharding environment's world size is what the wrapper decides on; DDP then really
    # wraps over the 1-rank group (TorchRec's ShardingEnv would build a device mesh of that
    # size: the two fields the wrapper reads stand in). The real DMP of 1 and 2 ranks runs in
    # the recipe tests, whose checkpoints move between the two.
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    from trainer.distributed import DataParallelAcrossRanks

    dmp = torch.nn.Module()  # what the wrapper reads of a DMP: the module it wraps
    dmp._dmp_wrapped_module = dense = torch.nn.Linear(3, 1)
    env = SimpleNamespace(world_size=world_size, process_group=one_rank_group)
    DataParallelAcrossRanks().wrap(dmp, env, torch.device("cpu"))
    if world_size == 1:
        assert dmp._dmp_wrapped_module is dense
    else:
        assert isinstance(dmp._dmp_wrapped_module, DistributedDataParallel)
        assert dmp._dmp_wrapped_module.module is dense


def test_main_rank_is_rank_zero():
    cpu = torch.device("cpu")
    assert DistContext(0, 2, 0, cpu, "gloo", cpu).is_main
    assert not DistContext(1, 2, 1, cpu, "gloo", cpu).is_main


def test_the_dense_adam_is_fused_and_steps_as_the_default_adam_does():
    from trainer.config import DenseOptimizerConfig
    from trainer.distributed import dense_adam

    torch.manual_seed(0)
    shapes = [(6, 5), (6,), (1, 6)]
    fused_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    config = DenseOptimizerConfig(lr=0.01, weight_decay=0.001)
    fused = dense_adam(fused_params, config)
    plain = torch.optim.Adam(plain_params, lr=0.01, weight_decay=0.001)
    assert fused.defaults["fused"] is True
    for _ in range(20):
        grads = [torch.randn(s) for s in shapes]
        for params, optimizer in ((fused_params, fused), (plain_params, plain)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b)  # the same update, to float32 rounding
    # The same state keys: a checkpoint of either optimizer loads into the other.
    plain.load_state_dict(fused.state_dict())
    assert set(plain.state[plain_params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_sparse_optimizer_without_a_cpu_kernel_is_refused_on_cpu_naming_the_key():
    from torchrec import EmbeddingBagCollection

    from tests.helpers import tiny_schema
    from trainer.config import SparseOptimizerConfig
    from trainer.distributed import fuse_sparse_optimizer
    from trainer.model import embedding_bag_configs

    def tables() -> EmbeddingBagCollection:
        return EmbeddingBagCollection(embedding_bag_configs(tiny_schema()), device="meta")

    adam = SparseOptimizerConfig(name="adam")
    with pytest.raises(ValueError, match="sparse_optimizer.name 'adam' needs GPUs.*'adagrad'"):
        fuse_sparse_optimizer(tables(), adam, torch.device("cpu"))
    on_gpu = tables()
    fuse_sparse_optimizer(on_gpu, adam, torch.device("cuda"))  # attached, for FBGEMM's GPU kernel
    assert all(hasattr(p, "_in_backward_optimizers") for p in on_gpu.parameters())
    on_cpu = tables()
    fuse_sparse_optimizer(on_cpu, SparseOptimizerConfig(name="adagrad"), torch.device("cpu"))
    assert all(hasattr(p, "_in_backward_optimizers") for p in on_cpu.parameters())
