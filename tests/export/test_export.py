"""trainer.export: a checkpoint to a self-contained, checksummed, weights-only artifact."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from schemas.artifact import (
    DENSE_FILE,
    MANIFEST_FILE,
    SCHEMA_FILE,
    Manifest,
    Quantization,
    embedding_file,
    embedding_layout,
)
from serving.artifact import load_artifact
from tests.serving.artifacts import (
    REPO,
    checkpoint_tensors,
    edge_schema,
    make_edge_run,
    request_rows,
    single_process_dcp,
    trainer_predictions,
)
from trainer.export import ExportError, export_run
from trainer.objectives import OBJECTIVES

EXTRA_HEAD_OBJECTIVE = next((name for name, cls in OBJECTIVES.items() if cls.required_heads), None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_edge_run(tmp_path_factory.mktemp("export"), seed=3)


def test_export_writes_a_complete_checksummed_artifact(run, tmp_path):
    out = tmp_path / "model"
    manifest = export_run(run, out, log=None)
    on_disk = Manifest.model_validate_json((out / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    assert manifest.version.startswith("run-step00000007-") and manifest.source.step == 7
    assert manifest.source.checkpoint == "step_00000007" and manifest.source.objective == "esmm"
    assert manifest.schema_fingerprint == edge_schema().fingerprint()
    assert manifest.metrics == {"ctr_auc": 0.61, "cvr_gauc": None, "impressions": 240.0}
    assert manifest.training_config["model"]["expert_sizes"] == [8]
    spec = manifest.model
    assert [t.name for t in spec.tables] == ["tags", "user", "city", "level", "strict_cat", "words"]
    assert (
        spec.tables[0].features == ("recent_tags", "tag") and spec.tables[0].pooling.value == "mean"
    )
    assert spec.tables[1].pooling.value == "sum"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST_FILE, *manifest.files])
    for name, entry in manifest.files.items():
        data = (out / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry.sha256, entry.bytes)
    # one file per embedding dim, the tables of that dim in spec order, float32
    assert manifest.format_version == 2 and manifest.embeddings == embedding_layout(spec)
    assert [f.path for f in manifest.embeddings.files] == [embedding_file(d) for d in (2, 3, 4)]
    dim4 = manifest.embeddings.files[2]
    assert [(t.name, t.row_offset, t.num_rows) for t in dim4.tables] == [
        ("tags", 0, 13),
        ("user", 13, 98),
    ]
    assert load_file(out / embedding_file(4))["weight"].shape == (13 + 98, 4)
    assert not list(tmp_path.glob(".model.*"))  # no temporary directory left behind


def test_exported_weights_equal_the_checkpoint(run, tmp_path):
    out = tmp_path / "model"
    export_run(run, out, log=None)
    saved = checkpoint_tensors(run / "checkpoints" / "step_00000007")
    prefix = "model.model."
    rows = load_file(out / embedding_file(4))["weight"]
    tables = prefix + "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
    assert torch.equal(rows[:13], saved[tables.format("tags")])
    assert torch.equal(rows[13:], saved[tables.format("user")])
    assert torch.equal(
        load_file(out / embedding_file(2))["weight"],
        torch.cat([saved[tables.format(t)] for t in ("level", "strict_cat", "words")]),
    )
    dense = load_file(out / DENSE_FILE)
    # The checkpoint holds each layer of all experts in one (E, out, in) tensor; the artifact
    # holds expert by expert.
    assert torch.equal(
        dense["mmoe.experts.1.layers.0.weight"], saved[prefix + "mmoe.experts.layers.0.weight"][1]
    )
    assert torch.equal(
        dense["mmoe.experts.0.layers.0.bias"], saved[prefix + "mmoe.experts.layers.0.bias"][0]
    )
    assert torch.equal(
        dense["towers.cvr.layers.0.bias"], saved[prefix + "towers.cvr.hidden.layers.0.0.bias"]
    )
    assert torch.equal(dense["towers.ctr.head.weight"], saved[prefix + "towers.ctr.head.weight"])
    assert torch.equal(dense["mmoe.gates.cvr.weight"], saved[prefix + "mmoe.gates.cvr.weight"])


def assert_serves_like_the_trainer(run, model_dir):
    """The artifact, loaded by the service's code, scores the run's data as the trainer does."""
    data = run.parent / "data" / "test"
    artifact = load_artifact(model_dir)
    got = artifact.model.predict(artifact.featurizer(request_rows(data, edge_schema())))
    np.testing.assert_allclose(got, trainer_predictions(run, data), atol=1e-5, rtol=0)


def test_the_served_model_predicts_what_the_trainer_predicts(run, tmp_path):
    out = tmp_path / "model"
    manifest = export_run(run, out, log=None)
    assert manifest.model.cvr_transfer == ()
    assert_serves_like_the_trainer(run, out)


@pytest.mark.skipif(
    EXTRA_HEAD_OBJECTIVE is None, reason="no objective with a training-only head is registered"
)
def test_training_only_heads_are_left_out(tmp_path):
    run = make_edge_run(tmp_path / "r", objective=EXTRA_HEAD_OBJECTIVE)
    lines: list[str] = []
    manifest = export_run(run, tmp_path / "model", log=lines.append)
    extra = sorted(OBJECTIVES[EXTRA_HEAD_OBJECTIVE].required_heads)
    assert any("training-only heads left out" in line and extra[0] in line for line in lines)
    assert manifest.model.heads == ("ctr", "cvr")
    names = load_file(tmp_path / "model" / DENSE_FILE)
    assert not [n for n in names if any(head in n for head in extra)]
    assert_serves_like_the_trainer(run, tmp_path / "model")


def test_a_ddpo_model_carries_its_causal_transfer_modules_to_the_service(tmp_path):
    # DDPO's CVR tower reads the fused feature (ddpo.txt Eq. 14), at inference too.
    run = make_edge_run(tmp_path / "r", objective="ddpo")
    lines: list[str] = []
    manifest = export_run(run, tmp_path / "model", log=lines.append)
    assert manifest.model.cvr_transfer == ("ctr", "conversion_propensity")
    assert any("training-only heads left out: conversion_propensity" in line for line in lines)
    names = set(load_file(tmp_path / "model" / DENSE_FILE))
    assert names == set(manifest.model.dense_shapes())
    assert {
        "mmoe.gates.conversion_propensity.weight",
        "cvr_transfer.ctr.query.weight",
        "cvr_transfer.conversion_propensity.value.bias",
        "cvr_transfer.fuse.weight",
    } <= names
    assert not [
        n for n in names if n.startswith("towers.conversion_propensity")
    ]  # its tower is training-only
    assert_serves_like_the_trainer(run, tmp_path / "model")


def test_a_dot_interaction_model_is_served_with_the_trainer_predictions(tmp_path):
    # 7 sparse features of dim 4 (two read the shared tags table, two are lists): 21 pairs.
    run = make_edge_run(tmp_path / "r", dim=4, overrides=["model.interaction=dot"])
    manifest = export_run(run, tmp_path / "model", log=None)
    assert manifest.model.interaction == "dot"
    assert manifest.model.num_interactions == 21
    assert manifest.model.in_features == 7 * 4 + 3 + 21
    assert_serves_like_the_trainer(run, tmp_path / "model")


def test_an_evi_model_leaves_its_teacher_and_vie_layers_out(tmp_path):
    run = make_edge_run(tmp_path / "r", objective="evi")
    assert any(
        ".objective.vie." in key
        for key in checkpoint_tensors(run / "checkpoints" / "step_00000007")
    )
    lines: list[str] = []
    manifest = export_run(run, tmp_path / "model", log=lines.append)
    assert any("training-only heads left out: cvr_teacher" in line for line in lines)
    names = set(load_file(tmp_path / "model" / DENSE_FILE))
    assert names == set(manifest.model.dense_shapes()) and manifest.model.cvr_transfer == ()
    assert not [n for n in names if "teacher" in n or "vie" in n]
    assert_serves_like_the_trainer(run, tmp_path / "model")


def test_an_existing_output_is_replaced_only_with_force(run, tmp_path):
    out = tmp_path / "model"
    first = export_run(run, out, log=None)
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_run(run, out, log=None)
    second = export_run(run, out, force=True, version="v2", log=None)
    assert second.version == "v2" and load_artifact(out).version == "v2"
    assert first.files == second.files  # same checkpoint, same bytes


def test_refuses_a_checkpoint_of_another_schema(run, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    (other / SCHEMA_FILE).write_text(
        (other / SCHEMA_FILE).read_text().replace("hash_buckets: 97", "hash_buckets: 96")
    )
    with pytest.raises(ExportError, match="trained on another feature schema"):
        export_run(other, tmp_path / "model", log=None)


def test_refuses_a_config_that_does_not_match_the_checkpoint(run, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    ckpt = other / "checkpoints" / "step_00000007"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["expert_sizes"] = [9]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="has shape .* was the config changed after training"):
        export_run(other, tmp_path / "model", log=None)


def test_refuses_runs_without_checkpoints_and_non_runs(run, tmp_path):
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "model", log=None)
    other = tmp_path / "run"
    shutil.copytree(run, other)
    (other / "checkpoints" / "latest").unlink()
    with pytest.raises(ExportError, match="has no checkpoint yet"):
        export_run(other, tmp_path / "model", log=None)
    with pytest.raises(ExportError, match="is not a complete checkpoint"):
        export_run(other, tmp_path / "model", checkpoint="step_00000099", log=None)
    assert not (tmp_path / "model").exists()


def test_refuses_non_finite_weights(tmp_path):
    import torch.distributed.checkpoint as dcp

    run = make_edge_run(tmp_path / "r", seed=4)
    tensors = checkpoint_tensors(run / "checkpoints" / "step_00000007")
    tensors["model.model.towers.ctr.head.weight"][0, 0] = float("nan")
    diverged = run / "checkpoints" / "step_00000008"
    with single_process_dcp():
        dcp.save(tensors, checkpoint_id=str(diverged), no_dist=True)
    meta = json.loads((run / "checkpoints" / "step_00000007" / "meta.json").read_text())
    (diverged / "meta.json").write_text(json.dumps({**meta, "step": 8}))
    with pytest.raises(ExportError, match="holds NaN or inf values; the training diverged"):
        export_run(run, tmp_path / "model", checkpoint="step_00000008", log=None)


def test_command_line(run, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run",
            str(run),
            "--out",
            str(tmp_path / "model"),
            "--version",
            "cli-1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "version cli-1, step 7, 6 tables" in result.stdout
    assert "Warning" not in result.stderr
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run",
            str(run),
            "--out",
            str(tmp_path / "model"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        again.returncode == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run",
            str(run),
            "--out",
            str(tmp_path / "m2"),
            "--version",
            "bad id!",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "version" in bad.stderr and "Traceback" not in bad.stderr


def _decoded_int8(tensors: dict[str, torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of int8 rows ``(N, D + 2)`` (codes, scale index, zero point) against the file's
    256 ``scales``, and each row's error bound: half a step plus float32 rounding."""
    eps = torch.finfo(torch.float32).eps
    stored, scales = tensors["weight"], tensors["scales"]
    assert stored.shape[1] == dim + 2 and scales.shape == (256,)
    scale = scales[stored[:, dim].long()]
    codes = stored[:, :dim].float() - stored[:, dim + 1 :].float()
    return scale.unsqueeze(1) * codes, scale / 2 + eps * 255 * scale


