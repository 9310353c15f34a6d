import collections
import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import outputs_from_probs, tiny_batch
from trainer.config import load_config
from trainer.data.batch import GroundTruth
from trainer.model import TaskOutputs
from trainer.objectives import build_objective
from trainer.objectives.estimators import _dense_group_index
from trainer.objectives.multi_dr import MultiDrParams, undersample_unclicked
from trainer.objectives.params import ParamsError

# Three impressions: clicked and converted, clicked only, not clicked.
CLICK, CONVERSION = [1, 1, 0], [1, 0, 0]
PCTR, PCVR, E_HAT = [0.5, 0.8, 0.25], [0.5, 0.4, 0.9], [0.3, 0.6, 0.2]
CTR = -(math.log(0.5) + math.log(0.8) + math.log(0.75)) / 3
E1, E2 = -math.log(0.5), -math.log(0.6)  # BCE(r, pCVR) of the two clicked rows


def outputs(pctr=PCTR, pcvr=PCVR, e_hat=E_HAT) -> TaskOutputs:
    """Leaf logits with the given probabilities and, for the imputation head, softplus^-1(e_hat)."""
    logit = lambda ps: torch.tensor([math.log(p / (1 - p)) for p in ps], requires_grad=True)
    imputation = torch.tensor([math.log(math.expm1(v)) for v in e_hat], requires_grad=True)
    return TaskOutputs(logits={"ctr": logit(pctr), "cvr": logit(pcvr), "imputation": imputation})


def test_multi_ipw_by_hand():
    loss = build_objective("multi_ipw", tau=0.02)(outputs(), tiny_batch(CLICK, CONVERSION))
    ipw = (E1 / 0.5 + E2 / 0.8) / 3  # Eq. 5: divided by |D| = 3, the unclicked row adds 0
    assert loss.terms["ctr"].item() == pytest.approx(CTR, rel=1e-6)
    assert loss.terms["cvr_ipw"].item() == pytest.approx(ipw, rel=1e-6)
    assert loss.total.item() == pytest.approx(CTR + ipw, rel=1e-6)


def test_multi_ipw_clips_small_propensities_at_tau():
    loss = build_objective("multi_ipw", tau=0.6, cvr_weight=2.0)(
        outputs(), tiny_batch(CLICK, CONVERSION)
    )
    ipw = (E1 / 0.6 + E2 / 0.8) / 3  # pCTR 0.5 is raised to 0.6; 0.8 is left alone
    assert loss.terms["cvr_ipw"].item() == pytest.approx(ipw, rel=1e-6)
    assert loss.total.item() == pytest.approx(CTR + 2.0 * ipw, rel=1e-6)


# Five impressions of two users (groups 7 and 9): three clicked rows, weights 1 / pCTR 2, 4 (user 7)
# and 5 (user 9); the users' mean weights over their clicked rows are 3 and 5.
CLICKS_BY_USER = [1, 1, 0, 1, 0], [1, 0, 0, 1, 0], [7, 7, 7, 9, 9]  # click, conversion, user
PCTR_BY_USER, PCVR_BY_USER = [0.5, 0.25, 0.1, 0.2, 0.4], [0.5, 0.4, 0.3, 0.8, 0.6]
IMPUTED_BY_USER = [0.3, 0.6, 0.2, 0.5, 0.4]  # the imputation head's sigmoid
E_BY_USER = [-math.log(0.5), -math.log(0.6), -math.log(0.8)]  # BCE(r, pCVR), clicked rows
SCOPE_WEIGHTS = [
    ("row", [2, 4, 5]),  # 1 / pCTR, as the papers state it
    ("between_groups", [3, 3, 5]),  # the user's mean weight on each of its clicked rows
    ("within_groups", [2 / 3, 4 / 3, 1]),  # 1 / pCTR over the user's mean: user 7 keeps 2
]


def _scoped(objective, scope, term):
    click, conversion, user = CLICKS_BY_USER
    batch = replace(tiny_batch(click, conversion), group=torch.tensor(user))
    out = outputs_from_probs(ctr=PCTR_BY_USER, cvr=PCVR_BY_USER, imputation=IMPUTED_BY_USER)
    return build_objective(objective, weight_scope=scope)(out, batch).terms[term].item()


@pytest.mark.parametrize("scope, weights", SCOPE_WEIGHTS)
def test_multi_ipw_weight_scopes_by_hand(scope, weights):
    expected = sum(w * e for w, e in zip(weights, E_BY_USER)) / 5  # Eq. 5 over |D| = 5
    assert _scoped("multi_ipw", scope, "cvr_ipw") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("scope, weights", SCOPE_WEIGHTS)
