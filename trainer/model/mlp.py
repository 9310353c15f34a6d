"""A stack of Linear -> ReLU (-> Dropout) layers, the building block of experts and towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected layers with ReLU after each, and optional dropout.

    Args:
        in_features: input width ``D``.
        layer_sizes: output width of each layer, e.g. ``(256, 128)``.
        dropout: dropout probability after each activation (0 disables it).

    Example::

        mlp = MLP(32, (64, 16))
        mlp(torch.randn(8, 32)).shape  # torch.Size([8, 16])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("MLP needs at least one layer size")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks: list[nn.Module] = []
        width = in_features
        for size in layer_sizes:
            block = [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*block))
            width = size
        self.layers = nn.Sequential(*blocks)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, D)``. Returns ``(B, layer_sizes[-1])``."""
        return self.layers(x)

    @property
    def linears(self) -> list[nn.Linear]:
        """The linear layer of every block, first to last."""
        return [block[0] for block in self.layers]

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every layer, for objectives that read intermediate features."""
        outputs = []
        for block in self.layers:
            x = block(x)
            outputs.append(x)
        return outputs
