"""Quality of every registered objective on one data set: same backbone, budget and seeds.

Run from the repository root::

    .venv/bin/python benchmarks/quality.py --data simulated           # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --data simulated --quick   # smoke test, ~1 minute
    .venv/bin/python benchmarks/quality.py --data simulated --confounding 0 --name simulated_mar
    .venv/bin/python benchmarks/quality.py --data simulated --oracle-propensity --name simulated_oracle
    .venv/bin/python benchmarks/quality.py --data simulated --observed-confounding 0 --confounding 1 \\
        --name simulated_hidden
    .venv/bin/python benchmarks/quality.py --data simulated --objectives naive multi_ipw \\
        --objective-param multi_ipw.tau=0.005
    .venv/bin/python benchmarks/quality.py --data coat                # 5 seeds, ~1 h on 2 cores
    .venv/bin/python benchmarks/quality.py --data coat --ids-only --name coat_ids  # ids only, as the papers
    .venv/bin/python benchmarks/quality.py --data coat --validation 0.2 --name coat_valid  # tuning
    .venv/bin/python benchmarks/quality.py --data coat --validation 0.2 --validation-from test \
        --name coat_valid_random                # tuning on random-exposure ratings, as BADR's paper
    .venv/bin/python benchmarks/quality.py --data coat --validation 0.2 --validation-from test \
        --report-test --name coat_badr_split    # then the test run on the other 80 %

Data sets (``--data``):

- ``simulated``: ``trainer.data.simulator`` writes ``--rows`` impressions (20 % test) with
  ground truth; the table adds whole-space CVR metrics against it.
- ``coat``: Coat, converted from the copy in ``trainer/data/datasets/coat`` with
  ``trainer.data.converters.convert_coat`` (every user x item pair; click = rated; conversion
  = rating >= 3). Evaluated with the protocol of the BADR and Adap-SL papers on the
  random-exposure test set: AUC of pCVR (``cvr_auc``: every test row is "clicked"), per-user
  NDCG@5 and Recall@5 of pCVR (``data.ranking_k=5``) and the test log loss, printed beside the
  papers' published numbers. ``--validation F`` holds out a share F of the training pairs and
  evaluates on them instead of the test set: the way to tune hyper-parameters without ever
  looking at the test set. ``--validation-from test`` draws that share from the
  random-exposure ratings instead (the BADR paper's split: tuned on 20 % of them, tested on
  the other 80 %); ``--report-test`` then evaluates the same runs' settings on the test set
  less the held-out share.

Each run (``--objectives``) is trained once per seed (``--seeds``) with ``python -m trainer.train --config
trainer/configs/<objective>_<data>.yaml``, overriding the data, the model, the optimizers and
the budget so that only the objective (and its hyper-parameters from its config) differs. A
run's name is its config's stem: every registered objective (``trainer.objectives.OBJECTIVES``)
has one, and variants of an objective have their own (``multi_dr_adapsl``, ``badr_adapsl``: the
DR objective with Adap-SL's towers); the default is all of them (:func:`default_runs`). An
Adap-SL config keeps its number of pruning epochs under the benchmark's budget
(:func:`variant_overrides`), and its towers' remaining weights (Table 4 of the paper) are
tabulated below the metrics. An objective without a ``<objective>_coat.yaml`` takes its hyper-parameters from
``<objective>_simulated.yaml`` (the table says so); adding a Coat config is copying
``naive_coat.yaml`` and replacing its ``objective:`` block. Runs are independent
subprocesses, ``--jobs`` at a time with ``--threads`` torch threads each; a run whose
``eval/metrics.json`` already exists under ``--work`` with the same settings is reused, so an
interrupted benchmark resumes.

Outputs, under ``--out`` (default ``benchmarks/results``), named ``quality_<name>`` (``--name``,
default the ``--data`` value):

- ``.md``: the settings and a table of mean ± std over seeds. Simulated: CTR AUC, CVR AUC on
  clicks, CTCVR AUC, and the ground-truth whole-space CVR AUC, CVR log loss and CVR bias
  (``mean pCVR - mean true CVR``, test set), each run's CVR bias minus naive's with the same
  seed (``cvr_bias_vs_naive``), the data set's selection gap and the bias floor that hidden
  confounding leaves (see ``confounding_floor``). Coat: AUC, NDCG@5, Recall@5 and log loss on
  the random-exposure test set, and the published AUC / NDCG@5 / Recall@5 of each method
  (BADR paper, MF backbone; Adap-SL paper, NCF backbone). The same table is printed.
- ``.png``: one panel per metric, a bar per objective with the seeds' std as error bars (Coat:
  the published numbers as markers).
- ``.json``: the resolved settings and every run's metrics.

``--oracle-propensity`` is a diagnostic: every IPW / DR objective weights by the simulator's
true click probability instead of its own pCTR (``oracle_propensity``), which separates what
the estimator does from what the learned propensities allow. ``--observed-confounding`` and
``--confounding`` set where the simulator's selection bias comes from (features the model sees,
or a hidden confounder); see ``trainer/data/simulator.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import Enum, unique
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
_CONFIGS = _ROOT / "trainer" / "configs"
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

from schemas.layout import TEST_SPLIT, TRAIN_SPLIT, VALID_SPLIT
from trainer.data.converters import CONVERSION_FILE, MnarConfig, convert_coat
from trainer.data.converters.mnar import VALIDATION_SOURCES
from trainer.data.simulator import SIMULATION_FILE, SimulatorConfig, simulate
from trainer.evaluation import compute_metrics, metrics_table
from trainer.objectives import OBJECTIVES, param_names
from trainer.run_dir import RunDir

__all__ = [
    "COAT_COLUMNS",
    "COLUMNS",
    "PUBLISHED_COAT",
    "Settings",
    "confounding_floor",
    "main",
    "truth_reference",
]

log = logging.getLogger("quality")

# The table's columns, in order, with their chart titles.
COLUMNS: dict[str, str] = {
    "ctr_auc": "CTR AUC",
    "cvr_auc": "CVR AUC (clicks)",
    "ctcvr_auc": "CTCVR AUC",
    "cvr_auc_whole_space": "CVR AUC, whole space (truth)",
    "cvr_logloss_whole_space": "CVR log loss, whole space (truth)",
    "cvr_bias": "CVR bias, whole space (truth)",
    # IPS estimate of the whole-space CVR with the run's own pCTR, minus the truth: the bias that
    # weighting by 1 / pCTR leaves at the level of the mean (trainer.evaluation.metrics)
    "cvr_ips_bias": "IPS bias with the run's pCTR (truth)",
}
# With naive among the objectives: each run's cvr_bias minus naive's with the same seed. Runs with
# the same seed share the initial weights and the data order, and the last step's calibration of
# the CVR head moves all of them alike, so the paired difference is far less noisy.
PAIRED_BIAS = "cvr_bias_vs_naive"

_SECONDS_FILE = "benchmark_seconds.txt"  # in each run directory: its training and evaluation time

# Coat, on the random-exposure test set: every test row is "clicked" (rated), so cvr_auc is the
# papers' AUC of pCVR; the ranking keys come from data.ranking_k = RANKING_K.
RANKING_K = 5
COAT_COLUMNS: dict[str, str] = {
    "cvr_auc": "AUC of pCVR (random-exposure test)",
    f"ndcg@{RANKING_K}": f"NDCG@{RANKING_K} (per user)",
    f"recall@{RANKING_K}": f"Recall@{RANKING_K} (per user)",
    "cvr_gauc": "GAUC of pCVR (per user, rating-weighted)",
    "cvr_logloss": "CVR log loss (random-exposure test)",
}

# Published Coat results (unbiased test, ratings binarised at 3, mean of 5 seeds), by our run
# name: (AUC, NDCG@5, Recall@5). "MF": BADR paper (badr.txt) Table 3, matrix-factorisation
# backbone, on a random 80 % of the test ratings (the rest is its validation set; see
# benchmarks/coat_protocol.py); "NCF": Adap-SL paper (adap-sl.txt) Table 1, NCF backbone. In BADR's
# Table 3 ESCM2-DR repeats Multi-IPS's numbers exactly (as printed). The papers' naive is one CVR
# model fitted to the ratings: our naive_single_task run. Adap-SL-DR is the DR-JL loss on Adap-SL's
# towers: our multi_dr_adapsl run. Neither the DDPO nor the EVI paper reports Coat; DDPO's number is
# BADR's. Add a row when a run with a published Coat number lands.
PUBLISHED_COAT: dict[str, dict[str, tuple[float, float, float]]] = {
    "naive_single_task": {"MF": (0.6983, 0.6658, 0.5151), "NCF": (0.757, 0.686, 0.476)},
    "multi_ipw": {"MF": (0.7337, 0.6939, 0.5391), "NCF": (0.761, 0.682, 0.482)},
    "multi_dr": {"MF": (0.7556, 0.6921, 0.5252), "NCF": (0.770, 0.691, 0.482)},
    "escm2_ipw": {"MF": (0.7392, 0.6872, 0.5294), "NCF": (0.768, 0.682, 0.483)},
    "escm2_dr": {"MF": (0.7337, 0.6939, 0.5391), "NCF": (0.772, 0.690, 0.485)},
    "ddpo": {"MF": (0.7612, 0.7059, 0.5339)},
    "badr": {"MF": (0.7694, 0.7417, 0.5750)},
    "multi_dr_adapsl": {"NCF": (0.777, 0.717, 0.493)},
}
PUBLISHED_BEST_AUC = 0.777  # Adap-SL-DR, the best Coat AUC of either paper


@unique
class DataSet(str, Enum):
    SIMULATED = "simulated"  # trainer.data.simulator, with ground truth
    COAT = "coat"  # Coat (trainer/data/datasets/coat), random-exposure test set


def columns_for(data: str) -> dict[str, str]:
    """The table's columns (metric key -> chart title) for a data set."""
    return COAT_COLUMNS if data == DataSet.COAT.value else COLUMNS


