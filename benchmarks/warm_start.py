"""Warm start against training from scratch on consecutive simulated days.

Run from the repository root::

    .venv/bin/python benchmarks/warm_start.py            # about 30 min on 2 busy CPU cores
    .venv/bin/python benchmarks/warm_start.py --quick    # smoke test, a few minutes

The daily loop in small: ``trainer.data`` simulates three consecutive days (users and items
shared, newcomers every day, popularity drifting; ``--days 3``), and for every seed:

1. **day 1**: a model trained from scratch on day 1's training partition;
2. **day 2**, trained on day 2's training partition for the same number of steps by three
   arms: ``scratch`` (a fresh model), ``warm`` (``train.init_from`` = the day-1 run: its
   weights, a fresh optimizer) and ``warm + optimizer`` (``train.init_optimizer=true`` too);
3. every arm's checkpoints along the way (``--every`` steps) are evaluated on **day 3**'s test
   partition: the day the model would serve. Step 0 of the warm arms is the day-1 model itself.

The expected direction, that a warm start reaches the from-scratch model's quality in fewer
steps, is checked, not assumed: for every metric, the first step at which a warm arm's mean
over seeds is at least as good as the scratch arm's at its last step, and at its best step
(the two differ when more steps over-fit), or "never".

Outputs, under ``--out`` (default ``benchmarks/results``), named ``warm_start`` (or
``warm_start_<--name>``): ``.md`` (the settings, the quality of each arm at the last step, the
steps a warm arm needs to match scratch, the curves of CTCVR AUC and CTR AUC over steps),
``.png`` (one panel per metric, one line per arm, mean and std over seeds) and ``.json``
(settings, every evaluation). Quality does not depend on machine load, only the wall time does.
Run directories and evaluations are kept under ``--work`` and reused, so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

from schemas.layout import TEST_SPLIT, TRAIN_SPLIT
from trainer.data.simulator import DAY_PARTITION, SIMULATION_FILE, SimulatorConfig, simulate
from trainer.run_dir import RunDir

__all__ = ["ARMS", "METRICS", "Settings", "main", "steps_to_match"]

log = logging.getLogger("warm_start")

CONFIG = _ROOT / "trainer" / "configs" / "esmm_simulated.yaml"
SCRATCH, WARM, WARM_OPTIMIZER = "scratch", "warm", "warm + optimizer"
ARMS = (SCRATCH, WARM, WARM_OPTIMIZER)
# metric -> (title, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "ctcvr_auc": ("CTCVR AUC", True),
    "ctr_auc": ("CTR AUC", True),
    "cvr_auc": ("CVR AUC (clicks)", True),
    "cvr_auc_whole_space": ("CVR AUC, whole space (truth)", True),
    "ctr_logloss": ("CTR log loss", False),
    "ctcvr_logloss": ("CTCVR log loss", False),
}
CURVE_METRICS = ("ctcvr_auc", "ctr_auc")  # tabulated over steps in the markdown
_EVAL_DIR = "eval_day3"  # in each run directory: one metrics.json per checkpoint evaluated


@dataclass
class Settings:
    """Everything that determines the benchmark (written into its outputs)."""

    # Impressions per day, 20 % of them in the day's test partition: 256,000 training rows, one
    # pass at 250 steps of 1024. A second pass over the same day over-fits (benchmarks/README.md).
    rows: int = 320_000
    num_users: int = 20_000  # users on day 1 (3 % more arrive each later day)
    num_items: int = 10_000  # items on day 1 (5 % more each later day)
    popularity_drift: float = 0.3  # the simulator's daily log-popularity step
    data_seed: int = 0
    start: str = "2026-12-01"
    day1_steps: int = 250  # day 1, from scratch
    steps: int = 250  # day 2, every arm
    every: int = 25  # checkpoint (and evaluation) interval on day 2
    batch_size: int = 1024
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # model init and data order
    num_experts: int = 4
    expert_sizes: list[int] = field(default_factory=lambda: [64])
    tower_sizes: list[int] = field(default_factory=lambda: [32])
    dense_lr: float = 2e-3  # constant: every checkpoint of the curve sees the same lr
    sparse_lr: float = 0.05

    def check(self) -> None:
        for name in ("rows", "day1_steps", "steps", "every", "batch_size", "num_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")

    def simulator(self) -> SimulatorConfig:
        return SimulatorConfig(
            rows=self.rows,
            days=3,
            start=self.start,
            seed=self.data_seed,
            num_users=self.num_users,
            num_items=self.num_items,
            popularity_drift=self.popularity_drift,
        )

    @property
    def checkpoints(self) -> list[int]:
        """Day-2 steps evaluated (the last one always)."""
        return sorted({*range(self.every, self.steps, self.every), self.steps})


def quick_settings(settings: Settings) -> Settings:
    """``--quick``: small days, model and budget, one seed."""
    settings.rows, settings.num_users, settings.num_items = 30_000, 3_000, 2_000
    settings.day1_steps, settings.steps, settings.every, settings.batch_size = 20, 20, 10, 512
    settings.num_experts, settings.expert_sizes, settings.tower_sizes = 2, [16], [8]
    settings.seeds = settings.seeds[:1]
    return settings


# Data ---------------------------------------------------------------------------------------------


def prepare_data(settings: Settings, work: Path) -> tuple[Path, list[str], dict]:
    """The three days, simulated once per simulator config. Returns the data set, its day names
    and its ``simulation.json``."""
    cfg = settings.simulator()
    data = work / "data" / _digest(asdict(cfg))
    record_file = data / SIMULATION_FILE
    if not record_file.exists():
        log.info("simulating %d days of %d impressions into %s", cfg.days, cfg.rows, data)
        simulate(cfg, data, overwrite=True, progress=False)
    return data, cfg.day_names, json.loads(record_file.read_text())


# Runs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run: day 1 (``arm`` None) or one day-2 arm, for one seed."""

    seed: int
    arm: str | None
    run_dir: Path
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"seed {self.seed} {self.arm or 'day 1'}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trainer.train",
            "--config",
            str(CONFIG),
            f"output_dir={self.run_dir}",
            *self.overrides,
        ]


