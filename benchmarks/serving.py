"""Serving benchmark: the HTTP service under load against the raw model called in-process.

Run from the repository root (about 4 minutes on 2 idle CPU cores with the defaults)::

    .venv/bin/python benchmarks/serving.py
    .venv/bin/python benchmarks/serving.py --wait-idle 300        # a shared machine
    .venv/bin/python benchmarks/serving.py --model-dir runs/demo/model --duration 8 --rounds 3
    CTCVR_BATCH_MAX_WAIT_MS=0 .venv/bin/python benchmarks/serving.py --forms columns --out /tmp/bench

Outputs, under ``--out`` (default ``benchmarks/results``):

- ``serving.md``: per request form (``rows``: ``POST /v1/score``, one object per impression;
  ``columns``: ``POST /v1/score/columns``, one list per feature), request size (1 and 256 rows)
  and concurrency (1, 8, 32): rows/s and requests/s (median over rounds, with min and max),
  p50 / p99 latency, errors, and the mean rows per model call the service ran (micro-batching);
  then the raw in-process rows/s for the same batches, the settings, the load average, and each
  target met or missed (for each form). The same table is printed.
- ``serving.png``: rows/s per cell against the raw model, and p50 / p99 latency.
- ``serving.json``: the resolved settings, every round's figures (not each request's latency)
  and the raw measurements.

What runs:

1. **Model.** ``--model-dir``, or else the demo architecture (the ``model`` section of
   ``trainer/configs/demo.yaml``: 4 experts of [64], towers [32]) over the simulator's schema
   (20 sparse features incl. strings and a list, 2 dense), randomly initialised, checkpointed with
   DCP and written by ``trainer.export`` (speed does not depend on what the weights learnt).
2. **Requests.** ``--sim-rows`` impressions from the simulator (seed 0) as raw JSON values (ints,
   strings, lists, nulls); a pool of distinct pre-encoded 1-row and 256-row bodies per form (the
   same impressions in both forms), sent in turn.
3. **Service.** ``python -m serving`` on a free loopback port with its default settings (any
   ``CTCVR_*`` variable in the environment passes through).
4. **Load.** Another process (this file with ``--worker load``) keeps ``C`` requests in flight on
   ``C`` keep-alive connections (closed loop: each sends its next request when the last one is
   answered) for ``--warmup`` + ``--duration`` seconds, and times each request from the first
   byte sent to the last byte received. Only requests sent after the warmup count. An error is a
   failed connection, a status other than 200, or a response without exactly one score per row.
   ``--wait-idle`` first waits, before each round, for the load average to fall below 1.
5. **Raw, in-process,** in every round before the service cells (the service idle meanwhile),
   with the service's torch thread count, so that both are measured under the same outside load:
   ``model``: ``ScoringModel.predict`` on the same batches, already mapped to ids;
   ``in-process scorer (form)``: ``Scorer.prepare(body, form)`` (validation + hashing) then
   ``predict``, i.e. everything the service does but HTTP and batching.

Targets on the 2-core machine: zero errors; p99 under 50 ms for 1-row requests at concurrency 8;
256-row requests reach at least half the raw model's rows/s (256-row batches), reported for each
request form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(
    REPO
):  # run as a script from anywhere: the repository's `serving`, not this file
    sys.path.insert(0, str(REPO))

__all__ = ["Settings", "main"]


@dataclass
class Settings:
    model_dir: str | None = None  # served model; None: the demo architecture, random weights
    out: str = "benchmarks/results"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])  # requests in flight
    rows: list[int] = field(default_factory=lambda: [1, 256])  # rows per request
    duration: float = 5.0  # measured seconds per cell and round
    warmup: float = 1.0  # seconds per cell before measuring
    forms: list[str] = field(default_factory=lambda: list(FORMS))  # request forms (routes below)
    rounds: int = 2  # every cell runs once per round; rounds alternate to spread outside load
    sim_rows: int = 20_000  # simulated impressions the request rows come from
    bodies: int = 64  # distinct request bodies per size and form
    wait_idle: float = 0.0  # before each round, wait up to this many seconds for load average < 1
    torch_threads: int = int(os.environ.get("CTCVR_TORCH_THREADS", "1"))  # service and raw runs


FORMS = {"rows": "/v1/score", "columns": "/v1/score/columns"}  # request form: its route


# Load generator (runs in its own process) -------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
    if length is None:
        raise ValueError("response without Content-Length")
    return status, await reader.readexactly(length)


def _scored_rows(payload: bytes, form: str) -> int:
    """Scores in a 200 response: one ``"pctr"`` key per row object, or the ``pctr`` list's length."""
    if form == "rows":
        return payload.count(b'"pctr"')
    import orjson  # the service's own JSON library: a check as cheap as counting keys

    return len(orjson.loads(payload)["pctr"])


