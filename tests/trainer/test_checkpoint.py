"""Checkpoint keys and model-only reading, in one process without a process group, on the local
disk and on a real S3 server; truncated and missing files named."""

from __future__ import annotations

import pytest
import torch

from schemas import storage
from schemas.storage import StorageError
from tests.helpers import tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    TensorSpec,
    check_files,
    checkpoint_key,
    find_checkpoint,
    load_model_weights,
    model_key,
    model_tensor_specs,
    read_model_tensors,
    save_model_checkpoint,
)
from trainer.objectives import build_objective, model_structure
from trainer.run_dir import RunDir
from trainer.train_module import TrainModule


def _module(seed: int, objective: str = "evi") -> TrainModule:
    torch.manual_seed(seed)
    built = build_objective(objective)
    model = build_model(
        tiny_schema(), mmoe_tiny(), structure=model_structure(built), embedding_device="cpu"
    )
    return TrainModule(model, built)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3").uri("runs", "run")


def _saved(root, seed: int = 0) -> tuple[RunDir, TrainModule]:
    run, module = RunDir(root), _module(seed)
    meta = CheckpointMeta(3, tiny_schema().fingerprint(), {"seed": seed})
    save_model_checkpoint(run, module, meta)
    return run, module


def test_keys_map_between_the_train_module_and_the_model():
    module = _module(0)
    assert any(key.startswith("objective.") for key in module.state_dict())  # EVI's networks
    # The checkpoint holds {"model": TrainModule.state_dict()}, flattened by DCP.
    stored = {f"model.{key}" for key in module.state_dict()}
    model_keys = set(module.model.state_dict())
    assert {checkpoint_key(key) for key in model_keys} <= stored
    assert {model_key(key) for key in stored} - {None} == model_keys
    assert model_key("model.objective.vie.0.rho") is None
    assert model_key("optimizer.state.x") is None


def test_a_saved_model_is_read_back_whole_and_without_objective_or_optimizer(root):
    run, saved = _saved(root)
    checkpoint = find_checkpoint(run)
    assert checkpoint.name == "step_00000003" and checkpoint.read_meta().step == 3
    expected = saved.model.state_dict()
    specs = model_tensor_specs(checkpoint)
    assert specs == {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in expected.items()}
    table = next(k for k in specs if "embedding_bags" in k)
    tensors = read_model_tensors(checkpoint, {table: specs[table]})
    torch.testing.assert_close(tensors[table], expected[table], rtol=0, atol=0)


def test_model_weights_load_into_a_model_built_with_other_weights(root):
    run, saved = _saved(root, seed=0)
    other = _module(seed=1).model
    assert not torch.equal(other.mmoe.gates["ctr"].weight, saved.model.mmoe.gates["ctr"].weight)
    load_model_weights(find_checkpoint(run), other)
    for key, value in saved.model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_checkpoint_without_dcp_metadata_is_incomplete(root):
    run, _ = _saved(root)
    storage.delete_file(run.checkpoint(3).file(".metadata"))
    with pytest.raises(CheckpointError, match=r"step_00000003 is not a complete checkpoint"):
        find_checkpoint(run)


def _data_file(run: RunDir) -> str:
    return next(n for n in run.checkpoint(3).file_sizes() if n.endswith(".distcp"))


def test_a_truncated_shard_is_named_before_anything_is_loaded(root):
    run, _ = _saved(root)
    shard = run.checkpoint(3).file(_data_file(run))
    whole = storage.read_bytes(shard)
    storage.write_bytes(shard, whole[: len(whole) - 100])
    with pytest.raises(CheckpointError, match=rf"^{shard} is truncated: {len(whole) - 100} bytes"):
        find_checkpoint(run)
    storage.delete_file(shard)
    with pytest.raises(CheckpointError, match=rf"^{shard} is missing"):
        check_files(run.checkpoint(3))


def test_a_corrupt_shard_of_the_right_size_is_a_named_error(root):
    run, _ = _saved(root)
    shard = run.checkpoint(3).file(_data_file(run))
    storage.write_bytes(shard, bytes(len(storage.read_bytes(shard))))
    checkpoint = find_checkpoint(run)  # the sizes are right
    specs = model_tensor_specs(checkpoint)
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {checkpoint}: .*corrupt"):
        read_model_tensors(checkpoint, specs)


def test_truncated_dcp_metadata_is_named(root):
    run, _ = _saved(root)
    metadata = run.checkpoint(3).file(".metadata")
    storage.write_bytes(metadata, storage.read_bytes(metadata)[:50])
    with pytest.raises(CheckpointError, match=rf"^{metadata} is not readable DCP metadata"):
        find_checkpoint(run)


def test_storage_faults_name_the_checkpoint_and_what_to_check(s3, monkeypatch):
    run, _ = _saved(s3.uri("run"))
    checkpoint = find_checkpoint(run)
    specs = model_tensor_specs(checkpoint)
    with s3.server.stopped(), pytest.raises(StorageError) as caught:
        read_model_tensors(checkpoint, specs)
    assert str(caught.value).startswith(f"{checkpoint}: cannot read: endpoint ")
    assert "unreachable after 2 attempt(s)" in str(caught.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123")
    with pytest.raises(StorageError, match="access denied .*check AWS_ACCESS_KEY_ID") as caught:
        read_model_tensors(checkpoint, specs)
    assert "wrong-secret-0123" not in str(caught.value)