def _decoded_int4(tensors: dict[str, torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of int4 rows ``(N, ceil(D / 2) + 4)`` and each row's error bound: half a step,
    the float16 rounding of the row's minimum, float32 rounding."""
    eps = torch.finfo(torch.float32).eps
    stored = tensors["weight"]
    width = (dim + 1) // 2
    assert stored.shape[1] == width + 4
    packed = stored[:, :width].long()
    codes = torch.stack([packed % 16, packed // 16], dim=2).flatten(1)[:, :dim].float()
    scale, offset = stored[:, width:].contiguous().view(torch.float16).float().unbind(1)
    values = scale.unsqueeze(1) * codes + offset.unsqueeze(1)
    return values, scale / 2 + offset.abs() * 2**-10 + 2 * eps * (offset.abs() + 15 * scale)


def _check_the_size_note(stdout: str, manifest: Manifest, quantize: str) -> None:
    """The export line says how much smaller than float32 the stored rows are (and, for int8,
    int4's ratio), worked out here from the files' rows and dims."""
    rows_dims = [(f.num_rows, f.dim) for f in manifest.embeddings.files]
    float32 = sum(4 * n * d for n, d in rows_dims)
    int8 = sum(n * (d + 2) for n, d in rows_dims)
    int4 = sum(n * ((d + 1) // 2 + 4) for n, d in rows_dims)
    stored = int8 if quantize == "int8" else int4
    assert f", {float32 / stored:.2f}x smaller than float32" in stdout
    assert (f"; int4 would be {float32 / int4:.2f}x" in stdout) == (quantize == "int8")


@pytest.mark.parametrize(
    ("quantize", "decoded"), [("int8", _decoded_int8), ("int4", _decoded_int4)]
)
def test_a_quantised_export_stores_every_table_within_half_a_step(run, tmp_path, quantize, decoded):
    """``--quantize int8`` / ``int4``: the manifest says so, each dim's file holds uint8 rows of
    the layout's width, and every value decodes to within half its row's quantisation step of
    the checkpoint's."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run",
            str(run),
            "--out",
            str(tmp_path / "model"),
            "--quantize",
            quantize,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({quantize}: " in result.stdout
    manifest = Manifest.model_validate_json((tmp_path / "model" / MANIFEST_FILE).read_text())
    _check_the_size_note(result.stdout, manifest, quantize)
    assert manifest.quantization is Quantization(quantize)
    assert manifest.embeddings == embedding_layout(manifest.model, Quantization(quantize))
    saved = checkpoint_tensors(run / "checkpoints" / "step_00000007")
    for file in manifest.embeddings.files:
        tensors = load_file(tmp_path / "model" / file.path)
        stored = tensors["weight"]
        assert stored.dtype == torch.uint8 and stored.shape[0] == file.num_rows
        values, bound = decoded(tensors, file.dim)
        for table in file.tables:
            rows = slice(table.row_offset, table.row_offset + table.num_rows)
            weight = saved[
                f"model.model.sparse_arch.embedding_bag_collection.embedding_bags.{table.name}.weight"
            ]
            error = (values[rows] - weight).abs().max(dim=1).values
            assert (error <= bound[rows]).all(), table.name


def test_an_unknown_quantisation_is_refused(run, tmp_path):
    wrong = subprocess.run(
        [sys.executable, "-m", "trainer.export", "--run", str(run), "--out", str(tmp_path / "x")]
        + ["--quantize", "int2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 2 and "invalid choice: 'int2'" in wrong.stderr
    with pytest.raises(ExportError, match=r"quantize must be one of \['none', 'int8', 'int4'\]"):
        export_run(run, tmp_path / "y", quantize="int2", log=None)


ADAP_SL = (
    "model.tower_sharing=adap_sl",
    "model.tower_sizes=[6,4]",
    "model.adap_sl.epoch_steps=1",
    "model.adap_sl.cvr.rate=0.3",
    "model.adap_sl.cvr.min_density=0.3",
    "model.adap_sl.cvr.warmup_epochs=0",
    "model.adap_sl.imputation.rate=0.5",
)


def _prune_four_epochs(module) -> None:
    from trainer.config import load_config
    from trainer.pruning import AdaptivePruner

    overrides = ["output_dir=x", "data.train=x", "objective.name=badr", *ADAP_SL]
    config = load_config(None, overrides).model.adap_sl
    pruner = AdaptivePruner(module.model.partially_shared, config)
    for step in (1, 2, 3, 4):
        pruner.after_step(step)


def test_a_pruned_adap_sl_model_is_served_as_an_ordinary_model_with_the_same_predictions(tmp_path):
    run = make_edge_run(
        tmp_path / "r", objective="badr", overrides=ADAP_SL, prepare=_prune_four_epochs
    )
    lines: list[str] = []
    manifest = export_run(run, tmp_path / "model", log=lines.append)
    assert manifest.model.tower_sizes == (6, 4) and manifest.model.heads == ("ctr", "cvr")
    assert any("left out: imputation" in line for line in lines)
    dense = load_file(tmp_path / "model" / DENSE_FILE)
    assert not [name for name in dense if "imputation" in name or "partially" in name]
    # The CVR tower is dense layers of the tower sizes, the pruned weights zeros. Of its
    # 6x8 + 4x6 + 1x4 = 76 weights, prunes at rate 0.3 leave 54, 38, 27, then 23 = ceil(0.3 x 76).
    weights = [dense[f"towers.cvr.{name}.weight"] for name in ("layers.0", "layers.1", "head")]
    assert [tuple(w.shape) for w in weights] == [(6, 8), (4, 6), (1, 4)]
    kept = sum(int((w != 0).sum()) for w in weights)
    assert kept == math.ceil(0.3 * 76)
    saved = checkpoint_tensors(run / "checkpoints" / "step_00000007")
    prefix = "model.model.partially_shared.layers.0."
    shared = saved[prefix + "shared.linear.weight"] * saved[prefix + "shared.mask_cvr"]
    private = saved[prefix + "private.cvr.linear.weight"] * saved[prefix + "private.cvr.mask_cvr"]
    assert torch.equal(weights[0], torch.cat([shared, private]))
    data = run.parent / "data" / "test"
    artifact = load_artifact(tmp_path / "model")
    got = artifact.model.predict(artifact.featurizer(request_rows(data, edge_schema())))
    np.testing.assert_allclose(got, trainer_predictions(run, data), atol=1e-5, rtol=0)