async def _connection(
    host: str,
    port: int,
    form: str,
    bodies: list[bytes],
    rows: int,
    offset: int,
    measure_from: float,
    stop_at: float,
    out: dict,
) -> None:
    reader = writer = None
    i = offset
    while time.perf_counter() < stop_at:
        body = bodies[i % len(bodies)]
        i += 1
        request = (
            f"POST {FORMS[form]} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, payload = await _read_response(reader)
            ok = status == 200 and _scored_rows(payload, form) == rows
        except (OSError, ValueError, asyncio.IncompleteReadError):
            ok, writer = False, None
        end = time.perf_counter()
        if start >= measure_from:
            if ok:
                out["latencies"].append(end - start)
            else:
                out["errors"] += 1
            out["last"] = end
    if writer is not None:
        writer.close()


async def _load(
    url: str,
    form: str,
    bodies: list[bytes],
    rows: int,
    concurrency: int,
    warmup: float,
    duration: float,
) -> dict:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + duration
    out: dict = {"latencies": [], "errors": 0, "last": measure_from}
    await asyncio.gather(
        *(
            _connection(host, int(port), form, bodies, rows, k * 7, measure_from, stop_at, out)
            for k in range(concurrency)
        )
    )
    out["seconds"] = max(out["last"] - measure_from, 1e-9)
    return out


def load_worker(args: argparse.Namespace) -> None:
    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines()]
    result = asyncio.run(
        _load(
            args.url, args.form, bodies, args.request_rows, args.clients, args.warmup, args.duration
        )
    )
    json.dump(result, sys.stdout)


# Orchestration ----------------------------------------------------------------------------------


def _demo_model(work: Path, schema_path: Path) -> Path:
    """The demo architecture over the simulator schema, random weights, through the real export."""
    import torch
    from omegaconf import OmegaConf

    from schemas import load_schema
    from trainer.builders import build_model
    from trainer.checkpoint import CheckpointMeta, save_model_checkpoint
    from trainer.config import load_config, to_dict
    from trainer.export import export_run
    from trainer.objectives import build_objective, model_structure
    from trainer.run_dir import RunDir
    from trainer.train_module import TrainModule

    demo = OmegaConf.load(REPO / "trainer/configs/demo.yaml")
    run = work / "run"
    config = load_config(
        REPO / "trainer/configs/demo.yaml", [f"output_dir={run}", f"data.train={work}"]
    )
    schema = load_schema(schema_path)
    run_dir = RunDir(run)
    run_dir.save_config(config)
    run_dir.save_schema(schema)
    torch.manual_seed(0)
    objective = build_objective(config.objective.name, **config.objective.params)
    module = TrainModule(
        build_model(
            schema, config.model, structure=model_structure(objective), embedding_device="cpu"
        ),
        objective,
    )
    save_model_checkpoint(run_dir, module, CheckpointMeta(0, schema.fingerprint(), to_dict(config)))
    print(f"[bench] demo model: {OmegaConf.to_container(demo.model)}", flush=True)
    export_run(run, work / "model", version="bench-demo-random", log=None)
    return work / "model"


def _request_rows(work: Path, sim_rows: int, schema_path: Path | None) -> tuple[list[dict], Path]:
    import pyarrow.parquet as pq

    from schemas import load_schema
    from schemas.layout import SCHEMA_FILE, TRAIN_SPLIT

    data = work / "sim"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.data",
            "simulate",
            "--rows",
            str(sim_rows),
            "--out",
            str(data),
            "--seed",
            "0",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    schema = load_schema(schema_path or data / SCHEMA_FILE)
    columns = schema.sparse_names + schema.dense_names
    rows = [
        row
        for f in sorted((data / TRAIN_SPLIT).glob("*.parquet"))
        for row in pq.read_table(f, columns=columns).to_pylist()
    ]
    return rows, data / SCHEMA_FILE


