"""The serving artifact: what ``trainer.export`` writes and ``serving`` loads. No torch here.

A model directory is self-contained; nothing in it is executable (no pickle)::

    MODEL_DIR/
      manifest.json                             Manifest: version, provenance, model spec, sha256s
      schema.yaml                               the FeatureSchema the model was trained on
      weights/dense.safetensors                 MMoE experts and gates, ctr and cvr towers
      weights/embeddings/dim<D>.safetensors     every table of dim D, one after the other (format 2)
      weights/embeddings/<table>.safetensors    one table each (format 1, still read)

Embedding tables (format 2, :class:`EmbeddingLayout`): the tables of one embedding dim are the
consecutive row blocks of one tensor ``"weight"`` in one file, in the spec's table order, and the
manifest gives each table's first row (``row_offset``). The service memory-maps these files, so
several worker processes share one copy of the tables in the page cache, and still looks up all
single-valued features of a dim at once (a table's ids plus its row offset). With
``quantization: none`` the tensor is float32 ``(rows, D)``; with ``int8`` it is uint8
``(rows, D + 2)`` (``int8_layout: scale-index-zero-point``), row-wise 8-bit quantisation: each
row holds ``D`` codes ``q`` (0..255), then the index ``e`` of its scale among the file's 256
float32 ``scales`` (a second tensor, ascending, ``scales[0] = 0``), then its zero point ``z``
(0..255); the value is ``scales[e] * (q - z)``, within ``scales[e] / 2`` of the float weight.
Sharing the scales keeps a row 3.56x smaller than float32 at ``D = 16``, where a float32 scale
and offset per row would keep it at 2.67x. torch has no kernel for this layout: the service's
own (``serving/_int8_rows.c``) dequantises only the rows a request reads, inside the lookup.
Models exported before this layout (a manifest without ``int8_layout``) hold
``float32-scale-offset`` rows, ``(rows, D + 8)``: ``D`` codes, then a float32 ``scale`` and
``offset`` (the value ``scale * q + offset``), the layout of torch's FBGEMM kernel
``quantized::embedding_bag_byte_rowwise_offsets``; they are still served. With ``int4`` it is
uint8 ``(rows, ceil(D / 2) + 4)``: the codes (0..15) two a byte, element ``2 i`` in the low
nibble of byte ``i`` (an odd ``D`` leaves the last high nibble 0), then a float16 ``scale`` and
float16 ``offset``, the layout of ``quantized::embedding_bag_4bit_rowwise_offsets``. Format 1
(one ``(num_rows, dim)`` float32 file per table) is still served, copied into memory.

Tensor names in ``weights/dense.safetensors``. Every tensor belongs to a linear layer, named by
one of the functions below, whose ``<name>.weight`` is ``(out, in)`` and ``<name>.bias``
``(out,)``::

    mmoe.experts.{e}.layers.{l}      expert_layer(e, l)   expert e, layer l (Linear, then ReLU)
    mmoe.gates.{head}                gate(head)           softmax gate of a head over the experts
    towers.{head}.layers.{l}         tower_layer(head, l) tower hidden layer l (Linear, then ReLU)
    towers.{head}.head               tower_logit(head)    the tower's logit
    cvr_transfer.{source}.{query,key,value}   transfer_projection(source, p)   DDPO only
    cvr_transfer.fuse                TRANSFER_FUSE        their fusion into the CVR tower's input

:meth:`ModelSpec.dense_shapes` is the contract: the tensors a spec's model has, names and shapes.
The trainer's modules declare the tensors they export under these names
(``CtcvrModel.serving_tensors``), the export checks the declaration against the contract, and the
service (``serving/model.py``) reads the tensors by these names after checking them against it.

The model: ``x = concat(pooled embeddings in table order, then each table's features in order;
normalised dense features; with ``interaction: dot``, then <e_i, e_j> for every pair i < j of the
sparse features' pooled embeddings in that order, row-major: (0, 1), (0, 2), ..., (F-2, F-1))``;
``mixture[h] = sum_e softmax(gate_h(x))_e * expert_e(x)``;
``logit[h] = head_h(tower_layers_h(mixture[h]))``; ``pctr = sigmoid(logit[ctr])``,
``pcvr = sigmoid(logit[cvr])``, ``pctcvr = pctr * pcvr``. Only the ctr and cvr heads are
exported: heads that exist only for training (imputation, teachers...) are left out.

With ``cvr_transfer`` (DDPO's causal transfer modules, ddpo.txt Eq. 12-14) the CVR tower reads
``fuse(concat_s T_s(mixture[s], mixture[cvr]))`` instead of ``mixture[cvr]``, where for each
source head ``s`` (in order) ``T_s`` stacks the two features as tokens ``u_1, u_2``, scores
each ``a_t = <query(u_t), key(u_t)> / sqrt(width)``, and returns
``sum_t softmax(a)_t * value(u_t)``; the gates of source heads that are not served are
exported for this (their towers are not).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum, unique
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.layout import SCHEMA_FILE

__all__ = [
    "DENSE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "INT4_ROW_EXTRA_BYTES",
    "INT8_FLOAT_SCALE_ROW_EXTRA_BYTES",
    "INT8_ROW_EXTRA_BYTES",
    "INT8_SCALES",
    "MANIFEST_FILE",
    "READABLE_FORMAT_VERSIONS",
    "SCALES_TENSOR",
    "SCHEMA_FILE",
    "SERVED_HEADS",
    "TABLE_TENSOR",
    "TRANSFER_FUSE",
    "TRANSFER_PROJECTIONS",
    "EmbeddingFile",
    "EmbeddingLayout",
    "FileEntry",
    "Int8Layout",
    "Manifest",
    "ModelSpec",
    "Pooling",
    "Quantization",
    "Source",
    "TableEntry",
    "TableRows",
    "embedding_file",
    "embedding_layout",
    "expert_layer",
    "gate",
    "linear_shapes",
    "table_file",
    "tower_layer",
    "tower_logit",
    "transfer_projection",
]

FORMAT = "ctcvr-model"
FORMAT_VERSION = 2  # what trainer.export writes
READABLE_FORMAT_VERSIONS = (1, 2)  # what the service reads
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "weights/dense.safetensors"
TABLE_TENSOR = "weight"  # the one tensor of each embedding file
INT8_ROW_EXTRA_BYTES = 2  # an int8 row's scale index and zero point, after its codes
INT8_FLOAT_SCALE_ROW_EXTRA_BYTES = 8  # a float32-scale-offset int8 row's scale and offset
INT8_SCALES = 256  # an int8 file's shared scales (tensor SCALES_TENSOR), one indexed per row
SCALES_TENSOR = "scales"
INT4_ROW_EXTRA_BYTES = 4  # an int4 row's float16 scale and offset, after its packed codes
SERVED_HEADS = ("ctr", "cvr")

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A file path inside the model directory: relative, no "..", no odd characters.
_REL_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9_.\-/]{1,255}$")


def table_file(table: str) -> str:
    """Path of a table's weights inside a format 1 model directory."""
    return f"weights/embeddings/{table}.safetensors"


