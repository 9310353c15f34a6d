"""The pairwise ranking term through the real recipe: rows read grouped by user, the term logged."""

from __future__ import annotations

import json
import math

import yaml

from tests.trainer.conftest import check, run_train


def test_grouped_reading_feeds_the_pairwise_term_user_pairs(sim_data, tmp_path):
    run = tmp_path / "run"
    check(
        run_train(
            sim_data,
            run,
            "objective.name=naive",
            "objective.params.pairwise_weight=1.0",
            "data.group_rows=64",
            "train.steps=20",
        )
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pairwise = [line["loss/cvr_pairwise"] for line in lines]
    assert all(math.isfinite(v) for v in pairwise)
    assert max(pairwise) > 0  # the batches held clicked pairs of one user
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["group_rows"] == 64
    assert recorded["objective"]["params"]["pairwise_weight"] == 1.0
