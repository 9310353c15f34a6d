"""benchmarks/warm_start.py: the arms' runs, the step that matches scratch, and a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "warm_start.py"


bench = load_benchmark(SCRIPT, "warm_start_benchmark")


def test_steps_to_match_scratch():
    steps = [0, 10, 20, 30]
    assert bench.steps_to_match(steps, [0.60, 0.70, 0.72, 0.71], 0.70, True) == 10
    assert bench.steps_to_match(steps, [0.60, 0.65, 0.66, 0.69], 0.70, True) is None
    assert bench.steps_to_match(steps, [0.30, 0.25, 0.20, 0.21], 0.22, False) == 20


def test_the_arms_differ_only_by_where_they_start(tmp_path):
    settings = bench.Settings(seeds=[4])
    days = ["2026-12-01", "2026-12-02", "2026-12-03"]
    runs = bench.plan_runs(settings, tmp_path / "data", days, tmp_path)
    (day1,) = runs["day1"]
    scratch, warm, warm_optimizer = runs["day2"]
    assert [r.arm for r in runs["day2"]] == list(bench.ARMS)
    assert "data.filter=day == '2026-12-01'" in day1.overrides
    assert "data.filter=day == '2026-12-02'" in scratch.overrides
    assert f"data.test={tmp_path / 'data' / 'test' / 'day=2026-12-03'}" in scratch.overrides
    assert set(warm.overrides) - set(scratch.overrides) == {f"train.init_from={day1.run_dir}"}
    assert set(warm_optimizer.overrides) - set(warm.overrides) == {"train.init_optimizer=true"}
    assert "seed=4" in scratch.overrides and len({r.run_dir for r in runs["day2"]}) == 3
    assert settings.checkpoints == list(range(25, 251, 25))


def test_bad_settings_are_named(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_tiny_run_writes_the_table_and_the_chart(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rows", "12000", "--steps", "6", "--every"]
        + ["3", "--day1-steps", "4", "--out", str(tmp_path / "out"), "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "out" / "warm_start.md").read_text()
    assert "| day-1 model (no day-2 step) |" in text and "| warm + optimizer |" in text
    assert (tmp_path / "out" / "warm_start.png").stat().st_size > 10_000
    raw = json.loads((tmp_path / "out" / "warm_start.json").read_text())
    warm = raw["curves"]["warm"]["ctcvr_auc"]
    assert warm["steps"] == [0, 3, 6] and raw["curves"]["scratch"]["ctcvr_auc"]["steps"] == [3, 6]
    # Step 0 of the warm arms is the day-1 model, evaluated on day 3.
    day1 = json.loads(
        next((tmp_path / "runs").glob("day1-seed0-*/eval_day3/*/metrics.json")).read_text()
    )
    assert warm["mean"][0] == pytest.approx(day1["ctcvr_auc"])
    # Each warm run says where it started from.
    for run in (tmp_path / "runs").glob("warm*-seed0-*"):
        assert json.loads((run / "warm_start.json").read_text())["source"]["kind"] == "run"
