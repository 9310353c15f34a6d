"""ESCM2: entire space counterfactual multi-task model (Wang et al., SIGIR 2022), IPW and DR.

ESCM2 keeps ESMM's two whole-space tasks and adds a counterfactual CVR risk that regularises
the CVR tower. Its paper is not in ``shared/papers``; its losses are written out in
``evi.txt`` (Eq. 4-7) and ``ddpo.txt`` (Eq. 3-4):

    L_CTR   = (1/|D|) sum_D BCE(o, o_hat)                                          (evi Eq. 4)
    L_CTCVR = (1/|D|) sum_D BCE(o r, o_hat r_hat)                                  (evi Eq. 5)
    R_IPW   = (1/|D|) sum_D o e / o_hat                            (evi Eq. 6, ddpo Eq. 3)
    R_DR    = (1/|D|) sum_D [e_hat + o (e - e_hat) / o_hat]        (evi Eq. 7, ddpo Eq. 4)

with ``e = BCE(r, r_hat)`` and ``e_hat`` the imputation tower's output, and the model minimises

    L = L_CTR + cvr_weight * R + ctcvr_weight * L_CTCVR   (+ imputation_weight * L_IMP for DR)

where ``L_IMP = (1/|D|) sum_D o (e_hat - e)^2 / o_hat`` is DR joint learning's imputation loss
(Wang et al. 2019, badr.txt Eq. 6 with a squared loss).

Paper vs code (the PaddleRec reference, see ``shared/docs/objectives-reference-notes.md`` §3):

- **Weights.** ``cvr_weight`` (lambda_c) and ``ctcvr_weight`` (lambda_g) default to 0.5 each,
  the reference's Ali-CCP config. The reference adds the imputation loss to the DR risk inside
  the lambda_c term, so ``imputation_weight`` defaults to 0.5 as well.
- **IPW normalisation.** Eq. 6 divides by ``|D|``; the reference divides by the batch's click
  count ``N_o`` (as ddpo.txt describes ESCM2-IPW). ``ipw_normalization="impressions"`` (default)
  follows the equation, ``"clicks"`` the reference (a per-batch rescaling by ``|D| / N_o``).
- **Stop-gradients.** The propensity is detached (the reference detaches its weights; see
  ``estimators.propensity``; ``propensity_grad=True`` lifts it). In the DR risk ``e_hat`` is
  detached and the imputation loss's target ``e`` too, so the CVR tower learns from R_DR and
  L_CTCVR and the imputation tower from L_IMP only (``dr_trains_imputation=True`` lets R_DR's
  gradient reach ``e_hat``, as in the reference, which also does not detach ``e`` in L_IMP).
- **Clipping.** ``o_hat = max(pCTR, tau)``. The reference caps each DR weight at 15
  (``tau = 1/15``); ``tau`` defaults to 0.01 here as for Multi-IPW, and is set per data set.
- ``e_hat = softplus(logit)`` by default; the reference uses a sigmoid (``imputation_link``).
"""

from __future__ import annotations

from enum import Enum, unique
from typing import ClassVar

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs
from trainer.objectives.base import LossOutput
from trainer.objectives.estimators import (
    ImputationHead,
    ImputationLink,
    PropensityWeighting,
    check_non_negative,
    ctcvr_loss,
    ctr_loss,
    dr_estimate,
    ipw_estimate,
    joint_learning_imputation_loss,
    prediction_error,
)

__all__ = ["Escm2DrObjective", "Escm2IpwObjective", "IpwNormalization"]


@unique
class IpwNormalization(str, Enum):
    """What ESCM2-IPW's counterfactual risk is divided by."""

    IMPRESSIONS = "impressions"  # |D|, the batch size (evi.txt Eq. 6, ddpo.txt Eq. 3)
    CLICKS = "clicks"  # N_o, the batch's clicks (the PaddleRec reference; ddpo.txt's description)