def embedding_file(dim: int) -> str:
    """Path of the file holding every table of embedding dim ``dim`` (format 2)."""
    return f"weights/embeddings/dim{dim}.safetensors"


# Names of the linear layers in weights/dense.safetensors ----------------------------------------

TRANSFER_PROJECTIONS = ("query", "key", "value")  # of each causal transfer module, in this order
TRANSFER_FUSE = "cvr_transfer.fuse"  # the causal transfer modules' fusion (DDPO)


def expert_layer(expert: int, layer: int) -> str:
    """Layer ``layer`` of MMoE expert ``expert``."""
    return f"mmoe.experts.{expert}.layers.{layer}"


def gate(head: str) -> str:
    """The MMoE gate of ``head``."""
    return f"mmoe.gates.{head}"


def tower_layer(head: str, layer: int) -> str:
    """Hidden layer ``layer`` of ``head``'s tower."""
    return f"towers.{head}.layers.{layer}"


def tower_logit(head: str) -> str:
    """The last layer of ``head``'s tower, to one logit."""
    return f"towers.{head}.head"


def transfer_projection(source: str, projection: str) -> str:
    """The ``query``, ``key`` or ``value`` projection of the causal transfer module of ``source``."""
    return f"cvr_transfer.{source}.{projection}"


def linear_shapes(name: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The tensors of the linear layer ``name``: ``{name}.weight`` and ``{name}.bias``."""
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@unique
class Pooling(str, Enum):
    SUM = "sum"  # tables read only by single-valued features (one value: same as mean)
    MEAN = "mean"  # tables read by a multi-valued feature; an empty bag pools to zeros


class TableEntry(_Frozen):
    """One embedding table and the features that read it, in the model's input order."""

    name: Name
    num_rows: int = Field(gt=0, description="rows including the reserved OOV row")
    dim: int = Field(gt=0)
    pooling: Pooling
    features: tuple[Name, ...] = Field(min_length=1)


class ModelSpec(_Frozen):
    """Everything needed to rebuild the inference module, with no trainer code."""

    heads: tuple[str, ...] = SERVED_HEADS
    num_experts: int = Field(ge=1)
    expert_sizes: tuple[int, ...] = Field(min_length=1)
    tower_sizes: tuple[int, ...] = ()
    tables: tuple[TableEntry, ...] = Field(min_length=1)
    dense_features: tuple[Name, ...] = ()
    cvr_transfer: tuple[Name, ...] = Field(
        default=(),
        description="heads fused into the CVR tower's input by causal transfer modules (DDPO)",
    )
    interaction: Literal["none", "dot"] = Field(
        default="none",
        description="dot: the pairwise dot products of the sparse embeddings follow the dense features",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.heads != SERVED_HEADS:
            raise ValueError(f"heads must be {list(SERVED_HEADS)}, got {list(self.heads)}")
        if "cvr" in self.cvr_transfer or len(set(self.cvr_transfer)) != len(self.cvr_transfer):
            raise ValueError(
                f"cvr_transfer must name distinct heads other than 'cvr', got {list(self.cvr_transfer)}"
            )
        if min(self.expert_sizes) < 1 or min(self.tower_sizes, default=1) < 1:
            raise ValueError("expert_sizes and tower_sizes must be positive")
        features = self.sparse_features + list(self.dense_features)
        if len(set(features)) != len(features):
            raise ValueError("a feature appears twice in the model spec")
        tables = [t.name for t in self.tables]
        if len(set(tables)) != len(tables):
            raise ValueError("a table appears twice in the model spec")
        if self.interaction == "dot" and len({t.dim for t in self.tables}) != 1:
            raise ValueError(
                "interaction 'dot' needs one embedding dim for every table, got "
                f"{sorted({t.dim for t in self.tables})}"
            )
        if self.interaction == "dot" and len(self.sparse_features) < 2:
            raise ValueError("interaction 'dot' needs at least 2 sparse features")
        return self

    @property
    def sparse_features(self) -> list[str]:
        """Sparse feature names in the model's input order."""
        return [name for table in self.tables for name in table.features]

    @property
    def gate_heads(self) -> tuple[str, ...]:
        """Heads whose MMoE gate is in the artifact: the served ones, then transfer sources."""
        return self.heads + tuple(h for h in self.cvr_transfer if h not in self.heads)

    @property
    def num_interactions(self) -> int:
        """Pairwise dot products in the MMoE input (0 without an interaction)."""
        sparse = len(self.sparse_features)
        return sparse * (sparse - 1) // 2 if self.interaction == "dot" else 0

    @property
    def in_features(self) -> int:
        """Width of the MMoE input: pooled embeddings, dense features, then interactions."""
        return (
            sum(t.dim * len(t.features) for t in self.tables)
            + len(self.dense_features)
            + self.num_interactions
        )

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor in ``weights/dense.safetensors``."""
        shapes: dict[str, tuple[int, ...]] = {}
        width_in = self.in_features
        for e in range(self.num_experts):
            width = width_in
            for layer, size in enumerate(self.expert_sizes):
                shapes |= linear_shapes(expert_layer(e, layer), size, width)
                width = size
        for head in self.gate_heads:
            shapes |= linear_shapes(gate(head), self.num_experts, width_in)
        for head in self.heads:
            width = self.expert_sizes[-1]
            for layer, size in enumerate(self.tower_sizes):
                shapes |= linear_shapes(tower_layer(head, layer), size, width)
                width = size
            shapes |= linear_shapes(tower_logit(head), 1, width)
        mixture = self.expert_sizes[-1]
        for source in self.cvr_transfer:
            for projection in TRANSFER_PROJECTIONS:
                shapes |= linear_shapes(transfer_projection(source, projection), mixture, mixture)
        if self.cvr_transfer:
            shapes |= linear_shapes(TRANSFER_FUSE, mixture, len(self.cvr_transfer) * mixture)
        return shapes


@unique
class Quantization(str, Enum):
    NONE = "none"  # float32 rows
    INT8 = "int8"  # row-wise 8-bit codes, a scale (of the file's 256) and zero point per row
    INT4 = "int4"  # row-wise 4-bit codes, two a byte, with a float16 scale and offset per row


@unique
class Int8Layout(str, Enum):
    """How an int8 row is stored (the module's docstring has the details)."""

    SCALE_INDEX = "scale-index-zero-point"  # D + 2 bytes: what trainer.export writes
    FLOAT_SCALE = "float32-scale-offset"  # D + 8 bytes: FBGEMM's; exports without int8_layout


class TableRows(_Frozen):
    """Where one table's rows start in its embedding file."""

    name: Name
    row_offset: int = Field(ge=0)
    num_rows: int = Field(gt=0)


class EmbeddingFile(_Frozen):
    """One file of embedding rows: every table of one dim, concatenated in the spec's order."""

    path: str
    dim: int = Field(gt=0)
    num_rows: int = Field(gt=0)
    tables: tuple[TableRows, ...] = Field(min_length=1)

    def tensor_shape(
        self, quantization: Quantization, int8_layout: Int8Layout = Int8Layout.SCALE_INDEX
    ) -> tuple[int, int]:
        """Shape of the file's tensor ``weight``: ``(rows, D)`` float32, for int8
        ``(rows, D + 2)`` uint8 (codes, scale index, zero point; ``(rows, D + 8)``, codes, scale
        and offset, in the float-scale layout), for int4 ``(rows, ceil(D / 2) + 4)`` uint8
        (codes two a byte, then scale and offset)."""
        if quantization is Quantization.INT8:
            extra = (
                INT8_ROW_EXTRA_BYTES
                if int8_layout is Int8Layout.SCALE_INDEX
                else INT8_FLOAT_SCALE_ROW_EXTRA_BYTES
            )
            return (self.num_rows, self.dim + extra)
        if quantization is Quantization.INT4:
            return (self.num_rows, (self.dim + 1) // 2 + INT4_ROW_EXTRA_BYTES)
        return (self.num_rows, self.dim)

    def tensor_bytes(
        self, quantization: Quantization, int8_layout: Int8Layout = Int8Layout.SCALE_INDEX
    ) -> int:
        """Bytes of the file's rows (int8's 1 KiB of shared scales aside)."""
        rows, width = self.tensor_shape(quantization, int8_layout)
        return rows * width * (4 if quantization is Quantization.NONE else 1)


class EmbeddingLayout(_Frozen):
    """How the embedding tables are stored (format 2): one file per embedding dim."""

    quantization: Quantization = Quantization.NONE
    int8_layout: Int8Layout | None = Field(
        default=None, description="int8 only; absent in exports before it: float32-scale-offset"
    )
    files: tuple[EmbeddingFile, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _int8_layout_only_with_int8(self) -> EmbeddingLayout:
        if self.int8_layout is not None and self.quantization is not Quantization.INT8:
            raise ValueError(f"int8_layout: given with quantization {self.quantization.value}")
        return self

    @property
    def int8_rows(self) -> Int8Layout:
        """The int8 layout in force (an int8 manifest without ``int8_layout`` is older than it)."""
        return self.int8_layout or Int8Layout.FLOAT_SCALE

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every table's stored rows (the files' tensors, headers excluded)."""
        return sum(f.tensor_bytes(self.quantization, self.int8_rows) for f in self.files)

    def table(self, name: str) -> tuple[EmbeddingFile, TableRows]:
        """The file holding table ``name`` and its rows there.

        Raises:
            KeyError: no such table.
        """
        for file in self.files:
            for rows in file.tables:
                if rows.name == name:
                    return file, rows
        raise KeyError(name)


def embedding_layout(
    spec: ModelSpec, quantization: Quantization = Quantization.NONE
) -> EmbeddingLayout:
    """The layout of a spec's tables: a file per dim (ascending), each table's rows after those
    of the tables before it in the spec's order. The export writes it and the service, which
    computes it again, refuses a manifest that says otherwise."""
    files = []
    for dim in sorted({t.dim for t in spec.tables}):
        rows, offset = [], 0
        for table in spec.tables:
            if table.dim == dim:
                rows.append(TableRows(name=table.name, row_offset=offset, num_rows=table.num_rows))
                offset += table.num_rows
        files.append(
            EmbeddingFile(path=embedding_file(dim), dim=dim, num_rows=offset, tables=tuple(rows))
        )
    int8_layout = Int8Layout.SCALE_INDEX if quantization is Quantization.INT8 else None
    return EmbeddingLayout(quantization=quantization, int8_layout=int8_layout, files=tuple(files))


class FileEntry(_Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Source(_Frozen):
    """Where the weights come from."""

    run_dir: str
    checkpoint: str
    step: int = Field(ge=0)
    objective: str
    objective_params: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Frozen):
    """``manifest.json``: identity, provenance, the model spec and a checksum per file."""

    format: Literal["ctcvr-model"] = FORMAT
    format_version: Literal[1, 2] = FORMAT_VERSION
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$", description="version id")
    created_at: datetime
    source: Source
    schema_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: ModelSpec
    metrics: dict[str, float | None] = Field(
        default_factory=dict, description="evaluation of the run"
    )
    training_config: dict[str, Any] = Field(
        default_factory=dict, description="resolved TrainConfig"
    )
    embeddings: EmbeddingLayout | None = Field(
        default=None, description="format 2: the files of the embedding tables and their rows"
    )
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in files:
            if not _REL_PATH.match(path):
                raise ValueError(
                    f"file path {path!r} is not a plain relative path inside the model directory"
                )
        return files

    @model_validator(mode="after")
    def _all_files_listed(self) -> Manifest:
        if self.format_version == 1 and self.embeddings is not None:
            raise ValueError("embeddings: a format 1 manifest has one file per table, no layout")
        if self.format_version >= 2:
            if self.embeddings is None:
                raise ValueError(f"embeddings: Field required in format {self.format_version}")
            expected = embedding_layout(self.model, self.embeddings.quantization)
            if self.embeddings.files != expected.files:
                raise ValueError(
                    "embeddings: the layout does not match the model spec's tables: expected "
                    f"{_describe(expected)}, got {_describe(self.embeddings)}"
                )
        missing = [path for path in self.required_files() if path not in self.files]
        if missing:
            raise ValueError(f"files: no checksum for {missing}")
        return self

    @property
    def quantization(self) -> Quantization:
        """How the embedding rows are stored (format 1: float32)."""
        return self.embeddings.quantization if self.embeddings is not None else Quantization.NONE

    def table_path(self, name: str) -> str:
        """The file holding table ``name``'s rows: its own in format 1, its dim's in format 2.

        Raises:
            KeyError: no such table.
        """
        if self.embeddings is None:
            if name not in {t.name for t in self.model.tables}:
                raise KeyError(name)
            return table_file(name)
        return self.embeddings.table(name)[0].path

    def required_files(self) -> list[str]:
        """Every file the service reads, besides the manifest itself."""
        if self.embeddings is None:
            return [SCHEMA_FILE, DENSE_FILE] + [table_file(t.name) for t in self.model.tables]
        return [SCHEMA_FILE, DENSE_FILE] + [f.path for f in self.embeddings.files]


def _describe(layout: EmbeddingLayout) -> str:
    return "; ".join(
        f"{f.path}: " + ", ".join(f"{t.name}@{t.row_offset}+{t.num_rows}" for t in f.tables)
        for f in layout.files
    )
