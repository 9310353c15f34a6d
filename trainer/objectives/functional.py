"""Loss pieces shared by the objectives: element-wise BCE on probabilities and on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["EPS", "bce", "bce_with_logits", "masked_mean"]

# Probabilities are clamped to [EPS, 1 - EPS] before a log, as in the papers' reference code.
EPS = 1e-7


def bce(prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Element-wise ``-y log p - (1 - y) log(1 - p)`` with ``p`` clamped to ``[EPS, 1 - EPS]``.

    For products of probabilities (pCTCVR = pCTR x pCVR) where no single logit exists.
    """
    p = prob.clamp(EPS, 1.0 - EPS)
    return -(label * torch.log(p) + (1.0 - label) * torch.log1p(-p))


def bce_with_logits(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Element-wise BCE from a logit, numerically stable for large ``|logit|``."""
    return F.binary_cross_entropy_with_logits(logit, label, reduction="none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 (with gradient graph kept) if the mask is empty."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1.0)
