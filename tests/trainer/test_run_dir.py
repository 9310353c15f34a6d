"""The run directory: its files, its checkpoints and their metadata, and the errors naming them."""

from __future__ import annotations

import json
import math

import pytest

from schemas.layout import SCHEMA_FILE
from tests.helpers import tiny_schema
from trainer.config import ConfigError, load_config, to_dict
from trainer.run_dir import CheckpointDir, CheckpointError, CheckpointMeta, RunDir, RunDirError


def _config(root, *overrides):
    return load_config(None, [f"output_dir={root}", "data.train=/data/train", *overrides])


def _meta(step: int = 7) -> CheckpointMeta:
    return CheckpointMeta(step=step, schema_fingerprint="f" * 64, config={"seed": 0})


def _complete(run: RunDir, step: int) -> CheckpointDir:
    checkpoint = run.new_checkpoint(step)
    checkpoint.write_meta(_meta(step))
    return checkpoint


def test_config_and_schema_round_trip_and_follow_the_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.is_run()
    run.save_config(_config(tmp_path / "elsewhere", "train.steps=12"))
    run.save_schema(tiny_schema())
    assert run.is_run()
    assert (tmp_path / "run" / SCHEMA_FILE).is_file()
    config = run.load_config(["data.test=/data/test"])
    assert config.train.steps == 12 and config.data.test == "/data/test"
    # A moved run is found where it is now, not where it was written.
    assert config.output_dir == str(tmp_path / "run")
    assert run.load_schema().fingerprint() == tiny_schema().fingerprint()


def test_a_directory_that_is_no_run_is_named(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=rf"{tmp_path} is not a run directory .*config.yaml"):
        run.load_config()
    with pytest.raises(RunDirError, match=rf"{tmp_path / SCHEMA_FILE} is missing"):
        run.load_schema()
    (tmp_path / "config.yaml").write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        run.load_config()


def test_run_files(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == [] and run.read_pruning() is None
    assert run.read_evaluation() is None
    run.append_metrics({"step": 5, "loss": 0.5})
    run.append_metrics({"step": 10, "loss": 0.25})
    assert run.read_metrics() == [{"step": 5, "loss": 0.5}, {"step": 10, "loss": 0.25}]
    run.write_pruning({"step": 10, "towers": {"cvr": {"total": 0.9}}})
    assert run.read_pruning()["towers"]["cvr"]["total"] == 0.9
    run.write_rank_shards(1, {"t.weight": [{"offsets": [0, 0], "sizes": [3, 4]}]})
    run.write_rank_shards(0, {"t.weight": []})
    assert list(run.read_rank_shards()) == [0, 1]
    run.write_sharding_plan("plan")
    assert run.read_sharding_plan() == "plan"
    run.write_evaluation({"ctr_auc": 0.75, "cvr_gauc": math.nan})
    assert run.read_evaluation() == {"ctr_auc": 0.75, "cvr_gauc": None}
    assert "| ctr_auc | 0.7500 |" in (run.evaluation_dir / "metrics.md").read_text()


def test_malformed_json_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.write_text("pruning.json", "{not json")
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'pruning.json'}: not valid JSON"):
        run.read_pruning()
    with pytest.raises(RunDirError, match="cannot read .*nothing.txt"):
        run.read_text("nothing.txt")


def test_checkpoints_are_listed_oldest_first_and_old_ones_deleted(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    for step in (20, 5, 10):
        _complete(run, step)
    (run.checkpoints_dir / "step_12").mkdir()  # not a checkpoint name: left alone
    assert [c.name for c in run.checkpoints()] == [
        "step_00000005",
        "step_00000010",
        "step_00000020",
    ]
    run.delete_old_checkpoints(keep=2)
    assert [c.name for c in run.checkpoints()] == ["step_00000010", "step_00000020"]
    assert (run.checkpoints_dir / "step_12").is_dir()


def test_a_new_checkpoint_starts_empty(tmp_path):
    run = RunDir(tmp_path)
    (run.checkpoint(3).path / "stale").mkdir(parents=True)
    checkpoint = run.new_checkpoint(3)
    assert checkpoint.exists() and not any(checkpoint.path.iterdir())
    assert not checkpoint.is_complete()


def test_latest_moves_atomically_and_must_name_a_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    first, second = _complete(run, 5), _complete(run, 10)
    run.set_latest(first)
    assert run.latest_checkpoint() == first
    run.set_latest(second)
    assert run.latest_checkpoint() == second
    assert sorted(p.name for p in run.checkpoints_dir.iterdir() if p.is_file()) == ["latest"]
    run.set_latest(run.new_checkpoint(15))  # its meta.json is not written yet
    with pytest.raises(CheckpointError, match="latest names step_00000015, which is incomplete"):
        run.latest_checkpoint()


def test_find_checkpoint_by_name_path_or_latest(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="has no checkpoint yet; train first"):
        run.find_checkpoint()
    checkpoint = _complete(run, 5)
    run.set_latest(checkpoint)
    assert run.find_checkpoint() == checkpoint
    assert run.find_checkpoint("step_00000005") == checkpoint
    assert run.find_checkpoint(checkpoint.path) == checkpoint
    with pytest.raises(CheckpointError, match="step_00000099 is not a complete checkpoint"):
        run.find_checkpoint("step_00000099")


def test_rank_state_round_trips_and_is_none_for_missing_ranks(tmp_path):
    checkpoint = RunDir(tmp_path).new_checkpoint(1)
    checkpoint.write_rank_state(0, b"state")
    assert checkpoint.read_rank_state(0) == b"state"
    assert checkpoint.read_rank_state(1) is None


def test_checkpoint_meta_round_trips(tmp_path):
    checkpoint = RunDir(tmp_path).new_checkpoint(7)
    meta = CheckpointMeta(7, "abc", to_dict(_config(tmp_path)))
    checkpoint.write_meta(meta)
    assert checkpoint.read_meta() == meta
    assert set(json.loads((checkpoint.path / "meta.json").read_text())) == {
        "step",
        "schema_fingerprint",
        "config",
    }


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("[1, 2]", ["expected a JSON object, got list"]),
        ("{", ["not valid JSON"]),
        (
            '{"step": true, "schema_fingerprint": "", "config": {}}',
            ["step: expected an int >= 0, got True", "schema_fingerprint: expected a non-empty"],
        ),
        (
            '{"step": -1, "config": [], "extra": 1}',
            [
                "unknown field 'extra'",
                "step: expected an int >= 0, got -1",
                "schema_fingerprint: missing",
                "config: expected an object",
            ],
        ),
    ],
)
def test_malformed_checkpoint_meta_is_named_with_every_problem(tmp_path, text, problems):
    checkpoint = RunDir(tmp_path).new_checkpoint(7)
    (checkpoint.path / "meta.json").write_text(text)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.read_meta()
    message = str(caught.value)
    assert message.startswith(f"{checkpoint.path / 'meta.json'}: ")
    for problem in problems:
        assert problem in message
