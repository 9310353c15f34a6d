"""The dense head's compute paths against eager float32, interleaved in one process.

``train_throughput.py --variants head_only head_only_compile ...`` runs each path in a worker
process of its own, one after another; on a machine others are using, their load changes
between the workers and the ratios with it. Here the same paths train side by side in one
process, from the same initial weights on the same input, taking turns every ``--block`` steps
(in a rotating order), so each cycle's ratio to ``head_only`` compares steps that saw the same
outside load. Run from the repository root::

    .venv/bin/python benchmarks/head_paths_ab.py --out benchmarks/results/head_precision

Writes ``<name>.json`` (every step time) and ``<name>.md`` (per path: the median
step, the ratio to ``head_only`` per cycle and their median, the first step, the last loss).
The oneDNN path's setting is process-wide, so it is switched on around that path's steps only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

# after the repository's packages: benchmarks/serving.py must not shadow the service's package
sys.path.append(str(Path(__file__).resolve().parent))
import train_throughput as tt

from schemas.host_memory import tune_host_allocator
from trainer.config import DenseOptimizerConfig
from trainer.distributed import dense_adam
from trainer.objectives import build_objective
from trainer.train_module import TrainModule

_ROOT = Path(__file__).resolve().parent.parent
_PATHS = ("head_only", "head_only_compile", "head_only_bf16", "head_only_onednn")


@contextmanager
def _onednn_matmuls() -> Iterator[None]:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def _head_only(settings: tt.Settings) -> tuple[TrainModule, torch.optim.Optimizer]:
    schema = tt.bench_schema(settings.tables, settings.table_scale)
    model = tt._model(schema, settings)
    model.sparse_arch = tt.FixedInputArch(tt._initial_pooled(schema, settings))
    module = TrainModule(model, build_objective("esmm"))
    return module, dense_adam(module.parameters(), DenseOptimizerConfig())


def _paths(settings: tt.Settings, names: list[str]) -> dict[str, tuple[Callable, object, Callable]]:
    """Each path's ``(module, optimizer, context of its steps)``, all from the same weights."""
    paths = {}
    for name in names:
        module, optimizer = _head_only(settings)
        context: Callable = nullcontext
        if name == "head_only_compile":
            module = torch.compile(module)
        elif name == "head_only_bf16":
            module = tt.BFloat16Autocast(module)
        elif name == "head_only_onednn":
            context = _onednn_matmuls
        paths[name] = (module, optimizer, context)
    return paths


def run(settings: tt.Settings, names: list[str], cycles: int, block: int, warmup: int) -> dict:
    """Warm every path up, then ``cycles`` cycles of ``block`` timed steps per path."""
    schema = tt.bench_schema(settings.tables, settings.table_scale)
    pool = tt.synthetic_batches(schema, settings.batch_size, settings.pool_batches, settings.seed)
    paths = _paths(settings, names)
    steps = {name: 0 for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}

    def step(name: str) -> float:
        module, optimizer, context = paths[name]
        batch = pool[steps[name] % len(pool)]
        steps[name] += 1
        with context():
            elapsed, loss = tt.timed_step(module, optimizer, batch)
        losses[name].append(loss.item())
        return elapsed

    warmup_s = {name: [step(name) for _ in range(warmup)] for name in names}
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    with tt._CpuWatch() as watch:
        for cycle in range(cycles):
            for name in names[cycle % len(names) :] + names[: cycle % len(names)]:
                times[name].append([step(name) for _ in range(block)])
    return {
        "settings": {"batch_size": settings.batch_size, "cycles": cycles, "block": block},
        "warmup_s": warmup_s,
        "step_s": times,
        "last_loss": {name: losses[name][-1] for name in names},
        "threads": torch.get_num_threads(),
        "others_cpu_share": tt._others_cpu_share({"ranks": [watch.result]}),
    }


def markdown(result: dict) -> str:
    """Per path: median step, ratio to head_only per cycle (median, min, max), first step."""
    ref = [statistics.median(block) for block in result["step_s"]["head_only"]]
    lines = [
        (
            "| path | median step (ms) | x head_only, median of cycles | min-max over cycles | "
            "first step (s) | last loss |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, blocks in result["step_s"].items():
        ratios = [r / statistics.median(b) for r, b in zip(ref, blocks)]  # speed: ref time / time
        lines.append(
            f"| {name} | {1000 * statistics.median(t for b in blocks for t in b):.1f} | "
            f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
            f"{result['warmup_s'][name][0]:.1f} | {result['last_loss'][name]:.5f} |"
        )
    share = result["others_cpu_share"]
    lines.append(
        f"\n{len(ref)} cycles of {result['settings']['block']} steps per path, batch "
        f"{result['settings']['batch_size']}, {result['threads']} threads; other processes took "
        f"{'?' if share is None else f'{share:.0%}'} of the CPUs."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=_PATHS, default=list(_PATHS))
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--block", type=int, default=5, help="steps per path per cycle")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=tt.Settings().batch_size)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads (0: torch's default); 1 is far less stretched by a busy machine",
    )
    parser.add_argument("--name", default="head_paths_ab", help="output file name, no suffix")
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.paths[0] != "head_only":
        parser.error("--paths must start with head_only, the reference")
    tune_host_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        tt.Settings(batch_size=args.batch_size), args.paths, args.cycles, args.block, args.warmup
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / f"{args.name}.md").write_text(
        "# The dense head's compute paths, interleaved\n\n"
        f"Command: `.venv/bin/python benchmarks/head_paths_ab.py {' '.join(argv or sys.argv[1:])}`"
        f"\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