@dataclass
class Settings:
    """Everything that determines the benchmark's runs (written into its outputs).

    The defaults are the simulated benchmark's; :meth:`for_data` applies a data set's own.
    """

    data: str = DataSet.SIMULATED.value
    # 1.04 M training rows: 250 steps of 4096 see each row once. Several epochs over 500 k rows
    # over-fit the CVR head (test log loss on clicks above the label entropy).
    rows: int = 1_300_000  # simulated impressions, train and test together
    data_seed: int = 0  # simulator seed: one data set for every run
    confounding: float = 0.0  # simulator's hidden-confounder weight (its default)
    observed_confounding: float = 1.0  # simulator's user intent / item appeal weight (its default)
    dim: int = 16  # embedding dimension of every feature (simulator / converter schema)
    validation: float = (
        0.0  # Coat: > 0 holds out this share of validation_from's pairs and evaluates there
    )
    # Coat: the split the validation share is drawn from: "train" (the self-selected pairs) or
    # "test" (the random-exposure ratings, the BADR paper's validation set; test keeps the rest)
    validation_from: str = TRAIN_SPLIT
    # Coat: with a validation split, evaluate on what is left of the test set instead (the one
    # test run after tuning)
    report_test: bool = False
    attributes: bool = (
        True  # Coat: user and item attribute fields besides the ids (False: ids only)
    )
    objectives: list[str] = field(
        default_factory=lambda: default_runs()
    )  # config stems, see default_runs
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds (init, shuffling)
    steps: int = 250  # optimizer steps per run
    batch_size: int = 4096
    # A smaller MMoE than the configs' (8 x [256], towers [128, 64]) keeps 21 runs within ~25 min.
    num_experts: int = 4
    expert_sizes: list[int] = field(default_factory=lambda: [128])
    tower_sizes: list[int] = field(default_factory=lambda: [64, 32])
    interaction: str = "none"  # model.interaction: "dot" adds the embeddings' pairwise dot products
    # Adam on the MMoE and towers, decayed linearly to 5 % of it. A constant lr leaves the CVR
    # head's calibration at the last step +-20 % off from run to run (a rare-event head: ~8
    # conversions per batch), which swamps CVR bias; 3e-4 constant learns the propensities too
    # little (pCTR logit correlation with the truth 0.61 against 0.68 here).
    dense_lr: float = 3e-3
    final_lr_scale: float = 0.05  # the dense lr decays linearly to dense_lr * final_lr_scale
    weight_decay: float = 0.0  # Adam's L2 on the MMoE and towers
    sparse_lr: float = 0.05  # row-wise Adagrad on the embeddings
    # data.group_rows: > 0 reads the training rows grouped by user, in runs of at most this many
    # (what an objective's pairwise_weight needs); 0 shuffles rows alone
    group_rows: int = 0
    objective_params: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # objective -> key -> value

    @classmethod
    def for_data(cls, data: str, **values: object) -> Settings:
        """A data set's defaults (``DATA_DEFAULTS``), then ``values``."""
        return cls(data=data, **{**DATA_DEFAULTS.get(data, {}), **values})

    @property
    def is_coat(self) -> bool:
        return self.data == DataSet.COAT.value

    @property
    def tunes(self) -> bool:
        """Whether the runs are evaluated on the validation split (not comparable with papers)."""
        return self.validation > 0 and not self.report_test

    @property
    def evaluated_split(self) -> str:
        return VALID_SPLIT if self.tunes else TEST_SPLIT

    def check(self) -> None:
        for name in ("rows", "steps", "batch_size", "num_experts", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.group_rows < 0:
            raise ValueError(f"--group-rows must be >= 0, got {self.group_rows}")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"--validation must be in [0, 1), got {self.validation}")
        if (self.validation or not self.attributes) and not self.is_coat:
            raise ValueError("--validation and --ids-only apply to --data coat only")
        if self.validation_from not in VALIDATION_SOURCES:
            raise ValueError(
                f"--validation-from must be one of {list(VALIDATION_SOURCES)}, "
                f"got {self.validation_from!r}"
            )
        if (self.report_test or self.validation_from != TRAIN_SPLIT) and not self.validation:
            raise ValueError("--report-test and --validation-from need --validation")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        unknown = sorted(set(self.objectives) - set(default_runs()))
        if unknown:
            raise ValueError(f"--objectives: unknown {unknown}; choose from {default_runs()}")
        for name in self.objective_params:
            if name not in self.objectives:
                raise ValueError(
                    f"--objective-param {name}.*: {name!r} is not among --objectives {self.objectives}"
                )
        missing = [n for n in self.objectives if config_path(n, self.data) is None]
        if missing:
            raise ValueError(
                f"no config for {missing}: expected trainer/configs/<name>_{self.data}.yaml"
                + (" or <name>_simulated.yaml" if self.is_coat else "")
            )

    def simulator(self) -> SimulatorConfig:
        return SimulatorConfig(
            rows=self.rows,
            seed=self.data_seed,
            confounding=self.confounding,
            observed_confounding=self.observed_confounding,
            dim=self.dim,
        )

    def coat(self) -> MnarConfig:
        return MnarConfig(
            threshold=3.0,
            dim=self.dim,
            validation_fraction=self.validation,
            validation_from=self.validation_from,
            name="coat",
        )

    def overrides(self, data_dir: Path, objective: str, seed: int) -> list[str]:
        """The ``key=value`` config overrides of one run (everything but the objective's config)."""
        evaluated = self.evaluated_split
        overrides = [
            f"data.train={data_dir / TRAIN_SPLIT}",
            f"data.test={data_dir / evaluated}",
            f"data.batch_size={self.batch_size}",
            f"model.num_experts={self.num_experts}",
            f"model.expert_sizes=[{','.join(map(str, self.expert_sizes))}]",
            f"model.tower_sizes=[{','.join(map(str, self.tower_sizes))}]",
            "model.dropout=0.0",
            # none is the trainer's default and goes unsaid
            *([f"model.interaction={self.interaction}"] if self.interaction != "none" else []),
            f"dense_optimizer.lr={self.dense_lr}",
            f"dense_optimizer.weight_decay={self.weight_decay}",
            # 0 is the trainer's default and goes unsaid
            *([f"data.group_rows={self.group_rows}"] if self.group_rows else []),
            # 1 (constant) is the trainer's default and goes unsaid
            *(
                [f"dense_optimizer.final_lr_scale={self.final_lr_scale}"]
                if self.final_lr_scale != 1.0
                else []
            ),
            "sparse_optimizer.name=rowwise_adagrad",
            f"sparse_optimizer.lr={self.sparse_lr}",
            f"seed={seed}",
            f"train.steps={self.steps}",
            f"train.log_every={max(1, self.steps // 10)}",
            "train.checkpoint_every=0",
            "train.keep_checkpoints=1",
            "train.progress=false",
            "train.evaluate=true",
        ]
        overrides += variant_overrides(objective, self.steps)
        if self.is_coat:
            # 87,000 training rows: one buffer holds them all, so every epoch is a full shuffle.
            overrides += [f"data.ranking_k={RANKING_K}", "data.shuffle_buffer=131072"]
        overrides += [
            f"objective.params.{k}={v}" for k, v in self.objective_params.get(objective, {}).items()
        ]
        return overrides