def test_badr_weight_scopes_by_hand(scope, weights):
    e_hat = [math.log1p(q / (1 - q)) for q in IMPUTED_BY_USER]  # softplus of the logit
    clicked_e_hat = [e_hat[i] for i in (0, 1, 3)]
    corrected = sum(w * (e - h) for w, e, h in zip(weights, E_BY_USER, clicked_e_hat))
    expected = (sum(e_hat) + corrected) / sum(weights)  # badr.txt Eq. 13
    assert _scoped("badr", scope, "cvr_badr") == pytest.approx(expected, rel=1e-6)


def test_groups_are_numbered_as_torch_unique_numbers_them():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 7, 64):
        group = torch.randint(-4, 4, (size,), generator=generator) * 1_000_003  # hashed-like ids
        expected = torch.unique(group, return_inverse=True)[1]
        assert torch.equal(_dense_group_index(group), expected)


def test_a_weight_scope_without_group_ids_names_the_missing_group_column():
    with pytest.raises(ValueError, match=r"weight_scope='within_groups'.*no group column"):
        build_objective("multi_ipw", weight_scope="within_groups")(
            outputs(), tiny_batch(CLICK, CONVERSION)
        )
    with pytest.raises(ParamsError, match="weight_scope"):
        build_objective("multi_ipw", weight_scope="per_item")


def _with_truth(batch, true_ctr):
    n = len(true_ctr)
    batch.truth = GroundTruth(torch.tensor(true_ctr), torch.full((n,), 0.1), torch.zeros(n))
    return batch


@pytest.mark.parametrize("name", ["multi_ipw", "multi_dr", "escm2_ipw", "escm2_dr", "badr"])
def test_oracle_propensity_weights_by_the_true_click_probability(name):
    """The diagnostic swaps pCTR for truth.true_ctr (clipped at tau) and changes nothing else."""
    true_ctr = [0.25, 0.4, 0.9]
    batch = _with_truth(tiny_batch(CLICK, CONVERSION), true_ctr)
    params = {"undersample_rate": None} if name == "multi_dr" else {}
    oracle = build_objective(name, tau=0.3, oracle_propensity=True, **params)(outputs(), batch)
    # The same objective with a CTR head that predicts the clipped true propensities.
    same = build_objective(name, tau=0.3, **params)(outputs(pctr=[0.3, 0.4, 0.9]), batch)
    for term, value in oracle.terms.items():
        if term not in ("ctr", "ctcvr"):  # these still score the model's own pCTR
            assert value.item() == pytest.approx(same.terms[term].item(), rel=1e-6), term
    assert oracle.terms["ctr"].item() == pytest.approx(CTR, rel=1e-6)
    with pytest.raises(
        ValueError, match="oracle_propensity needs the ground-truth column true_ctr"
    ):
        build_objective(name, oracle_propensity=True)(outputs(), tiny_batch(CLICK, CONVERSION))


def test_multi_ipw_cvr_gradient_is_weighted_by_inverse_propensity():
    out = outputs()
    build_objective("multi_ipw")(out, tiny_batch(CLICK, CONVERSION)).terms["cvr_ipw"].backward()
    # d/dlogit BCE = pcvr - r, times 1 / (|D| pCTR).
    expected = [(0.5 - 1) / (3 * 0.5), (0.4 - 0) / (3 * 0.8), 0.0]
    assert out.logits["cvr"].grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_multi_dr_by_hand_without_undersampling():
    loss = build_objective("multi_dr", undersample_rate=None)(
        outputs(), tiny_batch(CLICK, CONVERSION)
    )
    dr = ((0.3 + (E1 - 0.3) / 0.5) + (0.6 + (E2 - 0.6) / 0.8) + 0.2) / 3  # Eq. 9
    imputation = ((0.3 - E1) ** 2 / 0.5 + (0.6 - E2) ** 2 / 0.8) / 3
    assert loss.terms["cvr_dr"].item() == pytest.approx(dr, rel=1e-6)
    assert loss.terms["imputation"].item() == pytest.approx(imputation, rel=1e-6)
    assert loss.total.item() == pytest.approx(CTR + dr + imputation, rel=1e-6)


def test_multi_dr_undersampling_keeps_clicks_and_lambda_times_as_many_rows():
    torch.manual_seed(0)
    click = torch.zeros(100)
    click[[3, 17, 40, 41, 99]] = 1.0
    for rate, kept in ((1.0, 5), (1.5, 8), (3.0, 15), (50.0, 100)):  # round(1.5 * 5) = 8
        mask = undersample_unclicked(click, rate)
        assert mask.sum().item() == kept
        assert (mask[click > 0] == 1).all()
    # The unclicked rows kept are a uniform sample: every one is kept sometimes.
    counts = sum(undersample_unclicked(click, 3.0) for _ in range(400))
    assert (counts[click == 0] > 0).all()


