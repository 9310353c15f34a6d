"""Embedding rows as the service reads them: float32 or row-wise int8, memory-mapped.

An embedding file of a format 2 model directory (``schemas.artifact.EmbeddingLayout``) holds the
tables of one dim as one tensor. :func:`open_embedding_file` maps it into memory with
``safetensors.safe_open`` (no copy: the tensor's storage is the file's pages, mapped
copy-on-write and never written), so every worker process of a service shares one copy of the
tables in the page cache, and the kernel reads in only the pages requests touch.

* :class:`FloatRows`: ``(rows, D)`` float32; lookups are ``F.embedding`` and ``F.embedding_bag``.
* :class:`Int8Rows`: ``(rows, D + 8)`` uint8, each row ``D`` codes then its float32 scale and
  offset; lookups run torch's built-in FBGEMM kernel for this layout
  (``quantized::embedding_bag_byte_rowwise_offsets``), which dequantises only the rows it reads,
  inside the gather, a single-valued feature being a bag of one row.
* :class:`Int4Rows`: ``(rows, ceil(D / 2) + 4)`` uint8, each row ``D`` 4-bit codes two a byte,
  then its float16 scale and offset; lookups run
  ``quantized::embedding_bag_4bit_rowwise_offsets`` the same way.

Example::

    rows = open_embedding_file(model_dir / file.path, file, Quantization.INT8)
    rows.lookup(ids)                             # (*ids.shape, D) float32
    rows.pool(values, offsets, Pooling.MEAN)     # (bags, D) float32
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from schemas.artifact import (
    INT4_ROW_EXTRA_BYTES,
    INT8_ROW_EXTRA_BYTES,
    TABLE_TENSOR,
    EmbeddingFile,
    Pooling,
    Quantization,
)

__all__ = ["EmbeddingRows", "FloatRows", "Int4Rows", "Int8Rows", "open_embedding_file"]

_CHECK_ROWS = 1 << 16  # rows checked for finiteness at a time (bounds the temporaries)


class EmbeddingRows(Protocol):
    """The rows of one embedding dim, whatever their storage."""

    dim: int
    num_rows: int

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``(*ids.shape, D)`` float32 rows of int64 ``ids``."""
        ...

    def pool(self, values: torch.Tensor, offsets: torch.Tensor, pooling: Pooling) -> torch.Tensor:
        """``(len(offsets), D)`` float32: bag ``i`` pools ``values[offsets[i]:offsets[i+1]]``
        (sum or mean; an empty bag gives zeros)."""
        ...


class FloatRows:
    """float32 rows.

    Args:
        weight: ``(rows, D)`` float32.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.num_rows, self.dim = weight.shape

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def pool(self, values: torch.Tensor, offsets: torch.Tensor, pooling: Pooling) -> torch.Tensor:
        # torch's mean mode costs more than a sum and a division (8 us against 4 for one bag)
        pooled = F.embedding_bag(values, self.weight, offsets, mode="sum")
        return _mean_of_sums(pooled, offsets, values.numel()) if pooling is Pooling.MEAN else pooled


class _RowwiseQuantized:
    """Row-wise quantised rows: ``scale * code + offset`` per row, the scale and offset after the
    row's codes; lookups run the layout's FBGEMM kernel, which dequantises only the rows it
    reads."""

    extra_bytes: int  # the scale and offset after each row's codes
    scale_dtype: torch.dtype
    kernel: Callable[..., torch.Tensor]  # FBGEMM's embedding bag of the layout (sum pooling)

    def __init__(self, rows: torch.Tensor, dim: int) -> None:
        self.rows = rows
        self.num_rows = rows.shape[0]
        self.dim = dim

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        one_per_bag = torch.arange(flat.numel(), dtype=torch.int64)
        return self._sum(flat, one_per_bag).view(*ids.shape, self.dim)

    def pool(self, values: torch.Tensor, offsets: torch.Tensor, pooling: Pooling) -> torch.Tensor:
        pooled = self._sum(values, offsets)  # the kernels only sum
        return _mean_of_sums(pooled, offsets, values.numel()) if pooling is Pooling.MEAN else pooled

    def _sum(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # (weight, indices, offsets, scale_grad_by_freq, mode=sum, pruned_weights,
        #  per_sample_weights, compressed_indices_mapping, include_last_offset)
        out = self.kernel(self.rows, values, offsets, False, 0, False, None, None, False)
        return out if out.shape[1] == self.dim else out[:, : self.dim]  # int4's padding code

    def scale_offset(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(rows, 2)`` float32 scale and offset of rows ``start:stop`` (a copy)."""
        stored = self.rows[start:stop, self.rows.shape[1] - self.extra_bytes :].contiguous()
        return stored.view(self.scale_dtype).to(torch.float32)

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(rows, D)`` uint8 codes of rows ``start:stop``."""
        return self.rows[start:stop, : self.dim]

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(rows, D)`` float32 values of rows ``start:stop`` (a copy)."""
        scale_offset = self.scale_offset(start, stop)
        codes = self.codes(start, stop).to(torch.float32)
        return torch.addcmul(scale_offset[:, 1:], codes, scale_offset[:, :1])


