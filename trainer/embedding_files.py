"""The embedding files of a model directory (format 2, ``schemas.artifact.EmbeddingLayout``),
written one table at a time, and the row-wise int8 and int4 quantisations.

``safetensors.torch.save_file`` (and the library's ``serialize_file``) take every tensor of a
file in memory at once. A file here holds all tables of one dim as one tensor, so it is written
the way the format is defined instead: the little-endian ``u64`` length of a JSON header that
gives the tensor's dtype, shape and byte range, the header (padded with spaces to a multiple of
8 bytes, as the library pads it), then the tensor's bytes, which are the tables' rows in order:
each table is loaded, written (quantised in blocks of rows) and released before the next one.
An int8 file also holds the 256 ``scales`` its rows share, written before the rows: their range
comes from a first pass over the tables (each loaded twice, one at a time).
``safetensors.safe_open`` reads the result like any other file (tested).

Example::

    layout = embedding_layout(spec, Quantization.INT8)
    for file in layout.files:
        write_embedding_file(out / file.path, file, layout.quantization, load_table)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from schemas.artifact import INT8_SCALES, SCALES_TENSOR, TABLE_TENSOR, EmbeddingFile, Quantization

__all__ = [
    "INT4_LEVELS",
    "INT8_LEVELS",
    "INT8_SCALE_RANGE",
    "int8_scales",
    "int8_steps",
    "quantize_int4_rows",
    "quantize_int8_rows",
    "write_embedding_file",
]

INT8_LEVELS = 255  # codes 0..255
INT8_SCALE_RANGE = 2.0**16  # the largest of an int8 file's scales over its smallest non-zero one
INT4_LEVELS = 15  # codes 0..15
_BLOCK_ROWS = 1 << 16  # rows quantised at a time: bounds the temporaries to a few MiB
_DTYPE = {Quantization.NONE: "F32", Quantization.INT8: "U8", Quantization.INT4: "U8"}


def int8_steps(weight: torch.Tensor) -> torch.Tensor:
    """The smallest scale each row's int8 codes can have: ``(N,)`` float32.

    A row ``w`` is stored as ``scale * (q - z)`` with codes ``q`` and an integer zero point
    ``z``, both in 0..255, so its values must lie on the grid ``scale * (-z .. 255 - z)``: a
    row whose values straddle 0 needs ``(max(w) - min(w)) / 254`` (one level given up to round
    ``z``), a row of one sign ``max(|w|) / 255`` (the grid reaches 0). 0 for a row of zeros.
    """
    low, high = torch.aminmax(weight, dim=1)
    span = (high - low) / (INT8_LEVELS - 1)
    return torch.maximum(span, torch.maximum(high, -low) / INT8_LEVELS)


def int8_scales(smallest: float, largest: float) -> torch.Tensor:
    """The 256 scales an int8 file's rows share, ascending: 0 (for rows of zeros), then 255
    geometric steps from ``max(smallest, largest / INT8_SCALE_RANGE)`` to ``largest``.

    A row takes the first scale at or above its :func:`int8_steps`, so its step grows by at most
    the ratio of two neighbours (``(largest / smallest) ** (1 / 254)``, at most 4.5 %).

    Args:
        smallest: the smallest non-zero step of the file's rows (``inf`` if none).
        largest: the largest step (0 if every row is zeros).
    """
    if largest <= 0:
        return torch.zeros(INT8_SCALES, dtype=torch.float32)
    lowest = max(min(smallest, largest), largest / INT8_SCALE_RANGE)
    steps = torch.logspace(
        math.log10(lowest), math.log10(largest), INT8_SCALES - 1, dtype=torch.float64
    )
    scales = torch.cat([torch.zeros(1, dtype=torch.float64), steps]).to(torch.float32)
    scales[-1] = torch.nextafter(torch.tensor(largest), torch.tensor(math.inf))  # >= in float32
    return scales


def quantize_int8_rows(
    weight: torch.Tensor, scales: torch.Tensor, first_row: int = 0
) -> torch.Tensor:
    """Row-wise 8-bit quantisation of float32 rows against a file's shared scales.

    Each row ``w`` takes scale ``s = scales[e]``, the first at or above its
    :func:`int8_steps`, zero point ``z = ceil(-min(w) / s)`` and codes
    ``q = round(w / s + z)``, so that ``|s * (q - z) - w| <= s / 2`` (plus float32 rounding); a
    row of zeros takes ``e = 0`` and is exact.

    Args:
        weight: ``(N, D)`` float32 rows, finite.
        scales: the file's ``(256,)`` float32 scales (:func:`int8_scales`).
        first_row: the number of the first row, for messages.

    Returns:
        ``(N, D + 2)`` uint8: the ``D`` codes, then ``e`` and ``z``.

    Raises:
        ValueError: a row whose step is beyond the largest scale (scales made for other rows).
    """
    rows, dim = weight.shape
    needed = int8_steps(weight)
    if not torch.isfinite(needed).all():
        bad = int((~torch.isfinite(needed)).nonzero()[0])
        raise ValueError(f"row {first_row + bad}: its range does not fit a float32 scale")
    index = torch.searchsorted(scales, needed)
    if (index >= INT8_SCALES).any():
        bad = int((index >= INT8_SCALES).nonzero()[0])
        raise ValueError(
            f"row {first_row + bad}: needs a scale of {float(needed[bad]):.3g}, beyond the "
            f"file's largest ({float(scales[-1]):.3g})"
        )
    scale = scales[index]
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    zero_point = (-weight.amin(dim=1, keepdim=True) / divisor).ceil_().clamp_(0, INT8_LEVELS)
    codes = (weight / divisor).add_(zero_point).round_().clamp_(0, INT8_LEVELS)
    out = torch.empty(rows, dim + 2, dtype=torch.uint8)
    out[:, :dim] = codes.to(torch.uint8)
    out[:, dim] = index.to(torch.uint8)
    out[:, dim + 1] = zero_point.squeeze(1).to(torch.uint8)
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
    scales = _file_int8_scales(file, load_table) if quantization is Quantization.INT8 else None
    header: dict = {"__metadata__": {"format": "pt"}}
    start = 0
    if scales is not None:  # first: 1 KiB, so the rows need no alignment
        start = scales.numel() * 4
        header[SCALES_TENSOR] = {
            "dtype": "F32",
            "shape": [scales.numel()],
            "data_offsets": [0, start],
        }
    header[TABLE_TENSOR] = {
        "dtype": _DTYPE[quantization],
        "shape": list(shape),
        "data_offsets": [start, start + size],
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    written = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        if scales is not None:
            out.write(scales.numpy().data)
        for rows in file.tables:
            weight = _load_checked(load_table, rows.name, (rows.num_rows, file.dim))
            written += _write_rows(out, weight, quantization, rows.name, scales)
            del weight
    if written != size:  # the layout's row counts and the tables' disagree: never publish that
        raise ValueError(f"{path}: wrote {written} bytes of rows, the header says {size}")
    return 8 + len(encoded) + start + size


def _load_checked(
    load_table: Callable[[str], torch.Tensor], name: str, shape: tuple[int, int]
) -> torch.Tensor:
    weight = load_table(name)
    if tuple(weight.shape) != shape or weight.dtype != torch.float32:
        raise ValueError(
            f"table {name!r} is {weight.dtype} {tuple(weight.shape)}; the layout needs float32 "
            f"{shape}"
        )
    return weight.contiguous()


def _file_int8_scales(
    file: EmbeddingFile, load_table: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """The scales of an int8 file, from the range of its rows' steps (one table at a time)."""
    smallest, largest = math.inf, 0.0
    for rows in file.tables:
        weight = _load_checked(load_table, rows.name, (rows.num_rows, file.dim))
        for start in range(0, weight.shape[0], _BLOCK_ROWS):
            steps = int8_steps(weight[start : start + _BLOCK_ROWS])
            if not torch.isfinite(steps).all():
                bad = start + int((~torch.isfinite(steps)).nonzero()[0])
                raise ValueError(
                    f"table {rows.name!r}: cannot quantise to int8: row {bad}: its range does not "
                    "fit a float32 scale"
                )
            largest = max(largest, float(steps.max()))
            if (steps > 0).any():
                smallest = min(smallest, float(steps[steps > 0].min()))
        del weight
    return int8_scales(smallest, largest)


def _write_rows(
    out, weight: torch.Tensor, quantization: Quantization, name: str, scales: torch.Tensor | None
) -> int:
    if quantization is Quantization.NONE:
        return out.write(weight.numpy().data)
    written = 0
    for start in range(0, weight.shape[0], _BLOCK_ROWS):
        block = weight[start : start + _BLOCK_ROWS]
        try:
            if scales is not None:
                packed = quantize_int8_rows(block, scales, first_row=start)
            else:
                packed = quantize_int4_rows(block, first_row=start)
        except ValueError as err:
            raise ValueError(
                f"table {name!r}: cannot quantise to {quantization.value}: {err}"
            ) from None
        written += out.write(packed.numpy().data)
    return written
