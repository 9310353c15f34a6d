"""``python -m trainer.evaluate``: a run's checkpoint scored from the run directory alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.trainer.conftest import REPO, TORCHRUN, check, read_metrics, run_train

KEYS = ("ctr_auc", "ctr_logloss", "cvr_auc", "ctcvr_logloss", "cvr_bias", "impressions")


def evaluate(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m"]
        if nproc == 1
        else [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m"]
    )
    return subprocess.run(
        [*launcher, "trainer.evaluate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def run_without_training_data(sim_data, tmp_path_factory):
    """A trained run whose training split has been deleted since."""
    root = tmp_path_factory.mktemp("evaluate")
    data = shutil.copytree(sim_data, root / "data")
    run = root / "run"
    check(run_train(data, run, "train.steps=20", "train.checkpoint_every=10"))
    shutil.rmtree(data / "train")
    return run


def test_a_run_is_evaluated_without_its_training_data(run_without_training_data, tmp_path):
    run = run_without_training_data
    trained = read_metrics(run)
    (run / "eval").rename(tmp_path / "eval_at_training")
    result = check(evaluate("--run", str(run)))
    assert "step 20 evaluated" in result.stdout and "| ctr_auc |" in result.stdout
    again = read_metrics(run)  # written back into the run
    for key in KEYS:
        assert again[key] == pytest.approx(trained[key], abs=1e-6), key


def test_two_ranks_score_a_one_rank_checkpoint_alike(run_without_training_data, tmp_path):
    run = run_without_training_data
    # torchrun would take --run for its own --run-path
    check(evaluate("--run-dir", str(run), "--out", str(tmp_path / "two"), nproc=2))
    one = read_metrics(run)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_an_older_checkpoint_and_other_data_can_be_named(run_without_training_data, tmp_path):
    run = run_without_training_data
    test_part = next((run.parent / "data" / "test").glob("*.parquet"))
    result = check(
        evaluate(
            "--run",
            str(run),
            "--checkpoint",
            "step_00000010",
            "--data",
            str(test_part),
            "--out",
            str(tmp_path),
        )
    )
    assert "step 10 evaluated" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["impressions"] > 0


def test_what_cannot_be_evaluated_is_named(run_without_training_data, tmp_path):
    result = evaluate("--run", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path} is not a run directory of trainer.train (no config.yaml)" in result.stderr
    result = evaluate("--run", str(run_without_training_data), "--checkpoint", "step_00000099")
    assert result.returncode == 2 and "step_00000099 is not a complete checkpoint" in result.stderr
    missing = tmp_path / "none"
    result = evaluate("--run", str(run_without_training_data), "--data", str(missing))
    assert result.returncode == 2 and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
