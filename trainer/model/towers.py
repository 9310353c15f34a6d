"""Task towers: an MLP over a task's MMoE mixture, ending in one logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from schemas.artifact import tower_layer, tower_logit
from trainer.model.exported import linear_tensors
from trainer.model.mlp import MLP

__all__ = ["Tower"]


class Tower(nn.Module):
    """MLP layers then a linear head to one logit.

    Args:
        in_features: input width ``H``.
        layer_sizes: hidden sizes (may be empty: a linear head only).
        dropout: dropout inside the hidden layers.
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = MLP(in_features, layer_sizes, dropout) if layer_sizes else None
        width = self.hidden.out_features if self.hidden is not None else in_features
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: x ``(B, H)``. Returns the logit ``(B,)`` and each hidden layer's activations."""
        activations = self.hidden.activations(x) if self.hidden is not None else []
        last = activations[-1] if activations else x
        return self.head(last).squeeze(-1), activations

    def serving_tensors(self, head: str) -> dict[str, torch.Tensor]:
        """The tower as ``head``'s in the artifact: ``towers.{head}.layers.{l}`` and
        ``towers.{head}.head`` (``schemas.artifact.tower_layer`` / ``tower_logit``)."""
        linears = self.hidden.linears if self.hidden is not None else []
        tensors: dict[str, torch.Tensor] = {}
        for layer, linear in enumerate(linears):
            tensors |= linear_tensors(tower_layer(head, layer), linear)
        return tensors | linear_tensors(tower_logit(head), self.head)
