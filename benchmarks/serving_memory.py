"""Memory of the scoring service with 1, 2 and 4 worker processes: proportional set size (PSS).

Run from the repository root (a few minutes: most of it is writing and exporting the model)::

    .venv/bin/python benchmarks/serving_memory.py
    .venv/bin/python benchmarks/serving_memory.py --table-scale 0.05 --workers 1 2  # a quick look

Outputs, under ``--out`` (default ``benchmarks/results``):

- ``serving_memory.md``: per model variant and worker count, the PSS of the whole service (the
  main process and every process under it), per worker, and of the embedding files' pages; the
  growth per extra worker beside the bytes of the tables; the verdict. The same table is printed.
- ``serving_memory.png``: the service's PSS against the number of workers, per variant, with
  the tables' bytes for scale.
- ``serving_memory.json``: the resolved settings and every measurement.

The model has the tables of the public Ali-CCP data set (``benchmarks/train_throughput.py``'s
``ali-ccp`` preset: 20 fields of dim 16, 0.4M users, 4.3M items, 4.8M rows, 0.3 GB of float32)
and the demo architecture, with random weights: a run directory with a DCP checkpoint is
written and exported three ways:

==========  ===================================================================================
variant     model directory
==========  ===================================================================================
float32     ``trainer.export``: format 2, the tables of each dim in one file, memory-mapped by
            every worker (one copy in the page cache, shared)
int8        ``trainer.export --quantize int8``: the same, row-wise 8-bit
format 1    the float32 export rewritten as a format 1 directory (a file per table), which the
            service copies into each worker's own memory, as every worker did before format 2
==========  ===================================================================================

For each variant and worker count the benchmark starts ``python -m serving --workers N`` on
loopback, waits until every worker has started, sends ``--warmup-requests`` requests of
``--rows`` impressions with random ids (each touches up to ``rows x 20`` table rows; loading
already reads every page once, to check that every value is finite), then reads
``/proc/<pid>/smaps_rollup`` of the service's processes. PSS charges a page shared by ``k``
processes ``1/k`` to each, so the service's total PSS counts the shared tables once. Memory
does not depend on how busy the CPUs are, so unlike the speed benchmarks this one needs no
quiet machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(Path(__file__).resolve().parent)]

from train_throughput import bench_schema

log = logging.getLogger("serving_memory")

_VARIANTS = ("float32", "int8", "format 1")
_WELL_UNDER = 0.25  # growth per extra worker, as a share of the tables' bytes, that passes
_MIB = 2**20


@dataclass(frozen=True)
class Settings:
    """What the benchmark measures (every field has a command-line flag)."""

    workers: tuple[int, ...] = (1, 2, 4)  # worker counts, each measured per variant
    table_scale: float = 1.0  # multiplies every table's rows (1.0: Ali-CCP sized)
    rows: int = 256  # impressions per warm-up request
    warmup_requests: int = 200  # requests sent before measuring
    variants: tuple[str, ...] = _VARIANTS
    work_dir: str = "runs/serving-memory"  # the run and the model directories
    out: str = "benchmarks/results"
    seed: int = 0
    extra: dict = field(default_factory=dict)


# The model ------------------------------------------------------------------------------------


def build_models(settings: Settings) -> tuple[dict[str, Path], object]:
    """Write a run with random weights and export it as every variant; returns the model
    directories by variant and the schema."""
    import torch

    from schemas.artifact import Int8Layout
    from trainer.builders import build_model
    from trainer.checkpoint import CheckpointMeta, save_model_checkpoint
    from trainer.config import load_config, to_dict
    from trainer.export import export_run
    from trainer.objectives import build_objective, model_structure
    from trainer.run_dir import RunDir
    from trainer.train_module import TrainModule

    work = _ROOT / settings.work_dir
    schema = bench_schema("ali-ccp", settings.table_scale)
    # the export's int8 layout too: models exported by code of another layout are not reused
    stamp = json.dumps(
        {
            "scale": settings.table_scale,
            "seed": settings.seed,
            "int8_layout": Int8Layout.SCALE_INDEX.value,
        }
    )
    models = {v: work / v.replace(" ", "") for v in _VARIANTS}
    stamp_file = work / "stamp.json"
    done = all((m / "manifest.json").exists() for m in models.values())
    if done and stamp_file.exists() and stamp_file.read_text() == stamp:
        log.info("reusing the models in %s", work)
        return models, schema
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    config = load_config(_ROOT / "trainer/configs/demo.yaml", [f"output_dir={run}"])
    run_dir = RunDir(run)
    run_dir.save_config(config)
    run_dir.save_schema(schema)
    torch.manual_seed(settings.seed)
    objective = build_objective(config.objective.name, **config.objective.params)
    model = build_model(
        schema, config.model, structure=model_structure(objective), embedding_device="cpu"
    )
    log.info("writing a checkpoint of %s embedding rows", f"{_table_rows(schema):,}")
    save_model_checkpoint(
        run_dir,
        TrainModule(model, objective),
        CheckpointMeta(0, schema.fingerprint(), to_dict(config)),
    )
    del model
    export_run(run, models["float32"], log=log.info)
    export_run(run, models["int8"], quantize="int8", log=log.info)
    as_format_1(models["float32"], models["format 1"])
    (work / "stamp.json").write_text(stamp)
    return models, schema


def as_format_1(model_dir: Path, out: Path) -> None:
    """A format 2 float32 directory rewritten as format 1: one ``(rows, dim)`` file per table."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from schemas.artifact import MANIFEST_FILE, TABLE_TENSOR, table_file

    shutil.copytree(model_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 1
    for file in manifest.pop("embeddings")["files"]:
        with safe_open(out / file["path"], framework="pt") as handle:
            rows = handle.get_tensor(TABLE_TENSOR)
            for table in file["tables"]:
                start, name = table["row_offset"], table_file(table["name"])
                save_file(
                    {TABLE_TENSOR: rows[start : start + table["num_rows"]].clone()}, out / name
                )
                data = (out / name).read_bytes()
                manifest["files"][name] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                }
        del rows
        (out / file["path"]).unlink()
        del manifest["files"][file["path"]]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def _table_rows(schema) -> int:
    return sum(t.num_rows for t in schema.all_tables)


