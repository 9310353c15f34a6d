"""EVI: entire-space variational information exploitation (AAAI 2025).

Paper: ``evi.txt``, "Entire-Space Variational Information Exploitation for Post-Click
Conversion Rate Prediction", Section 4 and Appendix A.3. One multi-task model with shared
embeddings and experts holds the CTR head (the click propensity ``o_hat``), the CVR student
(``cvr``) and a conditional entire-space CVR teacher (``cvr_teacher``) whose predictor reads
its representation conditioned on the click propensity, ``vec(h ⊗ Linear(sg(o_hat)))``
(Section 4.2, Figure 1; ``trainer.model.conditioning``). With ``delta`` the cross entropy:

    L_CTR   = (1/|D|) sum_D delta(o, o_hat)                                          (Eq. 12)
    L_CTCVR = (1/|D|) sum_D delta(o r, o_hat r_hat)                                  (Eq. 13)
    L_CVR-T = (1/|D|) sum_D delta(r, r_T | x, o_hat)        the teacher, whole space  (Eq. 14)
    L_CVR   = 1/(2|D|) sum_O delta(r, r_hat) / o_hat
            + 1/(2|D|) sum_N delta(r*, r_hat) / (1 - o_hat),   r* = sg(r_T)            (Eq. 15)
    L_VIE   = sum_k mean_D sum_n [log sigma_kn + (t_kn - mu_kn(s_k))^2 / (2 sigma_kn^2)]  (Eq. 11)
    L       = l_c L_CTR + l_t L_CVR-T + l_r L_CVR + l_i L_VIE + l_g L_CTCVR               (Eq. 16)

``t_k`` and ``s_k`` are the teacher's and the student's tower activations at the same depth
(the "learner layers"), ``mu_k`` a linear layer and ``sigma_kn^2 = softplus(rho_kn) + eps``
with trainable ``rho`` (Section 4.3): the negative log-likelihood of a Gaussian ``q(t | s)``,
whose minimisation maximises a variational lower bound of the mutual information ``I(t; s)``
(Eq. 10). It is a log-likelihood up to a constant, so it can be negative.

Paper vs code (see ``shared/docs/objectives-reference-notes.md`` §2 for the authors' code):

- **Weights.** Appendix A.3: ``l_c = 0.2, l_t = 0.2, l_r = 2, l_i = 0.2, l_g = 0.2`` (our
  defaults, the paper's setting for all data sets but Ali-CCP, which uses ``l_c = 1`` and
  ``l_g = 0.1``). The code multiplies its CVR term by the CTR weight instead.
- **What the teacher estimates.** Eq. 14 trains the teacher on ``r`` over the whole space;
  only clicked rows have an observed ``r``, so unclicked rows count as ``r = 0`` (the logged
  label, as in the authors' code). Fitted that way, the teacher's optimum is the mean of the
  logged label given its inputs, ``E[o r | x, o_hat] = P(o = 1, r = 1 | x)``: a CTCVR-like
  quantity, about ``o_hat`` times the CVR, not the post-click CVR ``P(r = 1 | x, o = 1)`` that
  Theorem 2 says it is. Conditioning on ``o_hat`` cannot separate "did not click" from "would
  not convert" when every unclicked row carries the label 0: the loss rewards the teacher for
  predicting 0 there, and its pseudo-labels (Eq. 15) pull the student's pCVR on unclicked rows
  towards pCTCVR. ``teacher_labels`` (default ``logged``, the paper's and the code's form)
  offers two teachers that do estimate ``P(r = 1 | x, o = 1)``: ``over_propensity`` divides the
  same teacher's output by the propensity, ``clicked`` fits the teacher on clicked rows only
  (benchmarks/README.md measures all three). Pseudo-labels are computed with the current
  ``o_hat``.
- **Stop-gradients.** The teacher's ``o_hat`` input is detached in the model (a "constant
  feature input", Appendix B.2), so ``L_CVR-T`` never trains the CTR head. The pseudo-labels
  ``r*`` are detached: they are the teacher's logits distilled into the student, not a way for
  the student's loss to move the teacher. The inverse propensities are detached (see
  ``estimators.propensity``). In ``L_VIE`` the teacher's activations ``t`` are detached
  (``vie_trains_teacher=False``): the information flows from teacher to student, as in
  variational information distillation, whose teacher is fixed. The code lets ``L_VIE`` move
  the teacher too (``vie_trains_teacher=True``).
- **Trainable variances.** Eq. 11's ``rho`` is trainable; the code computes ``sigma^2`` once at
  construction, so its variances never move. ``rho`` starts at 5 (``sigma^2 ~ 5``) as in the
  code, and ``eps = 1e-3`` bounds ``sigma^2`` from below.
- **Reduction.** Eq. 11 sums over the ``N`` entries of a layer (the code averages them), we
  average over rows and sum over the ``K`` pairs.
- **Transfer layers.** ``transfer_layers`` pairs the last ``K`` hidden layers of the two towers;
  the paper uses ``K = 3``, all of its ``[128, 64, 32]`` representation learner; the default
  (None) pairs every hidden layer of ours.
- **Clipping.** ``o_hat`` and ``1 - o_hat`` are floored at ``tau`` (the code clamps ``o_hat`` to
  ``[0.001, 0.999]``; the paper does not clip).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, unique
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.batch import Batch
from trainer.model.ctcvr import CtcvrModel
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.objectives.base import LossOutput
from trainer.objectives.estimators import (
    clip_propensity,
    ctcvr_loss,
    ctr_loss,
    entire_space_estimate,
    non_click_propensity,
    propensity,
)
from trainer.objectives.functional import bce_with_logits, masked_mean
from trainer.objectives.params import (
    NON_NEGATIVE,
    POSITIVE,
    PROPENSITY_BOUND,
    at_least,
    check_params,
    param,
)

__all__ = [
    "TEACHER",
    "EviObjective",
    "EviParams",
    "TeacherLabels",
    "VariationalInformation",
    "pseudo_labels",
    "teacher_loss",
]

TEACHER = "cvr_teacher"  # the conditional entire-space CVR teacher's head


@unique
class TeacherLabels(str, Enum):
    """What the teacher is fitted to and what its pseudo-labels for unclicked rows are."""

    # Eq. 14 as the paper and the authors' code read it: the logged r over the whole space (0 on
    # every unclicked row); pseudo-labels r_T, an estimate of P(o = 1, r = 1 | x) (CTCVR-like).
    LOGGED = "logged"
    # The same teacher; pseudo-labels min(1, r_T / max(o_hat, tau)), an estimate of
    # P(r = 1 | x, o = 1) = P(o = 1, r = 1 | x) / P(o = 1 | x) when o_hat is right.
    OVER_PROPENSITY = "over_propensity"
    # The teacher fits r on clicked rows only (still conditioned on o_hat): it estimates
    # P(r = 1 | x, o = 1) directly; pseudo-labels r_T.
    CLICKED = "clicked"


class VariationalInformation(nn.Module):
    """Eq. 11 for one teacher/student layer pair: ``-log q(t | s)`` up to a constant, with
    ``q = N(mu(s), diag(sigma^2))``, ``mu`` a linear layer and ``sigma^2 = softplus(rho) + eps``.

    Args:
        width: the width ``N`` of both layers.
        initial_rho: starting value of every ``rho_n``.
        min_variance: ``eps``, the floor of ``sigma^2``.

    Example::

        vie = VariationalInformation(8)
        vie(torch.randn(4, 8), torch.randn(4, 8))  # a scalar: mean over rows, sum over entries
    """

    def __init__(self, width: int, initial_rho: float = 5.0, min_variance: float = 1e-3) -> None:
        super().__init__()
        self.mean = nn.Linear(width, width)
        self.rho = nn.Parameter(torch.full((width,), float(initial_rho)))
        self.min_variance = min_variance

    @property
    def variance(self) -> torch.Tensor:
        return F.softplus(self.rho) + self.min_variance

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Args: teacher ``t`` and student ``s`` activations ``(B, N)``. Returns a scalar."""
        variance = self.variance
        # log sigma + (t - mu)^2 / (2 sigma^2), with log sigma = log(sigma^2) / 2
        nll = 0.5 * torch.log(variance) + (teacher - self.mean(student)) ** 2 / (2.0 * variance)
        return nll.sum(dim=-1).mean()


