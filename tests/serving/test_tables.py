"""Embedding rows in the service: memory-mapped from the model directory (format 2), row-wise
int8 read by the service's own kernel (and its torch fallback), int4 and the older int8 layout
by torch's kernels, format 1 directories still served, and bad files refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from schemas.artifact import (
    MANIFEST_FILE,
    SCALES_TENSOR,
    TABLE_TENSOR,
    EmbeddingFile,
    Pooling,
    Quantization,
    TableRows,
    table_file,
)
from serving.artifact import ArtifactError, load_artifact
from serving.tables import FloatRows, Int4Rows, Int8FloatScaleRows, Int8Rows, int8_kernel_built
from trainer.embedding_files import (
    int8_scales,
    int8_steps,
    quantize_int4_rows,
    quantize_int8_rows,
    write_embedding_file,
)
from trainer.export import export_run

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def int8_model(edge_model, tmp_path_factory) -> Path:
    """The edge model's run exported with int8 tables."""
    out = tmp_path_factory.mktemp("int8") / "model"
    export_run(edge_model.run, out, quantize="int8", log=None)
    return out


@pytest.fixture(scope="module")
def int4_model(edge_model, tmp_path_factory) -> Path:
    """The edge model's run exported with int4 tables."""
    out = tmp_path_factory.mktemp("int4") / "model"
    export_run(edge_model.run, out, quantize="int4", log=None)
    return out


@pytest.fixture(params=["int8", "int4"])
def quantized_model(request) -> tuple[Quantization, Path]:
    return Quantization(request.param), request.getfixturevalue(f"{request.param}_model")


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


@pytest.mark.parametrize("quantized", [None, "int8", "int4"], ids=["float32", "int8", "int4"])
def test_the_served_rows_are_the_files_pages_not_a_copy(request, edge_model, quantized):
    model_dir = request.getfixturevalue(f"{quantized}_model") if quantized else edge_model.model
    artifact = load_artifact(model_dir)
    maps = _mapped_files()
    for file in artifact.manifest.embeddings.files:
        rows = artifact.model._rows[file.dim]
        tensor = rows.rows if quantized else rows.weight
        pointer = tensor.data_ptr()
        path = str((model_dir / file.path).resolve())
        assert any(s <= pointer < e and p == path for s, e, p in maps), (file.path, pointer)


