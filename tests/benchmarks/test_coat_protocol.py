"""benchmarks/coat_protocol.py: the same predictions under each ranking protocol, by hand."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_benchmark
from trainer.evaluation.predictions import Predictions

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coat_protocol.py"


coat_protocol = load_benchmark(SCRIPT, "coat_protocol")


def rated(scores, labels, users, items=None) -> object:
    n = len(scores)
    return coat_protocol.RatedTest(
        Predictions(
            pctr=np.full(n, 0.5),
            pcvr=np.asarray(scores, dtype=np.float64),
            click=np.ones(n),
            conversion=np.asarray(labels, dtype=np.float64),
            group=np.asarray(users),
        ),
        None if items is None else np.asarray(items),
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


ITEMS = [1, 2, 3, 1, 2]


def test_a_fixed_split_ranks_its_pairs_and_the_other_ratings_apart(tmp_path):
    path = tmp_path / "x_test.txt"
    path.write_text("7 1\n7 2\n")  # user 7's first two items; all of user 9's validate
    split = coat_protocol.FixedSplit.read(path)
    assert split.sha256 == hashlib.sha256(b"7 1\n7 2\n").hexdigest()  # results name their split
    m = coat_protocol.protocol_metrics(rated(SCORES, LABELS, USERS, ITEMS), draws=1, split=split)
    # Tested: a's 0.9 (negative) above its 0.5 (positive): the positive at rank 2; b absent.
    assert m["ndcg@5_fixed"] == pytest.approx(1 / math.log2(3))
    assert m["recall@5_fixed"] == 1.0
    # Validation: a's third item (a negative) and b's two, neither user with a positive.
    assert m["ndcg@5_fixed_valid"] == 1.0 and m["recall@5_fixed_valid"] == 0.0
    floor = coat_protocol.random_ranking_metrics(
        rated(SCORES, LABELS, USERS, ITEMS), draws=400, split=split
    )
    assert floor["ndcg@5_fixed"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=0.03)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("7 1\n7 x\n", r"x_test.txt:2: expected 'user item' integers, got '7 x'"),
        ("7 1\n9 2\n7 1\n", r"x_test.txt:3: pair \(7, 1\) repeats line 1"),
        ("\n", "no pairs"),
    ],
)
def test_a_malformed_split_file_names_the_line(tmp_path, text, error):
    path = tmp_path / "x_test.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        coat_protocol.FixedSplit.read(path)


def test_a_split_of_other_data_or_rows_without_items_are_refused():
    split = coat_protocol.FixedSplit(np.array([[7, 1], [9, 4]]), source="x_test.txt")
    with pytest.raises(ValueError, match=r"x_test.txt: 1 of its 2 pairs .* user 9, item 4"):
        split.mask(rated(SCORES, LABELS, USERS, ITEMS))
    with pytest.raises(ValueError, match="needs the test set's 'item_id' column"):
        split.mask(rated(SCORES, LABELS, USERS))


def test_run_names_follow_quality_py():
    assert coat_protocol._run_name(Path("runs/badr_adapsl-seed3-0a1b2c3d4e")) == "badr_adapsl"
    assert coat_protocol._run_name(Path("my_run")) == "my_run"
