"""The shared estimators: hand-computed values, statistical unbiasedness, BADR's boundedness.

The statistical tests draw many click vectors at once, a ``(draws, N)`` matrix ``o ~
Bernoulli(p)`` over a fixed population of ``N`` impressions with fixed conversion labels and
fixed CVR predictions (the setting of multi-ipw-multi-dr.txt Theorems 1-2), and compare the mean
estimate over draws with the ideal whole-space loss. The tolerance is ``Z`` standard errors of
that mean, from the draws' own spread.
"""

import functools
import itertools
import math
import tempfile

import pytest
import torch

from tests.helpers import outputs_from_probs, tiny_batch
from trainer.data.batch import GroundTruth
from trainer.objectives.estimators import (
    ImputationHead,
    ImputationLink,
    ImputationParams,
    PropensityParams,
    PropensityWeighting,
    badr_batch_influence,
    badr_estimate,
    badr_imputation_loss,
    clip_propensity,
    dr_estimate,
    ideal_loss,
    ipw_estimate,
    joint_learning_imputation_loss,
    naive_estimate,
)

Z = 5.0  # standard errors allowed between the mean estimate and the ideal loss
DRAWS, N = 20_000, 400


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Hand-computed values ----------------------------------------------------------------------------

# Four impressions: two clicked. Errors are only meaningful on clicked rows.
O = t([1, 0, 1, 0])
E = t([0.7, 9.9, 0.2, 9.9])  # 9.9: unobservable, must never matter
E_HAT = t([0.5, 0.4, 0.3, 0.1])
P = t([0.5, 0.1, 0.25, 0.8])


def test_propensity_weighting_clips_detaches_and_takes_the_truth_when_asked():
    outputs = outputs_from_probs(ctr=[0.5, 0.004, 0.9])
    batch = tiny_batch([1, 0, 1], [0, 0, 1])
    p_hat = PropensityWeighting(PropensityParams(tau=0.01))(outputs, batch)
    assert p_hat.tolist() == pytest.approx([0.5, 0.01, 0.9])
    assert not p_hat.requires_grad
    assert PropensityWeighting(PropensityParams(tau=0.01), grad=True)(outputs, batch).requires_grad
    batch.truth = GroundTruth(torch.tensor([0.2, 0.001, 0.3]), torch.zeros(3), torch.zeros(3))
    oracle = PropensityWeighting(PropensityParams(tau=0.01, oracle_propensity=True))(outputs, batch)
    assert oracle.tolist() == pytest.approx([0.2, 0.01, 0.3])
    with pytest.raises(
        ValueError, match=r"PropensityParams: objective\.params\.tau: must be in \(0, 1\]"
    ):
        PropensityParams(tau=0.0)


def test_imputation_head_maps_the_logit_and_says_which_heads_to_detach():
    outputs = outputs_from_probs(imputation=[0.5])  # logit 0
    sigmoid = ImputationParams(imputation_link="sigmoid")  # the string is the enum's value
    assert ImputationHead().errors(outputs).item() == pytest.approx(math.log(2.0))
    assert ImputationHead(sigmoid).errors(outputs).item() == pytest.approx(0.5)
    assert sigmoid.imputation_link is ImputationLink.SIGMOID
    assert ImputationHead().detached_heads == frozenset({"imputation"})
    shared = ImputationParams(imputation_trains_backbone=True)
    assert ImputationHead(shared).detached_heads == frozenset()
    with pytest.raises(ValueError, match=r"objective\.params\.imputation_link: must be one of"):
        ImputationParams(imputation_link="relu")


def test_naive_ipw_dr_by_hand():
    assert naive_estimate(E, O).item() == pytest.approx((0.7 + 0.2) / 2)
    assert ipw_estimate(E, O, P).item() == pytest.approx((0.7 / 0.5 + 0.2 / 0.25) / 4)
    dr = (0.5 + (0.7 - 0.5) / 0.5) + 0.4 + (0.3 + (0.2 - 0.3) / 0.25) + 0.1
    assert dr_estimate(E, E_HAT, O, P).item() == pytest.approx(dr / 4)
    imputation = ((0.5 - 0.7) ** 2 / 0.5 + (0.3 - 0.2) ** 2 / 0.25) / 4
    assert joint_learning_imputation_loss(E, E_HAT, O, P).item() == pytest.approx(imputation)
    assert ideal_loss(t([1.0, 2.0, 3.0])).item() == pytest.approx(2.0)


