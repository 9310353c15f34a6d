"""benchmarks/serving_memory.py: the growth arithmetic, and a tiny real run of every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serving_memory.py"


sm = load_benchmark(SCRIPT, "serving_memory")


def _result(variant: str, workers: int, pss: float, files: float) -> dict:
    return {
        "variant": variant,
        "workers": workers,
        "pss_mib": pss,
        "table_files_pss_mib": files,
        "worker_pss_mib": [pss / workers] * workers,
        "startup_s": 1.0,
    }


def test_the_tables_share_of_the_growth_is_what_exceeds_a_workers_own():
    mib = 2**20
    results = [
        # shared tables (100 MiB): each worker adds its own 200 MiB, the file pages stay 100
        _result("float32", 1, 300, 100),
        _result("float32", 2, 500, 100),
        _result("float32", 4, 900, 100),
        # copied tables: each worker adds its own 200 MiB and a 100 MiB copy
        _result("format 1", 1, 300, 0),
        _result("format 1", 2, 600, 0),
    ]
    rows = sm.summarize(results, {"float32": 100 * mib, "format 1": 100 * mib})
    by = {(r["variant"], r["workers"]): r for r in rows}
    assert by["float32", 1]["growth_per_worker_mib"] is None
    assert by["float32", 4]["growth_per_worker_mib"] == 200
    assert by["float32", 4]["worker_own_growth_mib"] == 200
    assert by["float32", 4]["tables_growth_share"] == 0
    assert by["format 1", 2]["tables_growth_per_worker_mib"] == 100
    assert by["format 1", 2]["tables_growth_share"] == 1.0
    text = sm.markdown(rows, sm.Settings(), sm.bench_schema("ali-ccp", 0.001))
    assert "| float32: per extra worker" in text and "at most 0%: met" in text


@pytest.mark.timeout(900)
def test_a_tiny_run_writes_the_table_plot_and_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--table-scale", "0.001", "--workers", "1", "2"]
        + ["--warmup-requests", "2", "--rows", "8", "--work-dir", str(tmp_path / "work")]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "serving_memory.json").read_text())
    assert [(r["variant"], r["workers"]) for r in result["rows"]] == [
        (v, w) for v in ("float32", "int8", "format 1") for w in (1, 2)
    ]
    two = [r for r in result["rows"] if r["workers"] == 2]
    assert all(len(r["worker_pss_mib"]) == 2 and r["processes"] >= 3 for r in two)
    assert all(r["table_files_pss_mib"] > 0 for r in result["rows"] if r["variant"] != "format 1")
    assert (out / "serving_memory.png").stat().st_size > 0
    assert "| target | result |" in (out / "serving_memory.md").read_text()
