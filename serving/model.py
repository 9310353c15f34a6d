"""The inference module, rebuilt from an artifact's ``ModelSpec`` with plain torch (no trainer).

It computes what ``trainer.model.CtcvrModel`` computes in evaluation mode, for the ctr and cvr
heads only (``schemas/artifact.py`` states the maths; its name functions, ``expert_layer``,
``gate``, ``tower_layer``..., name the tensors read here and declared by the trainer's modules),
arranged for few, large operations, because a request of a few rows costs what its number of
operations costs:

* the embedding tables are one matrix of rows per embedding dim (``serving.tables``: float32 or
  row-wise int8 or int4, memory-mapped from the model directory's file of that dim, or, for a format 1
  directory, copied together), so all single-valued features of a dim are one lookup
  (``(B, S)`` ids plus each table's row offset); list features pool their bags from the same
  rows (sum or mean; an empty bag gives zeros);
* the first layer of every expert and every gate is one matrix product (its input columns
  permuted at load time to the lookup order, so inputs are never reordered); deeper expert layers and
  the towers of both heads run as batched matrix products (``bmm``) over experts or heads;
* the gate mixture is a ``bmm`` of the softmax weights with the expert outputs;
* with ``spec.interaction == "dot"`` the pooled embeddings' pairwise dot products are one
  ``bmm`` of the ``(B, F, D)`` embeddings (gathered in the spec's feature order) with itself,
  appended after the dense features;
* a model trained with DDPO's causal transfer modules (``spec.cvr_transfer``) replaces the CVR
  mixture by their fused feature before the towers (``_CausalTransfer``), as the trainer does.

Ranking requests (:class:`RankFeatures`, :meth:`ScoringModel.predict_ranking`) carry the context's
features once: its rows are looked up once per request, and its share of the first layer (a
product with the context's input columns) is computed once and added to every candidate's.

The results equal the trainer's to float32 rounding (the parity tests hold them to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.artifact import (
    TRANSFER_FUSE,
    TRANSFER_PROJECTIONS,
    ModelSpec,
    Pooling,
    expert_layer,
    gate,
    tower_layer,
    tower_logit,
    transfer_projection,
)
from serving.tables import EmbeddingRows, FloatRows

__all__ = ["Features", "RankFeatures", "ScoringModel"]

_MAX_BROADCAST_PLANS = 64  # first-layer splits remembered (one per set of context features)


@dataclass
class Features:
    """Model inputs of ``B`` rows, as numpy arrays (ids already mapped by the schema's hashing).

    Attributes:
        single: ``(B, S)`` int64 row ids of the single-valued features, in the spec's order.
        multi_values: per multi-valued feature (spec order), the flat int64 row ids of all rows.
        multi_lengths: per multi-valued feature, ``(B,)`` int64 list lengths (0: empty bag).
        dense: ``(B, N)`` float32 normalised dense features.
    """

    single: np.ndarray
    multi_values: list[np.ndarray]
    multi_lengths: list[np.ndarray]
    dense: np.ndarray

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        """The rows of several requests as one batch, in order."""
        if len(parts) == 1:
            return parts[0]
        return Features(
            single=np.concatenate([p.single for p in parts]),
            multi_values=[np.concatenate(v) for v in zip(*(p.multi_values for p in parts))],
            multi_lengths=[np.concatenate(v) for v in zip(*(p.multi_lengths for p in parts))],
            dense=np.concatenate([p.dense for p in parts]),
        )


@dataclass
class RankFeatures:
    """Model inputs of ranking requests: one context row per request, broadcast to its candidates.

    Attributes:
        context: ``R`` rows, one per request.
        candidates: ``N`` rows, the candidates of every request, request after request.
        counts: ``(R,)`` int64 candidates of each request (they sum to ``N``).
        from_context: the features every candidate takes from its request's context row; the
            others come from the candidate's own row. The same for every request of a batch.
    """

    context: Features
    candidates: Features
    counts: np.ndarray
    from_context: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.candidates.size

    @staticmethod
    def concat(parts: Sequence[RankFeatures]) -> RankFeatures:
        """Several ranking requests as one batch, in order.

        Raises:
            ValueError: the requests take different features from their contexts.
        """
        if len(parts) == 1:
            return parts[0]
        if len({p.from_context for p in parts}) != 1:
            raise ValueError("ranking requests batched together must share from_context")
        return RankFeatures(
            context=Features.concat([p.context for p in parts]),
            candidates=Features.concat([p.candidates for p in parts]),
            counts=np.concatenate([p.counts for p in parts]),
            from_context=parts[0].from_context,
        )


@dataclass(frozen=True)
class _Broadcast:
    """Ranking requests' first layer, split between the context's and the candidates' columns."""

    context: torch.Tensor  # (C,) input columns taken from the context row
    context_weight: torch.Tensor  # (C, H) their first-layer weights, transposed
    groups: list[_Group]  # the candidates' own single-valued lookups ...
    bags: list[_Input]  # ... and list features
    dense: torch.Tensor  # (Dk,) columns of Features.dense the candidates give
    candidate_weight: torch.Tensor  # (K, H) first-layer weights of those inputs, transposed


@dataclass(frozen=True)
class _Input:
    """Where one sparse feature's pooled embedding comes from."""

    feature: str
    table: str
    dim: int
    single_slot: int | None  # column of Features.single, or
    multi_slot: int | None  # index into Features.multi_*
    pooling: Pooling


_Group = tuple[
    int, torch.Tensor | None, torch.Tensor
]  # dim, columns of Features.single, row offsets


class ScoringModel(nn.Module):
    """pCTR, pCVR and pCTCVR from mapped features.

    Build it empty with the spec, then give it the rows of every embedding dim, either whole
    with :meth:`set_embeddings` (a format 2 model directory's memory-mapped file of that dim) or
    table by table with :meth:`set_table` (copied into one matrix per dim), and the dense
    tensors with :meth:`set_dense`.

    Args:
        spec: the artifact's model spec.
        multi_valued: names of the list features.

    Example::

        model = ScoringModel(manifest.model, multi_valued=["recent_items"])
        for file in manifest.embeddings.files:
            model.set_embeddings(file.dim, open_embedding_file(path, file, quantization))
        model.set_dense(dense_tensors)
        scores = model.predict(features)  # (B, 3) float32: pctr, pcvr, pctcvr
    """

    def __init__(self, spec: ModelSpec, multi_valued: Sequence[str] = ()) -> None:
        super().__init__()
        self.spec = spec
        multi = set(multi_valued)
        # One matrix of rows per embedding dim; each table is a block of rows in its dim's
        # matrix, in spec order (schemas.artifact.embedding_layout, the files' layout).
        dims = sorted({t.dim for t in spec.tables})
        self._offset: dict[str, int] = {}
        self._num_rows = dict.fromkeys(dims, 0)
        for table in spec.tables:
            self._offset[table.name] = self._num_rows[table.dim]
            self._num_rows[table.dim] += table.num_rows
        self._rows: dict[int, EmbeddingRows] = {}
        self._copied: set[int] = set()  # dims whose matrix set_table fills (in memory)
        self._loaded: set[str] = set()
        inputs: list[_Input] = []
        singles = multis = 0
        for table in spec.tables:
            for name in table.features:
                is_multi = name in multi
                inputs.append(
                    _Input(
                        name,
                        table.name,
                        table.dim,
                        None if is_multi else singles,
                        multis if is_multi else None,
                        table.pooling,
                    )
                )
                singles, multis = (singles, multis + 1) if is_multi else (singles + 1, multis)
        self._inputs = inputs
        self.single_valued = [i.feature for i in inputs if i.single_slot is not None]
        self.multi_valued = [i.feature for i in inputs if i.multi_slot is not None]
        self._plan_lookups(dims)
        self._dense_loaded = False
        self.cvr_transfer: _CausalTransfer | None = None

    def _plan_lookups(self, dims: list[int]) -> None:
        """Single-valued lookups grouped by dim, and the column order that restores the spec's."""
        self._dims = dims
        self._groups = self._single_groups(self._inputs)
        singles = [
            i for dim in dims for i in self._inputs if i.single_slot is not None and i.dim == dim
        ]
        self._bags = [i for i in self._inputs if i.multi_slot is not None]
        # (feature, width) in the order forward concatenates
        pieces = [(i.feature, i.dim) for i in singles + self._bags]
        start, where = 0, {}
        for feature, width in pieces:
            where[feature] = (start, width)
            start += width
        self._where, self._pooled_width = where, start
        self._broadcasts: dict[tuple[str, ...], _Broadcast] = {}
        columns = [
            c
            for i in self._inputs
            for c in range(where[i.feature][0], where[i.feature][0] + where[i.feature][1])
        ]
        embedding_columns = list(columns)
        columns += list(
            range(start, start + len(self.spec.dense_features) + self.spec.num_interactions)
        )
        self._interaction: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.spec.interaction == "dot":
            num = len(self._inputs)
            rows, cols = torch.triu_indices(num, num, offset=1)
            # (pooled embedding columns in spec order, flat upper-triangle positions of the Gram matrix)
            self._interaction = (torch.tensor(embedding_columns), rows * num + cols)
        # forward concatenates in ``pieces`` order; the first layer's input columns are permuted
        # to match once at load time instead of permuting every batch.
        self._columns = torch.tensor(columns)

    def _single_groups(self, inputs: Sequence[_Input]) -> list[_Group]:
        """Lookups of the single-valued ``inputs``: one per embedding dim, in dim order."""
        count = sum(i.single_slot is not None for i in self._inputs)
        groups = []
        for dim in self._dims:
            members = [i for i in inputs if i.single_slot is not None and i.dim == dim]
            if not members:
                continue
            slots = [i.single_slot for i in members]
            select = None if slots == list(range(count)) else torch.tensor(slots)
            offsets = torch.tensor([self._offset[i.table] for i in members])
            groups.append((dim, select, offsets))
        return groups

    # Loading -----------------------------------------------------------------------------------

    def set_embeddings(self, dim: int, rows: EmbeddingRows) -> None:
        """Take the rows of every table of embedding dim ``dim``, in spec order, as they are (a
        memory-mapped file stays mapped: nothing is copied).

        Raises:
            ValueError: no table of that dim, or another number of rows or another width.
        """
        if dim not in self._num_rows:
            raise ValueError(f"the model spec has no table of dim {dim}")
        if (rows.num_rows, rows.dim) != (self._num_rows[dim], dim):
            raise ValueError(
                f"embedding rows of dim {dim} are {(rows.num_rows, rows.dim)}; the spec's tables "
                f"of that dim need {(self._num_rows[dim], dim)}"
            )
        self._rows[dim] = rows
        self._copied.discard(dim)
        self._loaded |= {t.name for t in self.spec.tables if t.dim == dim}

    def set_table(self, name: str, weight: torch.Tensor) -> None:
        """Copy one table's ``(num_rows, dim)`` float32 weights into its dim's matrix.

        Raises:
            ValueError: unknown table, wrong shape or dtype.
        """
        entry = next((t for t in self.spec.tables if t.name == name), None)
        if entry is None:
            raise ValueError(f"table {name!r} is not in the model spec")
        if tuple(weight.shape) != (entry.num_rows, entry.dim) or weight.dtype != torch.float32:
            raise ValueError(
                f"table {name!r} is {weight.dtype} {tuple(weight.shape)}; the spec needs float32 "
                f"{(entry.num_rows, entry.dim)}"
            )
        if entry.dim not in self._copied:  # this dim's first table: its matrix, in memory
            self._rows[entry.dim] = FloatRows(torch.zeros(self._num_rows[entry.dim], entry.dim))
            self._copied.add(entry.dim)
            self._loaded -= {t.name for t in self.spec.tables if t.dim == entry.dim}
        start = self._offset[name]
        self._rows[entry.dim].weight[start : start + entry.num_rows].copy_(weight)
        self._loaded.add(name)

    def set_dense(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take the MMoE and tower tensors (names and shapes of ``spec.dense_shapes()``).

        Raises:
            ValueError: a tensor missing, unexpected, of the wrong shape or not float32.
        """
        expected = self.spec.dense_shapes()
        missing, unexpected = (
            sorted(set(expected) - set(tensors)),
            sorted(set(tensors) - set(expected)),
        )
        if missing or unexpected:
            raise ValueError(
                f"dense weights do not match the model spec: missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != expected[key] or tensor.dtype != torch.float32:
                raise ValueError(
                    f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}; the spec needs float32 {expected[key]}"
                )
        spec = self.spec

        def weight(name: str) -> torch.Tensor:
            return tensors[f"{name}.weight"]

        def bias(name: str) -> torch.Tensor:
            return tensors[f"{name}.bias"]

        experts, heads, gates = range(spec.num_experts), spec.heads, spec.gate_heads
        # Layer 0 of every expert, then every gate: one (E*H1 + gates*E, in) matrix.
        first_layers = [expert_layer(e, 0) for e in experts] + [gate(h) for h in gates]
        first = torch.cat([weight(name) for name in first_layers])
        self.first_weight = torch.empty_like(first)
        self.first_weight[:, self._columns] = (
            first  # spec column c is read from position _columns[c]
        )
        self.first_bias = torch.cat([bias(name) for name in first_layers])
        self.cvr_transfer = (
            _CausalTransfer(tensors, spec.cvr_transfer, gates) if spec.cvr_transfer else None
        )

        def stacked(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            """Linear layers as one ``(n, in, out)`` weight and ``(n, 1, out)`` bias for bmm."""
            return (
                torch.stack([weight(name).T for name in names]).contiguous(),
                torch.stack([bias(name) for name in names]).unsqueeze(1),
            )

        # Deeper expert layers over the experts; tower layers and logits over the heads.
        self.expert_layers = [
            stacked([expert_layer(e, k) for e in experts]) for k in range(1, len(spec.expert_sizes))
        ]
        self.tower_layers = [
            stacked([tower_layer(h, k) for h in heads]) for k in range(len(spec.tower_sizes))
        ] + [stacked([tower_logit(h) for h in heads])]
        self._dense_loaded = True

    def check_loaded(self) -> None:
        """Raises ValueError unless every table and the dense tensors were set."""
        missing = sorted({t.name for t in self.spec.tables} - self._loaded)
        if missing or not self._dense_loaded:
            raise ValueError(
                f"model not fully loaded: tables {missing} missing"
                + ("" if self._dense_loaded else ", dense tensors missing")
            )

    # Inference ---------------------------------------------------------------------------------

    def forward(
        self,
        single: torch.Tensor,
        multi_values: Sequence[torch.Tensor],
        multi_offsets: Sequence[torch.Tensor],
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """Args:
            single: ``(B, S)`` int64 ids of the single-valued features.
            multi_values: per list feature, flat int64 ids.
            multi_offsets: per list feature, ``(B,)`` int64 start of each row's bag.
            dense: ``(B, N)`` float32.

        Returns:
            ``(B, 3)`` float32: pctr, pcvr, pctcvr.
        """
        return self.scores(self.inputs(single, multi_values, multi_offsets, dense))

    def inputs(
        self,
        single: torch.Tensor,
        multi_values: Sequence[torch.Tensor],
        multi_offsets: Sequence[torch.Tensor],
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """The MMoE input: ``(B, in_features)`` float32, the pooled embeddings, the dense
        features and the interactions, columns in lookup order (what :attr:`first_weight`'s
        columns are permuted to); arguments as :meth:`forward`'s."""
        return self._layer_input(self._lookups(single, multi_values, multi_offsets), dense)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3)`` float32 pctr, pcvr, pctcvr of the MMoE input ``x`` (:meth:`inputs`)."""
        return self._heads(F.linear(x, self.first_weight, self.first_bias))

    def _lookups(
        self,
        single: torch.Tensor,
        multi_values: Sequence[torch.Tensor],
        multi_offsets: Sequence[torch.Tensor],
        groups: Sequence[_Group] | None = None,
        bags: Sequence[_Input] | None = None,
    ) -> list[torch.Tensor]:
        """The pooled embeddings, ``(B, width)`` pieces in lookup order: of every feature, or of
        the ``groups`` and ``bags`` given."""
        batch = single.shape[0]
        pieces = []
        for dim, select, offsets in self._groups if groups is None else groups:
            ids = (single if select is None else single.index_select(1, select)) + offsets
            pieces.append(self._rows[dim].lookup(ids).view(batch, -1))
        for bag in self._bags if bags is None else bags:
            pieces.append(
                self._rows[bag.dim].pool(
                    multi_values[bag.multi_slot] + self._offset[bag.table],
                    multi_offsets[bag.multi_slot],
                    bag.pooling,
                )
            )
        return pieces

    def _layer_input(self, pooled: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """The first layer's input: pooled embeddings, dense features and any interactions."""
        pieces = [*pooled, dense]
        if self._interaction is not None:
            pieces.append(self._dot_interaction(torch.cat(pooled, dim=1)))
        return torch.cat(pieces, dim=1)  # columns in lookup order; first_weight is permuted to it

    def _heads(self, first: torch.Tensor) -> torch.Tensor:
        """``(B, 3)`` pctr, pcvr, pctcvr from the first layer's ``(B, E*H1 + gates*E)`` output."""
        batch = first.shape[0]
        spec = self.spec
        experts, width = spec.num_experts, spec.expert_sizes[0]
        hidden = (
            torch.relu(first[:, : experts * width]).view(batch, experts, width).transpose(0, 1)
        )  # (E, B, H)
        for weight, bias in self.expert_layers:
            hidden = torch.relu(torch.baddbmm(bias, hidden, weight))
        logits = first[:, experts * width :].reshape(batch, len(spec.gate_heads), experts)
        # softmax over the few experts, spelt out: torch.softmax is several times slower on so
        # short a last dimension
        gates = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        gates = gates / gates.sum(dim=-1, keepdim=True)
        mixtures = torch.bmm(gates, hidden.transpose(0, 1)).transpose(0, 1)  # (gate heads, B, H)
        if self.cvr_transfer is not None:
            mixtures = torch.stack([mixtures[0], self.cvr_transfer(mixtures)])  # (ctr, fused cvr)
        for weight, bias in self.tower_layers[:-1]:
            mixtures = torch.relu(torch.baddbmm(bias, mixtures, weight))
        weight, bias = self.tower_layers[-1]
        probs = torch.sigmoid(torch.baddbmm(bias, mixtures, weight).squeeze(-1))  # (heads, B)
        pctr, pcvr = probs[0], probs[1]
        return torch.stack([pctr, pcvr, pctr * pcvr], dim=1)

    def _dot_interaction(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, F (F - 1) / 2)`` pairwise dot products of the pooled embeddings (lookup order in)."""
        columns, pairs = self._interaction
        embeddings = pooled.index_select(1, columns).view(pooled.shape[0], len(self._inputs), -1)
        gram = torch.bmm(embeddings, embeddings.transpose(1, 2))
        return gram.flatten(1).index_select(1, pairs)

    @torch.inference_mode()
    def predict(self, features: Features) -> np.ndarray:
        """``(B, 3)`` float32 numpy scores of a batch of mapped features."""
        return self(*self.arguments(features)).numpy()

    @staticmethod
    def arguments(
        features: Features,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """:meth:`forward`'s arguments for a batch of mapped features (no copies)."""
        return _tensors(features)

    @torch.inference_mode()
    def predict_ranking(self, inputs: RankFeatures) -> np.ndarray:
        """``(N, 3)`` float32 numpy scores of ranking requests' candidates, in order.

        Each candidate scores as the row of its own features and its request's context features
        would (:meth:`predict`), to float32 rounding: the context rows are looked up once per
        request and, but for dot interactions (which pair context and candidate embeddings), their
        share of the first layer is computed once per request too.
        """
        plan = self._broadcast(inputs.from_context)
        context = _tensors(inputs.context)
        candidates = _tensors(inputs.candidates)
        shared = torch.cat([*self._lookups(*context[:3]), context[3]], dim=1)  # (R, P + D)
        rows = None
        if len(inputs.counts) > 1:
            rows = torch.from_numpy(np.repeat(np.arange(len(inputs.counts)), inputs.counts))
        if self._interaction is None:
            own = self._lookups(*candidates[:3], plan.groups, plan.bags)
            own.append(candidates[3].index_select(1, plan.dense))
            first_shared = torch.addmm(
                self.first_bias, shared.index_select(1, plan.context), plan.context_weight
            )  # (R, H): broadcast over one request's candidates, repeated for several
            if rows is not None:
                first_shared = first_shared.index_select(0, rows)
            first = torch.addmm(first_shared, torch.cat(own, dim=1), plan.candidate_weight)
        else:  # the interactions pair context and candidate embeddings: assemble whole rows
            own = torch.cat([*self._lookups(*candidates[:3]), candidates[3]], dim=1)
            shared = (
                shared.expand(own.shape[0], -1) if rows is None else shared.index_select(0, rows)
            )
            own.index_copy_(1, plan.context, shared.index_select(1, plan.context))
            pooled, dense = own[:, : self._pooled_width], own[:, self._pooled_width :]
            first = F.linear(self._layer_input([pooled], dense), self.first_weight, self.first_bias)
        return self._heads(first).numpy()

    def _broadcast(self, from_context: tuple[str, ...]) -> _Broadcast:
        """The first layer split for ``from_context`` (remembered: a service sees few splits).

        Raises:
            ValueError: a name that is no feature of the model.
        """
        plan = self._broadcasts.get(from_context)
        if plan is not None:
            return plan
        dense_index = {name: k for k, name in enumerate(self.spec.dense_features)}
        unknown = set(from_context) - self._where.keys() - dense_index.keys()
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not features of this model")
        taken = np.zeros(self._pooled_width + len(dense_index), dtype=bool)
        for name in from_context:
            if name in self._where:
                start, width = self._where[name]
                taken[start : start + width] = True
            else:
                taken[self._pooled_width + dense_index[name]] = True
        context = torch.from_numpy(np.flatnonzero(taken))
        # the candidates' own inputs, in the order of the columns they fill (ascending)
        own = [i for i in self._inputs if i.feature not in from_context]
        candidate = torch.from_numpy(np.flatnonzero(~taken))
        plan = _Broadcast(
            context=context,
            context_weight=self.first_weight.index_select(1, context).T.contiguous(),
            groups=self._single_groups(own),
            bags=[i for i in own if i.multi_slot is not None],
            dense=torch.tensor(
                [k for name, k in dense_index.items() if name not in from_context],
                dtype=torch.int64,
            ),
            candidate_weight=self.first_weight.index_select(1, candidate).T.contiguous(),
        )
        if len(self._broadcasts) >= _MAX_BROADCAST_PLANS:
            self._broadcasts.clear()
        self._broadcasts[from_context] = plan
        return plan


def _tensors(
    features: Features,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``features`` as the model's inputs: ids, list ids, list offsets, dense values."""
    offsets = []
    for lengths in features.multi_lengths:
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        offsets.append(torch.from_numpy(starts))
    return (
        torch.from_numpy(features.single),
        [torch.from_numpy(v) for v in features.multi_values],
        offsets,
        torch.from_numpy(features.dense),
    )


class _CausalTransfer:
    """DDPO's causal transfer modules and their fusion (``schemas/artifact.py`` states the maths):
    the CVR tower's input from the gate mixtures of the CVR head and of each source head."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], sources: Sequence[str], gate_heads: Sequence[str]
    ) -> None:
        self.cvr = gate_heads.index("cvr")
        self.sources = [gate_heads.index(source) for source in sources]
        # query, key and value of every source as one (3*H, H) matrix per source
        projections = [[transfer_projection(s, p) for p in TRANSFER_PROJECTIONS] for s in sources]
        self.weights = [torch.cat([tensors[f"{n}.weight"] for n in names]) for names in projections]
        self.biases = [torch.cat([tensors[f"{n}.bias"] for n in names]) for names in projections]
        self.fuse_weight = tensors[f"{TRANSFER_FUSE}.weight"]
        self.fuse_bias = tensors[f"{TRANSFER_FUSE}.bias"]
        self.scale = 1.0 / math.sqrt(self.fuse_bias.shape[0])

    def __call__(self, mixtures: torch.Tensor) -> torch.Tensor:
        """Args: mixtures ``(gate heads, B, H)``. Returns the fused CVR feature ``(B, H)``."""
        cvr = mixtures[self.cvr]
        fused = []
        for source, weight, bias in zip(self.sources, self.weights, self.biases, strict=True):
            tokens = torch.stack([mixtures[source], cvr], dim=1)  # (B, 2, H)
            query, key, value = F.linear(tokens, weight, bias).chunk(3, dim=-1)
            scores = (query * key).sum(dim=-1) * self.scale  # (B, 2): one score per token
            attention = torch.softmax(scores, dim=1).unsqueeze(-1)
            fused.append((attention * value).sum(dim=1))
        return F.linear(torch.cat(fused, dim=1), self.fuse_weight, self.fuse_bias)
