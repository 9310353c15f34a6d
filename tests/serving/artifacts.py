"""Builders shared by the export and serving tests: small runs, their artifacts, reference
predictions from the trainer, request rows from Parquet, and a real uvicorn process."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FeatureSchema

REPO = Path(__file__).resolve().parents[2]

# Every rule of the reader in one small schema: hashed ints (negative ones too), hashed strings,
# a vocab table with out-of-range ids, an ``oov: error`` feature, a shared mean-pooled table read
# by an int list and a single id, a string list, and the three dense normalisations.
EDGE_SCHEMA = {
    "name": "edge",
    "tables": [{"name": "tags", "vocab_size": 12, "dim": 4}],
    "sparse": [
        {"name": "user", "dtype": "int", "hash_buckets": 97, "dim": 4},
        {"name": "city", "dtype": "string", "hash_buckets": 13, "dim": 3},
        {"name": "level", "dtype": "int", "vocab_size": 5, "dim": 2},
        {"name": "strict_cat", "dtype": "int", "vocab_size": 4, "dim": 2, "oov": "error"},
        {"name": "recent_tags", "table": "tags", "multi_valued": True, "max_len": 3},
        {"name": "tag", "table": "tags"},
        {
            "name": "words",
            "dtype": "string",
            "hash_buckets": 11,
            "dim": 2,
            "multi_valued": True,
            "max_len": 2,
        },
    ],
    "dense": [
        {"name": "price", "default": 1.5, "normalization": {"kind": "log1p"}},
        {
            "name": "activity",
            "default": -2.0,
            "normalization": {"kind": "standard", "mean": 3.0, "std": 2.5},
        },
        {"name": "raw"},
    ],
    "labels": {"click": "click", "conversion": "conversion"},
}
LABEL_COLUMNS = ("click", "conversion")
# Where a ranking request gives each feature of EDGE_SCHEMA (``edge_schema(scoped=True)``): every
# kind of feature in the context (a hashed id, a string, a vocabulary id, a list, dense values)
# and per candidate; ``strict_cat`` (oov: error) and ``raw`` in either place.
EDGE_SCOPES = {
    "user": "context",
    "city": "context",
    "level": "context",
    "strict_cat": "any",
    "recent_tags": "context",
    "tag": "candidate",
    "words": "candidate",
    "price": "candidate",
    "activity": "context",
    "raw": "any",
}


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
        yield


def edge_schema(dim: int | None = None, scoped: bool = False) -> FeatureSchema:
    """:data:`EDGE_SCHEMA`; with ``dim`` every table of that one dimension; ``scoped``: each
    feature's scope as :data:`EDGE_SCOPES` says (else every scope is the default, ``any``)."""
    data = copy.deepcopy(EDGE_SCHEMA)
    if dim is not None:
        for entry in data["tables"] + data["sparse"]:
            if "dim" in entry:
                entry["dim"] = dim
    if scoped:
        for entry in data["sparse"] + data["dense"]:
            entry["scope"] = EDGE_SCOPES[entry["name"]]
    return FeatureSchema.from_dict(data)


