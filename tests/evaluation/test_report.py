"""write_report / format_table / metrics_table: files parse, tables hold the expected text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainer.evaluation import format_table, metrics_table, write_report


def test_format_table_groups_sections_in_order() -> None:
    # given in scrambled order; printed CTR, CVR (clicks), CTCVR, ground truth, counts, other
    metrics = {
        "clicks": 3.0,
        "my_loss": 0.12345,
        "cvr_bias": -0.01234,
        "ctcvr_auc": 0.6,
        "cvr_auc": float("nan"),
        "ctr_logloss": 0.5,
        "ctr_auc": 0.75,
        "impressions": 1_000_000.0,
    }
    expected = "| metric | value |\n|---|---:|\n| **CTR** | |\n| ctr_auc | 0.7500 |\n| ctr_logloss | 0.5000 |\n| **CVR (clicks)** | |\n| cvr_auc | nan |\n| **CTCVR** | |\n| ctcvr_auc | 0.6000 |\n| **ground truth** | |\n| cvr_bias | -0.0123 |\n| **counts** | |\n| impressions | 1000000 |\n| clicks | 3 |\n| **other** | |\n| my_loss | 0.1235 |"
    assert format_table(metrics) == expected


def test_format_table_puts_ranking_keys_with_any_k_in_ranking() -> None:
    table = format_table({"recall@10": 0.25, "ndcg@10": 0.5, "auc": 0.7, "users_evaluated": 4.0})
    assert table.splitlines()[2:] == [
        "| **ranking** | |",
        "| auc | 0.7000 |",
        "| ndcg@10 | 0.5000 |",
        "| recall@10 | 0.2500 |",
        "| users_evaluated | 4 |",
    ]


def test_write_report_writes_parseable_json_and_markdown(tmp_path) -> None:
    metrics = {"ctr_auc": np.float64(0.8125), "cvr_auc": float("nan"), "clicks": 2.0}
    json_path, md_path = write_report(metrics, tmp_path / "run" / "eval", name="val")

    assert json_path == tmp_path / "run" / "eval" / "val.json"
    text = json_path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"clicks": 2.0, "ctr_auc": 0.8125, "cvr_auc": None}
    assert list(json.loads(text)) == ["clicks", "ctr_auc", "cvr_auc"]  # sorted keys

    md = md_path.read_text()
    assert md_path.name == "val.md"
    assert "| ctr_auc | 0.8125 |" in md
    assert "| cvr_auc | nan |" in md
    assert "| clicks | 2 |" in md


def test_write_report_default_name(tmp_path) -> None:
    write_report({"ctr_auc": 0.5}, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json", "metrics.md"}


@pytest.mark.parametrize("bad", ["0.5", None, [0.5], True])
def test_write_report_refuses_non_numbers_by_key(tmp_path, bad: object) -> None:
    with pytest.raises(ValueError, match=r"metric 'ctr_auc' is .*expected a real number"):
        write_report({"ctr_auc": bad}, tmp_path)  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_metrics_table_mean_and_sample_std() -> None:
    rows = {
        # mean 0.70; deviations 0, +0.01, -0.01 -> sum of squares 2e-4, / (3 - 1) -> std 0.01
        "naive": {"cvr_auc": [0.70, 0.71, 0.69], "cvr_logloss": 0.31234},
        # mean 0.8; deviations +-0.02 -> 8e-4 / 1 -> std sqrt(8e-4) = 0.028284
        "esmm": {"cvr_auc": np.array([0.78, 0.82]), "clicks": 12.0},
    }
    table = metrics_table(rows, ["cvr_auc", "cvr_logloss", "clicks"])
    assert table.splitlines() == [
        "| run | cvr_auc | cvr_logloss | clicks |",
        "|---|---:|---:|---:|",
        "| naive | 0.7000 ± 0.0100 | 0.3123 | – |",
        "| esmm | 0.8000 ± 0.0283 | – | 12 |",
    ]


def test_metrics_table_single_value_and_nan_cells() -> None:
    rows = {"dr": {"cvr_auc": [0.65], "ctr_auc": [0.7, math.nan], "cvr_bias": math.nan}}
    table = metrics_table(rows, ["cvr_auc", "ctr_auc", "cvr_bias"])
    assert table.splitlines()[2] == "| dr | 0.6500 | nan | nan |"


@pytest.mark.parametrize("cell", ["0.7", [], ["a"], None, {"x": 1.0}])
def test_metrics_table_refuses_bad_cells_by_run_and_metric(cell: object) -> None:
    with pytest.raises(ValueError, match=r"ipw/cvr_auc is .*expected a number or a list"):
        metrics_table({"ipw": {"cvr_auc": cell}}, ["cvr_auc"])  # type: ignore[dict-item]


def test_metrics_table_needs_columns() -> None:
    with pytest.raises(ValueError, match="columns is empty"):
        metrics_table({"ipw": {"cvr_auc": 0.5}}, [])
