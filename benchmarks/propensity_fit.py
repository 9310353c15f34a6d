"""How much of the simulator's selection a trained run learned: a diagnostic for ``quality.py``.

Run from the repository root on run directories of ``quality.py`` (simulated data)::

    .venv/bin/python benchmarks/propensity_fit.py runs/quality/runs/naive-seed0-* \\
        runs/quality/runs/multi_ipw-seed0-*

For each run it scores the test split with the run's last checkpoint and prints:

- **What the towers learned.** A least-squares fit of the logit of pCTR (and of pCVR) on the
  components of the simulator's true logits, per test impression: user intent and item appeal
  (which raise clicks and conversions alike: the selection), the click-only user-item taste
  ``<p_u, q_i>``, the user and item click biases and the position effect. A coefficient of 1
  means the tower moves with that component as much as the truth does; 0, not at all. IPW and
  DR can only remove the part of the selection that pCTR follows.
- **Propensities and pCVR by true click probability.** Mean true CTR, pCTR, true CVR and pCVR in
  each quintile of the true click probability; the weights ``1 / pCTR`` are too flat when the
  lowest quintile's pCTR is far above its true CTR.
- **The bias IPW keeps, by IPW bound.** For each bound ``tau`` (``objective.params.tau``), the
  bias of the self-normalised IPW estimate of the mean CVR with propensities ``max(p, tau)``,
  in expectation over the clicks (``ipw_bias``): with the run's pCTR, and with the true click
  probability. An IPW-trained CVR tower's mean matches this estimate (calibration in the
  large), so this is the least mean bias IPW and DR can reach with these propensities. The
  bound's own share is the true-propensity column.
- **What a propensity could learn from the attributes** (once per data set). The same table for
  a propensity that knows every attribute effect of the click logit exactly but none of the
  id-specific parts (the ids' own shares of the latent tastes, intent and appeal): the
  population rebuilt from the same random draws with that id noise scaled to 0
  (``attribute_only_propensity``). A trained pCTR near it has learned what the attributes
  explain; the rest of the selection needs many impressions per id.

It rebuilds the simulated population from the data set's ``simulation.json`` through the
simulator's private helpers (a diagnostic of the benchmark, like ``quality.confounding_floor``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

from schemas.layout import TEST_SPLIT
from trainer.data import simulator as sim
from trainer.distributed import init_distributed, quiet_library_warnings, shutdown_distributed
from trainer.evaluation.predict import evaluation_reader
from trainer.run_dir import RunDir
from trainer.run_model import restore_model

__all__ = ["attribute_only_propensity", "component_logits", "ipw_bias", "main", "score_test_split"]

QUINTILES = 5
BOUNDS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)  # IPW bounds tau of the last table (0: unclipped)


def score_test_split(run_dir: Path) -> dict[str, np.ndarray]:
    """``pctr``, ``pcvr``, ``true_ctr`` and ``true_cvr`` of every test impression, in file order,
    scored by the run's latest checkpoint in this process."""
    quiet_library_warnings()
    ctx = init_distributed("gloo", "cpu")
    restored = None
    try:
        restored = restore_model(RunDir(run_dir), ctx)
        reader = evaluation_reader(restored.config, restored.schema, ctx)
        parts: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for batch in reader:
                out = restored.model(batch.sparse, batch.dense)
                columns = {
                    "pctr": out.pctr,
                    "pcvr": out.pcvr,
                    "true_ctr": batch.truth.true_ctr,
                    "true_cvr": batch.truth.true_cvr,
                }
                for name, values in columns.items():
                    parts.setdefault(name, []).append(values.double().cpu().numpy())
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}
    finally:
        del restored  # the sharded model before the process group
        shutdown_distributed()


