"""``python -m serving --workers N``: uvicorn's worker processes, each with the model, sharing
one copy of the memory-mapped embedding tables; reload by SIGHUP; a bad model is one error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from schemas.artifact import MANIFEST_FILE
from tests.serving.artifacts import REPO, free_port, score_over_http, wait_ready
from tests.serving.conftest import ADMIN, ADMIN_TOKEN

pytestmark = pytest.mark.timeout(600)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _workers(pid: int) -> list[int]:
    """The worker processes of a ``python -m serving`` main process (uvicorn also starts a
    resource tracker: the workers are the children that answer to the app's command)."""
    out = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"multiprocessing.spawn" in command and b"resource_tracker" not in command:
            out.append(child)
    return out


@contextmanager
def serving(model_dir: Path, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTCVR_ADMIN_TOKEN": ADMIN_TOKEN}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--port", str(port)]
            + list(args),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=180.0)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _mapping_pss(pid: int, path: Path) -> tuple[int, int]:
    """(Rss, Pss) in kB of a process's mappings of ``path``."""
    rss = pss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            current = len(fields) >= 6 and fields[5] == str(path)
        elif current and fields[0] == "Rss:":
            rss += int(fields[1])
        elif current and fields[0] == "Pss:":
            pss += int(fields[1])
    return rss, pss


def test_workers_score_share_the_tables_and_reload_on_sighup(edge_model, tmp_path):
    log = tmp_path / "server.log"
    with serving(edge_model.model, log, "--workers", "2") as (proc, url):
        _wait_for(lambda: log.read_text().count("Application startup complete") == 2)
        workers = _workers(proc.pid)
        assert len(workers) == 2, (workers, _children(proc.pid))
        with httpx.Client(base_url=url, timeout=30) as client:
            got, versions = score_over_http(client, edge_model.rows, chunk=20)
            np.testing.assert_allclose(got, edge_model.expected, atol=1e-5, rtol=0)
            assert versions == {edge_model.version}
            # A reload would reach one worker of two: refused, saying what to do instead.
            refused = client.post("/admin/reload", headers=ADMIN)
            assert refused.status_code == 409
            assert "2 worker processes" in refused.json()["detail"]
            assert "SIGHUP" in refused.json()["detail"]
        # Both workers map the embedding files, and share their pages: each is charged half.
        manifest = json.loads((edge_model.model / MANIFEST_FILE).read_text())
        for file in manifest["embeddings"]["files"]:
            path = (edge_model.model / file["path"]).resolve()
            for worker in workers:
                rss, pss = _mapping_pss(worker, path)
                assert rss > 0 and pss <= rss / 2 + 1, (file["path"], worker, rss, pss)
        # SIGHUP: every worker replaced, one at a time, and still serving.
        os.kill(proc.pid, signal.SIGHUP)
        _wait_for(lambda: not set(_workers(proc.pid)) & set(workers))
        assert len(_workers(proc.pid)) == 2
        with httpx.Client(base_url=url, timeout=30) as client:
            got, _ = score_over_http(client, edge_model.rows[:40], chunk=20)
            np.testing.assert_allclose(got, edge_model.expected[:40], atol=1e-5, rtol=0)
        proc.terminate()
        assert proc.wait(60) == 0
    text = log.read_text()
    assert "Received SIGHUP, restarting processes" in text and "Traceback" not in text


def test_workers_from_the_environment_and_a_bad_model_is_one_plain_error(edge_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(edge_model.model, broken)
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    manifest["format_version"] = 9
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(broken), "--port", str(free_port())],
        cwd=REPO,
        env={**os.environ, "CTCVR_WORKERS": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "format_version 9" in result.stderr
    assert "Traceback" not in result.stderr and "Started parent process" not in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(broken), "--workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "workers: Input should be greater than or equal to 1" in (
        bad.stderr
    )
