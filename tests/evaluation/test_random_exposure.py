"""The random-exposure protocol in the trainer's evaluation: ``data.ranking_k`` ranks rated rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.config import ConfigError, load_config
from trainer.evaluation import Predictions


def _predictions(group: np.ndarray | None) -> Predictions:
    # user 7: rated rows 0, 1, 2 (pCVR 0.9, 0.2, 0.6; labels 0, 1, 1) and an unrated row 3 scored
    # 0.99 that must not be ranked; user 8: rated rows 4, 5 with no positive.
    return Predictions(
        pctr=np.full(6, 0.5),
        pcvr=np.array([0.9, 0.2, 0.6, 0.99, 0.4, 0.3]),
        click=np.array([1, 1, 1, 0, 1, 1], dtype=float),
        conversion=np.array([0, 1, 1, 0, 0, 0], dtype=float),
        group=group,
    )


def test_ranking_metrics_rank_each_users_rated_rows_by_pcvr() -> None:
    metrics = _predictions(np.array([7, 7, 7, 7, 8, 8])).metrics(ranking_k=2)
    # user 7 ranks 0.9 (0), 0.6 (1): DCG 1/log2(3), ideal 1 + 1/log2(3); recall 1/2.
    # user 8 has no positive: NDCG 1, Recall 0 (the papers' convention).
    user7 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@2"] == pytest.approx((user7 + 1.0) / 2)
    assert metrics["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert (metrics["users"], metrics["users_evaluated"]) == (2.0, 1.0)
    assert "auc" not in metrics  # the protocol's AUC is cvr_auc over the rated rows
    assert metrics["cvr_auc"] == pytest.approx(
        2 / 6
    )  # 0.2 beats none of 0.9, 0.4, 0.3; 0.6 beats two


def test_without_ranking_k_there_are_no_ranking_keys() -> None:
    assert "ndcg@5" not in _predictions(np.arange(6)).metrics()


def test_ranking_needs_the_group_column() -> None:
    with pytest.raises(ValueError, match="group column"):
        _predictions(None).metrics(ranking_k=5)


def test_large_integer_user_ids_stay_distinct() -> None:
    # 2**40 and 2**40 + 1 collapse in float32; evaluation keeps group ids as int64
    ids = np.array([2**40, 2**40, 2**40, 2**40, 2**40 + 1, 2**40 + 1], dtype=np.int64)
    assert _predictions(ids).metrics(ranking_k=2)["users"] == 2.0


def test_negative_ranking_k_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.ranking_k must be >= 0"):
        load_config(None, ["output_dir=x", "data.train=y", "data.ranking_k=-1"])
