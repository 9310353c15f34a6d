"""Embedding rows as the service reads them: float32, row-wise int8 or int4, memory-mapped.

An embedding file of a format 2 model directory (``schemas.artifact.EmbeddingLayout``) holds the
tables of one dim as one tensor. :func:`open_embedding_file` maps it into memory with
``safetensors.safe_open`` (no copy: the tensor's storage is the file's pages, mapped
copy-on-write and never written), so every worker process of a service shares one copy of the
tables in the page cache, and the kernel reads in only the pages requests touch.

* :class:`FloatRows`: ``(rows, D)`` float32; lookups are ``F.embedding`` and ``F.embedding_bag``.
* :class:`Int8Rows`: ``(rows, D + 2)`` uint8, each row ``D`` codes, then the index of its scale
  among the file's 256 and its zero point; lookups run the service's own kernel
  (``serving/_int8_rows.c``), which dequantises only the rows it reads, inside the gather. Where
  it was not built (no C compiler at install), the same arithmetic runs as torch operations,
  slower (about 40-75 us more a 256-row request), and loading the model says so.
* :class:`Int8FloatScaleRows`: ``(rows, D + 8)`` uint8, each row ``D`` codes then its float32
  scale and offset (int8 models exported before the shared scales); lookups run torch's built-in
  FBGEMM kernel for this layout (``quantized::embedding_bag_byte_rowwise_offsets``), a
  single-valued feature being a bag of one row.
* :class:`Int4Rows`: ``(rows, ceil(D / 2) + 4)`` uint8, each row ``D`` 4-bit codes two a byte,
  then its float16 scale and offset; lookups run
  ``quantized::embedding_bag_4bit_rowwise_offsets`` the same way.

Example::

    rows = open_embedding_file(model_dir / file.path, file, Quantization.INT8)
    rows.lookup(ids)                             # (*ids.shape, D) float32
    rows.pool(values, offsets, Pooling.MEAN)     # (bags, D) float32
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from schemas.artifact import (
    INT4_ROW_EXTRA_BYTES,
    INT8_FLOAT_SCALE_ROW_EXTRA_BYTES,
    INT8_SCALES,
    SCALES_TENSOR,
    TABLE_TENSOR,
    EmbeddingFile,
    Int8Layout,
    Pooling,
    Quantization,
)

try:
    from serving import _int8_rows
except ImportError:  # built only where a C compiler was found at install (pyproject.toml)
    _int8_rows = None

__all__ = [
    "EmbeddingRows",
    "FloatRows",
    "Int4Rows",
    "Int8FloatScaleRows",
    "Int8Rows",
    "int8_kernel_built",
    "open_embedding_file",
]

logger = logging.getLogger(__name__)

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


class Int8FloatScaleRows(_RowwiseQuantized):
    """Row-wise 8-bit rows with a float32 scale and offset each (exports before the shared
    scales).

    Args:
        rows: ``(rows, D + 8)`` uint8: ``D`` codes, then the float32 scale and offset.
        dim: ``D``.
    """

    extra_bytes = INT8_FLOAT_SCALE_ROW_EXTRA_BYTES
    scale_dtype = torch.float32
    kernel = torch.ops.quantized.embedding_bag_byte_rowwise_offsets


def int8_kernel_built() -> bool:
    """Whether the C kernel of :class:`Int8Rows` was built (else torch operations stand in)."""
    return _int8_rows is not None


class Int8Rows:
    """Row-wise 8-bit rows sharing their file's 256 scales: element ``d`` of a row is
    ``scales[row[D]] * (row[d] - row[D + 1])``.

    Args:
        rows: ``(rows, D + 2)`` uint8: ``D`` codes, then the scale index and the zero point.
        scales: ``(256,)`` float32, finite and >= 0.
        dim: ``D``.
        use_kernel: the C kernel if it was built (False: torch operations, for comparisons).
    """

    def __init__(
        self, rows: torch.Tensor, scales: torch.Tensor, dim: int, use_kernel: bool = True
    ) -> None:
        self.rows, self.scales = rows, scales
        self.num_rows, self.dim = rows.shape[0], dim
        self._kernel = _int8_rows if use_kernel else None
        self._rows_np, self._scales_np = rows.numpy(), scales.numpy()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self._kernel is None:
            return self._dequantized(flat).view(*ids.shape, self.dim)
        out = np.empty((flat.numel(), self.dim), dtype=np.float32)
        self._kernel.gather(self._rows_np, self._scales_np, flat.numpy(), out, self.dim)
        return torch.from_numpy(out).view(*ids.shape, self.dim)

    def pool(self, values: torch.Tensor, offsets: torch.Tensor, pooling: Pooling) -> torch.Tensor:
        if self._kernel is None:
            pooled = self._pooled(values, offsets)
        else:
            out = np.empty((len(offsets), self.dim), dtype=np.float32)
            self._kernel.pool_sum(
                self._rows_np, self._scales_np, values.numpy(), offsets.numpy(), out, self.dim
            )
            pooled = torch.from_numpy(out)
        return _mean_of_sums(pooled, offsets, values.numel()) if pooling is Pooling.MEAN else pooled

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(rows, D)`` float32 values of rows ``start:stop`` (a copy)."""
        return self._decode(self.rows[start:stop])

    def _decode(self, rows: torch.Tensor) -> torch.Tensor:
        scale = self.scales[rows[:, self.dim].long()].unsqueeze(1)
        zero_point = rows[:, self.dim + 1 : self.dim + 2].to(torch.float32)
        return (rows[:, : self.dim].to(torch.float32) - zero_point).mul_(scale)

    def _dequantized(self, ids: torch.Tensor) -> torch.Tensor:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            bad = int(((ids < 0) | (ids >= self.num_rows)).nonzero()[0])
            raise IndexError(
                f"id {int(ids[bad])} at position {bad} is outside the table's {self.num_rows} rows"
            )
        return self._decode(self.rows.index_select(0, ids))

    def _pooled(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bags = torch.zeros(len(offsets), self.dim)
        sizes = torch.diff(offsets, append=torch.tensor([values.numel()]))
        bag_of_value = torch.repeat_interleave(torch.arange(len(offsets)), sizes)
        return bags.index_add_(0, bag_of_value, self._dequantized(values))


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
    path: Path,
    file: EmbeddingFile,
    quantization: Quantization,
    int8_layout: Int8Layout = Int8Layout.SCALE_INDEX,
) -> FloatRows | Int8Rows | Int8FloatScaleRows | Int4Rows:
    """Map one embedding file into memory and check it.

    Args:
        path: the file (its checksum already verified).
        file: its entry in the manifest's layout.
        quantization: the layout's.
        int8_layout: for int8, which of its row layouts (the manifest's ``int8_rows``).

    Raises:
        ValueError: not a safetensors file, other tensors, dtypes or shapes than the layout
            says, a float value (a quantised row's scale or offset, an int8 file's shared scale)
            that is NaN or infinite, a negative scale. The message names the file.
    """
    shared_scales = quantization is Quantization.INT8 and int8_layout is Int8Layout.SCALE_INDEX
    expected = sorted([TABLE_TENSOR, SCALES_TENSOR] if shared_scales else [TABLE_TENSOR])
    try:
        with safe_open(path, framework="pt") as handle:  # the tensors keep their own mapping
            names = sorted(handle.keys())
            if names != expected:
                raise ValueError(f"{path}: expected the tensors {expected}, found {names}")
            tensors = {name: handle.get_tensor(name) for name in names}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    dtype = torch.float32 if quantization is Quantization.NONE else torch.uint8
    shape = file.tensor_shape(quantization, int8_layout)
    tensor = tensors[TABLE_TENSOR]
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        layout = (
            f"{quantization.value}, {int8_layout.value}"
            if quantization is Quantization.INT8
            else quantization.value
        )
        raise ValueError(
            f"{path}: tensor {TABLE_TENSOR!r} is {tensor.dtype} {tuple(tensor.shape)}; the "
            f"manifest's layout ({layout}) needs {dtype} {shape}"
        )
    return _checked_rows(path, tensors, file.dim, quantization, shared_scales)


