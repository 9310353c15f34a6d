"""The MMoE's experts, computed together: one matrix product per layer for all of them.

``E`` experts of the same shape are ``E`` small MLPs. Run one after another they cost ``E``
matrix products per layer and a ``stack`` of their outputs; here each layer holds the weights of
every expert in one ``(E, out, in)`` tensor, and

- the first layer, which reads the same input for every expert, is one ``(B, D) x (D, E * H)``
  matrix product whose output already is the ``(B, E, H)`` tensor the gates mix (no ``stack``);
- deeper layers are one batched matrix product over the experts (``baddbmm``);
- the ReLU runs in place on the product's output.

The first layer's input width is padded with zero columns to a multiple of :data:`INPUT_ALIGN`
inside the product (weights and input alike; the parameter keeps its true width). The two
backward products of that layer produce ``D`` columns, and BLAS kernels run an odd width such as
322 (20 fields of 16 plus 2 dense features) markedly slower than an aligned one; the zero
columns add no term to any sum, so the values are those of the unpadded product.

The layout is training's only: the artifact stores each expert's layers under their own names
(``schemas.artifact.expert_layer``), which :meth:`Experts.serving_tensors` slices out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from schemas.artifact import expert_layer

__all__ = ["INPUT_ALIGN", "ExpertLayer", "Experts"]

# Input widths are padded to a multiple of this many columns in the first layer's product.
INPUT_ALIGN = 8


class ExpertLayer(nn.Module):
    """One layer of every expert: ``E`` linear maps ``in -> out``, stored together.

    Attributes:
        weight: ``(E, out, in)``; ``weight[e]`` is expert ``e``'s ``nn.Linear`` weight.
        bias: ``(E, out)``.

    Args:
        num_experts: ``E``.
        in_features: input width.
        out_features: output width.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))

    @torch.no_grad()
    def reset_expert_(self, expert: int) -> None:
        """Initialise expert ``expert``'s slice as ``nn.Linear`` initialises its parameters
        (same distribution, same draws from the generator, in the same order)."""
        weight, bias = self.weight[expert], self.bias[expert]
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class Experts(nn.Module):
    """``E`` expert MLPs (Linear -> ReLU (-> Dropout) per layer) over one input.

    Computes what ``E`` separate ``MLP(in_features, layer_sizes, dropout)`` modules stacked on
    dim 1 compute, and draws the same initial weights from the same seed (expert by expert,
    layer by layer, as ``E`` such modules built in a row would).

    Args:
        in_features: input width ``D``.
        num_experts: ``E``.
        layer_sizes: each expert's layer widths; the last is the output width ``H``.
        dropout: dropout probability after each activation (0 disables it).

    Raises:
        ValueError: no layer sizes, fewer than one expert, or a dropout outside ``[0, 1)``.

    Example::

        experts = Experts(32, num_experts=4, layer_sizes=(64,))
        experts(torch.randn(8, 32)).shape  # torch.Size([8, 4, 64])
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        layer_sizes: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("experts need at least one layer size")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [in_features, *layer_sizes]
        self.layers = nn.ModuleList(
            ExpertLayer(num_experts, width, size) for width, size in pairwise(widths)
        )
        for expert in range(num_experts):
            for layer in self.layers:
                layer.reset_expert_(expert)
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = widths[-1]
        self.dropout = dropout
        self._input_pad = -in_features % INPUT_ALIGN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, D)``. Returns ``(B, E, H)``: every expert's output."""
        first = self.layers[0]
        weight = first.weight.flatten(0, 1)  # (E * H1, D): the experts' output units in a row
        if self._input_pad:
            x = F.pad(x, (0, self._input_pad))
            weight = F.pad(weight, (0, self._input_pad))
        hidden = self._activate(F.linear(x, weight, first.bias.flatten()))
        hidden = hidden.view(x.shape[0], self.num_experts, -1)  # (B, E, H1)
        if len(self.layers) == 1:
            return hidden
        hidden = hidden.transpose(0, 1)  # (E, B, H1): one matrix per expert for baddbmm
        for layer in self.layers[1:]:
            hidden = self._activate(
                torch.baddbmm(layer.bias.unsqueeze(1), hidden, layer.weight.transpose(1, 2))
            )
        return hidden.transpose(0, 1)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        # In place: the product's output is needed by nothing else, and ReLU's backward reads
        # its own result, so no second tensor of the layer's size is written.
        hidden = torch.relu_(pre)
        return F.dropout(hidden, self.dropout, self.training) if self.dropout > 0 else hidden

    def serving_tensors(self) -> dict[str, torch.Tensor]:
        """Each expert's layers as separate linear layers, under their artifact names
        (``mmoe.experts.{e}.layers.{l}.weight`` / ``.bias``): detached views of the stacked
        parameters, as every module's serving tensors are (a warm start from an exported model
        writes through them; the export copies them before saving)."""
        tensors: dict[str, torch.Tensor] = {}
        for expert in range(self.num_experts):
            for index, layer in enumerate(self.layers):
                name = expert_layer(expert, index)
                tensors[f"{name}.weight"] = layer.weight[expert].detach()
                tensors[f"{name}.bias"] = layer.bias[expert].detach()
        return tensors
