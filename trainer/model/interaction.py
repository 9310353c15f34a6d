"""Explicit feature interactions: the pairwise dot products of the pooled sparse embeddings."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DotInteraction"]


class DotInteraction(nn.Module):
    """``<e_i, e_j>`` for every pair ``i < j`` of the ``F`` sparse features' embeddings.

    The second-order term of factorization machines (Rendle, ICDM 2010) and DLRM's interaction
    (Naumov et al., 2019), here without the dense features. An MLP over the concatenated
    embeddings learns a user x item dot product only slowly; handing the MMoE every pairwise
    product lets it read preferences such as ``<user, item>`` or ``<gender, category>`` directly.

    Args:
        num_features: ``F``, the number of pooled sparse features.
        dim: their common embedding dimension ``D``.

    Example::

        interaction = DotInteraction(num_features=20, dim=16)
        interaction(pooled).shape  # pooled (B, 20 * 16) -> (B, 190)
    """

    def __init__(self, num_features: int, dim: int) -> None:
        super().__init__()
        if num_features < 2:
            raise ValueError(
                f"a dot interaction needs at least 2 sparse features, got {num_features}"
            )
        self.num_features = num_features
        self.dim = dim
        rows, cols = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("_pairs", rows * num_features + cols, persistent=False)

    @property
    def out_features(self) -> int:
        return self.num_features * (self.num_features - 1) // 2

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Args: pooled ``(B, F * D)``, feature by feature. Returns ``(B, F (F - 1) / 2)``, pairs
        in row-major upper-triangle order: (0, 1), (0, 2), ..., (F - 2, F - 1)."""
        embeddings = pooled.view(-1, self.num_features, self.dim)
        gram = torch.bmm(embeddings, embeddings.transpose(1, 2))  # (B, F, F)
        return gram.flatten(1).index_select(1, self._pairs)
