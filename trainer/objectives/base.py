"""The objective interface: what every training objective takes, returns and declares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch

from trainer.data.batch import Batch
from trainer.model.outputs import TaskOutputs

__all__ = ["LossOutput", "Objective"]


@dataclass
class LossOutput:
    """The scalar to minimise and its named terms (logged; detached by the caller)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """A training objective: ``objective(outputs, batch) -> LossOutput``.

    ``required_heads`` names the heads beyond ``("ctr", "cvr")`` that the model must build for
    it (e.g. ``frozenset({"imputation"})``); the model builder reads it. Implementations are
    small ``nn.Module``s or callables, one file per paper; they share estimator pieces through
    ``trainer.objectives.estimators`` (and ``functional``) rather than inheritance.
    """

    required_heads: ClassVar[frozenset[str]]

    def __call__(self, outputs: TaskOutputs, batch: Batch) -> LossOutput: ...
