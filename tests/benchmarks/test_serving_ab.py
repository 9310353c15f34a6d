"""benchmarks/serving_ab.py: cells parsed, pairs compared side by side, busy cells flagged."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serving_ab.py"


ab = load_benchmark(SCRIPT, "serving_ab")


def _run(
    rows_per_s: float, p99: float, others: float, errors: int = 0, faults: float = 0.0
) -> dict:
    return {
        "rows_per_s": rows_per_s,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "faults_per_row": faults,
        "errors": errors,
        "cpu": {"others": others},
    }


def test_a_cell_names_form_rows_concurrency_and_workers():
    assert ab.parse_cell("rank:256:32:2") == ("rank", 256, 32, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown form 'ranks'"):
        ab.parse_cell("ranks:1:8:1")


def test_the_ratio_is_the_median_of_ratios_within_pairs():
    # The host slowed both versions in the second pair: per-pair ratios 1.5, 1.25, 1.2 (median
    # 1.25), while the ratio of the medians (300 / 200) would be 1.5.
    cell = ("rank", 2, 8, 1)
    runs = {
        "base": [_run(400, 10.0, 0.02, faults=1.0), _run(200, 30.0, 0.03), _run(500, 8.0, 0.01)],
        "this tree": [_run(600, 9.0, 0.02), _run(250, 20.0, 0.04, errors=1), _run(600, 7.0, 0.0)],
    }
    summary = ab.summarise(cell, runs)
    assert summary["base requests_per_s"] == 200  # 400 rows/s at 2 rows a request
    assert summary["this tree requests_per_s"] == 300
    assert summary["ratios"] == pytest.approx([1.5, 1.25, 1.2])
    assert summary["ratio"] == pytest.approx(1.25)
    assert summary["base p99_ms"] == 10.0 and summary["this tree p99_ms"] == 9.0
    assert summary["base faults"] == 0.0 and summary["this tree faults"] == 0.0  # medians
    assert summary["errors"] == 1
    assert summary["others"] == 0.04


def test_a_cell_that_other_processes_slowed_reads_inconclusive():
    cell = ("rows", 1, 8, 1)
    quiet = ab.summarise(
        cell, {"base": [_run(100, 5.0, 0.02)], "this tree": [_run(120, 4.0, 0.05)]}
    )
    busy = ab.summarise(cell, {"base": [_run(100, 5.0, 0.12)], "this tree": [_run(120, 4.0, 0.0)]})
    settings = {"pairs": 1, "duration": 2.0, "warmup": 0.5, "precision": "int8", "restart": True}
    text = ab.markdown([quiet, busy], "abc1234", settings)
    quiet_line, busy_line = [line for line in text.splitlines() if line.startswith("| rows |")]
    assert "1.20x (1.20-1.20)" in quiet_line and quiet_line.endswith("| measured |")
    assert busy_line.endswith("| 12% | inconclusive: others above 10 % |")
    assert "against abc1234" in text
    assert "int8 tables" in text and "each run against a service started for it" in text


def test_loading_it_leaves_the_service_package_importable():
    import serving.config  # benchmarks/serving.py once shadowed it, failing every later import

    assert Path(serving.config.__file__).parent == ROOT / "serving"


def _modes(raw: float, path: float, others: float = 0.01) -> list[dict]:
    """One in-process run's modes at 256 rows (as ``InProcess.measure`` gives them)."""
    return [
        {"mode": "model", "rows": 256, "rows_per_s": raw, "others_cpu": others},
        {"mode": "in-process rank", "rows": 256, "rows_per_s": path, "others_cpu": others},
        {"mode": "in-process rank", "rows": 1, "rows_per_s": 1.0, "others_cpu": others},
    ]


def test_in_process_runs_compare_paths_within_pairs_and_each_path_to_its_own_raw_model():
    # The host slowed both versions in the second pair; the paths' per-pair ratios are 1.1,
    # 1.05 and 1.2, and each run's path over its own raw model 0.8 / 0.9, 0.75 / 0.84, 0.8 / 0.8.
    runs = {
        "base": [_modes(500, 400), _modes(400, 300, 0.15), _modes(500, 400)],
        "this tree": [_modes(480, 440), _modes(375, 315), _modes(600, 480)],
    }
    summary = ab.summarise_in_process(("rank", 256, 1, 1), runs)
    assert summary["ratios"] == pytest.approx([1.1, 1.05, 1.2])
    assert summary["ratio"] == pytest.approx(1.1)
    assert summary["base vs_raw"] == pytest.approx(0.8)
    assert summary["this tree vs_raw"] == pytest.approx(0.84)
    assert summary["base raw_rows_per_s"] == 500 and summary["this tree rows_per_s"] == 440
    assert summary["others"] == 0.15
    settings = {"pairs": 3, "duration": 2.0, "precision": "int8"}
    (line,) = [
        line
        for line in ab.markdown_in_process([summary], "abc1234", settings).splitlines()
        if line.startswith("| rank |")
    ]
    assert "| 0.800x | 0.840x | 1.100x (1.050-1.200) | 15% | inconclusive" in line
