"""Embedding rows in the service: memory-mapped from the model directory (format 2), row-wise
int8 and int4 read by torch's kernels, format 1 directories still served, and bad files
refused."""

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
    TABLE_TENSOR,
    EmbeddingFile,
    Pooling,
    Quantization,
    TableRows,
    table_file,
)
from serving.artifact import ArtifactError, load_artifact
from serving.tables import FloatRows, Int4Rows, Int8Rows
from trainer.embedding_files import quantize_int4_rows, quantize_int8_rows, write_embedding_file
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
    """Codes, scale and offset of ``quantize_int8_rows(weight)``, read back from the bytes."""
    rows = quantize_int8_rows(weight)
    dim = weight.shape[1]
    scale_offset = rows[:, dim:].contiguous().view(torch.float32)
    return rows[:, :dim].to(torch.float32), scale_offset[:, 0], scale_offset[:, 1]


def _dequantization_bound(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per row: half a quantisation step, plus the float32 rounding of ``scale * q + offset``
    (two operations on values up to ``|offset| + 255 * scale``)."""
    return scale / 2 + 2 * EPS32 * (offset.abs() + 255 * scale)


def test_int8_rows_refuse_a_range_beyond_float32():
    with pytest.raises(ValueError, match="row 1: its range does not fit a float32 scale"):
        quantize_int8_rows(torch.tensor([[0.0, 1.0], [-3e38, 3e38]]))


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


@pytest.mark.parametrize(
    ("decode", "bound", "levels", "magnitudes"),
    [
        (_int8_quantized, _dequantization_bound, 255, (-6, 4)),
        (_int4_quantized, _int4_dequantization_bound, 15, (-3, 3)),  # within float16's range
    ],
    ids=["int8", "int4"],
)
def test_quantised_rows_are_within_half_a_step_of_the_float_rows(decode, bound, levels, magnitudes):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 16, generator=generator) * torch.logspace(*magnitudes, 500)[:, None]
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


@pytest.mark.parametrize(
    ("rows_class", "quantize", "dim"),
    [
        (Int8Rows, quantize_int8_rows, 6),
        (Int4Rows, quantize_int4_rows, 6),
        (Int4Rows, quantize_int4_rows, 5),
    ],
    ids=["int8", "int4", "int4-odd-dim"],
)
def test_the_quantised_kernels_read_the_stored_layout(rows_class, quantize, dim):
    """Lookups (torch's FBGEMM kernels) equal the stored rows dequantised by hand."""
    generator = torch.Generator().manual_seed(1)
    rows = rows_class(quantize(torch.randn(50, dim, generator=generator)), dim)
    values = rows.dequantize()
    assert values.shape == (50, dim)
    ids = torch.randint(0, 50, (7, 3), generator=generator)
    torch.testing.assert_close(rows.lookup(ids), F.embedding(ids, values), rtol=0, atol=1e-6)
    _assert_pools_as_embedding_bag(rows, values)


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
        assert size == path.stat().st_size and len(alive) == 3
        (header_size,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert header_size % 8 == 0  # the rows start 8-byte aligned
        stored = load_file(path)[TABLE_TENSOR]
        expected = torch.cat(list(tables.values()))
        if quantization is Quantization.INT8:
            assert stored.dtype == torch.uint8 and stored.shape == (10, 12)
            assert torch.equal(stored, quantize_int8_rows(expected))
        elif quantization is Quantization.INT4:
            assert stored.dtype == torch.uint8 and stored.shape == (10, 6)
            assert torch.equal(stored, quantize_int4_rows(expected))
        else:
            assert torch.equal(stored, expected)


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


_BOUNDS = {Quantization.INT8: _dequantization_bound, Quantization.INT4: _int4_dequantization_bound}


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
        scale, offset = rows.scale_offset().unbind(1)
        bound = _BOUNDS[quantization](scale, offset)
        bounds[dim] = bound.unsqueeze(1).expand(-1, dim).contiguous()
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
    assert client.get("/v1/model").json()["quantization"] == quantization.value
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


def test_quantised_rows_take_d_plus_8_or_half_d_plus_4_bytes_instead_of_4d(
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
        row_bytes = (
            packed.dim + 8 if quantization is Quantization.INT8 else (packed.dim + 1) // 2 + 4
        )
        assert _row_bytes(edge_model.model / plain.path) == plain.num_rows * plain.dim * 4
        assert _row_bytes(model_dir / packed.path) == packed.num_rows * row_bytes
        assert plain.tensor_bytes(Quantization.NONE) == _row_bytes(edge_model.model / plain.path)
        assert packed.tensor_bytes(quantization) == _row_bytes(model_dir / packed.path)


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
    with pytest.raises(ArtifactError, match=r"expected one tensor 'weight', found \['other'\]"):
        load_artifact(plain)

    packed = Path(shutil.copytree(int8_model, tmp_path / "int8"))

    def scale(value: float):
        def change(tensors):
            tensors[TABLE_TENSOR][7, 4:8] = torch.tensor([value]).view(torch.uint8)

        return change

    _rewrite_rows(packed, 4, scale(float("nan")))
    with pytest.raises(ArtifactError, match=r"dim4.safetensors: row 7 holds a NaN or inf scale"):
        load_artifact(packed)
    _rewrite_rows(packed, 4, scale(-1.0))
    with pytest.raises(ArtifactError, match=r"row 7 holds .*or a negative scale"):
        load_artifact(packed)
    _rewrite_rows(packed, 4, lambda t: t.update({TABLE_TENSOR: torch.zeros(111, 4)}))
    with pytest.raises(ArtifactError, match=r"layout \(int8\) needs torch.uint8 \(111, 12\)"):
        load_artifact(packed)
