"""DDPO: direct dual propensity optimization (Su et al., SIGIR 2024).

Paper: ``ddpo.txt``, "Direct Dual Propensity Optimization for Post-Click Conversion Rate
Estimation", Section 3 and Algorithm 1. Four tasks share one multi-task model: the click
propensity network ``theta_o`` (our ``ctr`` head), the conversion propensity network ``theta_c``
(``conversion_propensity``), the CVR network ``theta_r`` (``cvr``) and the CTCVR task
``t_hat = o_hat * r_hat``. Two causal transfer modules fuse the click and the conversion
features into the CVR feature (Eq. 12-14; ``trainer.model.transfer``), so the CVR tower reads

    f^r' = theta_t(T_o(f^o, f^r), T_c(f^c, f^r))                                        (Eq. 14)

The losses, with ``delta`` the cross entropy:

    L_o = (1/|D|) sum_D delta(o, o_hat)                                                 (Eq. 16)
    L_c = (1/|D|) sum_D o delta(r, r^c)              clicked rows only                  (Eq. 6)
    r*  = r if r = 1 else sg(r^c)                    dynamic soft label, every row      (Eq. 9)
    L_r = sum_O w^o delta(r*, r_hat) + sum_N w^n delta(r*, r_hat)                      (Eq. 10, 15)
          w^o = (1/o_hat) / sum_O 1/o_hat,  w^n = (1/(1 - o_hat)) / sum_N 1/(1 - o_hat)
    L_t = (1/|D|) sum_D delta(r, o_hat r_hat)                                           (Eq. 17)
    L   = lambda_o L_o + lambda_c L_c + lambda_r L_r + lambda_t L_t                     (Eq. 18)

Paper vs code (see ``shared/docs/objectives-reference-notes.md`` §1 for the authors' code):

- **Task features.** The paper's three "feature embedding networks" are, in our model (as in
  the paper's "MMoE+DDPO" variant, Table 2), the heads' MMoE mixtures; each head's tower is its
  prediction network. The CVR tower reads the fused feature, at inference too: the export
  carries the transfer modules and the conversion head's gate, and the service computes them.
  ``causal_transfer=False`` drops the modules (the CVR tower reads its own mixture).
- **Self-normalisation (Eq. 15).** Eq. 10 with Eq. 15 substituted literally keeps the
  ``1/|D|`` in front of two weighted averages, which makes ``L_r`` about ``1/|D|`` of the other
  losses' scale (the authors' code does this too). Self-normalised IPS replaces ``1/|D|`` by
  the weights' sum, so we take ``L_r`` as the sum of the two weighted averages, each an
  estimate of the whole-space loss. The literal form is this divided by the batch size:
  ``cvr_weight = lambda_r / batch_size`` reproduces it.
- **Stop-gradients.** The weights are detached (they only re-weight rows, and a gradient
  through ``1/o_hat`` would push pCTR up on clicked rows), and so is ``r^c`` inside the soft
  labels: the conversion propensity network learns from ``L_c`` only, as Algorithm 1's
  "generate pseudo-conversion labels" step intends. The CVR losses reach the click and
  conversion gates through the transfer modules (as in the authors' code).
- **Clipping.** ``o_hat`` and ``1 - o_hat`` are floored at ``tau`` (the paper does not clip; the
  code floors at 1e-6). Self-normalisation bounds each space's total weight, not one row's
  share; ``tau = 0.01`` caps each inverse propensity at 100, as for the other IPW objectives.
- **Weights.** The paper picks each lambda from {1e-4 ... 5} by cross-validation and does not
  report the values; the authors' code sets all four to 1, our defaults.
- A batch without clicks (or without unclicked rows) has no weights for that space; its part of
  ``L_r`` is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch

from trainer.data.batch import Batch
from trainer.model.ctcvr import CtcvrModel
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.objectives.base import LossOutput
from trainer.objectives.estimators import (
    ctcvr_loss,
    ctr_loss,
    entire_space_estimate,
    non_click_propensity,
    propensity,
    self_normalized_weights,
)
from trainer.objectives.functional import bce_with_logits
from trainer.objectives.params import NON_NEGATIVE, PROPENSITY_BOUND, check_params, param

__all__ = [
    "CONVERSION_PROPENSITY",
    "DdpoObjective",
    "DdpoParams",
    "conversion_propensity_loss",
    "dynamic_soft_label",
]

CONVERSION_PROPENSITY = "conversion_propensity"  # the head of theta_c


def conversion_propensity_loss(outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
    """``L_c = (1/|D|) sum_D o delta(r, r^c)`` (Eq. 6): the conversion propensity network learns
    from clicked rows only, where conversions are observed, but is averaged over the batch."""
    losses = bce_with_logits(outputs.logits[CONVERSION_PROPENSITY], batch.conversion)
    return (batch.click * losses).mean()


def dynamic_soft_label(
    conversion: torch.Tensor, conversion_propensity: torch.Tensor
) -> torch.Tensor:
    """``r* = r`` where ``r = 1``, else ``r^c`` (Eq. 9): observed conversions stay hard labels,
    every other row (clicked or not) gets the conversion propensity."""
    return torch.where(
        conversion > 0, torch.ones_like(conversion_propensity), conversion_propensity
    )


@dataclass(frozen=True)
class DdpoParams:
    """DDPO's hyper-parameters. The paper picks each lambda of Eq. 18 from {1e-4 ... 5} by
    cross-validation without reporting them; the defaults, 1, are the authors' code's.

    Attributes:
        click_weight: lambda_o, weight of the click propensity loss ``L_o`` (Eq. 16).
        conversion_weight: lambda_c, weight of the conversion propensity loss ``L_c`` (Eq. 6).
        cvr_weight: lambda_r, weight of the impression-space CVR loss ``L_r`` (Eq. 10 with
            Eq. 15; ``lambda_r / batch_size`` gives the literal form, see the module docstring).
        ctcvr_weight: lambda_t, weight of the CTCVR loss ``L_t`` (Eq. 17).
        tau: floor of ``o_hat`` and ``1 - o_hat`` in the inverse propensities (the paper does
            not clip, the code floors at 1e-6): 0.01 caps each at 100, as for the IPW objectives.
        causal_transfer: build the causal transfer modules (Eq. 12-14); ``False`` is the paper's
            ablation without them ("w/o CTM", Table 3).

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    click_weight: float = param(1.0, NON_NEGATIVE)
    conversion_weight: float = param(1.0, NON_NEGATIVE)
    cvr_weight: float = param(1.0, NON_NEGATIVE)
    ctcvr_weight: float = param(1.0, NON_NEGATIVE)
    tau: float = param(0.01, PROPENSITY_BOUND)
    causal_transfer: bool = param(True)

    def __post_init__(self) -> None:
        check_params(self)


