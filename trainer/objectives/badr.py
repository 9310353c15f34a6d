"""BADR: batch-adaptive doubly robust learning (Pan et al., ACM TOIS 2026).

Paper: ``badr.txt``, "Batch-Adaptive Doubly Robust Learning for Debiasing Post-Click Conversion
Rate Prediction Under Sparse Data". The DR risk of each batch ``D(k)`` is normalised by the
batch's total inverse-propensity weight instead of its size:

    L_BADR-c(k) = sum_{D(k)} [e_hat + o (e - e_hat) / p_hat] / sum_{D(k)} o / p_hat       (Eq. 13)

so a batch holding a tiny propensity gets less influence than under DR (Eq. 14 against
Eq. 15) and the estimate stays bounded as ``p_hat -> 0`` (Corollary 3.1), while remaining
doubly robust as the batch grows (Theorem 3.1). The imputation model minimises the
delta-method variance of that estimate,

    L_BADR-e(k) = sum w^2 (e - e_hat + E_hat(k) - L_BADR-c(k))^2 / (sum w)^2      (Eq. 32/36)

with ``w = o / p_hat`` and ``E_hat(k) = sum e_hat / sum w``. Following Section 3.7, the three
models are the CTR, CVR and imputation heads of one multi-task model (shared embeddings and
MMoE) trained on a weighted sum:

    L = mean_D BCE(pCTR, o) + cvr_weight * L_BADR-c + imputation_weight * L_BADR-e
        + ctcvr_weight * L_CTCVR.

Paper vs code:

- **Joint, not alternating, updates.** Algorithm 1 trains the propensity model first and then,
  per batch, takes a step on the imputation model (phi) followed by one on the CVR model
  (theta). Section 3.7 replaces that with one weighted loss in a multi-task model, which is what
  we do; the stop-gradients below keep each loss to the parameters Algorithm 1 updates with it
  (the shared embeddings and experts take both).
- **Stop-gradients.** In ``L_BADR-c`` the propensities (hence the batch normaliser
  ``sum o / p_hat``) and ``e_hat`` are detached: Algorithm 1's theta step updates the CVR model
  only. In ``L_BADR-e`` the error ``e``, the weights and the plugged-in estimate
  ``L_BADR-c(k)`` are detached: the phi step updates the imputation model only, and the delta
  method evaluates the variance at the estimate. Were ``L_BADR-c(k)`` differentiated, ``E_hat(k)``
  would cancel out of the residual and the "additional constraint" the paper describes would be
  lost. ``e_hat`` keeps its gradient both row-wise and through ``E_hat(k)``. (The authors' code
  also detaches the row-wise ``e_hat``, replaces ``E_hat(k)`` by a mean over a separate sample
  and divides by the sample size; we follow the equation.)
- **Propensity loss.** Eq. 4's cross entropy on the CTR head (the authors' code uses MSE).
- **Clipping.** ``p_hat = max(pCTR, tau)``, the code's clip to ``[gamma, 1]``.
- **No clicks.** A batch without a click has no normaliser; both BADR terms are 0 for it.
- ``ctcvr_weight`` (default 0) adds ESMM's CTCVR task, the "additional task" Section 3.7 allows.
- ``e_hat = softplus(imputation logit)``: the imputation head predicts the error directly, as in
  ``multi_dr.py`` (the authors' code imputes a label ``y_tilde`` and uses ``BCE(r_hat, y_tilde)``).
- ``pairwise_weight`` (default 0) adds the within-user pairwise ranking term of ``ranking.py``,
  not in the paper. With it, rows are usually read grouped by user (``data.group_rows``), which
  makes each batch ``D(k)`` of Eq. 13 a few users' rows: the batch normaliser is then per group
  of users rather than per random sample.
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
from trainer.objectives.estimators import (
    ImputationHead,
    ImputationParams,
    PropensityParams,
    PropensityWeighting,
    badr_estimate,
    badr_imputation_loss,
    ctcvr_loss,
    ctr_loss,
    prediction_error,
)
from trainer.objectives.params import NON_NEGATIVE, check_params, param
from trainer.objectives.ranking import RankingParams, with_pairwise_term

__all__ = ["BadrObjective", "BadrParams"]


@dataclass(frozen=True)
class BadrParams:
    """BADR's hyper-parameters; ``propensity`` and ``imputation`` are the shared groups
    (``PropensityParams``: ``tau``, the clip ``gamma``, and ``oracle_propensity``;
    ``ImputationParams``: ``imputation_link``, ``imputation_trains_backbone``), flat in a config
    like the others. There is no ``propensity_grad``: BADR always detaches the propensity
    (Algorithm 1 fits the propensity model apart; see the module docstring).

    Attributes:
        cvr_weight: weight of ``L_BADR-c`` (Eq. 13) in Section 3.7's weighted sum (1).
        imputation_weight: weight of ``L_BADR-e`` (Eq. 32/36) in that sum (1).
        ctcvr_weight: weight of ESMM's CTCVR task, the "additional task" Section 3.7 allows
            (0: not used).
        ranking: the pairwise ranking group (``pairwise_weight``, ``ranking.py``; 0: not used).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    propensity: PropensityParams = field(default_factory=PropensityParams)
    cvr_weight: float = param(1.0, NON_NEGATIVE)
    imputation_weight: float = param(1.0, NON_NEGATIVE)
    ctcvr_weight: float = param(0.0, NON_NEGATIVE)
    imputation: ImputationParams = field(default_factory=ImputationParams)
    ranking: RankingParams = field(default_factory=RankingParams)

    def __post_init__(self) -> None:
        check_params(self)


class BadrObjective:
    """BADR (Eq. 13) with the CTR task and the batch-adaptive imputation loss (Eq. 32).

    Args:
        params: the hyper-parameters (``BadrParams``).
    """

    params_type: ClassVar[type[BadrParams]] = BadrParams
    required_heads: ClassVar[frozenset[str]] = frozenset({"imputation"})
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: BadrParams = BadrParams()) -> None:
        self.params = params
        # The propensity is always detached: see __call__.
        self.weighting = PropensityWeighting(params.propensity)
        self.imputation = ImputationHead(params.imputation)
        self.model_structure = ModelStructure(extra_heads=self.required_heads)
        # The imputation loss trains the imputation gate and tower only (unless configured).
        self.detached_heads = self.imputation.detached_heads

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        o = batch.click
        ctr = ctr_loss(outputs, batch)
        # Stop-gradient: the propensity model is trained by its own loss (Algorithm 1 fits it
        # before, and apart from, the CVR and imputation models); detaching it also fixes the
        # batch normaliser sum o / p_hat.
        p_hat = self.weighting(outputs, batch)
        e = prediction_error(outputs, batch)
        e_hat = self.imputation.errors(outputs)
        # Stop-gradient: theta step, the imputed errors are the imputation model's fixed output.
        cvr = badr_estimate(e, e_hat.detach(), o, p_hat)
        # Stop-gradient: phi step, the CVR model's errors and the estimate the delta method
        # linearises around are data for the imputation model.
        imputation = badr_imputation_loss(e.detach(), e_hat, o, p_hat, cvr.detach())
        total = ctr + self.params.cvr_weight * cvr + self.params.imputation_weight * imputation
        terms = {"ctr": ctr, "cvr_badr": cvr, "imputation": imputation}
        if self.params.ctcvr_weight > 0:
            terms["ctcvr"] = ctcvr_loss(outputs, batch)
            total = total + self.params.ctcvr_weight * terms["ctcvr"]
        return with_pairwise_term(LossOutput(total, terms), self.params.ranking, outputs, batch)