# Per data set defaults for Settings.for_data. Coat: a small model for 87,000 rows of 10 fields.
# Batch 128 as in both papers; the rest tuned on a validation split of the training pairs
# (--validation 0.2; benchmarks/README.md), never on the test set.
DATA_DEFAULTS: dict[str, dict[str, object]] = {
    DataSet.COAT.value: {
        "seeds": [0, 1, 2, 3, 4],
        "steps": 2720,  # 4 epochs of 87,000 pairs at batch 128
        "batch_size": 128,
        "num_experts": 2,
        "expert_sizes": [64],
        "tower_sizes": [32],
        # the user x item dot product (MF's score) as an MMoE input: +0.010 AUC and +0.012 NDCG@5
        # for naive, +0.008 and +0.025 for badr (2 seeds; benchmarks/README.md)
        "interaction": "dot",
        "dense_lr": 1e-3,
        "weight_decay": 0.0,
        "final_lr_scale": 1.0,  # constant lr (the setting the Coat results were tuned and run with)
        "sparse_lr": 0.05,
    },
}


def quick_settings(settings: Settings, objectives_given: bool) -> Settings:
    """``--quick``: tiny data, model and budget; 2 objectives and 1 seed unless given."""
    settings.rows, settings.steps, settings.batch_size = 20_000, 8, 512
    settings.num_experts, settings.expert_sizes, settings.tower_sizes = 2, [16], [8]
    settings.seeds = settings.seeds[:1]
    if not objectives_given:
        settings.objectives = ["naive", "multi_ipw"]
    return settings


