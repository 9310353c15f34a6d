"""Schema -> TorchRec embedding tables: the one place that maps features to EmbeddingBagConfigs."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)

from schemas import FeatureSchema

__all__ = ["SparseArch", "embedding_bag_configs"]


def embedding_bag_configs(schema: FeatureSchema) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table of the schema (declared and implicit).

    A table read by any multi-valued feature mean-pools its bags, so a list's embedding does not
    grow with its length; tables of single-valued features sum (identical for one value).
    """
    configs = []
    for table in schema.all_tables:
        features = schema.features_of(table.name)
        multi = any(schema.sparse_feature(name).multi_valued for name in features)
        configs.append(
            EmbeddingBagConfig(
                name=table.name,
                embedding_dim=table.dim,
                num_embeddings=table.num_rows,
                feature_names=features,
                pooling=PoolingType.MEAN if multi else PoolingType.SUM,
            )
        )
    return configs


class SparseArch(nn.Module):
    """Pools every sparse feature through an ``EmbeddingBagCollection`` and concatenates them.

    Args:
        embedding_bag_collection: the (unsharded) collection; ``DistributedModelParallel``
            swaps it for its sharded twin, this module never knows.

    Example::

        arch = SparseArch(EmbeddingBagCollection(tables=embedding_bag_configs(schema)))
        arch(batch.sparse).shape  # (B, sum of embedding dims over features)
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        configs = embedding_bag_collection.embedding_bag_configs()
        self.feature_names = [name for config in configs for name in config.feature_names]
        self.out_features = sum(
            config.embedding_dim * len(config.feature_names) for config in configs
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features with one key per sparse feature.

        Returns:
            ``(B, F * D)``: pooled embeddings in the order of the tables' configs (tables, then
            each table's features), whatever the sharding.
        """
        pooled = self.embedding_bag_collection(features)
        if pooled.keys() == self.feature_names:
            # Already in config order (unsharded, or every table on one rank): regrouping would
            # copy the values twice and their gradient twice more, and rebuild its permutation.
            return pooled.values()
        # A sharded collection returns its features grouped by shard placement, not in config
        # order; regrouping pins the layout the MMoE's input weights were trained on, so a
        # checkpoint means the same thing on 1 rank, N ranks, and unsharded in export.
        return KeyedTensor.regroup([pooled], [self.feature_names])[0]
