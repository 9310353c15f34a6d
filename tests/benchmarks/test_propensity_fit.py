"""benchmarks/propensity_fit.py: the bias IPW keeps with given propensities, by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "propensity_fit.py"


propensity_fit = load_benchmark(SCRIPT, "propensity_fit")

# Two impressions: a likely click that converts often, an unlikely one that converts rarely.
TRUE_CTR = np.array([0.2, 0.01])
TRUE_CVR = np.array([0.1, 0.02])  # mean true CVR 0.06


def test_true_propensities_unclipped_leave_no_bias():
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, TRUE_CTR, 0.0) == pytest.approx(
        0.0, abs=1e-15
    )


def test_a_binding_bound_keeps_part_of_the_selection():
    # tau = 0.05 raises the second propensity to 0.05: weights 0.2/0.2 = 1 and 0.01/0.05 = 0.2,
    # so the estimate is (1 * 0.1 + 0.2 * 0.02) / 1.2 = 0.104 / 1.2.
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, TRUE_CTR, 0.05) == pytest.approx(
        0.104 / 1.2 - 0.06
    )


def test_flat_propensities_keep_the_whole_click_space_gap():
    # Any constant propensity weights both rows by their CTR: the click-space mean
    # (0.2 * 0.1 + 0.01 * 0.02) / 0.21, naive's target.
    flat = np.full(2, 0.04)
    expected = (0.2 * 0.1 + 0.01 * 0.02) / 0.21 - 0.06
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, flat, 0.0) == pytest.approx(expected)
    assert expected > 0.03


def test_the_attribute_only_population_keeps_every_draw_but_the_id_noise():
    from trainer.data import simulator as sim

    config = sim.SimulatorConfig(rows=2_000, num_users=5_000, num_items=3_000)
    real = sim._build_population(config)
    with propensity_fit._without_id_noise():
        attributes = sim._build_population(config)
    again = sim._build_population(config)  # the patch is undone on exit
    np.testing.assert_array_equal(again.user_intent, real.user_intent)
    # Same ids and attributes, drawn after the id noise: the random streams stayed aligned.
    # (Not the histories: they are drawn from the latent tastes, which lost their id share.)
    for name in (
        "ids",
        "gender",
        "level",
        "depth",
        "activity",
        "recent_len",
        "click_bias",
        "conv_bias",
    ):
        np.testing.assert_array_equal(getattr(attributes.users, name), getattr(real.users, name))
    np.testing.assert_array_equal(attributes.items.brand, real.items.brand)
    # Intent keeps its attribute share (80 % of the variance), so it correlates with the real
    # one by sqrt(0.8); the latent vectors lose their id share (40 %) likewise.
    corr = np.corrcoef(attributes.user_intent, real.user_intent)[0, 1]
    assert corr == pytest.approx(np.sqrt(1 - sim._INTENT_ID_SHARE), abs=0.02)
    assert attributes.user_intent.var() == pytest.approx(1 - sim._INTENT_ID_SHARE, rel=1e-6)
    share = attributes.users.click_vec.var() / real.users.click_vec.var()
    assert share == pytest.approx(1 - sim._ID_SHARE, abs=0.05)


def test_the_attribute_only_propensity_has_the_true_mean_and_leaves_part_of_the_selection(tmp_path):
    from trainer.data import simulator as sim

    sim.simulate(
        sim.SimulatorConfig(rows=20_000, num_users=5_000, num_items=3_000), tmp_path, progress=False
    )
    real = propensity_fit.component_logits(tmp_path)
    propensity, true_ctr, true_cvr = propensity_fit.attribute_only_propensity(tmp_path, real)
    assert propensity.shape == true_ctr.shape == (4_000,)
    assert propensity.mean() == pytest.approx(true_ctr.mean(), rel=1e-6)
    assert 0.5 < np.corrcoef(np.log(propensity), np.log(true_ctr))[0, 1] < 0.99
    gap = propensity_fit.ipw_bias(true_ctr, true_cvr, np.ones_like(true_ctr), 0.0)  # naive's target
    left = propensity_fit.ipw_bias(true_ctr, true_cvr, propensity, 0.0)
    assert 0.0 < left < gap


def test_runs_that_are_not_simulated_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        propensity_fit.main([str(tmp_path)])
    assert (
        f"{tmp_path} is not a run directory of trainer.train (no config.yaml)"
        in capsys.readouterr().err
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  test: {tmp_path / 'coat' / 'test'}\n")
    with pytest.raises(SystemExit):
        propensity_fit.main([str(run)])
    assert "required value(s) missing: ['data.train']" in capsys.readouterr().err
    (run / "config.yaml").write_text(
        f"data:\n  train: {tmp_path}\n  test: {tmp_path / 'coat' / 'test'}\n"
    )
    with pytest.raises(SystemExit):
        propensity_fit.main([str(run)])
    assert (
        "has no simulation.json; propensity_fit reads simulated data sets only"
        in capsys.readouterr().err
    )
