"""The CTR/CVR model: sparse embeddings and dense features -> MMoE -> one tower per task head.

The model also says what of it the service needs (:meth:`CtcvrModel.serving_tensors`, composed
from its modules' declarations, see ``trainer.model.exported``) and where its embedding tables
are (:meth:`CtcvrModel.table_keys`), so the export reads both from the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from schemas.artifact import SERVED_HEADS
from trainer.model.adap_sl import IMPUTATION, PartiallySharedTowers
from trainer.model.adap_sl import TOWERS as PARTIALLY_SHARED_HEADS
from trainer.model.conditioning import PropensityConditionedTower
from trainer.model.embeddings import SparseArch
from trainer.model.interaction import DotInteraction
from trainer.model.mmoe import MMoE
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.model.towers import Tower
from trainer.model.transfer import CausalTransferFusion

__all__ = ["CORE_HEADS", "CtcvrModel"]

# Heads every model has; objectives may ask for more (see ``Objective.required_heads``).
CORE_HEADS = ("ctr", "cvr")


class CtcvrModel(nn.Module):
    """Multi-task model over the whole impression space.

    Pooled sparse embeddings ``(B, F*D)``, dense features ``(B, N)`` and, with an ``interaction``,
    the embeddings' pairwise dot products are concatenated and fed to an MMoE with one gate per
    head; each head's tower turns its mixture into a logit.
    It knows nothing of ranks, sharding or losses. ``structure`` adds what an objective asks for
    beyond extra heads: DDPO's causal transfer modules, which fuse other heads' mixtures into
    the CVR tower's input, and EVI's propensity-conditioned teacher tower.

    Args:
        sparse_arch: the embedding stage.
        num_dense: number of dense features ``N``.
        heads: head names; must start with ``CORE_HEADS``.
        num_experts: experts of the MMoE.
        expert_sizes: layer sizes of each expert.
        tower_sizes: hidden layer sizes of each tower.
        dropout: dropout in experts and towers.
        structure: the objective's structural options (see ``ModelStructure``); its
            ``extra_heads`` must be among ``heads``.
        partial_sharing: ``None`` (default): every head has a tower of its own. A fraction: the
            ``cvr`` and ``imputation`` heads (both required) get Adap-SL's partially shared,
            prunable towers sharing that fraction of their input and hidden units
            (``trainer.model.adap_sl``); other heads keep their own towers.
        detached_heads: heads that read the shared features but never train them: their losses
            reach their own gate and tower only (see ``Objective.detached_heads``). A detached
            imputation head on Adap-SL's towers reads the CVR gate's shared dims detached too.
        interaction: explicit second-order features of the pooled embeddings, appended to the
            MMoE's input after the dense features (``None``: none).

    Example::

        model = CtcvrModel(SparseArch(ebc), num_dense=2, heads=("ctr", "cvr"), num_experts=4,
                           expert_sizes=(64,), tower_sizes=(32,))
        out = model(batch.sparse, batch.dense)
        out.pctcvr.shape  # (B,)
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        num_dense: int,
        heads: Sequence[str],
        num_experts: int,
        expert_sizes: Sequence[int],
        tower_sizes: Sequence[int],
        dropout: float = 0.0,
        structure: ModelStructure | None = None,
        partial_sharing: float | None = None,
        detached_heads: Sequence[str] = (),
        interaction: DotInteraction | None = None,
    ) -> None:
        super().__init__()
        if tuple(heads[: len(CORE_HEADS)]) != CORE_HEADS:
            raise ValueError(f"heads must start with {CORE_HEADS}, got {tuple(heads)}")
        structure = structure or ModelStructure()
        if not structure.extra_heads <= set(heads):
            raise ValueError(
                f"structure needs heads {sorted(structure.extra_heads)}, the model has {tuple(heads)}"
            )
        paired = () if partial_sharing is None else PARTIALLY_SHARED_HEADS
        if not set(paired) <= set(heads):
            raise ValueError(
                f"partially shared towers need the heads {list(paired)}, got {list(heads)}"
            )
        self.sparse_arch = sparse_arch
        self.num_dense = num_dense
        self._heads = tuple(heads)
        self.interaction = interaction
        in_features = (
            sparse_arch.out_features + num_dense + (interaction.out_features if interaction else 0)
        )
        self.mmoe = MMoE(in_features, heads, num_experts, expert_sizes, dropout, detached_heads)
        width = self.mmoe.out_features
        self.tower_sizes = tuple(
            tower_sizes
        )  # every tower's hidden widths (EVI's VIE is sized by them)
        self.towers = nn.ModuleDict(
            {
                head: PropensityConditionedTower(
                    width, tower_sizes, structure.propensity_dim, dropout
                )
                if head in structure.conditioned_heads
                else Tower(width, tower_sizes, dropout)
                for head in heads
                if head not in paired
            }
        )
        self.conditioned_heads = structure.conditioned_heads
        self.cvr_transfer = (
            CausalTransferFusion(width, structure.cvr_transfer) if structure.cvr_transfer else None
        )
        self.partially_shared = (
            PartiallySharedTowers(
                width,
                tower_sizes,
                partial_sharing,
                dropout,
                detach_shared_input=IMPUTATION in detached_heads,
            )
            if paired
            else None
        )

    @property
    def heads(self) -> tuple[str, ...]:
        return self._heads

    def head_parameters(self, head: str) -> list[torch.Tensor]:
        """The tensors a head computes with besides the shared experts: its gate and its tower
        (for a partially shared tower, its masked weights, shared units included)."""
        gate = list(self.mmoe.gates[head].parameters())
        if self.partially_shared is not None and head in self.partially_shared.towers:
            return gate + self.partially_shared.tower_tensors(head)
        return gate + list(self.towers[head].parameters())

    @property
    def training_only_heads(self) -> tuple[str, ...]:
        """Heads the service does not compute (their gates may still be exported, see
        :meth:`serving_tensors`)."""
        return tuple(head for head in self.heads if head not in SERVED_HEADS)

    def serving_tensors(self) -> dict[str, torch.Tensor]:
        """The dense tensors the service computes pCTR and pCVR with, under their artifact names.

        The experts; the gates of the served heads and of DDPO's transfer sources (their
        mixtures feed the CVR tower's input); the served heads' towers, an Adap-SL tower folded
        into an ordinary one; the causal transfer modules. Nothing of a training-only head
        besides a transfer source's gate. ``ModelSpec.dense_shapes()`` of the matching spec
        lists the same names and shapes (the export checks it).

        Returns:
            Artifact tensor name to tensor (detached; folded towers are new tensors).
        """
        sources = self.cvr_transfer.sources if self.cvr_transfer is not None else ()
        gates = SERVED_HEADS + tuple(s for s in sources if s not in SERVED_HEADS)
        tensors = self.mmoe.serving_tensors(gates)
        for head in SERVED_HEADS:
            if self.partially_shared is not None and head in self.partially_shared.towers:
                tensors |= self.partially_shared.serving_tensors(head)
            else:
                tensors |= self.towers[head].serving_tensors(head)
        if self.cvr_transfer is not None:
            tensors |= self.cvr_transfer.serving_tensors()
        return tensors

    def table_keys(self) -> dict[str, str]:
        """The ``state_dict`` key of every embedding table's weight, by table name, in the
        order of the tables' configs."""
        ebc = self.sparse_arch.embedding_bag_collection
        tables = {id(bag.weight): name for name, bag in ebc.embedding_bags.items()}
        keys = {tables[id(p)]: key for key, p in self.named_parameters() if id(p) in tables}
        return {config.name: keys[config.name] for config in ebc.embedding_bag_configs()}

    def input_weight_keys(self) -> list[str]:
        """The ``state_dict`` keys of the weights whose last dimension is the MMoE's input:
        pooled embeddings (tables, then each table's features), dense features, then the
        interactions (``MMoE.input_weights``)."""
        reading = {id(weight) for weight in self.mmoe.input_weights()}
        return [key for key, p in self.named_parameters() if id(p) in reading]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> TaskOutputs:
        """Args: sparse with one key per sparse feature; dense ``(B, N)``.

        Returns:
            ``TaskOutputs`` with a ``(B,)`` logit per head and each tower's hidden activations
            under ``"<head>.layers"``.
        """
        pooled = self.sparse_arch(sparse)
        inputs = (
            [pooled, dense]
            if self.interaction is None
            else [pooled, dense, self.interaction(pooled)]
        )
        x = torch.cat(inputs, dim=1)
        mixtures = self.mmoe(x)
        if self.cvr_transfer is not None:
            mixtures["cvr"] = self.cvr_transfer(mixtures)  # ddpo.txt Eq. 14: the fused CVR feature
        logits, features = {}, {}
        for head, tower in self.towers.items():  # ctr first: conditioned heads read its logit
            if head in self.conditioned_heads:
                # The teacher takes the click propensity as a constant input (evi.txt B.2): its
                # loss must not move the CTR model that estimates it.
                propensity = torch.sigmoid(logits["ctr"]).detach()
                logits[head], features[f"{head}.layers"] = tower(mixtures[head], propensity)
            else:
                logits[head], features[f"{head}.layers"] = tower(mixtures[head])
        if self.partially_shared is not None:
            for head, (logit, activations) in self.partially_shared(mixtures).items():
                logits[head], features[f"{head}.layers"] = logit, activations
        return TaskOutputs(logits=logits, features=features)