def plan_runs(settings: Settings, data: Path, days: list[str], work: Path) -> dict[str, list[Run]]:
    """Day-1 runs and day-2 arms for every seed; run directories keyed by their settings."""

    def common(day: str, seed: int, steps: int) -> list[str]:
        return [
            f"data.train={data / TRAIN_SPLIT}",
            f"data.filter={DAY_PARTITION} == '{day}'",
            f"data.test={data / TEST_SPLIT / f'{DAY_PARTITION}={days[2]}'}",
            f"data.batch_size={settings.batch_size}",
            f"model.num_experts={settings.num_experts}",
            f"model.expert_sizes=[{','.join(map(str, settings.expert_sizes))}]",
            f"model.tower_sizes=[{','.join(map(str, settings.tower_sizes))}]",
            f"dense_optimizer.lr={settings.dense_lr}",
            f"sparse_optimizer.lr={settings.sparse_lr}",
            f"seed={seed}",
            f"train.steps={steps}",
            f"train.log_every={max(1, settings.every // 2)}",
            f"train.checkpoint_every={settings.every}",
            "train.keep_checkpoints=1000",
            "train.evaluate=false",
            "train.progress=false",
        ]

    runs: dict[str, list[Run]] = {"day1": [], "day2": []}
    for seed in settings.seeds:
        day1_overrides = common(days[0], seed, settings.day1_steps)
        day1 = Run(seed, None, _run_dir(work, "day1", seed, day1_overrides), tuple(day1_overrides))
        runs["day1"].append(day1)
        for arm in ARMS:
            overrides = common(days[1], seed, settings.steps)
            if arm != SCRATCH:
                overrides.append(f"train.init_from={day1.run_dir}")
            if arm == WARM_OPTIMIZER:
                overrides.append("train.init_optimizer=true")
            runs["day2"].append(
                Run(seed, arm, _run_dir(work, arm, seed, overrides), tuple(overrides))
            )
    return runs


def _run_dir(work: Path, arm: str, seed: int, overrides: list[str]) -> Path:
    slug = arm.replace(" + ", "_").replace(" ", "_")
    return work / "runs" / f"{slug}-seed{seed}-{_digest([CONFIG.read_text(), overrides])}"


