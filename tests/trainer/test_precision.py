"""train.precision=bf16: the training forward under autocast to bfloat16, everything else float32."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec import EmbeddingBagCollection

from tests.helpers import tiny_batch, tiny_schema
from trainer.model import CtcvrModel, SparseArch, embedding_bag_configs
from trainer.objectives import build_objective
from trainer.train_module import TrainModule

# bfloat16's unit roundoff: 8 significant bits, so rounding a float32 to it moves it by at most
# 2**-8 of its value.
BF16_ROUNDOFF = 2.0**-8
STEPS, LR = 5, 1e-3


def _module(autocast_dtype: torch.dtype | None) -> TrainModule:
    torch.manual_seed(0)  # the same initial weights for every precision
    schema = tiny_schema()
    model = CtcvrModel(
        SparseArch(EmbeddingBagCollection(tables=embedding_bag_configs(schema))),
        num_dense=1,
        heads=("ctr", "cvr"),
        num_experts=4,
        expert_sizes=(64,),
        tower_sizes=(32,),
    )
    return TrainModule(model, build_objective("esmm"), autocast_dtype=autocast_dtype)


def _batch(rows: int = 512):
    generator = torch.Generator().manual_seed(1)
    click = torch.rand(rows, generator=generator) < 0.3
    conversion = click & (torch.rand(rows, generator=generator) < 0.3)
    batch = tiny_batch(click.float().tolist(), conversion.float().tolist())
    return dataclasses.replace(batch, dense=torch.randn(rows, 1, generator=generator))


def _train(module: TrainModule, batch) -> list[float]:
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_trains_float32_weights_to_losses_within_bf16_rounding_of_float32():
    batch = _batch()
    reference, bf16 = _module(None), _module(torch.bfloat16)
    expected, losses = _train(reference, batch), _train(bf16, batch)
    # Every product reads inputs rounded to bfloat16, each off by at most BF16_ROUNDOFF, so a
    # product term is off by at most 2 * BF16_ROUNDOFF (float32 accumulation adds ~nothing);
    # the cross-entropy moves by at most as much as a logit (its slope is below 1). STEPS Adam
    # steps of LR move each weight by at most STEPS * LR = 0.5 % in either run, so the
    # trajectories cannot drift apart by more than the loss itself moves.
    assert losses == pytest.approx(expected, rel=2 * BF16_ROUNDOFF)
    assert losses != expected  # the products did run in bfloat16
    assert losses[-1] < losses[0] and expected[-1] < expected[0]
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32
        for p in bf16.parameters()
        if p.grad is not None
    )


def test_evaluation_stays_float32():
    module = _module(torch.bfloat16).eval()
    _, (_, outputs) = module(_batch(rows=8))
    assert all(logit.dtype == torch.float32 for logit in outputs.logits.values())
