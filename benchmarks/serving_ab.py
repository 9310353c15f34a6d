"""Two versions of the service against each other, their load cells taking turns.

``serving.py`` measures one version; on a machine whose host slows it by a third from one hour
to the next, two of its runs do not compare. Here the service of a base revision (checked out
into a temporary git worktree) and the service of the working tree run side by side on the same
model, each idle while the other is measured, and every cell runs ``--pairs`` times against
each, in alternating order, so each pair saw the same outside load. With ``--restart`` every
run starts a service of its own instead, which samples what varies from one start to the next
(such as how the C allocator's heaps settle) instead of keeping one start's draw. With
``--in-process`` no service runs: each run is a fresh process that imports one version's
packages and times, in 50 ms slices taking turns (``serving.py``'s ``InProcess``), the raw model
and each cell's whole path from the request bytes (the cells' concurrency and workers do not
apply); the ratio that matters there is each run's path over its own raw model. Run from the
repository root::

    .venv/bin/python benchmarks/serving_ab.py --base bb3bc0e --name small_on_loop
    .venv/bin/python benchmarks/serving_ab.py --base 4f27091 --name kept_memory \
        --cells rank:256:32:1 --precision int8 --restart
    .venv/bin/python benchmarks/serving_ab.py --base 32f06bd --name typed_ids_in_process \
        --in-process --cells rank:256:1:1 --precision int8 --pairs 3 --duration 2

Writes ``results/serving_ab/<name>.{md,json}``: per cell (form, rows per request, concurrency,
worker processes), each version's median requests/s, p50 / p99 latency and page faults per scored
row over the pairs, the median of the per-pair ratios (this tree over the base), and the largest
CPU share other processes took; a cell whose pairs saw other processes above 10 % of the CPUs reads
"inconclusive". In process: each version's median rows/s of the raw model and of the path, the
path over the raw model (median of runs), and the per-pair ratio of the paths' rows/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path


def _load_serving_benchmark():
    """benchmarks/serving.py, the load generator and helpers, under a name of its own: imported as
    ``serving`` it would shadow the service's package for everything imported after it."""
    script = Path(__file__).resolve().parent / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = sys.modules.get("serving_benchmark") or _load_serving_benchmark()

REPO = bench.REPO


