"""The training recipe with its run directory on a real S3 server: resume from an s3:// checkpoint
exactly as from local disk, and storage faults (an outage mid-training, wrong credentials, a
missing bucket, a truncated shard) stopped with an error naming the URI and what to check, the
last complete checkpoint still usable."""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from schemas import storage
from tests.object_store import download_tree
from tests.trainer.conftest import REPO, check, load_checkpoint_tensors, run_train, train_args
from trainer.checkpoint import find_checkpoint
from trainer.run_dir import RunDir


def _latest_step(run: str) -> int | None:
    pointer = storage.join(run, "checkpoints", "latest")
    if not storage.is_file(pointer):
        return None
    return int(storage.read_text(pointer).removeprefix("step_"))


def test_resume_from_an_s3_checkpoint_reproduces_an_uninterrupted_run(sim_data, s3, tmp_path):
    # The twin of test_recipe.py's local test, with the resumed run's directory on s3://.
    straight, resumed = tmp_path / "straight", s3.uri("runs", "resumed")
    common = ("train.evaluate=false", "train.checkpoint_every=10", "model.dropout=0.1")
    check(run_train(sim_data, straight, "train.steps=30", *common, nproc=2))
    check(run_train(sim_data, resumed, "train.steps=15", *common, nproc=2))
    done = check(run_train(sim_data, resumed, "train.steps=30", *common, nproc=2, resume=True))
    assert f"resumed from {resumed}/checkpoints/step_00000015 at step 15" in done.stdout
    a = load_checkpoint_tensors(straight / "checkpoints" / "step_00000030")
    local_copy = download_tree(
        storage.join(resumed, "checkpoints", "step_00000030"), tmp_path / "b"
    )
    b = load_checkpoint_tensors(local_copy)
    assert any("embedding_bags" in k for k in a) and any("exp_avg" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # The run directory holds what a local one holds; old checkpoints were pruned.
    run = RunDir(resumed)
    assert [c.name for c in run.checkpoints()] == ["step_00000020", "step_00000030"]
    assert [r["step"] for r in run.read_metrics()][-1] == 30
    assert list(run.read_rank_shards()) == [0, 1]


def test_an_outage_mid_training_stops_the_run_and_its_last_checkpoint_resumes(
    sim_data, s3, tmp_path
):
    run = s3.uri("runs", "outage")
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        *train_args(
            sim_data, run, "train.steps=100000", "train.evaluate=false", "train.checkpoint_every=5"
        ),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while (_latest_step(run) or 0) < 10 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        with s3.server.stopped():
            _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    # The outage meets a write (error: <file>: cannot write: ...) or the read of checkpoints/latest
    # (error: cannot read <file>: ...), as timing has it: either names a file of the run.
    assert f" {run}/" in line
    assert "unreachable after 2 attempt(s)" in line and "check AWS_ENDPOINT_URL" in line

    # The server is back: the newest complete checkpoint is whole and the run resumes from it.
    checkpoint = find_checkpoint(RunDir(run))
    step = checkpoint.read_meta().step
    assert step >= 10
    done = check(
        run_train(sim_data, run, f"train.steps={step + 5}", "train.evaluate=false", resume=True)
    )
    assert f"resumed from {checkpoint} at step {step}" in done.stdout + done.stderr
    assert _latest_step(run) == step + 5

    # A truncated shard of the checkpoint to resume from is named, and nothing is trained.
    latest = find_checkpoint(RunDir(run))
    shard = latest.file(next(n for n in latest.file_sizes() if n.endswith(".distcp")))
    storage.write_bytes(shard, storage.read_bytes(shard)[:-64])
    refused = run_train(sim_data, run, f"train.steps={step + 10}", resume=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: {shard} is truncated" in refused.stderr
    assert "resume or export from another checkpoint" in refused.stderr


def test_wrong_credentials_and_a_missing_bucket_stop_the_run_at_start(
    sim_data, s3, tmp_path, monkeypatch
):
    missing = run_train(sim_data, "s3://no-such-bucket-ctcvr/runs/x", "train.steps=5")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert (
        "error: s3://no-such-bucket-ctcvr/runs/x/config.yaml: bucket 'no-such-bucket-ctcvr' "
        "does not exist at endpoint http://127.0.0.1:"
    ) in missing.stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123")
    run = s3.uri("runs", "denied")
    denied = run_train(sim_data, run, "train.steps=5")
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    assert f"error: {run}/config.yaml: access denied by endpoint" in denied.stderr
    assert "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in denied.stderr
    assert "wrong-secret-0123" not in denied.stderr + denied.stdout
