"""The feature schema: the one description of features shared by trainer and service.

A schema is written as YAML and loaded into frozen pydantic models::

    name: aliccp_sim
    tables:                       # optional: tables shared by several features
      - {name: items, hash_buckets: 100000, dim: 16}
    sparse:
      - {name: user_id, dtype: int, hash_buckets: 200000, dim: 16, scope: context}
      - {name: gender, dtype: int, vocab_size: 3, dim: 16, scope: context}
      - {name: item_id, dtype: int, table: items, scope: candidate}
      - {name: clicked_items, dtype: int, table: items, multi_valued: true, max_len: 20}
    dense:
      - {name: price, default: 0.0, normalization: {kind: log1p}, scope: candidate}
    labels: {click: click, conversion: conversion}
    group: group                  # optional column used for GAUC (usually the user id)

Every sparse feature reads rows of one embedding table. A feature without ``table`` gets a table
of its own, named after the feature. A table has ``num_rows = buckets + 1`` rows: the last row is
the out-of-vocabulary (OOV) row that unknown and missing values map to (see ``schemas.hashing``).

A feature's ``scope`` says where a ranking request (``POST /v1/rank``: one context, many
candidates) carries it: ``context`` (the user and the request: given once), ``candidate`` (the
item: given per candidate) or ``any`` (the default: either place, one per request). Training and
the other routes ignore it, and so does the schema's fingerprint: it changes no weight.

Nothing here imports torch: the service validates requests with the same objects.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum, unique
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas import storage

__all__ = [
    "TRUTH_COLUMNS",
    "DenseFeature",
    "FeatureSchema",
    "FeatureScope",
    "Labels",
    "Normalization",
    "NormalizationKind",
    "OOVPolicy",
    "SchemaError",
    "SparseDType",
    "SparseFeature",
    "TableSpec",
    "load_schema",
]

# Columns only a simulator writes: ground truth for evaluation, never a model input.
TRUTH_COLUMNS = ("true_ctr", "true_cvr", "cf_conversion")

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class SchemaError(ValueError):
    """A schema file or object is invalid; the message names the field and the reason."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@unique
class SparseDType(str, Enum):
    INT = "int"  # raw values are integers (ids)
    STRING = "string"  # raw values are strings (categories, hashed ids)


@unique
class OOVPolicy(str, Enum):
    OOV_ROW = "oov_row"  # unknown or missing values read the table's reserved last row
    ERROR = "error"  # unknown or missing values are rejected with an error naming the feature


@unique
class FeatureScope(str, Enum):
    CONTEXT = "context"  # the user's and the request's: given once per ranking request
    CANDIDATE = "candidate"  # the item's: given for each candidate
    ANY = "any"  # either place (one per request); the default, so older schemas rank unchanged


@unique
class NormalizationKind(str, Enum):
    NONE = "none"  # x
    LOG1P = "log1p"  # sign(x) * log(1 + |x|)
    STANDARD = "standard"  # (x - mean) / std


class TableSpec(_Frozen):
    """An embedding table. Exactly one of ``vocab_size`` and ``hash_buckets`` is set.

    ``vocab_size``: raw values are integer ids in ``[0, vocab_size)`` and are used as row ids.
    ``hash_buckets``: raw values (ints or strings) are hashed into ``[0, hash_buckets)``.
    """

    name: Name
    dim: int = Field(gt=0, le=4096, description="embedding dimension")
    vocab_size: int | None = Field(default=None, gt=0)
    hash_buckets: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> TableSpec:
        if (self.vocab_size is None) == (self.hash_buckets is None):
            raise ValueError(f"table {self.name!r}: set exactly one of vocab_size and hash_buckets")
        return self

    @property
    def buckets(self) -> int:
        """Number of rows that raw values map to (the OOV row excluded)."""
        return self.vocab_size if self.vocab_size is not None else self.hash_buckets  # type: ignore[return-value]

    @property
    def num_rows(self) -> int:
        """Rows of the embedding table: the buckets plus the reserved OOV row."""
        return self.buckets + 1

    @property
    def is_hashed(self) -> bool:
        return self.hash_buckets is not None


