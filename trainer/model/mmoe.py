"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): shared experts, one softmax gate per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from schemas.artifact import gate
from trainer.model.experts import Experts
from trainer.model.exported import linear_tensors

__all__ = ["MMoE"]


class MMoE(nn.Module):
    """``E`` expert MLPs shared by all tasks; each task mixes them with its own softmax gate.

    The experts are computed together (:class:`~trainer.model.experts.Experts`: one matrix
    product per layer for all of them), the mixtures of all tasks in one ``bmm``.

    Args:
        in_features: input width ``D``.
        tasks: task names, one gate each (e.g. ``("ctr", "cvr")``).
        num_experts: number of experts ``E``.
        expert_sizes: layer sizes of each expert MLP; its last size is the output width ``H``.
        dropout: dropout inside the experts.
        detached_tasks: tasks whose gate and mixture see the input and the experts detached:
            their losses train their own gate (and tower) only, never the experts or what feeds
            them (e.g. an auxiliary imputation head that must not reshape the shared features).

    Example::

        mmoe = MMoE(32, ("ctr", "cvr"), num_experts=4, expert_sizes=(64,))
        out = mmoe(torch.randn(8, 32))
        out["ctr"].shape  # torch.Size([8, 64])
    """

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[str],
        num_experts: int,
        expert_sizes: Sequence[int],
        dropout: float = 0.0,
        detached_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not set(detached_tasks) <= set(tasks):
            raise ValueError(
                f"detached_tasks {sorted(detached_tasks)} must be among tasks {list(tasks)}"
            )
        if len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"tasks must be distinct and non-empty, got {list(tasks)}")
        self.experts = Experts(in_features, num_experts, expert_sizes, dropout)
        self.gates = nn.ModuleDict({task: nn.Linear(in_features, num_experts) for task in tasks})
        self.out_features = self.experts.out_features
        self.detached_tasks = frozenset(detached_tasks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x ``(B, D)``. Returns one ``(B, H)`` mixture per task."""
        experts = self.experts(x)  # (B, E, H)
        attached = [task for task in self.gates if task not in self.detached_tasks]
        detached = [task for task in self.gates if task in self.detached_tasks]
        mixtures = self._mix(x, experts, attached) | self._mix(
            x.detach(), experts.detach(), detached
        )
        return {task: mixtures[task] for task in self.gates}

    def serving_tensors(self, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every expert, and the gates of ``tasks``, under their artifact names
        (``mmoe.experts.{e}.layers.{l}``, ``mmoe.gates.{task}``).

        Raises:
            KeyError: a task without a gate.
        """
        tensors = self.experts.serving_tensors()
        for task in tasks:
            tensors |= linear_tensors(gate(task), self.gates[task])
        return tensors

    def input_weights(self) -> list[nn.Parameter]:
        """The weights that read the input ``x`` itself, whose last dimension is its ``D``
        features: the experts' first layer (``(E, H, D)``, all experts in one tensor) and every
        gate (a warm start maps their columns feature by feature when the input changes,
        ``trainer.warm_start``)."""
        return [self.experts.layers[0].weight] + [gate.weight for gate in self.gates.values()]

    def _mix(
        self, x: torch.Tensor, experts: torch.Tensor, tasks: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Each task's softmax-gated mixture of ``experts`` ``(B, E, H)``, all in one ``bmm``:
        about a quarter faster than weighting and summing a ``(B, E, H)`` tensor per task, which
        the backward pass then has to keep."""
        if not tasks:
            return {}
        logits = torch.stack([self.gates[task](x) for task in tasks], dim=1)  # (B, T, E)
        mixtures = torch.bmm(torch.softmax(logits, dim=-1), experts)  # (B, T, H)
        return {task: mixtures[:, i] for i, task in enumerate(tasks)}