def test_badr_by_hand():
    sum_w = 1 / 0.5 + 1 / 0.25  # 6
    numerator = (0.5 + (0.7 - 0.5) / 0.5) + 0.4 + (0.3 + (0.2 - 0.3) / 0.25) + 0.1
    badr = numerator / sum_w
    assert badr_estimate(E, E_HAT, O, P).item() == pytest.approx(badr)
    assert badr_batch_influence(O, P).item() == pytest.approx(1 / sum_w)
    # Eq. 32: E_hat(k) = sum e_hat / sum w; residuals on the clicked rows only.
    mean_imputed = (0.5 + 0.4 + 0.3 + 0.1) / sum_w
    r1 = 0.7 - 0.5 + mean_imputed - badr
    r3 = 0.2 - 0.3 + mean_imputed - badr
    expected = ((1 / 0.5) ** 2 * r1**2 + (1 / 0.25) ** 2 * r3**2) / sum_w**2
    assert badr_imputation_loss(
        E, E_HAT, O, P, torch.tensor(badr, dtype=torch.float64)
    ).item() == pytest.approx(expected)


def test_badr_without_clicks_is_zero_and_finite():
    o = t([0, 0, 0, 0])
    assert badr_estimate(E, E_HAT, o, P).item() == 0.0
    assert badr_imputation_loss(E, E_HAT, o, P, torch.zeros((), dtype=torch.float64)).item() == 0.0


def test_clip_propensity_is_a_floor():
    assert clip_propensity(t([0.001, 0.05, 0.5]), 0.02).tolist() == pytest.approx([0.02, 0.05, 0.5])


def test_estimators_reduce_over_the_last_dimension():
    stacked = torch.stack([O, 1 - O])
    assert ipw_estimate(E, stacked, P).shape == (2,)
    assert badr_estimate(E, E_HAT, stacked, P).tolist()[0] == pytest.approx(
        badr_estimate(E, E_HAT, O, P).item()
    )


# Statistical unbiasedness ------------------------------------------------------------------------


def _population(seed: int = 0):
    """Impressions whose click and conversion both rise with a shared factor (MNAR)."""
    g = torch.Generator().manual_seed(seed)
    taste = torch.randn(N, generator=g, dtype=torch.float64)
    p = torch.sigmoid(-1.5 + 1.2 * taste)  # true propensity, mean ~0.25, down to ~0.01
    r = (
        torch.rand(N, generator=g, dtype=torch.float64) < torch.sigmoid(-1.0 + 1.5 * taste)
    ).double()
    r_hat = torch.sigmoid(
        -0.8 + 0.4 * taste + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    )
    e = -(r * torch.log(r_hat) + (1 - r) * torch.log1p(-r_hat))  # fixed predictions -> fixed errors
    clicks = (torch.rand(DRAWS, N, generator=g, dtype=torch.float64) < p).double()
    return p, e, clicks


@functools.lru_cache(maxsize=1)
def _simulated_population(rows: int = 3_000, draws: int = 4_000):
    """Impressions of ``trainer.data.simulator`` with its true click probabilities as ``p``; the
    errors are those of a fixed, imperfect CVR prediction against each row's counterfactual
    conversion, and the clicks are redrawn ``draws`` times from the true propensities."""
    import pyarrow.parquet as pq

    from trainer.data.simulator import SimulatorConfig, simulate

    config = SimulatorConfig(
        rows=rows * 5, num_users=5_000, num_items=3_000, calibration_rows=20_000
    )
    with tempfile.TemporaryDirectory() as out:
        simulate(config, out, progress=False)
        table = pq.read_table(
            f"{out}/train", columns=["true_ctr", "true_cvr", "cf_conversion"]
        ).slice(0, rows)
    p, true_cvr, r = (
        torch.from_numpy(table.column(c).to_numpy().astype("float64")) for c in table.column_names
    )
    r_hat = 0.5 * true_cvr + 0.5 * true_cvr.mean()  # fixed predictions, shrunk towards the mean
    e = -(r * torch.log(r_hat) + (1 - r) * torch.log1p(-r_hat))
    clicks = (
        torch.rand(draws, rows, generator=torch.Generator().manual_seed(0), dtype=torch.float64) < p
    ).double()
    return p, e, clicks


