"""Multi-DR: multi-task doubly robust CVR estimation (Zhang et al., WWW 2020).

Paper: ``multi-ipw-multi-dr.txt``. Multi-IPW (``multi_ipw.py``) plus an imputation task that
predicts the CVR tower's error ``e = BCE(r, r_hat)``; the CVR tower minimises

    E^Multi-DR = (1/|D|) sum_D [ e_hat + o (e - e_hat) / p_hat ]                           (Eq. 9)

with ``p_hat`` the CTR task's prediction and ``e_hat`` the imputation task's, all three tasks
sharing the embeddings and the MMoE (Section 3.6, Fig. 4). Eq. 9 is unbiased when either the
propensities or the imputed errors are right (Theorem 2, Eq. 10-11). The total loss is

    L = mean_D BCE(pCTR, o) + cvr_weight * E^Multi-DR (on the under-sampled rows)
        + imputation_weight * (1/|D|) sum_D o (e_hat - e)^2 / p_hat
        + imputation_l2 * ||theta_Imp||^2.

Paper vs code:

- **Under-sampling** (Section 5.3), off by default. With ``undersample_rate`` set, Eq. 9 runs
  over every clicked row of the batch plus a uniform sample of its unclicked rows,
  ``round(N_clicked x undersample_rate)`` rows in all (``rate = 1.5`` is the paper's best,
  Fig. 6), and is averaged over those rows; ``undersample_rate=None`` (the default, and every
  shipped config's setting) uses the whole batch. Unclicked rows enter Eq. 9 only through
  ``e_hat``, so with the default stop-gradient on ``e_hat`` the sample only scales the CVR
  tower's gradient, by ``|D| / rows kept`` (about ``1 / (rate x CTR)``: about 17 at a 4 % CTR),
  which drowned the CTR task in the shared experts on the simulated data (benchmarks/README.md).
- **How the imputation tower learns.** The paper names the imputation model's target (``e``,
  "assessed by delta = e - e_hat", after Wang et al. [15]) but its Algorithm 2 only says all
  tasks descend Eq. 9. Eq. 9's gradient in ``e_hat`` is ``1 - o / p_hat``, zero in expectation
  under true propensities, so on its own it does not fit ``e_hat`` to ``e``. We train the
  imputation tower with the joint-learning loss of [15] (``imputation_weight``, the
  propensity-weighted squared error on clicked rows, ``e`` detached as its target) and stop
  Eq. 9's gradient into ``e_hat`` (``dr_trains_imputation=False``), as DR joint learning does in
  its prediction step. ``imputation_weight=0, dr_trains_imputation=True`` is Algorithm 2 read
  literally.
- **L2 on the imputation tower** (Section 4.5.2, ``v = 1e-4``): ``imputation_l2`` times the sum
  of squares of the imputation head's own parameters (its MMoE gate and tower), added by
  ``TrainModule`` from ``head_l2`` since an objective does not see parameters.
- **Propensity gradient and IPW bound** as in ``multi_ipw.py``: ``p_hat = max(pCTR, tau)``,
  detached unless ``propensity_grad``.
- ``e_hat = softplus(imputation logit)`` (``imputation_link``), so it can take any
  cross-entropy value; the paper does not say how ``e_hat`` is bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch

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
    ctr_loss,
    dr_terms,
    joint_learning_imputation_loss,
    prediction_error,
)
from trainer.objectives.functional import masked_mean
from trainer.objectives.params import NON_NEGATIVE, at_least, check_params, param

__all__ = ["MultiDrObjective", "MultiDrParams", "undersample_unclicked"]


@dataclass(frozen=True)
class MultiDrParams:
    """Multi-DR's hyper-parameters; ``propensity`` and ``imputation`` are the shared groups
    (``PropensityParams``: ``tau``, ``oracle_propensity``; ``ImputationParams``:
    ``imputation_link``, ``imputation_trains_backbone``), flat in a config like the others.

    Attributes:
        undersample_rate: ``lambda`` of Section 5.3 (>= 1): Eq. 9 runs over the clicked rows
            plus random unclicked ones, ``lambda x N_clicked`` rows in all (the paper's best is
            1.5, Fig. 6); null (default, as in every shipped config): the whole batch.
        cvr_weight: weight of the DR CVR risk, Eq. 9 (1: added to the CTR loss as it is).
        imputation_weight: weight of the imputation loss ``(1/|D|) sum o (e_hat - e)^2 /
            p_hat`` (DR joint learning's, after [15]; see the module docstring).
        imputation_l2: L2 coefficient ``v`` on the imputation head's own parameters (Section
            4.5.2: 1e-4).
        propensity_grad: let the CVR risk train the CTR tower through ``1 / p_hat`` (Algorithm
            2 descends Eq. 9 in every task's parameters); off by default, as for Multi-IPW.
        dr_trains_imputation: let Eq. 9's gradient reach the imputation tower through
            ``e_hat``; with ``imputation_weight=0`` this is Algorithm 2 read literally.

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    propensity: PropensityParams = field(default_factory=PropensityParams)
    undersample_rate: float | None = param(None, at_least(1))
    cvr_weight: float = param(1.0, NON_NEGATIVE)
    imputation_weight: float = param(1.0, NON_NEGATIVE)
    imputation_l2: float = param(1e-4, NON_NEGATIVE)
    propensity_grad: bool = param(False)
    dr_trains_imputation: bool = param(False)
    imputation: ImputationParams = field(default_factory=ImputationParams)

    def __post_init__(self) -> None:
        check_params(self)


def undersample_unclicked(click: torch.Tensor, rate: float) -> torch.Tensor:
    """Section 5.3's under-sampling: a ``(B,)`` 0/1 mask of every clicked row plus uniformly drawn
    unclicked rows, ``round(rate * N_clicked)`` rows in all (or every row if there are fewer).

    Ranks random scores instead of indexing, so the mask is built without a host sync.
    """
    n_clicked = click.sum()
    n_extra = torch.round(rate * n_clicked) - n_clicked  # unclicked rows to keep
    # Clicked rows get -1 and sort after every unclicked row's score in [0, 1).
    scores = torch.where(click > 0, torch.full_like(click, -1.0), torch.rand_like(click))
    rank = scores.argsort(descending=True).argsort()
    return ((click > 0) | (rank < n_extra)).to(click.dtype)


class MultiDrObjective:
    """Multi-DR (Eq. 9) with the CTR task, the imputation task's loss and its L2 penalty.

    Args:
        params: the hyper-parameters (``MultiDrParams``).
    """

    params_type: ClassVar[type[MultiDrParams]] = MultiDrParams
    required_heads: ClassVar[frozenset[str]] = frozenset({"imputation"})

    def __init__(self, params: MultiDrParams = MultiDrParams()) -> None:
        self.params = params
        self.weighting = PropensityWeighting(params.propensity, grad=params.propensity_grad)
        self.imputation = ImputationHead(params.imputation)
        self.model_structure = ModelStructure(extra_heads=self.required_heads)
        # The imputation loss trains the imputation gate and tower only (unless configured).
        self.detached_heads = self.imputation.detached_heads
        self.head_l2: Mapping[str, float] = MappingProxyType(
            {"imputation": params.imputation_l2} if params.imputation_l2 > 0 else {}
        )

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the objective has no parameters of its own."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        o = batch.click
        ctr = ctr_loss(outputs, batch)
        p_hat = self.weighting(outputs, batch)
        e = prediction_error(outputs, batch)
        e_hat = self.imputation.errors(outputs)
        # Stop-gradient (default): in the CVR risk e_hat is the imputation model's current guess,
        # held fixed as in DR joint learning's prediction step; the imputation tower learns from
        # its own loss below instead of from Eq. 9's zero-mean (1 - o / p_hat) gradient.
        e_hat_in_risk = e_hat if self.params.dr_trains_imputation else e_hat.detach()
        terms = dr_terms(e, e_hat_in_risk, o, p_hat)
        rate = self.params.undersample_rate
        cvr = terms.mean() if rate is None else masked_mean(terms, undersample_unclicked(o, rate))
        # Stop-gradient: e is the imputation model's regression target; the CVR tower is trained
        # by the DR risk alone, not by making its own errors easier to predict.
        # (p_hat is detached here even with propensity_grad: the imputation loss only weights rows.)
        imputation = joint_learning_imputation_loss(e.detach(), e_hat, o, p_hat.detach())
        total = ctr + self.params.cvr_weight * cvr + self.params.imputation_weight * imputation
        return LossOutput(total=total, terms={"ctr": ctr, "cvr_dr": cvr, "imputation": imputation})