def config_path(objective: str, data: str = DataSet.SIMULATED.value) -> Path | None:
    """``trainer/configs/<objective>_<data>.yaml``; for Coat, else ``<objective>_simulated.yaml``."""
    for candidate in (f"{objective}_{data}.yaml", f"{objective}_{DataSet.SIMULATED.value}.yaml"):
        if (_CONFIGS / candidate).is_file():
            return _CONFIGS / candidate
        if data == DataSet.SIMULATED.value:
            break
    return None


# Runs that are variants of an objective (their own configs) ---------------------------------------


def default_runs() -> list[str]:
    """Every registered objective, then every other ``*_simulated.yaml`` (variants such as
    ``multi_dr_adapsl``), by name."""
    variants = sorted(
        p.name.removesuffix("_simulated.yaml") for p in _CONFIGS.glob("*_simulated.yaml")
    )
    return list(OBJECTIVES) + [name for name in variants if name not in OBJECTIVES]


def variant_overrides(name: str, steps: int) -> list[str]:
    """Overrides a config needs under the benchmark's budget: an Adap-SL config's pruning epoch
    (``model.adap_sl.epoch_steps``) is scaled with ``steps`` so that the run prunes over as many
    epochs as the config's own ``train.steps`` would."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path(name))
    if OmegaConf.select(config, "model.tower_sharing") != "adap_sl":
        return []
    epoch_steps = OmegaConf.select(config, "model.adap_sl.epoch_steps")
    config_steps = OmegaConf.select(config, "train.steps")
    if epoch_steps is None or config_steps is None:
        raise ValueError(
            f"{config_path(name)}: an adap_sl config must set model.adap_sl.epoch_steps and train.steps"
        )
    return [f"model.adap_sl.epoch_steps={max(1, round(epoch_steps * steps / config_steps))}"]


def pruning_section(settings: Settings, runs: list[Run]) -> str:
    """Markdown for the Adap-SL runs: per run and tower, the share of weights left (the run's
    ``pruning.json``: total, shared, private), mean ± std over seeds, as in the paper's Table 4,
    and the pruning epoch each run used; empty without such runs."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        pruning = RunDir(run.run_dir).read_pruning()
        if pruning is None:
            continue
        for tower, report in pruning["towers"].items():
            row = table.setdefault(f"{run.objective} / {tower}", {})
            for part in ("total", "shared", "private"):
                row.setdefault(part, []).append(float(report[part]))
    if not table:
        return ""
    epochs = sorted(
        {o for name in settings.objectives for o in variant_overrides(name, settings.steps)}
    )
    return (
        "Adap-SL: share of each tower's weights left at the end (the paper's Table 4), mean ± std over "
        f"seeds; pruning epochs scaled to the budget ({', '.join(f'`{o}`' for o in epochs)}):\n\n"
        + metrics_table(table, ["total", "shared", "private"])
    )


def with_oracle_propensity(settings: Settings) -> Settings:
    """``--oracle-propensity``: every run whose objective takes ``oracle_propensity`` (the IPW /
    DR family) weights by the simulator's true click probability; the others run unchanged."""
    from omegaconf import OmegaConf

    for name in settings.objectives:
        objective = OmegaConf.load(config_path(name)).objective.name
        if "oracle_propensity" in param_names(OBJECTIVES[objective].params_type):
            settings.objective_params.setdefault(name, {})["oracle_propensity"] = "true"
    return settings


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


# Data --------------------------------------------------------------------------------------------


def prepare_data(settings: Settings, work: Path) -> tuple[Path, dict]:
    """Simulate or convert the data set once under ``work`` (reused when its config matches).

    Returns:
        The data set directory and its record (``simulation.json`` / ``conversion.json``).
    """
    if settings.is_coat:
        cfg, record_file = settings.coat(), CONVERSION_FILE
        prefix = "coat" if settings.attributes else "coat-ids"
    else:
        cfg, record_file = settings.simulator(), SIMULATION_FILE
        prefix = "data"
    data_dir = work / f"{prefix}-{_digest(asdict(cfg))}"
    record_path = data_dir / record_file
    if record_path.is_file() and json.loads(record_path.read_text()).get("config") == asdict(cfg):
        log.info("reusing %s data in %s", settings.data, data_dir)
    elif settings.is_coat:
        log.info("converting Coat into %s", data_dir)
        convert_coat(data_dir, cfg=cfg, attributes=settings.attributes, overwrite=True)
    else:
        log.info("simulating %d rows into %s", cfg.rows, data_dir)
        simulate(cfg, data_dir, overwrite=True, progress=False)
    return data_dir, json.loads(record_path.read_text())


def confounding_floor(cfg: SimulatorConfig, rows: int = 200_000) -> dict[str, float]:
    """How much CVR bias any estimator that sees only the features must keep in this simulator.

    The simulator's click and conversion logits share a hidden confounder ``z ~ N(0, 1)`` that is
    never written. A CVR model that sees the features ``x`` (and clicks) can at best learn
    ``E[r | x, click]`` — IPW, DR and BADR with propensities ``P(click | x)`` included, since
    reweighting by a function of ``x`` does not change that per-``x`` target. Averaged over
    impressions, ``E[r | x, click]`` exceeds the true CVR ``E[r | x]``; the difference is the
    bias floor. Computed by Gauss-Hermite quadrature over ``z`` on ``rows`` fresh impressions of
    the same population (the simulator's own structural model, read through its private
    helpers: this is a diagnostic of the benchmark, not an API).

    Returns:
        ``true_cvr``: mean true CVR; ``clicked_cvr``: its click-weighted mean (what training on
        clicks targets with no features at all); ``feature_oracle_cvr``: mean of
        ``E[r | x, click]``; ``bias_floor`` = ``feature_oracle_cvr - true_cvr``; ``naive_gap`` =
        ``clicked_cvr - true_cvr``; ``mean_propensity`` and ``share_propensity_below_2pct`` of
        ``P(click | x)``.
    """
    from trainer.data import simulator as sim

    population = sim._build_population(cfg)
    a0, b0 = sim._calibrate(population, cfg)
    # Logits without z (confounding=0); z enters both with weight cfg.confounding.
    draw = sim._draw(
        population, rows, np.random.default_rng([cfg.seed, 99]), 0.0, cfg.observed_confounding
    )
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
    p_click = sigmoid(a0 + draw.click_score[:, None] + cfg.confounding * nodes[None])
    p_conv = sigmoid(b0 + draw.conv_score[:, None] + cfg.confounding * nodes[None])
    propensity = p_click @ weights  # P(click | x)
    true_cvr = p_conv @ weights  # E[r | x]
    clicked_cvr = (p_click * p_conv) @ weights / propensity  # E[r | x, click]
    return {
        "true_cvr": float(true_cvr.mean()),
        "clicked_cvr": float((propensity * clicked_cvr).sum() / propensity.sum()),
        "feature_oracle_cvr": float(clicked_cvr.mean()),
        "bias_floor": float(clicked_cvr.mean() - true_cvr.mean()),
        "naive_gap": float((propensity * clicked_cvr).sum() / propensity.sum() - true_cvr.mean()),
        "mean_propensity": float(propensity.mean()),
        "share_propensity_below_2pct": float((propensity < 0.02).mean()),
    }


