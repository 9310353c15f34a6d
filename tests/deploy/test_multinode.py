"""The multi-machine command line of README "Scale out", for real: two torchrun agents, each
standing in for a machine (--nnodes=2, one process each), meet through the c10d rendezvous on a
loopback endpoint and train one model, its tables split between the two ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SMALL = [  # a tiny model and a few steps: 2 agents on a shared 2-core machine
    "model.num_experts=2",
    "model.expert_sizes=[16]",
    "model.tower_sizes=[8]",
    "data.batch_size=256",
    "data.eval_batch_size=4096",
    "data.shuffle_buffer=1024",
    "train.steps=4",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_nodes_meet_through_c10d_and_train_one_model(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.data",
            "simulate",
            "--rows",
            "6000",
            "--out",
            str(data),
            "--seed",
            "5",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=test-run",
                "-m",
                "trainer.train",
                "--config",
                "trainer/configs/demo.yaml",
                "--resume",
                f"output_dir={run}",
                f"data.train={data / 'train'}",
                f"data.test={data / 'test'}",
                *SMALL,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    # One run of world size 2: both ranks wrote their shards, rank 0 the evaluation.
    assert sorted(p.name for p in (run / "shards").iterdir()) == ["rank0.json", "rank1.json"]
    plan = (run / "sharding_plan.txt").read_text()
    assert "[0]" in plan and "[1]" in plan
    assert (run / "eval" / "metrics.json").is_file()
