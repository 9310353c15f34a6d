"""The dense learning-rate schedule: linear decay from lr to lr * final_lr_scale, by step."""

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from trainer.config import ConfigError, DenseOptimizerConfig, load_config
from trainer.distributed import dense_lr_at, set_dense_lr


def test_lr_decays_linearly_to_the_final_scale():
    config = DenseOptimizerConfig(lr=0.01, final_lr_scale=0.1)
    lrs = [dense_lr_at(config, step, 5) for step in range(5)]
    assert lrs == pytest.approx([0.01, 0.00775, 0.0055, 0.00325, 0.001])
    constant = DenseOptimizerConfig(lr=0.01)
    assert {dense_lr_at(constant, step, 5) for step in range(5)} == {0.01}
    assert dense_lr_at(config, 0, 1) == pytest.approx(0.01)  # a one-step run takes the base lr


def test_set_dense_lr_leaves_the_sparse_optimizer_alone():
    dense, sparse = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = CombinedOptimizer(
        [
            ("sparse", KeyedOptimizerWrapper({"s": sparse}, lambda p: torch.optim.SGD(p, lr=0.5))),
            ("dense", KeyedOptimizerWrapper({"d": dense}, lambda p: torch.optim.Adam(p, lr=0.01))),
        ]
    )
    set_dense_lr(optimizer, 0.002)
    lrs = {name: [g["lr"] for g in part.param_groups] for name, part in optimizer.optimizers}
    assert lrs == {"sparse": [0.5], "dense": [0.002]}
    dense.grad, sparse.grad = torch.ones(2), torch.ones(3)
    optimizer.step()  # Adam's first step moves each weight by exactly lr
    assert dense.detach().tolist() == pytest.approx([-0.002, -0.002])
    assert sparse.detach().tolist() == pytest.approx([-0.5] * 3)


def test_negative_final_lr_scale_is_rejected():
    with pytest.raises(ConfigError, match="dense_optimizer.final_lr_scale must be >= 0"):
        load_config(
            None, ["output_dir=/tmp/x", "data.train=/tmp/y", "dense_optimizer.final_lr_scale=-1"]
        )
