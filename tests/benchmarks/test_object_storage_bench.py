"""benchmarks/object_storage.py: the step measurement and the report (the loop itself is the
end-to-end test's, tests/test_object_storage_e2e.py)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "object_storage.py"


bench = load_benchmark(SCRIPT, "object_storage_bench")


def _settings(tmp_path):
    return bench.Settings(rows=1000, steps=10, requests=5, bucket=None, out=tmp_path, wait_idle=0.0)


def test_a_step_is_timed_with_the_cpu_share_of_other_processes():
    steps = []
    with bench._measured("nap", steps) as step:
        time.sleep(0.3)
        step.detail = "slept"
    (measured,) = steps
    assert measured.name == "nap" and measured.seconds >= 0.3 and measured.detail == "slept"
    assert measured.others_cpu_share is None or 0.0 <= measured.others_cpu_share <= 1.0


def test_the_report_compares_the_sides_and_calls_a_busy_machine_inconclusive(tmp_path):
    local = [bench.Step("simulate", 2.0, 0.01), bench.Step("export", 4.0, 0.02)]
    quiet = [bench.Step("simulate", 3.0, 0.0), bench.Step("export", 8.0, 0.05, "x")]
    faults = [bench.Fault("missing bucket: train", 2, "error: s3://b/run: bucket 'b' ...")]
    report = bench.markdown(local, quiet, faults, _settings(tmp_path))
    assert "| simulate | 2.0 | 3.0 | 1.50x | 1%, 0% |  |" in report
    assert "| export | 4.0 | 8.0 | 2.00x | 2%, 5% | x |" in report
    assert "| **all** | 6.0 | 11.0 | 1.83x | | |" in report
    assert "Verdict: measured on a quiet machine" in report
    assert "| missing bucket: train | 2 | `error: s3://b/run: bucket 'b' ...` |" in report
    busy = [bench.Step("simulate", 3.0, 0.5), bench.Step("export", 8.0, 0.0)]
    report = bench.markdown(local, busy, [], _settings(tmp_path))
    assert "1%, 50% (busy)" in report and "Verdict: inconclusive" in report
    assert "| fault |" not in report
