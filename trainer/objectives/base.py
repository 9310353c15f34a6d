"""The objective interface: what every training objective takes, returns and declares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from trainer.data.batch import Batch
from trainer.model.ctcvr import CtcvrModel
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure

__all__ = ["LossOutput", "Objective", "detached_heads", "model_structure"]


@dataclass
class LossOutput:
    """The scalar to minimise and its named terms (logged; detached by the caller)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """A training objective: ``objective(outputs, batch) -> LossOutput``, plus what it declares.

    This is the whole contract: the trainer reads every member below and nothing else, always
    directly (never ``getattr`` with a fallback, so a misspelt member fails loudly instead of
    switching a feature off). ``tests/objectives/test_contract.py`` checks every registered
    objective against it.

    Implementations do not inherit from a shared base class or from one another (no
    implementation inheritance): each is one small class in the file of its paper, spelling
    out all members, and shared behaviour comes by composition: the estimator pieces of
    ``trainer.objectives.estimators`` (``PropensityWeighting``, ``ImputationHead``, the risks)
    and ``functional``, and the parameter groups of its typed hyper-parameters.

    Members:

    - ``params_type``: the frozen dataclass of its hyper-parameters, with the paper's defaults
      (``trainer.objectives.params``); the constructor takes one instance of it, and the config
      loader builds it from ``objective.params``.
    - ``required_heads``: the heads beyond ``("ctr", "cvr")`` it always needs, e.g.
      ``frozenset({"imputation"})``; known without building the objective.
    - ``model_structure``: everything it asks of the model: its heads (``required_heads``
      included) and structural options (DDPO's causal transfer modules, EVI's conditioned
      teacher). The model builder reads it.
    - ``detached_heads``: heads whose losses must not train the shared embeddings and experts,
      only their own gate and tower; the builder feeds those heads a detached mixture. Any of
      the model's heads: an imputation head, or the CTR head of the single-task naive baseline.
    - ``head_l2``: an L2 coefficient per head on that head's own parameters, which
      ``TrainModule`` adds to the loss (an objective sees outputs, not parameters).
    - ``attach(model)``: builds the objective's own learned parameters sized by the model (EVI's
      variational networks; a no-op for the others). ``TrainModule`` calls it once, before
      sharding and before the optimizer exists, so they train and checkpoint with the model
      (under ``objective.``) and never reach the export.
    - ``__call__(outputs, batch)``: the loss and its named terms.
    """

    params_type: ClassVar[type[Any]]
    required_heads: ClassVar[frozenset[str]]

    @property
    def model_structure(self) -> ModelStructure: ...

    @property
    def detached_heads(self) -> frozenset[str]: ...

    @property
    def head_l2(self) -> Mapping[str, float]: ...

    def attach(self, model: CtcvrModel) -> None: ...

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput: ...


def model_structure(objective: Objective) -> ModelStructure:
    """What ``objective`` asks of the model (its declared ``model_structure``)."""
    return objective.model_structure


def detached_heads(objective: Objective) -> frozenset[str]:
    """The heads ``objective`` keeps off the shared backbone (its declared ``detached_heads``)."""
    return objective.detached_heads
