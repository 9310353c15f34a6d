"""The run directory: its files, its checkpoints and their metadata, and the errors naming them,
on the local disk and on a real S3 server (the ``s3`` fixture) alike."""

from __future__ import annotations

import json
import math

import pytest

from schemas import storage
from schemas.layout import SCHEMA_FILE
from schemas.storage import StorageError
from tests.helpers import tiny_schema
from trainer.config import ConfigError, load_config, to_dict
from trainer.run_dir import CheckpointDir, CheckpointError, CheckpointMeta, RunDir, RunDirError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A run directory's location that does not exist yet: a local path or an s3:// URI."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3").uri("runs", "run")


def _config(root, *overrides):
    return load_config(None, [f"output_dir={root}", "data.train=/data/train", *overrides])


def _meta(step: int = 7) -> CheckpointMeta:
    return CheckpointMeta(step=step, schema_fingerprint="f" * 64, config={"seed": 0})


def _complete(run: RunDir, step: int) -> CheckpointDir:
    checkpoint = run.new_checkpoint(step)
    checkpoint.write_meta(_meta(step))
    return checkpoint


def _files_under(location) -> list[str]:
    return [
        e.location.relative_to(storage.resolve(location))
        for e in storage.list_dir(location, recursive=True)
        if e.kind is storage.Kind.FILE
    ]


def test_config_and_schema_round_trip_and_follow_the_directory(root, tmp_path):
    run = RunDir(root)
    assert not run.is_run()
    run.save_config(_config(tmp_path / "elsewhere", "train.steps=12"))
    run.save_schema(tiny_schema())
    assert run.is_run()
    assert storage.is_file(storage.join(root, SCHEMA_FILE))
    config = run.load_config(["data.test=/data/test"])
    assert config.train.steps == 12 and config.data.test == "/data/test"
    # A moved run is found where it is now, not where it was written.
    assert config.output_dir == root
    assert run.load_schema().fingerprint() == tiny_schema().fingerprint()
    assert run.location == (root if root.startswith("s3://") else str(tmp_path / "run"))
    assert run.name == "run"


def test_the_saved_config_records_uris_and_never_a_secret(s3):
    root = s3.uri("runs", "uri")
    run = RunDir(root)
    run.save_config(_config(root, f"data.train={s3.uri('logs')}"))
    text = storage.read_text(storage.join(root, "config.yaml"))
    assert f"output_dir: {root}" in text and f"train: {s3.uri('logs')}" in text
    credentials = s3.server.credentials
    assert credentials.secret_access_key not in text and credentials.access_key_id not in text


def test_a_uri_with_credentials_is_refused_before_anything_is_written():
    with pytest.raises(ConfigError, match="output_dir: .*credentials in a URI are not accepted"):
        _config("s3://AKIA:topsecret@bucket/run")
    with pytest.raises(StorageError, match="credentials in a URI") as caught:
        RunDir("s3://AKIA:topsecret@bucket/run")
    assert "topsecret" not in str(caught.value)


