"""Fixtures for recipe tests: one small simulated data set per session, and run launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# Small enough for 2 CPU cores: a tiny MMoE over the simulated schema.
TINY = [
    "model.num_experts=2",
    "model.expert_sizes=[16]",
    "model.tower_sizes=[8]",
    "data.batch_size=256",
    "data.eval_batch_size=4096",
    "data.shuffle_buffer=2048",
    "train.log_every=5",
    "train.progress=false",
    "dense_optimizer.lr=0.01",
    "sparse_optimizer.lr=0.1",
]


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.data",
            "simulate",
            "--rows",
            "120000",
            "--out",
            str(out),
            "--seed",
            "3",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return out


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "trainer/configs/demo.yaml"),
        f"output_dir={run}",
        f"data.train={data / 'train'}",
        f"data.test={data / 'test'}",
        *TINY,
        *extra,
    ]


def run_train(
    data: Path,
    run: Path,
    *extra: str,
    nproc: int = 1,
    resume: bool = False,
    torchrun_args: tuple[str, ...] = (),
    entry: str = "trainer.train",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    args = (["--resume"] if resume else []) + train_args(data, run, *extra)
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", entry, *args]
    else:
        cmd = [
            str(TORCHRUN),
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun_args,
            "-m",
            entry,
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def read_metrics(run: Path) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


def load_checkpoint_tensors(path: Path) -> dict:
    """A DCP checkpoint as one flat dict of full tensors (gathered from all ranks' files)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    return dict(_flatten(torch.load(target, weights_only=False)))


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict:
    """Two exported models of one schema with other weights (``a``, ``b``: directories;
    ``version_a``, ``version_b``), and the run of the first (``run``)."""
    from tests.serving.artifacts import make_edge_run
    from trainer.export import export_run

    root = tmp_path_factory.mktemp("exports")
    run_a = make_edge_run(root / "a", seed=0)
    run_b = make_edge_run(root / "b", seed=1)
    a = export_run(run_a, root / "a" / "model", log=None)
    b = export_run(run_b, root / "b" / "model", log=None)
    return {
        "run": run_a,
        "a": root / "a" / "model",
        "b": root / "b" / "model",
        "version_a": a.version,
        "version_b": b.version,
    }


@pytest.fixture(params=["local", "s3"])
def repository(request, tmp_path) -> str:
    """A model repository that does not exist yet: a local directory, or a prefix on S3."""
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue("s3").uri("models")
