"""What a warm start compares between two models: their tables, dense tensors and input columns.

A :class:`ModelLayout` is read off the model a config and schema build (``trainer.builders``),
never off parameter-name patterns: the tables and their state-dict keys come from
``CtcvrModel.table_keys``, the weights that read the MMoE's input from
``CtcvrModel.input_weight_keys``, and the input's columns from the same
``embedding_bag_configs`` the model's ``SparseArch`` concatenates in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from schemas import FeatureSchema
from trainer.builders import build_model
from trainer.config import FeatureInteraction, ModelConfig
from trainer.model import CtcvrModel, embedding_bag_configs
from trainer.objectives import build_objective, model_structure

__all__ = [
    "InputColumn",
    "ModelLayout",
    "TableLayout",
    "input_columns",
    "model_layout",
    "reference_model",
]

# One column of the MMoE's input: ("embedding", feature, table, k) for component k of a
# feature's pooled embedding, ("dense", name), or ("dot", a, b) for the interaction <e_a, e_b>
# (a < b by name: the product is symmetric, so the pair is the same whatever the feature order).
InputColumn = tuple[str, ...]


@dataclass(frozen=True)
class TableLayout:
    """One embedding table of a model.

    Attributes:
        name: the table's name (the schema's).
        key: its weight's key in the model's ``state_dict``.
        rows: ``buckets + 1``: the last row is the OOV row.
        dim: the embedding dimension.
        hashed: ids are hashed into the buckets (``hash_buckets``), else used as rows
            (``vocab_size``).
    """

    name: str
    key: str
    rows: int
    dim: int
    hashed: bool

    @property
    def buckets(self) -> int:
        """Rows before the OOV row."""
        return self.rows - 1

    @property
    def kind(self) -> str:
        return "hash_buckets" if self.hashed else "vocab_size"


@dataclass(frozen=True)
class ModelLayout:
    """The tensors of a ``CtcvrModel`` as a warm start sees them.

    Attributes:
        tables: by table name, in the model's order.
        dense: every other tensor of the ``state_dict`` (layers and buffers): key -> shape.
        input_keys: the keys of ``dense`` whose last dimension is the MMoE's input.
        columns: that input's columns, in order.
        heads: the model's heads.
        features: its sparse and dense features.
    """

    tables: Mapping[str, TableLayout]
    dense: Mapping[str, tuple[int, ...]]
    input_keys: frozenset[str]
    columns: tuple[InputColumn, ...]
    heads: tuple[str, ...]
    features: tuple[str, ...]


def input_columns(schema: FeatureSchema, interaction: str) -> tuple[InputColumn, ...]:
    """The columns of the MMoE input of a model over ``schema``: each feature's pooled embedding
    (tables in order, each table's features in order), the dense features, then with
    ``interaction: dot`` every pair of sparse features (as ``DotInteraction`` orders them)."""
    columns: list[InputColumn] = []
    sparse: list[str] = []
    for table in embedding_bag_configs(schema):
        for feature in table.feature_names:
            sparse.append(feature)
            columns += [
                ("embedding", feature, table.name, str(k)) for k in range(table.embedding_dim)
            ]
    columns += [("dense", name) for name in schema.dense_names]
    if interaction == FeatureInteraction.DOT.value:
        columns += [("dot", *sorted((a, b))) for i, a in enumerate(sparse) for b in sparse[i + 1 :]]
    return tuple(columns)


def reference_model(
    schema: FeatureSchema,
    config: ModelConfig,
    objective: str,
    objective_params: Mapping[str, Any],
    *,
    dense_device: str = "meta",
) -> CtcvrModel:
    """The model a run with this schema, model config and objective builds, its tables on
    ``meta`` (and its dense layers too unless ``dense_device="cpu"``).

    The global RNG is left as it was: a warm start must not change the new run's own random
    stream (its initial weights, its dropout).

    Raises:
        ValueError: an unknown objective or bad objective parameters.
        ConfigError: a model option the objective cannot use.
    """
    with torch.random.fork_rng(devices=[]):
        structure = model_structure(build_objective(objective, **objective_params))
        with torch.device(dense_device):
            return build_model(schema, config, structure=structure, embedding_device="meta")


def model_layout(model: CtcvrModel, schema: FeatureSchema, config: ModelConfig) -> ModelLayout:
    """The layout of ``model`` (built from ``schema`` and ``config``).

    Raises:
        RuntimeError: the model's input weights do not have one column per input column (the
            model and :func:`input_columns` disagree: a bug, not a user error).
    """
    table_keys = model.table_keys()
    specs = {table.name: table for table in schema.all_tables}
    tables = {
        name: TableLayout(
            name=name,
            key=key,
            rows=specs[name].num_rows,
            dim=specs[name].dim,
            hashed=specs[name].is_hashed,
        )
        for name, key in table_keys.items()
    }
    state = model.state_dict()
    keys = set(table_keys.values())
    dense = {key: tuple(t.shape) for key, t in state.items() if key not in keys}
    columns = input_columns(schema, config.interaction)
    input_keys = frozenset(model.input_weight_keys())
    for key in input_keys:
        if dense[key][-1] != len(columns):
            raise RuntimeError(
                f"{key} reads {dense[key][-1]} input columns, but the layout has {len(columns)}"
            )
    return ModelLayout(
        tables=tables,
        dense=dense,
        input_keys=input_keys,
        columns=columns,
        heads=model.heads,
        features=tuple(schema.sparse_names) + tuple(schema.dense_names),
    )