def train(run: Run, threads: int) -> None:
    """Train ``run`` unless its last checkpoint is there; its log is ``run_dir/train.log``."""
    steps = int(next(o for o in run.overrides if o.startswith("train.steps=")).split("=")[1])
    latest = RunDir(run.run_dir).latest_checkpoint() if run.run_dir.exists() else None
    if latest is not None and latest.read_meta().step == steps:
        log.info("%s: reusing %s", run.name, run.run_dir)
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(run.run_dir / "train.log", "w") as out:
        done = subprocess.run(
            [*run.command(), "--resume"],  # an interrupted run continues from its checkpoints
            cwd=_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        tail = (run.run_dir / "train.log").read_text().strip().splitlines()[-15:]
        raise RuntimeError(
            f"{run.name} failed (exit {done.returncode}); log {run.run_dir / 'train.log'}:\n"
            + "\n".join(tail)
        )
    log.info("%s: trained in %.0f s", run.name, time.perf_counter() - started)


# Evaluation ---------------------------------------------------------------------------------------


def evaluate_checkpoints(
    run_dir: str, data: str, steps: list[int], threads: int
) -> dict[int, dict[str, float]]:
    """Metrics of a run's checkpoints at ``steps`` on ``data`` (a worker process: every
    evaluation starts and leaves its own process group). Each is written under the run's
    ``eval_day3/step_<N>/`` and reused when there."""
    import torch

    from trainer.evaluation.run import evaluate_run

    torch.set_num_threads(threads)
    results = {}
    for step in steps:
        out = Path(run_dir) / _EVAL_DIR / f"step_{step:08d}"
        if not (out / "metrics.json").exists():
            evaluate_run(run_dir, data=data, out_dir=out, checkpoint=f"step_{step:08d}")
        results[step] = json.loads((out / "metrics.json").read_text())
    return results


def movement(start_run: str, start_step: int, end_run: str, end_step: int) -> dict[str, float]:
    """How far training moved a model: ``||w_end - w_start|| / ||w_start||`` over each part of
    it (the embedding tables together, the experts, each head's gate and tower), read from two
    checkpoints (a worker process)."""
    from trainer.checkpoint import find_checkpoint, model_tensor_specs, read_model_tensors
    from trainer.warm_start import component_of

    def weights(run: str, step: int) -> dict:
        checkpoint = find_checkpoint(RunDir(run), f"step_{step:08d}")
        return read_model_tensors(checkpoint, model_tensor_specs(checkpoint))

    start, end = weights(start_run, start_step), weights(end_run, end_step)
    change: dict[str, float] = {}
    size: dict[str, float] = {}
    for key, before in start.items():
        part = component_of(key)[0]
        part = "embeddings" if part == "sparse_arch" else part
        change[part] = change.get(part, 0.0) + float((end[key] - before).double().pow(2).sum())
        size[part] = size.get(part, 0.0) + float(before.double().pow(2).sum())
    return {part: (change[part] / size[part]) ** 0.5 for part in change if size[part] > 0}


def steps_to_match(
    steps: list[int], warm: list[float], scratch_final: float, higher_is_better: bool
) -> int | None:
    """The first step at which a warm arm's (mean) metric is at least as good as scratch's at
    its last step; None if it never is.

    Example::

        steps_to_match([0, 10, 20], [0.60, 0.70, 0.72], 0.69, True)  # 10
    """
    for step, value in zip(steps, warm, strict=True):
        if (value >= scratch_final) if higher_is_better else (value <= scratch_final):
            return step
    return None


# Reports ------------------------------------------------------------------------------------------


def curves(
    settings: Settings, evaluations: dict[tuple[int, str], dict[int, dict[str, float]]]
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """arm -> metric -> ``steps``, ``mean``, ``std`` over seeds."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for arm in ARMS:
        steps = sorted({s for (seed, a), by in evaluations.items() if a == arm for s in by})
        out[arm] = {}
        for metric in METRICS:
            values = np.array(
                [
                    [evaluations[(seed, arm)][s].get(metric, np.nan) for s in steps]
                    for seed in settings.seeds
                ],
                dtype=float,
            )
            out[arm][metric] = {
                "steps": steps,
                "mean": np.nanmean(values, axis=0).tolist(),
                "std": (
                    np.nanstd(values, axis=0, ddof=1) if len(settings.seeds) > 1 else 0 * values[0]
                ).tolist(),
            }
    return out


def matches(curve: dict) -> dict[str, dict[str, dict[str, int | None]]]:
    """Which scratch step (``last``, ``best``) -> warm arm -> metric -> the steps the warm arm
    needs to be as good (None: never)."""
    out: dict[str, dict[str, dict[str, int | None]]] = {"last": {}, "best": {}}
    for arm in (WARM, WARM_OPTIMIZER):
        for by_arm in out.values():
            by_arm[arm] = {}
        for metric, (_, higher) in METRICS.items():
            scratch = curve[SCRATCH][metric]["mean"]
            targets = {"last": scratch[-1], "best": max(scratch) if higher else min(scratch)}
            found = curve[arm][metric]
            for which, target in targets.items():
                out[which][arm][metric] = steps_to_match(
                    found["steps"], found["mean"], target, higher
                )
    return out


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) and std > 0 else f"{mean:.4f}"


def write_markdown(
    path: Path,
    settings: Settings,
    days: list[str],
    record: dict,
    curve: dict,
    found: dict,
    moved: dict[tuple[int, str], dict[str, float]],
) -> str:
    last = settings.steps
    day1 = record["days"][days[0]]["train"]
    lines = [
        "# Warm start vs training from scratch (simulated days)",
        "",
        (
            f"Three simulated days ({days[0]} .. {days[2]}), {settings.rows:,} impressions a day "
            f"({day1['rows']:,} for training), {settings.num_users:,} users and "
            f"{settings.num_items:,} items on day 1 (3 % / 5 % new ones a day), popularity drift "
            f"{settings.popularity_drift}. Day 1: from scratch, {settings.day1_steps} steps. Day 2: "
            f"{last} steps of {settings.batch_size} rows per arm. Evaluated on day 3's test "
            f"partition; mean ± std over seeds {settings.seeds}. ESMM, MMoE {settings.num_experts} x "
            f"{settings.expert_sizes}, towers {settings.tower_sizes}, dense lr {settings.dense_lr} "
            f"(constant), row-wise Adagrad lr {settings.sparse_lr}. Step 0 of a warm arm is the "
            "day-1 model."
        ),
        "",
        f"## Quality on day 3 after {last} steps on day 2",
        "",
        "| arm | " + " | ".join(title for title, _ in METRICS.values()) + " |",
        "| --- | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for arm in ARMS:
        cells = [_cell(curve[arm][m]["mean"][-1], curve[arm][m]["std"][-1]) for m in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append(
        "| day-1 model (no day-2 step) | "
        + " | ".join(_cell(curve[WARM][m]["mean"][0], curve[WARM][m]["std"][0]) for m in METRICS)
        + " |"
    )
    lines += [
        "",
        "## Steps on day 2 until a warm arm is as good as scratch",
        "",
        "| arm | as good as scratch's | "
        + " | ".join(title for title, _ in METRICS.values())
        + " |",
        "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for which, label in (("last", f"last step ({last})"), ("best", "best step")):
        for arm, by_metric in found[which].items():
            cells = ["never" if s is None else str(s) for s in by_metric.values()]
            lines.append(f"| {arm} | {label} | " + " | ".join(cells) + " |")
    parts = sorted({part for by_part in moved.values() for part in by_part})
    lines += [
        "",
        f"## How far {last} steps on day 2 move the day-1 model (||w - w_day1|| / ||w_day1||)",
        "",
        "| arm | " + " | ".join(parts) + " |",
        "| --- | " + " | ".join("---:" for _ in parts) + " |",
    ]
    for arm in (WARM, WARM_OPTIMIZER):
        cells = []
        for part in parts:
            values = [m[part] for (_, a), m in moved.items() if a == arm and part in m]
            cells.append(
                _cell(float(np.mean(values)), float(np.std(values, ddof=1)))
                if len(values) > 1
                else f"{values[0]:.4f}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for metric in CURVE_METRICS:
        title = METRICS[metric][0]
        steps = curve[WARM][metric]["steps"]
        lines += [
            "",
            f"## {title} on day 3 over day-2 steps",
            "",
            "| step | " + " | ".join(ARMS) + " |",
            "| ---: | " + " | ".join("---:" for _ in ARMS) + " |",
        ]
        for i, step in enumerate(steps):
            cells = []
            for arm in ARMS:
                arm_steps = curve[arm][metric]["steps"]
                if step in arm_steps:
                    j = arm_steps.index(step)
                    cells.append(_cell(curve[arm][metric]["mean"][j], curve[arm][metric]["std"][j]))
                else:
                    cells.append("")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_chart(path: Path, settings: Settings, curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    colors = {SCRATCH: "#999999", WARM: "#3b75af", WARM_OPTIMIZER: "#c44e52"}
    one_pass = settings.simulator().split_rows[TRAIN_SPLIT] / settings.batch_size
    for ax, (metric, (title, _)) in zip(axes.flat, METRICS.items()):
        for arm in ARMS:
            found = curve[arm][metric]
            steps, mean, std = (np.asarray(found[k], dtype=float) for k in ("steps", "mean", "std"))
            ax.plot(steps, mean, marker="o", markersize=3, color=colors[arm], label=arm)
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.15)
        ax.axhline(curve[SCRATCH][metric]["mean"][-1], color="#999999", linestyle="--", lw=0.8)
        if one_pass < settings.steps:  # where the second pass over day 2 begins
            ax.axvline(one_pass, color="black", linestyle=":", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("steps on day 2")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"Warm start vs scratch: evaluated on day 3, {len(settings.seeds)} seeds, "
        f"batch {settings.batch_size} (dashed: scratch after {settings.steps} steps; dotted: "
        "one pass over day 2)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Entry point --------------------------------------------------------------------------------------


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny everything")
    for name in ("rows", "day1_steps", "steps", "every", "batch_size", "num_users", "num_items"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default: {defaults.seeds}")
    parser.add_argument("--popularity-drift", type=float)
    parser.add_argument("--jobs", type=int, default=2, help="runs (and evaluations) at a time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: auto)")
    parser.add_argument("--name", help="output stem warm_start_<name> (default: warm_start)")
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=_ROOT / "runs" / "warm_start")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    settings = quick_settings(Settings()) if args.quick else Settings()
    for name in ("rows", "day1_steps", "steps", "every", "batch_size", "num_users", "num_items"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.seeds:
        settings.seeds = args.seeds
    if args.popularity_drift is not None:
        settings.popularity_drift = args.popularity_drift
    try:
        settings.check()
    except ValueError as err:
        parser.error(str(err))
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    log.info("settings: %s (jobs %d, threads %d)", json.dumps(asdict(settings)), jobs, threads)

    started = time.perf_counter()
    work = args.work.resolve()
    data, days, record = prepare_data(settings, work)
    runs = plan_runs(settings, data, days, work)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda run: train(run, threads), runs["day1"]))
        list(pool.map(lambda run: train(run, threads), runs["day2"]))

    day3 = str(data / TEST_SPLIT / f"{DAY_PARTITION}={days[2]}")
    jobs_for = {run: settings.checkpoints for run in runs["day2"]}
    jobs_for |= {run: [settings.day1_steps] for run in runs["day1"]}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        futures = {
            run: pool.submit(evaluate_checkpoints, str(run.run_dir), day3, steps, threads)
            for run, steps in jobs_for.items()
        }
        done = {run: future.result() for run, future in futures.items()}
    evaluations: dict[tuple[int, str], dict[int, dict[str, float]]] = {}
    for run in runs["day2"]:
        evaluations[(run.seed, run.arm)] = dict(done[run])
    for run in runs["day1"]:  # a warm arm at step 0 is the day-1 model
        for arm in (WARM, WARM_OPTIMIZER):
            evaluations[(run.seed, arm)][0] = done[run][settings.day1_steps]

    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        day1_of = {run.seed: run for run in runs["day1"]}
        moves = {
            (run.seed, run.arm): pool.submit(
                movement,
                str(day1_of[run.seed].run_dir),
                settings.day1_steps,
                str(run.run_dir),
                settings.steps,
            )
            for run in runs["day2"]
            if run.arm != SCRATCH
        }
        moved = {key: future.result() for key, future in moves.items()}

    curve = curves(settings, evaluations)
    found = matches(curve)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"warm_start_{args.name}" if args.name else "warm_start"
    md, png, raw = (args.out / f"{stem}{ext}" for ext in (".md", ".png", ".json"))
    text = write_markdown(md, settings, days, record, curve, found, moved)
    write_chart(png, settings, curve)
    raw.write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "days": days,
                "simulation": record,
                "curves": curve,
                "steps_to_match_scratch": found,
                "moved_on_day2": {f"seed {seed} {arm}": m for (seed, arm), m in moved.items()},
                "evaluations": {
                    f"seed {seed} {arm}": {str(step): m for step, m in by.items()}
                    for (seed, arm), by in evaluations.items()
                },
                # runs and evaluations reused from --work cost nothing here
                "seconds_this_invocation": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    print(f"wrote {md}, {png}, {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
