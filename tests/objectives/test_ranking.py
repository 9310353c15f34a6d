"""The within-user pairwise ranking term (trainer/objectives/ranking.py), by hand."""

import math
from dataclasses import replace

import pytest
import torch

from tests.helpers import outputs_from_probs, tiny_batch
from trainer.objectives import ParamsError, build_objective
from trainer.objectives.ranking import pairwise_loss


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Five rows: users 7, 7, 7, 8, 8. Row 3 is not clicked, so user 8 has no clicked pair.
LOGIT = [2.0, 0.5, 3.0, 1.0, -1.0]
CLICK = [1, 1, 1, 0, 1]
CONVERSION = [1, 0, 0, 0, 0]
GROUP = [7, 7, 7, 8, 8]


def _pairwise(logit=LOGIT, click=CLICK, conversion=CONVERSION, group=GROUP, grad=False):
    logit = torch.tensor(logit, requires_grad=grad)
    loss = pairwise_loss(
        logit,
        torch.tensor(conversion, dtype=torch.float32),
        torch.tensor(click, dtype=torch.float32),
        torch.tensor(group),
    )
    return loss, logit


def test_mean_over_one_users_converted_vs_unconverted_clicked_pairs():
    # User 7: row 0 converted, rows 1 and 2 did not: pairs (0, 1) and (0, 2).
    # -ln sigma(s_i - s_j) = ln(1 + exp(s_j - s_i)).
    expected = (_softplus(0.5 - 2.0) + _softplus(3.0 - 2.0)) / 2
    loss, _ = _pairwise()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairs_never_cross_users_nor_include_unclicked_rows():
    # Row 3 (user 8, unclicked) converted would pair with row 4 if clicks were ignored; row 0
    # (user 7) converted and row 4 (user 8) did not: a cross-user pair, never counted.
    loss, _ = _pairwise(conversion=[1, 0, 0, 1, 0], click=[1, 0, 0, 0, 1])
    assert loss.item() == 0.0
    # Now both of user 8's rows are clicked: the pair (3, 4) alone.
    loss, _ = _pairwise(conversion=[1, 0, 0, 1, 0], click=[1, 0, 0, 1, 1])
    assert loss.item() == pytest.approx(_softplus(-1.0 - 1.0), rel=1e-6)


def test_gradient_raises_the_converted_item_and_lowers_the_others():
    loss, logit = _pairwise(grad=True)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))
    # d/ds_j softplus(s_j - s_i) = sigma(s_j - s_i), averaged over the 2 pairs.
    g1, g2 = sig(0.5 - 2.0) / 2, sig(3.0 - 2.0) / 2
    assert logit.grad.tolist() == pytest.approx([-(g1 + g2), g1, g2, 0.0, 0.0], rel=1e-6)


def test_no_pair_gives_zero_and_keeps_the_graph():
    loss, logit = _pairwise(conversion=[0, 0, 0, 0, 0], grad=True)
    assert loss.item() == 0.0
    loss.backward()
    assert logit.grad.tolist() == [0.0] * 5


def _batch_with_groups(group):
    batch = tiny_batch(CLICK, CONVERSION)
    return replace(batch, group=None if group is None else torch.tensor(group))


def _outputs():
    prob = lambda s: 1 / (1 + math.exp(-s))
    return outputs_from_probs(ctr=[0.5] * 5, cvr=[prob(s) for s in LOGIT], imputation=[0.3] * 5)


@pytest.mark.parametrize("name", ["naive", "badr"])
def test_objectives_add_the_weighted_term(name):
    batch = _batch_with_groups(GROUP)
    plain = build_objective(name)(_outputs(), batch)
    ranked = build_objective(name, pairwise_weight=0.5)(_outputs(), batch)
    expected = (_softplus(0.5 - 2.0) + _softplus(3.0 - 2.0)) / 2
    assert "cvr_pairwise" not in plain.terms
    assert ranked.terms["cvr_pairwise"].item() == pytest.approx(expected, rel=1e-5)
    assert ranked.total.item() == pytest.approx(plain.total.item() + 0.5 * expected, rel=1e-5)


def test_a_positive_weight_without_group_ids_names_the_missing_group_column():
    with pytest.raises(ValueError, match=r"pairwise_weight.*no group column"):
        build_objective("naive", pairwise_weight=1.0)(_outputs(), _batch_with_groups(None))
    # Weight 0 never needs them.
    build_objective("naive")(_outputs(), _batch_with_groups(None))


def test_a_negative_weight_is_refused_by_key():
    with pytest.raises(ParamsError, match=r"objective\.params\.pairwise_weight: must be >= 0"):
        build_objective("badr", pairwise_weight=-1.0)


def test_matches_a_loop_over_every_pair_on_a_random_batch():
    generator = torch.Generator().manual_seed(0)
    n = 300
    logit = torch.randn(n, generator=generator)
    label = (torch.rand(n, generator=generator) < 0.3).float()
    mask = (torch.rand(n, generator=generator) < 0.7).float()
    group = torch.randint(0, 25, (n,), generator=generator)
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(n):
            if mask[i] and mask[j] and group[i] == group[j] and label[i] == 1 and label[j] == 0:
                total += _softplus(float(logit[j] - logit[i]))
                pairs += 1
    assert pairs > 100
    assert pairwise_loss(logit, label, mask, group).item() == pytest.approx(total / pairs, rel=1e-5)