@contextmanager
def checkout(revision: str):
    """A detached git worktree of ``revision``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ctcvr-ab-") as tmp:
        path = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), revision],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)],
                check=False,
                cwd=REPO,
                capture_output=True,
            )


def parse_cell(text: str) -> tuple[str, int, int, int]:
    """``form:rows:concurrency:workers``, e.g. ``rank:1:8:1``."""
    form, rows, clients, workers = text.split(":")
    if form not in bench.FORMS:
        raise argparse.ArgumentTypeError(f"unknown form {form!r}; one of {sorted(bench.FORMS)}")
    return form, int(rows), int(clients), int(workers)


def summarise(cell: tuple[str, int, int, int], runs: dict[str, list[dict]]) -> dict:
    base, this = runs["base"], runs["this tree"]
    rates = {k: [r["rows_per_s"] / cell[1] for r in v] for k, v in runs.items()}
    others = max(r["cpu"]["others"] or 0.0 for v in runs.values() for r in v)
    return {
        "form": cell[0],
        "rows": cell[1],
        "concurrency": cell[2],
        "workers": cell[3],
        **{
            f"{k} {m}": statistics.median(r[key] for r in v)
            for k, v in runs.items()
            for m, key in (("p50_ms", "p50_ms"), ("p99_ms", "p99_ms"), ("faults", "faults_per_row"))
        },
        **{f"{k} requests_per_s": statistics.median(v) for k, v in rates.items()},
        "ratio": statistics.median(t / b for t, b in zip(rates["this tree"], rates["base"])),
        "ratios": [t / b for t, b in zip(rates["this tree"], rates["base"])],
        "errors": sum(r["errors"] for r in base + this),
        "others": others,
    }


def summarise_in_process(cell: tuple[str, int, int, int], runs: dict[str, list[dict]]) -> dict:
    """One cell of ``--in-process`` runs: ``runs`` maps each version to its runs, each run the
    mode dicts of ``InProcess.measure`` (``mode``, ``rows``, ``rows_per_s``, ``others_cpu``)."""
    form, size = cell[0], cell[1]

    def rate(run: list[dict], mode: str) -> float:
        return next(m["rows_per_s"] for m in run if m["mode"] == mode and m["rows"] == size)

    path = {k: [rate(r, f"in-process {form}") for r in v] for k, v in runs.items()}
    raw = {k: [rate(r, "model") for r in v] for k, v in runs.items()}
    ratios = [t / b for t, b in zip(path["this tree"], path["base"], strict=True)]
    return {
        "form": form,
        "rows": size,
        **{f"{k} raw_rows_per_s": statistics.median(v) for k, v in raw.items()},
        **{f"{k} rows_per_s": statistics.median(v) for k, v in path.items()},
        **{
            f"{k} vs_raw": statistics.median(p / r for p, r in zip(path[k], raw[k], strict=True))
            for k in runs
        },
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "others": max(m["others_cpu"] or 0.0 for v in runs.values() for r in v for m in r),
    }


def markdown_in_process(rows: list[dict], base: str, settings: dict) -> str:
    lines = [
        f"# The in-process path of the working tree against {base}, runs taking turns",
        "",
        (
            "| form | rows | raw model rows/s base | raw model rows/s this | path rows/s base | path "
            "rows/s this | path / raw model base | path / raw model this | x base (median of "
            "pairs) | others (max) | verdict |"
        ),
        "| --- |" + " ---: |" * 9 + " --- |",
    ]
    for r in rows:
        busy = r["others"] > bench.BUSY_SHARE
        lines.append(
            f"| {r['form']} | {r['rows']} | {r['base raw_rows_per_s']:,.0f} "
            f"| {r['this tree raw_rows_per_s']:,.0f} | {r['base rows_per_s']:,.0f} "
            f"| {r['this tree rows_per_s']:,.0f} | {r['base vs_raw']:.3f}x "
            f"| {r['this tree vs_raw']:.3f}x "
            f"| {r['ratio']:.3f}x ({min(r['ratios']):.3f}-{max(r['ratios']):.3f}) "
            f"| {r['others']:.0%} | {'inconclusive: others above 10 %' if busy else 'measured'} |"
        )
    lines += [
        "",
        (
            f"{settings['pairs']} pairs of runs, base first in even pairs; each run a fresh process "
            "importing one version's packages, timing the raw model (`ScoringModel.predict` on "
            "the impressions already mapped) and each form's whole path from the request bytes in "
            f"50 ms slices taking turns for {settings['duration']} s each. Model: the demo "
            f"architecture with random weights (as `serving.py`), {settings['precision']} tables, "
            "1 torch thread."
        ),
    ]
    return "\n".join(lines) + "\n"


def in_process_run(repo: Path, model: Path, bodies: Path, seconds: float) -> list[dict]:
    """``InProcess.measure`` in a fresh process importing the packages of checkout ``repo``.

    Raises:
        RuntimeError: the child failed (its stderr's tail in the message).
    """
    command = [sys.executable, __file__, _MEASURE, str(repo), str(model), str(bodies), str(seconds)]
    proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run of {repo} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_MEASURE = "--measure-in-process"


def _measure_in_process(repo: str, model: str, bodies: str, seconds: str) -> int:
    """The child of :func:`in_process_run`: the checkout's packages shadow this tree's."""
    sys.path.insert(0, repo)
    spec = json.loads(Path(bodies).read_text())
    impressions = {int(size): [b.encode() for b in pool] for size, pool in spec["rows"].items()}
    forms = {(form, int(size)): [b.encode() for b in pool] for form, size, pool in spec["forms"]}
    meter = bench.InProcess(Path(model), impressions, forms, threads=1)
    import serving

    if Path(serving.__file__).resolve().parents[1] != Path(repo).resolve():
        raise RuntimeError(f"imported {serving.__file__}, not the checkout {repo}")
    print(json.dumps(meter.measure(float(seconds), 0)))
    return 0


def markdown(rows: list[dict], base: str, settings: dict) -> str:
    lines = [
        f"# The service of the working tree against {base}, cells taking turns",
        "",
        (
            "| form | rows | concurrency | workers | req/s base | req/s this | x base (median of "
            "pairs) | p99 ms base | p99 ms this | p50 ms base | p50 ms this | page faults per "
            "row base | page faults per row this | errors | others (max) | verdict |"
        ),
        "| --- |" + " ---: |" * 14 + " --- |",
    ]
    for r in rows:
        busy = r["others"] > bench.BUSY_SHARE
        lines.append(
            f"| {r['form']} | {r['rows']} | {r['concurrency']} | {r['workers']} "
            f"| {r['base requests_per_s']:,.0f} | {r['this tree requests_per_s']:,.0f} "
            f"| {r['ratio']:.2f}x ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) "
            f"| {r['base p99_ms']:.2f} | {r['this tree p99_ms']:.2f} "
            f"| {r['base p50_ms']:.2f} | {r['this tree p50_ms']:.2f} "
            f"| {r['base faults']:.3f} | {r['this tree faults']:.3f} | {r['errors']} "
            f"| {r['others']:.0%} | {'inconclusive: others above 10 %' if busy else 'measured'} |"
        )
    lines += [
        "",
        (
            f"{settings['pairs']} pairs per cell, {settings['duration']} s measured after "
            f"{settings['warmup']} s warmup per run; the two versions' runs alternate (base first "
            "in even pairs), "
            + (
                "each run against a service started for it"
                if settings["restart"]
                else "each version's service started once"
            )
            + ". Requests/s, p50, p99 and page faults per row are medians over the pairs; latency "
            "from the first byte sent to the last byte received. Model: the demo architecture "
            f"with random weights (as `serving.py`), {settings['precision']} tables; service "
            "defaults, 1 torch thread."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--name", required=True, help="results/serving_ab/<name>.{md,json}")
    parser.add_argument(
        "--cells",
        type=parse_cell,
        nargs="+",
        default=[parse_cell(c) for c in ("rank:1:1:1", "rank:1:8:1", "rank:1:8:2", "rows:1:8:1")]
        + [parse_cell("rank:256:32:1")],
        help="form:rows:concurrency:workers",
    )
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--precision", choices=("float", "int8"), default="float")
    parser.add_argument(
        "--restart", action="store_true", help="start a service for every run (default: once)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="time the raw model and each cell's path in process, no service",
    )
    parser.add_argument("--out", default="benchmarks/results/serving_ab")
    args = parser.parse_args(argv)
    settings = bench.Settings(duration=args.duration, warmup=args.warmup)
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctcvr-ab-") as tmp, checkout(args.base) as base:
        work = Path(tmp)
        rows, schema_path = bench._request_rows(work, 20_000, None)
        model = bench._export(bench._demo_run(work, schema_path), work / "model", args.precision)
        if model is None:
            parser.error(f"this tree's exporter cannot write {args.precision} tables")
        from schemas import load_schema

        context = bench.context_names(load_schema(schema_path))
        files = {}
        for form, size, _, _ in args.cells:
            files[form, size] = work / f"bodies_{form}_{size}.jsonl"
            pool = bench.request_bodies(rows, size, 64, form, context)
            files[form, size].write_text("\n".join(b.decode() for b in pool) + "\n")
        repos = {"base": base, "this tree": REPO}
        if args.in_process:
            results = _compare_in_process(args, repos, model, rows, context, work)
            return _write(args, results, markdown_in_process, out)
        results = []
        with ExitStack() as stack:
            kept = {
                (name, count): stack.enter_context(
                    bench.service(model, work / f"{name}-{count}.log", count, 1, repo=repo)
                )
                for name, repo in repos.items()
                for count in sorted({c[3] for c in args.cells})
                if not args.restart
            }

            def run(name: str, cell: tuple[str, int, int, int]) -> dict:
                form, size, clients, count = cell
                with ExitStack() as own:
                    url, pid = kept.get((name, count)) or own.enter_context(
                        bench.service(
                            model, work / f"{name}-{count}.log", count, 1, repo=repos[name]
                        )
                    )
                    return bench._cell(
                        url, pid, files[form, size], form, size, clients, count, settings
                    )

            for cell in args.cells:
                form, size, clients, count = cell
                runs: dict[str, list[dict]] = {"base": [], "this tree": []}
                for pair in range(args.pairs):
                    order = ["base", "this tree"] if pair % 2 == 0 else ["this tree", "base"]
                    for name in order:
                        runs[name].append(run(name, cell))
                summary = summarise(cell, runs)
                results.append(summary)
                print(
                    f"[ab] {form} {size} rows c{clients} w{count}: {summary['ratio']:.2f}x req/s, "
                    f"p99 {summary['base p99_ms']:.1f} -> {summary['this tree p99_ms']:.1f} ms, "
                    f"others {summary['others']:.0%}",
                    flush=True,
                )
    return _write(args, results, markdown, out)


def _compare_in_process(
    args: argparse.Namespace, repos: dict[str, Path], model: Path, rows, context, work: Path
) -> list[dict]:
    sizes = sorted({size for _, size, _, _ in args.cells})
    spec = {
        "rows": {
            size: [b.decode() for b in bench.request_bodies(rows, size, 64, "rows", context)]
            for size in sizes
        },
        "forms": [
            [form, size, [b.decode() for b in bench.request_bodies(rows, size, 64, form, context)]]
            for form, size in sorted({(c[0], c[1]) for c in args.cells})
        ],
    }
    bodies = work / "in_process_bodies.json"
    bodies.write_text(json.dumps(spec))
    runs: dict[str, list[list[dict]]] = {"base": [], "this tree": []}
    for pair in range(args.pairs):
        for name in ["base", "this tree"] if pair % 2 == 0 else ["this tree", "base"]:
            runs[name].append(in_process_run(repos[name], model, bodies, args.duration))
    results = [summarise_in_process(cell, runs) for cell in args.cells]
    for r in results:
        print(
            f"[ab] in process {r['form']} {r['rows']} rows: {r['ratio']:.3f}x rows/s; path / raw "
            f"model {r['base vs_raw']:.3f}x -> {r['this tree vs_raw']:.3f}x",
            flush=True,
        )
    return results


def _write(args: argparse.Namespace, results: list[dict], render, out: Path) -> int:
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.base],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    record = {"base": revision, "settings": vars(args) | {"cells": args.cells}, "cells": results}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    text = render(results, revision, {"pairs": args.pairs, **vars(args)})
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == _MEASURE:
        sys.exit(_measure_in_process(*sys.argv[2:]))
    sys.exit(main())
