"""Warm start, without training: row maps, sources, plans, refusals and the report.

Sources are run directories as ``trainer.train`` leaves them, made in this process from models
with random weights (``save_model_checkpoint``), and their exports.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas import FeatureSchema, storage
from schemas.artifact import DENSE_FILE, MANIFEST_FILE, Manifest
from schemas.hashing import hash_ints
from trainer.builders import build_model
from trainer.checkpoint import CheckpointMeta, save_model_checkpoint
from trainer.config import TrainConfig, load_config, to_dict
from trainer.export import export_run
from trainer.objectives import build_objective, model_structure
from trainer.run_dir import RunDir
from trainer.train_module import TrainModule
from trainer.warm_start import (
    Fate,
    RowRule,
    SourceKind,
    TableLayout,
    WarmStartError,
    component_of,
    input_columns,
    open_source,
    plan_warm_start,
    row_map,
    run_layout,
)

SCHEMA = {
    "tables": [{"name": "tags", "vocab_size": 10, "dim": 4}],
    "sparse": [
        {"name": "user", "hash_buckets": 60, "dim": 4},
        {"name": "hour", "vocab_size": 24, "dim": 4},
        {"name": "tag", "table": "tags"},
        {"name": "recent_tags", "table": "tags", "multi_valued": True, "max_len": 3},
    ],
    "dense": [{"name": "price"}],
    "labels": {"click": "click", "conversion": "conversion"},
}
TINY = ["model.num_experts=2", "model.expert_sizes=[8]", "model.tower_sizes=[4]"]


def _schema(**changes) -> FeatureSchema:
    """``SCHEMA`` with ``sparse`` features replaced or added by name (None removes one)."""
    data = copy.deepcopy(SCHEMA)
    sparse = {f["name"]: f for f in data["sparse"]}
    for name, feature in changes.items():
        if feature is None:
            sparse.pop(name)
        else:
            sparse[name] = {"name": name, **feature}
    data["sparse"] = list(sparse.values())
    return FeatureSchema.from_dict(data)


def _config(root: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"output_dir={root}", f"data.train={root}/data", *TINY, *overrides])


def _run(root: Path, schema: FeatureSchema, *overrides: str, seed: int = 0, step: int = 5) -> Path:
    """A run directory with one checkpoint at ``step`` of a model with random weights."""
    config = _config(root, *overrides)
    run = RunDir(root)
    run.save_config(config)
    run.save_schema(schema)
    torch.manual_seed(seed)
    objective = build_objective(config.objective.name, **config.objective.params)
    module = TrainModule(
        build_model(
            schema, config.model, structure=model_structure(objective), embedding_device="cpu"
        ),
        objective,
    )
    save_model_checkpoint(run, module, CheckpointMeta(step, schema.fingerprint(), to_dict(config)))
    return root


def _plan(
    source_location,
    schema: FeatureSchema,
    config: TrainConfig,
    *,
    init_optimizer=False,
    objective_parameters=False,
):
    return plan_warm_start(
        open_source(str(source_location)),
        run_layout(config, schema),
        init_optimizer=init_optimizer,
        objective=config.objective.name,
        sparse_optimizer=config.sparse_optimizer.name,
        objective_parameters=objective_parameters,
    )


# Row maps ---------------------------------------------------------------------------------------


def _table(rows: int, hashed: bool = True) -> TableLayout:
    return TableLayout("t", "t.weight", rows=rows, dim=4, hashed=hashed)


def test_a_vocabulary_keeps_every_id_in_both_and_the_oov_row():
    grown = row_map(_table(25, hashed=False), _table(31, hashed=False))
    assert grown.rule is RowRule.VOCABULARY
    assert grown.sources[:24].tolist() == list(range(24))
    assert grown.sources[24:30].tolist() == [-1] * 6  # new ids: initialised as usual
    assert grown.sources[30] == 24  # the OOV row from the OOV row
    shrunk = row_map(_table(25, hashed=False), _table(11, hashed=False))
    assert shrunk.sources.tolist() == [*range(10), 24]


def test_hash_buckets_times_k_keep_every_ids_row():
    ids = np.arange(-5_000, 5_000, dtype=np.int64) * 7919
    old_rows, new_rows = hash_ints(ids, 60), hash_ints(ids, 180)
    rows = row_map(_table(61), _table(181))
    assert rows.rule is RowRule.MODULO and rows.ids_kept == 1.0
    # Every id's new row starts from the row the id read before.
    assert (rows.sources[torch.from_numpy(new_rows.astype(np.int64))].numpy() == old_rows).all()
    assert rows.sources[180] == 60


@pytest.mark.parametrize("old, new", [(60, 90), (60, 61), (90, 60)])
def test_other_bucket_changes_keep_rows_by_position_and_say_how_many_ids_keep_theirs(old, new):
    ids = np.arange(200_000, dtype=np.int64)
    old_rows, new_rows = hash_ints(ids, old), hash_ints(ids, new)
    rows = row_map(_table(old + 1), _table(new + 1))
    assert rows.rule is RowRule.POSITION and rows.sources[new] == old
    kept = min(old, new)
    assert rows.sources[:kept].tolist() == list(range(kept))
    assert (rows.sources[kept:new] == -1).all()
    keeps_own_row = rows.sources[torch.from_numpy(new_rows.astype(np.int64))].numpy() == old_rows
    assert rows.ids_kept == pytest.approx(kept / math.lcm(old, new))
    assert keeps_own_row.mean() == pytest.approx(rows.ids_kept, abs=0.01)


# Input columns ----------------------------------------------------------------------------------


def test_input_columns_follow_the_model_input_order():
    columns = input_columns(_schema(), "dot")
    # Tables in order (the declared tags table first, read by two features), then dense, then
    # one column per pair of the four sparse features.
    assert [c[1] for c in columns[:16:4]] == ["tag", "recent_tags", "user", "hour"]
    assert columns[16] == ("dense", "price")
    assert columns[17:] == (
        ("dot", "recent_tags", "tag"),
        ("dot", "tag", "user"),
        ("dot", "hour", "tag"),
        ("dot", "recent_tags", "user"),
        ("dot", "hour", "recent_tags"),
        ("dot", "hour", "user"),
    )


def test_components_name_heads_and_modules():
    assert component_of("mmoe.gates.imputation.weight") == ("head 'imputation'", ("imputation",))
    assert component_of("towers.ctr.head.bias") == ("head 'ctr'", ("ctr",))
    assert component_of("partially_shared.layers.0.linear.weight")[1] == ("cvr", "imputation")
    assert component_of("mmoe.experts.1.layers.0.0.weight") == ("experts", ())
    assert component_of("cvr_transfer.fuse.weight") == ("cvr_transfer", ())


# Sources ----------------------------------------------------------------------------------------


def test_sources_are_told_apart_by_what_they_hold(tmp_path):
    run = _run(tmp_path / "run", _schema())
    source = open_source(str(run))
    assert (source.kind, source.step, source.checkpoint.name) == (
        SourceKind.RUN,
        5,
        "step_00000005",
    )
    checkpoint = open_source(str(run / "checkpoints" / "step_00000005"))
    assert (
        checkpoint.kind is SourceKind.CHECKPOINT and checkpoint.dense.keys() == source.dense.keys()
    )
    export_run(run, tmp_path / "model", log=None)
    model = open_source(str(tmp_path / "model"))
    assert model.kind is SourceKind.MODEL and model.version.startswith("run-step00000005-")
    # The exported model holds the served tensors of the run's model, nothing else.
    assert set(model.dense) == set(source.dense)  # esmm: no training-only head
    for key, value in model.read_dense(model.dense).items():
        torch.testing.assert_close(value, source.read_dense([key])[key], rtol=0, atol=0)
    torch.testing.assert_close(model.read_table("user"), source.read_table("user"), rtol=0, atol=0)


def test_an_exported_model_lacks_training_only_heads(tmp_path):
    run = _run(tmp_path / "run", _schema(), "objective.name=multi_dr")
    export_run(run, tmp_path / "model", log=None)
    held = open_source(str(tmp_path / "model")).dense
    assert not [key for key in held if "imputation" in key]
    assert [key for key in open_source(str(run)).dense if "imputation" in key]


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing", "no such file or directory"),
        ("empty", "is not a run directory"),
        ("run/checkpoints/step_00000009", "not a complete checkpoint"),
    ],
)
def test_what_is_not_a_source_is_named(tmp_path, where, message):
    _run(tmp_path / "run", _schema())
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_00000009").mkdir()  # an interrupted save
    with pytest.raises(WarmStartError, match=message):
        open_source(str(tmp_path / where))


def test_a_corrupt_exported_file_is_refused_by_its_checksum(tmp_path):
    export_run(_run(tmp_path / "run", _schema()), tmp_path / "model", log=None)
    path = tmp_path / "model" / DENSE_FILE
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(WarmStartError, match=f"{DENSE_FILE}: checksum mismatch"):
        open_source(str(tmp_path / "model"))
    export_run(_run(tmp_path / "run2", _schema()), tmp_path / "model2", log=None)
    source = open_source(str(tmp_path / "model2"))
    manifest = Manifest.model_validate_json((tmp_path / "model2" / MANIFEST_FILE).read_text())
    (tmp_path / "model2" / manifest.table_path("user")).write_bytes(b"not a table")
    with pytest.raises(WarmStartError, match="checksum mismatch"):
        source.read_table("user")


# Plans ------------------------------------------------------------------------------------------


def test_the_same_layout_carries_everything(tmp_path):
    run = _run(tmp_path / "run", _schema())
    plan = _plan(run, _schema(), _config(tmp_path / "new"))
    assert {t.fate for t in plan.tables} == {Fate.CARRIED}
    assert {t.fate for t in plan.tensors} == {Fate.CARRIED}
    assert plan.heads == {"ctr": "carried", "cvr": "carried"}
    report = plan.report()
    assert report["source"] == {
        "kind": "run",
        "location": str(run),
        "checkpoint": "step_00000005",
        "version": None,
        "step": 5,
        "objective": "esmm",
    }
    assert report["optimizer"] == "initialised" and report["features"] == {"new": [], "removed": []}
    assert report["input_columns"] == {"total": 17, "carried": 17, "initialised": 0}
    assert "tables carried (3): tags, user, hour" in plan.summary()


def test_grown_tables_new_features_and_new_heads(tmp_path):
    run = _run(tmp_path / "run", _schema(recent_tags=None))
    schema = _schema(
        user={"hash_buckets": 120, "dim": 4},
        hour={"vocab_size": 30, "dim": 4},
        city={"dtype": "string", "hash_buckets": 20, "dim": 4},
    )
    plan = _plan(run, schema, _config(tmp_path / "new", "objective.name=multi_dr"))
    report = plan.report()
    assert report["tables"]["user"] == {
        "fate": "grown",
        "rows": 121,
        "source_rows": 61,
        "rule": "modulo",
        "rows_carried": 121,
        "ids_kept": 1.0,
    }
    assert report["tables"]["hour"]["rule"] == "vocabulary"
    assert report["tables"]["hour"]["rows_carried"] == 25  # 24 ids and the OOV row
    assert report["tables"]["city"] == {"fate": "initialised", "rows": 21}
    assert report["features"] == {"new": ["recent_tags", "city"], "removed": []}
    # 4 columns of recent_tags' embedding and 4 of city's are new; the rest are matched.
    assert report["input_columns"] == {"total": 21, "carried": 13, "initialised": 8}
    assert plan.heads == {"ctr": "carried", "cvr": "carried", "imputation": "initialised"}
    remapped = {t.key for t in plan.tensors if t.fate is Fate.REMAPPED}
    assert remapped == {
        "mmoe.experts.layers.0.weight",  # every expert's first layer, stacked
        "mmoe.gates.ctr.weight",
        "mmoe.gates.cvr.weight",
    }  # the imputation gate reads the input too, but is new
    summary = plan.summary()
    assert "user 61 -> 121 rows (hash buckets x k: every id keeps its row)" in summary
    assert "tables initialised (1): city" in summary
    assert "heads: ctr carried, cvr carried, imputation initialised" in summary


def test_a_removed_feature_and_a_dropped_head_are_reported(tmp_path):
    run = _run(tmp_path / "run", _schema(), "objective.name=multi_dr")
    plan = _plan(run, _schema(hour=None), _config(tmp_path / "new"))
    report = plan.report()
    assert report["features"] == {"new": [], "removed": ["hour"]}
    assert report["dropped_tables"] == ["hour"] and report["dropped_heads"] == ["imputation"]
    assert report["input_columns"] == {"total": 13, "carried": 13, "initialised": 0}


def test_every_change_that_cannot_be_carried_is_refused_at_once(tmp_path):
    run = _run(tmp_path / "run", _schema())
    schema = _schema(user={"hash_buckets": 60, "dim": 8}, hour={"hash_buckets": 24, "dim": 4})
    config = _config(tmp_path / "new", "model.tower_sizes=[6]", "model.num_experts=3")
    with pytest.raises(WarmStartError) as refused:
        _plan(run, schema, config)
    message = str(refused.value)
    assert message.startswith(f"cannot warm-start from run {run} (step_00000005, step 5):")
    assert "table 'user': embedding dim 4 in the source, 8 here" in message
    assert "table 'hour': vocab_size in the source, hash_buckets here" in message
    assert (
        "head 'ctr': towers.ctr.hidden.layers.0.0.weight has shape (4, 8) in the source" in message
    )
    assert "head 'cvr': towers.cvr.hidden.layers.0.0.weight" in message
    assert "head 'ctr': mmoe.gates.ctr.weight has shape (2, 17)" in message  # 2 experts, not 3


def test_a_served_head_the_source_does_not_have_is_refused(tmp_path):
    run = _run(tmp_path / "run", _schema(), "objective.name=multi_dr")
    adap_sl = _config(tmp_path / "new", "objective.name=multi_dr", "model.tower_sharing=adap_sl")
    with pytest.raises(WarmStartError, match=r"head 'cvr': this run needs partially_shared\."):
        _plan(run, _schema(), adap_sl)
    export_run(run, tmp_path / "model", log=None)
    with pytest.raises(WarmStartError, match="an exported model holds its towers as ordinary"):
        _plan(tmp_path / "model", _schema(), adap_sl)
    # From a run with the same towers, they come along, pruning masks included.
    adap_run = _run(
        tmp_path / "adap", _schema(), "objective.name=multi_dr", "model.tower_sharing=adap_sl"
    )
    plan = _plan(adap_run, _schema(), adap_sl)
    assert {t.fate for t in plan.tensors} == {Fate.CARRIED}
    assert any(".mask_" in t.key for t in plan.tensors)
    assert plan.heads == {"ctr": "carried", "cvr": "carried", "imputation": "carried"}


def test_an_objective_with_parameters_of_its_own_starts_them_fresh(tmp_path):
    # EVI's networks exist once attached to a model; apply_warm_start reads them from there.
    run = _run(tmp_path / "run", _schema(), "objective.name=evi")
    new = _config(tmp_path / "new", "objective.name=evi")
    plan = _plan(run, _schema(), new, objective_parameters=True)
    assert plan.report()["objective_parameters"] == "initialised"
    assert "the objective's own parameters: initialised" in plan.summary()
    carried = _plan(run, _schema(), new, init_optimizer=True, objective_parameters=True)
    assert carried.report()["objective_parameters"] == "carried"


def test_an_adap_sl_run_warm_starts_an_ordinary_one_from_its_export(tmp_path):
    adap_sl = ("objective.name=multi_dr", "model.tower_sharing=adap_sl")
    run = _run(tmp_path / "run", _schema(), *adap_sl, "model.tower_sizes=[4]")
    export_run(run, tmp_path / "model", log=None)
    plan = _plan(tmp_path / "model", _schema(), _config(tmp_path / "new"))
    assert plan.heads == {"ctr": "carried", "cvr": "carried"}  # the folded CVR tower


def test_the_optimizer_state_needs_the_very_layout_of_a_run_or_checkpoint(tmp_path):
    run = _run(tmp_path / "run", _schema())
    plan = _plan(run, _schema(), _config(tmp_path / "new"), init_optimizer=True)
    assert plan.report()["optimizer"] == "carried"
    grown = _schema(user={"hash_buckets": 120, "dim": 4})
    with pytest.raises(
        WarmStartError, match="needs the source's very layout, but table 'user' grown"
    ):
        _plan(run, grown, _config(tmp_path / "new"), init_optimizer=True)
    other = _config(tmp_path / "new", "objective.name=naive", "sparse_optimizer.name=adam")
    with pytest.raises(WarmStartError) as refused:
        _plan(run, _schema(), other, init_optimizer=True)
    assert "the source trained 'esmm', this run 'naive'" in str(refused.value)
    assert "the source used 'rowwise_adagrad', this run 'adam'" in str(refused.value)
    export_run(run, tmp_path / "model", log=None)
    with pytest.raises(WarmStartError, match="an exported model holds no optimizer state"):
        _plan(tmp_path / "model", _schema(), _config(tmp_path / "new"), init_optimizer=True)


def test_the_config_refuses_its_own_directory_and_a_lone_init_optimizer(tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="train.init_from=.* overlaps this run's own directory"):
        _config(tmp_path / "run", f"train.init_from={tmp_path / 'run' / 'checkpoints'}")
    with pytest.raises(ConfigError, match="train.init_optimizer=true .* which is not set"):
        _config(tmp_path / "run", "train.init_optimizer=true")
    assert _config(tmp_path / "b", f"train.init_from={tmp_path / 'a'}").train.init_from


def test_an_exported_model_on_s3_is_a_source(s3, tmp_path):
    run = _run(tmp_path / "run", _schema())
    export_run(run, tmp_path / "model", log=None)
    for path in sorted(p for p in (tmp_path / "model").rglob("*") if p.is_file()):
        relative = path.relative_to(tmp_path / "model").as_posix()
        storage.write_bytes(s3.uri("models", "v1", relative), path.read_bytes())
    remote, local = open_source(s3.uri("models", "v1")), open_source(str(tmp_path / "model"))
    assert remote.kind is SourceKind.MODEL and remote.dense.keys() == local.dense.keys()
    torch.testing.assert_close(remote.read_table("user"), local.read_table("user"), rtol=0, atol=0)
    plan = _plan(s3.uri("models", "v1"), _schema(), _config(tmp_path / "new"))
    assert plan.report()["source"]["location"] == s3.uri("models", "v1")
    with pytest.raises(WarmStartError, match="no such file or directory"):
        open_source(s3.uri("models", "v2"))
