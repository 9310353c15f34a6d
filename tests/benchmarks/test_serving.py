"""benchmarks/serving.py: CPU accounting, verdicts that refuse a busy machine, request bodies that
score the same impressions in every form, and a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serving.py"


sb = load_benchmark(SCRIPT, "serving_benchmark")


def test_a_verdict_is_given_only_on_a_quiet_machine():
    quiet = [("cell a", 0.02), ("cell b", 0.10)]
    assert sb.verdict(True, quiet) == "met"
    assert sb.verdict(False, quiet) == "**missed**"
    busy = sb.verdict(True, [("cell a", 0.02), ("cell b", 0.31)])
    assert busy.startswith("inconclusive: other processes took more than 10% of the CPUs")
    assert "cell b (31%)" in busy and "cell a" not in busy
    assert sb.verdict(False, [("cell a", None)]).startswith("inconclusive")  # not measured: unknown
    assert sb.verdict(True, []).startswith("inconclusive")


def test_a_host_whose_speed_moved_between_rounds_makes_verdicts_inconclusive():
    def model(precision, rows, rate, round_):
        return {
            "mode": "model",
            "precision": precision,
            "rows": rows,
            "rows_per_s": rate,
            "round": round_,
        }

    steady = [model("float", 256, 212_000, 0), model("float", 256, 170_000, 1)]  # 0.80
    steady += [{**model("float", 256, 90_000, 0), "mode": "in-process rank"}]  # not the model
    assert sb.host_unsteadiness(steady) is None
    assert sb.host_unsteadiness([model("float", 256, 100.0, 0)]) is None  # one round: no spread
    moved = [*steady, model("int8", 1, 3_000, 0), model("int8", 1, 2_000, 1)]
    why = sb.host_unsteadiness(moved)
    assert why == "the raw model ran at 2,000 to 3,000 rows/s between rounds, int8, 1 rows"
    quiet = [("cell a", 0.02)]
    assert sb.verdict(True, quiet, why) == f"inconclusive: the host's speed varied ({why})"
    assert sb.verdict(False, [("cell a", 0.5)], why).startswith(
        "inconclusive: other processes took"
    )  # outside load is named first


def test_cpu_shares_leave_out_our_own_processes():
    tick = sb.TICK
    start = sb.CpuWindow((100 * tick, 400 * tick), {"service": 10.0, "load generator": 1.0})
    end = sb.CpuWindow((250 * tick, 600 * tick), {"service": 90.0, "load generator": 21.0})
    shares = start.shares(end)  # 200 s of CPU, 150 s busy: 80 service, 20 load generator
    assert shares == pytest.approx({"service": 0.4, "load generator": 0.1, "others": 0.25})
    assert sb.CpuWindow(None, {"x": 0.0}).shares(end)["others"] is None


def test_process_cpu_counts_a_process_and_its_children():
    child = subprocess.Popen(
        [sys.executable, "-c", "sum(range(30_000_000)); input()"], stdin=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while sb.process_cpu_s(child.pid) < 0.05:
            assert time.monotonic() < deadline, "the child never used CPU"
            time.sleep(0.05)
        own, theirs = sb.process_cpu_s(os.getpid()), sb.process_cpu_s(child.pid)
        assert sb.process_cpu_s(os.getpid(), tree=True) >= own + theirs - 0.02
    finally:
        child.communicate(b"\n", timeout=120)


def test_a_service_counts_as_started_once_its_workers_stop_loading():
    # a "service" whose worker child busies a core for about 2 s after the parent is up
    worker = "import time; t = time.monotonic()\\nwhile time.monotonic() - t < 2: pass\\ninput()"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', '{worker}'])",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        start = time.monotonic()
        sb._wait_until_settled(parent.pid, start + 60)
        assert time.monotonic() - start >= 1.5  # it waited for the worker to go quiet
        with pytest.raises(RuntimeError, match="still busy"):  # a worker that never settles
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                sb._wait_until_settled(spinner.pid, time.monotonic() + 2.5)
            finally:
                spinner.kill()
                spinner.wait()
    finally:
        parent.communicate(b"\n", timeout=60)


def test_every_form_carries_the_same_impressions():
    rows = [
        {"user": u, "item": i, "price": float(i), "hour": 3 + u}
        for u, i in [(1, 10), (2, 11), (3, 12), (4, 13)]
    ]
    context = {"user", "hour"}
    bodies = {
        form: [orjson.loads(b) for b in sb.request_bodies(rows, 3, 2, form, context)]
        for form in sb.FORMS
    }
    for k in range(2):
        rank = bodies["rank"][k]
        impressions = [{**c, **rank["context"]} for c in rank["candidates"]]
        assert bodies["rows"][k]["rows"] == impressions
        assert set(rank["context"]) == context and not set(rank["candidates"][0]) & context
        columns = bodies["columns"][k]["columns"]
        assert [dict(zip(columns, v)) for v in zip(*columns.values())] == impressions
        candidates = bodies["rank-columns"][k]["candidates"]
        assert candidates == {n: [c[n] for c in rank["candidates"]] for n in ("item", "price")}


def test_the_whole_ranking_path_is_set_against_the_sum_of_its_parts():
    def rate(mode, rows_per_s, size=256):
        return {"precision": "float", "mode": mode, "rows": size, "rows_per_s": rows_per_s}

    raw = [
        rate("model", 400_000.0),
        rate("rank model", 640_000.0),  # 400 us a request of 256
        rate("prepare rank-columns", 1_024_000.0),  # 250 us
        rate("in-process rank-columns", 256_000.0),  # 1,000 us
        rate("prepare rank", 512_000.0),  # no whole path measured: left out
    ]
    (row,) = sb.alternation(raw)
    assert (row["form"], row["rows"]) == ("rank-columns", 256)
    assert row["handling_us"] == pytest.approx(250.0) and row["model_us"] == pytest.approx(400.0)
    assert row["whole_us"] == pytest.approx(1000.0)
    assert row["whole_over_sum"] == pytest.approx(1000 / 650)


def test_a_tiny_run_writes_its_report(tmp_path):
    """The whole benchmark, small: a demo model, a service, the in-process modes, every form;
    worker counts and int8 run when the service and the exporter offer them, else are listed as
    skipped. Verdicts are whatever the machine allows (a test machine is rarely quiet)."""
    command = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--rows", "1", "8"]
    command += ["--concurrency", "2", "--workers", "1", "2", "--duration", "0.3"]
    command += ["--warmup", "0.1", "--raw-seconds", "0.1", "--rounds", "1"]
    command += ["--sim-rows", "1000", "--bodies", "2"]
    command += ["--forms", "rank", "rank-columns", "rows", "columns"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    for name in ("serving.md", "serving.png", "serving.json"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "serving.json").read_text())
    forms = {(c["form"], c["rows"]) for c in report["cells"]}
    assert forms == {(f, n) for f in sb.FORMS for n in (1, 8)}
    assert all(c["errors"] == 0 and c["requests"] > 0 for c in report["cells"])
    assert all(c["others_cpu"] is not None and c["loadgen_cpu"] > 0 for c in report["cells"])
    modes = {(r["precision"], r["mode"], r["rows"]) for r in report["raw"]}
    assert ("float", "model", 8) in modes and ("float", "in-process rank", 8) in modes
    assert ("float", "prepare rank-columns", 8) in modes
    assert {(a["form"], a["rows"]) for a in report["alternation"] if a["precision"] == "float"} == {
        (f, n) for f in ("rank", "rank-columns") for n in (1, 8)
    }
    workers = {c["workers"] for c in report["cells"]}
    assert workers == {1, 2} or any("2 workers" in s for s in report["skipped"])
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["zero errors"]["value"] == "0 errors"
    assert all(t["verdict"] for t in report["targets"])
    assert "| precision | workers | form |" in proc.stdout  # the table is printed too
