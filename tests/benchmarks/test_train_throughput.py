"""benchmarks/train_throughput.py: the reference arch, the table maths, and tiny real runs."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchrec import EmbeddingBagCollection

from tests.helpers import load_benchmark, tiny_batch, tiny_schema
from trainer.model import CtcvrModel, SparseArch, embedding_bag_configs
from trainer.model.experts import INPUT_ALIGN
from trainer.objectives import build_objective
from trainer.train_module import TrainModule

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
TINY = [
    "--steps",
    "2",
    "--warmup",
    "1",
    "--batch-size",
    "64",
    "--table-scale",
    "0.001",
    "--rounds",
    "1",
    "--sgemm-size",
    "64",
    "--sgemm-reps",
    "2",
]


tt = load_benchmark(SCRIPT, "train_throughput")


def _run(tmp_path: Path, *variants: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--out", str(tmp_path), "--variants", *variants],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("train_throughput.md", "train_throughput.png", "train_throughput.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| path | processes |" in proc.stdout  # the table is printed too
    return json.loads((tmp_path / "train_throughput.json").read_text())


def test_embedding_bag_arch_matches_sparse_arch():
    """Same weights -> same pooled output, shared and mean-pooled multi-valued tables included."""
    schema = tiny_schema()
    configs = embedding_bag_configs(schema)
    sparse_arch = SparseArch(EmbeddingBagCollection(tables=configs))
    reference = tt.EmbeddingBagArch(configs)
    with torch.no_grad():
        for name, bag in sparse_arch.embedding_bag_collection.embedding_bags.items():
            reference.bags[name].weight.copy_(bag.weight)
    batch = tiny_batch([1, 0, 1, 0, 1], [1, 0, 0, 0, 1], schema)
    assert reference.out_features == sparse_arch.out_features
    torch.testing.assert_close(reference(batch.sparse), sparse_arch(batch.sparse))
    plain = tt.EmbeddingBagArch(configs, sparse=True)  # the plain sparse paths' tables
    plain(batch.sparse).sum().backward()
    assert all(bag.weight.grad.is_sparse for bag in plain.bags.values())


def test_synthetic_batches_are_reproducible_and_in_range():
    schema = tt.bench_schema(table_scale=0.001)
    first, again = (
        tt.synthetic_batches(schema, 32, 2, seed=3),
        tt.synthetic_batches(schema, 32, 2, seed=3),
    )
    assert len(schema.sparse) == 20 and len(schema.dense) == 2
    for batch, same in zip(first, again):
        torch.testing.assert_close(batch.sparse.values(), same.sparse.values())
        for name, values in batch.sparse.to_dict().items():
            assert (
                0 <= int(values.values().min())
                and int(values.values().max()) < schema.table_of(name).buckets
            )
        assert bool((batch.conversion <= batch.click).all())  # conversions only after clicks


def test_summarize_takes_the_slowest_rank_and_counts_all_rows():
    runs = [
        {
            "variant": "ctcvr_2p",
            "world_size": 2,
            "batch_size": 100,
            "others_cpu_share": 0.02,
            "ranks": [
                {"step_s": [0.1, 0.2], "threads": 1, "peak_rss_mib": 50.0},
                {"step_s": [0.2, 0.1], "threads": 1, "peak_rss_mib": 70.0},
            ],
        }
    ]
    row = tt.summarize(runs, flops_per_row=3_000_000)
    assert row["min"] == row["median"] == row["max"] == pytest.approx(1000.0)  # 2 * 100 / 0.2 s
    assert row["gflops"] == pytest.approx(3.0)  # 1000 rows/s * 3 MFLOP
    assert row["peak_rss_mib"] == 70.0 and row["others_cpu_share"] == 0.02


def test_the_sgemm_peak_is_the_median_rate_of_its_calls():
    runs = [
        {"size": 1000, "flops_per_call": 2e9, "others_cpu_share": 0.0, "ranks": [run]}
        for run in (
            {"call_s": [0.1, 0.02], "threads": 2},  # 20 and 100 GFLOP/s
            {"call_s": [0.04], "threads": 2},  # 50
        )
    ]
    sgemm = tt.summarize_sgemm(runs)
    assert (sgemm["min"], sgemm["median"], sgemm["max"]) == pytest.approx((20.0, 50.0, 100.0))
    assert sgemm["calls"] == 3 and sgemm["threads"] == 2


def _row(variant, median, gflops=0.0, others=0.0, processes=1):
    return {
        "variant": variant,
        "processes": processes,
        "threads": 2,
        "min": median,
        "median": median,
        "max": median,
        "median_step_ms": 1.0,
        "gflops": gflops,
        "peak_rss_mib": 1.0,
        "others_cpu_share": others,
    }


def _sgemm(median, others=0.0):
    return {
        "variant": "sgemm",
        "size": 2048,
        "threads": 2,
        "calls": 10,
        "min": median,
        "median": median,
        "max": median,
        "others_cpu_share": others,
    }


def _every_variant() -> list[dict]:
    """A row per training variant: ctcvr 0.96x head-only, 2p 1.08x of 1p, head 0.7 of a 200
    GFLOP/s peak, plain_adagrad the strongest plain path."""
    return [
        _row("ctcvr_1p", 96.0),
        _row("ctcvr_2p", 104.0, processes=2),
        _row("plain_sparse_adam", 80.0),
        _row("plain_adagrad", 90.0),
        _row("plain_dense_adam", 30.0),
        _row("head_only", 100.0, gflops=140.0),
    ]


def test_the_headline_takes_the_faster_plain_path_and_each_target_gets_a_verdict():
    settings = tt.Settings(table_scale=0.001)
    rows = _every_variant()
    head = tt.headline({r["variant"]: r for r in rows}, _sgemm(200.0))
    assert head.strongest_plain == "plain_adagrad"
    assert head.vs_plain == pytest.approx(96 / 90) and head.vs_head_only == pytest.approx(0.96)
    assert head.head_sgemm_share == pytest.approx(0.7) and head.two_vs_one == pytest.approx(
        104 / 96
    )
    table = tt.markdown_table(rows, _sgemm(200.0), settings)
    assert "| ctcvr_1p over the strongest plain path (plain_adagrad) | 1.07x" in table
    assert "| ctcvr_1p >= 0.95 x head_only | met (0.96x) |" in table
    assert "| head_only >= 0.6 x the sgemm peak | met (0.70) |" in table
    assert "| ctcvr_2p ahead of ctcvr_1p | met (1.08x) |" in table
    assert "taking turns in one process (ctcvr_1p_head_paired) | not measured |" in table
    paired = _row("ctcvr_1p_head_paired", 95.0) | {"paired_ratios": [0.93, 0.97, 0.99]}
    with_paired = tt.markdown_table([*rows, paired], _sgemm(200.0), settings)
    assert tt.headline({r["variant"]: r for r in [*rows, paired]}, None).vs_head_only_paired == (
        pytest.approx(0.97)
    )
    assert (
        "| ctcvr_1p >= 0.95 x head_only, taking turns in one process (ctcvr_1p_head_paired) | "
        "met (0.97x, median of 3 blocks of 5 steps each; 0.93x to 0.99x) |"
    ) in with_paired
    with_pair = tt.markdown_table(
        [*rows, _row("ctcvr_1p_pair", 106.0, processes=2)], _sgemm(200.0), settings
    )
    assert "met (1.08x); without collectives (ctcvr_1p_pair) 2 processes reach 1.10x |" in (
        with_pair
    )
    assert "| head_only | 1 | 2 | 100 | 100 | 100 | 1.0 | 1.11x | 1.00x | 140.0 | 0.70 |" in table
    assert "Warning" not in table

    slow = [_row("ctcvr_1p", 90.0), _row("head_only", 100.0, gflops=100.0)]
    missed = tt.markdown_table(slow, _sgemm(200.0), settings)
    assert "NOT met (0.90x)" in missed and "NOT met (0.50)" in missed
    assert "| ctcvr_2p ahead of ctcvr_1p | not measured |" in missed

    busy = tt.markdown_table(
        [_row("ctcvr_1p", 96.0, others=0.3), _row("head_only", 100.0, gflops=140.0)],
        _sgemm(200.0, others=0.5),
        settings,
    )
    assert busy.count("inconclusive, measured under outside load") == 2
    assert "Warning" in busy and "ctcvr_1p, sgemm" in busy.split("Warning")[1]


def test_an_unsteady_host_makes_every_timing_verdict_inconclusive():
    settings = tt.Settings(table_scale=0.001)
    rows = _every_variant()
    steady = _sgemm(200.0) | {"min": 161.0, "max": 230.0}  # slowest call 0.805 of the median
    assert tt.host_was_steady(steady)
    assert "Warning" not in tt.markdown_table(rows, steady, settings)

    unsteady = _sgemm(200.0) | {"min": 118.0, "max": 240.0}  # 0.59: the host took the CPUs
    assert not tt.host_was_steady(unsteady)
    table = tt.markdown_table(rows, unsteady, settings)
    assert table.count("inconclusive, the host's speed varied (see the sgemm line)") == 3
    assert "| ctcvr_2p ahead of ctcvr_1p | inconclusive, the host's speed varied" in table
    assert "(plain_adagrad) | 1.07x (reported as it is); the host's speed varied |" in table
    assert "the same sgemm ran at 118.0 to 240.0 GFLOP/s" in table.split("Warning")[1]


def _head_only_step_flops(in_width: int, batch_size: int) -> float:
    """FLOPs of the matrix products of one training step of the head-only model, counted by
    torch's FlopCounterMode as they run."""
    torch.manual_seed(0)
    pooled = torch.randn(batch_size, in_width - 2)
    model = CtcvrModel(
        tt.FixedInputArch(pooled),
        num_dense=2,
        heads=("ctr", "cvr"),
        num_experts=3,
        expert_sizes=(16, 8),
        tower_sizes=(8, 4),
    )
    module = TrainModule(model, build_objective("esmm"))
    batch = tiny_batch([1, 0, 1, 0], [1, 0, 0, 0])
    batch = dataclasses.replace(batch, dense=torch.randn(batch_size, 2))
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(batch)
        loss.backward()
    return counter.get_total_flops()


def test_the_flop_count_is_what_the_model_computes():
    in_width = 8 * INPUT_ALIGN  # no padding: every product the model runs is the model's own
    counted = _head_only_step_flops(in_width, batch_size=4)
    expected = 4 * tt.matmul_flops_per_row(in_width, 3, (16, 8), (8, 4))
    assert counted == expected
    # By hand, per row: experts 3 * (64 * 16 + 16 * 8), gates 2 * 64 * 3, mixing 2 * 3 * 8,
    # towers 2 * (8 * 8 + 8 * 4 + 4 * 1); times 2 FLOPs per multiply-add and 3 for the backward.
    assert expected == 4 * 6 * (3 * (64 * 16 + 16 * 8) + 2 * 64 * 3 + 2 * 3 * 8 + 2 * 100)
    # An odd width runs padded products: more FLOPs run than the model has.
    assert _head_only_step_flops(in_width + 3, 4) > 4 * tt.matmul_flops_per_row(
        in_width + 3, 3, (16, 8), (8, 4)
    )


def test_the_head_only_input_takes_gradients_and_never_changes():
    arch = tt.FixedInputArch(torch.ones(3, 4))
    first = arch(None)
    first.sum().backward()
    assert first.grad is not None and torch.equal(arch(None), torch.ones(3, 4))
    assert arch.out_features == 4 and not list(arch.parameters())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--table-scale", "0"], "--table-scale must be > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--wait-idle", "-1"], "--wait-idle must be >= 0"),
        (["--sgemm-size", "0"], "--sgemm-size must be >= 1"),
    ],
)
def test_bad_settings_are_rejected(flags, message, capsys):
    with pytest.raises(SystemExit):
        tt.main(flags)
    assert message in capsys.readouterr().err


def test_tiny_run_writes_table_and_chart(tmp_path):
    raw = _run(tmp_path, "ctcvr_1p", "plain_sparse_adam", "plain_dense_adam", "head_only", "sgemm")
    rows = {row["variant"]: row for row in raw["rows"]}
    assert set(rows) == {"ctcvr_1p", "plain_sparse_adam", "plain_dense_adam", "head_only"}
    for row in rows.values():
        assert 0 < row["min"] <= row["median"] <= row["max"] and row["peak_rss_mib"] > 0
        assert row["gflops"] == pytest.approx(row["median"] * raw["flops_per_row"] / 1e9)
    assert raw["sgemm"]["median"] > 0 and raw["sgemm"]["size"] == 64
    plan = raw["runs"]["ctcvr_1p"][0]["plan"]
    assert len(plan) == 20 and all("/fused/" in p for p in plan.values())  # FBGEMM fused kernels
    assert raw["headline"]["strongest_plain"] == "plain_sparse_adam"
    assert raw["headline"]["vs_head_only"] == pytest.approx(
        rows["ctcvr_1p"]["median"] / rows["head_only"]["median"]
    )
    table = (tmp_path / "train_throughput.md").read_text()
    assert "x strongest plain" in table and "sgemm peak:" in table


def test_tiny_run_of_the_paired_variant_times_ctcvr_and_the_head_in_turns(tmp_path):
    raw = _run(tmp_path, "ctcvr_1p_head_paired")
    (rank,) = raw["runs"]["ctcvr_1p_head_paired"][0]["ranks"]
    assert len(rank["step_s"]) == len(rank["head_step_s"]) == 2
    (ratio,) = rank["block_ratios"]  # 2 timed steps: one block
    assert ratio == pytest.approx(
        statistics.median(rank["head_step_s"]) / statistics.median(rank["step_s"])
    )
    assert raw["headline"]["vs_head_only_paired"] == pytest.approx(ratio)
    assert (
        "taking turns in one process (ctcvr_1p_head_paired) |"
        in (tmp_path / "train_throughput.md").read_text()
    )


def test_tiny_run_of_the_pair_times_two_one_thread_processes_side_by_side(tmp_path):
    raw = _run(tmp_path, "ctcvr_1p", "ctcvr_1p_pair")
    pair = next(r for r in raw["rows"] if r["variant"] == "ctcvr_1p_pair")
    assert pair["processes"] == 2 and pair["threads"] == 1 and pair["median"] > 0
    ranks = raw["runs"]["ctcvr_1p_pair"][0]["ranks"]
    assert len(ranks) == 2 and all(len(rank["step_s"]) == 2 for rank in ranks)
    table = (tmp_path / "train_throughput.md").read_text()
    assert "without collectives (ctcvr_1p_pair) 2 processes reach" in table


def test_a_pair_worker_waits_for_its_partner_and_names_the_stage_it_missed(tmp_path):
    first, second = tt.Partner(tmp_path, "a", 0.05), tt.Partner(tmp_path, "b", 0.05)
    with pytest.raises(TimeoutError, match="never reached 'ready'"):
        first.wait("ready")  # alone: the other process never came
    second.wait("ready")  # returns at once: the first one's marker is there
    first.arrive("done")
    assert not first.all_arrived("done")
    second.arrive("done")
    assert first.all_arrived("done") and second.all_arrived("done")


def test_waiting_on_a_pair_stops_the_others_once_one_fails_whatever_its_place():
    for failing_last in (True, False):
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        failer = [sys.executable, "-c", "import sys; sys.exit(3)"]
        order = [sleeper, failer] if failing_last else [failer, sleeper]
        procs = [subprocess.Popen(command) for command in order]
        started = time.monotonic()
        tt.wait_stopping_on_failure(procs)
        assert time.monotonic() - started < 30
        assert sorted(proc.returncode for proc in procs) == [-9, 3]


def test_a_failing_pair_worker_stops_its_partner_and_is_the_one_reported(tmp_path):
    # The second worker to start exits 3 at once; the first waits a minute for it (the case a
    # loop that stops polling at the first running worker would miss).
    script = (
        "import os, sys, time\n"
        f"try:\n    os.mkdir({str(tmp_path / 'first')!r})\n"
        "except FileExistsError:\n    print('no luck', file=sys.stderr)\n    sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)exit 3\).*no luck"):
        tt._run_pair([sys.executable, "-c", script], dict(os.environ))
    assert time.monotonic() - started < 30


@pytest.mark.distributed
def test_tiny_run_with_two_processes(tmp_path):
    raw = _run(tmp_path, "ctcvr_2p")
    (row,) = raw["rows"]
    assert row["processes"] == 2 and row["threads"] == 1 and row["median"] > 0
    assert len(raw["runs"]["ctcvr_2p"][0]["ranks"]) == 2


# The dense head's compute paths ---------------------------------------------------------------


def test_the_head_paths_and_the_bf16_peak_run_only_when_named():
    default = tt.Settings().variants
    assert "head_only" in default and "sgemm" in default
    opt_in = {"head_only_compile", "head_only_bf16", "head_only_onednn", "bf16_gemm"}
    assert not (opt_in | {"ctcvr_1p_bf16", "ctcvr_1p_adagrad"}) & set(default)
    assert len(default) == 9  # the headline's variants, the paired one and ctcvr_2p's ceiling


def test_summarize_keeps_each_rounds_median_and_the_first_step():
    def run(step_s, warmup_s):
        ranks = [{"step_s": step_s, "warmup_s": warmup_s, "threads": 2, "peak_rss_mib": 1.0}]
        return {"variant": "head_only_compile", "world_size": 1, "batch_size": 100, "ranks": ranks}

    row = tt.summarize([run([0.1, 0.1, 0.2], [30.0, 0.1]), run([0.2], [40.0, 0.2])], 1)
    assert row["round_medians"] == pytest.approx([1000.0, 500.0])
    assert row["first_step_s"] == 40.0  # the slowest round's: compile time included
    assert tt.summarize([run([0.1], [])], 1)["first_step_s"] is None  # no warmup steps


def _path(variant, *round_medians, others=0.0):
    row = _row(variant, statistics.median(round_medians), gflops=round_medians[0], others=others)
    return row | {"round_medians": list(round_medians), "first_step_s": 1.0, "last_loss": 0.5}


def test_a_head_path_pays_only_if_ahead_by_a_tenth_in_every_round():
    head = _path("head_only", 100.0, 100.0)
    assert tt.head_path_verdict(_path("head_only_bf16", 120.0, 111.0), head).startswith("pays")
    # 1.15x over both rounds pooled, but 1.05x in one: not consistent, does not pay.
    assert tt.head_path_verdict(_path("head_only_bf16", 125.0, 105.0), head).startswith(
        "does not pay"
    )
    busy = _path("head_only_bf16", 150.0, 150.0, others=0.2)
    assert tt.head_path_verdict(busy, head).startswith("inconclusive")


def test_the_head_paths_table_compares_with_head_only_and_the_right_peak():
    rows = [
        _path("ctcvr_1p", 90.0, 90.0),
        _path("head_only", 100.0, 100.0),
        _path("head_only_bf16", 120.0, 120.0),
        _path("head_only_compile", 90.0, 110.0),
        _path("ctcvr_1p_bf16", 99.0, 99.0),
    ]
    assert tt.head_paths_table(rows[:2], _sgemm(200.0), None) == ""  # no head path ran
    assert tt.head_paths_table(rows[2:], _sgemm(200.0), None) == ""  # no reference ran
    table = tt.head_paths_table(rows, _sgemm(200.0), _sgemm(400.0) | {"variant": "bf16_gemm"})
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    # The product path with bf16 is measured against the product path in float32.
    assert "| ctcvr_1p | - | 90 | 1.00x |" in lines["ctcvr_1p"]
    assert "| ctcvr_1p_bf16 | ctcvr_1p | 99 | 1.10x | 1.10x, 1.10x |" in lines["ctcvr_1p_bf16"]
    assert "| 1.20x | 1.20x, 1.20x | 120.0 | 0.60 | 0.30 |" in lines["head_only_bf16"]
    assert "| 0.90x, 1.10x | 90.0 | 0.45 | - |" in lines["head_only_compile"]  # float32: no bf16
    assert lines["head_only"].endswith("| reference |") and "bf16 gemm peak: 400.0" in table
    assert "| head_only_bf16 | head_only | 120 |" in table


def test_bf16_autocast_runs_the_products_in_bf16_and_counts_the_same_flops():
    in_width = 8 * INPUT_ALIGN
    linear = tt.BFloat16Autocast(torch.nn.Linear(4, 3))
    out = linear(torch.randn(2, 4))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and linear.module.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counted = _head_only_step_flops(in_width, batch_size=4)
    assert counted == 4 * tt.matmul_flops_per_row(in_width, 3, (16, 8), (8, 4))


def test_tiny_run_of_the_bf16_onednn_and_adagrad_paths(tmp_path):
    # head_only_compile is left out: inductor's first compile takes about 40 s on 2 cores.
    raw = _run(
        tmp_path,
        "head_only",
        "head_only_bf16",
        "head_only_onednn",
        "ctcvr_1p",
        "ctcvr_1p_bf16",
        "ctcvr_1p_adagrad",
        "sgemm",
        "bf16_gemm",
    )
    rows = {row["variant"]: row for row in raw["rows"]}
    assert rows.keys() == {
        "head_only",
        "head_only_bf16",
        "head_only_onednn",
        "ctcvr_1p",
        "ctcvr_1p_bf16",
        "ctcvr_1p_adagrad",
    }
    assert rows["ctcvr_1p_bf16"]["last_loss"] == pytest.approx(
        rows["ctcvr_1p"]["last_loss"], rel=0.05
    )
    # Another sparse optimizer: the same start, other updates of the tables.
    adagrad, rowwise = rows["ctcvr_1p_adagrad"], rows["ctcvr_1p"]
    assert adagrad["last_loss"] == pytest.approx(rowwise["last_loss"], rel=0.05)
    assert adagrad["last_loss"] != rowwise["last_loss"]
    assert raw["bf16_gemm"]["variant"] == "bf16_gemm" and raw["bf16_gemm"]["median"] > 0
    for name in ("head_only_bf16", "head_only_onednn"):
        assert rows[name]["last_loss"] == pytest.approx(rows["head_only"]["last_loss"], rel=0.05)
    table = (tmp_path / "train_throughput.md").read_text()
    assert "## Paths against their reference" in table and "bf16 gemm peak:" in table