def truth_reference(data_dir: Path) -> dict[str, float]:
    """The table's metrics of the simulator's own probabilities on the test split: the best any
    model can score (``true_ctr`` is the ideal propensity, ``true_cvr`` the ideal pCVR)."""
    import pyarrow.parquet as pq

    columns = ["click", "conversion", "true_ctr", "true_cvr", "cf_conversion"]
    test = pq.read_table(sorted((data_dir / TEST_SPLIT).glob("*.parquet")), columns=columns)
    c = {name: test.column(name).to_numpy() for name in columns}
    return compute_metrics(
        c["true_ctr"],
        c["true_cvr"],
        c["click"],
        c["conversion"],
        truth={"true_cvr": c["true_cvr"], "cf_conversion": c["cf_conversion"]},
    )


# Runs --------------------------------------------------------------------------------------------


@dataclass
class Run:
    objective: str
    seed: int
    config: Path
    overrides: list[str]
    run_dir: Path

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trainer.train",
            "--config",
            str(self.config),
            f"output_dir={self.run_dir}",
            *self.overrides,
        ]


def plan_runs(settings: Settings, data_dir: Path, work: Path) -> list[Run]:
    runs = []
    for objective in settings.objectives:
        config = config_path(objective, settings.data)
        assert config is not None, "Settings.check() names objectives without a config"
        for seed in settings.seeds:
            overrides = settings.overrides(data_dir, objective, seed)
            key = _digest([config.read_text(), overrides])
            runs.append(
                Run(
                    objective,
                    seed,
                    config,
                    overrides,
                    work / "runs" / f"{objective}-seed{seed}-{key}",
                )
            )
    return runs


