"""Adap-SL through the real recipe: pruning on 2 ranks, masks in checkpoints, resume, export."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from schemas import load_schema
from serving.artifact import load_artifact
from tests.serving.artifacts import request_rows, trainer_predictions
from tests.trainer.conftest import check, load_checkpoint_tensors, run_train
from trainer.export import export_run

# Epochs of 5 steps; 30 % of the remaining weights each time, cvr from the first epoch down to
# 40 %, imputation from the second down to 50 % (its default floor).
ADAP_SL = (
    "objective.name=multi_dr",
    "objective.params.undersample_rate=null",
    "model.tower_sharing=adap_sl",
    "model.dropout=0.1",
    "model.adap_sl.epoch_steps=5",
    "model.adap_sl.cvr.warmup_epochs=0",
    "model.adap_sl.cvr.rate=0.3",
    "model.adap_sl.cvr.min_density=0.4",
    "model.adap_sl.imputation.warmup_epochs=1",
    "model.adap_sl.imputation.rate=0.3",
    "train.evaluate=false",
    "train.checkpoint_every=10",
)


def _masks(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if ".mask_" in k}


def test_masks_are_checkpointed_and_a_resumed_run_prunes_as_an_uninterrupted_one(
    sim_data, tmp_path
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(run_train(sim_data, straight, "train.steps=30", *ADAP_SL, nproc=2))
    check(
        run_train(sim_data, resumed, "train.steps=12", *ADAP_SL, nproc=2)
    )  # stops inside an epoch
    done = check(run_train(sim_data, resumed, "train.steps=30", *ADAP_SL, nproc=2, resume=True))
    assert (
        "resumed from" in done.stdout + done.stderr
        and "pruned cvr, imputation" in done.stdout + done.stderr
    )

    a = load_checkpoint_tensors(straight / "checkpoints" / "step_00000030")
    b = load_checkpoint_tensors(resumed / "checkpoints" / "step_00000030")
    assert a.keys() == b.keys() and len(_masks(a)) == 6  # 1 hidden layer (shared: 2 masks), heads
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert all(set(m.unique().tolist()) == {0.0, 1.0} for m in _masks(a).values())

    # Table 4 in the run's outputs: cvr pruned at steps 5..30, imputation at 10..30; six or five
    # prunes at 30 % would leave 12 % or 17 %, so both stop at their floors.
    report = json.loads((straight / "pruning.json").read_text())
    assert report["step"] == 30
    for tower, floor in (("cvr", 0.4), ("imputation", 0.5)):
        row = report["towers"][tower]
        assert row["total_kept"] == int(np.ceil(floor * row["total_weights"])), tower
        assert 0 < row["shared"] < 1 and 0 < row["private"] < 1
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    densities = [line["density/imputation"] for line in lines]
    assert (
        densities[0] == 1.0
        and densities == sorted(densities, reverse=True)
        and densities[-1] < 0.51
    )


def test_a_trained_adap_sl_run_exports_and_serves_with_the_trainers_predictions(sim_data, tmp_path):
    run = tmp_path / "run"
    check(run_train(sim_data, run, "train.steps=20", *ADAP_SL))
    sample = tmp_path / "sample"
    sample.mkdir()
    first = min((sim_data / "test").glob("*.parquet"))
    pq.write_table(pq.read_table(first).slice(0, 1500), sample / "part-00000.parquet")
    export_run(run, tmp_path / "model", log=None)
    artifact = load_artifact(tmp_path / "model")
    schema = load_schema(run / "schema.yaml")
    got = artifact.model.predict(artifact.featurizer(request_rows(sample, schema)))
    np.testing.assert_allclose(got, trainer_predictions(run, sample), atol=1e-5, rtol=0)
