"""ESMM: Entire Space Multi-task Model (Ma et al., SIGIR 2018, "Entire Space Multi-Task Model").

ESMM never fits the CVR tower on clicked rows directly. It models the post-view conversion
over the whole impression space as pCTCVR = pCTR x pCVR (the paper's Eq. 1-2) and minimises

    L = sum_{i in D} l(o_i, pCTR_i) + sum_{i in D} l(o_i & r_i, pCTR_i x pCVR_i)     (Eq. 3)

with ``l`` the cross entropy; pCVR is an intermediate variable trained only through the CTCVR
term. We average over the batch instead of summing (a constant rescaling of the learning rate);
ESCM2's papers (evi.txt Eq. 5-6) restate the same two terms. ``ctcvr_weight`` defaults to 1 as
in Eq. 3.
"""

from __future__ import annotations

from typing import ClassVar

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs
from trainer.objectives.base import LossOutput
from trainer.objectives.functional import bce, bce_with_logits

__all__ = ["EsmmObjective"]


class EsmmObjective:
    """``L = mean_D BCE(pCTR, o) + ctcvr_weight * mean_D BCE(pCTR x pCVR, r)`` (ESMM Eq. 3).

    Args:
        ctcvr_weight: weight of the CTCVR term (1 in the paper).
    """

    required_heads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctcvr_weight: float = 1.0) -> None:
        self.ctcvr_weight = ctcvr_weight

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = bce_with_logits(outputs.logits["ctr"], batch.click).mean()
        # batch.conversion is already o & r: a conversion is only recorded after a click.
        ctcvr = bce(outputs.pctcvr, batch.conversion).mean()
        return LossOutput(total=ctr + self.ctcvr_weight * ctcvr, terms={"ctr": ctr, "ctcvr": ctcvr})