class SparseFeature(_Frozen):
    """A categorical feature, single-valued or a bounded list of values."""

    name: Name
    dtype: SparseDType = SparseDType.INT
    table: Name | None = Field(default=None, description="shared table name, if any")
    dim: int | None = Field(default=None, gt=0, le=4096)
    vocab_size: int | None = Field(default=None, gt=0)
    hash_buckets: int | None = Field(default=None, gt=0)
    multi_valued: bool = False
    max_len: int = Field(default=1, gt=0, le=10_000, description="values kept per row")
    oov: OOVPolicy = OOVPolicy.OOV_ROW
    scope: FeatureScope = FeatureScope.ANY

    @model_validator(mode="after")
    def _table_or_own_sizes(self) -> SparseFeature:
        own = {k: getattr(self, k) for k in ("dim", "vocab_size", "hash_buckets")}
        if self.table is not None:
            given = [k for k, v in own.items() if v is not None]
            if given:
                raise ValueError(
                    f"feature {self.name!r} reads shared table {self.table!r}: "
                    f"{', '.join(given)} belong to the table, not the feature"
                )
        else:
            if self.dim is None:
                raise ValueError(f"feature {self.name!r}: dim is required without a table")
            if (self.vocab_size is None) == (self.hash_buckets is None):
                raise ValueError(
                    f"feature {self.name!r}: set exactly one of vocab_size and hash_buckets"
                )
        if not self.multi_valued and self.max_len != 1:
            raise ValueError(
                f"feature {self.name!r}: max_len only applies to multi_valued features"
            )
        if self.dtype is SparseDType.STRING and self.vocab_size is not None:
            raise ValueError(
                f"feature {self.name!r}: string values need hash_buckets, not vocab_size"
            )
        return self

    @property
    def table_name(self) -> str:
        return self.table if self.table is not None else self.name


