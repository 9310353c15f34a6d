"""benchmarks/propensity_fit.py: the bias IPW keeps with given propensities, by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "propensity_fit.py"


def _load():
    spec = importlib.util.spec_from_file_location("propensity_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


propensity_fit = _load()

# Two impressions: a likely click that converts often, an unlikely one that converts rarely.
TRUE_CTR = np.array([0.2, 0.01])
TRUE_CVR = np.array([0.1, 0.02])  # mean true CVR 0.06


def test_true_propensities_unclipped_leave_no_bias():
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, TRUE_CTR, 0.0) == pytest.approx(0.0, abs=1e-15)


def test_a_binding_bound_keeps_part_of_the_selection():
    # tau = 0.05 raises the second propensity to 0.05: weights 0.2/0.2 = 1 and 0.01/0.05 = 0.2,
    # so the estimate is (1 * 0.1 + 0.2 * 0.02) / 1.2 = 0.104 / 1.2.
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, TRUE_CTR, 0.05) == pytest.approx(0.104 / 1.2 - 0.06)


def test_flat_propensities_keep_the_whole_click_space_gap():
    # Any constant propensity weights both rows by their CTR: the click-space mean
    # (0.2 * 0.1 + 0.01 * 0.02) / 0.21, naive's target.
    flat = np.full(2, 0.04)
    expected = (0.2 * 0.1 + 0.01 * 0.02) / 0.21 - 0.06
    assert propensity_fit.ipw_bias(TRUE_CTR, TRUE_CVR, flat, 0.0) == pytest.approx(expected)
    assert expected > 0.03
