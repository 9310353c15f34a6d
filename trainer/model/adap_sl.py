"""Adap-SL: the CVR and imputation towers partially shared, with hard pruning masks.

Paper: ``adap-sl.txt``, "Adaptive Structure Learning with Partial Parameter Sharing for
Post-Click Conversion Rate Prediction", Sections 4.3-4.4. A DR-family objective trains a
prediction model ``f_theta`` (here the CVR tower) and an imputation model ``g_phi`` (the
imputation tower); Adap-SL lets the two share part of their parameters and prunes both.

- **Partially shared linear layers (Eq. 14-17).** Each hidden layer of width ``k_out`` holds
  shared units ``LN_share: k_in -> k_out/2`` read by both towers and private units
  ``LN_self: k_in -> k_out/2`` per tower; tower ``t`` computes
  ``concat(LN_share(x), LN_self_t(x))`` on its own input ``x``. The logit layer ``h`` (Eq. 19)
  is private. ``shared_fraction`` (default 1/2, the paper's choice) sets the split.
- **Partially shared input (Eq. 7-13).** The paper splits each embedding into a half both models
  read and a half per model. In this model the embeddings and the MMoE experts are already
  shared by every head; what belongs to a head is its gate's mixture of the experts, the tower
  input. That vector is split instead: the first ``shared_fraction`` of its dims are the
  shared part, the CVR gate's mixture, read by both towers; the remaining dims are private, the
  CVR tower reading the rest of its own gate's mixture and the imputation tower the rest of
  the imputation gate's. The CVR head thus stays an ordinary MMoE head (one gate, one tower),
  so the export writes it in the service's format unchanged. Deviation: the shared part is
  produced by the CVR gate rather than by parameters of its own. When the imputation head is
  detached from the backbone (``Objective.detached_heads``, the configs' default
  ``imputation_trains_backbone: false``), the imputation tower reads that shared slice detached
  (``detach_shared_input``), so its loss trains its own gate and tower only, as the flag says;
  otherwise the imputation loss also reaches the CVR gate through it. Dedicated embedding tables
  per tower were the alternative; they would double the sharded tables and the service would
  have to carry the CVR tower's private ones.
- **Hard masks (Section 4.4).** Each tower has its own 0/1 mask over every weight it reads: its
  private weights and, apart from the other tower's, the shared ones (Table 4 reports how much of
  the shared part each model keeps). A tower computes with ``W * M``, so a pruned weight adds
  nothing to its output and gets no gradient from it; a shared weight pruned by one tower still
  trains through the other. Raw weights that no tower reads any more are set to zero after
  every optimizer step (:meth:`PartiallySharedTowers.zero_pruned_`), because Adam's moments
  would otherwise keep moving them. Biases are not masked (as in the lottery-ticket pruning the
  paper builds on). Pruning itself (which weights, when) is ``trainer.pruning``. Only these
  towers carry masks: the paper also masks the embeddings (its Fig. 4), which are shared by
  every head here and are not pruned (``trainer.pruning`` says why).

Masks are buffers, updated in place: they are in ``state_dict`` (so in DCP checkpoints and
``--resume``), and DDP's references to them stay valid. ``torch.nn.utils.prune`` was not used:
it holds one mask per module attribute, so it cannot give the two towers different masks over
one shared tensor, and it registers its ``weight_orig``/``weight_mask`` entries at the first
prune, which changes the state-dict keys in the middle of a run (a resume from before the
first prune would not load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.towers import Tower

__all__ = [
    "IMPUTATION",
    "PREDICTION",
    "TOWERS",
    "MaskedLinear",
    "PartiallySharedLinear",
    "PartiallySharedTowers",
    "split_width",
]

PREDICTION = "cvr"  # f_theta, the served CVR head
IMPUTATION = "imputation"  # g_phi, a training-only head
TOWERS = (PREDICTION, IMPUTATION)


def split_width(width: int, shared_fraction: float) -> tuple[int, int]:
    """``(shared, private)`` units of a layer of ``width`` units.

    Raises:
        ValueError: a part would be empty.
    """
    shared = round(width * shared_fraction)
    if not 0 < shared < width:
        raise ValueError(
            f"a width of {width} cannot be split into shared and private units with shared_fraction "
            f"{shared_fraction} (each part needs at least one unit); widen the layer or change the fraction"
        )
    return shared, width - shared


class MaskedLinear(nn.Module):
    """A ``Linear`` whose weight each tower reading it sees through its own 0/1 mask.

    Args:
        in_features: input width.
        out_features: output width.
        towers: the towers that read it (both for shared units, one for private units).

    Example::

        layer = MaskedLinear(4, 2, towers=("cvr", "imputation"))
        layer.mask("cvr")[0, 0] = 0
        layer(torch.randn(3, 4), "cvr").shape  # (3, 2), computed with weight[0, 0] = 0
    """

    def __init__(self, in_features: int, out_features: int, towers: Sequence[str]) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.towers = tuple(towers)
        for tower in self.towers:
            self.register_buffer(f"mask_{tower}", torch.ones(out_features, in_features))

    def mask(self, tower: str) -> torch.Tensor:
        """``tower``'s mask, ``(out, in)``: 1 keeps a weight, 0 prunes it."""
        if tower not in self.towers:
            raise KeyError(
                f"tower {tower!r} does not read this layer (read by {list(self.towers)})"
            )
        return getattr(self, f"mask_{tower}")

    def masked_weight(self, tower: str) -> torch.Tensor:
        """The weight as ``tower`` computes with it: ``W * M_tower``."""
        return self.linear.weight * self.mask(tower)

    def forward(self, x: torch.Tensor, tower: str) -> torch.Tensor:
        return F.linear(x, self.masked_weight(tower), self.linear.bias)

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Set the raw weights that every tower has pruned to zero."""
        read = torch.stack([self.mask(tower) for tower in self.towers]).amax(dim=0)
        self.linear.weight.mul_(read)


class PartiallySharedLinear(nn.Module):
    """One partially shared layer (Eq. 14-17): shared units first, then the tower's private units.

    Args:
        in_features: input width ``k_in``.
        out_features: output width ``k_out`` of each tower.
        shared_fraction: share of the ``k_out`` units that both towers read.
        towers: the two towers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        shared_fraction: float,
        towers: Sequence[str] = TOWERS,
    ) -> None:
        super().__init__()
        shared, private = split_width(out_features, shared_fraction)
        self.shared = MaskedLinear(in_features, shared, towers)
        self.private = nn.ModuleDict(
            {tower: MaskedLinear(in_features, private, (tower,)) for tower in towers}
        )

    def weight(self, tower: str) -> torch.Tensor:
        """``(k_out, k_in)``: the layer as one ``Linear`` of ``tower``, pruned weights zero."""
        return torch.cat(
            [self.shared.masked_weight(tower), self.private[tower].masked_weight(tower)]
        )

    def bias(self, tower: str) -> torch.Tensor:
        return torch.cat([self.shared.linear.bias, self.private[tower].linear.bias])

    def forward(self, x: torch.Tensor, tower: str) -> torch.Tensor:
        """Args: x ``(B, k_in)``. Returns ``(B, k_out)``: ``concat(LN_share(x), LN_self(x))``."""
        return F.linear(x, self.weight(tower), self.bias(tower))


