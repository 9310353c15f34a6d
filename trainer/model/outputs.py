"""What the model returns: a logit per task head, plus intermediate features objectives may read."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TaskOutputs"]


@dataclass
class TaskOutputs:
    """Per-head logits of shape ``(B,)`` and named intermediate features.

    ``logits`` always holds ``"ctr"`` and ``"cvr"``, plus one entry per extra head the objective
    asked for (e.g. ``"imputation"``). ``features`` holds e.g. each tower's hidden activations
    under ``"<head>.layers"`` (a list of ``(B, width)``) for objectives that distil them.
    """

    logits: dict[str, torch.Tensor]
    features: dict[str, object] = field(default_factory=dict)

    def prob(self, head: str) -> torch.Tensor:
        if head not in self.logits:
            raise KeyError(f"no head {head!r}; the model has {sorted(self.logits)}")
        return torch.sigmoid(self.logits[head])

    @property
    def pctr(self) -> torch.Tensor:
        return self.prob("ctr")

    @property
    def pcvr(self) -> torch.Tensor:
        return self.prob("cvr")

    @property
    def pctcvr(self) -> torch.Tensor:
        """pCTCVR = pCTR x pCVR (ESMM's decomposition of the post-view conversion)."""
        return self.pctr * self.pcvr

    def detach(self) -> TaskOutputs:
        return TaskOutputs(logits={k: v.detach() for k, v in self.logits.items()})