def _checked_rows(
    path: Path,
    tensors: dict[str, torch.Tensor],
    dim: int,
    quantization: Quantization,
    shared_scales: bool,
) -> FloatRows | Int8Rows | Int8FloatScaleRows | Int4Rows:
    """The rows of a file whose tensors have the layout's shapes, their floats checked."""
    tensor = tensors[TABLE_TENSOR]
    if shared_scales:  # every byte of such rows decodes to a finite value: the scales are checked
        if not int8_kernel_built():
            logger.warning(
                "%s: serving._int8_rows was not built (no C compiler at install): int8 lookups "
                "run as torch operations, slower; reinstall ctcvr with a C compiler to build it",
                path,
            )
        return Int8Rows(tensor, _checked_scales(path, tensors[SCALES_TENSOR]), dim)
    if quantization is Quantization.INT8:
        rows: FloatRows | Int8FloatScaleRows | Int4Rows = Int8FloatScaleRows(tensor, dim)
    elif quantization is Quantization.INT4:
        rows = Int4Rows(tensor, dim)
    else:
        rows = FloatRows(tensor)
    _check_finite(path, rows)
    return rows


def _checked_scales(path: Path, scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype != torch.float32 or tuple(scales.shape) != (INT8_SCALES,):
        raise ValueError(
            f"{path}: tensor {SCALES_TENSOR!r} is {scales.dtype} {tuple(scales.shape)}; int8 rows "
            f"need float32 ({INT8_SCALES},)"
        )
    bad = ~torch.isfinite(scales) | (scales < 0)
    if bad.any():
        raise ValueError(
            f"{path}: {SCALES_TENSOR}[{int(bad.nonzero()[0])}] is NaN, infinite or negative"
        )
    return scales


def _check_finite(path: Path, rows: FloatRows | Int8FloatScaleRows | Int4Rows) -> None:
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
