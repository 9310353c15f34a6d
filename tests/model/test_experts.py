"""trainer.model.experts: all experts in one product per layer, equal to separate expert MLPs."""

from __future__ import annotations

import pytest
import torch

from trainer.model.experts import INPUT_ALIGN, Experts
from trainer.model.mlp import MLP


def _separate_mlps(seed: int, in_features: int, num_experts: int, sizes) -> list[MLP]:
    """What the MMoE held before its experts were batched: one MLP per expert, built in a row."""
    torch.manual_seed(seed)
    return [MLP(in_features, sizes) for _ in range(num_experts)]


@pytest.mark.parametrize(
    "in_features, sizes",
    [
        (11, (16,)),  # padded to a multiple of INPUT_ALIGN in the first product
        (INPUT_ALIGN * 2, (16,)),  # already aligned
        (13, (6, 5)),  # deeper layers: one batched product over the experts
        (9, (4, 7, 3)),
    ],
)
def test_experts_draw_the_initial_weights_and_compute_the_outputs_of_separate_mlps(
    in_features, sizes
):
    mlps = _separate_mlps(3, in_features, 4, sizes)
    torch.manual_seed(3)
    experts = Experts(in_features, num_experts=4, layer_sizes=sizes)
    for e, mlp in enumerate(mlps):
        for index, linear in enumerate(mlp.linears):
            assert torch.equal(experts.layers[index].weight[e], linear.weight)
            assert torch.equal(experts.layers[index].bias[e], linear.bias)

    x = torch.randn(7, in_features, requires_grad=True)
    out = experts(x)
    assert out.shape == (7, 4, sizes[-1]) and experts.out_features == sizes[-1]
    x_ref = x.detach().clone().requires_grad_()
    expected = torch.stack([mlp(x_ref) for mlp in mlps], dim=1)
    torch.testing.assert_close(out, expected)

    # Gradients too: the zero columns of the padding neither add to nor take from them.
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for e, mlp in enumerate(mlps):
        for index, linear in enumerate(mlp.linears):
            torch.testing.assert_close(experts.layers[index].weight.grad[e], linear.weight.grad)
            torch.testing.assert_close(experts.layers[index].bias.grad[e], linear.bias.grad)


def test_serving_tensors_are_each_experts_layers_as_views():
    torch.manual_seed(0)
    experts = Experts(10, num_experts=3, layer_sizes=(8, 4))
    tensors = experts.serving_tensors()
    assert set(tensors) == {
        f"mmoe.experts.{e}.layers.{layer}.{part}"
        for e in range(3)
        for layer in range(2)
        for part in ("weight", "bias")
    }
    assert tensors["mmoe.experts.2.layers.1.weight"].shape == (4, 8)
    assert tensors["mmoe.experts.0.layers.0.bias"].shape == (8,)
    assert torch.equal(tensors["mmoe.experts.1.layers.0.weight"], experts.layers[0].weight[1])
    # Views: writing one writes the stacked parameter (how a warm start loads an export).
    with torch.no_grad():
        tensors["mmoe.experts.1.layers.0.weight"].fill_(0.5)
    assert (experts.layers[0].weight[1] == 0.5).all()
    assert (experts.layers[0].weight[0] != 0.5).any()
    assert not any(t.requires_grad for t in tensors.values())


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    experts = Experts(6, num_experts=2, layer_sizes=(64,), dropout=0.5)
    x = torch.randn(32, 6)
    experts.eval()
    kept = experts(x)
    experts.train()
    dropped = experts(x)
    zeroed = (dropped == 0) & (kept != 0)
    assert zeroed.any()
    torch.testing.assert_close(dropped[~zeroed & (kept != 0)], 2 * kept[~zeroed & (kept != 0)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 0, "layer_sizes": (2,)}, "num_experts must be >= 1, got 0"),
        ({"num_experts": 2, "layer_sizes": ()}, "at least one layer size"),
        ({"num_experts": 2, "layer_sizes": (2,), "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Experts(4, **kwargs)