def table_bytes(model_dir: Path) -> int:
    """Bytes of the embedding files (format 2) or table files (format 1) of a model."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return sum(
        entry["bytes"]
        for path, entry in manifest["files"].items()
        if path.startswith("weights/embeddings/")
    )


# Measuring -------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, queue = [], [pid]
    while queue:
        current = queue.pop()
        out.append(current)
        children = Path(f"/proc/{current}/task/{current}/children")
        if children.exists():
            queue += [int(c) for c in children.read_text().split()]
    return out


def _is_worker(pid: int) -> bool:
    """A worker of uvicorn's (a spawned interpreter), not its resource tracker."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return b"multiprocessing.spawn" in command and b"resource_tracker" not in command


def _rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def _mapped_pss(pid: int, prefix: str) -> int:
    """kB of PSS of a process's mappings of files under ``prefix``."""
    total, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = len(fields) >= 6 and fields[5].startswith(prefix)
        elif current and fields[0] == "Pss:":
            total += int(fields[1])
    return total


def _warm_up(url: str, schema, settings: Settings) -> None:
    import httpx

    rng = np.random.default_rng(settings.seed)
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(settings.warmup_requests):
            columns = {
                f.name: rng.integers(0, 2**40, settings.rows).tolist() for f in schema.sparse
            }
            columns |= {f.name: rng.random(settings.rows).tolist() for f in schema.dense}
            response = client.post("/v1/score/columns", json={"columns": columns})
            response.raise_for_status()


