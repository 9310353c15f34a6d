"""DDPO and EVI through the real recipe: training steps, evaluation, checkpoint, export, serving.

Their models differ from the others': DDPO fuses other heads' features into the CVR tower's
input (kept at export), EVI trains a teacher head and learned VIE layers of its own (left out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import load_schema
from serving.artifact import load_artifact
from tests.serving.artifacts import request_rows, trainer_predictions
from tests.trainer.conftest import REPO, check, load_checkpoint_tensors, read_metrics, run_train
from trainer.config import load_config
from trainer.export import export_run
from trainer.objectives import build_objective

STEPS = ("train.steps=12", "model.tower_sizes=[8,4]")


def _logged_terms(run: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k.removeprefix("loss/"): v for k, v in lines[-1].items() if k.startswith("loss/")}


def _sample(test_dir: Path, out: Path, rows: int = 300) -> Path:
    """The first ``rows`` test impressions as one Parquet file (with the data set's schema)."""
    out.mkdir(parents=True)
    table = pq.read_table(min(test_dir.glob("*.parquet"))).slice(0, rows)
    pq.write_table(table, out / "part-00000.parquet")
    return out


def test_ddpo_trains_and_its_artifact_serves_the_trainers_predictions(sim_data, tmp_path):
    run = tmp_path / "run"
    check(run_train(sim_data, run, "objective.name=ddpo", *STEPS))
    terms = _logged_terms(run)
    assert set(terms) == {"ctr", "conversion_propensity", "cvr_ddpo", "ctcvr"}
    assert all(math.isfinite(v) for v in terms.values())
    metrics = read_metrics(run)
    assert math.isfinite(metrics["cvr_auc_whole_space"]) and math.isfinite(metrics["cvr_bias"])
    manifest = export_run(run, tmp_path / "model", log=None)
    assert manifest.model.cvr_transfer == ("ctr", "conversion_propensity")
    data = _sample(sim_data / "test", tmp_path / "sample")
    artifact = load_artifact(tmp_path / "model")
    got = artifact.model.predict(
        artifact.featurizer(request_rows(data, load_schema(run / "schema.yaml")))
    )
    np.testing.assert_allclose(got, trainer_predictions(run, data), atol=1e-5, rtol=0)


def test_evi_trains_on_two_ranks_with_its_vie_layers_checkpointed_and_left_out_of_the_export(
    sim_data, tmp_path
):
    run = tmp_path / "run"
    check(run_train(sim_data, run, "objective.name=evi", *STEPS, "data.batch_size=128", nproc=2))
    terms = _logged_terms(run)
    assert set(terms) == {"ctr", "cvr_teacher", "cvr_evi", "vie", "ctcvr"}
    assert all(math.isfinite(v) for v in terms.values())
    assert math.isfinite(read_metrics(run)["cvr_auc_whole_space"])
    tensors = load_checkpoint_tensors(run / "checkpoints" / "step_00000012")
    rho = [k for k in tensors if k.endswith("objective.vie.0.rho")]
    assert rho and not np.allclose(tensors[rho[0]].numpy(), 5.0)  # the variances were trained
    manifest = export_run(run, tmp_path / "model", log=None)
    assert manifest.model.heads == ("ctr", "cvr")
    assert load_artifact(tmp_path / "model").version == manifest.version


@pytest.mark.parametrize(
    "path", sorted((REPO / "trainer" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads_and_builds_its_objective(path):
    config = load_config(path)
    build_objective(config.objective.name, **config.objective.params)
