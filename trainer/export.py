"""Export a training checkpoint as a self-contained serving artifact (see ``schemas.artifact``).

::

    python -m trainer.export --run runs/demo/run --out runs/demo/model
    python -m trainer.export --run runs/demo/run --out runs/demo/model --checkpoint step_00000100 --force
    python -m trainer.export --run s3://ml/runs/demo --out s3://ml/models/demo --force
    python -m trainer.export --run runs/demo/run --out runs/demo/model-int8 --quantize int8
    python -m trainer.export --run runs/demo/run --repository s3://ml/models/demo --keep 5

The (sharded) DCP checkpoint is read in one process without a process group. The run's model is
built with its embedding tables on ``meta`` (no table memory) and every tensor of it is checked
against the checkpoint. The dense part is loaded into that model, which then declares what the
service needs (``CtcvrModel.serving_tensors``: the MMoE, the ctr and cvr towers, and what the CVR
tower's input depends on, DDPO's causal transfer modules and their source heads' gates); the
declaration must match ``ModelSpec.dense_shapes()``, the contract the service reads. Heads that
exist only for training (an imputation tower, DDPO's conversion propensity tower, EVI's teacher)
are not declared, so they are left out, as are an objective's own parameters and the optimizer
state. A CVR tower trained partially shared with the imputation tower (Adap-SL,
``trainer.model.adap_sl``) declares itself folded into an ordinary tower: each layer's shared
and private units one dense layer, its pruned weights zeros. The embedding tables are then read
one at a time, each gathered whole from however many ranks' shards wrote it, appended to the
file of its embedding dim (``trainer.embedding_files``: one file per dim, the layout the service
memory-maps) and released, so that no two tables are ever in memory at once. ``--quantize int8``
stores the rows with row-wise 8-bit quantisation (codes plus a scale index into the file's 256
shared scales and a zero point per row, 3.56x smaller at dim 16 and nearly 4x for wide rows; see
``schemas.artifact``), ``--quantize int4`` with 4-bit codes
two a byte plus a float16 scale and offset (about 8x smaller for wide rows). The manifest
records the version id, the source run and step, the schema fingerprint, the model spec, the
run's evaluation metrics and a sha256 per file. The directory is written beside ``--out`` and
renamed into place when complete, so a service watching or reloading ``--out`` never sees half
an artifact.

``--run`` and ``--out`` may be URIs (``s3://...``, any ``schemas.storage`` scheme). A run's
checkpoint is then read with ranged reads, still one table at a time. An object store has no
rename, so the directory is staged on the local disk (``TMPDIR``) and published file by file
with the manifest, which holds every file's sha256, last; an existing model's manifest is
deleted first. A service refuses a directory without a manifest or whose files do not match
it, so at no moment is there a half-written model that it would load.

``--repository`` publishes the export as a new version of a model repository instead of writing
``--out`` (``trainer.publish``: exported to a local temporary directory, uploaded, verified with
the service's loader, then made current; ``python -m trainer.models`` lists, promotes and rolls
back).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torchrec import PoolingType

from schemas import FeatureSchema, SchemaError, storage
from schemas.artifact import (
    DENSE_FILE,
    MANIFEST_FILE,
    SCHEMA_FILE,
    EmbeddingFile,
    EmbeddingLayout,
    FileEntry,
    Manifest,
    ModelSpec,
    Pooling,
    Quantization,
    Source,
    TableEntry,
    embedding_layout,
)
from schemas.storage import Location
from trainer.builders import build_model
from trainer.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    TensorSpec,
    check_schema,
    find_checkpoint,
    model_tensor_specs,
    read_model_tensors,
)
from trainer.config import ConfigError, ModelConfig, model_config_from_dict, to_dict
from trainer.embedding_files import write_embedding_file
from trainer.model import CtcvrModel, ModelStructure, embedding_bag_configs
from trainer.objectives import build_objective, model_structure
from trainer.publish import DEFAULT_KEEP, Published, PublishError, publish
from trainer.run_dir import CheckpointDir, RunDir, RunDirError

__all__ = ["ExportError", "export_run", "export_to_repository", "main", "model_spec"]


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why and, where there is one, the fix."""