class DdpoObjective:
    """DDPO, Eq. 18: ``lambda_o L_o + lambda_c L_c + lambda_r L_r + lambda_t L_t``.

    Args:
        params: the hyper-parameters (``DdpoParams``).

    Example::

        objective = DdpoObjective()
        model = build_model(schema, config, structure=objective.model_structure)
        loss = objective(model(batch.sparse, batch.dense), batch)
        loss.terms  # {"ctr", "conversion_propensity", "cvr_ddpo", "ctcvr"}
    """

    params_type: ClassVar[type[DdpoParams]] = DdpoParams
    required_heads: ClassVar[frozenset[str]] = frozenset({CONVERSION_PROPENSITY})
    detached_heads: ClassVar[frozenset[str]] = frozenset()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: DdpoParams = DdpoParams()) -> None:
        self.params = params
        self.model_structure = ModelStructure(
            extra_heads=self.required_heads,
            cvr_transfer=("ctr", CONVERSION_PROPENSITY) if params.causal_transfer else (),
        )

    def attach(self, model: CtcvrModel) -> None:
        """Nothing to build: the transfer modules are part of the model (``model_structure``)."""

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        o = batch.click
        click = ctr_loss(outputs, batch)
        conversion = conversion_propensity_loss(outputs, batch)
        # Stop-gradient: r^c is the pseudo-label generator's output, a target for the CVR network;
        # the conversion propensity network is trained by L_c alone.
        soft_label = dynamic_soft_label(
            batch.conversion, outputs.prob(CONVERSION_PROPENSITY).detach()
        )
        tau = self.params.tau
        w_click = self_normalized_weights(o, propensity(outputs, tau))
        w_non_click = self_normalized_weights(1.0 - o, non_click_propensity(outputs, tau))
        cvr_losses = bce_with_logits(outputs.logits["cvr"], soft_label)
        cvr = entire_space_estimate(cvr_losses, o, w_click, w_non_click)
        ctcvr = ctcvr_loss(outputs, batch)
        weights = self.params
        total = (
            weights.click_weight * click
            + weights.conversion_weight * conversion
            + weights.cvr_weight * cvr
            + weights.ctcvr_weight * ctcvr
        )
        terms = {"ctr": click, "conversion_propensity": conversion, "cvr_ddpo": cvr, "ctcvr": ctcvr}
        return LossOutput(total=total, terms=terms)
