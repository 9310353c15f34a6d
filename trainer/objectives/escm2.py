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

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, unique
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
    ctcvr_loss,
    ctr_loss,
    dr_estimate,
    ipw_estimate,
    joint_learning_imputation_loss,
    prediction_error,
)
from trainer.objectives.params import NON_NEGATIVE, check_params, param

__all__ = [
    "Escm2DrObjective",
    "Escm2DrParams",
    "Escm2IpwObjective",
    "Escm2IpwParams",
    "IpwNormalization",
]


@unique
class IpwNormalization(str, Enum):
    """What ESCM2-IPW's counterfactual risk is divided by."""

    IMPRESSIONS = "impressions"  # |D|, the batch size (evi.txt Eq. 6, ddpo.txt Eq. 3)
    CLICKS = "clicks"  # N_o, the batch's clicks (the PaddleRec reference; ddpo.txt's description)


@dataclass(frozen=True)
class Escm2IpwParams:
    """ESCM2-IPW's hyper-parameters; ``propensity`` is the shared group (``tau``,
    ``oracle_propensity``: see ``PropensityParams``), flat in a config like the others.

    Attributes:
        cvr_weight: lambda_c, weight of the counterfactual CVR risk ``R_IPW`` (evi.txt Eq. 6):
            0.5, the reference's Ali-CCP config (objectives-reference-notes.md §3).
        ctcvr_weight: lambda_g, weight of ESMM's CTCVR loss (evi.txt Eq. 5): 0.5, likewise.
        ipw_normalization: what ``R_IPW`` is divided by (``IpwNormalization``): ``impressions``,
            ``|D|`` as in the equation (default), or ``clicks``, ``N_o`` as in the reference.
        propensity_grad: let the CVR risk train the CTR tower through ``1 / o_hat``; off by
            default, as the reference detaches its weights.

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    propensity: PropensityParams = field(default_factory=PropensityParams)
    cvr_weight: float = param(0.5, NON_NEGATIVE)
    ctcvr_weight: float = param(0.5, NON_NEGATIVE)
    ipw_normalization: IpwNormalization = param(IpwNormalization.IMPRESSIONS)
    propensity_grad: bool = param(False)

    def __post_init__(self) -> None:
        check_params(self)


class Escm2IpwObjective:
    """ESCM2-IPW: ``L_CTR + cvr_weight * R_IPW + ctcvr_weight * L_CTCVR``.

    Args:
        params: the hyper-parameters (``Escm2IpwParams``).
    """

    params_type: ClassVar[type[Escm2IpwParams]] = Escm2IpwParams
    required_heads: ClassVar[frozenset[str]] = frozenset()
    model_structure: ClassVar[ModelStructure] = ModelStructure()
    detached_heads: ClassVar[frozenset[str]] = frozenset()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: Escm2IpwParams = Escm2IpwParams()) -> None:
        self.params = params
        self.weighting = PropensityWeighting(params.propensity, grad=params.propensity_grad)

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        ctr = ctr_loss(outputs, batch)
        ctcvr = ctcvr_loss(outputs, batch)
        o_hat = self.weighting(outputs, batch)
        cvr = ipw_estimate(prediction_error(outputs, batch), batch.click, o_hat)
        if self.params.ipw_normalization is IpwNormalization.CLICKS:
            # (1/|D|) sum -> (1/N_o) sum; a batch without clicks has a zero risk either way.
            cvr = cvr * batch.size / batch.click.sum().clamp(min=1.0)
        total = ctr + self.params.cvr_weight * cvr + self.params.ctcvr_weight * ctcvr
        return LossOutput(total=total, terms={"ctr": ctr, "cvr_ipw": cvr, "ctcvr": ctcvr})


@dataclass(frozen=True)
class Escm2DrParams:
    """ESCM2-DR's hyper-parameters; ``propensity`` and ``imputation`` are the shared groups
    (``PropensityParams``: ``tau``, ``oracle_propensity``; ``ImputationParams``:
    ``imputation_link``, ``imputation_trains_backbone``), flat in a config like the others.

    Attributes:
        cvr_weight: lambda_c, weight of the DR counterfactual CVR risk ``R_DR`` (evi.txt Eq. 7):
            0.5, the reference's Ali-CCP config (objectives-reference-notes.md §3).
        ctcvr_weight: lambda_g, weight of ESMM's CTCVR loss (evi.txt Eq. 5): 0.5, likewise.
        imputation_weight: weight of ``L_IMP = (1/|D|) sum o (e_hat - e)^2 / o_hat``: 0.5, as
            the reference adds it to ``R_DR`` inside the lambda_c term.
        propensity_grad: let the CVR risk train the CTR tower through ``1 / o_hat``; off by
            default, as the reference detaches its weights.
        dr_trains_imputation: let ``R_DR``'s gradient reach the imputation tower through
            ``e_hat``, as in the reference; off by default (see the module docstring).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    propensity: PropensityParams = field(default_factory=PropensityParams)
    cvr_weight: float = param(0.5, NON_NEGATIVE)
    ctcvr_weight: float = param(0.5, NON_NEGATIVE)
    imputation_weight: float = param(0.5, NON_NEGATIVE)
    propensity_grad: bool = param(False)
    dr_trains_imputation: bool = param(False)
    imputation: ImputationParams = field(default_factory=ImputationParams)

    def __post_init__(self) -> None:
        check_params(self)


class Escm2DrObjective:
    """ESCM2-DR: ``L_CTR + cvr_weight * R_DR + ctcvr_weight * L_CTCVR + imputation_weight * L_IMP``.

    Args:
        params: the hyper-parameters (``Escm2DrParams``).
    """

    params_type: ClassVar[type[Escm2DrParams]] = Escm2DrParams
    required_heads: ClassVar[frozenset[str]] = frozenset({"imputation"})
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: Escm2DrParams = Escm2DrParams()) -> None:
        self.params = params
        self.weighting = PropensityWeighting(params.propensity, grad=params.propensity_grad)
        self.imputation = ImputationHead(params.imputation)
        self.model_structure = ModelStructure(extra_heads=self.required_heads)
        # The imputation loss trains the imputation gate and tower only (unless configured).
        self.detached_heads = self.imputation.detached_heads

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        o = batch.click
        ctr = ctr_loss(outputs, batch)
        ctcvr = ctcvr_loss(outputs, batch)
        o_hat = self.weighting(outputs, batch)
        e = prediction_error(outputs, batch)
        e_hat = self.imputation.errors(outputs)
        # Stop-gradient (default): the DR risk treats e_hat as the imputation model's fixed guess
        # (DR joint learning's prediction step); the imputation tower learns from L_IMP.
        e_hat_in_risk = e_hat if self.params.dr_trains_imputation else e_hat.detach()
        cvr = dr_estimate(e, e_hat_in_risk, o, o_hat)
        # Stop-gradient: e is L_IMP's regression target, not something L_IMP should change; and
        # o_hat only weights its rows.
        imputation = joint_learning_imputation_loss(e.detach(), e_hat, o, o_hat.detach())
        total = ctr + self.params.cvr_weight * cvr + self.params.ctcvr_weight * ctcvr
        total = total + self.params.imputation_weight * imputation
        return LossOutput(
            total=total, terms={"ctr": ctr, "cvr_dr": cvr, "ctcvr": ctcvr, "imputation": imputation}
        )
