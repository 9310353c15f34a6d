"""Warm start end to end: real runs on simulated days, on one and two processes.

"Yesterday's" runs train on a schema without the ``device`` feature; "today's" schema adds it,
doubles ``user_id``'s hash buckets, grows ``item_id``'s by half and ``hour``'s vocabulary. The
new runs are started with ``tests.trainer.warm_start_probe``, which saves the step-0 checkpoint
right after setup: the weights exactly as the warm start left them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from schemas import FeatureSchema
from tests.trainer.conftest import check, load_checkpoint_tensors, run_train
from trainer.checkpoint import model_key
from trainer.data import SimulatorConfig, simulate
from trainer.export import export_run

PROBE = "tests.trainer.warm_start_probe"
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
FIRST_LAYER = "mmoe.experts.layers.0."  # every expert's first layer (stacked): reads the input
QUIET = ("train.evaluate=false",)


@pytest.fixture(scope="module")
def daily(tmp_path_factory) -> Path:
    cfg = SimulatorConfig(
        rows=16_000,
        days=2,
        seed=5,
        dim=4,
        num_users=2_000,
        num_items=1_500,
        user_buckets=1_000,
        item_buckets=600,
        row_group_rows=4_000,
        file_rows=8_000,
        calibration_rows=20_000,
    )
    return Path(simulate(cfg, tmp_path_factory.mktemp("daily"), progress=False).out_dir)


def _schema_file(daily: Path, name: str, change) -> Path:
    data = FeatureSchema.from_yaml((daily / "schema.yaml").read_text()).model_dump(mode="json")
    change(data)
    path = daily.parent / f"{name}.yaml"
    path.write_text(FeatureSchema.from_dict(data).to_yaml())
    return path


@pytest.fixture(scope="module")
def yesterday_schema(daily) -> Path:
    def without_device(data):
        data["sparse"] = [f for f in data["sparse"] if f["name"] != "device"]

    return _schema_file(daily, "yesterday", without_device)


@pytest.fixture(scope="module")
def today_schema(daily) -> Path:
    sizes = {"user_id": ("hash_buckets", 2_000), "item_id": ("hash_buckets", 900)}
    sizes["hour"] = ("vocab_size", 30)

    def grown(data):
        for feature in data["sparse"]:
            if feature["name"] in sizes:
                key, value = sizes[feature["name"]]
                feature[key] = value

    return _schema_file(daily, "today", grown)


@pytest.fixture(scope="module")
def yesterday_one(daily, yesterday_schema, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("yesterday1")
    check(
        run_train(
            daily,
            run,
            f"data.schema={yesterday_schema}",
            "train.steps=20",
            "train.checkpoint_every=10",
            *QUIET,
        )
    )
    return run


@pytest.fixture(scope="module")
def yesterday_two(daily, yesterday_schema, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("yesterday2")
    check(
        run_train(daily, run, f"data.schema={yesterday_schema}", "train.steps=10", *QUIET, nproc=2)
    )
    return run


@pytest.fixture(scope="module")
def today_scratch(daily, today_schema, tmp_path_factory) -> dict:
    """Today's run from scratch, at step 0: the initialisation a warm start keeps for what is new."""
    run = tmp_path_factory.mktemp("scratch")
    check(_probe(daily, run, today_schema, "objective.name=multi_dr"))
    return _model(run, 0)


def _probe(daily: Path, run: Path, schema: Path, *extra: str, nproc: int = 1):
    return run_train(daily, run, f"data.schema={schema}", *extra, *QUIET, nproc=nproc, entry=PROBE)