def test_multi_dr_risk_is_the_mean_over_the_clicks_and_a_uniform_sample_of_unclicked_rows():
    """Section 5.3 with lambda = 2 on 2 clicks: Eq. 9 averaged over the 2 clicked rows and 2 of
    the 6 unclicked ones, drawn uniformly. The unclicked rows' imputed errors are distinct
    powers of two, so every pair of them has its own sum, and each loss value names the pair
    it averaged over; the expected values are computed here, not read from the code's mask."""
    click = [1, 0, 0, 0, 1, 0, 0, 0]
    conversion = [1, 0, 0, 0, 0, 0, 0, 0]
    unclicked = [1, 2, 3, 5, 6, 7]
    e_hat = [0.5, 0.01, 0.02, 0.04, 0.7, 0.08, 0.16, 0.32]
    out = outputs(pctr=[0.5] * 8, pcvr=[0.3] * 8, e_hat=e_hat)
    # Eq. 9's summands of the clicked rows, p_hat = 0.5: e_hat + (e - e_hat) / p_hat.
    clicked = (0.5 + (-math.log(0.3) - 0.5) / 0.5) + (0.7 + (-math.log(0.7) - 0.7) / 0.5)
    pair_of = {
        round(e_hat[a] + e_hat[b], 6): (a, b) for a, b in itertools.combinations(unclicked, 2)
    }
    assert len(pair_of) == 15  # every pair has its own sum
    objective = build_objective("multi_dr", undersample_rate=2.0)
    batch = tiny_batch(click, conversion)
    seen = collections.Counter()
    torch.manual_seed(0)
    for _ in range(600):
        value = objective(out, batch).terms["cvr_dr"].item()
        extra = round(4 * value - clicked, 4)  # the two unclicked summands, e_hat each
        match = [pair for total, pair in pair_of.items() if abs(total - extra) < 1e-4]
        assert len(match) == 1, f"{value} is no mean over the clicks and two unclicked rows"
        seen[match[0]] += 1
    # Uniform: each of the 15 pairs has probability 1/15 (40 of 600 draws; 5 sigma is ~30).
    assert set(seen) == set(pair_of.values())
    assert all(10 <= count <= 75 for count in seen.values()), seen


def test_multi_dr_uses_the_whole_batch_by_default_as_every_config_does():
    assert MultiDrParams().undersample_rate is None
    configs = Path(__file__).resolve().parents[2] / "trainer" / "configs"
    multi_dr = [
        config
        for config in sorted(configs.glob("*.yaml"))
        if yaml.safe_load(config.read_text())["objective"]["name"] == "multi_dr"
    ]
    assert len(multi_dr) >= 3
    for config in multi_dr:
        params = load_config(config, ["output_dir=x", "data.train=x"]).objective.params
        assert params["undersample_rate"] is None, config.name
    out = outputs()
    batch = tiny_batch(CLICK, CONVERSION)
    default = build_objective("multi_dr")(out, batch)
    whole = build_objective("multi_dr", undersample_rate=None)(out, batch)
    assert default.terms["cvr_dr"].item() == whole.terms["cvr_dr"].item()


def test_multi_dr_declares_the_imputation_head_and_its_l2():
    objective = build_objective("multi_dr", imputation_l2=0.5)
    assert objective.required_heads == frozenset({"imputation"})
    assert objective.head_l2 == {"imputation": 0.5}
    assert build_objective("multi_dr", imputation_l2=0.0).head_l2 == {}
    assert build_objective("multi_ipw").required_heads == frozenset()


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("multi_ipw", {"tau": 0.0}, r"objective\.params\.tau: must be in \(0, 1\], got 0.0"),
        ("multi_ipw", {"cvr_weight": -1}, r"objective\.params\.cvr_weight: must be >= 0, got -1"),
        ("multi_dr", {"tau": 1.5}, r"objective\.params\.tau: must be in \(0, 1\]"),
        (
            "multi_dr",
            {"undersample_rate": 0.5},
            r"objective\.params\.undersample_rate: must be >= 1 or null, got 0.5",
        ),
        ("multi_dr", {"imputation_l2": -1e-4}, r"objective\.params\.imputation_l2: must be >= 0"),
        (
            "multi_dr",
            {"imputation_link": "exp"},
            r"objective\.params\.imputation_link: must be one of \['softplus', 'sigmoid'\]",
        ),
        ("multi_dr", {"lambda_": 2}, r"objective\.params\.lambda_: unknown parameter"),
    ],
)
def test_bad_hyper_parameters_are_named(name, params, message):
    with pytest.raises(ValueError, match=f"objective '{name}': {message}"):
        build_objective(name, **params)
