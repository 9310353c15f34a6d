"""benchmarks/coat_protocol.py: the same predictions under each ranking protocol, by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_benchmark
from trainer.evaluation.predictions import Predictions

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coat_protocol.py"


coat_protocol = load_benchmark(SCRIPT, "coat_protocol")


def rated(scores, labels, users) -> object:
    n = len(scores)
    return coat_protocol.RatedTest(
        Predictions(
            pctr=np.full(n, 0.5),
            pcvr=np.asarray(scores, dtype=np.float64),
            click=np.ones(n),
            conversion=np.asarray(labels, dtype=np.float64),
            group=np.asarray(users),
        )
    )


# User 7 ("a"): one positive among three items, ranked second; user 9 ("b"): two items, no
# positive. Means over random draws are checked to about 5 standard errors.
SCORES, LABELS, USERS = [0.9, 0.5, 0.1, 0.7, 0.7], [0, 1, 0, 0, 0], [7, 7, 7, 9, 9]


def test_each_protocol_by_hand():
    m = coat_protocol.protocol_metrics(rated(SCORES, LABELS, USERS), draws=400)
    ndcg_a = 1 / math.log2(3)  # the positive at rank 2; IDCG = 1
    assert m["ndcg@5"] == pytest.approx((ndcg_a + 1.0) / 2)  # b counts with NDCG 1
    assert m["ndcg@5_skip"] == pytest.approx(ndcg_a)
    assert m["recall@5"] == pytest.approx((1.0 + 0.0) / 2)  # b counts with Recall 0
    assert m["users_without_positives"] == 1
    assert m["tied_rows"] == 1  # b's two equal scores
    # 80 % of 5 rows = 4: one of the 5 rows dropped at random. a loses its positive in 1 of 5.
    assert m["users_without_positives_badr_split"] == pytest.approx(1.2, abs=0.1)
    # a keeps its positive at rank 2 unless a negative above it goes (rank 1, NDCG 1): when
    # row 0 is dropped (1 in 5); empty (NDCG 1) in 1 of 5; b is empty or has one item: NDCG 1.
    expected_a = (1.0 + 1.0 + 3 * ndcg_a) / 5
    assert m["ndcg@5_badr_split"] == pytest.approx((expected_a + 1.0) / 2, abs=0.025)


def test_a_random_ranking_averages_over_draws():
    m = coat_protocol.random_ranking_metrics(rated(SCORES, LABELS, USERS), draws=400)
    # a's positive is equally likely at rank 1, 2 or 3.
    expected_a = (1.0 + 1 / math.log2(3) + 1 / math.log2(4)) / 3
    assert m["ndcg@5"] == pytest.approx((expected_a + 1.0) / 2, abs=0.025)
    assert m["recall@5"] == pytest.approx(0.5)


def test_a_perfect_ranking_scores_one_under_every_protocol():
    labels = [1, 0, 1, 0, 0, 1]
    users = [1, 1, 1, 2, 2, 2]
    m = coat_protocol.protocol_metrics(rated(np.add(labels, 0.01), labels, users), draws=50)
    assert m["ndcg@5"] == m["ndcg@5_skip"] == m["ndcg@5_badr_split"] == 1.0
    assert m["recall@5"] == 1.0 and m["tied_rows"] == 2  # two ties: 1.01 and 0.01 within users


def test_run_names_follow_quality_py():
    assert coat_protocol._run_name(Path("runs/badr_adapsl-seed3-0a1b2c3d4e")) == "badr_adapsl"
    assert coat_protocol._run_name(Path("my_run")) == "my_run"
