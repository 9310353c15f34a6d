"""benchmarks/head_paths_ab.py: the per-cycle ratios, and a tiny interleaved run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "head_paths_ab.py"


ab = load_benchmark(SCRIPT, "head_paths_ab")


def test_each_cycle_compares_steps_that_ran_side_by_side():
    result = {
        "settings": {"batch_size": 8, "cycles": 2, "block": 2},
        "warmup_s": {"head_only": [0.5], "head_only_bf16": [0.7]},
        "step_s": {
            "head_only": [[0.2, 0.2], [0.8, 0.8]],  # the machine got busy in cycle 2 ...
            "head_only_bf16": [[0.1, 0.1], [0.5, 0.5]],  # ... for both paths
        },
        "last_loss": {"head_only": 0.5, "head_only_bf16": 0.5001},
        "threads": 1,
        "others_cpu_share": 0.4,
    }
    table = ab.markdown(result)
    # 2.0x and 1.6x: the median of the cycles' ratios, not a ratio of the pooled medians.
    assert "| head_only_bf16 | 300.0 | 1.80x | 1.60-2.00x | 0.7 | 0.50010 |" in table
    assert "| head_only | 500.0 | 1.00x | 1.00-1.00x |" in table and "took 40% of the CPUs" in table


def test_tiny_interleaved_run(tmp_path):
    # head_only_compile is left out: inductor's first compile takes tens of seconds on 2 cores.
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--paths",
            "head_only",
            "head_only_bf16",
            "head_only_onednn",
            "--batch-size",
            "64",
            "--cycles",
            "2",
            "--block",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--name",
            "tiny",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads((tmp_path / "tiny.json").read_text())
    assert set(raw["step_s"]) == {"head_only", "head_only_bf16", "head_only_onednn"}
    assert all(len(blocks) == 2 for blocks in raw["step_s"].values()) and raw["threads"] == 1
    # Same weights, same data: the float32 paths agree, bf16 stays close.
    losses = raw["last_loss"]
    assert losses["head_only_onednn"] == pytest.approx(losses["head_only"], rel=1e-4)
    assert losses["head_only_bf16"] == pytest.approx(losses["head_only"], rel=0.05)
    assert "| head_only_bf16 |" in (tmp_path / "tiny.md").read_text()


def test_the_reference_comes_first():
    with pytest.raises(SystemExit):
        ab.main(["--paths", "head_only_bf16", "head_only"])