def teacher_loss(
    outputs: TaskOutputs, batch: Batch, labels: TeacherLabels | str = TeacherLabels.LOGGED
) -> torch.Tensor:
    """The teacher's loss ``L_CVR-T``.

    ``logged`` and ``over_propensity``: ``(1/|D|) sum_D delta(r, r_T)`` (Eq. 14) with the logged
    ``r`` (0 unclicked). ``clicked``: ``(1/|O|) sum_O delta(r, r_T)``, the clicked rows only (0
    for a batch without clicks).
    """
    losses = bce_with_logits(outputs.logits[TEACHER], batch.conversion)
    if TeacherLabels(labels) is TeacherLabels.CLICKED:
        return masked_mean(losses, batch.click)
    return losses.mean()


def pseudo_labels(
    outputs: TaskOutputs, labels: TeacherLabels | str = TeacherLabels.LOGGED, tau: float = 0.01
) -> torch.Tensor:
    """``r*``, the teacher's pseudo-labels of Eq. 15 (used on unclicked rows), detached.

    ``logged`` and ``clicked``: the teacher's probability ``r_T``. ``over_propensity``:
    ``min(1, r_T / max(o_hat, tau))``.
    """
    # Stop-gradient: the pseudo-labels are the teacher's output distilled into the student, not
    # a way for the student's loss to move the teacher (or, through o_hat, the CTR head).
    r_teacher = outputs.prob(TEACHER).detach()
    if TeacherLabels(labels) is TeacherLabels.OVER_PROPENSITY:
        return (r_teacher / clip_propensity(outputs.pctr.detach(), tau)).clamp(max=1.0)
    return r_teacher


