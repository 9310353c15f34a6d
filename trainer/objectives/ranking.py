"""A within-user pairwise ranking term an objective may add to its pointwise CVR loss.

The objectives fit pCVR row by row; the papers evaluate it per user as well (NDCG@K and
Recall@K of each user's items ranked by pCVR: badr.txt Section 4.1, adap-sl.txt Section 5.2).
A pointwise loss spends its capacity on what separates users (who converts at all), a
pairwise one on the order of one user's items. This is BPR's criterion (Rendle et al., "BPR:
Bayesian Personalized Ranking from Implicit Feedback", UAI 2009, Section 4.1, BPR-Opt:
``sum over (u, i, j) of ln sigma(x_ui - x_uj)``), with pCVR's logit as the score ``x`` and the
observed conversion as the preference, over the pairs of one batch:

    L_pair = (1 / |P|) sum_{(i, j) in P} -ln sigma(s_i - s_j),
    P = {(i, j) : g_i = g_j, o_i = o_j = 1, r_i = 1, r_j = 0}

``s`` the CVR logits, ``g`` the group ids (``Batch.group``, the schema's group column: the
user), ``o`` clicks and ``r`` conversions. Two departures from BPR-Opt, both deliberate: the
mean over pairs instead of the sum (the term's scale does not move with how many pairs a
batch holds; BPR's prior ``lambda ||theta||^2`` is the optimizers' weight decay), and pairs
among clicked rows only, unweighted: it ranks the clicked items of a user the way the
pointwise CVR loss fits them, in the click space, so an objective's debiasing weights do not
reach it.

Pairs must come from one batch: random batches of a large log rarely hold two clicked items of
one user, so a run that uses the term reads its rows grouped by user (``data.group_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs
from trainer.objectives.base import LossOutput
from trainer.objectives.params import NON_NEGATIVE, check_params, param

__all__ = ["RankingParams", "pairwise_loss", "with_pairwise_term"]


@dataclass(frozen=True)
class RankingParams:
    """The pairwise ranking term's parameter group (flat in a config:
    ``objective.params.pairwise_weight``).

    Attributes:
        pairwise_weight: weight of ``L_pair`` (module docstring) added to the objective's loss;
            0 (default) leaves the objective as its paper states it.

    Raises:
        ParamsError: (on construction) a field of the wrong type or out of its range.
    """

    pairwise_weight: float = param(0.0, NON_NEGATIVE)

    def __post_init__(self) -> None:
        check_params(self)


def pairwise_loss(
    logit: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """``L_pair`` over the rows where ``mask`` is 1: the mean of ``softplus(s_j - s_i)``
    (``= -ln sigma(s_i - s_j)``) over every pair of such rows of one group with ``label_i = 1``
    and ``label_j = 0``; 0, with the graph kept, when the batch holds no such pair.

    Args:
        logit: ``(B,)`` scores.
        label: ``(B,)`` labels in {0, 1}.
        mask: ``(B,)`` 1 for the rows that take part (clicked rows), else 0.
        group: ``(B,)`` group ids.
    """
    rows = mask > 0
    score, preferred, owner = logit[rows], label[rows] > 0.5, group[rows]
    winner, loser = _same_group_pairs(owner, preferred)
    if winner.numel() == 0:
        return score.sum() * 0.0
    return F.softplus(score[loser] - score[winner]).mean()


def _same_group_pairs(
    owner: torch.Tensor, preferred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(i, j)`` with ``owner[i] == owner[j]``, ``preferred[i]`` and not
    ``preferred[j]``, as two index tensors. Memory is linear in the number of pairs (a
    ``B x B`` mask would hold 2^28 entries at a batch of 16k clicked rows)."""
    positives = preferred.nonzero().squeeze(1)
    negatives = (~preferred).nonzero().squeeze(1)
    negative_owner, by_owner = torch.sort(owner[negatives])
    negatives = negatives[by_owner]
    first = torch.searchsorted(negative_owner, owner[positives])
    count = torch.searchsorted(negative_owner, owner[positives], right=True) - first
    block_start = torch.cumsum(count, 0) - count
    within = torch.arange(int(count.sum()), device=owner.device)
    within = within - block_start.repeat_interleave(count)
    winner = positives.repeat_interleave(count)
    loser = negatives[first.repeat_interleave(count) + within]
    return winner, loser


def with_pairwise_term(
    loss: LossOutput, ranking: RankingParams, outputs: TaskOutputs, batch: Batch
) -> LossOutput:
    """``loss`` plus ``pairwise_weight * L_pair`` of the CVR logits on the clicked rows (the
    term named ``cvr_pairwise``); ``loss`` itself when the weight is 0.

    Raises:
        ValueError: a positive weight and a batch without group ids (the schema names no
            group column).
    """
    if ranking.pairwise_weight == 0.0:
        return loss
    if batch.group is None:
        raise ValueError(
            "objective.params.pairwise_weight > 0 ranks the clicked items of one user against "
            "each other, but the batch has no group ids: the data set's schema names no group "
            "column (schema.yaml `group:`)"
        )
    term = pairwise_loss(outputs.logits["cvr"], batch.conversion, batch.click, batch.group)
    return LossOutput(
        total=loss.total + ranking.pairwise_weight * term,
        terms={**loss.terms, "cvr_pairwise": term},
    )