def component_logits(data_dir: Path) -> dict[str, np.ndarray]:
    """The simulator's logit components of every test impression, in file order."""
    record = json.loads((data_dir / sim.SIMULATION_FILE).read_text())
    population = sim._build_population(sim.SimulatorConfig(**record["config"]))
    users, items, context = population.users, population.items, population.context
    test = pq.read_table(
        sorted((data_dir / TEST_SPLIT).glob("*.parquet")),
        columns=["user_id", "item_id", "position"],
    )
    user = _positions(users.ids, test.column("user_id").to_numpy())
    item = _positions(items.ids, test.column("item_id").to_numpy())
    return {
        "user intent": population.user_intent[user] / math.sqrt(2),
        "item appeal": population.item_appeal[item] / math.sqrt(2),
        "click taste <p_u, q_i>": np.einsum(
            "nk,nk->n", users.click_vec[user], items.click_vec[item]
        ),
        "user click bias": users.click_bias[user],
        "item click bias": items.click_bias[item],
        "position": context.position[test.column("position").to_numpy()],
    }


def attribute_only_propensity(
    data_dir: Path, real: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(propensity, true_ctr, true_cvr)`` of every test impression: ``propensity`` is the
    click probability without the id-specific parts of the user x item taste, intent and
    appeal, its intercept re-fit so that its mean is the mean true CTR (as the simulator fits
    its own). ``real`` is ``component_logits(data_dir)``."""
    with _without_id_noise():
        attributes = component_logits(data_dir)
    truth = pq.read_table(
        sorted((data_dir / TEST_SPLIT).glob("*.parquet")), columns=["true_ctr", "true_cvr"]
    )
    true_ctr, true_cvr = (
        truth.column(name).to_numpy().astype(np.float64) for name in ("true_ctr", "true_cvr")
    )
    shared = ("user intent", "item appeal", "click taste <p_u, q_i>")
    logit = _logit(true_ctr) + sum(attributes[name] - real[name] for name in shared)
    intercept = sim._bisect(true_ctr.mean(), lambda a: float(sim._sigmoid(a + logit).mean()))
    return sim._sigmoid(intercept + logit), true_ctr, true_cvr


@contextmanager
def _without_id_noise() -> Iterator[None]:
    """While open, ``sim._build_population`` draws the id-specific noise of the latent vectors,
    intent and appeal as always (so every later draw is unchanged) but scales it to 0."""
    latent, mix, twin = sim._latent, sim._mix_with_id_noise, sim._twin_vectors

    def latent_without_ids(rng, attributes):
        # Inside _latent the only _twin_vectors call is the id noise: the attribute tables are
        # drawn while its arguments are evaluated, before the patch below is in place.
        sim._twin_vectors = lambda rng, rows, scale, rho=0.5: twin(rng, rows, 0.0, rho)
        try:
            return latent(rng, attributes)
        finally:
            sim._twin_vectors = twin

    def mix_without_ids(attribute_signal, rng):
        mix(attribute_signal, rng)  # draws the noise, so later draws stay aligned
        return math.sqrt(1.0 - sim._INTENT_ID_SHARE) * sim._standardise(attribute_signal)

    sim._latent, sim._mix_with_id_noise = latent_without_ids, mix_without_ids
    try:
        yield
    finally:
        sim._latent, sim._mix_with_id_noise = latent, mix


def _positions(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    return order[np.searchsorted(ids, values, sorter=order)]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _coefficients(target: np.ndarray, components: dict[str, np.ndarray]) -> np.ndarray:
    design = np.column_stack([np.ones_like(target), *components.values()])
    return np.linalg.lstsq(design, target, rcond=None)[0][1:]


def ipw_bias(
    true_ctr: np.ndarray, true_cvr: np.ndarray, propensity: np.ndarray, tau: float
) -> float:
    """Expected bias of the self-normalised IPW mean-CVR estimate with propensities
    ``max(propensity, tau)``, against the mean true CVR.

    With clicks ``o ~ Bernoulli(true_ctr)``, ``sum(o r / p) / sum(o / p)`` tends to
    ``sum(true_ctr true_cvr / p) / sum(true_ctr / p)``: exactly the mean true CVR when
    ``p = true_ctr`` and ``tau`` is below every ``true_ctr``; any other ``p`` or a binding
    ``tau`` leaves the rest of the selection in.
    """
    weight = true_ctr / np.maximum(propensity, tau)
    return float((weight * true_cvr).sum() / weight.sum() - true_cvr.mean())


def report(run_dir: Path, components: dict[str, np.ndarray]) -> str:
    scores = score_test_split(run_dir)
    fits = {
        name: _coefficients(_logit(scores[name]), components)
        for name in ("pctr", "true_ctr", "pcvr", "true_cvr")
    }
    lines = [
        f"## {run_dir.name}",
        "",
        "| component | pCTR logit | true CTR logit | pCVR logit | true CVR logit |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, name in enumerate(components):
        lines.append(f"| {name} | " + " | ".join(f"{fits[s][k]:+.3f}" for s in fits) + " |")
    edges = np.quantile(scores["true_ctr"], np.linspace(0, 1, QUINTILES + 1)[1:-1])
    quintile = np.searchsorted(edges, scores["true_ctr"], side="right")
    lines += [
        "",
        "| true-CTR quintile | true CTR | pCTR | true CVR | pCVR |",
        "|---:|---:|---:|---:|---:|",
    ]
    for q in range(QUINTILES):
        rows = quintile == q
        lines.append(
            f"| {q + 1} | "
            + " | ".join(
                f"{scores[s][rows].mean():.4f}" for s in ("true_ctr", "pctr", "true_cvr", "pcvr")
            )
            + " |"
        )
    lines += [
        "",
        "| IPW bound tau | share of pCTR below | IPW bias with pCTR | with the true CTR |",
        "|---:|---:|---:|---:|",
    ]
    for tau in BOUNDS:
        with_pctr, with_truth = (
            ipw_bias(scores["true_ctr"], scores["true_cvr"], scores[p], tau)
            for p in ("pctr", "true_ctr")
        )
        lines.append(
            f"| {tau:g} | {(scores['pctr'] < tau).mean():.3f} | {with_pctr:+.4f} | {with_truth:+.4f} |"
        )
    return "\n".join(lines)


def attribute_only_report(data_dir: Path, components: dict[str, np.ndarray]) -> str:
    """The IPW bias, by bound, of the attribute-only propensity of ``data_dir``'s test split."""
    propensity, true_ctr, true_cvr = attribute_only_propensity(data_dir, components)
    lines = [
        f"## {data_dir.name}: a propensity that knows every attribute effect and no id-specific part",
        "",
        "| IPW bound tau | IPW bias with it |",
        "|---:|---:|",
    ]
    lines += [
        f"| {tau:g} | {ipw_bias(true_ctr, true_cvr, propensity, tau):+.4f} |" for tau in BOUNDS
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of quality.py")
    args = parser.parse_args(argv)
    data_dirs = {run_dir: _simulated_data_dir(run_dir, parser) for run_dir in args.runs}
    components: dict[Path, dict[str, np.ndarray]] = {}
    for run_dir, data_dir in data_dirs.items():
        if data_dir not in components:
            components[data_dir] = component_logits(data_dir)
            print(attribute_only_report(data_dir, components[data_dir]) + "\n")
        print(report(run_dir, components[data_dir]) + "\n")
    return 0


def _simulated_data_dir(run_dir: Path, parser: argparse.ArgumentParser) -> Path:
    """The simulated data set a run was evaluated on; a clear parser error if there is none."""
    from trainer.config import ConfigError
    from trainer.run_dir import RunDirError

    try:
        test = RunDir(run_dir).load_config().data.test
    except RunDirError as err:
        parser.error(f"{err}; pass run directories written by trainer.train")
    except ConfigError as err:
        parser.error(f"{run_dir}: {err}")
    if not test:
        parser.error(f"{run_dir}: its config has no data.test to score")
    data_dir = Path(test).parent
    if not (data_dir / sim.SIMULATION_FILE).is_file():
        parser.error(
            f"{run_dir}: its test data {data_dir} has no {sim.SIMULATION_FILE}; "
            "propensity_fit reads simulated data sets only"
        )
    return data_dir


if __name__ == "__main__":
    sys.exit(main())
