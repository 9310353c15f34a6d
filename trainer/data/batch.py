"""The one typed container that flows from the reader to the model, objectives and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from schemas import TRUTH_COLUMNS

__all__ = ["TRUTH_COLUMNS", "Batch", "GroundTruth"]


@dataclass
class GroundTruth(Pipelineable):
    """What a simulator knows and a real log never shows, each of shape ``(B,)`` float32.

    Attributes:
        true_ctr: the true click probability of the impression.
        true_cvr: the true post-click conversion probability, P(conversion | do(click=1)),
            defined for unclicked impressions too.
        cf_conversion: a conversion label drawn from ``true_cvr`` for every impression (the
            counterfactual label of unclicked ones).
    """

    true_ctr: torch.Tensor
    true_cvr: torch.Tensor
    cf_conversion: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> GroundTruth:
        return GroundTruth(
            *(t.to(device=device, non_blocking=non_blocking) for t in self._tensors())
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in self._tensors():
            tensor.record_stream(stream)

    def pin_memory(self) -> GroundTruth:
        return GroundTruth(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class Batch(Pipelineable):
    """A batch of ``B`` impressions.

    Attributes:
        sparse: row ids of every sparse feature, keys in schema order (``schema.sparse_names``).
        dense: ``(B, num_dense)`` float32 of normalised dense features (``(B, 0)`` if none).
        click: ``(B,)`` float32 click labels o in {0, 1}.
        conversion: ``(B,)`` float32 conversion labels r in {0, 1}; r = 0 wherever o = 0, so
            this is the CTCVR label over the whole space and the CVR label on clicked rows.
        group: ``(B,)`` int64 group ids for GAUC (the schema's group column), or None.
        truth: ground truth of simulated data, or None.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    click: torch.Tensor
    conversion: torch.Tensor
    group: torch.Tensor | None = None
    truth: GroundTruth | None = None

    @property
    def size(self) -> int:
        return int(self.click.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device=device, non_blocking=non_blocking)
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=move(self.dense),
            click=move(self.click),
            conversion=move(self.conversion),
            group=move(self.group),
            truth=move(self.truth),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        for tensor in (self.dense, self.click, self.conversion, self.group, self.truth):
            if tensor is not None:
                tensor.record_stream(stream)

    def pin_memory(self) -> Batch:
        pin = lambda t: None if t is None else t.pin_memory()
        return replace(
            self,
            sparse=self.sparse.pin_memory(),
            dense=pin(self.dense),
            click=pin(self.click),
            conversion=pin(self.conversion),
            group=pin(self.group),
            truth=pin(self.truth),
        )
