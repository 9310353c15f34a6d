"""``python -m trainer.data``: simulate and stats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from trainer.data.__main__ import app
from trainer.data.summary import LogSummary, format_summaries

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_module_entry_point_prints_help():
    done = subprocess.run(
        [sys.executable, "-m", "trainer.data", "simulate", "--help"],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},  # wide enough that no option name is cut
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in (
        "--rows",
        "--out",
        "--seed",
        "--test-fraction",
        "--ctr",
        "--cvr",
        "--observed-confounding",
        "--confounding",
        "--dim",
        "--days",
        "--start",
        "--new-users",
        "--new-items",
        "--popularity-drift",
    ):
        assert option in done.stdout


def test_simulate_then_stats(tmp_path):
    out = tmp_path / "sim"
    args = [
        "simulate",
        "--rows",
        "3000",
        "--out",
        str(out),
        "--seed",
        "3",
        "--users",
        "300",
        "--items",
        "200",
        "--row-group-rows",
        "1000",
        "--file-rows",
        "2000",
        "--no-progress",
        "--ctr",
        "0.1",
        "--cvr",
        "0.2",
        "--dim",
        "8",
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert (out / "schema.yaml").is_file()
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert "dim: 8" in (out / "schema.yaml").read_text()
    train_line = next(line for line in done.output.splitlines() if line.startswith("train"))
    assert train_line.split()[1] == "2,400"  # 3,000 rows less 20 % test

    stats = runner.invoke(app, ["stats", str(out)])
    assert stats.exit_code == 0, stats.output
    summary_table = done.output[done.output.index("split") :]
    assert stats.output.strip() == summary_table.strip()  # the same numbers from the files

    scanned = runner.invoke(app, ["stats", str(out / "test"), "--scan"])
    assert scanned.exit_code == 0, scanned.output
    assert "rows read 600, yielded 600" in scanned.output
    assert "recent_categories=" in scanned.output  # truncation is reported

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_simulate_days_then_stats_of_one_day(tmp_path):
    out = tmp_path / "daily"
    args = ["simulate", "--days", "2", "--start", "2026-12-30", "--rows", "2000", "--out"]
    args += [str(out), "--users", "300", "--items", "200", "--row-group-rows", "1000"]
    done = runner.invoke(app, [*args, "--file-rows", "1000", "--no-progress"])
    assert done.exit_code == 0, done.output
    for split in ("train", "test"):  # the days run across the new year
        assert sorted(p.name for p in (out / split).iterdir()) == [
            "day=2026-12-30",
            "day=2026-12-31",
        ]
    day_line = next(
        line for line in done.output.splitlines() if line.startswith("train 2026-12-31")
    )
    assert day_line.split()[2] == "1,600"  # 2,000 rows that day less 20 % test
    stats = runner.invoke(app, ["stats", str(out / "train"), "--filter", "day == '2026-12-31'"])
    assert stats.exit_code == 0, stats.output
    assert stats.output.splitlines()[1].split()[1:3] == day_line.split()[2:4]  # rows, clicks


def test_stats_of_a_plain_log_without_schema(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table(
            {
                "click": pa.array([1, 1, 0, 0], pa.int8()),
                "conversion": pa.array([1, 0, 0, 0], pa.int8()),
            }
        ),
        path,
    )
    done = runner.invoke(app, ["stats", str(path)])
    assert done.exit_code == 0, done.output
    expected = LogSummary(rows=4, clicks=2, conversions=1)
    assert done.output.strip() == format_summaries({"log": expected}).strip()
    assert "50.000%" in done.output  # CTR 2/4 and CVR on clicks 1/2


def test_stats_reports_bad_data_and_exits_nonzero(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"click": pa.array([0, 0], pa.int8()), "conversion": pa.array([0, 1], pa.int8())}),
        path,
    )
    done = runner.invoke(app, ["stats", str(path), "--scan"])
    assert done.exit_code == 2 and "--scan needs a schema" in done.output
    (tmp_path / "other.parquet").write_text("not parquet")
    done = runner.invoke(app, ["stats", str(tmp_path / "other.parquet")])
    assert done.exit_code == 1 and "not a readable Parquet file" in done.output


def test_simulate_rejects_an_invalid_config(tmp_path):
    done = runner.invoke(app, ["simulate", "--out", str(tmp_path), "--ctr", "1.5", "--no-progress"])
    assert done.exit_code == 2 and "ctr=1.5" in done.output
