import math

import pytest
import torch

from tests.helpers import tiny_batch
from tests.objectives.test_multi_ipw_dr import CLICK, CONVERSION, CTR, E1, E2, outputs
from trainer.objectives import build_objective

SUM_W = 1 / 0.5 + 1 / 0.8  # sum o / p over the batch
NUMERATOR = (0.3 + (E1 - 0.3) / 0.5) + (0.6 + (E2 - 0.6) / 0.8) + 0.2
BADR = NUMERATOR / SUM_W  # Eq. 13


def test_badr_by_hand():
    loss = build_objective("badr")(outputs(), tiny_batch(CLICK, CONVERSION))
    mean_imputed = (0.3 + 0.6 + 0.2) / SUM_W  # E_hat(k)
    residuals = [E1 - 0.3 + mean_imputed - BADR, E2 - 0.6 + mean_imputed - BADR]
    imputation = (
        (1 / 0.5) ** 2 * residuals[0] ** 2 + (1 / 0.8) ** 2 * residuals[1] ** 2
    ) / SUM_W**2  # Eq. 32
    assert loss.terms["ctr"].item() == pytest.approx(CTR, rel=1e-6)
    assert loss.terms["cvr_badr"].item() == pytest.approx(BADR, rel=1e-6)
    assert loss.terms["imputation"].item() == pytest.approx(imputation, rel=1e-5)
    assert loss.total.item() == pytest.approx(CTR + BADR + imputation, rel=1e-6)
    assert "ctcvr" not in loss.terms


def test_badr_with_ctcvr_task():
    loss = build_objective("badr", ctcvr_weight=0.5, cvr_weight=2.0)(
        outputs(), tiny_batch(CLICK, CONVERSION)
    )
    ctcvr = -(math.log(0.25) + math.log(1 - 0.32) + math.log(1 - 0.225)) / 3
    assert loss.terms["ctcvr"].item() == pytest.approx(ctcvr, rel=1e-6)
    assert loss.total.item() == pytest.approx(
        CTR + 2.0 * BADR + loss.terms["imputation"].item() + 0.5 * ctcvr, rel=1e-6
    )


def test_badr_cvr_gradient_is_normalised_by_the_batch_weight():
    out = outputs()
    build_objective("badr")(out, tiny_batch(CLICK, CONVERSION)).terms["cvr_badr"].backward()
    # DR's gradient would be w (pcvr - r) / |D|; BADR's divides by sum w instead of |D| = 3.
    expected = [(0.5 - 1) / 0.5 / SUM_W, (0.4 - 0) / 0.8 / SUM_W, 0.0]
    assert out.logits["cvr"].grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_badr_imputation_gradient_reaches_every_row_through_the_mean_imputed_error():
    out = outputs()
    build_objective("badr")(out, tiny_batch(CLICK, CONVERSION)).terms["imputation"].backward()
    # The unclicked row's e_hat enters Eq. 32 only through E_hat(k) = sum e_hat / sum w.
    assert out.logits["imputation"].grad.abs().min().item() > 0
    assert out.logits["cvr"].grad is None  # e and L_BADR-c(k) are detached in Eq. 32


def test_badr_batch_without_clicks():
    out = outputs()
    loss = build_objective("badr")(out, tiny_batch([0, 0, 0], [0, 0, 0]))
    assert loss.terms["cvr_badr"].item() == 0.0
    assert loss.terms["imputation"].item() == 0.0
    loss.total.backward()
    assert torch.isfinite(out.logits["imputation"].grad).all()


def test_badr_heads_and_bad_parameters():
    assert build_objective("badr").required_heads == frozenset({"imputation"})
    with pytest.raises(
        ValueError, match=r"objective 'badr': objective\.params\.tau: must be in \(0, 1\]"
    ):
        build_objective("badr", tau=-0.1)
