"""DDPO's causal transfer modules (Su et al., SIGIR 2024; ddpo.txt Section 3.4, Eq. 12-14).

Each module fuses one source task's feature (the click or the conversion propensity network's)
with the CVR feature by attention over the two of them; a linear layer fuses the modules'
outputs into the feature the CVR tower reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from schemas.artifact import TRANSFER_FUSE, TRANSFER_PROJECTIONS, transfer_projection
from trainer.model.exported import linear_tensors

__all__ = ["CausalTransfer", "CausalTransferFusion"]


class CausalTransfer(nn.Module):
    """One causal transfer module ``T(f^src, f^r)`` (ddpo.txt Eq. 12-13).

    The two features are stacked as two tokens ``s_1 = f^src``, ``s_2 = f^r``. Each token gets
    one score, its own query against its own key, ``w_t = <theta_q(s_t), theta_k(s_t)> / sqrt(d)``
    (Eq. 13); the softmax runs over the two tokens and weighs their values (Eq. 12):
    ``f^out = sum_t softmax(w)_t theta_v(s_t)``. ``theta_q``, ``theta_k`` and ``theta_v`` are
    ``d -> d`` linear layers shared by the tokens.

    Eq. 12's softmax is over the tokens: ``w_f`` is one scalar per token, so a softmax over the
    feature dimension would have nothing to normalise (the authors' code does the same).

    Args:
        width: the feature width ``d`` of both inputs and of the output.

    Example::

        transfer = CausalTransfer(8)
        transfer(torch.randn(4, 8), torch.randn(4, 8)).shape  # torch.Size([4, 8])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, source: torch.Tensor, cvr: torch.Tensor) -> torch.Tensor:
        """Args: source and cvr ``(B, d)``. Returns the fused feature ``(B, d)``."""
        tokens = torch.stack([source, cvr], dim=1)  # (B, 2, d)
        scores = (self.query(tokens) * self.key(tokens)).sum(dim=-1) * self.scale  # (B, 2)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * self.value(tokens)).sum(dim=1)


class CausalTransferFusion(nn.Module):
    """The CVR tower's input: ``theta_t([T_s(f^s, f^r) for s in sources])`` (ddpo.txt Eq. 14).

    With ``sources = ("ctr", "conversion_propensity")`` these are ``T_o`` and ``T_c``; ``theta_t``
    is one linear layer (``len(sources) * d -> d``), without an activation (the paper's "fully
    connected layer"; the authors' code adds a ReLU, and a Linear+ReLU on each source before its
    module, which Eq. 14 does not have).

    Args:
        width: the feature width ``d`` (the MMoE's output width).
        sources: the heads whose features are fused with the CVR feature, in order.

    Example::

        fusion = CausalTransferFusion(8, ("ctr", "conversion_propensity"))
        features = {h: torch.randn(4, 8) for h in ("ctr", "cvr", "conversion_propensity")}
        fusion(features).shape  # torch.Size([4, 8])
    """

    def __init__(self, width: int, sources: Sequence[str]) -> None:
        super().__init__()
        if not sources:
            raise ValueError("CausalTransferFusion needs at least one source head")
        self.transfers = nn.ModuleDict({source: CausalTransfer(width) for source in sources})
        self.fuse = nn.Linear(len(sources) * width, width)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.transfers.keys())

    def serving_tensors(self) -> dict[str, torch.Tensor]:
        """Every transfer module's projections (``cvr_transfer.{source}.{query,key,value}``) and
        the fusion (``cvr_transfer.fuse``), under their artifact names."""
        tensors: dict[str, torch.Tensor] = {}
        for source, transfer in self.transfers.items():
            for projection in TRANSFER_PROJECTIONS:
                name = transfer_projection(source, projection)
                tensors |= linear_tensors(name, getattr(transfer, projection))
        return tensors | linear_tensors(TRANSFER_FUSE, self.fuse)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Args: features ``(B, d)`` by head, with ``"cvr"`` and every source.

        Returns:
            The fused CVR feature ``(B, d)``.
        """
        cvr = features["cvr"]
        fused = [transfer(features[source], cvr) for source, transfer in self.transfers.items()]
        return self.fuse(torch.cat(fused, dim=1))
