"""Shared estimator pieces of the debiasing objectives: propensities, errors, IPW / DR / BADR risks.

Every objective that corrects the selection bias of post-click CVR training is built from the
same few parts, written once here and imported by ``multi_ipw.py``, ``multi_dr.py``,
``escm2.py`` and ``badr.py``:

- **Propensity** ``p_hat``: the model's pCTR, clipped from below at ``tau`` (``clip_propensity``)
  and, by default, detached (``propensity``); the non-click propensity ``1 - p_hat`` likewise
  (``non_click_propensity``). Where ``p_hat`` comes from (``tau``, the oracle diagnostic) is the
  ``PropensityParams`` group the IPW / DR objectives' hyper-parameters share; an objective keeps
  it and its stop-gradient choice in one ``PropensityWeighting``.
- **Error** ``e = BCE(r, r_hat)``: the CVR tower's cross entropy against the conversion label
  (``prediction_error``); only its values on clicked rows ever enter a loss.
- **Imputed error** ``e_hat``: the imputation head's output mapped to ``[0, inf)``
  (``imputed_error``); its link and whether the head trains the backbone are the
  ``ImputationParams`` group of the DR objectives, held by one ``ImputationHead``.
- **Risks** over one batch, written after their equations: the naive click-space risk, IPW
  (multi-ipw-multi-dr.txt Eq. 4-5), DR (Eq. 8-9; badr.txt Eq. 7), BADR (badr.txt Eq. 13), the
  joint-learning imputation loss (badr.txt Eq. 6 with a squared loss) and BADR's delta-method
  imputation loss (badr.txt Eq. 32/36), and the entire-space risk of the methods that also train
  on unclicked rows (ddpo.txt Eq. 10, evi.txt Eq. 15) with its self-normalised weights
  (ddpo.txt Eq. 15).

The risk functions are plain tensor functions (tensors in, scalar out) that reduce over the last
dimension, so a ``(draws, N)`` stack of click vectors gives one estimate per draw; the
statistical tests use that. Notation: ``o`` click (0/1), ``r`` conversion, ``e`` error,
``e_hat`` imputed error, ``p`` propensity, all of shape ``(..., B)``.

Stop-gradients are chosen where the pieces are assembled (in the objectives and in
``propensity``); the risk functions themselves never detach anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, unique

import torch
import torch.nn.functional as F

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs
from trainer.objectives.functional import bce, bce_with_logits
from trainer.objectives.params import PROPENSITY_BOUND, check_params, param

__all__ = [
    "ImputationHead",
    "ImputationLink",
    "ImputationParams",
    "PropensityParams",
    "PropensityWeighting",
    "WeightScope",
    "badr_batch_influence",
    "badr_estimate",
    "badr_imputation_loss",
    "clip_propensity",
    "ctcvr_loss",
    "ctr_loss",
    "dr_estimate",
    "dr_terms",
    "entire_space_estimate",
    "ideal_loss",
    "imputation_detached_heads",
    "imputed_error",
    "ipw_estimate",
    "joint_learning_imputation_loss",
    "naive_estimate",
    "non_click_propensity",
    "prediction_error",
    "propensity",
    "scoped_propensity",
    "self_normalized_weights",
]


@unique
class ImputationLink(str, Enum):
    """How the imputation head's logit becomes an imputed error ``e_hat >= 0``."""

    SOFTPLUS = "softplus"  # log(1 + exp(z)) in [0, inf): covers every cross-entropy value (default)
    SIGMOID = "sigmoid"  # in (0, 1) as in the ESCM2 reference code; cannot reach errors above 1


# Task losses -----------------------------------------------------------------------------------


