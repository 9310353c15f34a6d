"""Checkpoint keys and model-only reading, in one process without a process group."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    TensorSpec,
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


def _saved(tmp_path, seed: int = 0) -> tuple[RunDir, TrainModule]:
    run, module = RunDir(tmp_path / "run"), _module(seed)
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


def test_a_saved_model_is_read_back_whole_and_without_objective_or_optimizer(tmp_path):
    run, saved = _saved(tmp_path)
    checkpoint = find_checkpoint(run)
    assert checkpoint.name == "step_00000003" and checkpoint.read_meta().step == 3
    expected = saved.model.state_dict()
    specs = model_tensor_specs(checkpoint)
    assert specs == {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in expected.items()}
    table = next(k for k in specs if "embedding_bags" in k)
    tensors = read_model_tensors(checkpoint, {table: specs[table]})
    torch.testing.assert_close(tensors[table], expected[table], rtol=0, atol=0)


def test_model_weights_load_into_a_model_built_with_other_weights(tmp_path):
    run, saved = _saved(tmp_path, seed=0)
    other = _module(seed=1).model
    assert not torch.equal(other.mmoe.gates["ctr"].weight, saved.model.mmoe.gates["ctr"].weight)
    load_model_weights(find_checkpoint(run), other)
    for key, value in saved.model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_checkpoint_without_dcp_metadata_is_incomplete(tmp_path):
    run, _ = _saved(tmp_path)
    (run.checkpoint(3).path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000003 is not a complete checkpoint"):
        find_checkpoint(run)
