"""A tower conditioned on the click propensity: EVI's entire-space CVR teacher (evi.txt Figure 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.model.mlp import MLP

__all__ = ["PropensityConditionedTower"]


class PropensityConditionedTower(nn.Module):
    """MLP layers (the representation learner), then a logit from the click-conditioned
    representation ``vec(h ⊗ pi(o_hat))`` (evi.txt Section 4.2, Figure 1).

    ``h`` is the last hidden layer ``(B, D)`` (the input itself without hidden layers),
    ``pi(o_hat) = W o_hat + b`` a linear projection of the click propensity to ``P`` dims, and the
    predictor a linear layer over the ``D * P`` entries of their outer product, so the teacher
    models ``P(r = 1 | x, o_hat)``. The paper takes the outer product with the representation
    learner's output, as here; the authors' code takes it with the raw embeddings instead.

    Args:
        in_features: input width ``H``.
        layer_sizes: hidden sizes of the representation learner (may be empty).
        propensity_dim: width ``P`` of the propensity projection.
        dropout: dropout inside the hidden layers.

    Example::

        tower = PropensityConditionedTower(16, (8, 4), propensity_dim=5)
        logit, layers = tower(torch.randn(3, 16), torch.rand(3))
        logit.shape, [a.shape[1] for a in layers]  # (torch.Size([3]), [8, 4])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        propensity_dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden = MLP(in_features, layer_sizes, dropout) if layer_sizes else None
        width = self.hidden.out_features if self.hidden is not None else in_features
        self.projection = nn.Linear(1, propensity_dim)
        self.head = nn.Linear(width * propensity_dim, 1)

    def forward(
        self, x: torch.Tensor, propensity: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: x ``(B, H)``; propensity ``(B,)``, the click propensity to condition on.

        Returns:
            The logit ``(B,)`` and each hidden layer's activations.
        """
        activations = self.hidden.activations(x) if self.hidden is not None else []
        last = activations[-1] if activations else x
        projected = self.projection(propensity.unsqueeze(-1))  # (B, P)
        conditioned = (last.unsqueeze(-1) * projected.unsqueeze(1)).flatten(1)  # (B, D * P)
        return self.head(conditioned).squeeze(-1), activations
