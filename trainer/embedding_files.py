"""The embedding files of a model directory (format 2, ``schemas.artifact.EmbeddingLayout``),
written one table at a time, and the row-wise int8 and int4 quantisations.

``safetensors.torch.save_file`` (and the library's ``serialize_file``) take every tensor of a
file in memory at once. A file here holds all tables of one dim as one tensor, so it is written
the way the format is defined instead: the little-endian ``u64`` length of a JSON header that
gives the tensor's dtype, shape and byte range, the header (padded with spaces to a multiple of
8 bytes, as the library pads it), then the tensor's bytes, which are the tables' rows in order:
each table is loaded, written (quantised in blocks of rows) and released before the next one.
``safetensors.safe_open`` reads the result like any other file (tested).

Example::

    layout = embedding_layout(spec, Quantization.INT8)
    for file in layout.files:
        write_embedding_file(out / file.path, file, layout.quantization, load_table)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from schemas.artifact import TABLE_TENSOR, EmbeddingFile, Quantization

__all__ = [
    "INT4_LEVELS",
    "INT8_LEVELS",
    "quantize_int4_rows",
    "quantize_int8_rows",
    "write_embedding_file",
]

INT8_LEVELS = 255  # codes 0..255: the row's minimum is code 0, its maximum code 255
INT4_LEVELS = 15  # codes 0..15
_BLOCK_ROWS = 1 << 16  # rows quantised at a time: bounds the temporaries to a few MiB
_DTYPE = {Quantization.NONE: "F32", Quantization.INT8: "U8", Quantization.INT4: "U8"}


def quantize_int8_rows(weight: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Row-wise 8-bit quantisation of float32 rows.

    Each row ``w`` becomes codes ``q = round((w - min(w)) / scale)`` with
    ``scale = (max(w) - min(w)) / 255`` and ``offset = min(w)``, so that
    ``|scale * q + offset - w| <= scale / 2`` (plus float32 rounding); a constant row has scale 0
    and is exact.

    Args:
        weight: ``(N, D)`` float32 rows, finite.
        first_row: the number of the first row, for messages.

    Returns:
        ``(N, D + 8)`` uint8: the ``D`` codes, then ``scale`` and ``offset`` as float32 bytes.

    Raises:
        ValueError: a row whose range does not fit a float32 (beyond about 3.4e38).
    """
    rows, dim = weight.shape
    low, high = torch.aminmax(weight, dim=1)
    scale = (high - low) / INT8_LEVELS
    if not torch.isfinite(scale).all():
        bad = int((~torch.isfinite(scale)).nonzero()[0])
        raise ValueError(f"row {first_row + bad}: its range does not fit a float32 scale")
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    codes = (weight - low.unsqueeze(1)).div_(divisor).round_().clamp_(0, INT8_LEVELS)
    out = torch.empty(rows, dim + 8, dtype=torch.uint8)
    out[:, :dim] = codes.to(torch.uint8)
    out[:, dim:] = torch.stack([scale, low], dim=1).view(torch.uint8)  # little-endian float32s
    return out


def quantize_int4_rows(weight: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Row-wise 4-bit quantisation of float32 rows, in the layout of torch's
    ``quantized::embedding_bag_4bit_rowwise_offsets`` (FBGEMM's fused 4-bit rows).

    Each row ``w`` gets a float16 ``offset = fp16(min(w))`` and
    ``scale = fp16((max(w) - offset) / 15)``; its codes ``q = round((w - offset) / scale)``
    in 0..15 are computed against those float16 values, which the service reads, so
    ``|scale * q + offset - w| <= scale / 2 + |min(w)| * 2**-11`` (the second term: the float16
    rounding of the offset). A constant row has scale 0.

    Args:
        weight: ``(N, D)`` float32 rows, finite.
        first_row: the number of the first row, for messages.

    Returns:
        ``(N, ceil(D / 2) + 4)`` uint8: the codes two a byte (element ``2 i`` in the low nibble
        of byte ``i``; an odd ``D`` leaves the last high nibble 0), then ``scale`` and
        ``offset`` as float16 bytes.

    Raises:
        ValueError: a row whose values do not fit a float16 (beyond 65504).
    """
    rows, dim = weight.shape
    low, high = torch.aminmax(weight, dim=1)
    offset = low.to(torch.float16)
    scale = ((high - offset.float()) / INT4_LEVELS).to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        bad = int((~(torch.isfinite(scale) & torch.isfinite(offset))).nonzero()[0])
        raise ValueError(f"row {first_row + bad}: its values do not fit a float16 scale and offset")
    divisor = torch.where(scale > 0, scale.float(), torch.ones(rows)).unsqueeze(1)
    codes = (weight - offset.float().unsqueeze(1)).div_(divisor).round_().clamp_(0, INT4_LEVELS)
    codes = F.pad(codes.to(torch.uint8), (0, dim % 2))  # an even number of codes
    width = codes.shape[1] // 2
    out = torch.empty(rows, width + 4, dtype=torch.uint8)
    out[:, :width] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out[:, width:] = torch.stack([scale, offset], dim=1).view(torch.uint8)
    return out


def write_embedding_file(
    path: Path,
    file: EmbeddingFile,
    quantization: Quantization,
    load_table: Callable[[str], torch.Tensor],
) -> int:
    """Write one embedding file, reading its tables one at a time.

    Args:
        path: the file to create.
        file: its entry in the layout (dim, rows, tables and their row offsets).
        quantization: how rows are stored.
        load_table: returns a table's ``(num_rows, dim)`` float32 weights by name; called once
            per table, in order, and the table is released before the next call.

    Returns:
        The bytes written.

    Raises:
        ValueError: a table of another shape or dtype than the layout says, or one that
            cannot be quantised (the message names the table).
    """
    shape = file.tensor_shape(quantization)
    itemsize = 4 if quantization is Quantization.NONE else 1
    size = shape[0] * shape[1] * itemsize
    header = {
        TABLE_TENSOR: {
            "dtype": _DTYPE[quantization],
            "shape": list(shape),
            "data_offsets": [0, size],
        },
        "__metadata__": {"format": "pt"},
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for rows in file.tables:
            weight = load_table(rows.name)
            if tuple(weight.shape) != (rows.num_rows, file.dim) or weight.dtype != torch.float32:
                raise ValueError(
                    f"table {rows.name!r} is {weight.dtype} {tuple(weight.shape)}; the layout "
                    f"needs float32 {(rows.num_rows, file.dim)}"
                )
            written += _write_rows(out, weight.contiguous(), quantization, rows.name)
            del weight
    if written != size:  # the layout's row counts and the tables' disagree: never publish that
        raise ValueError(f"{path}: wrote {written} bytes of rows, the header says {size}")
    return 8 + len(encoded) + size


def _write_rows(out, weight: torch.Tensor, quantization: Quantization, name: str) -> int:
    if quantization is Quantization.NONE:
        return out.write(weight.numpy().data)
    quantize = quantize_int8_rows if quantization is Quantization.INT8 else quantize_int4_rows
    written = 0
    for start in range(0, weight.shape[0], _BLOCK_ROWS):
        try:
            block = quantize(weight[start : start + _BLOCK_ROWS], first_row=start)
        except ValueError as err:
            raise ValueError(
                f"table {name!r}: cannot quantise to {quantization.value}: {err}"
            ) from None
        written += out.write(block.numpy().data)
    return written