class PartiallySharedTowers(nn.Module):
    """The CVR and imputation towers of Adap-SL: partially shared input and hidden layers,
    private logit layers, one hard mask per tower over every weight it reads.

    Args:
        in_features: width ``H`` of the MMoE mixtures (the tower input).
        layer_sizes: hidden layer sizes of each tower (as ``Tower``'s; at least one).
        shared_fraction: share of the input dims and of each hidden layer's units that both
            towers read.
        dropout: dropout after each hidden layer.
        detach_shared_input: the imputation tower reads the shared input dims (the CVR gate's
            mixture) detached, so its loss never reaches the CVR gate, the experts or the
            embeddings through them; set when the imputation head is detached from the backbone.
            The shared hidden units are Adap-SL's sharing and stay trained by both towers.

    Example::

        towers = PartiallySharedTowers(16, (8,), shared_fraction=0.5)
        out = towers({"cvr": torch.randn(4, 16), "imputation": torch.randn(4, 16)})
        logit, activations = out["cvr"]  # (4,), [(4, 8)]
        towers.folded_tower("cvr")  # an ordinary Tower computing the same logit
    """

    towers = TOWERS

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        shared_fraction: float = 0.5,
        dropout: float = 0.0,
        detach_shared_input: bool = False,
    ) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("partially shared towers need at least one hidden layer to share")
        self.in_features = in_features
        self.layer_sizes = tuple(layer_sizes)
        self.dropout_rate = dropout
        self.detach_shared_input = detach_shared_input
        self.shared_inputs, _ = split_width(in_features, shared_fraction)
        layers, width = [], in_features
        for size in layer_sizes:
            layers.append(PartiallySharedLinear(width, size, shared_fraction))
            width = size
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({tower: MaskedLinear(width, 1, (tower,)) for tower in TOWERS})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tower_inputs(self, mixtures: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tower's ``(B, H)`` input: the shared dims are the CVR gate's mixture for both
        (read detached by the imputation tower with ``detach_shared_input``)."""
        cvr = mixtures[PREDICTION]
        shared = cvr[:, : self.shared_inputs]
        if self.detach_shared_input:
            # Stop-gradient: a detached imputation head's loss must not train the CVR gate, the
            # experts or the embeddings through the dims it shares with the CVR tower.
            shared = shared.detach()
        own = mixtures[IMPUTATION][:, self.shared_inputs :]
        return {PREDICTION: cvr, IMPUTATION: torch.cat([shared, own], dim=1)}

    def forward(
        self, mixtures: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Args: the MMoE mixtures ``(B, H)`` of the ``cvr`` and ``imputation`` gates.

        Returns:
            Per tower, its ``(B,)`` logit and each hidden layer's activations (as ``Tower``).
        """
        outputs = {}
        for tower, x in self.tower_inputs(mixtures).items():
            activations = []
            for layer in self.layers:
                x = self.dropout(torch.relu(layer(x, tower)))
                activations.append(x)
            outputs[tower] = (self.heads[tower](x, tower).squeeze(-1), activations)
        return outputs

    def masked_linears(self, tower: str) -> list[tuple[MaskedLinear, bool]]:
        """Every weight ``tower`` reads, as ``(module, is_shared)``; its mask is ``module.mask(tower)``."""
        entries = []
        for layer in self.layers:
            entries += [(layer.shared, True), (layer.private[tower], False)]
        entries.append((self.heads[tower], False))
        return entries

    def tower_tensors(self, tower: str) -> list[torch.Tensor]:
        """The weights (masked) and biases ``tower`` computes with, e.g. for an L2 penalty."""
        return [
            t
            for module, _ in self.masked_linears(tower)
            for t in (module.masked_weight(tower), module.linear.bias)
        ]

    def zero_pruned_(self) -> None:
        """Set every raw weight that no tower reads any more to zero (call after each optimizer step)."""
        for layer in self.layers:
            layer.shared.zero_pruned_()
            for private in layer.private.values():
                private.zero_pruned_()
        for head in self.heads.values():
            head.zero_pruned_()

    def serving_tensors(self, tower: str) -> dict[str, torch.Tensor]:
        """``tower`` folded into an ordinary tower (:meth:`folded_tower`), under the artifact
        names of the head it serves: the service never sees the sharing or the masks."""
        return self.folded_tower(tower).serving_tensors(tower)

    @torch.no_grad()
    def folded_tower(self, tower: str) -> Tower:
        """``tower`` as an ordinary ``Tower`` with the same outputs on the same input: each layer's
        shared and private units in one ``Linear`` (shared first), pruned weights as zeros."""
        with torch.device("meta"):  # no initialisation: every tensor is overwritten below
            folded = Tower(self.in_features, self.layer_sizes, self.dropout_rate)
        folded = folded.to_empty(device=self.heads[tower].linear.weight.device)
        for layer, block in zip(self.layers, folded.hidden.layers):
            block[0].weight.copy_(layer.weight(tower))
            block[0].bias.copy_(layer.bias(tower))
        folded.head.weight.copy_(self.heads[tower].masked_weight(tower))
        folded.head.bias.copy_(self.heads[tower].linear.bias)
        return folded
