"""Builders: the model for a schema and an objective, and small presets for tests and demos."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from schemas import FeatureSchema
from trainer.config import ConfigError, FeatureInteraction, ModelConfig, TowerSharing
from trainer.model import (
    CORE_HEADS,
    CtcvrModel,
    DotInteraction,
    ModelStructure,
    SparseArch,
    embedding_bag_configs,
)
from trainer.model.adap_sl import IMPUTATION

__all__ = ["build_model", "mmoe_tiny", "model_heads"]


def model_heads(extra_heads: Iterable[str] = ()) -> tuple[str, ...]:
    """``("ctr", "cvr")`` followed by the objective's extra heads in a stable (sorted) order."""
    extra = sorted(set(extra_heads) - set(CORE_HEADS))
    return CORE_HEADS + tuple(extra)


def build_model(
    schema: FeatureSchema,
    config: ModelConfig,
    extra_heads: Iterable[str] = (),
    *,
    structure: ModelStructure | None = None,
    detached_heads: Iterable[str] = (),
    embedding_device: torch.device | str = "meta",
) -> CtcvrModel:
    """The CTR/CVR model for ``schema``, with the heads and structure an objective requires.

    Args:
        schema: the feature schema; one embedding table per schema table.
        config: MMoE and tower sizes.
        extra_heads: heads beyond ctr/cvr.
        structure: everything an objective asks of the model, its extra heads included
            (``trainer.objectives.model_structure(objective)``); its heads are added to
            ``extra_heads``.
        detached_heads: heads whose losses must not train the shared embeddings and experts,
            usually ``trainer.objectives.detached_heads(objective)``.
        embedding_device: ``"meta"`` (default) leaves the tables unallocated for
            ``DistributedModelParallel`` to materialise only each rank's shards; ``"cpu"``
            builds them whole (tests, single-process tools).

    Raises:
        ConfigError: ``model.tower_sharing: adap_sl`` without an imputation head (``load_config``
            already refuses such a config, naming the objectives that have one).
        ValueError: layer widths that ``model.adap_sl.shared_fraction`` cannot split.
        ConfigError: ``model.interaction: dot`` over sparse features of different dimensions.
    """
    structure = structure or ModelStructure()
    heads = model_heads({*extra_heads, *structure.extra_heads})
    adap_sl = config.tower_sharing == TowerSharing.ADAP_SL.value
    if adap_sl and IMPUTATION not in heads:
        raise ConfigError(
            "model.tower_sharing=adap_sl shares units between the CVR and the imputation tower, but the "
            f"model has no imputation head (heads: {', '.join(heads)}); use it with a DR-family "
            "objective or set model.tower_sharing=none"
        )
    tables = embedding_bag_configs(schema)
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(embedding_device))
    return CtcvrModel(
        sparse_arch=SparseArch(ebc),
        num_dense=len(schema.dense),
        heads=heads,
        num_experts=config.num_experts,
        expert_sizes=config.expert_sizes,
        tower_sizes=config.tower_sizes,
        dropout=config.dropout,
        structure=structure,
        partial_sharing=config.adap_sl.shared_fraction if adap_sl else None,
        detached_heads=tuple(sorted(detached_heads)),
        interaction=build_interaction(config, tables),
    )


def build_interaction(
    config: ModelConfig, tables: list[EmbeddingBagConfig]
) -> DotInteraction | None:
    """``model.interaction``'s module over the features of ``tables`` (``None`` for ``none``)."""
    if config.interaction == FeatureInteraction.NONE.value:
        return None
    dims = {name: table.embedding_dim for table in tables for name in table.feature_names}
    if len(set(dims.values())) != 1:
        by_dim = ", ".join(
            f"{dim}: {[n for n, d in dims.items() if d == dim]}"
            for dim in sorted(set(dims.values()))
        )
        raise ConfigError(
            f"model.interaction={config.interaction} takes dot products between sparse features, which needs "
            f"one embedding dimension for all of them; the schema has {by_dim}. Give every table the same "
            "dim or set model.interaction=none"
        )
    return DotInteraction(num_features=len(dims), dim=next(iter(dims.values())))


def mmoe_tiny() -> ModelConfig:
    """A small MMoE for tests and quick demos."""
    return ModelConfig(num_experts=2, expert_sizes=[16], tower_sizes=[8], dropout=0.0)