@dataclass(frozen=True)
class _Param:
    model_key: str  # key in the model's state dict (trainer.checkpoint maps it to the checkpoint)
    name: str  # the table name for tables, else the model's state_dict key
    shape: tuple[int, ...]
    dtype: torch.dtype


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    version: str | None = None,
    force: bool = False,
    quantize: Quantization | str = Quantization.NONE,
    log: Any = print,
) -> Manifest:
    """Write the serving artifact of a training run.

    Args:
        run_dir: a run directory written by ``trainer.train`` (a path or a URI).
        out_dir: the model directory to create (a path or a URI).
        checkpoint: a checkpoint directory, or its name under ``RUN/checkpoints``; default the
            run's latest.
        version: the version id; default ``<run name>-step<step>-<content hash>``.
        force: replace ``out_dir`` if it exists.
        quantize: ``none`` (float32 tables), ``int8`` (row-wise 8-bit: a scale of the file's 256
            and a zero point per row) or ``int4`` (row-wise 4-bit, a scale and offset per row).
        log: where progress lines go (``print``; ``None`` for silence).

    Returns:
        The manifest written.

    Raises:
        ExportError: no such run or checkpoint, a checkpoint of another schema, a checkpoint
            that does not hold the model the run's config describes, non-finite weights, a table
            that cannot be quantised, an existing ``out_dir`` without ``force``.
        StorageError: a storage fault reading the run or writing ``out_dir`` (named, with
            what to check); ``out_dir`` then holds no manifest, so nothing loads it.
    """
    say = log or (lambda *_: None)
    try:
        quantization = Quantization(quantize)
    except ValueError:
        choices = [q.value for q in Quantization]
        raise ExportError(f"quantize must be one of {choices}, got {quantize!r}") from None
    out = storage.resolve(out_dir)
    if storage.exists(out) and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    run = RunDir(run_dir)
    schema = _load_run_schema(run)
    ckpt, meta = _find_checkpoint(run, checkpoint)
    try:
        check_schema(ckpt, meta, schema.fingerprint(), f"the run's {SCHEMA_FILE} differs")
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    config = meta.config or to_dict(run.load_config())
    try:
        model_config = model_config_from_dict(config["model"])
    except ConfigError as err:
        raise ExportError(f"{ckpt}: the model config it was trained with: {err}") from None
    objective_name = config["objective"]["name"]
    objective_params = dict(config["objective"].get("params") or {})
    objective = build_objective(objective_name, **objective_params)
    structure = model_structure(objective)
    spec = model_spec(schema, model_config, structure)
    # The model as the run built it, tables on "meta": names and shapes, no table memory.
    model = build_model(schema, model_config, structure=structure, embedding_device="meta")
    tables, dense = _plan(model, ckpt, spec)
    if model.training_only_heads:
        say(
            f"[export] training-only heads left out: {', '.join(sorted(model.training_only_heads))}"
        )

    layout = embedding_layout(spec, quantization)
    tmp = _staging_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / layout.files[0].path).parent.mkdir(parents=True)
    try:
        files: dict[str, FileEntry] = {}
        (tmp / SCHEMA_FILE).write_text(schema.to_yaml())
        files[SCHEMA_FILE] = _file_entry(tmp / SCHEMA_FILE)
        save_file(_serving_tensors(model, _load(ckpt, dense), dense), tmp / DENSE_FILE)
        files[DENSE_FILE] = _file_entry(tmp / DENSE_FILE)
        for file in layout.files:
            _write_tables(ckpt, tables, tmp / file.path, file, quantization)
            files[file.path] = _file_entry(tmp / file.path)
        digest = hashlib.sha256(
            "".join(f"{p}:{e.sha256}\n" for p, e in sorted(files.items())).encode()
        )
        manifest = Manifest(
            version=version or f"{_slug(run.name)}-step{meta.step:08d}-{digest.hexdigest()[:10]}",
            created_at=datetime.now(UTC),
            source=Source(
                run_dir=run.location,
                checkpoint=ckpt.name,
                step=meta.step,
                objective=objective_name,
                objective_params=objective_params,
            ),
            schema_fingerprint=schema.fingerprint(),
            model=spec,
            metrics=_metrics(run),
            training_config=config,
            embeddings=layout,
            files=files,
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(e.bytes for e in files.values())
    say(
        f"[export] wrote {out}: version {manifest.version}, step {manifest.source.step}, "
        f"{len(tables)} tables in {len(layout.files)} file(s) ({quantization.value}: "
        f"{rows_size_note(layout)}), {size / 2**20:.1f} MiB in all"
    )
    return manifest


def rows_size_note(layout: EmbeddingLayout) -> str:
    """The stored rows' size and, when quantised, how much smaller than float32 they are. For
    int8 also int4's ratio: at small dims a row's scale index and zero point keep int8 under 4x
    (3.56x at dim 16), and int4 is the choice for a user still short of memory there."""
    stored = layout.tensor_bytes
    note = f"{stored / 2**20:.1f} MiB of rows"
    if layout.quantization is Quantization.NONE:
        return note
    float32 = sum(f.tensor_bytes(Quantization.NONE) for f in layout.files)
    note += f", {float32 / stored:.2f}x smaller than float32"
    if layout.quantization is Quantization.INT8:
        int4 = sum(f.tensor_bytes(Quantization.INT4) for f in layout.files)
        note += f"; int4 would be {float32 / int4:.2f}x"
    return note


def export_to_repository(
    run_dir: str | Path,
    repository: str | os.PathLike[str],
    *,
    checkpoint: str | Path | None = None,
    version: str | None = None,
    keep: int = DEFAULT_KEEP,
    quantize: Quantization | str = Quantization.NONE,
    log: Any = print,
) -> Published:
    """Export a run and publish it as the current version of a model repository.

    The artifact is written to a local temporary directory, then :func:`trainer.publish.publish`
    uploads, verifies and makes it current.

    Raises:
        ExportError: the run cannot be exported (see :func:`export_run`).
        PublishError: the version was not made current (see :func:`trainer.publish.publish`).
    """
    with tempfile.TemporaryDirectory(prefix="ctcvr-publish-") as tmp:
        model_dir = Path(tmp) / "model"
        export_run(
            run_dir, model_dir, checkpoint=checkpoint, version=version, quantize=quantize, log=log
        )
        return publish(model_dir, repository, keep=keep, log=log)


# Reading the run -------------------------------------------------------------------------------


def _load_run_schema(run: RunDir) -> FeatureSchema:
    try:
        run.check_is_run()
        return run.load_schema()
    except (RunDirError, SchemaError) as err:
        raise ExportError(str(err)) from None


def _find_checkpoint(
    run: RunDir, checkpoint: str | os.PathLike[str] | None
) -> tuple[CheckpointDir, CheckpointMeta]:
    try:
        found = find_checkpoint(run, checkpoint)
        return found, found.read_meta()
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def model_spec(schema: FeatureSchema, config: ModelConfig, structure: ModelStructure) -> ModelSpec:
    """The spec of the model ``build_model(schema, config, structure=structure)`` builds.

    Its ``dense_shapes()`` are the tensors that model must declare for the service
    (``CtcvrModel.serving_tensors``).
    """
    tables = [
        TableEntry(
            name=table.name,
            num_rows=table.num_embeddings,
            dim=table.embedding_dim,
            pooling=Pooling.MEAN if table.pooling == PoolingType.MEAN else Pooling.SUM,
            features=tuple(table.feature_names),
        )
        for table in embedding_bag_configs(schema)  # the trainer's table order is the input order
    ]
    return ModelSpec(
        num_experts=config.num_experts,
        expert_sizes=tuple(config.expert_sizes),
        tower_sizes=tuple(config.tower_sizes),
        tables=tuple(tables),
        dense_features=tuple(schema.dense_names),
        cvr_transfer=structure.cvr_transfer,
        interaction=config.interaction,
    )


def _plan(
    model: CtcvrModel, ckpt: CheckpointDir, spec: ModelSpec
) -> tuple[list[_Param], list[_Param]]:
    """Check every model tensor against the checkpoint, and the model's serving declaration
    against the artifact layout.

    Returns:
        The tables, in the spec's order, and every other tensor of the model (the dense part,
        training-only heads included: the model computes its serving tensors from them).

    Raises:
        ExportError: a tensor missing from the checkpoint or of another shape there; a model
            whose serving tensors are not those of ``spec.dense_shapes()``.
    """
    stored = model_tensor_specs(ckpt)
    table_of = {key: table for table, key in model.table_keys().items()}
    tables: list[_Param] = []
    dense: list[_Param] = []
    for key, tensor in model.state_dict().items():
        found = stored.get(key)
        if found is None:
            raise ExportError(
                f"{ckpt} has no model tensor {key!r}: it was not written by this run's model"
            )
        if found.shape != tuple(tensor.shape):
            raise ExportError(
                f"{ckpt}: {key!r} has shape {found.shape} but the run's config gives "
                f"{tuple(tensor.shape)}; was the config changed after training?"
            )
        param = _Param(key, table_of.get(key, key), found.shape, found.dtype)
        (tables if key in table_of else dense).append(param)
    _check_layout(model.serving_tensors(), spec)
    order = {t.name: i for i, t in enumerate(spec.tables)}
    return sorted(tables, key=lambda p: order[p.name]), dense


def _check_layout(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    expected = spec.dense_shapes()
    if got != expected:
        raise ExportError(
            "the trainer's model no longer matches the serving artifact layout "
            f"(schemas/artifact.py): missing {sorted(set(expected) - set(got))}, "
            f"unexpected {sorted(set(got) - set(expected))}, "
            f"shape mismatches {sorted(k for k in set(got) & set(expected) if got[k] != expected[k])}"
        )


def _serving_tensors(
    model: CtcvrModel, state: dict[str, torch.Tensor], dense: list[_Param]
) -> dict[str, torch.Tensor]:
    """The tensors of ``weights/dense.safetensors``: the checkpoint's dense part loaded into the
    model (its tables stay on ``meta``), then the model's own serving declaration."""
    model.load_state_dict({p.name: state[p.model_key] for p in dense}, strict=False)
    # Copies: serving tensors may be views into one parameter (the experts' stacked layers),
    # and safetensors refuses tensors that share memory.
    return {
        name: t.clone(memory_format=torch.contiguous_format)
        for name, t in model.serving_tensors().items()
    }


def _load(ckpt: CheckpointDir, params: list[_Param]) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of ``params`` by model key; DCP gathers them from every rank's
    shards."""
    try:
        state = read_model_tensors(
            ckpt, {p.model_key: TensorSpec(p.shape, p.dtype) for p in params}
        )
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"{ckpt}: {key!r} holds NaN or inf values; the training diverged")
    return state


def _write_tables(
    ckpt: CheckpointDir,
    tables: list[_Param],
    path: Path,
    file: EmbeddingFile,
    quantization: Quantization,
) -> None:
    """Write one embedding file, one table in memory at a time."""
    by_name = {p.name: p for p in tables}

    def load(name: str) -> torch.Tensor:
        param = by_name[name]
        return _load(ckpt, [param])[param.model_key]

    try:
        write_embedding_file(path, file, quantization, load)
    except ValueError as err:
        raise ExportError(f"{ckpt}: {err}") from None


def _metrics(run: RunDir) -> dict[str, float | None]:
    try:
        raw = run.read_evaluation() or {}
    except RunDirError as err:
        raise ExportError(str(err)) from None
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        if value is None:  # an undefined metric (NaN), written as null
            out[key] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if math.isfinite(value) else None
        else:
            raise ExportError(
                f"{run.evaluation_dir}: metric {key!r} is {value!r}, not a number or null"
            )
    return out


# Writing ---------------------------------------------------------------------------------------


def _file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return FileEntry(sha256=digest.hexdigest(), bytes=path.stat().st_size)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:64] or "model"


def _staging_dir(out_dir: Location) -> Path:
    """Where the model directory is written before it is published: beside ``out_dir`` on the
    local disk (renamed into place), else a fresh local temporary directory (uploaded)."""
    if out_dir.is_local:
        target = Path(out_dir.path)
        return target.parent / f".{target.name}.tmp-{os.getpid()}"
    return Path(tempfile.mkdtemp(prefix="ctcvr-export-"))


def _publish(tmp: Path, out_dir: Location) -> None:
    """Put the finished directory in place (replacing an old one), so that no reader ever sees
    a model directory that is half written.

    Locally the directory is renamed into place. An object store has no rename: the old
    manifest is deleted first (from then on nothing loads the old directory), then the old
    files, then every new file is uploaded, and the manifest, which names every file with its
    sha256, last.
    """
    if out_dir.is_local:
        target = Path(out_dir.path)
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    storage.delete_file(out_dir.join(MANIFEST_FILE))
    storage.delete_tree(out_dir)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in [*(f for f in files if f != MANIFEST_FILE), MANIFEST_FILE]:
        storage.upload_file(tmp / name, out_dir.join(name))
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--run", required=True, help="run directory written by trainer.train (a path or a URI)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="model directory to write (a path or a URI)")
    target.add_argument(
        "--repository",
        help="model repository (a path or a URI) to publish a new current version to",
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint name under RUN/checkpoints or a path (default: latest)"
    )
    parser.add_argument("--version", help="version id (default: <run>-step<step>-<content hash>)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--quantize",
        choices=[q.value for q in Quantization],
        default=Quantization.NONE.value,
        help="embedding rows as float32 (none, default), row-wise 8-bit codes with a scale (one "
        "of the file's 256) and a zero point per row (int8), or row-wise 4-bit codes with a "
        "float16 scale and offset per row (int4)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        help=f"with --repository: the newest versions kept (default {DEFAULT_KEEP}; the current "
        "and the previous one are always kept)",
    )
    args = parser.parse_args(argv)
    if args.repository is not None and args.force:
        parser.error("--force applies to --out; a repository version is never replaced")
    try:
        if args.repository is not None:
            export_to_repository(
                args.run,
                args.repository,
                checkpoint=args.checkpoint,
                version=args.version,
                keep=args.keep,
                quantize=args.quantize,
            )
        else:
            export_run(
                args.run,
                args.out,
                checkpoint=args.checkpoint,
                version=args.version,
                force=args.force,
                quantize=args.quantize,
            )
    except (ExportError, PublishError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