def _int8_quantized(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes minus zero point, scale and needed step of ``quantize_int8_rows(weight)`` against
    scales made for these rows, read back from the bytes."""
    needed = int8_steps(weight)
    scales = int8_scales(float(needed[needed > 0].min()), float(needed.max()))
    rows = quantize_int8_rows(weight, scales)
    dim = weight.shape[1]
    codes = rows[:, :dim].to(torch.float32) - rows[:, dim + 1 :].to(torch.float32)
    return codes, scales[rows[:, dim].long()], needed


def _int8_bound(scale: torch.Tensor) -> torch.Tensor:
    """Per row: half a step, plus the float32 rounding of ``scale * (q - z)`` (one product of
    an exact integer up to 255)."""
    return scale / 2 + EPS32 * 255 * scale


def test_int8_steps_are_worked_out_by_hand():
    """A row straddling 0 needs its range over 254 levels (one given up to the zero point's
    rounding); a row of one sign its largest magnitude over 255 (the grid reaches 0)."""
    weight = torch.tensor([[-1.0, 1.54], [2.0, 3.0], [-3.0, -2.0], [0.0, 0.0], [-0.5, 0.5]])
    torch.testing.assert_close(
        int8_steps(weight), torch.tensor([2.54 / 254, 3 / 255, 3 / 255, 0.0, 1 / 254])
    )


def test_int8_scales_are_a_geometric_grid_from_the_smallest_step_to_the_largest():
    scales = int8_scales(1.0, 256.0)
    assert scales.dtype == torch.float32 and scales.shape == (256,)
    assert scales[0] == 0 and scales[1] == 1 and scales[-1] >= 256
    torch.testing.assert_close(scales[128], torch.tensor(16.0))  # 2 ** (8 * 127 / 254)
    ratios = scales[2:] / scales[1:-1]
    torch.testing.assert_close(ratios, torch.full((254,), 2 ** (8 / 254)))
    # far smaller steps are floored at 2**-16 of the largest: the grid's ratio stays <= 4.5 %
    assert int8_scales(1e-12, 1.0)[1] == 2.0**-16
    assert torch.equal(int8_scales(float("inf"), 0.0), torch.zeros(256))  # every row zeros


def test_int8_rows_are_within_half_a_step_and_their_step_near_the_smallest_possible():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 16, generator=generator) * torch.logspace(-3, 1, 500)[:, None]
    weight[0] = 0.0  # a row of zeros: scale 0, exact
    weight[1] = 0.25  # a constant row of one sign
    weight[2] = torch.rand(16, generator=generator) + 1  # positive: the grid reaches 0
    weight[3] = -weight[2]
    codes, scale, needed = _int8_quantized(weight)
    values = scale.unsqueeze(1) * codes
    error = (values - weight).abs().max(dim=1).values
    assert (error <= _int8_bound(scale)).all()
    assert error[0] == 0 and scale[0] == 0
    assert (scale >= needed).all()
    growth = scale[1:] / needed[1:]  # the grid spans these rows' 1e4 range: 3.7 % a step
    assert growth.max() <= (needed.max() / needed[1:].min()) ** (1 / 254) * (1 + 1e-6)
    assert (codes >= -255).all() and (codes <= 255).all()
    # the bound is tight: some element of the random rows is off by nearly half a step
    assert (error[4:] / (scale[4:] / 2)).max() > 0.9


def test_int8_rows_refuse_a_range_beyond_float32_or_their_scales():
    scales = int8_scales(0.001, 1.0)
    with pytest.raises(ValueError, match="row 1: its range does not fit a float32 scale"):
        quantize_int8_rows(torch.tensor([[0.0, 1.0], [-3e38, 3e38]]), scales)
    with pytest.raises(
        ValueError, match=r"row 7: needs a scale of 7.87, beyond the file's largest"
    ):
        quantize_int8_rows(torch.tensor([[0.0, 1.0]] * 7 + [[-1000.0, 1000.0]]), scales)


def _int4_quantized(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and offset of ``quantize_int4_rows(weight)``, unpacked from the bytes."""
    rows = quantize_int4_rows(weight)
    half = weight.shape[1] // 2
    low_nibbles, high_nibbles = rows[:, :half] % 16, rows[:, :half] // 16
    codes = torch.empty(weight.shape, dtype=torch.float32)
    codes[:, 0::2], codes[:, 1::2] = low_nibbles, high_nibbles  # element 2 i low, 2 i + 1 high
    scale_offset = rows[:, half:].contiguous().view(torch.float16).to(torch.float32)
    return codes, scale_offset[:, 0], scale_offset[:, 1]


def _int4_dequantization_bound(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per row: half a step, the float16 rounding of the row's minimum into ``offset`` (2**-11
    of it, bounded here through ``offset`` itself), and the float32 rounding of
    ``scale * q + offset`` (values up to ``|offset| + 15 * scale``)."""
    return scale / 2 + offset.abs() * 2**-10 + 2 * EPS32 * (offset.abs() + 15 * scale)


def test_int4_rows_are_within_half_a_step_of_the_float_rows():
    decode, bound, levels = _int4_quantized, _int4_dequantization_bound, 15
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 16, generator=generator) * torch.logspace(-3, 3, 500)[:, None]
    weight[0] = 0.25  # a constant row (also a float16 value): scale 0, exact
    weight[1] = torch.linspace(-1, 1, 16)  # the extremes are the lowest and highest codes
    codes, scale, offset = decode(weight)
    values = scale.unsqueeze(1) * codes + offset.unsqueeze(1)
    error = (values - weight).abs().max(dim=1).values
    assert (error <= bound(scale, offset)).all()
    assert error[0] == 0 and scale[0] == 0
    assert (codes[1, [0, -1]] == torch.tensor([0.0, levels])).all()
    assert (codes >= 0).all() and (codes <= levels).all()
    # the bound is tight: some element of the random rows is off by nearly half a step
    assert (error[2:] / (scale[2:] / 2)).max() > 0.9


def test_int4_rows_of_an_odd_dim_pad_their_last_byte():
    weight = torch.tensor([[0.0, 1.0, 15.0], [2.0, 2.0, 2.0]])
    rows = quantize_int4_rows(weight)
    assert rows.shape == (2, 2 + 4)
    assert rows[0, :2].tolist() == [0 | 1 << 4, 15]  # codes 0, 1, 15 and a 0 of padding
    torch.testing.assert_close(Int4Rows(rows, 3).dequantize(), weight, rtol=0, atol=0)


def test_int4_rows_refuse_values_beyond_float16():
    with pytest.raises(ValueError, match="row 1: its values do not fit a float16"):
        quantize_int4_rows(torch.tensor([[0.0, 1.0], [-7e4, 1.0]]), first_row=0)


@pytest.mark.parametrize(("quantize", "dim"), [(quantize_int4_rows, 6), (quantize_int4_rows, 5)])
def test_the_int4_kernel_reads_the_stored_layout(quantize, dim):
    """Lookups (torch's FBGEMM kernel) equal the stored rows dequantised by hand."""
    generator = torch.Generator().manual_seed(1)
    rows = Int4Rows(quantize(torch.randn(50, dim, generator=generator)), dim)
    _assert_reads_as(rows, rows.dequantize(), generator)


def _assert_reads_as(rows, values: torch.Tensor, generator: torch.Generator) -> None:
    ids = torch.randint(0, len(values), (7, 3), generator=generator)
    torch.testing.assert_close(rows.lookup(ids), F.embedding(ids, values), rtol=0, atol=1e-6)
    _assert_pools_as_embedding_bag(rows, values)


def _int8_rows_by_hand(rows: np.ndarray, scales: np.ndarray, dim: int) -> torch.Tensor:
    """``scales[e] * (q - z)`` of every row, in float64 numpy, independent of serving.tables."""
    scale = scales.astype(np.float64)[rows[:, dim]]
    values = scale[:, None] * (rows[:, :dim].astype(np.float64) - rows[:, dim + 1 : dim + 2])
    return torch.from_numpy(values.astype(np.float32))


@pytest.mark.parametrize("use_kernel", [True, False], ids=["C kernel", "torch fallback"])
def test_int8_lookups_read_the_stored_layout(use_kernel):
    """Lookups and pools of int8 rows, by the C kernel and by its torch fallback alike, equal
    the stored bytes decoded by hand, whatever the bytes (every index and zero point)."""
    if use_kernel:
        assert int8_kernel_built(), "serving._int8_rows was not built: is a C compiler missing?"
    generator = torch.Generator().manual_seed(1)
    dim = 6
    packed = torch.randint(0, 256, (50, dim + 2), dtype=torch.uint8, generator=generator)
    scales = torch.cat([torch.zeros(1), torch.logspace(-4, 1, 255)])
    rows = Int8Rows(packed, scales, dim, use_kernel=use_kernel)
    values = _int8_rows_by_hand(packed.numpy(), scales.numpy(), dim)
    torch.testing.assert_close(rows.dequantize(), values, rtol=1e-6, atol=0)
    _assert_reads_as(rows, values, generator)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["C kernel", "torch fallback"])
def test_int8_lookups_refuse_ids_outside_the_table(use_kernel):
    rows = Int8Rows(torch.zeros(5, 4, dtype=torch.uint8), torch.zeros(256), 2, use_kernel)
    for ids in ([0, 5], [-1, 0]):
        position = ids.index(5 if 5 in ids else -1)
        message = rf"id {ids[position]} at position {position} is outside the table's 5 rows"
        with pytest.raises(IndexError, match=message):
            rows.lookup(torch.tensor(ids))
        with pytest.raises(IndexError, match=message):
            rows.pool(torch.tensor(ids), torch.tensor([0]), Pooling.SUM)


def test_without_the_int8_kernel_the_service_says_so_and_scores_the_same(
    edge_model, int8_model, monkeypatch, caplog
):
    """An install without a C compiler has no ``serving._int8_rows``: loading an int8 model
    warns, naming the file and the remedy, and the torch fallback scores as the kernel does."""
    with_kernel = load_artifact(int8_model)
    monkeypatch.setattr("serving.tables._int8_rows", None)
    with caplog.at_level("WARNING", logger="serving.tables"):
        without = load_artifact(int8_model)
    assert "dim4.safetensors: serving._int8_rows was not built" in caplog.text
    assert "reinstall ctcvr with a C compiler" in caplog.text
    features = with_kernel.featurizer(edge_model.rows)
    np.testing.assert_allclose(
        without.model.predict(features), with_kernel.model.predict(features), atol=1e-6, rtol=0
    )


def test_the_int8_kernel_checks_its_buffers():
    """The C kernel's own checks (the service never reaches them: its callers pass consistent
    arrays), so that no misuse reads or writes past a buffer."""
    from serving import _int8_rows

    rows, scales = np.zeros((5, 4), np.uint8), np.zeros(256, np.float32)
    ids, out = np.array([0, 1], np.int64), np.empty((2, 2), np.float32)
    with pytest.raises(ValueError, match="out: expected 2 x 2 float32 .16 bytes., got 12 bytes"):
        _int8_rows.gather(rows, scales, ids, np.empty(3, np.float32), 2)
    with pytest.raises(ValueError, match="scales: expected 256 float32"):
        _int8_rows.gather(rows, scales[:255], ids, out, 2)
    with pytest.raises(ValueError, match="rows: 20 bytes is not a whole number of 3-byte rows"):
        _int8_rows.gather(rows, scales, ids, out, 1)
    with pytest.raises(ValueError, match=r"offsets: bag 1 spans 2:1 of 2 ids"):
        _int8_rows.pool_sum(rows, scales, ids, np.array([0, 2, 1]), np.empty((3, 2), np.float32), 2)
    with pytest.raises(TypeError, match="ids: expected int64 items, got format 'i' of 4 bytes"):
        _int8_rows.gather(rows, scales, ids.astype(np.int32), out, 2)
    with pytest.raises(TypeError, match="out: expected a writable C-contiguous float32 array"):
        _int8_rows.gather(rows, scales, ids, out.T, 2)
    with pytest.raises(TypeError, match="scales: expected float32 items, got format 'd'"):
        _int8_rows.gather(rows, scales.astype(np.float64), ids, out, 2)
    with pytest.raises(ValueError, match=r"offsets: bag 0 spans 1:2"):
        _int8_rows.pool_sum(rows, scales, ids, np.array([1]), np.empty((1, 2), np.float32), 2)


def test_int8_rows_of_the_float_scale_layout_read_as_torchs_own_packing():
    """int8 models exported before the shared scales (``D + 8`` rows, FBGEMM's layout) are read
    by torch's kernel: here rows packed by torch itself, decoded by torch itself."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(50, 6, generator=generator)
    packed = torch.ops.quantized.embedding_bag_byte_prepack(weight)
    rows = Int8FloatScaleRows(packed, 6)
    values = torch.ops.quantized.embedding_bag_byte_unpack(packed)
    torch.testing.assert_close(rows.dequantize(), values, rtol=0, atol=1e-6)
    _assert_reads_as(rows, values, generator)


def test_float_rows_pool_as_torchs_embedding_bag():
    """Sum and mean pooling (a sum divided by the bag's size) equal ``F.embedding_bag``'s modes;
    an empty bag pools to zeros."""
    weight = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    _assert_pools_as_embedding_bag(FloatRows(weight), weight)


def _assert_pools_as_embedding_bag(rows, weight: torch.Tensor) -> None:
    """``rows`` pool bags of ids as ``F.embedding_bag`` over ``weight`` does, in both modes."""
    cases = [
        ([4, 9, 9, 0, 49, 3], [0, 2, 2, 6]),  # bags of 2, 0, 4 and 0 values
        ([4, 9, 9], [0]),  # one bag (a ranking request's context)
        ([], [0]),  # one empty bag
        ([7], [0, 0, 1]),  # empty bags first
        ([7, 3, 5], [0, 1]),  # the last bag the largest
    ]
    for bags, offsets in cases:
        ids, starts = torch.tensor(bags, dtype=torch.int64), torch.tensor(offsets)
        for pooling in Pooling:
            torch.testing.assert_close(
                rows.pool(ids, starts, pooling),
                F.embedding_bag(ids, weight, starts, mode=pooling.value),
                rtol=0,
                atol=1e-6,
                msg=lambda m, b=bags, o=offsets, p=pooling: f"{p.value} of {b} at {o}: {m}",
            )


def test_an_embedding_file_is_written_one_table_at_a_time(tmp_path):
    """Each table is released before the next one is loaded, and the file reads back with
    safetensors' own reader as the tables one after the other."""
    tables = {"a": torch.randn(3, 4), "b": torch.randn(5, 4), "c": torch.randn(2, 4)}
    file = EmbeddingFile(
        path="x.safetensors",
        dim=4,
        num_rows=10,
        tables=(
            TableRows(name="a", row_offset=0, num_rows=3),
            TableRows(name="b", row_offset=3, num_rows=5),
            TableRows(name="c", row_offset=8, num_rows=2),
        ),
    )
    alive: list[weakref.ref] = []

    def load(name: str) -> torch.Tensor:
        assert all(ref() is None for ref in alive), "a previous table is still held"
        table = tables[name].clone()
        alive.append(weakref.ref(table))
        return table

    for quantization in Quantization:
        alive.clear()
        path = tmp_path / f"{quantization.value}.safetensors"
        size = write_embedding_file(path, file, quantization, load)
        passes = 2 if quantization is Quantization.INT8 else 1
        assert size == path.stat().st_size and len(alive) == 3 * passes
        alive[3:] = []
        (header_size,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert header_size % 8 == 0  # the rows start 8-byte aligned
        tensors = load_file(path)
        stored = tensors[TABLE_TENSOR]
        expected = torch.cat(list(tables.values()))
        if quantization is Quantization.INT8:  # the first pass found the rows' range of steps
            assert set(tensors) == {TABLE_TENSOR, SCALES_TENSOR} and len(alive) == 3
            needed = int8_steps(expected)
            scales = int8_scales(float(needed[needed > 0].min()), float(needed.max()))
            assert torch.equal(tensors[SCALES_TENSOR], scales)
            assert stored.dtype == torch.uint8 and stored.shape == (10, 6)
            assert torch.equal(stored, quantize_int8_rows(expected, scales))
        elif quantization is Quantization.INT4:
            assert stored.dtype == torch.uint8 and stored.shape == (10, 6)
            assert torch.equal(stored, quantize_int4_rows(expected))
        else:
            assert torch.equal(stored, expected)


def test_an_int8_file_names_the_table_and_row_it_cannot_quantise(tmp_path):
    """The first pass over the tables (the range of the shared scales) names what overflows,
    before the file is created."""
    file = EmbeddingFile(
        path="x", dim=2, num_rows=3, tables=(TableRows(name="a", row_offset=0, num_rows=3),)
    )
    table = torch.tensor([[0.0, 1.0], [-3e38, 3e38], [0.0, 0.0]])
    with pytest.raises(
        ValueError, match=r"table 'a': cannot quantise to int8: row 1: its range does not fit"
    ):
        write_embedding_file(tmp_path / "x", file, Quantization.INT8, lambda _: table)
    assert not (tmp_path / "x").exists()


def test_a_table_of_another_shape_is_refused_while_writing(tmp_path):
    file = EmbeddingFile(
        path="x", dim=4, num_rows=3, tables=(TableRows(name="a", row_offset=0, num_rows=3),)
    )
    with pytest.raises(ValueError, match=r"table 'a' is torch.float32 \(2, 4\); the layout needs"):
        write_embedding_file(tmp_path / "x", file, Quantization.NONE, lambda _: torch.zeros(2, 4))


def _float_model_input_bounds(model, features, scale_rows) -> torch.Tensor:
    """Per row and MMoE input column, how far the int8 model's input can be from the float
    model's: each looked-up row's half step (plus float32 rounding), pooled as the model pools
    (a sum of bounds for sum, their mean for mean), and 0 for the dense columns. Computed by the
    model itself, with every table replaced by its rows' bounds."""
    saved = dict(model._rows)
    try:
        for dim, bound in scale_rows.items():
            model._rows[dim] = FloatRows(bound)
        single, values, offsets, dense = model.arguments(features)
        return model.inputs(single, values, offsets, torch.zeros_like(dense))
    finally:
        model._rows.clear()
        model._rows.update(saved)


def _score_bounds(model, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Interval bounds ``(B, 3, 2)`` of the model's scores for every input within ``radius`` of
    ``x`` (interval arithmetic through the MMoE, the gates' softmax, the towers and the
    sigmoids; in float64)."""
    assert model.cvr_transfer is None and model._interaction is None
    spec = model.spec
    x, radius = x.double(), radius.double()

    def linear(low, high, weight, bias):  # weight (out, in)
        center, half = (low + high) / 2, (high - low) / 2
        y = center @ weight.double().T + bias.double()
        spread = half @ weight.double().abs().T
        return y - spread, y + spread

    low, high = linear(x - radius, x + radius, model.first_weight, model.first_bias)
    experts, width = spec.num_experts, spec.expert_sizes[0]
    hidden = [t[:, : experts * width].relu().view(-1, experts, width) for t in (low, high)]
    for weight, bias in model.expert_layers:  # (E, in, out), (E, 1, out)
        layers = [
            linear(hidden[0][:, e], hidden[1][:, e], weight[e].T, bias[e, 0])
            for e in range(experts)
        ]
        hidden = [torch.stack([layer[i] for layer in layers], dim=1).relu() for i in (0, 1)]
    gate_low, gate_high = (
        t[:, experts * width :].view(x.shape[0], -1, experts) for t in (low, high)
    )
    total_high = gate_high.exp().sum(-1, keepdim=True)
    total_low = gate_low.exp().sum(-1, keepdim=True)
    share_low = gate_low.exp() / (gate_low.exp() + total_high - gate_high.exp())
    share_high = gate_high.exp() / (gate_high.exp() + total_low - gate_low.exp())
    # mixtures (B, heads, H); gates and (ReLU'd) expert outputs are both >= 0
    mix = [
        torch.einsum("bge,beh->bgh", s, h)
        for s, h in ((share_low, hidden[0]), (share_high, hidden[1]))
    ]
    for layer, (weight, bias) in enumerate(model.tower_layers):
        heads = [linear(mix[0][:, g], mix[1][:, g], weight[g].T, bias[g, 0]) for g in range(2)]
        mix = [torch.stack([head[i] for head in heads], dim=1) for i in (0, 1)]
        if layer < len(model.tower_layers) - 1:  # hidden layers end in a ReLU, the logit not
            mix = [m.relu() for m in mix]
    low, high = (torch.sigmoid(m[..., 0]) for m in mix)  # (B, 2): pctr, pcvr
    return torch.stack(
        [
            torch.stack([low[:, 0], low[:, 1], low[:, 0] * low[:, 1]], dim=1),
            torch.stack([high[:, 0], high[:, 1], high[:, 0] * high[:, 1]], dim=1),
        ],
        dim=-1,
    )


def _row_bounds(rows) -> torch.Tensor:
    """Per stored row, how far its values can be from the float weights'."""
    if isinstance(rows, Int8Rows):
        return _int8_bound(rows.scales[rows.rows[:, rows.dim].long()])
    scale, offset = rows.scale_offset().unbind(1)
    if isinstance(rows, Int8FloatScaleRows):
        return scale / 2 + 2 * EPS32 * (offset.abs() + 255 * scale)
    return _int4_dequantization_bound(scale, offset)


def test_quantised_scores_stay_within_the_bounds_the_quantisation_step_allows(
    edge_model, quantized_model
):
    """Parity with the float model at a tolerance derived from the quantisation step: every
    embedding value is within half its row's step of the float one, so the MMoE input is within
    the pooled bounds, and interval arithmetic through the model gives each score's range. The
    range is rigorous but loose (interval arithmetic widens it layer by layer); the sharp check
    of the quantisation itself is the half-step test of the rows above."""
    quantization, model_dir = quantized_model
    float_artifact, quantized_artifact = load_artifact(edge_model.model), load_artifact(model_dir)
    features = float_artifact.featurizer(edge_model.rows)
    float_scores = float_artifact.model.predict(features)
    quantized_scores = quantized_artifact.model.predict(features)
    model = quantized_artifact.model
    bounds = {}
    for dim, rows in model._rows.items():
        bounds[dim] = _row_bounds(rows).unsqueeze(1).expand(-1, dim).contiguous()
    with torch.inference_mode():
        x = model.inputs(*model.arguments(features))
        radius = _float_model_input_bounds(model, features, bounds)
        # float32 rounding of the pooled sums themselves
        radius += 4 * EPS32 * x.abs()
        interval = _score_bounds(model, x, radius).numpy()
    rounding = 1e-5  # two float32 computations of the same scores (the parity tests' tolerance)
    assert (float_scores >= interval[..., 0] - rounding).all()
    assert (float_scores <= interval[..., 1] + rounding).all()
    width = interval[..., 1] - interval[..., 0]
    # the check has teeth: the bounds are far narrower than the scores' spread (int4's step is
    # 17 times int8's, and so are its bounds), and the quantised scores differ
    share = 0.05 if quantization is Quantization.INT8 else 0.25
    assert width.mean(axis=0).max() < share * np.ptp(float_scores, axis=0).min()
    assert np.abs(quantized_scores - float_scores).max() > 0
    np.testing.assert_allclose(quantized_scores, float_scores, atol=width.max() + rounding)


def test_the_service_scores_with_quantised_tables_and_says_so(
    make_client, edge_model, quantized_model
):
    quantization, model_dir = quantized_model
    client = make_client(model_dir=model_dir)
    info = client.get("/v1/model").json()
    assert info["quantization"] == quantization.value
    int8 = quantization is Quantization.INT8
    assert info["int8_layout"] == ("scale-index-zero-point" if int8 else None)
    assert info["int8_kernel"] is (True if int8 else None)
    expected = load_artifact(model_dir)
    scores = expected.model.predict(expected.featurizer(edge_model.rows[:4]))
    response = client.post("/v1/score", json={"rows": edge_model.rows[:4]})
    assert response.status_code == 200, response.text
    served = [[s["pctr"], s["pcvr"], s["pctcvr"]] for s in response.json()["scores"]]
    np.testing.assert_allclose(served, scores, rtol=0, atol=1e-6)


def _row_bytes(path: Path) -> int:
    """Bytes of a safetensors file after its header: the stored rows."""
    with open(path, "rb") as stream:
        (header,) = struct.unpack("<Q", stream.read(8))
    return path.stat().st_size - 8 - header


def test_quantised_rows_take_d_plus_2_or_half_d_plus_4_bytes_instead_of_4d(
    edge_model, quantized_model
):
    quantization, model_dir = quantized_model
    float_manifest = load_artifact(edge_model.model).manifest
    packed_manifest = load_artifact(model_dir).manifest
    assert packed_manifest.quantization is quantization
    assert float_manifest.quantization is Quantization.NONE
    for plain, packed in zip(
        float_manifest.embeddings.files, packed_manifest.embeddings.files, strict=True
    ):
        int8 = quantization is Quantization.INT8
        row_bytes = packed.dim + 2 if int8 else (packed.dim + 1) // 2 + 4
        scales = 256 * 4 if int8 else 0  # the int8 file's shared scales
        assert _row_bytes(edge_model.model / plain.path) == plain.num_rows * plain.dim * 4
        assert _row_bytes(model_dir / packed.path) == scales + packed.num_rows * row_bytes
        assert plain.tensor_bytes(Quantization.NONE) == _row_bytes(edge_model.model / plain.path)
        assert packed.tensor_bytes(quantization) == _row_bytes(model_dir / packed.path) - scales


def _rehash(model_dir: Path, name: str) -> None:
    """Make the manifest agree with a file changed on purpose."""
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    data = (model_dir / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def _as_format_1(model_dir: Path, out: Path) -> Path:
    """The same model as a format 1 directory: one float32 file per table, no layout."""
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 1
    for file in manifest.pop("embeddings")["files"]:
        rows = load_file(out / file["path"])[TABLE_TENSOR]
        for table in file["tables"]:
            start = table["row_offset"]
            table_rows = rows[start : start + table["num_rows"]].contiguous()
            save_file({TABLE_TENSOR: table_rows}, out / table_file(table["name"]))
        (out / file["path"]).unlink()
        del manifest["files"][file["path"]]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    for table in manifest["model"]["tables"]:
        _rehash(out, table_file(table["name"]))
    return out


def test_a_format_1_directory_is_still_served_with_the_same_scores(edge_model, tmp_path):
    old = _as_format_1(edge_model.model, tmp_path / "v1")
    artifact = load_artifact(old)
    assert artifact.manifest.format_version == 1 and artifact.manifest.embeddings is None
    got = artifact.model.predict(artifact.featurizer(edge_model.rows))
    np.testing.assert_allclose(got, edge_model.expected, atol=1e-5, rtol=0)


def _rewrite_rows(model_dir: Path, dim: int, change) -> None:
    path = model_dir / f"weights/embeddings/dim{dim}.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    _rehash(model_dir, f"weights/embeddings/dim{dim}.safetensors")


def test_bad_embedding_files_are_refused_naming_file_and_row(edge_model, int8_model, tmp_path):
    plain = Path(shutil.copytree(edge_model.model, tmp_path / "float"))
    _rewrite_rows(plain, 4, lambda t: t[TABLE_TENSOR].__setitem__((20, 1), float("inf")))
    with pytest.raises(ArtifactError, match=r"dim4.safetensors: row 20 holds NaN or inf values"):
        load_artifact(plain)
    _rewrite_rows(plain, 4, lambda t: t.update({TABLE_TENSOR: t[TABLE_TENSOR][:-1].clone()}))
    with pytest.raises(
        ArtifactError,
        match=r"dim4.safetensors: tensor 'weight' is torch.float32 \(110, 4\); the manifest's "
        r"layout \(none\) needs torch.float32 \(111, 4\)",
    ):
        load_artifact(plain)
    _rewrite_rows(plain, 4, lambda t: t.update({"other": t.pop(TABLE_TENSOR)}))
    with pytest.raises(
        ArtifactError, match=r"expected the tensors \['weight'\], found \['other'\]"
    ):
        load_artifact(plain)

    packed = Path(shutil.copytree(int8_model, tmp_path / "int8"))

    def scale(index: int, value: float):
        return lambda tensors: tensors[SCALES_TENSOR].__setitem__(index, value)

    _rewrite_rows(packed, 4, scale(7, float("nan")))
    with pytest.raises(ArtifactError, match=r"dim4.safetensors: scales\[7\] is NaN, infinite or"):
        load_artifact(packed)
    _rewrite_rows(packed, 4, scale(7, -1.0))
    with pytest.raises(ArtifactError, match=r"scales\[7\] is NaN, infinite or negative"):
        load_artifact(packed)
    _rewrite_rows(packed, 4, lambda t: t.update({SCALES_TENSOR: torch.zeros(255)}))
    with pytest.raises(ArtifactError, match=r"tensor 'scales' is torch.float32 \(255,\); int8"):
        load_artifact(packed)
    _rewrite_rows(packed, 4, lambda t: t.pop(SCALES_TENSOR))
    with pytest.raises(ArtifactError, match=r"expected the tensors \['scales', 'weight'\]"):
        load_artifact(packed)
    _rewrite_rows(
        packed,
        4,
        lambda t: t.update({TABLE_TENSOR: torch.zeros(111, 4), SCALES_TENSOR: torch.zeros(256)}),
    )
    with pytest.raises(
        ArtifactError,
        match=r"layout \(int8, scale-index-zero-point\) needs torch.uint8 \(111, 6\)",
    ):
        load_artifact(packed)


def _as_float_scale_int8(model_dir: Path, out: Path) -> Path:
    """The float model as an int8 directory of the layout before the shared scales: each row
    packed by torch's own ``embedding_bag_byte_prepack`` (``D + 8``: codes, float32 scale and
    offset), the manifest without ``int8_layout``."""
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["embeddings"]["quantization"] = "int8"
    for file in manifest["embeddings"]["files"]:
        weight = load_file(out / file["path"])[TABLE_TENSOR]
        packed = torch.ops.quantized.embedding_bag_byte_prepack(weight)
        save_file({TABLE_TENSOR: packed}, out / file["path"])
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    for file in manifest["embeddings"]["files"]:
        _rehash(out, file["path"])
    return out


def test_an_int8_model_of_the_float_scale_layout_is_still_served(make_client, edge_model, tmp_path):
    old = _as_float_scale_int8(edge_model.model, tmp_path / "int8-float-scale")
    info = make_client(model_dir=old).get("/v1/model").json()
    assert info["int8_layout"] == "float32-scale-offset" and info["int8_kernel"] is None
    artifact = load_artifact(old)
    embeddings = artifact.manifest.embeddings
    assert embeddings.int8_layout is None and embeddings.int8_rows.value == "float32-scale-offset"
    assert all(isinstance(rows, Int8FloatScaleRows) for rows in artifact.model._rows.values())
    got = artifact.model.predict(artifact.featurizer(edge_model.rows))
    bounds = {d: _row_bounds(r).unsqueeze(1).expand(-1, d) for d, r in artifact.model._rows.items()}
    assert max(float(b.max()) for b in bounds.values()) < 0.01  # half steps of the edge model
    np.testing.assert_allclose(got, edge_model.expected, atol=0.01, rtol=0)
