import math

import pytest

from tests.helpers import tiny_batch
from tests.objectives.test_multi_ipw_dr import CLICK, CONVERSION, CTR, E1, E2, outputs
from trainer.objectives import build_objective

# ESMM's CTCVR term on the same rows: pCTR x pCVR = 0.25, 0.32, 0.225 against labels 1, 0, 0.
CTCVR = -(math.log(0.25) + math.log(1 - 0.32) + math.log(1 - 0.225)) / 3


def test_escm2_ipw_by_hand():
    loss = build_objective("escm2_ipw")(outputs(), tiny_batch(CLICK, CONVERSION))
    ipw = (E1 / 0.5 + E2 / 0.8) / 3  # evi.txt Eq. 6: divided by |D|
    assert loss.terms["ctr"].item() == pytest.approx(CTR, rel=1e-6)
    assert loss.terms["cvr_ipw"].item() == pytest.approx(ipw, rel=1e-6)
    assert loss.terms["ctcvr"].item() == pytest.approx(CTCVR, rel=1e-6)
    assert loss.total.item() == pytest.approx(CTR + 0.5 * ipw + 0.5 * CTCVR, rel=1e-6)


def test_escm2_ipw_click_normalisation_divides_by_the_clicks():
    objective = build_objective(
        "escm2_ipw", ipw_normalization="clicks", cvr_weight=1.0, ctcvr_weight=2.0
    )
    loss = objective(outputs(), tiny_batch(CLICK, CONVERSION))
    ipw = (E1 / 0.5 + E2 / 0.8) / 2  # the reference code: / N_o
    assert loss.terms["cvr_ipw"].item() == pytest.approx(ipw, rel=1e-6)
    assert loss.total.item() == pytest.approx(CTR + ipw + 2.0 * CTCVR, rel=1e-6)


def test_escm2_dr_by_hand():
    loss = build_objective("escm2_dr", tau=0.6)(outputs(), tiny_batch(CLICK, CONVERSION))
    # pCTR 0.5 is clipped to 0.6 in both the DR risk and the imputation loss.
    dr = ((0.3 + (E1 - 0.3) / 0.6) + (0.6 + (E2 - 0.6) / 0.8) + 0.2) / 3  # evi.txt Eq. 7
    imputation = ((0.3 - E1) ** 2 / 0.6 + (0.6 - E2) ** 2 / 0.8) / 3
    assert loss.terms["cvr_dr"].item() == pytest.approx(dr, rel=1e-6)
    assert loss.terms["imputation"].item() == pytest.approx(imputation, rel=1e-6)
    assert loss.terms["ctcvr"].item() == pytest.approx(CTCVR, rel=1e-6)
    assert loss.total.item() == pytest.approx(
        CTR + 0.5 * dr + 0.5 * CTCVR + 0.5 * imputation, rel=1e-6
    )


def test_escm2_heads_and_bad_parameters():
    assert build_objective("escm2_ipw").required_heads == frozenset()
    assert build_objective("escm2_dr").required_heads == frozenset({"imputation"})
    with pytest.raises(ValueError, match=r"objective\.params\.ipw_normalization: must be one of"):
        build_objective("escm2_ipw", ipw_normalization="rows")
    with pytest.raises(
        ValueError, match=r"objective 'escm2_dr': objective\.params\.ctcvr_weight: must be >= 0"
    ):
        build_objective("escm2_dr", ctcvr_weight=-0.5)
