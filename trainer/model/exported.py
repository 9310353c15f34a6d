"""The seam between the model and the serving artifact: modules declare what they export.

Each module the service computes with has a ``serving_tensors`` method that returns its tensors
under their names in ``weights/dense.safetensors`` (the name functions of ``schemas.artifact``):
``MMoE`` its experts and the gates asked for, ``Tower`` its layers, ``CausalTransferFusion`` its
transfer modules and fusion, ``PartiallySharedTowers`` a tower folded into an ordinary one, and
``CtcvrModel`` the composition the service needs for pCTR and pCVR. Training-only heads and
parameters are simply not declared. ``trainer.export`` asks the model for these tensors and
checks them against ``ModelSpec.dense_shapes()``; it never matches parameter names.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["linear_tensors"]


def linear_tensors(name: str, linear: nn.Linear) -> dict[str, torch.Tensor]:
    """The tensors of one linear layer, ``{name}.weight`` and ``{name}.bias``, detached."""
    return {f"{name}.weight": linear.weight.detach(), f"{name}.bias": linear.bias.detach()}
