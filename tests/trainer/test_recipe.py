"""The training recipe end to end: real processes, real files, small data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.trainer.conftest import (
    REPO,
    check,
    load_checkpoint_tensors,
    read_metrics,
    run_train,
    train_args,
)


@pytest.fixture(scope="module")
def one_process_run(sim_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run1")
    check(run_train(sim_data, run, "train.steps=90", "data.batch_size=1024"))
    return run


@pytest.fixture(scope="module")
def two_process_run(sim_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run2")
    check(
        run_train(sim_data, run, "train.steps=90", "data.batch_size=512", nproc=2)
    )  # same global batch
    return run


def test_single_process_run_writes_its_outputs(one_process_run):
    run = one_process_run
    assert (run / "config.yaml").is_file() and (run / "schema.yaml").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(5, 91, 5))
    assert all(line["samples_per_s"] > 0 and "loss/ctcvr" in line for line in lines)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000090"
    metrics = read_metrics(run)
    assert metrics["ctr_auc"] > 0.6  # the simulated clicks carry learnable signal
    for key in (
        "cvr_auc",
        "ctcvr_auc",
        "ctr_gauc",
        "cvr_auc_whole_space",
        "cvr_bias",
        "ctr_logloss",
    ):
        assert key in metrics
    assert (run / "eval" / "metrics.md").read_text().count("|") > 10


def test_two_ranks_hold_disjoint_shards_that_cover_every_table(two_process_run):
    run = two_process_run
    ranks = [json.loads((run / "shards" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    plan = (run / "sharding_plan.txt").read_text()
    assert "table_wise" in plan or "column_wise" in plan
    for table in ranks[0]:
        full = _table_size(run, table)
        held = [sum(s["sizes"][0] * s["sizes"][1] for s in rank[table]) for rank in ranks]
        assert sum(held) == full, table  # together the ranks hold the table exactly once
    per_rank = [
        sum(s["sizes"][0] * s["sizes"][1] for t in rank.values() for s in t) for rank in ranks
    ]
    assert all(0 < held < sum(per_rank) for held in per_rank)  # neither rank holds everything


def test_two_process_ctr_auc_matches_one_process(one_process_run, two_process_run):
    one, two = read_metrics(one_process_run), read_metrics(two_process_run)
    assert one["impressions"] == two["impressions"]  # every test row evaluated exactly once
    assert abs(one["ctr_auc"] - two["ctr_auc"]) < 0.02


def test_a_checkpoint_scores_the_same_on_one_rank_as_on_two(two_process_run, tmp_path):
    # Sharded collections pool features in placement order; the model must not depend on it.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            "--run",
            str(two_process_run),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(result)
    one_rank = json.loads((tmp_path / "metrics.json").read_text())
    two_ranks = read_metrics(two_process_run)
    for key in ("ctr_auc", "ctr_logloss", "cvr_auc", "ctcvr_logloss", "cvr_bias"):
        assert one_rank[key] == pytest.approx(two_ranks[key], abs=1e-6), key


def test_resume_reproduces_an_uninterrupted_run(sim_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("train.evaluate=false", "train.checkpoint_every=10", "model.dropout=0.1")
    check(run_train(sim_data, straight, "train.steps=30", *common, nproc=2))
    check(run_train(sim_data, resumed, "train.steps=15", *common, nproc=2))
    check(run_train(sim_data, resumed, "train.steps=30", *common, nproc=2, resume=True))
    a = load_checkpoint_tensors(straight / "checkpoints" / "step_00000030")
    b = load_checkpoint_tensors(resumed / "checkpoints" / "step_00000030")
    assert any("embedding_bags" in k for k in a) and any("exp_avg" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(sim_data, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        *train_args(
            sim_data, run, "train.steps=100000", "train.evaluate=false", "train.checkpoint_every=0"
        ),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step_"))
    assert stopped_at >= 5
    done = check(
        run_train(
            sim_data, run, f"train.steps={stopped_at + 5}", "train.evaluate=false", resume=True
        )
    )
    assert "resumed from" in done.stdout + done.stderr
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped_at + 5:08d}"


def test_a_crashed_worker_is_restarted_by_torchrun_and_resumes(sim_data, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ("train.steps=24", "train.evaluate=false", "train.checkpoint_every=8")
    check(run_train(sim_data, straight, *common, nproc=2))
    result = check(
        run_train(
            sim_data,
            crashed,
            *common,
            nproc=2,
            resume=True,
            torchrun_args=("--max-restarts=1",),
            entry="tests.trainer.crash_once",
        )
    )
    assert "resumed from" in result.stdout + result.stderr
    a = load_checkpoint_tensors(straight / "checkpoints" / "step_00000024")
    b = load_checkpoint_tensors(crashed / "checkpoints" / "step_00000024")
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_bad_config_fails_before_training_naming_the_key(sim_data, tmp_path):
    result = run_train(sim_data, tmp_path / "run", "train.stepz=3")
    assert result.returncode == 2
    assert "stepz" in result.stderr
    result = run_train(sim_data, tmp_path / "run", "sharding.types=[row_wise]")
    assert result.returncode == 2
    assert "row_wise" in result.stderr and "gloo" in result.stderr


def _table_size(run, weight_name: str) -> int:
    """Rows x dim of the table behind ``...embedding_bags.<table>.weight``, from the run's schema."""
    from schemas import load_schema

    table_name = weight_name.split("embedding_bags.")[1].removesuffix(".weight")
    table = next(t for t in load_schema(run / "schema.yaml").all_tables if t.name == table_name)
    return table.num_rows * table.dim