def ctr_loss(outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
    """The CTR (propensity) task over the whole impression space: ``mean_D BCE(pCTR, o)``.

    evi.txt Eq. 4; badr.txt Eq. 4 (the propensity model's loss); the auxiliary CTR task of
    Multi-IPW / Multi-DR (multi-ipw-multi-dr.txt Section 3.4).
    """
    return bce_with_logits(outputs.logits["ctr"], batch.click).mean()


def ctcvr_loss(outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
    """ESMM's CTCVR task: ``mean_D BCE(pCTR x pCVR, o & r)`` (evi.txt Eq. 5, ESMM Eq. 3)."""
    # batch.conversion is already o & r: a conversion is only recorded after a click.
    return bce(outputs.pctcvr, batch.conversion).mean()


# Parameter groups -------------------------------------------------------------------------------


@unique
class WeightScope(str, Enum):
    """Which factor of the inverse-propensity weight ``1 / p_hat`` an IPW / DR objective applies
    (``PropensityParams.weight_scope``)."""

    ROW = "row"  # 1 / p_hat_i, as every paper states it (default)
    BETWEEN_GROUPS = "between_groups"  # m_g: the group's mean weight on each of its clicked rows
    WITHIN_GROUPS = "within_groups"  # (1 / p_hat_i) / m_g: each group keeps naive's total weight


@dataclass(frozen=True)
class PropensityParams:
    """Where an IPW / DR objective takes its propensity ``p_hat`` from: the parameter group of
    Multi-IPW, Multi-DR, ESCM2-IPW, ESCM2-DR and BADR (flat in a config: ``objective.params.tau``).

    Attributes:
        tau: the IPW bound, ``p_hat = max(pCTR, tau)``, so each weight ``1 / p_hat`` is at most
            ``1 / tau`` (multi-ipw-multi-dr.txt Section 5.3, "IPW bound"; the BADR code's clip
            to ``[gamma, 1]``; the ESCM2 reference caps weights at 15, ``tau = 1/15``).
            Absolute, and set per data set: the default 0.01 caps weights at 100, four times
            the mean weight of a clicked row at a 4 % CTR.
        oracle_propensity: a diagnostic none of the papers has: weight by the simulator's true
            click probability (``truth.true_ctr``, still clipped at ``tau``) instead of pCTR, to
            show what an estimator does with the propensities its theory assumes
            (multi-ipw-multi-dr.txt Theorems 1-2). Needs ground truth in the training data.
        weight_scope: an ablation none of the papers has (default ``row``: ``1 / p_hat_i``, as
            they state it). With ``m_g`` the mean of ``1 / p_hat`` over the batch's clicked rows
            of group ``g`` (the schema's group column, e.g. the user), every weight factors as
            ``1 / p_hat_i = m_g * (1 / p_hat_i) / m_g``, a weight between groups times one
            within a group. ``between_groups`` applies ``m_g`` alone (users reweighted against
            each other, one user's items alike), ``within_groups`` the other factor alone (one
            user's items reweighted, every user keeping the total weight naive gives its
            clicks). Which factor moves per-user ranking is what ``benchmarks/README.md`` (Coat)
            measures with it. Both need batches holding a group's rows together
            (``data.group_rows``). Every estimator here reads ``p_hat`` only through ``o /
            p_hat``, so the scope is all it changes.

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    tau: float = param(0.01, PROPENSITY_BOUND)
    oracle_propensity: bool = param(False)
    weight_scope: WeightScope = param(WeightScope.ROW)

    def __post_init__(self) -> None:
        check_params(self)


@dataclass(frozen=True)
class ImputationParams:
    """The imputation head of a DR objective: the parameter group of Multi-DR, ESCM2-DR and BADR.

    Attributes:
        imputation_link: how the head's logit becomes ``e_hat >= 0`` (``ImputationLink``). None
            of the papers says how ``e_hat`` is bounded; ``softplus`` (default) reaches every
            cross-entropy value, ``sigmoid`` is the ESCM2 reference code's.
        imputation_trains_backbone: let the imputation loss train the shared embeddings and
            experts too, the papers' fully shared model (multi-ipw-multi-dr.txt Section 3.6,
            badr.txt Section 3.7); off (default), see ``imputation_detached_heads``.

    Raises:
        ParamsError: (on construction) every field of the wrong type or out of its range.
    """

    imputation_link: ImputationLink = param(ImputationLink.SOFTPLUS)
    imputation_trains_backbone: bool = param(False)

    def __post_init__(self) -> None:
        check_params(self)


def imputation_detached_heads(trains_backbone: bool) -> frozenset[str]:
    """An imputation objective's ``detached_heads``: ``{"imputation"}`` unless ``trains_backbone``.

    Detached (default), the imputation loss trains the imputation head's own gate and tower on
    the shared features without reshaping them. Its propensity-weighted squared errors (weights
    up to ``1 / tau`` on cross entropies of several nats on converted clicks) otherwise dominate
    the shared experts' gradient and degrade the CTR tower, i.e. the propensities every DR
    estimator divides by (benchmarks/README.md). The papers share embeddings and experts among
    all towers (multi-ipw-multi-dr.txt Section 3.6, badr.txt Section 3.7); ``trains_backbone``
    restores that.
    """
    return frozenset() if trains_backbone else frozenset({"imputation"})


# Propensity, error, imputed error ---------------------------------------------------------------


def clip_propensity(p: torch.Tensor, tau: float) -> torch.Tensor:
    """``max(p, tau)``: each inverse-propensity weight ``1 / p`` is at most ``1 / tau``.

    This is Multi-IPW's "IPW bound" (multi-ipw-multi-dr.txt Section 5.3) and BADR's clip to
    ``[gamma, 1]``; values above ``tau`` pass unchanged (and keep their gradient).
    """
    return p.clamp(min=tau, max=1.0)


def propensity(
    outputs: TaskOutputs, tau: float, *, grad: bool = False, oracle_batch: Batch | None = None
) -> torch.Tensor:
    """The propensity ``p_hat``: pCTR clipped at ``tau``, detached unless ``grad``.

    Args:
        outputs: the model outputs; the CTR head is the propensity model.
        tau: lower clipping bound, see ``clip_propensity``.
        grad: let the CVR risk's gradient reach the CTR tower through ``1 / p_hat``.
        oracle_batch: the batch, to take the simulator's true click probability
            (``truth.true_ctr``) instead of pCTR, still clipped at ``tau``: the oracle-propensity
            diagnostic, which shows what an estimator does with the propensities its theory
            assumes. Simulated data only.

    Raises:
        ValueError: ``oracle_batch`` has no ground truth.
    """
    if oracle_batch is not None:
        if oracle_batch.truth is None:
            raise ValueError(
                "oracle_propensity needs the ground-truth column true_ctr in the training data "
                "(simulated data only)"
            )
        return clip_propensity(oracle_batch.truth.true_ctr, tau)
    p = outputs.pctr
    if not grad:
        # Stop-gradient (default): the propensity only re-weights the CVR risk. Through 1/p_hat
        # that risk would push pCTR up on every clicked row (and never down elsewhere), a way to
        # shrink the loss that makes the propensities, and so the correction, wrong. The CTR
        # tower then learns from its own CTR loss only (as in the ESCM2 and BADR reference code).
        p = p.detach()
    return clip_propensity(p, tau)


@dataclass(frozen=True)
class PropensityWeighting:
    """An IPW / DR objective's propensity ``p_hat``: pCTR clipped at ``params.tau`` (or with
    ``params.oracle_propensity`` the true click probability), detached unless ``grad``
    (``propensity``).

    Example::

        weighting = PropensityWeighting(PropensityParams(tau=0.02))
        p_hat = weighting(outputs, batch)  # (B,), detached
    """

    params: PropensityParams = field(default_factory=PropensityParams)
    # Let the CVR risk's gradient reach the CTR tower through 1 / p_hat: the objective's choice.
    grad: bool = False

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
        oracle_batch = batch if self.params.oracle_propensity else None
        p_hat = propensity(outputs, self.params.tau, grad=self.grad, oracle_batch=oracle_batch)
        scope = WeightScope(self.params.weight_scope)
        if scope is WeightScope.ROW:
            return p_hat
        if batch.group is None:
            raise ValueError(
                f"objective.params.weight_scope={scope.value!r} weighs clicked rows against "
                "their group's, but the batch has no group ids: the data set's schema names no "
                "group column (schema.yaml `group:`)"
            )
        return scoped_propensity(p_hat, batch.click, batch.group, scope)


def scoped_propensity(
    p_hat: torch.Tensor, click: torch.Tensor, group: torch.Tensor, scope: WeightScope
) -> torch.Tensor:
    """The propensity whose inverse is ``scope``'s factor of ``1 / p_hat`` on clicked rows
    (``PropensityParams.weight_scope``); ``p_hat`` itself on unclicked rows, which every
    estimator multiplies by ``o = 0``.

    Args:
        p_hat: ``(B,)`` clipped propensities.
        click: ``(B,)`` clicks in {0, 1}.
        group: ``(B,)`` group ids.
    """
    if scope is WeightScope.ROW:
        return p_hat
    index = _dense_group_index(group)
    slots = index.numel()  # at least the number of groups, known without reading the device
    weight_sums = p_hat.new_zeros(slots).index_add(0, index, click / p_hat)
    clicks = p_hat.new_zeros(slots).index_add(0, index, click.to(p_hat.dtype))
    group_mean = (weight_sums / clicks.clamp_min(1.0))[index]
    scoped = 1.0 / group_mean if scope is WeightScope.BETWEEN_GROUPS else p_hat * group_mean
    return torch.where(click > 0, scoped, p_hat)


def _dense_group_index(group: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ids 0, 1, ... numbering the distinct values of ``group`` (in sorted order): what
    ``torch.unique(return_inverse=True)`` gives, without its host synchronisation on GPUs."""
    order = torch.argsort(group)
    ordered = group[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


@dataclass(frozen=True)
class ImputationHead:
    """A DR objective's imputation head: how its logit becomes ``e_hat`` and whether its loss
    reshapes the shared backbone (``ImputationParams``)."""

    params: ImputationParams = field(default_factory=ImputationParams)

    @property
    def detached_heads(self) -> frozenset[str]:
        """The objective's ``detached_heads``, read by the model builder."""
        return imputation_detached_heads(self.params.imputation_trains_backbone)

    def errors(self, outputs: TaskOutputs) -> torch.Tensor:
        """``e_hat`` per row (``imputed_error``)."""
        return imputed_error(outputs, self.params.imputation_link)


def non_click_propensity(outputs: TaskOutputs, tau: float) -> torch.Tensor:
    """``1 - p_hat``, the probability of not clicking, clipped at ``tau`` and detached.

    It weights the unclicked rows of an entire-space CVR risk (ddpo.txt Eq. 10, evi.txt Eq. 15)
    as ``p_hat`` weights the clicked ones; detached for the reason given in ``propensity``.
    """
    return clip_propensity(1.0 - outputs.pctr.detach(), tau)


def prediction_error(outputs: TaskOutputs, batch: Batch) -> torch.Tensor:
    """``e = BCE(r, pCVR)`` per row (multi-ipw-multi-dr.txt Eq. 1; badr.txt Eq. 1).

    ``batch.conversion`` is the CVR label on clicked rows; on unclicked rows it is 0 and ``e`` is
    meaningless, so every risk multiplies it by ``o`` before use.
    """
    return bce_with_logits(outputs.logits["cvr"], batch.conversion)


def imputed_error(
    outputs: TaskOutputs, link: ImputationLink | str = ImputationLink.SOFTPLUS
) -> torch.Tensor:
    """``e_hat`` per row from the ``"imputation"`` head (the imputation model ``g_phi``)."""
    logit = outputs.logits["imputation"]
    if ImputationLink(link) is ImputationLink.SIGMOID:
        return torch.sigmoid(logit)
    return F.softplus(logit)


# Risks over a batch (reduce over the last dimension) ---------------------------------------------


def ideal_loss(e: torch.Tensor) -> torch.Tensor:
    """``P = (1/|D|) sum_D e``: the whole-space loss if every conversion label were known
    (multi-ipw-multi-dr.txt Eq. 1; badr.txt Eq. 1)."""
    return e.mean(dim=-1)


def naive_estimate(e: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``(1/|O|) sum_D o e``: the click-space loss (multi-ipw-multi-dr.txt Eq. 2); 0 without
    clicks."""
    return (o * e).sum(dim=-1) / o.sum(dim=-1).clamp(min=1.0)


def ipw_estimate(e: torch.Tensor, o: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``(1/|D|) sum_D o e / p`` (multi-ipw-multi-dr.txt Eq. 4-5; evi.txt Eq. 6; badr.txt Eq. 3)."""
    return (o * e / p).mean(dim=-1)


def dr_terms(
    e: torch.Tensor, e_hat: torch.Tensor, o: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """The summand of the DR risk per row, ``e_hat + o (e - e_hat) / p`` (no reduction)."""
    return e_hat + o * (e - e_hat) / p


def dr_estimate(
    e: torch.Tensor, e_hat: torch.Tensor, o: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """``(1/|D|) sum_D [e_hat + o (e - e_hat) / p]`` (multi-ipw-multi-dr.txt Eq. 8-9; evi.txt
    Eq. 7; badr.txt Eq. 7)."""
    return dr_terms(e, e_hat, o, p).mean(dim=-1)


def self_normalized_weights(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``mask_i (1 / p_i) / sum_j mask_j / p_j``: inverse propensities of the rows in ``mask``,
    normalised to sum to 1 over them (ddpo.txt Eq. 15; self-normalised IPS). All zeros where
    ``mask`` holds no row.

    With ``mask = o, p = p_hat`` they weight the click space; with ``mask = 1 - o`` and
    ``p = 1 - p_hat`` the non-click space.
    """
    w = mask / p
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / _ones_where_zero(total), torch.zeros_like(w))


def entire_space_estimate(
    loss: torch.Tensor, o: torch.Tensor, click_weight: torch.Tensor, non_click_weight: torch.Tensor
) -> torch.Tensor:
    """``sum_D [o w_click + (1 - o) w_non_click] loss``: a CVR risk over both the click and the
    non-click space (ddpo.txt Eq. 10, evi.txt Eq. 15), where ``loss`` is the row's cross
    entropy against its (observed or pseudo) label and the weights carry the normalisation
    (e.g. ``1 / (2 |D| p_hat)``, or ``self_normalized_weights``)."""
    return ((o * click_weight + (1.0 - o) * non_click_weight) * loss).sum(dim=-1)


def badr_batch_influence(o: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``1 / sum_{D(k)} o / p``: the weight BADR gives the batch (badr.txt Eq. 13-14), against DR's
    constant ``1 / |D(k)|`` (Eq. 15). ``inf`` for a batch without clicks."""
    return 1.0 / (o / p).sum(dim=-1)


def badr_estimate(
    e: torch.Tensor, e_hat: torch.Tensor, o: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """``L_BADR-c(k) = sum_{D(k)} [e_hat + o (e - e_hat) / p] / sum_{D(k)} o / p`` (badr.txt
    Eq. 13).

    The DR sum of one batch normalised by the batch's total inverse-propensity weight instead of
    its size. A batch without clicks has no normaliser and returns 0 (it carries no observed
    evidence, so it gets no influence); the gradient graph is kept.
    """
    total = dr_terms(e, e_hat, o, p)
    sum_w = (o / p).sum(dim=-1)
    has_clicks = sum_w > 0
    estimate = total.sum(dim=-1) / _ones_where_zero(sum_w)
    return torch.where(has_clicks, estimate, torch.zeros_like(estimate))


def joint_learning_imputation_loss(
    e: torch.Tensor, e_hat: torch.Tensor, o: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """``(1/|D|) sum_D o (e_hat - e)^2 / p``: the imputation model's loss of DR joint learning
    (Wang et al., ICML 2019; badr.txt Eq. 6 with a squared loss; ESCM2-DR's imputation loss)."""
    return (o * (e_hat - e) ** 2 / p).mean(dim=-1)


def badr_imputation_loss(
    e: torch.Tensor, e_hat: torch.Tensor, o: torch.Tensor, p: torch.Tensor, badr_value: torch.Tensor
) -> torch.Tensor:
    """``L_BADR-e(k) = sum w^2 (e - e_hat + E_hat(k) - L_BADR-c(k))^2 / (sum w)^2`` with
    ``w = o / p`` and ``E_hat(k) = sum e_hat / sum w`` (badr.txt Eq. 32 = Eq. 36, the
    delta-method variance of ``L_BADR-c(k)``).

    Args:
        badr_value: ``L_BADR-c(k)`` of the same batch (from ``badr_estimate``), one per batch.
            The caller decides whether it carries gradient (``BadrObjective`` detaches it).

    A batch without clicks returns 0.
    """
    w = o / p
    sum_w = w.sum(dim=-1)
    safe_sum_w = _ones_where_zero(sum_w).unsqueeze(-1)
    mean_imputed = e_hat.sum(dim=-1, keepdim=True) / safe_sum_w  # E_hat(k)
    residual = o * (e - e_hat) + mean_imputed - badr_value.unsqueeze(-1)
    loss = (w**2 * residual**2).sum(dim=-1) / safe_sum_w.squeeze(-1) ** 2
    return torch.where(sum_w > 0, loss, torch.zeros_like(loss))


def _ones_where_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros replaced by ones: a divisor that keeps values and gradients finite; the
    caller masks the rows it replaced."""
    return torch.where(x > 0, x, torch.ones_like(x))