class Int8Rows(_RowwiseQuantized):
    """Row-wise 8-bit rows.

    Args:
        rows: ``(rows, D + 8)`` uint8: ``D`` codes, then the float32 scale and offset.
        dim: ``D``.
    """

    extra_bytes = INT8_ROW_EXTRA_BYTES
    scale_dtype = torch.float32
    kernel = torch.ops.quantized.embedding_bag_byte_rowwise_offsets


class Int4Rows(_RowwiseQuantized):
    """Row-wise 4-bit rows.

    Args:
        rows: ``(rows, ceil(D / 2) + 4)`` uint8: ``D`` codes two a byte (element ``2 i`` in the
            low nibble of byte ``i``; with an odd ``D`` the last high nibble is padding), then
            the float16 scale and offset.
        dim: ``D``.
    """

    extra_bytes = INT4_ROW_EXTRA_BYTES
    scale_dtype = torch.float16
    kernel = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        packed = self.rows[start:stop, : (self.dim + 1) // 2]
        return torch.stack([packed & 15, packed >> 4], dim=2).flatten(1)[:, : self.dim]


_QUANTIZED = {Quantization.INT8: Int8Rows, Quantization.INT4: Int4Rows}


def _mean_of_sums(sums: torch.Tensor, offsets: torch.Tensor, values: int) -> torch.Tensor:
    """Bags' sums divided in place by their sizes (an empty bag stays zero): of ``values``
    pooled ids, bag ``i`` starts at ``offsets[i]``. The sizes are worked out in numpy, whose
    calls on a few hundred offsets cost a fraction of torch's."""
    if len(offsets) == 1:  # one bag (a ranking request's context)
        return sums.div_(max(values, 1))
    starts = offsets.numpy()
    sizes = np.empty(len(starts), dtype=np.float32)
    np.subtract(starts[1:], starts[:-1], out=sizes[:-1])
    sizes[-1] = values - starts[-1]
    np.maximum(sizes, 1, out=sizes)
    return sums.div_(torch.from_numpy(sizes).unsqueeze(1))


def open_embedding_file(
    path: Path, file: EmbeddingFile, quantization: Quantization
) -> FloatRows | Int8Rows | Int4Rows:
    """Map one embedding file into memory and check it.

    Args:
        path: the file (its checksum already verified).
        file: its entry in the manifest's layout.
        quantization: the layout's.

    Raises:
        ValueError: not a safetensors file, another tensor, dtype or shape than the layout
            says, a float value (or an int8 row's scale or offset) that is NaN or infinite, a
            negative scale. The message names the file.
    """
    try:
        with safe_open(path, framework="pt") as handle:  # the tensor keeps its own mapping
            names = list(handle.keys())
            if names != [TABLE_TENSOR]:
                raise ValueError(f"{path}: expected one tensor {TABLE_TENSOR!r}, found {names}")
            tensor = handle.get_tensor(TABLE_TENSOR)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    dtype = torch.float32 if quantization is Quantization.NONE else torch.uint8
    shape = file.tensor_shape(quantization)
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ValueError(
            f"{path}: tensor {TABLE_TENSOR!r} is {tensor.dtype} {tuple(tensor.shape)}; the "
            f"manifest's layout ({quantization.value}) needs {dtype} {shape}"
        )
    quantized = _QUANTIZED.get(quantization)
    rows = FloatRows(tensor) if quantized is None else quantized(tensor, file.dim)
    _check_finite(path, rows)
    return rows


def _check_finite(path: Path, rows: FloatRows | Int8Rows | Int4Rows) -> None:
    """Every float of the file is finite (a quantised row's scale also >= 0), checked in blocks
    so that no temporary grows with the table."""
    for start in range(0, rows.num_rows, _CHECK_ROWS):
        stop = start + _CHECK_ROWS
        if isinstance(rows, _RowwiseQuantized):
            values = rows.scale_offset(start, stop)
            bad = ~torch.isfinite(values).all(dim=1) | (values[:, 0] < 0)
        else:
            bad = ~torch.isfinite(rows.weight[start:stop]).all(dim=1)
        if bad.any():
            row = start + int(bad.nonzero()[0])
            what = (
                "a NaN or inf scale or offset, or a negative scale"
                if isinstance(rows, _RowwiseQuantized)
                else "NaN or inf values"
            )
            raise ValueError(f"{path}: row {row} holds {what}")
