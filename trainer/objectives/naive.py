"""The naive baseline: CTR over all impressions, CVR on clicked impressions only.

This is the click-space CVR estimator whose selection bias the other objectives correct: the
CVR tower is fit on ``O`` (clicked rows) but used on the whole impression space ``D``. With the
notation of ``multi-ipw-multi-dr.txt`` (Zhang et al., WWW 2020) it is the naive estimator of
Eq. (3): ``E_naive = (1/|O|) sum_{(u,i) in O} e(r, r_hat)``, with ``e`` the cross entropy.
"""

from __future__ import annotations

from typing import ClassVar

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs
from trainer.objectives.base import LossOutput
from trainer.objectives.functional import bce_with_logits, masked_mean

__all__ = ["NaiveObjective"]


class NaiveObjective:
    """``L = mean_D BCE(pCTR, o) + cvr_weight * mean_O BCE(pCVR, r)``.

    Args:
        cvr_weight: weight of the CVR term.
    """

    required_heads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cvr_weight: float = 1.0) -> None:
        self.cvr_weight = cvr_weight

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = bce_with_logits(outputs.logits["ctr"], batch.click).mean()
        cvr = masked_mean(bce_with_logits(outputs.logits["cvr"], batch.conversion), batch.click)
        return LossOutput(total=ctr + self.cvr_weight * cvr, terms={"ctr": ctr, "cvr": cvr})