def edge_table(n: int, seed: int) -> pa.Table:
    """``n`` impressions with nulls, out-of-vocabulary ids, long lists and null list items."""
    rng = np.random.default_rng(seed)

    def maybe(values: list, p_null: float) -> list:
        return [None if rng.random() < p_null else v for v in values]

    def int_list(max_len: int, high: int) -> list:
        out = []
        for _ in range(n):
            if rng.random() < 0.15:
                out.append(None)
                continue
            out.append(
                maybe([int(v) for v in rng.integers(-1, high, rng.integers(0, max_len + 1))], 0.1)
            )
        return out

    words = [
        None
        if rng.random() < 0.1
        else maybe([f"w{int(v)}" for v in rng.integers(0, 30, rng.integers(0, 4))], 0.1)
        for _ in range(n)
    ]
    click = (rng.random(n) < 0.4).astype(np.int8)
    columns = {
        "user": pa.array(
            maybe([int(v) for v in rng.integers(-(2**40), 2**40, n)], 0.1), pa.int64()
        ),
        "city": pa.array(
            maybe([f"city_{int(v)}" for v in rng.integers(0, 40, n)], 0.15), pa.string()
        ),
        "level": pa.array(maybe([int(v) for v in rng.integers(-2, 8, n)], 0.1), pa.int64()),
        "strict_cat": pa.array([int(v) for v in rng.integers(0, 4, n)], pa.int64()),
        "recent_tags": pa.array(int_list(5, 14), pa.list_(pa.int64())),
        "tag": pa.array(maybe([int(v) for v in rng.integers(0, 14, n)], 0.1), pa.int64()),
        "words": pa.array(words, pa.list_(pa.string())),
        "price": pa.array(
            maybe([float(v) for v in rng.lognormal(2, 2, n) * rng.choice([-1, 1], n)], 0.1),
            pa.float32(),
        ),
        "activity": pa.array(maybe([float(v) for v in rng.normal(3, 4, n)], 0.1), pa.float32()),
        "raw": pa.array(maybe([float(v) for v in rng.normal(0, 1, n)], 0.1), pa.float32()),
        "click": pa.array(click, pa.int8()),
        "conversion": pa.array((click * (rng.random(n) < 0.3)).astype(np.int8), pa.int8()),
    }
    return pa.table(columns)


def make_edge_run(
    root: Path,
    *,
    seed: int = 0,
    data_seed: int = 0,
    rows: int = 240,
    objective: str = "esmm",
    step: int = 7,
    overrides: Sequence[str] = (),
    prepare: Callable[[Any], None] | None = None,
    dim: int | None = None,
    scoped: bool = False,
) -> Path:
    """A run directory as ``trainer.train`` leaves it (config, schema, DCP checkpoint, metrics)
    around a model of :data:`EDGE_SCHEMA` (``edge_schema(dim, scoped)``) with random weights (``seed``),
    and its data (``data_seed``) under ``root/data``. ``overrides`` are config overrides;
    ``prepare`` may change the ``TrainModule`` before it is saved (e.g. prune it).
    """
    import torch

    from trainer.builders import build_model
    from trainer.checkpoint import CheckpointMeta, save_model_checkpoint
    from trainer.config import load_config, to_dict
    from trainer.objectives import build_objective, model_structure
    from trainer.run_dir import RunDir
    from trainer.train_module import TrainModule

    schema = edge_schema(dim, scoped)
    data, run = root / "data", root / "run"
    (data / "test").mkdir(parents=True, exist_ok=True)
    schema.save(data / "schema.yaml")
    pq.write_table(
        edge_table(rows, data_seed), data / "test" / "part-00000.parquet", row_group_size=100
    )
    config = load_config(
        None,
        [
            f"output_dir={run}",
            f"data.train={data / 'test'}",
            f"data.test={data / 'test'}",
            "model.num_experts=2",
            "model.expert_sizes=[8]",
            "model.tower_sizes=[4]",
            f"objective.name={objective}",
            *overrides,
        ],
    )
    run_dir = RunDir(run)
    run_dir.save_config(config)
    run_dir.save_schema(schema)
    torch.manual_seed(seed)
    objective_ = build_objective(config.objective.name, **config.objective.params)
    module = TrainModule(
        build_model(
            schema, config.model, structure=model_structure(objective_), embedding_device="cpu"
        ),
        objective_,
    )
    with torch.no_grad():  # biases away from 0 so that every parameter matters to the outputs
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.5, 0.5)
    if prepare is not None:
        prepare(module)
    save_model_checkpoint(
        run_dir, module, CheckpointMeta(step, schema.fingerprint(), to_dict(config))
    )
    run_dir.write_evaluation({"ctr_auc": 0.61, "cvr_gauc": float("nan"), "impressions": rows})
    return run


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a DCP checkpoint, whole, by its flat key (``model.model.mmoe...``)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    flat: dict = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", torch.load(target, weights_only=True))
    return flat