def _bodies(rows: list[dict], size: int, count: int, form: str) -> list[bytes]:
    """``count`` request bodies of ``size`` impressions each, in ``form``."""
    out = []
    for k in range(count):
        start = (k * size) % max(len(rows) - size, 1)
        chunk = rows[start : start + size]
        if form == "columns":
            body = {"columns": {name: [row.get(name) for row in chunk] for name in chunk[0]}}
        else:
            body = {"rows": chunk}
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


def _wait_for_idle(timeout_s: float) -> None:
    """Wait, at most ``timeout_s``, for the 1-minute load average to fall below 1 (other jobs)."""
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5.0)
    print(f"[bench] load average {os.getloadavg()[0]:.2f}", flush=True)


def _batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = float(re.search(r"^ctcvr_batch_rows_sum (\S+)$", text, re.MULTILINE)[1])  # type: ignore[index]
    count = float(re.search(r"^ctcvr_batch_rows_count (\S+)$", text, re.MULTILINE)[1])  # type: ignore[index]
    return total, count


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _Raw:
    """The raw in-process measurements, taken once per round (with the service idle), so that
    each round's service cells are compared with the model's rate at about the same time."""

    def __init__(
        self, model_dir: Path, bodies: dict[tuple[str, int], list[bytes]], threads: int
    ) -> None:
        import numpy as np
        import torch

        from serving.artifact import load_artifact
        from serving.scorer import RequestForm, Scorer

        torch.set_num_threads(threads)
        self.scorer = Scorer(load_artifact(model_dir), max_rows=max(size for _, size in bodies))
        self.bodies, self.form = bodies, RequestForm
        self.features = {}
        for size in sorted({size for _, size in bodies}):
            forms = [form for form, s in bodies if s == size]
            self.features[size] = [
                self.scorer.prepare(b, RequestForm(forms[0])) for b in bodies[forms[0], size]
            ]
            for form in forms[1:]:  # the forms carry the same impressions: the same model inputs
                same = [self.scorer.prepare(b, RequestForm(form)) for b in bodies[form, size]]
                assert all(
                    np.array_equal(self.scorer.predict(a), self.scorer.predict(b))
                    for a, b in zip(self.features[size], same)
                )

    def measure(self, seconds: float, round_: int) -> list[dict]:
        scorer, out = self.scorer, []

        def rate(mode: str, size: int, call) -> None:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                call(calls)
                calls += 1
            elapsed = time.perf_counter() - start
            out.append(
                {
                    "round": round_,
                    "mode": mode,
                    "rows": size,
                    "rows_per_s": calls * size / elapsed,
                    "ms_per_call": 1000 * elapsed / calls,
                    "loadavg": os.getloadavg()[0],
                }
            )

        for size, features in self.features.items():
            rate("model", size, lambda k: scorer.predict(features[k % len(features)]))  # noqa: B023
            for form in [form for form, s in self.bodies if s == size]:
                pool, request_form = self.bodies[form, size], self.form(form)
                rate(
                    f"in-process scorer ({form})",
                    size,
                    lambda k, pool=pool, request_form=request_form: scorer.predict(
                        scorer.prepare(pool[k % len(pool)], request_form)
                    ),
                )
        return out


