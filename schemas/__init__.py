"""The single source of truth shared by trainer and service. Nothing here imports torch.

``schemas.features`` describes the features, ``schemas.hashing`` maps raw values to rows,
``schemas.rules`` holds the feature rules both the trainer's reader and the service's featurizer
apply (OOV policy, list truncation, dense default and normalisation), ``schemas.api`` the request
and response models, ``schemas.artifact`` the exported model's format, ``schemas.host_memory``
the allocator settings of every process that trains or scores.
"""

from schemas.features import (
    TRUTH_COLUMNS,
    DenseFeature,
    FeatureSchema,
    FeatureScope,
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
from schemas.hashing import (
    HashingError,
    hash_ints,
    hash_string,
    hash_strings,
    splitmix64,
    vocab_rows,
)
from schemas.rules import (
    DenseValues,
    SparseRows,
    Truncation,
    dense_values,
    int_rows,
    list_positions,
    map_values,
    sparse_rows,
    string_rows,
    truncate_lists,
)

__all__ = [
    "TRUTH_COLUMNS",
    "DenseFeature",
    "DenseValues",
    "FeatureSchema",
    "FeatureScope",
    "HashingError",
    "Labels",
    "Normalization",
    "NormalizationKind",
    "OOVPolicy",
    "SchemaError",
    "SparseDType",
    "SparseFeature",
    "SparseRows",
    "TableSpec",
    "Truncation",
    "dense_values",
    "hash_ints",
    "hash_string",
    "hash_strings",
    "int_rows",
    "list_positions",
    "load_schema",
    "map_values",
    "sparse_rows",
    "splitmix64",
    "string_rows",
    "truncate_lists",
    "vocab_rows",
]