def trainer_predictions(run_dir: Path, data: Path) -> np.ndarray:
    """``(N, 3)`` pctr, pcvr, pctcvr of the run's latest checkpoint on ``data``, computed by the
    trainer's own model and reader in this process (the reference for parity)."""
    import torch

    from trainer.builders import build_model
    from trainer.checkpoint import find_checkpoint, load_model_weights
    from trainer.data import ImpressionReader
    from trainer.objectives import build_objective, model_structure
    from trainer.run_dir import RunDir

    run = RunDir(run_dir)
    config, schema = run.load_config(), run.load_schema()
    objective = build_objective(config.objective.name, **config.objective.params)
    model = build_model(
        schema, config.model, structure=model_structure(objective), embedding_device="cpu"
    )
    load_model_weights(find_checkpoint(run), model)
    model.eval()
    out = []
    with torch.no_grad():
        for batch in ImpressionReader(
            data, schema, batch_size=512, shuffle=False, with_truth=False
        ):
            outputs = model(batch.sparse, batch.dense)
            out.append(torch.stack([outputs.pctr, outputs.pcvr, outputs.pctcvr], dim=1).numpy())
    return np.concatenate(out)


def request_rows(data: Path, schema: FeatureSchema, *, drop_nulls_every: int = 2) -> list[dict]:
    """The feature values of every row of ``data`` (files in the reader's order) as JSON rows;
    in every ``drop_nulls_every``-th row, null values are left out instead (both mean missing)."""
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data]
    columns = schema.sparse_names + schema.dense_names
    rows = [row for f in files for row in pq.read_table(f, columns=columns).to_pylist()]
    for i in range(0, len(rows), drop_nulls_every):
        rows[i] = {k: v for k, v in rows[i].items() if v is not None}
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(
    model_dir: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 90.0
) -> Iterator[str]:
    """``python -m serving`` on a free loopback port; yields its base URL once it is ready."""
    with serving_process(["--model-dir", str(model_dir)], log, env, timeout) as url:
        yield url


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Wait until the service of ``proc`` at ``url`` answers ``/readyz`` with 200.

    Raises:
        RuntimeError: the process exited, or was not ready within ``timeout`` s (with the end
            of its ``log``).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@contextmanager
def serving_process(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None, timeout: float = 90.0
) -> Iterator[str]:
    """``python -m serving ARGS`` on a free loopback port; yields its base URL once it is ready,
    and stops it (SIGTERM) at the end."""
    port = free_port()
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                *args,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def as_columns(rows: list[dict]) -> dict[str, list]:
    """Row objects as the columnar form: one list per feature any row names (``None`` elsewhere)."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def score_over_http(
    client: httpx.Client,
    rows: list[dict],
    chunk: int = 200,
    headers: dict | None = None,
    form: str = "rows",
) -> tuple[np.ndarray, set[str]]:
    """Scores of ``rows`` via ``POST /v1/score`` (``form="rows"``) or ``POST /v1/score/columns``
    (``form="columns"``, the same rows as columns) in chunks; also the model versions seen."""
    out, versions = [], set()
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        if form == "rows":
            response = client.post("/v1/score", json={"rows": part}, headers=headers)
        else:
            response = client.post(
                "/v1/score/columns", json={"columns": as_columns(part)}, headers=headers
            )
        assert response.status_code == 200, response.text
        body = response.json()
        versions.add(body["model_version"])
        if form == "rows":
            out.extend([s["pctr"], s["pcvr"], s["pctcvr"]] for s in body["scores"])
        else:
            out.extend(zip(body["pctr"], body["pcvr"], body["pctcvr"]))
    return np.asarray(out, dtype=np.float64), versions


def truncated_copy(
    model_dir: Path, out: Path, file: str | None = None, keep: int = 100, version: str | None = None
) -> Path:
    """A copy of a model directory whose ``file`` (default: its first table) lost all but its
    first ``keep`` bytes while its manifest still lists the original checksum; ``version``
    renames it."""
    import shutil

    from schemas.artifact import Manifest

    shutil.copytree(model_dir, out)
    manifest = Manifest.model_validate_json((out / "manifest.json").read_text())
    target = out / (file or manifest.table_path(manifest.model.tables[0].name))
    target.write_bytes(target.read_bytes()[:keep])
    if version is not None:
        renamed = manifest.model_copy(update={"version": version})
        (out / "manifest.json").write_text(renamed.model_dump_json(indent=2))
    return out
