"""Loading a model directory: checksums, schema, weights, and the messages when they are wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from schemas.artifact import (
    DENSE_FILE,
    MANIFEST_FILE,
    SCHEMA_FILE,
    ModelSpec,
    embedding_file,
    embedding_layout,
)
from serving.artifact import ArtifactError, load_artifact


@pytest.fixture
def model_dir(edge_model, tmp_path) -> Path:
    return Path(shutil.copytree(edge_model.model, tmp_path / "model"))


def _edit_manifest(model_dir: Path, edit) -> None:
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    edit(manifest)
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def _rehash(model_dir: Path, name: str) -> None:
    """Make the manifest agree with a file changed on purpose (only the content is wrong)."""
    data = (model_dir / name).read_bytes()

    def edit(manifest):
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    _edit_manifest(model_dir, edit)


def test_loads_and_describes_itself(model_dir, edge_model):
    artifact = load_artifact(model_dir)
    assert artifact.version == edge_model.version
    assert artifact.manifest.model.heads == ("ctr", "cvr")
    assert artifact.schema.name == "edge"


def test_a_changed_weight_file_is_refused(model_dir):
    path = model_dir / embedding_file(4)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError, match=r"checksum mismatch for .*dim4\.safetensors.*corrupt or was changed"
    ):
        load_artifact(model_dir)


def test_a_changed_schema_is_refused(model_dir):
    path = model_dir / SCHEMA_FILE
    path.write_text(path.read_text().replace("hash_buckets: 97", "hash_buckets: 98"))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*schema.yaml"):
        load_artifact(model_dir)
    _rehash(model_dir, SCHEMA_FILE)  # consistent checksum, but not the weights' schema
    with pytest.raises(ArtifactError, match="the schema does not belong to these weights"):
        load_artifact(model_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\nsparse: []\n", "cannot read the model's feature schema"),
        ("{{{ not yaml", "(?s)cannot read the model's feature schema.*not valid YAML"),
        (
            "name: x\nsparse:\n- {name: a, dim: 0, hash_buckets: 3}\nlabels: {click: c, conversion: v}\n",
            r"(?s)cannot read the model's feature schema.*sparse\[0\] 'a'.dim",
        ),
    ],
)
def test_an_unreadable_schema_is_refused_with_the_reason(model_dir, text, message):
    (model_dir / SCHEMA_FILE).write_text(text)
    _rehash(model_dir, SCHEMA_FILE)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(model_dir)


def _change_a_table_dim(manifest: dict) -> None:
    """A spec whose first table has another dim than the schema's (with a matching layout)."""
    manifest["model"]["tables"][0]["dim"] = 5
    layout = embedding_layout(ModelSpec.model_validate(manifest["model"]))
    manifest["embeddings"] = layout.model_dump(mode="json")
    for file in layout.files:  # listed (the spec check comes before any file is read)
        manifest["files"].setdefault(file.path, manifest["files"][SCHEMA_FILE])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update(format_version=3),
            "format_version 3; this service reads versions 1 and 2",
        ),
        (lambda m: m.pop("embeddings"), "embeddings: Field required in format 2"),
        (
            lambda m: m["embeddings"]["files"][0]["tables"][0].update(row_offset=1),
            (
                r"(?s)embeddings: the layout does not match the model spec's tables: expected "
                r"weights/embeddings/dim2.safetensors: level@0\+6.*got .*level@1\+6"
            ),
        ),
        (
            lambda m: m["embeddings"].update(quantization="int2"),
            r"embeddings.quantization: Input should be 'none', 'int8' or 'int4'",
        ),
        (
            lambda m: m["embeddings"].update(int8_layout="scale-index-zero-point"),
            r"embeddings: Value error, int8_layout: given with quantization none",
        ),
        (
            lambda m: m["embeddings"].update(quantization="int8", int8_layout="int7"),
            (
                r"embeddings.int8_layout: Input should be 'scale-index-zero-point' or "
                r"'float32-scale-offset'"
            ),
        ),
        (lambda m: m.update(format="other"), "is not a ctcvr-model manifest"),
        (lambda m: m["files"].pop(DENSE_FILE), "no checksum for"),
        (
            lambda m: m["files"].update({"../../etc/passwd": m["files"][SCHEMA_FILE]}),
            "not a plain relative path",
        ),
        (lambda m: m["model"].update(heads=["ctr", "cvr", "imputation"]), "heads must be"),
        (_change_a_table_dim, "model spec and schema disagree"),
        (
            lambda m: m["model"].update(cvr_transfer=["cvr"]),
            "cvr_transfer must name distinct heads other than 'cvr'",
        ),
        (
            lambda m: m["model"].update(cvr_transfer=["ctr"]),
            r"missing \['cvr_transfer.ctr.key.bias'",
        ),
        (
            lambda m: m["model"].update(interaction="dot"),
            r"interaction 'dot' needs one embedding dim .*\[2, 3, 4\]",
        ),
        (lambda m: m["model"].update(interaction="cross"), r"interaction.*'none' or 'dot'"),
    ],
)
def test_an_invalid_manifest_is_refused(model_dir, edit, message):
    _edit_manifest(model_dir, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(model_dir)


def test_missing_directory_and_files(model_dir, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist .*trainer.export"):
        load_artifact(tmp_path / "nowhere")
    (model_dir / embedding_file(3)).unlink()
    with pytest.raises(ArtifactError, match="cannot read .*dim3.safetensors"):
        load_artifact(model_dir)
    (model_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        load_artifact(model_dir)
    (model_dir / MANIFEST_FILE).write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(model_dir)


def test_weights_of_the_wrong_shape_or_not_finite_are_refused(model_dir):
    path = model_dir / DENSE_FILE
    tensors = load_file(path)
    key = "towers.cvr.head.weight"
    original = tensors[key].clone()
    tensors[key] = torch.zeros(1, 3)
    save_file(tensors, path)
    _rehash(model_dir, DENSE_FILE)
    with pytest.raises(
        ArtifactError, match=r"towers.cvr.head.weight.* the spec needs float32 \(1, 4\)"
    ):
        load_artifact(model_dir)
    tensors[key] = original.clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    _rehash(model_dir, DENSE_FILE)
    with pytest.raises(ArtifactError, match="holds NaN or inf"):
        load_artifact(model_dir)
    tensors[key] = original
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, path)
    _rehash(model_dir, DENSE_FILE)
    with pytest.raises(ArtifactError, match=r"unexpected \['extra.weight'\]"):
        load_artifact(model_dir)


def test_a_weight_file_that_is_not_safetensors_is_refused(model_dir):
    (model_dir / embedding_file(4)).write_bytes(b"\x80\x04pickle? no thanks")
    _rehash(model_dir, embedding_file(4))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(model_dir)