def test_a_directory_that_is_no_run_is_named(root):
    run = RunDir(root)
    with pytest.raises(RunDirError, match=rf"{root} is not a run directory .*config.yaml"):
        run.load_config()
    with pytest.raises(RunDirError, match=rf"{storage.join(root, SCHEMA_FILE)} is missing"):
        run.load_schema()
    storage.write_text(storage.join(root, "config.yaml"), "train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        run.load_config()


def test_run_files(root):
    run = RunDir(root)
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
    assert "| ctr_auc | 0.7500 |" in storage.read_text(run.evaluation_dir.join("metrics.md"))
    # Every write is whole: no staging file is left beside the run's files.
    assert sorted(_files_under(root)) == [
        "eval/metrics.json",
        "eval/metrics.md",
        "metrics.jsonl",
        "pruning.json",
        "sharding_plan.txt",
        "shards/rank0.json",
        "shards/rank1.json",
    ]


def test_malformed_json_and_missing_files_are_named(root):
    run = RunDir(root)
    run.write_text("pruning.json", "{not json")
    with pytest.raises(RunDirError, match=rf"{storage.join(root, 'pruning.json')}: not valid JSON"):
        run.read_pruning()
    with pytest.raises(RunDirError, match=r"cannot read .*nothing.txt: no such (file|object)"):
        run.read_text("nothing.txt")


def test_checkpoints_are_listed_oldest_first_and_old_ones_deleted(root):
    run = RunDir(root)
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    for step in (20, 5, 10):
        _complete(run, step)
    storage.write_text(run.checkpoints_dir.join("step_12", "x"), "")  # not a checkpoint name
    assert [c.name for c in run.checkpoints()] == [
        "step_00000005",
        "step_00000010",
        "step_00000020",
    ]
    run.delete_old_checkpoints(keep=2)
    assert [c.name for c in run.checkpoints()] == ["step_00000010", "step_00000020"]
    assert storage.is_dir(run.checkpoints_dir.join("step_12"))  # left alone


def test_pruning_keeps_latest_and_deletes_what_interrupted_saves_left(root):
    run = RunDir(root)
    for step in (10, 20, 30):
        _complete(run, step)
    run.set_latest(run.checkpoint(20))  # resumed from 20; 30 came from an older attempt
    stale = run.new_checkpoint(25)  # a save cut off before its meta.json
    storage.write_text(stale.file("__0_0.distcp"), "half")
    run.delete_old_checkpoints(keep=1)
    assert [c.name for c in run.checkpoints()] == ["step_00000020"]
    assert run.latest_checkpoint() == run.checkpoint(20)


def test_a_new_checkpoint_starts_empty(root):
    run = RunDir(root)
    storage.write_text(run.checkpoint(3).file("stale/x"), "old")
    checkpoint = run.new_checkpoint(3)
    assert _files_under(run.checkpoints_dir) == []
    assert not checkpoint.is_complete()
    checkpoint.write_rank_state(0, b"state")
    assert checkpoint.exists() and checkpoint.file_sizes() == {"rank0.pt": 5}


def test_latest_moves_atomically_and_must_name_a_complete_checkpoint(root):
    run = RunDir(root)
    first, second = _complete(run, 5), _complete(run, 10)
    run.set_latest(first)
    assert run.latest_checkpoint() == first
    run.set_latest(second)
    assert run.latest_checkpoint() == second
    assert [
        e.name for e in storage.list_dir(run.checkpoints_dir) if e.kind is storage.Kind.FILE
    ] == ["latest"]
    run.set_latest(run.new_checkpoint(15))  # its meta.json is not written yet
    with pytest.raises(CheckpointError, match="latest names step_00000015, which is incomplete"):
        run.latest_checkpoint()


def test_find_checkpoint_by_name_path_or_latest(root):
    run = RunDir(root)
    with pytest.raises(CheckpointError, match="has no checkpoint yet; train first"):
        run.find_checkpoint()
    checkpoint = _complete(run, 5)
    run.set_latest(checkpoint)
    assert run.find_checkpoint() == checkpoint
    assert run.find_checkpoint("step_00000005") == checkpoint
    assert run.find_checkpoint(checkpoint.location) == checkpoint
    assert run.find_checkpoint(checkpoint.location).location == checkpoint.location
    with pytest.raises(CheckpointError, match="step_00000099 is not a complete checkpoint"):
        run.find_checkpoint("step_00000099")


def test_rank_state_round_trips_and_is_none_for_missing_ranks(root):
    checkpoint = RunDir(root).new_checkpoint(1)
    checkpoint.write_rank_state(0, b"state")
    assert checkpoint.read_rank_state(0) == b"state"
    assert checkpoint.read_rank_state(1) is None


def test_checkpoint_meta_round_trips(root):
    checkpoint = RunDir(root).new_checkpoint(7)
    meta = CheckpointMeta(7, "abc", to_dict(_config(root)))
    checkpoint.write_meta(meta)
    assert checkpoint.read_meta() == meta
    assert set(json.loads(storage.read_text(checkpoint.file("meta.json")))) == {
        "step",
        "schema_fingerprint",
        "config",
    }


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("[1, 2]", ["expected a JSON object, got list"]),
        ("{", ["not valid JSON"]),
        ('{"step": 7, "schema_fing', ["not valid JSON"]),  # truncated
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
    storage.write_text(checkpoint.file("meta.json"), text)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.read_meta()
    message = str(caught.value)
    assert message.startswith(f"{checkpoint.file('meta.json')}: ")
    for problem in problems:
        assert problem in message


def test_a_truncated_meta_json_on_s3_is_named(s3):
    run = RunDir(s3.uri("run"))
    checkpoint = _complete(run, 7)
    whole = storage.read_bytes(checkpoint.file("meta.json"))
    storage.write_bytes(checkpoint.file("meta.json"), whole[: len(whole) // 2])
    run.set_latest(checkpoint)
    with pytest.raises(CheckpointError, match=rf"^{checkpoint.file('meta.json')}: not valid JSON"):
        run.latest_checkpoint().read_meta()


def test_a_run_directory_fault_mid_training_ends_the_run_with_an_error_line(
    tmp_path, monkeypatch, capsys
):
    # What an outage between checking and reading checkpoints/latest does while a checkpoint is
    # saved (the read fails with RunDirError): here made certain by a pointer that is not text.
    from trainer import train
    from trainer.recipe import TrainRecipe

    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_bytes(b"\xff\xfe")

    class SavingRecipe:
        def train(self) -> None:
            run.delete_old_checkpoints(keep=2)  # as save_checkpoint does after a save

        def cleanup(self) -> None:
            pass

    monkeypatch.setattr(TrainRecipe, "from_files", lambda *args, **kwargs: SavingRecipe())
    assert train.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {tmp_path / 'run' / 'checkpoints' / 'latest'}: ")


def test_a_read_cut_off_by_an_outage_names_the_file_once_and_what_to_check(s3):
    run = RunDir(s3.uri("runs", "outage"))
    run.write_text("checkpoints/latest", "step_00000005")
    location = run.file("checkpoints/latest")
    with s3.server.stopped(), pytest.raises(RunDirError) as caught:
        run.read_text("checkpoints/latest")
    message = str(caught.value)
    assert message.startswith(f"cannot read {location}: endpoint ")
    assert "unreachable after 2 attempt(s)" in message and "check AWS_ENDPOINT_URL" in message
    assert message.count("cannot read") == 1
