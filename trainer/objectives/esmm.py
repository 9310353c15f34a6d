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

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from trainer.data.batch import Batch
from trainer.model.ctcvr import CtcvrModel
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.objectives.base import LossOutput
from trainer.objectives.functional import bce, bce_with_logits
from trainer.objectives.params import NON_NEGATIVE, check_params, param

__all__ = ["EsmmObjective", "EsmmParams"]


@dataclass(frozen=True)
class EsmmParams:
    """ESMM's hyper-parameters.

    Attributes:
        ctcvr_weight: weight of the CTCVR term against the CTR term; Eq. 3 adds the two
            unweighted (1).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    ctcvr_weight: float = param(1.0, NON_NEGATIVE)

    def __post_init__(self) -> None:
        check_params(self)


class EsmmObjective:
    """``L = mean_D BCE(pCTR, o) + ctcvr_weight * mean_D BCE(pCTR x pCVR, r)`` (ESMM Eq. 3).

    Args:
        params: the hyper-parameters (``EsmmParams``).
    """

    params_type: ClassVar[type[EsmmParams]] = EsmmParams
    required_heads: ClassVar[frozenset[str]] = frozenset()
    model_structure: ClassVar[ModelStructure] = ModelStructure()
    detached_heads: ClassVar[frozenset[str]] = frozenset()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: EsmmParams = EsmmParams()) -> None:
        self.params = params

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = bce_with_logits(outputs.logits["ctr"], batch.click).mean()
        # batch.conversion is already o & r: a conversion is only recorded after a click.
        ctcvr = bce(outputs.pctcvr, batch.conversion).mean()
        total = ctr + self.params.ctcvr_weight * ctcvr
        return LossOutput(total=total, terms={"ctr": ctr, "ctcvr": ctcvr})
