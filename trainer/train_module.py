"""Model plus objective in one module, the unit that DMP wraps and the loop calls."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from trainer.data.batch import Batch
from trainer.model import CtcvrModel, TaskOutputs
from trainer.objectives import LossOutput, Objective

__all__ = ["TrainModule"]


class TrainModule(nn.Module):
    """``forward(batch) -> (loss, (loss terms, outputs))`` with everything but the loss detached.

    Keeping the objective outside ``CtcvrModel`` means the exported model carries no loss code
    (TorchRec's ``DLRMTrain`` pattern). The objective's ``attach(model)`` builds its own learned
    parameters, if it has any (see ``Objective``); as a submodule of this module they are
    sharded, optimised and checkpointed with the model.

    Args:
        model: the model.
        objective: its training objective.
        autocast_dtype: ``None``: float32. ``torch.bfloat16``: the training forward (model and
            objective) runs under ``torch.autocast`` to it, so the matrix products run in
            bfloat16 while the parameters stay float32; autocast keeps the losses' reductions
            in float32. Evaluation (``eval()``) always runs in float32.
    """

    def __init__(
        self, model: CtcvrModel, objective: Objective, autocast_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.autocast_dtype = autocast_dtype
        objective.attach(model)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[LossOutput, TaskOutputs]]:
        if not self.training:
            outputs = self.model(batch.sparse, batch.dense)
            return torch.zeros(()), (LossOutput(torch.zeros(())), outputs.detach())
        with self._autocast(batch.dense.device.type):
            outputs = self.model(batch.sparse, batch.dense)
            loss = self._with_head_l2(self.objective(outputs, batch))
        terms = {name: value.detach() for name, value in loss.terms.items()}
        return loss.total, (LossOutput(loss.total.detach(), terms), outputs.detach())

    def _autocast(self, device_type: str) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def _with_head_l2(self, loss: LossOutput) -> LossOutput:
        """Add ``coefficient * sum of squares`` of a head's own parameters (its MMoE gate and
        tower, ``CtcvrModel.head_parameters``) for each head in the objective's ``head_l2``
        mapping, e.g. Multi-DR's L2 on the imputation tower. Objectives see outputs, not
        parameters, so it is added here."""
        coefficients = self.objective.head_l2
        if not coefficients:
            return loss
        total, terms = loss.total, dict(loss.terms)
        for head, coefficient in coefficients.items():
            params = self.model.head_parameters(head)
            terms[f"l2_{head}"] = torch.stack([p.square().sum() for p in params]).sum()
            total = total + coefficient * terms[f"l2_{head}"]
        return LossOutput(total, terms)
