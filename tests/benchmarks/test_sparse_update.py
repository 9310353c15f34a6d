"""benchmarks/sparse_update.py: the kernels it times update what they should, and a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sparse_update.py"


su = load_benchmark(SCRIPT, "sparse_update")


@pytest.mark.parametrize(
    ("optimizer", "row_3_step", "row_7_step"),
    [
        # Row 3 is read twice (gradient 2 per element), row 7 once (1). Adagrad's first step is
        # lr * g / sqrt(g^2) = lr whatever g, row-wise (mean of g^2) or per element; SGD's is lr * g.
        ("rowwise_adagrad", 0.05, 0.05),
        (su.FP16_GRADIENTS, 0.05, 0.05),  # the same optimizer through FBGEMM's other kernel
        ("adagrad", 0.05, 0.05),
        ("sgd", 0.10, 0.05),
    ],
)
def test_each_kernel_updates_the_rows_read_and_only_those(optimizer, row_3_step, row_7_step):
    tbe = su.build_tbe(optimizer, rows=10, dim=4)
    before = tbe.split_embedding_weights()[0].clone()
    pooled = tbe(torch.tensor([3, 3, 7]), torch.tensor([0, 1, 2, 3]))
    pooled.float().backward(torch.ones(pooled.shape))
    step = before - tbe.split_embedding_weights()[0]
    expected = torch.zeros(10, 4)
    expected[3], expected[7] = row_3_step, row_7_step
    assert torch.allclose(step, expected, atol=1e-4)


def test_tiny_run_writes_every_cell(tmp_path):
    tiny = ["--rows", "100", "--batch", "32", "--dims", "4", "--threads", "1"]
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *tiny,
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    raw = json.loads((tmp_path / "sparse_update.json").read_text())
    assert [c["optimizer"] for c in raw["cells"]] == [*su.OPTIMIZERS, su.FP16_GRADIENTS]
    assert all(c["backward_ms"] > 0 and c["dim"] == 4 for c in raw["cells"])
    table = (tmp_path / "sparse_update.md").read_text()
    assert "| rowwise_adagrad | 4 | 1 |" in table and (tmp_path / "sparse_update.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "1"], "need 2 <= --batch <= --rows"),
        (["--rows", "10", "--batch", "64"], "need 2 <= --batch <= --rows"),
        (["--dims", "0"], "must be positive"),
    ],
)
def test_settings_it_cannot_measure_are_refused_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit):
        su.main(args)
    assert message in capsys.readouterr().err