class Escm2IpwObjective:
    """ESCM2-IPW: ``L_CTR + cvr_weight * R_IPW + ctcvr_weight * L_CTCVR``.

    Args:
        tau: propensity clipping bound (weights at most ``1 / tau``).
        cvr_weight: lambda_c, weight of the counterfactual CVR risk.
        ctcvr_weight: lambda_g, weight of ESMM's CTCVR loss.
        ipw_normalization: ``"impressions"`` (Eq. 6) or ``"clicks"`` (the reference code).
        propensity_grad: let the CVR risk train the CTR tower through ``1 / o_hat``.
        oracle_propensity: diagnostic: weight by the simulator's true click probability instead
            of pCTR (``estimators.propensity``); needs ground truth in the training data.

    Raises:
        ValueError: ``tau`` outside ``(0, 1]``, a negative weight or an unknown normalisation.
    """

    required_heads: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        tau: float = 0.01,
        cvr_weight: float = 0.5,
        ctcvr_weight: float = 0.5,
        ipw_normalization: str = IpwNormalization.IMPRESSIONS.value,
        propensity_grad: bool = False,
        oracle_propensity: bool = False,
    ) -> None:
        self.weighting = PropensityWeighting(
            "escm2_ipw", tau, grad=propensity_grad, oracle=oracle_propensity
        )
        check_non_negative("escm2_ipw", cvr_weight=cvr_weight, ctcvr_weight=ctcvr_weight)
        try:
            self.ipw_normalization = IpwNormalization(ipw_normalization)
        except ValueError:
            allowed = [m.value for m in IpwNormalization]
            raise ValueError(
                f"escm2_ipw: ipw_normalization must be one of {allowed}, got {ipw_normalization!r}"
            ) from None
        self.cvr_weight = cvr_weight
        self.ctcvr_weight = ctcvr_weight

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = ctr_loss(outputs, batch)
        ctcvr = ctcvr_loss(outputs, batch)
        o_hat = self.weighting(outputs, batch)
        cvr = ipw_estimate(prediction_error(outputs, batch), batch.click, o_hat)
        if self.ipw_normalization is IpwNormalization.CLICKS:
            # (1/|D|) sum -> (1/N_o) sum; a batch without clicks has a zero risk either way.
            cvr = cvr * batch.size / batch.click.sum().clamp(min=1.0)
        total = ctr + self.cvr_weight * cvr + self.ctcvr_weight * ctcvr
        return LossOutput(total=total, terms={"ctr": ctr, "cvr_ipw": cvr, "ctcvr": ctcvr})


class Escm2DrObjective:
    """ESCM2-DR: ``L_CTR + cvr_weight * R_DR + ctcvr_weight * L_CTCVR + imputation_weight * L_IMP``.

    Args:
        tau: propensity clipping bound (weights at most ``1 / tau``).
        cvr_weight: lambda_c, weight of the DR counterfactual CVR risk.
        ctcvr_weight: lambda_g, weight of ESMM's CTCVR loss.
        imputation_weight: weight of the imputation loss ``(1/|D|) sum o (e_hat - e)^2 / o_hat``.
        propensity_grad: let the CVR risk train the CTR tower through ``1 / o_hat``.
        dr_trains_imputation: let the DR risk's gradient reach the imputation tower.
        imputation_link: ``"softplus"`` or ``"sigmoid"``, see ``ImputationLink``.
        imputation_trains_backbone: let the imputation loss train the shared embeddings and
            experts too (the paper's fully shared model); off: see ``imputation_detached_heads``.
        oracle_propensity: diagnostic: weight by the simulator's true click probability instead
            of pCTR (``estimators.propensity``); needs ground truth in the training data.

    Raises:
        ValueError: ``tau`` outside ``(0, 1]``, a negative weight or an unknown link.
    """

    required_heads: ClassVar[frozenset[str]] = frozenset({"imputation"})

    def __init__(
        self,
        tau: float = 0.01,
        cvr_weight: float = 0.5,
        ctcvr_weight: float = 0.5,
        imputation_weight: float = 0.5,
        propensity_grad: bool = False,
        dr_trains_imputation: bool = False,
        imputation_link: str = ImputationLink.SOFTPLUS.value,
        imputation_trains_backbone: bool = False,
        oracle_propensity: bool = False,
    ) -> None:
        self.weighting = PropensityWeighting(
            "escm2_dr", tau, grad=propensity_grad, oracle=oracle_propensity
        )
        self.imputation = ImputationHead("escm2_dr", imputation_link, imputation_trains_backbone)
        # Read by the model builder: the imputation loss trains the imputation gate and tower only.
        self.detached_heads = self.imputation.detached_heads
        check_non_negative(
            "escm2_dr",
            cvr_weight=cvr_weight,
            ctcvr_weight=ctcvr_weight,
            imputation_weight=imputation_weight,
        )
        self.cvr_weight = cvr_weight
        self.ctcvr_weight = ctcvr_weight
        self.imputation_weight = imputation_weight
        self.dr_trains_imputation = dr_trains_imputation

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        o = batch.click
        ctr = ctr_loss(outputs, batch)
        ctcvr = ctcvr_loss(outputs, batch)
        o_hat = self.weighting(outputs, batch)
        e = prediction_error(outputs, batch)
        e_hat = self.imputation.errors(outputs)
        # Stop-gradient (default): the DR risk treats e_hat as the imputation model's fixed guess
        # (DR joint learning's prediction step); the imputation tower learns from L_IMP.
        cvr = dr_estimate(e, e_hat if self.dr_trains_imputation else e_hat.detach(), o, o_hat)
        # Stop-gradient: e is L_IMP's regression target, not something L_IMP should change; and
        # o_hat only weights its rows.
        imputation = joint_learning_imputation_loss(e.detach(), e_hat, o, o_hat.detach())
        total = ctr + self.cvr_weight * cvr + self.ctcvr_weight * ctcvr
        total = total + self.imputation_weight * imputation
        return LossOutput(
            total=total, terms={"ctr": ctr, "cvr_dr": cvr, "ctcvr": ctcvr, "imputation": imputation}
        )
