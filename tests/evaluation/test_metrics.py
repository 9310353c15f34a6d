"""compute_metrics / ranking_metrics against numbers counted by hand on tiny arrays.

AUCs are counted as (concordant pairs + ties / 2) / (positives * negatives); each test
spells the pairs out in a comment so a reader can redo the count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from trainer.evaluation import compute_metrics, ranking_metrics

NAN_KEYS_NO_CLICKS = (
    "ctr_auc",
    "ctr_calibration",
    "cvr_auc",
    "cvr_logloss",
    "cvr_calibration",
    "ctcvr_auc",
    "ctcvr_calibration",
    "cvr_ips_estimate",
)


def _ll(*terms: float) -> float:
    """Mean of -log(p_true_class) over the listed probabilities of the true class."""
    return -sum(math.log(t) for t in terms) / len(terms)


# Five impressions; rows 3 and 4 are not clicked.
PCTR = [0.9, 0.4, 0.6, 0.2, 0.5]
PCVR = [0.3, 0.5, 0.1, 0.9, 0.95]
CLICK = [1, 1, 1, 0, 0]
CONV = [1, 0, 0, 0, 0]
TRUE_CVR = [0.4, 0.3, 0.2, 0.5, 0.1]
CF_CONV = [1, 0, 0, 1, 0]


@pytest.fixture
def five() -> dict[str, float]:
    return compute_metrics(PCTR, PCVR, CLICK, CONV)


def test_ctr_metrics_over_all_impressions(five: dict[str, float]) -> None:
    # positives {0.9, 0.4, 0.6}, negatives {0.2, 0.5}:
    # 0.9 beats both (2), 0.4 beats 0.2 only (1), 0.6 beats both (2) -> 5 / 6
    assert five["ctr_auc"] == pytest.approx(5 / 6)
    assert five["ctr_logloss"] == pytest.approx(_ll(0.9, 0.4, 0.6, 0.8, 0.5))
    # mean pctr 2.6 / 5 = 0.52, mean click 3 / 5 = 0.6
    assert five["ctr_calibration"] == pytest.approx(0.52 / 0.6)


def test_cvr_metrics_use_clicked_rows_only(five: dict[str, float]) -> None:
    # clicked rows 0..2: positive {0.3}, negatives {0.5, 0.1} -> 1 / 2.
    # (With the unclicked 0.9 and 0.95 as negatives it would be 1 / 4.)
    assert five["cvr_auc"] == pytest.approx(0.5)
    assert five["cvr_logloss"] == pytest.approx(_ll(0.3, 0.5, 0.9))
    # mean pcvr over clicks 0.9 / 3 = 0.3, conversion rate 1 / 3
    assert five["cvr_calibration"] == pytest.approx(0.9)


def test_ctcvr_metrics_use_product_over_all_impressions(five: dict[str, float]) -> None:
    # pctcvr = [0.27, 0.20, 0.06, 0.18, 0.475]; positive {0.27} beats 0.20, 0.06, 0.18
    # and loses to 0.475 -> 3 / 4
    assert five["ctcvr_auc"] == pytest.approx(0.75)
    assert five["ctcvr_logloss"] == pytest.approx(_ll(0.27, 0.8, 0.94, 0.82, 0.525))
    # mean pctcvr 1.185 / 5 = 0.237, mean conversion 0.2
    assert five["ctcvr_calibration"] == pytest.approx(1.185)


def test_counts_and_absent_optional_keys(five: dict[str, float]) -> None:
    assert (five["impressions"], five["clicks"], five["conversions"]) == (5.0, 3.0, 1.0)
    assert not any(k.endswith("_gauc") for k in five)
    assert "cvr_bias" not in five and "cvr_auc_whole_space" not in five


def test_ground_truth_metrics_from_mapping() -> None:
    m = compute_metrics(
        PCTR, PCVR, CLICK, CONV, truth={"true_cvr": TRUE_CVR, "cf_conversion": CF_CONV}
    )
    # cf positives {0.3, 0.9}, negatives {0.5, 0.1, 0.95}:
    # 0.3 beats 0.1 (1), 0.9 beats 0.5 and 0.1 (2) -> 3 / 6
    assert m["cvr_auc_whole_space"] == pytest.approx(0.5)
    assert m["cvr_logloss_whole_space"] == pytest.approx(_ll(0.3, 0.5, 0.9, 0.9, 0.05))
    # mean pcvr 2.75 / 5 = 0.55, mean true cvr 1.5 / 5 = 0.3
    assert m["pcvr_mean"] == pytest.approx(0.55)
    assert m["true_cvr_mean"] == pytest.approx(0.3)
    assert m["cvr_bias"] == pytest.approx(0.25)
    assert m["cvr_ips_bias"] == pytest.approx(4 / 19 - 0.3)


def test_ips_estimate_weights_clicks_by_inverse_pctr(five: dict[str, float]) -> None:
    # clicks at pctr 0.9 (converted), 0.4, 0.6: (1/0.9) / (1/0.9 + 1/0.4 + 1/0.6) = 20/95
    assert five["cvr_ips_estimate"] == pytest.approx(4 / 19)
    assert "cvr_ips_bias" not in five


def test_ips_estimate_recovers_the_whole_space_mean_under_known_propensities() -> None:
    # Every impression converts with probability 0.5 if clicked; clicks are drawn at propensity
    # 0.1 on half the rows and 0.9 on the other half, and the rarely clicked half converts less.
    rng = np.random.default_rng(0)
    n = 200_000
    propensity = np.where(np.arange(n) < n // 2, 0.1, 0.9)
    true_cvr = np.where(propensity < 0.5, 0.05, 0.25)  # whole-space mean 0.15
    click = rng.random(n) < propensity
    conversion = click & (rng.random(n) < true_cvr)
    m = compute_metrics(propensity, true_cvr, click.astype(int), conversion.astype(int))
    assert conversion[click].mean() > 0.22  # the clicked rows alone say ~0.23
    assert m["cvr_ips_estimate"] == pytest.approx(0.15, abs=0.005)


def test_ground_truth_from_attribute_container() -> None:
    @dataclass
    class Truth:
        true_cvr: np.ndarray
        cf_conversion: np.ndarray
        true_ctr: np.ndarray  # extra fields are ignored

    truth = Truth(np.array(TRUE_CVR), np.array(CF_CONV, dtype=np.float32), np.zeros(5))
    m = compute_metrics(PCTR, PCVR, CLICK, CONV, truth=truth)
    assert m["cvr_bias"] == pytest.approx(0.25)


def test_auc_counts_ties_as_half() -> None:
    # positives {0.5, 0.4}, negatives {0.5, 0.2}:
    # 0.5~0.5 tie (0.5), 0.5>0.2 (1), 0.4<0.5 (0), 0.4>0.2 (1) -> 2.5 / 4
    m = compute_metrics([0.5, 0.4, 0.5, 0.2], [0.1] * 4, [1, 1, 0, 0], [0] * 4)
    assert m["ctr_auc"] == pytest.approx(0.625)


def test_log_loss_clips_to_1e7() -> None:
    # both rows maximally wrong: each costs -log(1e-7) = 7 ln 10
    m = compute_metrics([0.0, 1.0], [0.5, 0.5], [1, 0], [0, 0])
    assert m["ctr_logloss"] == pytest.approx(7 * math.log(10))
    # both rows exactly right: each costs -log(1 - 1e-7) ~ 1e-7, not 0
    m = compute_metrics([1.0, 0.0], [0.5, 0.5], [1, 0], [0, 0])
    assert m["ctr_logloss"] == pytest.approx(1e-7, rel=1e-3)


def test_log_loss_matches_sklearn_on_clipped_predictions() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500) ** 3
    y = (rng.uniform(0, 1, 500) < 0.3).astype(float)
    m = compute_metrics(p, np.full(500, 0.5), y, np.zeros(500))
    assert m["ctr_logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-9)


# ---- GAUC ----------------------------------------------------------------------------------


def test_ctr_gauc_weights_by_impressions_and_skips_single_class_groups() -> None:
    # group a: positive {0.9}, negatives {0.3, 0.5} -> AUC 1, 3 rows
    # group b: positives {0.2, 0.6}, negatives {0.7, 0.4}: only 0.6>0.4 -> AUC 1/4, 4 rows
    # group c: no click -> skipped (it would add 2 to the denominator)
    # GAUC = (3 * 1 + 4 * 1/4) / (3 + 4) = 4 / 7
    rows = [  # (group, pctr, click), groups interleaved on purpose
        ("b", 0.2, 1), ("a", 0.9, 1), ("c", 0.1, 0), ("b", 0.6, 1), ("a", 0.3, 0),
        ("b", 0.7, 0), ("c", 0.8, 0), ("a", 0.5, 0), ("b", 0.4, 0),
    ]  # fmt: skip
    group, pctr, click = (list(col) for col in zip(*rows))
    n = len(rows)
    m = compute_metrics(pctr, [0.5] * n, click, [0] * n, group=group)
    assert m["ctr_gauc"] == pytest.approx(4 / 7)
    assert math.isnan(m["ctcvr_gauc"])  # no conversions anywhere
    assert math.isnan(m["cvr_gauc"])


def test_cvr_gauc_on_clicked_rows_and_ctcvr_gauc_over_all() -> None:
    # (group, click, conversion, pcvr); pctr is 0.5 everywhere so pctcvr = pcvr / 2
    rows = [
        ("a", 1, 1, 0.4), ("a", 1, 0, 0.6), ("a", 0, 0, 0.1),
        ("b", 1, 1, 0.7), ("b", 1, 0, 0.2), ("b", 1, 0, 0.3),
        ("c", 1, 0, 0.5),
    ]  # fmt: skip
    group, click, conv, pcvr = (list(col) for col in zip(*rows))
    m = compute_metrics([0.5] * 7, pcvr, click, conv, group=np.array(group))
    # clicked rows: a = {pos 0.4, neg 0.6} -> 0 on 2 rows; b = {pos 0.7, negs 0.2, 0.3} -> 1
    # on 3 rows; c has no conversion -> skipped. (2 * 0 + 3 * 1) / 5 = 0.6
    # (counting a's unclicked row would give a 1/2 on 3 rows and 0.75 overall)
    assert m["cvr_gauc"] == pytest.approx(0.6)
    # all rows: a = {pos 0.2, negs 0.3, 0.05} -> 1/2 on 3 rows; b -> 1 on 3 rows; c skipped
    assert m["ctcvr_gauc"] == pytest.approx((3 * 0.5 + 3 * 1) / 6)
    # clicks: a = all pctr tied -> 1/2 on 3 rows; b and c are all clicked -> skipped
    assert m["ctr_gauc"] == pytest.approx(0.5)


def test_gauc_matches_per_group_sklearn_loop_with_ties() -> None:
    rng = np.random.default_rng(1)
    n = 3_000
    group = rng.integers(0, 200, n)
    pctr = np.round(rng.uniform(0, 1, n), 1)  # one decimal: many ties inside groups
    click = (rng.uniform(0, 1, n) < pctr * 0.5 + 0.2).astype(float)
    m = compute_metrics(pctr, np.full(n, 0.5), click, np.zeros(n), group=group)
    num = den = 0.0
    for g in np.unique(group):
        rows = group == g
        if 0 < click[rows].sum() < rows.sum():
            num += rows.sum() * roc_auc_score(click[rows], pctr[rows])
            den += rows.sum()
    assert m["ctr_gauc"] == pytest.approx(num / den, rel=1e-12)
    assert m["ctr_auc"] == pytest.approx(roc_auc_score(click, pctr), rel=1e-12)


# ---- undefined metrics ---------------------------------------------------------------------


def test_no_clicks_gives_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0, 0, 0], [0, 0, 0], group=[1, 1, 2])
    for key in (*NAN_KEYS_NO_CLICKS, "ctr_gauc", "cvr_gauc", "ctcvr_gauc"):
        assert math.isnan(m[key]), key
    assert m["ctr_logloss"] == pytest.approx(_ll(0.9, 0.8, 0.7))
    assert m["clicks"] == 0.0


def test_clicks_without_conversions_gives_nan_cvr_auc_and_calibration() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([0.5, 0.5], [0.2, 0.4], [1, 1], [0, 0])
    assert math.isnan(m["cvr_auc"]) and math.isnan(m["cvr_calibration"])
    assert m["cvr_logloss"] == pytest.approx(_ll(0.8, 0.6))


def test_empty_input_is_all_nan_and_zero_counts() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([], [], [], [], group=[], truth={"true_cvr": [], "cf_conversion": []})
    counts = {"impressions", "clicks", "conversions"}
    assert all(m[k] == 0.0 for k in counts)
    assert all(math.isnan(v) for k, v in m.items() if k not in counts)


# ---- bad input -----------------------------------------------------------------------------

GOOD = {
    "pctr": [0.1, 0.2, 0.3],
    "pcvr": [0.4, 0.5, 0.6],
    "click": [1, 0, 1],
    "conversion": [1, 0, 0],
}


def _with(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_with(pcvr=[0.4, 0.5]), r"pcvr has length 2, expected 3"),
        (_with(click=[1, 0, 1, 0]), r"click has length 4, expected 3"),
        (_with(pctr=[[0.1, 0.2, 0.3]]), r"pctr must be 1-D .* shape \(1, 3\)"),
        (_with(pctr=["a", "b", "c"]), r"pctr must be numeric"),
        (_with(pctr=[0.1, 0.2, float("nan")]), r"pctr\[2\] is NaN"),
        (_with(pcvr=[0.4, 1.5, 0.6]), r"pcvr\[1\] is 1\.5, outside \[0, 1\]"),
        (_with(pctr=[-0.1, 0.2, 0.3]), r"pctr\[0\] is -0\.1, outside \[0, 1\]"),
        (_with(pcvr=[0.4, 0.5, float("inf")]), r"pcvr\[2\] is inf, outside \[0, 1\]"),
        (_with(click=[1, 2, 1]), r"click\[1\] is 2\.0; a label must be 0 or 1"),
        (_with(conversion=[0.5, 0, 0]), r"conversion\[0\] is 0\.5; a label must be 0 or 1"),
        (_with(conversion=[1, 1, 0]), r"conversion\[1\] is 1 but click\[1\] is 0"),
    ],
)
def test_bad_arrays_name_array_and_index(args: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("group", "truth", "message"),
    [
        ([1, 2], None, r"group has length 2, expected 3"),
        ([1.0, float("nan"), 2.0], None, r"group\[1\] is nan"),
        (None, {"true_cvr": [0.1, 0.2, 0.3]}, r"truth has no key 'cf_conversion'"),
        (None, object(), r"truth \(object\) has no attribute 'true_cvr'"),
        (None, {"true_cvr": [0.1, 1.2, 0.3], "cf_conversion": [0, 0, 1]},
         r"truth\.true_cvr\[1\] is 1\.2"),
        (None, {"true_cvr": [0.1, 0.2, 0.3], "cf_conversion": [0, 0.3, 1]},
         r"truth\.cf_conversion\[1\] is 0\.3"),
        (None, {"true_cvr": [0.1, 0.2], "cf_conversion": [0, 0, 1]},
         r"truth\.true_cvr has length 2, expected 3"),
    ],
)  # fmt: skip
def test_bad_group_or_truth_is_named(group: object, truth: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(**GOOD, group=group, truth=truth)  # type: ignore[arg-type]


# ---- ranking metrics -----------------------------------------------------------------------

# (user, score, label), users interleaved on purpose.
RANKING_ROWS = [
    ("u1", 0.9, 0), ("u2", 0.2, 1), ("u1", 0.8, 1), ("u3", 0.3, 0), ("u2", 0.5, 0),
    ("u1", 0.7, 0), ("u4", 0.55, 1), ("u2", 0.4, 0), ("u1", 0.6, 1), ("u3", 0.1, 0),
]  # fmt: skip


def _ranking(k: int) -> dict[str, float]:
    users, scores, labels = (list(col) for col in zip(*RANKING_ROWS))
    return ranking_metrics(scores, labels, users, k=k)


def test_ranking_metrics_by_hand_at_2() -> None:
    m = _ranking(2)
    # u1 ranks 0.9(0) 0.8(1) | 0.7(0) 0.6(1): DCG = 1/log2(3), IDCG = 1 + 1/log2(3), recall 1/2
    # u2 ranks 0.5(0) 0.4(0) | 0.2(1): NDCG 0, recall 0
    # u3 has no positive: skipped
    # u4 has one item, a positive, at rank 1: NDCG 1, recall 1 (fewer items than k)
    u1_ndcg = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((u1_ndcg + 0 + 1) / 3)
    assert m["recall@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert (m["users"], m["users_evaluated"]) == (4.0, 3.0)
    # AUC over all rows: positives {0.8, 0.2, 0.55, 0.6} vs negatives
    # {0.9, 0.3, 0.5, 0.7, 0.4, 0.1}: 0.8 beats 5, 0.2 beats 1, 0.55 beats 4, 0.6 beats 4
    assert m["auc"] == pytest.approx(14 / 24)


def test_ranking_metrics_by_hand_at_4() -> None:
    m = _ranking(4)
    # u1: DCG = 1/log2(3) + 1/log2(5), IDCG = 1 + 1/log2(3), recall 1
    # u2: positive at rank 3: DCG = 1/log2(4) = 1/2, IDCG = 1, recall 1
    # u4: NDCG 1, recall 1
    u1_ndcg = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg@4"] == pytest.approx((u1_ndcg + 0.5 + 1) / 3)
    assert m["recall@4"] == pytest.approx(1.0)


def test_recall_divides_by_all_positives_not_by_k() -> None:
    # three positives, k = 2: two of three found -> recall 2/3; the top 2 are ideal -> NDCG 1
    m = ranking_metrics([0.9, 0.8, 0.7, 0.1], [1, 1, 1, 0], [0, 0, 0, 0], k=2)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx(1.0)


def test_ranking_ties_keep_input_order() -> None:
    assert ranking_metrics([0.5, 0.5], [0, 1], [7, 7], k=1)["ndcg@1"] == 0.0
    assert ranking_metrics([0.5, 0.5], [1, 0], [7, 7], k=1)["ndcg@1"] == 1.0


def test_ranking_without_positives_is_nan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ranking_metrics([0.3, 0.2], [0, 0], [1, 2], k=5)
    assert math.isnan(m["auc"]) and math.isnan(m["ndcg@5"]) and math.isnan(m["recall@5"])
    assert (m["users"], m["users_evaluated"]) == (2.0, 0.0)


@pytest.mark.parametrize(
    ("scores", "labels", "users", "k", "message"),
    [
        ([0.1, 0.2], [0, 1], [1, 1], 0, r"k must be a positive int, got 0"),
        ([0.1, 0.2], [0, 1], [1, 1], True, r"k must be a positive int, got True"),
        ([0.1, 0.2], [0, 1], [1, 1], 2.0, r"k must be a positive int, got 2\.0"),
        ([0.1, float("inf")], [0, 1], [1, 1], 5, r"scores\[1\] is inf; it must be finite"),
        ([0.1, 0.2], [0, 3], [1, 1], 5, r"labels\[1\] is 3\.0"),
        ([0.1, 0.2], [0, 1], [1], 5, r"users has length 1, expected 2"),
    ],
)
def test_ranking_bad_input_is_named(
    scores: list[float], labels: list[int], users: list[int], k: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(scores, labels, users, k=k)  # type: ignore[arg-type]


def test_count_convention_gives_users_without_a_positive_ndcg_1_and_recall_0() -> None:
    users, scores, labels = (list(col) for col in zip(*RANKING_ROWS))
    m = ranking_metrics(scores, labels, users, k=2, users_without_positives="count")
    # as test_ranking_metrics_by_hand_at_2, plus u3 (no positive) with NDCG 1 and Recall 0:
    # the public code of the debiasing papers averages over every user this way
    u1_ndcg = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((u1_ndcg + 0 + 1 + 1) / 4)
    assert m["recall@2"] == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert (m["users"], m["users_evaluated"]) == (4.0, 3.0)
    nobody = ranking_metrics([0.3, 0.2], [0, 0], [1, 2], k=5, users_without_positives="count")
    assert (nobody["ndcg@5"], nobody["recall@5"]) == (1.0, 0.0)


def test_unknown_users_without_positives_policy_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"users_without_positives must be one of \('skip', 'count'\), got 'drop'"
    ):
        ranking_metrics([0.1], [1], [0], users_without_positives="drop")