def run(settings: Settings) -> dict:
    out_dir = REPO / settings.out if not Path(settings.out).is_absolute() else Path(settings.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[bench] settings: {json.dumps(asdict(settings))}", flush=True)
    from schemas.artifact import SCHEMA_FILE
    from tests.serving.artifacts import live_server

    with tempfile.TemporaryDirectory(prefix="ctcvr-bench-") as tmp:
        work = Path(tmp)
        model_dir = Path(settings.model_dir) if settings.model_dir else None
        rows, schema_path = _request_rows(
            work, settings.sim_rows, model_dir / SCHEMA_FILE if model_dir else None
        )
        if model_dir is None:
            model_dir = _demo_model(work, schema_path)
        bodies = {
            (form, size): _bodies(rows, size, settings.bodies, form)
            for form in settings.forms
            for size in settings.rows
        }
        files = {}
        for (form, size), pool in bodies.items():
            files[form, size] = work / f"bodies_{form}_{size}.jsonl"
            files[form, size].write_text("\n".join(b.decode() for b in pool) + "\n")
        load_before = os.getloadavg()
        cells: dict[tuple[str, int, int], list[dict]] = {}
        raw_rounds: list[dict] = []
        env = {"CTCVR_TORCH_THREADS": str(settings.torch_threads)}
        raw_meter = _Raw(model_dir, bodies, settings.torch_threads)
        with live_server(model_dir, work / "server.log", env=env) as url:
            for round_ in range(settings.rounds):
                if settings.wait_idle > 0:
                    _wait_for_idle(settings.wait_idle)
                for r in raw_meter.measure(
                    settings.duration, round_
                ):  # the service is idle meanwhile
                    raw_rounds.append(r)
                    print(
                        f"[bench] round {round_} raw {r['mode']:<27} {r['rows']:>3} rows: {r['rows_per_s']:>10,.0f} rows/s "
                        f"({r['ms_per_call']:.3f} ms per call)  load {r['loadavg']:.2f}",
                        flush=True,
                    )
                for form, size in bodies:
                    for clients in settings.concurrency:
                        cell = _cell(url, files[form, size], form, size, clients, settings)
                        cell["round"] = round_
                        cells.setdefault((form, size, clients), []).append(cell)
                        print(
                            f"[bench] round {round_} {form:<7} rows {size:>3} concurrency {clients:>2}: "
                            f"{cell['rows_per_s']:>9,.0f} rows/s  p50 {cell['p50_ms']:6.2f} ms  "
                            f"p99 {cell['p99_ms']:6.2f} ms  errors {cell['errors']}  "
                            f"batch {cell['mean_batch_rows']:.1f} rows  load {cell['loadavg']:.2f}",
                            flush=True,
                        )
        load_after = os.getloadavg()
        manifest = json.loads((model_dir / "manifest.json").read_text())
    raw_summary = _summarise_raw(raw_rounds)
    summary = _summarise(cells, raw_summary)
    report = {
        "settings": asdict(settings),
        "model": {"version": manifest["version"], **manifest["model"]},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "summary": summary,
        "raw": raw_summary,
        "raw_rounds": raw_rounds,
        "rounds": [
            {k: v for k, v in c.items() if k != "latencies_ms"} for cs in cells.values() for c in cs
        ],
    }
    (out_dir / "serving.json").write_text(json.dumps(report, indent=1))
    markdown = _markdown(report)
    (out_dir / "serving.md").write_text(markdown)
    _plot(summary, raw_summary, out_dir / "serving.png")
    print(markdown)
    return report


def _cell(url: str, bodies: Path, form: str, size: int, clients: int, settings: Settings) -> dict:
    """One load-generator run against the service: its rates, latencies and batching."""
    loadavg = os.getloadavg()[0]
    before = _batch_stats(url)
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            "load",
            "--url",
            url,
            "--form",
            form,
            "--bodies",
            str(bodies),
            "--request-rows",
            str(size),
            "--clients",
            str(clients),
            "--warmup",
            str(settings.warmup),
            "--duration",
            str(settings.duration),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    after = _batch_stats(url)
    load = json.loads(result.stdout)
    lat = load["latencies"]
    return {
        "form": form,
        "rows": size,
        "concurrency": clients,
        "requests": len(lat),
        "errors": load["errors"],
        "seconds": load["seconds"],
        "requests_per_s": len(lat) / load["seconds"],
        "rows_per_s": len(lat) * size / load["seconds"],
        "p50_ms": 1000 * _percentile(lat, 0.50),
        "p99_ms": 1000 * _percentile(lat, 0.99),
        "latencies_ms": [round(1000 * x, 3) for x in lat],
        "mean_batch_rows": (after[0] - before[0]) / max(after[1] - before[1], 1),
        "loadavg": loadavg,
    }


def _summarise_raw(rounds: list[dict]) -> list[dict]:
    """Per mode and batch size: the median rate over rounds, with min and max."""
    out = []
    for mode, size in dict.fromkeys((r["mode"], r["rows"]) for r in rounds):
        rates = [r["rows_per_s"] for r in rounds if (r["mode"], r["rows"]) == (mode, size)]
        median = statistics.median(rates)
        out.append(
            {
                "mode": mode,
                "rows": size,
                "rows_per_s": median,
                "rows_per_s_min": min(rates),
                "rows_per_s_max": max(rates),
                "ms_per_call": 1000 * size / median,
            }
        )
    return out


def _summarise(cells: dict[tuple[str, int, int], list[dict]], raw: list[dict]) -> list[dict]:
    raw_model = {r["rows"]: r["rows_per_s"] for r in raw if r["mode"] == "model"}
    out = []
    for (form, size, clients), rounds in cells.items():
        latencies = [x for c in rounds for x in c["latencies_ms"]]
        rates = [c["rows_per_s"] for c in rounds]
        median = statistics.median(rates)
        out.append(
            {
                "form": form,
                "rows": size,
                "concurrency": clients,
                "rows_per_s": median,
                "rows_per_s_min": min(rates),
                "rows_per_s_max": max(rates),
                "requests_per_s": median / size,
                "p50_ms": _percentile(latencies, 0.50),
                "p99_ms": _percentile(latencies, 0.99),
                "errors": sum(c["errors"] for c in rounds),
                "requests": sum(c["requests"] for c in rounds),
                "mean_batch_rows": statistics.mean(c["mean_batch_rows"] for c in rounds),
                "vs_raw_model": median / raw_model[size] if size in raw_model else None,
                "loadavg": statistics.mean(c["loadavg"] for c in rounds),
            }
        )
    return out


def _markdown(report: dict) -> str:
    s, summary, raw = report["settings"], report["summary"], report["raw"]
    lines = [
        "# Serving: HTTP service vs raw model in-process",
        "",
        (
            "| form | rows/request | concurrency | rows/s (median) | min..max | requests/s | p50 ms | p99 ms | errors "
            "| rows per model call | vs raw model | load avg |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary:
        lines.append(
            f"| {r['form']} | {r['rows']} | {r['concurrency']} | {r['rows_per_s']:,.0f} "
            f"| {r['rows_per_s_min']:,.0f}..{r['rows_per_s_max']:,.0f} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['errors']} | {r['mean_batch_rows']:.1f} | {r['vs_raw_model']:.2f}x | {r['loadavg']:.2f} |"
        )
    lines += [
        "",
        "Raw, in-process, the same batches (no HTTP, no batching), measured in every round:",
        "",
        "| mode | rows/call | rows/s (median) | min..max | ms/call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in raw:
        lines.append(
            f"| {r['mode']} | {r['rows']} | {r['rows_per_s']:,.0f} | {r['rows_per_s_min']:,.0f}.."
            f"{r['rows_per_s_max']:,.0f} | {r['ms_per_call']:.3f} |"
        )
    errors = sum(r["errors"] for r in summary)

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines += ["", "Targets:", "", f"- zero errors: {errors} errors: {mark(errors == 0)}"]
    for form in s["forms"]:
        p99 = [
            r["p99_ms"]
            for r in summary
            if r["form"] == form and r["rows"] == 1 and r["concurrency"] == 8
        ]
        if p99:
            lines.append(
                f"- p99 < 50 ms for 1-row requests at concurrency 8, {form}: {p99[0]:.2f} ms: {mark(p99[0] < 50)}"
            )
    for form in s["forms"]:
        best = max(
            (r for r in summary if r["form"] == form and r["rows"] == 256),
            key=lambda r: r["rows_per_s"],
            default=None,
        )
        if best is not None:
            lines.append(
                f"- 256-row requests >= 0.5x the raw model's rows/s, {form}: best {best['vs_raw_model']:.2f}x "
                f"({best['rows_per_s']:,.0f} rows/s at concurrency {best['concurrency']}): {mark(best['vs_raw_model'] >= 0.5)}"
            )
    lines += [
        "",
        (
            f"Forms: `rows` is `POST /v1/score` (one object per impression), `columns` is `POST /v1/score/columns` "
            "(one list per feature); the same impressions in both. "
            f"Model `{report['model']['version']}`: {report['model']['num_experts']} experts of "
            f"{report['model']['expert_sizes']}, towers {report['model']['tower_sizes']}, "
            f"{len(report['model']['tables'])} tables. {s['duration']:g} s measured after {s['warmup']:g} s warmup "
            f"per cell, {s['rounds']} round(s); latency from first byte sent to last byte received, p50/p99 over "
            f"all rounds; torch threads {s['torch_threads']} (service and raw). Service settings: defaults "
            "unless set in the environment. "
            f"{report['cpus']} CPUs, load average {report['loadavg_before'][0]:.2f} before and "
            f"{report['loadavg_after'][0]:.2f} after, per cell in the table (the load generator shares the CPUs with "
            "the service, and other jobs may too)."
        ),
        "",
    ]
    return "\n".join(lines)


def _plot(summary: list[dict], raw: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    sizes = sorted({r["rows"] for r in summary})
    forms = list(dict.fromkeys(r["form"] for r in summary))
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4.5))
    for ax, size in zip(axes, sizes):
        for k, form in enumerate(forms):
            cells = [r for r in summary if r["rows"] == size and r["form"] == form]
            x = [i + 0.4 * k for i in range(len(cells))]
            ax.bar(
                x,
                [r["rows_per_s"] for r in cells],
                width=0.4,
                color=f"C{k}",
                label=form,
                yerr=[
                    [r["rows_per_s"] - r["rows_per_s_min"] for r in cells],
                    [r["rows_per_s_max"] - r["rows_per_s"] for r in cells],
                ],
                capsize=3,
            )
            ax.set_xticks(
                [i + 0.2 for i in range(len(cells))], [f"c={r['concurrency']}" for r in cells]
            )
        for r in raw:
            if r["rows"] == size:
                model = r["mode"] == "model"
                ax.axhline(
                    r["rows_per_s"],
                    color="black" if model else "grey",
                    linestyle="--" if model else ":",
                    linewidth=1,
                    label=f"raw {r['mode']}",
                )
                if model and size > 1:
                    ax.axhline(
                        r["rows_per_s"] / 2,
                        color="red",
                        linewidth=1,
                        label="target: half the raw model",
                    )
        ax.set_title(f"{size}-row requests")
        ax.set_ylabel("rows/s (median over rounds; whiskers min, max)")
        ax.legend(fontsize=7)
    right = axes[-1]
    for k, form in enumerate(forms):
        for j, size in enumerate(sizes):
            cells = [r for r in summary if r["rows"] == size and r["form"] == form]
            style = {"color": f"C{k}", "alpha": 1.0 if j == 0 else 0.55}
            right.plot(
                [r["concurrency"] for r in cells],
                [r["p99_ms"] for r in cells],
                "s--",
                **style,
                label=f"p99, {form}, {size} row(s)",
            )
            right.plot(
                [r["concurrency"] for r in cells],
                [r["p50_ms"] for r in cells],
                "o-",
                **style,
                label=f"p50, {form}, {size} row(s)",
            )
    right.axhline(50, color="grey", linewidth=1, linestyle=":", label="50 ms target")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent requests")
    right.set_ylabel("latency, ms")
    right.set_title("Latency")
    right.legend(fontsize=7)
    fig.suptitle("ctcvr scoring service on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    parser.add_argument("--model-dir", default=defaults.model_dir)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--concurrency", type=int, nargs="+", default=defaults.concurrency)
    parser.add_argument("--rows", type=int, nargs="+", default=defaults.rows)
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--sim-rows", type=int, default=defaults.sim_rows)
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=defaults.forms)
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=defaults.wait_idle,
        help="before each round, wait up to this many seconds for the load average to fall below 1",
    )
    parser.add_argument("--form", choices=list(FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--bodies", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["load"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--request-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "load":
        load_worker(args)
        return 0
    settings = Settings(
        model_dir=args.model_dir,
        out=args.out,
        concurrency=args.concurrency,
        rows=args.rows,
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        sim_rows=args.sim_rows,
        forms=args.forms,
        wait_idle=args.wait_idle,
    )
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