def measure(model_dir: Path, workers: int, schema, settings: Settings) -> dict:
    """Start the service with ``workers`` processes, warm it up, and read its memory."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = _ROOT / settings.work_dir / f"server-{model_dir.name}-{workers}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "serving", "--model-dir", str(model_dir)]
    command += ["--port", str(port), "--workers", str(workers), "--log-level", "info"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(command, cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while log_path.read_text().count("Application startup complete") < workers:
            if proc.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"the service did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        startup_s = time.monotonic() - started
        httpx.get(f"{url}/readyz", timeout=10).raise_for_status()
        _warm_up(url, schema, settings)
        pids = _descendants(proc.pid)
        rollups = {pid: _rollup(pid) for pid in pids}
        tables_prefix = str((model_dir / "weights" / "embeddings").resolve())
        files_pss = sum(_mapped_pss(pid, tables_prefix) for pid in pids)
        worker_pids = [pid for pid in pids if _is_worker(pid)] or [proc.pid]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = sum(r["Pss"] for r in rollups.values())
    return {
        "workers": workers,
        "processes": len(pids),
        "pss_mib": total / 1024,
        "rss_mib": sum(r["Rss"] for r in rollups.values()) / 1024,
        "main_pss_mib": rollups[proc.pid]["Pss"] / 1024,
        "worker_pss_mib": [rollups[p]["Pss"] / 1024 for p in worker_pids],
        "table_files_pss_mib": files_pss / 1024,
        "startup_s": startup_s,
    }


# Report ----------------------------------------------------------------------------------------


def summarize(results: list[dict], tables: dict[str, int]) -> list[dict]:
    """Adds, per variant, the growth per extra worker over the fewest workers measured, and the
    part of it that the tables cause.

    A worker costs memory of its own (the interpreter, torch, the app, the dense model) whatever
    the tables: the float32 variant measures it as the growth of everything but the table files'
    pages. What a variant grows by beyond that, per extra worker, is what its tables cost each
    worker: about nothing when they are shared, a whole copy when each worker copies them."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    for mine in by_variant.values():
        mine.sort(key=lambda r: r["workers"])

    def per_worker(r: dict, base: dict, key) -> float | None:
        extra = r["workers"] - base["workers"]
        return (key(r) - key(base)) / extra if extra else None

    reference = by_variant.get("float32") or next(iter(by_variant.values()))
    own = [
        per_worker(r, reference[0], lambda x: x["pss_mib"] - x["table_files_pss_mib"])
        for r in reference
    ]
    own_growth = max((g for g in own if g is not None), default=None)
    rows = []
    for variant, mine in by_variant.items():
        for r in mine:
            growth = per_worker(r, mine[0], lambda x: x["pss_mib"])
            tables_growth = None if growth is None or own_growth is None else growth - own_growth
            rows.append(
                r
                | {
                    "table_mib": tables[variant] / _MIB,
                    "growth_per_worker_mib": growth,
                    "worker_own_growth_mib": own_growth,
                    "tables_growth_per_worker_mib": tables_growth,
                    "tables_growth_share": None
                    if tables_growth is None
                    else max(0.0, tables_growth) * _MIB / tables[variant],
                }
            )
    return rows


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[dict], settings: Settings, schema) -> str:
    header = (
        "| model | workers | service PSS MiB | per worker MiB | table files' PSS MiB "
        "| growth per extra worker MiB | of which tables MiB | tables' growth / table bytes "
        "| table bytes MiB | startup s |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['workers']} | {r['pss_mib']:,.0f} "
            f"| {', '.join(f'{w:,.0f}' for w in r['worker_pss_mib'])} "
            f"| {r['table_files_pss_mib']:,.0f} | {_cell(r['growth_per_worker_mib'], ',.0f')} "
            f"| {_cell(r['tables_growth_per_worker_mib'], ',.0f')} "
            f"| {_cell(r['tables_growth_share'], '.0%')} | {r['table_mib']:,.0f} "
            f"| {r['startup_s']:.0f} |"
        )
    own = next((r["worker_own_growth_mib"] for r in rows), None)
    lines += ["", "| target | result |", "| --- | --- |"]
    for variant in ("float32", "int8"):
        shares = [
            r["tables_growth_share"]
            for r in rows
            if r["variant"] == variant and r["tables_growth_share"] is not None
        ]
        if shares:
            met = max(shares) < _WELL_UNDER
            lines.append(
                f"| {variant}: per extra worker, the service grows by well under one copy of the "
                f"tables (< {_WELL_UNDER:.0%} of their bytes, beyond a worker's own "
                f"{_cell(own, ',.0f')} MiB) | at most {max(shares):.0%}: "
                f"{'met' if met else 'not met'} |"
            )
    float_mib = next((r["table_mib"] for r in rows if r["variant"] == "float32"), None)
    int8_mib = next((r["table_mib"] for r in rows if r["variant"] == "int8"), None)
    if float_mib and int8_mib:
        lines.append(
            f"| int8 table bytes | {int8_mib:,.0f} MiB against {float_mib:,.0f} MiB float32: "
            f"{float_mib / int8_mib:.2f}x smaller (rows of D + 2 bytes against 4 D; the files "
            "with their headers and int8's shared scales) |"
        )
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines += [
        "",
        (
            f"Model: {len(schema.sparse)} tables of dim 16, {_table_rows(schema):,} rows (table "
            f"scale {settings.table_scale}), demo architecture, random weights. Warm-up: "
            f"{settings.warmup_requests} requests of {settings.rows} impressions with random "
            f"ids. {machine}."
        ),
        "",
        (
            "PSS charges each process its share of every page it maps (a page shared by k "
            "processes counts 1/k); the service's PSS is the sum over the main process and every "
            "process under it. A worker's own growth (the interpreter, torch, the app and the "
            "dense model) is the float32 service's growth without the table files' pages; `of "
            "which tables` is the rest. `format 1` is the float32 model as a directory of one "
            "file per table, which each worker copies into its own memory (the layout before "
            "format 2)."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        line = ax.plot(
            [r["workers"] for r in mine], [r["pss_mib"] for r in mine], marker="o", label=variant
        )[0]
        ax.axhline(mine[0]["table_mib"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("service PSS (MiB)")
    ax.set_xticks(sorted({r["workers"] for r in rows}))
    ax.set_title("Scoring service memory (dotted: the variant's table bytes)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=list(Settings.workers))
    parser.add_argument("--table-scale", type=float, default=Settings.table_scale)
    parser.add_argument("--rows", type=int, default=Settings.rows)
    parser.add_argument("--warmup-requests", type=int, default=Settings.warmup_requests)
    parser.add_argument("--variants", nargs="+", choices=_VARIANTS, default=list(_VARIANTS))
    parser.add_argument("--work-dir", default=Settings.work_dir)
    parser.add_argument("--out", default=Settings.out)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[serving_memory] %(message)s")
    settings = Settings(
        workers=tuple(args.workers),
        table_scale=args.table_scale,
        rows=args.rows,
        warmup_requests=args.warmup_requests,
        variants=tuple(args.variants),
        work_dir=args.work_dir,
        out=args.out,
        seed=args.seed,
    )
    log.info("settings: %s", json.dumps(asdict(settings)))
    models, schema = build_models(settings)
    tables = {v: table_bytes(models[v]) for v in settings.variants}
    results = []
    for variant in settings.variants:
        for workers in settings.workers:
            log.info("%s, %d worker(s)", variant, workers)
            result = measure(models[variant], workers, schema, settings) | {"variant": variant}
            log.info("  service PSS %.0f MiB", result["pss_mib"])
            results.append(result)
    rows = summarize(results, tables)
    out = _ROOT / settings.out
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, settings, schema)
    (out / "serving_memory.md").write_text(text)
    (out / "serving_memory.json").write_text(
        json.dumps({"settings": asdict(settings), "rows": rows}, indent=2) + "\n"
    )
    plot(rows, out / "serving_memory.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