POPULATIONS = pytest.mark.parametrize(
    "population", [_population, _simulated_population], ids=["toy", "simulator"]
)


def _mean_and_standard_error(estimates: torch.Tensor) -> tuple[float, float]:
    return estimates.mean().item(), (estimates.std() / math.sqrt(estimates.numel())).item()


@POPULATIONS
def test_ipw_and_dr_recover_the_ideal_loss_and_naive_does_not(population):
    p, e, o = population()
    ideal = ideal_loss(e).item()
    e_hat_wrong = 0.5 * e.mean() + 0.2 * torch.rand(
        len(e), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    ipw_mean, ipw_se = _mean_and_standard_error(ipw_estimate(e, o, p))
    dr_mean, dr_se = _mean_and_standard_error(dr_estimate(e, e_hat_wrong, o, p))
    naive_mean, naive_se = _mean_and_standard_error(naive_estimate(e, o))

    assert abs(ipw_mean - ideal) < Z * ipw_se
    assert abs(dr_mean - ideal) < Z * dr_se  # right propensities, wrong imputed errors
    # The click-space loss is off by far more than its sampling error: it is biased.
    assert abs(naive_mean - ideal) > 20 * Z * naive_se
    assert abs(naive_mean - ideal) > 0.05 * ideal


@POPULATIONS
def test_dr_is_unbiased_with_right_imputed_errors_and_wrong_propensities(population):
    p, e, o = population()
    ideal = ideal_loss(e).item()
    p_wrong = (p * 2.5).clamp(max=0.95)  # clicked rows under-weighted everywhere

    ipw_mean, ipw_se = _mean_and_standard_error(ipw_estimate(e, o, p_wrong))
    dr_mean, dr_se = _mean_and_standard_error(dr_estimate(e, e, o, p_wrong))

    assert abs(ipw_mean - ideal) > 20 * Z * ipw_se  # IPW needs the right propensities...
    assert dr_mean == pytest.approx(ideal, abs=Z * dr_se + 1e-12)  # ...DR needs only one of the two


@POPULATIONS
def test_dr_with_both_wrong_is_biased(population):
    """The double robustness needs one of the two right; the tests above are not vacuous."""
    p, e, o = population()
    ideal = ideal_loss(e).item()
    dr_mean, dr_se = _mean_and_standard_error(
        dr_estimate(e, torch.zeros_like(e), o, (p * 2.5).clamp(max=0.95))
    )
    assert abs(dr_mean - ideal) > 20 * Z * dr_se


def test_badr_is_asymptotically_unbiased_with_right_propensities():
    """Theorem 3.1: with right propensities the bias is O(1/|D(k)|), whatever the imputed errors."""
    p, e, o = _population()
    ideal = ideal_loss(e).item()
    naive_bias = abs(naive_estimate(e, o).mean().item() - ideal)
    e_hat_wrong = torch.full_like(e, 0.3)

    badr_mean, badr_se = _mean_and_standard_error(badr_estimate(e, e_hat_wrong, o, p))
    # The ratio estimator's second-order bias (Eq. 20) for a batch of N rows, bounded generously.
    second_order = (1.0 / p).mean().item() / N * (e - e_hat_wrong).abs().max().item()
    assert abs(badr_mean - ideal) < Z * badr_se + second_order
    assert abs(badr_mean - ideal) < 0.2 * naive_bias


def test_badr_with_right_imputed_errors_is_the_ideal_loss_up_to_a_batch_scale():
    """The Remark after Corollary 3.2: with right imputed errors (``e_hat = e``) and wrong
    propensities, every correction term ``o (e - e_hat) / p_hat`` vanishes, so a batch's BADR
    value is ``sum_D e / sum_D o / p_hat``: the ideal loss ``mean_D e`` times
    ``|D(k)| / sum_D o / p_hat``, a scale that varies from batch to batch. The expectation is
    summed here by hand, row by row, from the population's own arrays."""
    p, e, o = _population()
    p_wrong = (p * 2.5).clamp(max=0.95)
    badr = badr_estimate(e, e, o, p_wrong)
    dr = dr_estimate(e, e, o, p_wrong)
    errors, propensities, clicks = e.tolist(), p_wrong.tolist(), o.tolist()
    ideal = math.fsum(errors) / len(errors)
    scales = []
    for draw in range(0, DRAWS, 401):  # a spread of draws, each summed by hand
        weight = math.fsum(1.0 / q for q, c in zip(propensities, clicks[draw]) if c == 1.0)
        scales.append(len(errors) / weight)
        assert badr[draw].item() == pytest.approx(math.fsum(errors) / weight, rel=1e-12)
        assert dr[draw].item() == pytest.approx(ideal, rel=1e-12)  # DR: the ideal loss itself
    # Not the ideal loss itself: p_wrong over-estimates clicks, so the scale is above 1 and moves.
    assert min(scales) > 1.5 and max(scales) - min(scales) > 0.1


# BADR against DR under tiny propensities (badr.txt Eq. 14, Corollary 3.1) ------------------------


def test_batch_with_a_tiny_propensity_gets_less_influence_than_under_dr():
    batch = 8
    o = t([1, 0, 1, 0, 0, 0, 0, 0])
    tiny = t([1e-4, 0.3, 0.4, 0.2, 0.1, 0.3, 0.2, 0.3])  # one clicked row with p < 1 / |D(k)|
    large = t([0.6, 0.3, 0.5, 0.2, 0.1, 0.3, 0.2, 0.3])  # every clicked p > |D_o| / |D| = 0.25
    assert badr_batch_influence(o, tiny).item() < 1 / batch < badr_batch_influence(o, large).item()

    # The same holds for the gradient the batch sends to the CVR predictions: BADR's is DR's
    # times |D(k)| / sum o / p, below 1 for the tiny-propensity batch.
    r = t([1, 0, 0, 0, 0, 0, 0, 0])
    e_hat = torch.full((batch,), 0.3, dtype=torch.float64)
    grads = {}
    for name, estimator in (("dr", dr_estimate), ("badr", badr_estimate)):
        logit = torch.zeros(batch, dtype=torch.float64, requires_grad=True)
        e = torch.nn.functional.binary_cross_entropy_with_logits(logit, r, reduction="none")
        estimator(e, e_hat, o, tiny).backward()
        grads[name] = logit.grad
    ratio = grads["badr"].norm() / grads["dr"].norm()
    assert ratio.item() == pytest.approx(batch * badr_batch_influence(o, tiny).item())
    assert ratio.item() < 1e-2


def test_badr_stays_bounded_as_a_propensity_goes_to_zero():
    o = t([1, 0, 1, 0, 0, 0])
    e = t([0.9, 0.0, 0.4, 0.0, 0.0, 0.0])
    e_hat = t([0.2, 0.5, 0.6, 0.3, 0.1, 0.4])
    bound = (o * (e - e_hat)).abs().max().item() + e_hat.sum().item()  # sum w >= 1 with a click
    dr_values, badr_values = [], []
    for exponent in range(1, 13):
        p = t([10.0**-exponent, 0.5, 0.3, 0.5, 0.5, 0.5])
        dr_values.append(dr_estimate(e, e_hat, o, p).item())
        badr_values.append(badr_estimate(e, e_hat, o, p).item())
    assert all(abs(v) <= bound for v in badr_values)
    assert badr_values[-1] == pytest.approx(0.9 - 0.2, rel=1e-6)  # -> e - e_hat of the tiny row
    # DR grows like 1 / p: ten times larger per decade.
    assert dr_values[-1] > 1e10
    assert all(b > 9 * a for a, b in itertools.pairwise(dr_values[2:]))