def execute(run: Run, threads: int) -> tuple[dict[str, float], float, bool]:
    """Train and evaluate one run, or reuse it; its log is ``run_dir/train.log``.

    Returns:
        The run's metrics, the seconds its training and evaluation took, whether it was reused.
    """
    files = run.files
    metrics = files.read_evaluation()
    if metrics is not None:
        log.info("%s seed %d: reusing %s", run.objective, run.seed, files.evaluation_dir)
        seconds = (
            float(files.read_text(_SECONDS_FILE)) if files.exists(_SECONDS_FILE) else float("nan")
        )
        return metrics, seconds, True
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    # The trainer's output goes straight to a local file, to be followed while it runs.
    with open(run.run_dir / "train.log", "w") as out:
        done = subprocess.run(
            run.command(), cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    metrics = files.read_evaluation()
    if done.returncode != 0 or metrics is None:
        tail = (run.run_dir / "train.log").read_text().strip().splitlines()[-15:]
        raise RuntimeError(
            f"{run.objective} seed {run.seed} failed (exit {done.returncode}); "
            f"log {run.run_dir / 'train.log'}:\n" + "\n".join(tail)
        )
    seconds = time.perf_counter() - started
    files.write_text(_SECONDS_FILE, f"{seconds:.1f}\n")
    log.info("%s seed %d: done in %.0f s", run.objective, run.seed, seconds)
    return metrics, seconds, False


# Reports -----------------------------------------------------------------------------------------


def aggregate(
    runs: list[Run], results: list[dict[str, float]], columns: dict[str, str] = COLUMNS
) -> dict[str, dict[str, list[float]]]:
    """objective -> metric -> one value per seed (in seed order), plus ``PAIRED_BIAS`` when
    the runs have ``cvr_bias`` (ground truth) and naive is among them."""
    table: dict[str, dict[str, list[float]]] = {}
    for run, metrics in zip(runs, results):
        row = table.setdefault(run.objective, {})
        for column in (*columns, "pcvr_mean", "true_cvr_mean", "cvr_calibration"):
            row.setdefault(column, []).append(float(metrics.get(column, float("nan"))))
    if "naive" in table and "cvr_bias" in columns:
        naive = table["naive"]["cvr_bias"]
        for row in table.values():
            row[PAIRED_BIAS] = [bias - base for bias, base in zip(row["cvr_bias"], naive)]
    return table


def write_markdown(
    path: Path,
    settings: Settings,
    table: dict,
    record: dict,
    floor: dict | None,
    timing: dict[str, float],
    truth: dict[str, float],
) -> str:
    """The benchmark's markdown page; returns its metrics table (also printed)."""
    if settings.is_coat:
        text = coat_table(table, settings)
        data_lines = _coat_lines(settings, record, table)
    else:
        columns = list(COLUMNS) + (
            [PAIRED_BIAS] if PAIRED_BIAS in next(iter(table.values())) else []
        )
        text = metrics_table(table, columns)
        data_lines = _simulated_lines(settings, record, floor, text, truth)
    config_names = sorted({_config_name(n, settings.data) for n in settings.objectives})
    lines = [
        f"# Quality benchmark: {settings.data}" + (" (validation split)" if settings.tunes else ""),
        "",
        (
            f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`. Run time "
            f"{timing['run_seconds'] / 60:.0f} min summed over the runs ({timing['jobs']:.0f} at a time); "
            f"this invocation {timing['wall_seconds'] / 60:.0f} min, {timing['reused']:.0f} of "
            f"{timing['runs']:.0f} runs reused from an earlier one."
        ),
        "",
        f"{len(settings.objectives)} objectives x {len(settings.seeds)} seeds ({settings.seeds}), mean ± std "
        "(sample std over seeds). Same data, backbone and budget for all: "
        f"{settings.steps} steps of {settings.batch_size} rows, embedding dim {settings.dim}, MMoE "
        f"{settings.num_experts} experts {settings.expert_sizes}, towers {settings.tower_sizes}, Adam lr "
        f"{settings.dense_lr} (weight decay {settings.weight_decay}"
        + (
            f", decayed linearly to x{settings.final_lr_scale}"
            if settings.final_lr_scale != 1.0
            else ", constant"
        )
        + f"), row-wise Adagrad lr {settings.sparse_lr}"
        + (
            f", training rows read grouped by user in runs of at most {settings.group_rows}"
            if settings.group_rows
            else ""
        )
        + ". "
        f"Each objective's hyper-parameters are those of its config ({', '.join(config_names)})"
        + (f", with overrides {settings.objective_params}" if settings.objective_params else "")
        + ".",
        "",
        *data_lines,
    ]
    path.write_text("\n".join(lines) + "\n")
    return text


def _config_name(objective: str, data: str) -> str:
    config = config_path(objective, data)
    return f"`{config.name}`" if config is not None else f"no config for {objective}"


def _simulated_lines(
    settings: Settings, simulation: dict, floor: dict | None, text: str, truth: dict[str, float]
) -> list[str]:
    gap = simulation["splits"][TEST_SPLIT]
    lines = [
        (
            f"Data: `trainer.data.simulator`, {settings.rows:,} impressions (seed {settings.data_seed}, "
            f"observed confounding {settings.observed_confounding}, hidden confounding {settings.confounding}); test split: CTR {gap['ctr']:.4f}, CVR on clicks "
            f"{gap['cvr_on_clicks']:.4f}, mean true CVR {gap['mean_true_cvr']:.4f} (selection gap "
            f"{gap['selection_gap']:+.4f})."
        ),
        "",
        text,
        "",
        "The simulator's true probabilities score "
        + ", ".join(f"{column} {truth[column]:.4f}" for column in COLUMNS if column != "cvr_bias")
        + " (the best any model can do; `true_ctr` is the ideal propensity).",
        "",
        (
            "`cvr_bias` = mean pCVR − mean true CVR over the test impressions (0 is unbiased); "
            "`cvr_auc_whole_space` / `cvr_logloss_whole_space` score pCVR against the counterfactual "
            "conversion of every impression. `cvr_auc` is on clicked impressions only. "
            f"`{PAIRED_BIAS}`: cvr_bias minus naive's with the same seed (same initial weights and "
            "data order), mean ± std over seeds; negative is less biased than naive. "
            "`cvr_ips_bias`: the self-normalised IPS estimate of the mean CVR (test labels weighted "
            "by 1 / the run's own pCTR) minus the true mean CVR, i.e. how much of the selection gap "
            "these propensities cannot undo: the bias an IPW-trained intercept would keep; a CVR "
            "tower does better only where its own features separate what the propensities do not "
            "(the true probabilities' figure weights by the true propensities)."
        ),
    ]
    if floor is not None:
        hidden = (
            "The hidden confounder leaves any estimator that sees only the features, reweighted by "
            f"P(click | features) or not, at best at mean E[r | x, click] = {floor['feature_oracle_cvr']:.4f}: "
            f"a bias floor of {floor['bias_floor']:+.4f} (true CVR {floor['true_cvr']:.4f})."
            if settings.confounding > 0
            else "No hidden confounder: the selection acts through the features only, so with "
            "propensities P(click | x) the bias floor is 0."
        )
        lines += [
            "",
            (
                "Bias reference (population, not the test sample): training on clicks with no features "
                f"targets CVR {floor['clicked_cvr']:.4f} (gap {floor['naive_gap']:+.4f}). {hidden} P(click | x): mean "
                f"{floor['mean_propensity']:.4f}, {floor['share_propensity_below_2pct']:.0%} of impressions below 0.02."
            ),
        ]
    return lines


def coat_table(table: dict, settings: Settings) -> str:
    """Our metrics (mean ± std) beside each method's published AUC / NDCG@5 / Recall@5 (test set
    only: validation numbers are not comparable with them)."""
    if settings.tunes:
        return metrics_table(table, list(COAT_COLUMNS))
    k = RANKING_K
    rows: dict[str, dict[str, object]] = {}
    for objective, values in table.items():
        row: dict[str, object] = {column: values[column] for column in COAT_COLUMNS}
        for backbone in ("MF", "NCF"):
            published = PUBLISHED_COAT.get(objective, {}).get(backbone)
            if published is not None:
                for name, value in zip(("AUC", f"NDCG@{k}", f"Recall@{k}"), published, strict=True):
                    row[f"{backbone} {name}"] = value
        rows[objective] = row
    published_columns = [
        f"{b} {m}" for b in ("MF", "NCF") for m in ("AUC", f"NDCG@{k}", f"Recall@{k}")
    ]
    return metrics_table(rows, [*COAT_COLUMNS, *published_columns])


def _evaluated_split_text(settings: Settings, evaluated: dict) -> str:
    """What the Coat runs were evaluated on, for the table's caption."""
    ratings = f"{evaluated['rows']:,} ratings, {evaluated['cvr_on_clicks']:.1%} >= 3"
    if not settings.validation:
        return f"the random-exposure test set ({ratings})"
    if settings.validation_from == TEST_SPLIT:
        held_out = f"{settings.validation:.0%} of the random-exposure ratings"
        if settings.tunes:
            return f"the validation split ({held_out}, drawn at random: {ratings})"
        return f"the random-exposure test set less its validation split of {held_out} ({ratings})"
    if settings.tunes:
        return (
            f"the validation split ({settings.validation:.0%} of the training pairs held out, "
            f"{evaluated['rows']:,} pairs, {evaluated['clicks']:,} rated; metrics on the rated ones)"
        )
    return f"the random-exposure test set ({ratings}; {settings.validation:.0%} of the training pairs held out)"


def _coat_lines(settings: Settings, conversion: dict, table: dict) -> list[str]:
    train, evaluated = (
        conversion["splits"][TRAIN_SPLIT],
        conversion["splits"][settings.evaluated_split],
    )
    where = _evaluated_split_text(settings, evaluated)
    best = max(table, key=lambda name: np.nanmean(table[name]["cvr_auc"]))
    best_auc = float(np.nanmean(table[best]["cvr_auc"]))
    features = (
        "user and item ids and attributes" if settings.attributes else "user and item ids only"
    )
    lines = [
        (
            f"Data: Coat (`trainer/data/datasets/coat`), {train['rows']:,} user x item training pairs "
            f"({train['clicks']:,} rated, {train['cvr_on_clicks']:.1%} of the ratings >= 3); features: {features}. "
            f"Evaluated on {where}: `cvr_auc` is the AUC of pCVR; `ndcg@{RANKING_K}` / `recall@{RANKING_K}` "
            "rank each user's rated items by pCVR (users without a positive count with NDCG 1 and Recall 0, "
            "as in the public code these papers build on); `cvr_gauc` is the per-user AUC weighted by each "
            "user's rated rows; `cvr_logloss` is pCVR's log loss on the same rows."
        ),
        "",
        coat_table(table, settings),
    ]
    if settings.tunes:
        return lines
    lines += [
        "",
        "Published: MF = BADR paper, Table 3 (matrix factorisation, ids only); NCF = Adap-SL paper, "
        "Table 1 (neural collaborative filtering, ids only); both tune learning rate, weight decay and "
        "embedding size per method on Coat and report the mean of 5 seeds. The two papers' Recall@5 "
        "are not on one scale (similar NDCG@5, Recall@5 about 0.05 apart): compare within a column. "
        "Our backbone is an MMoE over the embeddings"
        + (
            "; it also reads the user and item attributes, theirs read ids only (`--ids-only`: ids only)."
            if settings.attributes
            else ", on ids only like theirs."
        ),
    ]
    verdict = "reached" if best_auc >= PUBLISHED_BEST_AUC else "not reached"
    lines += [
        "",
        f"Best AUC here: {best} {best_auc:.4f}; the papers' best, Adap-SL-DR {PUBLISHED_BEST_AUC}: {verdict}.",
    ]
    backbone = multi_task_gain(table)
    if backbone:
        lines += ["", backbone]
    return lines


def multi_task_gain(table: dict) -> str:
    """One sentence: naive (CTR and CVR sharing the backbone) minus naive_single_task (the
    papers' naive, a CVR model fitted to the clicks alone), paired by seed, for AUC and NDCG@5;
    empty unless both ran."""
    if not {"naive", "naive_single_task"} <= set(table):
        return ""
    parts = []
    for column, label in (("cvr_auc", "AUC"), (f"ndcg@{RANKING_K}", f"NDCG@{RANKING_K}")):
        gains = np.subtract(table["naive"][column], table["naive_single_task"][column])
        spread = f" ± {gains.std(ddof=1):.4f}" if len(gains) > 1 else ""
        parts.append(f"{label} {gains.mean():+.4f}{spread}")
    return (
        "The multi-task backbone alone (naive, whose CTR task shares the embeddings and experts, "
        "minus naive_single_task, the papers' naive: a CVR model fitted to the ratings only), "
        f"paired by seed: {', '.join(parts)}."
    )


def write_chart(path: Path, table: dict, settings: Settings, floor: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    panels = dict(columns_for(settings.data))
    if PAIRED_BIAS in next(iter(table.values())):
        panels[PAIRED_BIAS] = "CVR bias minus naive's, same seed"
    rows, cols = (1, len(panels)) if settings.is_coat else (2, 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (column, title) in zip(axes.flat, panels.items()):
        values = [np.asarray(table[n][column], dtype=float) for n in names]
        means = [v.mean() for v in values]
        stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
        colors = [
            "#999999" if n in ("naive", "naive_single_task", "esmm") else "#3b75af" for n in names
        ]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_title(title)
        marks = _published_marks(names, column) if settings.is_coat and not settings.tunes else []
        for marker, label, xs, ys in marks:
            ax.scatter(xs, ys, marker=marker, color="#c44e52", zorder=3, label=label)
        if marks:
            ax.legend(fontsize=8, loc="lower right")
        if column in ("cvr_bias", "cvr_ips_bias", PAIRED_BIAS):
            ax.axhline(0.0, color="black", linewidth=0.8)
            if floor is not None and column == "cvr_bias" and settings.confounding > 0:
                ax.axhline(
                    floor["bias_floor"],
                    color="#c44e52",
                    linestyle="--",
                    linewidth=1,
                    label="floor from hidden confounding",
                )
                ax.legend(fontsize=8, loc="lower right")
        else:
            finite = [m for m in means if np.isfinite(m)] + [y for *_, ys in marks for y in ys]
            if finite:
                low, high = min(finite), max(finite)
                pad = max(0.1 * (high - low), 0.005)
                ax.set_ylim(low - pad - max(stds, default=0), high + pad + max(stds, default=0))
    if settings.is_coat:
        split = (
            f"validation split {settings.validation:.0%}"
            if settings.tunes
            else "random-exposure test"
        )
        ids = "" if settings.attributes else ", ids only"
        title = f"coat ({split}{ids}): {len(settings.seeds)} seeds, {settings.steps} steps x {settings.batch_size} rows"
    else:
        title = (
            f"{settings.data}: {len(settings.seeds)} seeds, {settings.steps} steps x {settings.batch_size} rows, "
            f"confounding {settings.confounding}"
        )
    fig.suptitle(title + " (grey: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _published_marks(
    names: list[str], column: str
) -> list[tuple[str, str, list[int], list[float]]]:
    """(marker, legend label, x positions, values) of the published numbers of one Coat metric."""
    position = {"cvr_auc": 0, f"ndcg@{RANKING_K}": 1, f"recall@{RANKING_K}": 2}.get(column)
    if position is None:
        return []
    marks = []
    for backbone, marker, label in (
        ("MF", "x", "published, MF (BADR)"),
        ("NCF", "+", "published, NCF (Adap-SL)"),
    ):
        xs = [i for i, n in enumerate(names) if backbone in PUBLISHED_COAT.get(n, {})]
        ys = [PUBLISHED_COAT[names[i]][backbone][position] for i in xs]
        if xs:
            marks.append((marker, label, xs, ys))
    return marks


# Entry point -------------------------------------------------------------------------------------


def _parse_objective_params(values: list[str]) -> dict[str, dict[str, str]]:
    params: dict[str, dict[str, str]] = {}
    for item in values:
        name_key, sep, value = item.partition("=")
        name, dot, key = name_key.partition(".")
        if not (sep and dot and name and key):
            raise ValueError(
                f"--objective-param {item!r}: expected OBJECTIVE.KEY=VALUE, e.g. multi_ipw.tau=0.01"
            )
        params.setdefault(name, {})[key] = value
    return params


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=[d.value for d in DataSet], default=defaults.data)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny data/model/budget, 2 objectives, 1 seed",
    )
    parser.add_argument(
        "--objectives",
        nargs="+",
        help=f"runs by config stem; default: all ({' '.join(default_runs())})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (coat: 0 1 2 3 4)")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dim", type=int, help="embedding dimension (default 16)")
    parser.add_argument(
        "--interaction",
        choices=["none", "dot"],
        help="model.interaction of every run (default none; see trainer/model/interaction.py)",
    )
    parser.add_argument("--dense-lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--sparse-lr", type=float)
    parser.add_argument(
        "--group-rows",
        type=int,
        help="read training rows grouped by user, in runs of at most this many "
        "(data.group_rows; for objective-param <run>.pairwise_weight)",
    )
    parser.add_argument(
        "--validation",
        type=float,
        help="coat: hold out this share of the training pairs "
        "and evaluate on it instead of the test set (for tuning)",
    )
    parser.add_argument(
        "--validation-from",
        choices=VALIDATION_SOURCES,
        help="coat: draw the validation share from the training pairs (default) or from the "
        "random-exposure test ratings (the BADR paper's validation set; the test keeps the rest)",
    )
    parser.add_argument(
        "--report-test",
        action="store_true",
        help="coat, with --validation: evaluate on the test set (less the validation share "
        "when it is drawn from it) instead of the validation split: the test run after tuning",
    )
    parser.add_argument(
        "--ids-only",
        action="store_true",
        help="coat: user and item ids only, no attributes "
        "(the input of the papers' MF / NCF backbones)",
    )
    parser.add_argument(
        "--final-lr-scale",
        type=float,
        help="the dense lr decays linearly to dense-lr x this (1: constant; default 0.05, coat 1)",
    )
    parser.add_argument("--confounding", type=float, default=defaults.confounding)
    parser.add_argument("--observed-confounding", type=float, default=defaults.observed_confounding)
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed)
    parser.add_argument(
        "--objective-param",
        action="append",
        default=[],
        metavar="OBJECTIVE.KEY=VALUE",
        help="override one objective's hyper-parameter, e.g. multi_ipw.tau=0.01 (repeatable)",
    )
    parser.add_argument(
        "--oracle-propensity",
        action="store_true",
        help="diagnostic: IPW / DR objectives weight by the true click probability",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: cores / jobs)"
    )
    parser.add_argument("--name", help="output stem quality_<name> (default: the --data value)")
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--work", type=Path, default=_ROOT / "runs" / "quality", help="data and run directories"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )

    settings = Settings.for_data(
        args.data,
        confounding=args.confounding,
        observed_confounding=args.observed_confounding,
        data_seed=args.data_seed,
    )
    settings.attributes = not args.ids_only
    settings.report_test = args.report_test
    if args.seeds:
        settings.seeds = args.seeds
    if args.objectives:
        settings.objectives = args.objectives
    if args.quick:
        settings = quick_settings(settings, bool(args.objectives))
    for name in (
        "rows",
        "steps",
        "batch_size",
        "dim",
        "interaction",
        "dense_lr",
        "weight_decay",
        "sparse_lr",
        "final_lr_scale",
        "validation",
        "validation_from",
        "group_rows",
    ):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    try:
        settings.objective_params = _parse_objective_params(args.objective_param)
        if args.oracle_propensity:
            settings = with_oracle_propensity(settings)
        settings.check()
    except ValueError as err:
        parser.error(str(err))
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    log.info("settings: %s (jobs %d, threads %d)", json.dumps(asdict(settings)), jobs, threads)

    started = time.perf_counter()
    work = args.work.resolve()
    data_dir, record = prepare_data(settings, work)
    runs = plan_runs(settings, data_dir, work)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda run: execute(run, threads), runs))
    results = [metrics for metrics, _, _ in done]
    floor = None
    if not settings.is_coat:
        try:
            floor = confounding_floor(settings.simulator(), rows=20_000 if args.quick else 200_000)
        except Exception as err:  # noqa: BLE001 (a diagnostic only: the simulator's internals may change)
            log.warning("no bias floor: %s", err)
    timing = {
        "wall_seconds": time.perf_counter() - started,
        "run_seconds": float(np.nansum([seconds for _, seconds, _ in done])),
        "reused": float(sum(reused for _, _, reused in done)),
        "runs": float(len(runs)),
        "jobs": float(jobs),
    }

    table = aggregate(runs, results, columns_for(settings.data))
    name = args.name or settings.data
    args.out.mkdir(parents=True, exist_ok=True)
    md, png, raw = (args.out / f"quality_{name}{ext}" for ext in (".md", ".png", ".json"))
    truth = {} if settings.is_coat else truth_reference(data_dir)
    text = write_markdown(md, settings, table, record, floor, timing, truth)
    pruning = pruning_section(settings, runs)
    if pruning:
        with open(md, "a") as f:
            f.write(f"\n{pruning}\n")
        text += "\n\n" + pruning
    write_chart(png, table, settings, floor)
    raw.write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "conversion" if settings.is_coat else "simulation": record,
                "bias_reference": floor,
                "truth_metrics": truth,
                "timing": timing,
                "runs": [
                    {
                        "objective": r.objective,
                        "seed": r.seed,
                        "config": str(r.config),
                        "run_dir": str(r.run_dir),
                        "seconds": seconds,
                        "metrics": m,
                    }
                    for r, (m, seconds, _) in zip(runs, done)
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    if floor is not None:
        print(
            f"bias floor from hidden confounding: {floor['bias_floor']:+.4f}; naive gap {floor['naive_gap']:+.4f}"
        )
    print(f"wrote {md}, {png}, {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
