"""Load a model directory written by ``trainer.export``, trusting nothing in it.

Every file is read once, its sha256 checked against the manifest, and only then parsed, so what
was verified is what is used; the embedding files of a format 2 directory are hashed as a stream
and then memory-mapped (``serving.tables``), which relies on a published model directory never
being rewritten in place (``trainer.export`` writes a new directory and renames it into place).
Weights are safetensors (no pickle, no code). The schema must parse
and match the manifest's fingerprint, the weights must match the model spec in name, shape and
dtype and be finite, and a probe batch must score finitely; any failure raises
:class:`ArtifactError` with a message that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from schemas.artifact import (
    DENSE_FILE,
    FORMAT,
    MANIFEST_FILE,
    READABLE_FORMAT_VERSIONS,
    SCHEMA_FILE,
    TABLE_TENSOR,
    Manifest,
    table_file,
)
from schemas.features import FeatureSchema, OOVPolicy, SchemaError, SparseDType
from serving.features import Featurizer
from serving.model import ScoringModel
from serving.tables import open_embedding_file

__all__ = ["Artifact", "ArtifactError", "load_artifact"]

_MAX_MANIFEST_BYTES = 16 * 2**20


class ArtifactError(RuntimeError):
    """A model directory that cannot be served; the message says which file and why."""


@dataclass
class Artifact:
    """A verified, loaded model directory."""

    path: Path
    manifest: Manifest
    schema: FeatureSchema
    featurizer: Featurizer
    model: ScoringModel

    @property
    def version(self) -> str:
        return self.manifest.version


def load_artifact(model_dir: str | Path) -> Artifact:
    """Read, verify and build a served model.

    Raises:
        ArtifactError: a missing directory or file, a manifest of another format or version,
            a checksum mismatch, a schema the service cannot read or that does not match the
            manifest, weights that do not match the model spec or are not finite.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ArtifactError(
            f"model directory {path} does not exist (write one with python -m trainer.export)"
        )
    manifest = _read_manifest(path)
    schema = _read_schema(path, manifest)
    try:
        featurizer = Featurizer(schema, manifest.model)
    except ValueError as err:
        raise ArtifactError(
            f"{path / MANIFEST_FILE}: model spec and schema disagree: {err}"
        ) from None
    model = ScoringModel(manifest.model, featurizer.multi_valued)
    try:
        model.set_dense(_read_tensors(path, manifest, DENSE_FILE))
        _load_embeddings(path, manifest, model)
        model.check_loaded()
    except ValueError as err:
        raise ArtifactError(f"{path}: {err}") from None
    _probe(path, featurizer, model, schema)
    return Artifact(
        path=path.resolve(), manifest=manifest, schema=schema, featurizer=featurizer, model=model
    )


def _read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise ArtifactError(
            f"{file} not found: {path} is not a model directory written by trainer.export"
        )
    if file.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{file} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(file.read_bytes())
    except ValueError as err:
        raise ArtifactError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a {FORMAT} manifest")
    if raw.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{file} has format_version {raw.get('format_version')!r}; this service reads versions "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}: upgrade the service or export "
            "with a matching trainer"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise ArtifactError(f"{file} is invalid: {details}") from None


def _read_verified(path: Path, manifest: Manifest, name: str) -> bytes:
    file = path / name
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {file}: {err.strerror}") from None
    _check_digest(file, manifest, name, hashlib.sha256(data).hexdigest(), len(data))
    return data


def _verify_file(path: Path, manifest: Manifest, name: str) -> Path:
    """Check a file's checksum without holding it in memory; return its path."""
    file = path / name
    digest, size = hashlib.sha256(), 0
    try:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except OSError as err:
        raise ArtifactError(f"cannot read {file}: {err.strerror}") from None
    _check_digest(file, manifest, name, digest.hexdigest(), size)
    return file


def _check_digest(file: Path, manifest: Manifest, name: str, actual: str, size: int) -> None:
    expected = manifest.files[name]
    if actual != expected.sha256 or size != expected.bytes:
        raise ArtifactError(
            f"checksum mismatch for {file}: sha256 {actual[:16]}... ({size} bytes), the "
            f"manifest says {expected.sha256[:16]}... ({expected.bytes} bytes); the file is "
            "corrupt or was changed after export"
        )


def _load_embeddings(path: Path, manifest: Manifest, model: ScoringModel) -> None:
    """Give the model its embedding rows: a format 2 directory's files memory-mapped, one per
    dim; a format 1 directory's table files copied in, one table in memory at a time."""
    if manifest.embeddings is None:
        for table in manifest.model.tables:
            tensors = _read_tensors(path, manifest, table_file(table.name))
            if set(tensors) != {TABLE_TENSOR}:
                raise ValueError(
                    f"{table_file(table.name)}: expected one tensor {TABLE_TENSOR!r}, found {sorted(tensors)}"
                )
            model.set_table(table.name, tensors[TABLE_TENSOR])
        return
    for file in manifest.embeddings.files:
        rows = open_embedding_file(
            _verify_file(path, manifest, file.path),
            file,
            manifest.embeddings.quantization,
            manifest.embeddings.int8_rows,
        )
        model.set_embeddings(file.dim, rows)


def _read_schema(path: Path, manifest: Manifest) -> FeatureSchema:
    data = _read_verified(path, manifest, SCHEMA_FILE)
    try:
        schema = FeatureSchema.from_yaml(data.decode("utf-8"), source=str(path / SCHEMA_FILE))
    except (SchemaError, UnicodeDecodeError) as err:
        raise ArtifactError(f"the service cannot read the model's feature schema: {err}") from None
    if schema.fingerprint() != manifest.schema_fingerprint:
        raise ArtifactError(
            f"{path / SCHEMA_FILE} has fingerprint {schema.fingerprint()[:12]}, the manifest says "
            f"{manifest.schema_fingerprint[:12]}: the schema does not belong to these weights"
        )
    return schema


def _read_tensors(path: Path, manifest: Manifest, name: str) -> dict[str, torch.Tensor]:
    data = _read_verified(path, manifest, name)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise ArtifactError(f"{path / name} is not a readable safetensors file: {err}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ArtifactError(f"{path / name}: tensor {key!r} holds NaN or inf values")
    return tensors


def _probe(path: Path, featurizer: Featurizer, model: ScoringModel, schema: FeatureSchema) -> None:
    """Score one row of missing values (id 0 where missing is refused): the whole path must run
    and give probabilities."""
    row = {
        f.name: "" if f.dtype is SparseDType.STRING else 0
        for f in schema.sparse
        if f.oov is OOVPolicy.ERROR and not f.multi_valued
    }
    scores = model.predict(featurizer([row]))
    if scores.shape != (1, 3) or not np.isfinite(scores).all():
        raise ArtifactError(
            f"{path}: the model does not produce finite scores (probe gave {scores.tolist()})"
        )
