"""End to end on a real S3 server, every step a real process: simulate a day of logs to s3://,
train with 2 torchrun processes reading them with the run directory on s3://, kill the run after
a checkpoint and resume it from s3://, export to s3://, and serve the model from s3:// with
uvicorn, scoring over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from schemas import load_schema, storage
from schemas.artifact import MANIFEST_FILE, Manifest
from serving.artifact import load_artifact
from serving.fetch import local_model_dir
from tests.object_store import download_tree
from tests.serving.artifacts import live_server, request_rows, score_over_http
from tests.trainer.conftest import REPO, TINY, TORCHRUN, check

CHECKPOINT_EVERY = 5
STEPS = 20


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _torchrun(data: str, run: str, *extra: str) -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.train",
        "--config",
        str(REPO / "trainer/configs/demo.yaml"),
        f"output_dir={run}",
        f"data.train={data}/train",
        f"data.test={data}/test",
        *TINY,
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        *extra,
    ]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts its workers in sessions of their
    own, so killing torchrun's process group would not reach them)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers, as a lost machine would, then torchrun itself."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.communicate(timeout=120)


def _latest_step(run: str) -> int:
    pointer = storage.join(run, "checkpoints", "latest")
    return int(storage.read_text(pointer).removeprefix("step_")) if storage.is_file(pointer) else 0


def test_simulate_train_kill_resume_export_and_serve_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, run, model = s3.uri("logs", "sim"), s3.uri("runs", "e2e"), s3.uri("models", "e2e")
    times: dict[str, float] = {}
    start = time.perf_counter()

    # A day of logs, written to s3://.
    check(
        _python("-m", "trainer.data", "simulate", "--rows", "30000", "--out", data, "--seed", "4")
    )
    assert storage.is_file(storage.join(data, "schema.yaml"))
    times["simulate"] = time.perf_counter() - start

    # 2 processes read the logs from s3:// and write the run there; killed after a checkpoint.
    start = time.perf_counter()
    proc = subprocess.Popen(
        _torchrun(data, run, "train.steps=100000", "train.evaluate=false"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while _latest_step(run) < CHECKPOINT_EVERY and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            time.sleep(0.5)
    finally:
        _kill_hard(proc)
    killed_at = _latest_step(run)
    assert CHECKPOINT_EVERY <= killed_at < STEPS, killed_at
    times["train until killed"] = time.perf_counter() - start

    # The same command with --resume continues from the s3:// checkpoint, then evaluates.
    start = time.perf_counter()
    resumed = check(
        subprocess.run(
            [*_torchrun(data, run, f"train.steps={STEPS}"), "--resume"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
    )
    assert f"resumed from {run}/checkpoints/step_{killed_at:08d} at step {killed_at}" in (
        resumed.stdout + resumed.stderr
    )
    assert _latest_step(run) == STEPS
    assert storage.is_file(storage.join(run, "eval", "metrics.json"))
    times["resume and evaluate"] = time.perf_counter() - start

    # Export from s3:// to s3://.
    start = time.perf_counter()
    check(_python("-m", "trainer.export", "--run", run, "--out", model))
    manifest = Manifest.model_validate_json(storage.read_bytes(storage.join(model, MANIFEST_FILE)))
    assert manifest.source.run_dir == run and manifest.source.step == STEPS
    times["export"] = time.perf_counter() - start

    # A real uvicorn process fetches the model from s3:// and scores over HTTP.
    cache = tmp_path / "cache"
    test_split = download_tree(storage.join(data, "test"), tmp_path / "test")
    rows = request_rows(test_split, load_schema(storage.join(data, "schema.yaml")))[:300]
    start = time.perf_counter()
    with live_server(model, tmp_path / "service.log", env={"CTCVR_MODEL_CACHE": str(cache)}) as url:
        times["service ready"] = time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=30) as client:
            info = client.get("/v1/model").json()
            assert info["model_dir"] == model and info["version"] == manifest.version
            scores, versions = score_over_http(client, rows)
    assert versions == {manifest.version}
    artifact = load_artifact(local_model_dir(model, cache))  # the pod's cached copy
    expected = artifact.model.predict(artifact.featurizer(rows))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.all((scores > 0) & (scores < 1))
    print("\n" + "\n".join(f"{step}: {seconds:.1f} s" for step, seconds in times.items()))
