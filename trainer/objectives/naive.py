"""The naive baseline: CTR over all impressions, CVR on clicked impressions only.

This is the click-space CVR estimator whose selection bias the other objectives correct: the
CVR tower is fit on ``O`` (clicked rows) but used on the whole impression space ``D``. With the
notation of ``multi-ipw-multi-dr.txt`` (Zhang et al., WWW 2020) it is the naive estimator of
Eq. (3): ``E_naive = (1/|O|) sum_{(u,i) in O} e(r, r_hat)``, with ``e`` the cross entropy.
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
from trainer.objectives.functional import bce_with_logits, masked_mean
from trainer.objectives.params import NON_NEGATIVE, check_params, param

__all__ = ["NaiveObjective", "NaiveParams"]


@dataclass(frozen=True)
class NaiveParams:
    """The naive baseline's hyper-parameters.

    Attributes:
        cvr_weight: weight of the click-space CVR term, Eq. (3)'s ``E_naive``, against the CTR
            loss (1: the two tasks' losses added as they are).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    cvr_weight: float = param(1.0, NON_NEGATIVE)

    def __post_init__(self) -> None:
        check_params(self)


class NaiveObjective:
    """``L = mean_D BCE(pCTR, o) + cvr_weight * mean_O BCE(pCVR, r)``.

    Args:
        params: the hyper-parameters (``NaiveParams``).
    """

    params_type: ClassVar[type[NaiveParams]] = NaiveParams
    required_heads: ClassVar[frozenset[str]] = frozenset()
    model_structure: ClassVar[ModelStructure] = ModelStructure()
    detached_heads: ClassVar[frozenset[str]] = frozenset()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: NaiveParams = NaiveParams()) -> None:
        self.params = params

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = bce_with_logits(outputs.logits["ctr"], batch.click).mean()
        cvr = masked_mean(bce_with_logits(outputs.logits["cvr"], batch.conversion), batch.click)
        total = ctr + self.params.cvr_weight * cvr
        return LossOutput(total=total, terms={"ctr": ctr, "cvr": cvr})