@dataclass(frozen=True)
class EviParams:
    """EVI's hyper-parameters. The weights are Appendix A.3's for every data set but Ali-CCP
    (which uses ``ctr_weight=1``, ``ctcvr_weight=0.1``).

    Attributes:
        ctr_weight: lambda_c, weight of ``L_CTR`` (Eq. 12): 0.2.
        teacher_weight: lambda_t, weight of the teacher's ``L_CVR-T`` (Eq. 14): 0.2.
        cvr_weight: lambda_r, weight of the student's ``L_CVR`` (Eq. 15): 2.
        vie_weight: lambda_i, weight of ``L_VIE`` (Eq. 11): 0.2.
        ctcvr_weight: lambda_g, weight of ``L_CTCVR`` (Eq. 13): 0.2.
        tau: floor of ``o_hat`` and ``1 - o_hat`` in Eq. 15's inverse propensities (the paper
            does not clip, the code clamps ``o_hat`` to ``[0.001, 0.999]``).
        transfer_layers: ``K``, how many of the towers' last hidden layers are paired in
            ``L_VIE`` (Section 4.3; the paper pairs all 3 of its ``[128, 64, 32]``); null: all.
        propensity_dim: width of the teacher's click propensity projection
            ``Linear(sg(o_hat))`` (Section 4.2, Figure 1): 5.
        vie_trains_teacher: let ``L_VIE`` reach the teacher's activations, as the authors' code
            does; off by default (variational information distillation's teacher is fixed).
        initial_rho: starting ``rho`` of Eq. 11's variances ``softplus(rho) + eps``: 5, the
            code's value.
        min_variance: ``eps``, the floor of those variances: 1e-3.
        teacher_labels: what the teacher fits and what its pseudo-labels are
            (``TeacherLabels``): ``logged`` (default, Eq. 14 and the authors' code: the logged
            ``r`` over the whole space, an estimate of ``P(o = 1, r = 1 | x)``),
            ``over_propensity`` (that teacher's output over ``max(o_hat, tau)``, capped at 1) or
            ``clicked`` (the teacher fitted on clicked rows only); the last two estimate
            ``P(r = 1 | x, o = 1)``, the quantity Theorem 2 ascribes to the teacher.

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    ctr_weight: float = param(0.2, NON_NEGATIVE)
    teacher_weight: float = param(0.2, NON_NEGATIVE)
    cvr_weight: float = param(2.0, NON_NEGATIVE)
    vie_weight: float = param(0.2, NON_NEGATIVE)
    ctcvr_weight: float = param(0.2, NON_NEGATIVE)
    tau: float = param(0.01, PROPENSITY_BOUND)
    transfer_layers: int | None = param(None, at_least(1))
    propensity_dim: int = param(5, at_least(1))
    vie_trains_teacher: bool = param(False)
    initial_rho: float = param(5.0)
    min_variance: float = param(1e-3, POSITIVE)
    teacher_labels: TeacherLabels = param(TeacherLabels.LOGGED)

    def __post_init__(self) -> None:
        check_params(self)


class EviObjective(nn.Module):
    """EVI, Eq. 16: ``l_c L_CTR + l_t L_CVR-T + l_r L_CVR + l_i L_VIE + l_g L_CTCVR``.

    An ``nn.Module``: the VIE mean networks and variances are learned with the model. They are
    built for the model's tower widths by :meth:`attach` (``TrainModule`` calls it).

    Args:
        params: the hyper-parameters (``EviParams``).

    Raises:
        ValueError: (in ``attach``) more transfer layers than the towers have.

    Example::

        objective = EviObjective()
        module = TrainModule(build_model(schema, config, structure=objective.model_structure), objective)
        loss, (terms, outputs) = module(batch)
    """

    params_type: ClassVar[type[EviParams]] = EviParams
    required_heads: ClassVar[frozenset[str]] = frozenset({TEACHER})
    detached_heads: ClassVar[frozenset[str]] = frozenset()
    head_l2: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def __init__(self, params: EviParams = EviParams()) -> None:
        super().__init__()
        self.params = params
        self.model_structure = ModelStructure(
            extra_heads=self.required_heads,
            conditioned_heads=self.required_heads,
            propensity_dim=params.propensity_dim,
        )
        self.vie = nn.ModuleList()  # one VariationalInformation per transfer layer, from attach

    def attach(self, model: CtcvrModel) -> None:
        """Build one ``VariationalInformation`` per paired layer, for the model's tower widths.

        Raises:
            ValueError: the towers have no hidden layer, or fewer than ``transfer_layers``.
        """
        widths = self._paired_widths(model.tower_sizes)
        self.vie = nn.ModuleList(
            VariationalInformation(width, self.params.initial_rho, self.params.min_variance)
            for width in widths
        )

    def _paired_widths(self, tower_sizes: Sequence[int]) -> tuple[int, ...]:
        wanted = self.params.transfer_layers
        k = len(tower_sizes) if wanted is None else wanted
        if not tower_sizes or k > len(tower_sizes):
            raise ValueError(
                f"evi: transfer_layers={wanted} needs that many hidden tower layers; "
                f"model.tower_sizes is {list(tower_sizes)}"
            )
        return tuple(tower_sizes[-k:])

    def forward(self, outputs: TaskOutputs, batch: Batch) -> LossOutput:
        if not self.vie:
            raise RuntimeError("evi: attach(model) builds the VIE layers first (TrainModule does)")
        ctr = ctr_loss(outputs, batch)
        ctcvr = ctcvr_loss(outputs, batch)
        teacher = teacher_loss(outputs, batch, self.params.teacher_labels)
        cvr = self._cvr_loss(outputs, batch)
        vie = self._vie_loss(outputs)
        weights = self.params
        total = (
            weights.ctr_weight * ctr
            + weights.teacher_weight * teacher
            + weights.cvr_weight * cvr
            + weights.vie_weight * vie
            + weights.ctcvr_weight * ctcvr
        )
        terms = {"ctr": ctr, "cvr_teacher": teacher, "cvr_evi": cvr, "vie": vie, "ctcvr": ctcvr}
        return LossOutput(total=total, terms=terms)

    def _cvr_loss(self, outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
        """Eq. 15: observed labels on clicked rows, the teacher's pseudo-labels on the others."""
        o = batch.click
        pseudo = pseudo_labels(outputs, self.params.teacher_labels, self.params.tau)
        labels = o * batch.conversion + (1.0 - o) * pseudo
        losses = bce_with_logits(outputs.logits["cvr"], labels)
        half_mean = 2.0 * batch.size  # the 1 / (2 |D|) of both sums
        w_click = 1.0 / (half_mean * propensity(outputs, self.params.tau))
        w_non_click = 1.0 / (half_mean * non_click_propensity(outputs, self.params.tau))
        return entire_space_estimate(losses, o, w_click, w_non_click)

    def _vie_loss(self, outputs: TaskOutputs) -> torch.Tensor:
        """Eq. 11 summed over the last ``K`` teacher/student layer pairs."""
        k = len(self.vie)
        teacher_layers = outputs.features[f"{TEACHER}.layers"][-k:]
        student_layers = outputs.features["cvr.layers"][-k:]
        # Stop-gradient (default): the teacher's representation is the target the student's is
        # fitted to; the teacher is trained by its own loss (Eq. 14).
        pairs = zip(self.vie, teacher_layers, student_layers, strict=True)
        trains_teacher = self.params.vie_trains_teacher
        return sum(vie(t if trains_teacher else t.detach(), s) for vie, t, s in pairs)
