"""Every registered objective against the whole ``Objective`` contract (trainer/objectives/base.py):
each member present with the right type, its typed hyper-parameters documented and checked, and
no caller reading a member with a ``getattr`` fallback."""

import ast
import dataclasses
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from torch import nn

from tests.helpers import tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.model import ModelStructure
from trainer.objectives import (
    OBJECTIVES,
    LossOutput,
    Objective,
    ParamsError,
    objective_params,
    param_names,
    params_to_dict,
)
from trainer.train_module import TrainModule

REPO = Path(__file__).resolve().parents[2]
MEMBERS = (
    "params_type",
    "required_heads",
    "model_structure",
    "detached_heads",
    "head_l2",
    "attach",
    "__call__",
)
NAMES = sorted(OBJECTIVES)


def _group_types(params_type: type) -> list[type]:
    hints = typing.get_type_hints(params_type).values()
    return [hint for hint in hints if isinstance(hint, type) and dataclasses.is_dataclass(hint)]


def test_the_protocol_declares_every_member_the_trainer_reads():
    declared = set(Objective.__annotations__) | {
        name
        for name, value in vars(Objective).items()
        if callable(value) or isinstance(value, property)
    }
    assert set(MEMBERS) <= declared


@pytest.mark.parametrize("name", NAMES)
def test_class_level_declarations(name):
    cls = OBJECTIVES[name]
    # Composition, not implementation inheritance: a plain class, or an nn.Module for learned
    # parameters of its own.
    assert cls.__bases__ in ((object,), (nn.Module,)), cls.__bases__
    assert dataclasses.is_dataclass(cls.params_type)
    assert cls.params_type.__dataclass_params__.frozen
    assert isinstance(cls.required_heads, frozenset)
    assert all(isinstance(head, str) for head in cls.required_heads)
    assert not cls.required_heads & {"ctr", "cvr"}


@pytest.mark.parametrize("name", NAMES)
def test_every_member_is_present_with_its_type_and_works_on_a_real_model(name):
    cls = OBJECTIVES[name]
    objective = cls(cls.params_type())
    assert isinstance(objective, Objective)
    for member in MEMBERS:
        assert hasattr(objective, member), member
    structure = objective.model_structure
    assert isinstance(structure, ModelStructure)
    assert structure.extra_heads == cls.required_heads
    assert isinstance(objective.detached_heads, frozenset)
    assert objective.detached_heads <= cls.required_heads | {"ctr", "cvr"}
    assert isinstance(objective.head_l2, Mapping)
    for head, coefficient in objective.head_l2.items():
        assert head in cls.required_heads and isinstance(coefficient, float) and coefficient > 0
    assert callable(objective.attach) and callable(objective)

    torch.manual_seed(0)
    model = build_model(
        tiny_schema(),
        mmoe_tiny(),
        structure=structure,
        detached_heads=objective.detached_heads,
        embedding_device="cpu",
    )
    module = TrainModule(model, objective).train()  # calls attach(model)
    batch = tiny_batch([1, 1, 0, 0], [1, 0, 0, 0])
    loss = objective(model(batch.sparse, batch.dense), batch)
    assert isinstance(loss, LossOutput) and loss.total.dim() == 0
    assert math.isfinite(loss.total.item())
    assert loss.terms and all(t.dim() == 0 for t in loss.terms.values())
    total, (logged, _) = module(batch)
    assert {f"l2_{head}" for head in objective.head_l2} <= set(logged.terms)
    assert math.isfinite(total.item())


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_is_documented_and_round_trips_through_a_config(name):
    params_type = OBJECTIVES[name].params_type
    docs = "".join(t.__doc__ or "" for t in (params_type, *_group_types(params_type)))
    keys = param_names(params_type)
    for key in keys:
        assert f"{key}:" in docs, f"{params_type.__name__} does not document {key}"
    resolved = params_to_dict(params_type())
    assert tuple(resolved) == keys
    assert all(v is None or type(v) in (bool, int, float, str) for v in resolved.values())
    assert objective_params(name, resolved) == params_type()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_its_type_checked(name):
    keys = param_names(OBJECTIVES[name].params_type)
    with pytest.raises(ParamsError) as caught:
        objective_params(name, {key: [1] for key in keys})  # a list fits no parameter
    assert [problem.key for problem in caught.value.problems] == list(keys)


def test_a_misspelt_member_fails_loudly():
    """Without getattr fallbacks, an objective that misspells a member cannot be trained."""

    class Misspelt:
        params_type = OBJECTIVES["naive"].params_type
        required_heads = frozenset()
        model_structure = ModelStructure()
        detached_heads = frozenset()
        head_ls = MappingProxyType({})  # the typo

        def attach(self, model):
            pass

        def __call__(self, outputs, batch):
            return OBJECTIVES["naive"]()(outputs, batch)

    assert not isinstance(Misspelt(), Objective)
    model = build_model(tiny_schema(), mmoe_tiny(), embedding_device="cpu")
    module = TrainModule(model, Misspelt()).train()
    with pytest.raises(AttributeError, match="head_l2"):
        module(tiny_batch([1, 0], [1, 0]))


def test_no_code_reads_a_contract_member_with_a_getattr_fallback():
    offenders = []
    for path in [*REPO.glob("trainer/**/*.py"), *REPO.glob("benchmarks/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in MEMBERS
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders
