"""benchmarks/quality.py: argument checks, and a ``--quick`` run of 2 objectives x 1 seed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quality.py"


quality = load_benchmark(SCRIPT, "quality")


def test_every_objective_has_a_simulated_config():
    settings = quality.Settings()
    settings.check()
    assert {"naive", "esmm", "multi_ipw", "multi_dr", "escm2_ipw", "escm2_dr", "badr"} <= set(
        settings.objectives
    )
    assert {"multi_dr_adapsl", "badr_adapsl"} <= set(
        settings.objectives
    )  # variants: runs of their own


def test_an_adap_sl_variant_keeps_its_pruning_epochs_under_the_budget(tmp_path):
    # Its config prunes over train.steps / epoch_steps = 2000 / 200 = 10 epochs; so does a 250-step run.
    assert quality.variant_overrides("multi_dr_adapsl", 250) == ["model.adap_sl.epoch_steps=25"]
    assert quality.variant_overrides("badr_adapsl", 3) == ["model.adap_sl.epoch_steps=1"]
    assert quality.variant_overrides("multi_dr", 250) == []
    settings = quality.Settings(objectives=["multi_dr", "multi_dr_adapsl"], seeds=[0], steps=250)
    plain, adap = quality.plan_runs(settings, tmp_path / "data", tmp_path)
    assert set(adap.overrides) - set(plain.overrides) == {"model.adap_sl.epoch_steps=25"}
    assert adap.command()[adap.command().index("--config") + 1].endswith(
        "multi_dr_adapsl_simulated.yaml"
    )


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown"):
        quality.Settings(objectives=["naive", "nope"]).check()
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        quality.Settings(steps=0).check()
    with pytest.raises(ValueError, match="--group-rows must be >= 0, got -1"):
        quality.Settings(group_rows=-1).check()
    with pytest.raises(ValueError, match="expected OBJECTIVE.KEY=VALUE"):
        quality._parse_objective_params(["tau=0.1"])
    assert quality._parse_objective_params(["multi_ipw.tau=0.1", "multi_ipw.cvr_weight=2"]) == {
        "multi_ipw": {"tau": "0.1", "cvr_weight": "2"}
    }


def test_runs_differ_only_by_objective_and_seed(tmp_path):
    settings = quality.Settings(objectives=["naive", "badr"], seeds=[0, 1])
    runs = quality.plan_runs(settings, tmp_path / "data", tmp_path)
    assert [(r.objective, r.seed) for r in runs] == [
        ("naive", 0),
        ("naive", 1),
        ("badr", 0),
        ("badr", 1),
    ]
    strip = lambda run: [o for o in run.overrides if not o.startswith("seed=")]
    assert strip(runs[0]) == strip(runs[2])
    assert len({r.run_dir for r in runs}) == 4


def test_oracle_propensity_applies_to_the_ipw_and_dr_objectives_only():
    settings = quality.Settings(objectives=["naive", "esmm", "multi_ipw", "badr"])
    settings.objective_params = {"badr": {"tau": "0.02"}}
    params = quality.with_oracle_propensity(settings).objective_params
    assert params == {
        "multi_ipw": {"oracle_propensity": "true"},
        "badr": {"tau": "0.02", "oracle_propensity": "true"},
    }
    settings.check()


def test_quick_run_writes_the_table_and_the_chart(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data",
            "simulated",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            "--jobs",
            "2",
            "--threads",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    markdown = (out / "quality_simulated.md").read_text()
    for row in ("| naive |", "| multi_ipw |"):
        assert row in markdown
    assert "cvr_bias" in markdown and "bias floor" in markdown
    assert (out / "quality_simulated.png").stat().st_size > 10_000
    raw = json.loads((out / "quality_simulated.json").read_text())
    assert [(r["objective"], r["seed"]) for r in raw["runs"]] == [("naive", 0), ("multi_ipw", 0)]
    assert all("cvr_bias" in r["metrics"] for r in raw["runs"])
    assert set(raw["truth_metrics"]) >= set(quality.COLUMNS)
    # The diagnostic reads the same runs: what the towers learned of each logit component.
    fit = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "propensity_fit.py"), raw["runs"][1]["run_dir"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "| user intent |" in fit.stdout and "| 5 |" in fit.stdout
    assert "| 0.01 |" in fit.stdout  # the IPW bias by bound
    assert "no id-specific part" in fit.stdout  # and with the attribute-only propensity


def test_every_objective_runs_on_coat_and_the_coat_configs_match_the_benchmark():
    from trainer.config import load_config

    settings = quality.Settings.for_data("coat")
    settings.check()  # every registered objective has a coat (or simulated) config
    defaults = quality.DATA_DEFAULTS["coat"]
    for objective in settings.objectives:
        path = quality.config_path(objective, "coat")
        if not path.name.endswith("_coat.yaml"):
            continue
        config = load_config(path)
        assert config.objective.name == objective, path
        shared = (
            config.data.batch_size,
            config.train.steps,
            config.model.num_experts,
            config.model.expert_sizes,
            config.model.tower_sizes,
            config.dense_optimizer.lr,
            config.dense_optimizer.weight_decay,
            config.sparse_optimizer.lr,
            config.data.ranking_k,
        )
        assert shared == (
            defaults["batch_size"],
            defaults["steps"],
            defaults["num_experts"],
            defaults["expert_sizes"],
            defaults["tower_sizes"],
            defaults["dense_lr"],
            defaults["weight_decay"],
            defaults["sparse_lr"],
            quality.RANKING_K,
        ), f"{path.name} disagrees with DATA_DEFAULTS['coat'] in benchmarks/quality.py"
    assert quality.config_path("no_such_objective", "coat") is None


def test_coat_overrides_ask_for_the_ranking_protocol_and_validation_evaluates_valid(tmp_path):
    settings = quality.Settings.for_data("coat")
    overrides = settings.overrides(tmp_path, "naive", 3)
    assert "data.ranking_k=5" in overrides and f"data.test={tmp_path / 'test'}" in overrides
    settings.validation = 0.2
    assert f"data.test={tmp_path / 'valid'}" in settings.overrides(tmp_path, "naive", 3)
    assert not any(o.startswith("data.group_rows") for o in overrides)
    settings.group_rows = 64
    assert "data.group_rows=64" in settings.overrides(tmp_path, "naive", 3)
    with pytest.raises(ValueError, match="--validation and --ids-only apply to --data coat only"):
        quality.Settings(validation=0.2).check()


def test_validation_from_the_test_ratings_tunes_on_valid_and_reports_the_rest(tmp_path):
    settings = quality.Settings.for_data("coat", validation=0.2, validation_from="test")
    settings.check()
    assert settings.coat().validation_from == "test" and settings.coat().validation_fraction == 0.2
    assert f"data.test={tmp_path / 'valid'}" in settings.overrides(tmp_path, "naive", 3)
    assert settings.tunes
    settings.report_test = True
    assert f"data.test={tmp_path / 'test'}" in settings.overrides(tmp_path, "naive", 3)
    assert not settings.tunes  # the published numbers go beside it again
    evaluated = {"rows": 3_700, "cvr_on_clicks": 0.4}
    assert "test set less its validation split of 20% of the random-exposure ratings" in (
        quality._evaluated_split_text(settings, evaluated)
    )
    for bad, message in (
        ({"validation_from": "valid", "validation": 0.2}, "--validation-from must be one of"),
        ({"validation_from": "test"}, "need --validation"),
        ({"report_test": True}, "need --validation"),
    ):
        with pytest.raises(ValueError, match=message):
            quality.Settings.for_data("coat", **bad).check()


def test_quick_coat_run_prints_the_published_numbers_beside_ours(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data",
            "coat",
            "--quick",
            "--objectives",
            "naive",
            "naive_single_task",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            "--jobs",
            "1",
            "--threads",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    markdown = (tmp_path / "out" / "quality_coat.md").read_text()
    assert "| run | cvr_auc | ndcg@5 | recall@5 | cvr_gauc | cvr_logloss | MF AUC |" in markdown
    # The papers' naive (BADR / Adap-SL) beside our single-task naive, the like-for-like run.
    row = next(line for line in markdown.splitlines() if line.startswith("| naive_single_task |"))
    assert "0.6983" in row and "0.7570" in row
    assert "The multi-task backbone alone (naive" in markdown and "paired by seed: AUC" in markdown
    assert "random-exposure test set (4,640 ratings" in markdown
    raw = json.loads((tmp_path / "out" / "quality_coat.json").read_text())
    assert raw["conversion"]["splits"]["train"]["rows"] == 87_000
    assert {"cvr_auc", "ndcg@5", "recall@5", "users"} <= set(raw["runs"][0]["metrics"])
    assert (tmp_path / "out" / "quality_coat.png").stat().st_size > 10_000
    _check_a_fixed_split_ranks_the_runs_own_test_rows(tmp_path)


def _check_a_fixed_split_ranks_the_runs_own_test_rows(tmp_path: Path) -> None:
    """``coat_protocol.py --split`` on the quick runs: a split testing every rating but user
    0's, whose ratings alone validate, divides the whole test's per-user mean exactly."""
    runs = sorted((tmp_path / "work" / "runs").glob("naive-seed*-*"))
    test = pq.read_table(next((tmp_path / "work").glob("coat-*/test")))
    rated = test.filter(pc.equal(test["click"], 1))
    pairs = [
        f"{u} {i}"
        for u, i in zip(rated["user_id"].to_pylist(), rated["item_id"].to_pylist())
        if u != 0
    ]
    split = tmp_path / "x_test.txt"
    split.write_text("\n".join(pairs) + "\n")
    protocol = ROOT / "benchmarks" / "coat_protocol.py"
    command = [sys.executable, str(protocol), str(runs[0]), "--split", str(split), "--draws", "2"]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path / "protocol")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    raw = json.loads((tmp_path / "protocol.json").read_text())
    assert raw["split"]["sha256"] == hashlib.sha256(split.read_bytes()).hexdigest()
    m = raw["runs"][0]["metrics"]
    users = len(set(rated["user_id"].to_pylist()))
    assert m["ndcg@5"] * users == pytest.approx(
        m["ndcg@5_fixed"] * (users - 1) + m["ndcg@5_fixed_valid"]
    )

    foreign = tmp_path / "foreign.txt"
    foreign.write_text("9999 0\n")  # Coat has 290 users
    proc = subprocess.run(
        [*command[:3], "--split", str(foreign)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{runs[0]}: {foreign}: 1 of its 1 pairs are not rated test rows" in proc.stderr
