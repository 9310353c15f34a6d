"""benchmarks/quantization.py on a tiny run: the three exports, the quality and speed tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.artifacts import make_edge_run

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quantization.py"


@pytest.mark.timeout(900)
def test_a_tiny_run_reports_bytes_quality_and_speed(tmp_path):
    run = make_edge_run(tmp_path / "edge", rows=300)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(run), "--data", str(run.parent / "data/test")]
        + ["--work-dir", str(tmp_path / "work"), "--rounds", "1", "--duration", "0.05"]
        + ["--batch-sizes", "1", "16", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "quantization.json").read_text())
    dims = [2, 3, 4]
    assert result["dims"] == dims
    rows = {2: 6 + 5 + 12, 3: 14, 4: 13 + 98}  # the edge schema's tables per dim
    assert result["bytes"] == {
        "float32": sum(n * d * 4 for d, n in rows.items()),
        "int8": sum(n * (d + 2) for d, n in rows.items()),  # the shared scales aside
        "int4": sum(n * ((d + 1) // 2 + 4) for d, n in rows.items()),
    }
    for quantization in ("int8", "int4"):
        for key in ("ctr_auc", "cvr_auc", "ctcvr_auc"):
            quantized, plain = (
                result["quality"][quantization][key],
                result["quality"]["float32"][key],
            )
            assert abs(quantized - plain) < 0.05
        assert 0 < result["max_score_difference"][quantization] < 0.1
    assert {(r["variant"], r["rows_per_call"]) for r in result["speed"]} == {
        (v, b) for v in ("float32 mmap", "float32 copied", "int8", "int4") for b in (1, 16)
    }
    text = (out / "quantization.md").read_text()
    for quantization in ("int8", "int4"):
        assert f"| {quantization} AUC within 0.001 |" in text
        assert f"| {quantization} tables >= 3.5x smaller |" in text
    assert (out / "quantization.png").stat().st_size > 0