def _model(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The model's tensors of a run's checkpoint, by model key."""
    flat = load_checkpoint_tensors(run / "checkpoints" / f"step_{step:08d}")
    return {model_key(k): v for k, v in flat.items() if model_key(k) is not None}


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)


def test_a_run_warm_starts_a_new_run_on_two_processes(
    daily, yesterday_one, yesterday_schema, tmp_path
):
    run = tmp_path / "today"
    done = check(_probe(daily, run, yesterday_schema, f"train.init_from={yesterday_one}", nproc=2))
    assert f"warm start from run {yesterday_one} (step_00000020, step 20)" in done.stdout
    warm, source = _model(run, 0), _model(yesterday_one, 20)
    assert warm.keys() == source.keys()
    for key in warm:  # every table and layer, gathered from the two ranks' shards
        _same(warm[key], source[key], key)
    report = json.loads((run / "warm_start.json").read_text())
    assert report["source"]["kind"] == "run" and report["source"]["step"] == 20
    assert {t["fate"] for t in report["tables"].values()} == {"carried"}
    assert report["heads"] == {"ctr": "carried", "cvr": "carried"}
    assert report["optimizer"] == "initialised"


def test_a_checkpoint_warm_starts_a_new_run(daily, yesterday_one, yesterday_schema, tmp_path):
    older = yesterday_one / "checkpoints" / "step_00000010"
    check(_probe(daily, tmp_path / "today", yesterday_schema, f"train.init_from={older}"))
    warm = _model(tmp_path / "today", 0)
    for key, value in _model(yesterday_one, 10).items():
        _same(warm[key], value, key)
    latest = _model(yesterday_one, 20)[TABLE.format("user_id")]
    assert not torch.equal(warm[TABLE.format("user_id")], latest)  # the one named, not the latest
    report = json.loads((tmp_path / "today" / "warm_start.json").read_text())
    assert report["source"]["kind"] == "checkpoint" and report["source"]["step"] == 10


def _check_today(warm: dict, source: dict, scratch: dict) -> None:
    """Today's tables and input weights as the rules say, from yesterday's ``source``."""
    user, item, hour = (TABLE.format(t) for t in ("user_id", "item_id", "hour"))
    # user_id: 1000 -> 2000 buckets, a whole multiple: row r from row r mod 1000.
    _same(warm[user][:2_000], source[user][:1_000].repeat(2, 1), "user_id rows")
    _same(warm[user][2_000], source[user][1_000], "user_id OOV row")
    # item_id: 600 -> 900 buckets: rows by position, the new ones as a fresh run has them.
    _same(warm[item][:600], source[item][:600], "item_id rows")
    _same(warm[item][600:900], scratch[item][600:900], "item_id new rows")
    _same(warm[item][900], source[item][600], "item_id OOV row")
    # hour: a vocabulary of 24 -> 30 ids.
    _same(warm[hour][:24], source[hour][:24], "hour ids")
    _same(warm[hour][24:30], scratch[hour][24:30], "hour new ids")
    _same(warm[hour][30], source[hour][24], "hour OOV row")
    device = TABLE.format("device")
    assert device not in source
    _same(warm[device], scratch[device], "device, a new feature")
    inputs = {
        k for k in warm if k.endswith(".weight") and k.startswith(("mmoe.gates.", FIRST_LAYER))
    }
    assert len(inputs) == 1 + 3  # the experts' first layer, three gates
    for key, value in warm.items():
        if "imputation" in key:  # a head that is new today
            _same(value, scratch[key], key)
        elif key in inputs:
            # The input: [embeddings of every table..., device's 4 columns (its table is
            # last), price, user_activity]; yesterday's has no device columns.
            _same(value[..., :-6], source[key][..., :-2], f"{key}: embedding columns")
            _same(value[..., -2:], source[key][..., -2:], f"{key}: dense columns")
            _same(value[..., -6:-2], scratch[key][..., -6:-2], f"{key}: device's new columns")
        elif key not in (user, item, hour, device):
            _same(value, source[key], key)


def test_grown_tables_new_features_and_heads_across_world_sizes(
    daily, yesterday_two, today_schema, today_scratch, tmp_path
):
    run = tmp_path / "today"
    done = check(
        _probe(
            daily, run, today_schema, "objective.name=multi_dr", f"train.init_from={yesterday_two}"
        )
    )
    _check_today(_model(run, 0), _model(yesterday_two, 10), today_scratch)
    report = json.loads((run / "warm_start.json").read_text())
    assert report["tables"]["user_id"]["rule"] == "modulo"
    assert report["tables"]["item_id"] | {"ids_kept": None} == {
        "fate": "grown",
        "rows": 901,
        "source_rows": 601,
        "rule": "position",
        "rows_carried": 601,
        "ids_kept": None,
    }
    assert report["tables"]["item_id"]["ids_kept"] == pytest.approx(600 / 1_800)
    assert report["tables"]["device"] == {"fate": "initialised", "rows": 17}
    assert report["features"] == {"new": ["device"], "removed": []}
    assert report["heads"]["imputation"] == "initialised"
    assert "tables initialised (1): device" in done.stdout


def test_an_exported_model_warm_starts_a_new_run(
    daily, yesterday_one, today_schema, today_scratch, tmp_path
):
    export_run(yesterday_one, tmp_path / "model", log=None)
    run = tmp_path / "today"
    check(
        _probe(
            daily,
            run,
            today_schema,
            "objective.name=multi_dr",
            f"train.init_from={tmp_path / 'model'}",
        )
    )
    _check_today(_model(run, 0), _model(yesterday_one, 20), today_scratch)
    report = json.loads((run / "warm_start.json").read_text())
    assert report["source"]["kind"] == "model" and report["source"]["version"]
    assert report["heads"] == {"ctr": "carried", "cvr": "carried", "imputation": "initialised"}


def test_the_optimizer_state_comes_too_when_asked(daily, yesterday_two, yesterday_schema, tmp_path):
    run = tmp_path / "today"
    check(
        _probe(
            daily,
            run,
            yesterday_schema,
            f"train.init_from={yesterday_two}",
            "train.init_optimizer=true",
        )
    )
    warm = load_checkpoint_tensors(run / "checkpoints" / "step_00000000")
    source = load_checkpoint_tensors(yesterday_two / "checkpoints" / "step_00000010")
    optimizer = [k for k in source if k.startswith("optimizer.") and torch.is_tensor(source[k])]
    assert any("exp_avg" in k for k in optimizer) and any("momentum" in k for k in optimizer)
    assert set(optimizer) <= set(warm)
    for key in optimizer + [k for k in source if model_key(k) is not None]:
        _same(warm[key], source[key], key)
    assert json.loads((run / "warm_start.json").read_text())["optimizer"] == "carried"


def test_a_warm_started_run_resumes_from_its_own_checkpoints(
    daily, yesterday_one, yesterday_schema, tmp_path
):
    run = tmp_path / "today"
    common = (f"data.schema={yesterday_schema}", f"train.init_from={yesterday_one}", *QUIET)
    first = check(run_train(daily, run, "train.steps=6", *common))
    assert "warm start from run" in first.stdout
    report = (run / "warm_start.json").read_text()
    again = check(run_train(daily, run, "train.steps=9", *common, resume=True))
    assert "resumed from" in again.stdout and "warm start from" not in again.stdout
    assert (run / "checkpoints" / "latest").read_text() == "step_00000009"
    assert (run / "warm_start.json").read_text() == report


def test_a_change_that_cannot_be_carried_is_refused_naming_the_table(
    daily, yesterday_one, tmp_path
):
    def wider_users(data):
        for feature in data["sparse"]:
            if feature["name"] == "user_id":
                feature["dim"] = 8

    schema = _schema_file(daily, "wider", wider_users)
    done = run_train(
        daily, tmp_path / "today", f"data.schema={schema}", f"train.init_from={yesterday_one}"
    )
    assert done.returncode == 2
    assert "table 'user_id': embedding dim 4 in the source, 8 here" in done.stderr
    assert not (tmp_path / "today" / "checkpoints").exists()