class Normalization(_Frozen):
    """How a dense feature's raw value becomes a model input (reader and service both apply it)."""

    kind: NormalizationKind = NormalizationKind.NONE
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0.0)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Element-wise: ``none``: x; ``log1p``: sign(x) log1p(|x|); ``standard``: (x - mean) / std."""
        values = np.asarray(values, dtype=np.float64)
        if self.kind is NormalizationKind.LOG1P:
            return np.sign(values) * np.log1p(np.abs(values))
        if self.kind is NormalizationKind.STANDARD:
            return (values - self.mean) / self.std
        return values


class DenseFeature(_Frozen):
    """A numeric feature; ``default`` replaces missing values before normalisation."""

    name: Name
    default: float = 0.0
    normalization: Normalization = Normalization()
    scope: FeatureScope = FeatureScope.ANY


class Labels(_Frozen):
    """Column names of the two labels. Both are required."""

    click: Name
    conversion: Name


class FeatureSchema(_Frozen):
    """The features, labels and group key of an impression log.

    Raises (through :func:`load_schema` / ``model_validate``) a :class:`SchemaError` naming the
    field for a duplicate name, an unknown table, a non-positive dim, or a missing label.
    """

    name: Name = "ctcvr"
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...] = ()
    tables: tuple[TableSpec, ...] = ()
    labels: Labels
    group: Name | None = Field(default=None, description="column used as the GAUC group key")
    version: Literal[1] = 1

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSchema:
        if not self.sparse:
            raise ValueError("sparse: at least one sparse feature is required")
        _reject_duplicates("table", [t.name for t in self.tables])
        _reject_duplicates(
            "feature",
            [f.name for f in self.sparse]
            + [f.name for f in self.dense]
            + [self.labels.click, self.labels.conversion],
        )
        declared = {t.name for t in self.tables}
        own = {f.name for f in self.sparse if f.table is None}
        for feature in self.sparse:
            if feature.table is not None and feature.table not in declared:
                raise ValueError(
                    f"sparse feature {feature.name!r} reads unknown table {feature.table!r}; "
                    f"declared tables: {sorted(declared) or 'none'}"
                )
        clash = declared & own
        if clash:
            raise ValueError(
                f"table name(s) {sorted(clash)} also name a feature with its own table"
            )
        for feature in self.sparse:
            table = self.table_of(feature.name)
            if feature.dtype is SparseDType.STRING and not table.is_hashed:
                raise ValueError(
                    f"feature {feature.name!r}: string values need a hashed table, "
                    f"but table {table.name!r} has a vocab_size"
                )
        return self

    # Derived views -------------------------------------------------------------------------

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def all_tables(self) -> list[TableSpec]:
        """Declared tables followed by the implicit one-feature tables, in schema order."""
        implicit = [
            TableSpec(name=f.name, dim=f.dim, vocab_size=f.vocab_size, hash_buckets=f.hash_buckets)
            for f in self.sparse
            if f.table is None
        ]
        return list(self.tables) + implicit

    def table_of(self, feature_name: str) -> TableSpec:
        feature = self.sparse_feature(feature_name)
        for table in self.all_tables:
            if table.name == feature.table_name:
                return table
        raise SchemaError(f"no table for sparse feature {feature_name!r}")  # unreachable if valid

    def features_of(self, table_name: str) -> list[str]:
        return [f.name for f in self.sparse if f.table_name == table_name]

    def sparse_feature(self, name: str) -> SparseFeature:
        for feature in self.sparse:
            if feature.name == name:
                return feature
        raise SchemaError(f"unknown sparse feature {name!r}; known: {self.sparse_names}")

    def scope_of(self, name: str) -> FeatureScope:
        """Where a ranking request carries feature ``name`` (sparse or dense).

        Raises:
            SchemaError: no feature of that name.
        """
        for feature in (*self.sparse, *self.dense):
            if feature.name == name:
                return feature.scope
        raise SchemaError(f"unknown feature {name!r}")

    def fingerprint(self) -> str:
        """A stable SHA-256 of what the weights depend on, stored with checkpoints and exports.

        Every field counts but the features' ``scope``, which only says where a ranking request
        carries a feature: declaring scopes on a trained run's schema keeps its checkpoints and
        exports valid, and schemas written before scopes existed keep their fingerprints.
        """
        no_scope = {"__all__": {"scope"}}
        content = self.model_dump(mode="json", exclude={"sparse": no_scope, "dense": no_scope})
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    # Serialisation --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, *, source: str = "schema") -> FeatureSchema:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SchemaError(_describe(err, data, source)) from None

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "schema") -> FeatureSchema:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SchemaError(f"{source}: not valid YAML: {err}") from None
        return cls.from_dict(data, source=source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def save(self, path: str | Path | storage.Location) -> None:
        """Write the schema YAML to a local path or a storage URI (whole, never half a file)."""
        storage.write_text(path, self.to_yaml())


def load_schema(path: str | Path | storage.Location) -> FeatureSchema:
    """Read and validate a schema YAML file, from a local path or a storage URI.

    Raises:
        SchemaError: the file is missing or unreadable (naming why), is not YAML, or does not
            describe a valid schema.
    """
    try:
        location = storage.resolve(path)
        text = storage.read_text(location)
    except storage.StorageError as err:
        raise SchemaError(f"cannot read schema file {err}") from None
    return FeatureSchema.from_yaml(text, source=location.uri)


def _reject_duplicates(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {kind} name {name!r}")
        seen.add(name)


def _describe(err: ValidationError, data: object, source: str) -> str:
    lines = [f"{source}: invalid feature schema ({err.error_count()} error(s))"]
    for item in err.errors():
        where = _location(item["loc"], data)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def _location(loc: tuple, data: object) -> str:
    """``sparse.2.dim`` becomes ``sparse[2] 'user_id'.dim`` so the error names the feature."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            parts[-1] = f"{parts[-1]}[{key}]" if parts else f"[{key}]"
            node = node[key] if isinstance(node, list) and key < len(node) else None
            if isinstance(node, dict) and "name" in node:
                parts[-1] += f" {node['name']!r}"
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "<schema>"
