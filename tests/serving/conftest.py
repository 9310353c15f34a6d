"""Fixtures of the serving tests: small exported models, a trained 2-rank run, app clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.config import ServingSettings
from serving.main import create_app
from tests.serving.artifacts import (
    REPO,
    edge_schema,
    make_edge_run,
    request_rows,
    trainer_predictions,
)

API_TOKEN = "api-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class EdgeModel:
    run: Path
    data: Path  # Parquet rows
    model: Path  # exported model directory
    rows: list[dict]  # the Parquet rows as request rows
    expected: np.ndarray  # (N, 3) the trainer's own predictions of those rows
    version: str


def _objective_with_extra_head() -> str:
    """An objective whose model has a training-only head, when one is registered."""
    from trainer.objectives import OBJECTIVES

    return next((name for name, cls in OBJECTIVES.items() if cls.required_heads), "esmm")


def _edge_model(
    root: Path, seed: int, objective: str | None = None, scoped: bool = False
) -> EdgeModel:
    from trainer.export import export_run

    run = make_edge_run(
        root, seed=seed, objective=objective or _objective_with_extra_head(), scoped=scoped
    )
    manifest = export_run(run, root / "model", log=None)
    data = root / "data" / "test"
    return EdgeModel(
        run=run,
        data=data,
        model=root / "model",
        rows=request_rows(data, edge_schema()),
        expected=trainer_predictions(run, data),
        version=manifest.version,
    )


@pytest.fixture(scope="session")
def edge_model(tmp_path_factory) -> EdgeModel:
    """A model of the edge-case schema (random weights), exported; with reference predictions."""
    return _edge_model(tmp_path_factory.mktemp("edge_a"), seed=0)


@pytest.fixture(scope="session")
def edge_model_b(tmp_path_factory) -> EdgeModel:
    """Another model of the same schema (other weights), for reloads."""
    return _edge_model(tmp_path_factory.mktemp("edge_b"), seed=1)


@pytest.fixture(scope="session")
def scoped_edge_model(tmp_path_factory) -> EdgeModel:
    """A model of the edge-case schema whose features declare scopes (``EDGE_SCOPES``)."""
    return _edge_model(tmp_path_factory.mktemp("edge_scoped"), seed=3, scoped=True)


@pytest.fixture(scope="session")
def ddpo_edge_model(tmp_path_factory) -> EdgeModel:
    """A DDPO model of the same schema: its CVR tower reads the causal transfer modules' output."""
    return _edge_model(tmp_path_factory.mktemp("edge_ddpo"), seed=2, objective="ddpo")


@dataclass(frozen=True)
class TrainedModel:
    run: Path
    test_data: Path
    model: Path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    """A real 2-process training run (column-wise sharded tables, so the checkpoint is spread
    over both ranks' files) on simulated data, exported with the CLI."""
    root = tmp_path_factory.mktemp("trained")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.data",
            "simulate",
            "--rows",
            "3000",
            "--out",
            str(root / "sim"),
            "--seed",
            "5",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        env=env,
    )
    train = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "trainer.train",
            "--config",
            str(REPO / "trainer/configs/demo.yaml"),
            f"output_dir={root / 'run'}",
            f"data.train={root / 'sim' / 'train'}",
            f"data.test={root / 'sim' / 'test'}",
            "train.steps=4",
            "model.num_experts=2",
            "model.expert_sizes=[16]",
            "model.tower_sizes=[8]",
            "data.batch_size=128",
            "data.shuffle_buffer=1024",
            "train.progress=false",
            "sharding.types=[column_wise]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-5000:]
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run",
            str(root / "run"),
            "--out",
            str(root / "model"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    return TrainedModel(run=root / "run", test_data=root / "sim" / "test", model=root / "model")


@pytest.fixture
def make_client(edge_model) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)``: a started app (lifespan run) on the edge model by default."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        settings = ServingSettings(**{"model_dir": edge_model.model, **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
