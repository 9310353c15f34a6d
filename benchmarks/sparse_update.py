"""FBGEMM's fused sparse-optimizer kernels on the CPU: one table's lookup and in-backward update.

What the embedding stage of a training step costs (``ctcvr_1p`` against ``head_only`` in
``train_throughput.py``) is mostly FBGEMM's table-batched embedding op (TBE): its forward, and
its backward, which updates the rows the batch read with the sparse optimizer fused into it.
This times that op alone, the way TorchRec builds it for the trainer's
``sparse_optimizer.name`` choices on CPU, so the cost of each update kernel shows apart from the
model. Run from the repository root (under a minute)::

    .venv/bin/python benchmarks/sparse_update.py --out benchmarks/results/sparse_update

Cells: the sparse optimizer (``rowwise_adagrad``, the default; ``adagrad``, an accumulator per
element; ``sgd``), and ``rowwise_adagrad`` with float16 gradients (TBE's ``output_dtype``:
FBGEMM then takes its generic update loop for the same optimizer instead of its generated
kernel, which is why it is here); torch threads 1 and 2; embedding dim 16 and 128; a batch of
``--batch`` single-valued lookups into one table of ``--rows`` rows reading 1 distinct row or
``--batch`` distinct rows. The per-row cost of the update is the difference of the two,
divided by the extra rows. Each cell: ``--warmup`` untimed then ``--steps`` timed calls,
median reported; the share of the CPUs other processes took over the run is recorded.

Writes ``sparse_update.md`` (printed too), ``sparse_update.json`` and ``sparse_update.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    EmbeddingLocation,
    SplitTableBatchedEmbeddingBagsCodegen,
)

# after the repository's packages: benchmarks/serving.py must not shadow the service's package
sys.path.append(str(Path(__file__).resolve().parent))
import train_throughput as tt  # its CPU accounting

# The trainer's sparse_optimizer.name -> the FBGEMM optimizer TorchRec runs for it
# (torchrec.distributed.utils maps RowWiseAdagrad, torch.optim.Adagrad and SGD to these).
OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}
FP16_GRADIENTS = "rowwise_adagrad, fp16 gradients"


@dataclass(frozen=True)
class Settings:
    rows: int = 100_000
    batch: int = 4096
    dims: tuple[int, ...] = (16, 128)
    threads: tuple[int, ...] = (1, 2)
    warmup: int = 5
    steps: int = 30
    out: str = "benchmarks/results/sparse_update"


def build_tbe(optimizer: str, rows: int, dim: int) -> SplitTableBatchedEmbeddingBagsCodegen:
    """One CPU table with ``optimizer`` fused into its backward (lr 0.05, eps 1e-8)."""
    fp16 = optimizer == FP16_GRADIENTS
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=OPTIMIZERS["rowwise_adagrad" if fp16 else optimizer],
        learning_rate=0.05,
        eps=1e-8,
        output_dtype=SparseType.FP16 if fp16 else SparseType.FP32,
    )


def time_cell(
    tbe: SplitTableBatchedEmbeddingBagsCodegen, distinct: int, settings: Settings
) -> tuple[float, float]:
    """Median forward and backward seconds for ``settings.batch`` lookups of ``distinct`` rows."""
    indices = torch.arange(settings.batch, dtype=torch.int64) % distinct
    offsets = torch.arange(settings.batch + 1, dtype=torch.int64)
    forward, backward = [], []
    for step in range(settings.warmup + settings.steps):
        t0 = time.perf_counter()
        pooled = tbe(indices, offsets)
        t1 = time.perf_counter()
        pooled.backward(torch.ones_like(pooled))
        t2 = time.perf_counter()
        if step >= settings.warmup:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    return statistics.median(forward), statistics.median(backward)


def run(settings: Settings) -> dict:
    cells = []
    with tt._CpuWatch() as watch:
        for optimizer in (*OPTIMIZERS, FP16_GRADIENTS):
            for dim in settings.dims:
                for threads in settings.threads:
                    torch.set_num_threads(threads)
                    tbe = build_tbe(optimizer, settings.rows, dim)
                    times = {d: time_cell(tbe, d, settings) for d in (1, settings.batch)}
                    extra_rows = settings.batch - 1
                    cells.append(
                        {
                            "optimizer": optimizer,
                            "dim": dim,
                            "threads": threads,
                            "forward_ms": times[settings.batch][0] * 1e3,
                            "backward_ms_one_row": times[1][1] * 1e3,
                            "backward_ms": times[settings.batch][1] * 1e3,
                            "update_ns_per_row": (times[settings.batch][1] - times[1][1])
                            / extra_rows
                            * 1e9,
                        }
                    )
    others = tt._others_cpu_share({"ranks": [watch.result]})
    return {"settings": asdict(settings), "cells": cells, "others_cpu_share": others}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# FBGEMM's fused sparse-optimizer kernels on the CPU\n",
        (
            f"One table of {s['rows']:,} rows, {s['batch']:,} single-valued lookups a call; "
            f"median of {s['steps']} calls after {s['warmup']}. backward: the gradient and the "
            f"update of the rows read, for {s['batch']:,} distinct rows and for 1; per row: "
            f"their difference over {s['batch'] - 1:,} rows.\n"
        ),
        (
            "| sparse optimizer | dim | threads | forward ms | backward ms | backward ms, 1 row "
            "| update ns a row |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['optimizer']} | {c['dim']} | {c['threads']} | {c['forward_ms']:.2f} | "
            f"{c['backward_ms']:.2f} | {c['backward_ms_one_row']:.2f} | "
            f"{c['update_ns_per_row']:.0f} |"
        )
    others = result["others_cpu_share"]
    lines.append(
        "\nOther processes took "
        + (f"{others:.0%}" if others is not None else "an unknown share")
        + " of the CPUs during the run."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["dim"] == min(result["settings"]["dims"])]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{c['optimizer']}\n{c['threads']} thr" for c in cells]
    ax.bar(range(len(cells)), [c["update_ns_per_row"] for c in cells])
    ax.set_xticks(range(len(cells)), labels, fontsize=7)
    ax.set_ylabel("update ns a distinct row")
    ax.set_title(f"TBE backward on the CPU, dim {min(result['settings']['dims'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    parser.add_argument("--rows", type=int, default=defaults.rows)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--dims", type=int, nargs="+", default=list(defaults.dims))
    parser.add_argument("--threads", type=int, nargs="+", default=list(defaults.threads))
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--out", default=defaults.out)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.rows < args.batch:
        parser.error(
            f"need 2 <= --batch <= --rows (distinct rows read), got {args.batch}, {args.rows}"
        )
    if min(args.dims) < 1 or min(args.threads) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--dims, --threads and --steps must be positive, --warmup not negative")
    settings = Settings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    )
    result = run(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / "sparse_update.md").write_text(text)
    (out / "sparse_update.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "sparse_update.png")
    print(text)


if __name__ == "__main__":
    main()
