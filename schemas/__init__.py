"""The single source of truth shared by trainer and service. Nothing here imports torch."""

from schemas.features import (
    TRUTH_COLUMNS,
    DenseFeature,
    FeatureSchema,
    Labels,
    Normalization,
    NormalizationKind,
    OOVPolicy,
    SchemaError,
    SparseDType,
    SparseFeature,
    TableSpec,
    load_schema,
)
from schemas.hashing import HashingError, hash_ints, hash_string, map_values, splitmix64, vocab_rows

__all__ = [
    "TRUTH_COLUMNS",
    "DenseFeature",
    "FeatureSchema",
    "HashingError",
    "Labels",
    "Normalization",
    "NormalizationKind",
    "OOVPolicy",
    "SchemaError",
    "SparseDType",
    "SparseFeature",
    "TableSpec",
    "hash_ints",
    "hash_string",
    "load_schema",
    "map_values",
    "splitmix64",
    "vocab_rows",
]
