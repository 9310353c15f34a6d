"""The naive baseline: CTR over all impressions, CVR on clicked impressions only.

This is the click-space CVR estimator whose selection bias the other objectives correct: the
CVR tower is fit on ``O`` (clicked rows) but used on the whole impression space ``D``. With the
notation of ``multi-ipw-multi-dr.txt`` (Zhang et al., WWW 2020) it is the naive estimator of
Eq. (3): ``E_naive = (1/|O|) sum_{(u,i) in O} e(r, r_hat)``, with ``e`` the cross entropy.

Two forms, by ``ctr_trains_backbone``:

- **Multi-task** (default): the CTR loss over all impressions and the CVR loss share the
  embeddings and the MMoE experts, so the CVR tower profits from what the click task teaches
  them. This is not what the debiasing papers call naive.
- **Single-task** (``ctr_trains_backbone=False``, config ``naive_single_task_simulated.yaml``):
  the CTR head reads the backbone detached (``detached_heads = {"ctr"}``), so the embeddings,
  the experts and the CVR gate and tower learn from the click-space CVR loss alone: one CVR
  model fitted to the clicked rows, the papers' naive baseline (MF or NCF fitted to the
  observed ratings: badr.txt Table 3, adap-sl.txt Table 1). The CTR head still trains, on those
  features, so the model serves pCTR like any other; it changes nothing the CVR head computes.
  Its gap to the multi-task form is what the shared backbone alone gives, before any debiasing.

``pairwise_weight`` (default 0) adds the within-user pairwise ranking term of ``ranking.py``
(BPR's criterion on the clicked rows), which the papers' naive baseline does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from trainer.data.batch import Batch
from trainer.model.ctcvr import CtcvrModel
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.objectives.base import LossOutput
from trainer.objectives.functional import bce_with_logits, masked_mean
from trainer.objectives.params import NON_NEGATIVE, check_params, param
from trainer.objectives.ranking import RankingParams, with_pairwise_term

__all__ = ["NaiveObjective", "NaiveParams"]


@dataclass(frozen=True)
class NaiveParams:
    """The naive baseline's hyper-parameters.

    Attributes:
        cvr_weight: weight of the click-space CVR term, Eq. (3)'s ``E_naive``, against the CTR
            loss (1: the two tasks' losses added as they are).
        ctr_trains_backbone: let the CTR loss train the shared embeddings and experts (the
            multi-task baseline, default); false: the single-task naive CVR model, whose every
            parameter learns from the click-space CVR loss alone (see the module docstring).
        ranking: the pairwise ranking group (``pairwise_weight``, ``ranking.py``; 0: not used).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    cvr_weight: float = param(1.0, NON_NEGATIVE)
    ctr_trains_backbone: bool = param(True)
    ranking: RankingParams = field(default_factory=RankingParams)

    def __post_init__(self) -> None:
        check_params(self)


class NaiveObjective:
    """``L = mean_D BCE(pCTR, o) + cvr_weight * mean_O BCE(pCVR, r)`` (+ ``pairwise_weight *
    L_pair``); with ``ctr_trains_backbone=False`` the first term trains the CTR gate and tower only.

    Args:
        params: the hyper-parameters (``NaiveParams``).
    """

    params_type: ClassVar[type[NaiveParams]] = NaiveParams
    required_heads: ClassVar[frozenset[str]] = frozenset()
    model_structure: ClassVar[ModelStructure] = ModelStructure()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: NaiveParams = NaiveParams()) -> None:
        self.params = params
        # Single-task: the CTR head reads the shared features but never trains them, so the CVR
        # model is fitted to the clicked rows alone.
        self.detached_heads: frozenset[str] = (
            frozenset() if params.ctr_trains_backbone else frozenset({"ctr"})
        )

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = bce_with_logits(outputs.logits["ctr"], batch.click).mean()
        cvr = masked_mean(bce_with_logits(outputs.logits["cvr"], batch.conversion), batch.click)
        total = ctr + self.params.cvr_weight * cvr
        loss = LossOutput(total=total, terms={"ctr": ctr, "cvr": cvr})
        return with_pairwise_term(loss, self.params.ranking, outputs, batch)
