import math

import pytest
import torch

from tests.helpers import outputs_from_probs, tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.objectives import OBJECTIVES, build_objective

# Three impressions: clicked and converted, clicked only, not clicked.
CLICK, CONVERSION = [1, 1, 0], [1, 0, 0]
PCTR, PCVR = [0.5, 0.8, 0.25], [0.5, 0.4, 0.9]


def test_naive_by_hand():
    out = outputs_from_probs(ctr=PCTR, cvr=PCVR)
    loss = build_objective("naive")(out, tiny_batch(CLICK, CONVERSION))
    ctr = -(math.log(0.5) + math.log(0.8) + math.log(0.75)) / 3
    cvr = -(math.log(0.5) + math.log(0.6)) / 2  # clicked rows only; row 3's pCVR of 0.9 is ignored
    assert loss.terms["ctr"].item() == pytest.approx(ctr, rel=1e-6)
    assert loss.terms["cvr"].item() == pytest.approx(cvr, rel=1e-6)
    assert loss.total.item() == pytest.approx(ctr + cvr, rel=1e-6)


def test_naive_cvr_gradient_only_from_clicked_rows():
    out = outputs_from_probs(ctr=PCTR, cvr=PCVR)
    build_objective("naive", cvr_weight=2.0)(out, tiny_batch(CLICK, CONVERSION)).total.backward()
    grad = out.logits["cvr"].grad
    # d/dlogit BCE = p - y, averaged over the 2 clicked rows, times the weight 2.
    assert grad.tolist() == pytest.approx([(0.5 - 1) / 2 * 2, (0.4 - 0) / 2 * 2, 0.0], rel=1e-6)


def test_naive_without_clicks_has_zero_cvr_term():
    out = outputs_from_probs(ctr=[0.1, 0.2], cvr=[0.3, 0.4])
    loss = build_objective("naive")(out, tiny_batch([0, 0], [0, 0]))
    assert loss.terms["cvr"].item() == 0.0


def _trained_cvr(objective_name: str, loss_terms: tuple[str, ...], **params) -> torch.Tensor:
    """pCVR of a tiny model after 5 Adam steps on the sum of ``loss_terms`` of an objective."""
    objective = build_objective(objective_name, **params)
    torch.manual_seed(0)
    model = build_model(
        tiny_schema(),
        mmoe_tiny(),
        structure=objective.model_structure,
        detached_heads=objective.detached_heads,
        embedding_device="cpu",
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = tiny_batch([1, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0])
    for _ in range(5):
        terms = objective(model(batch.sparse, batch.dense), batch).terms
        optimizer.zero_grad()
        sum(terms[name] for name in loss_terms).backward()
        optimizer.step()
    with torch.no_grad():
        return model(batch.sparse, batch.dense).pcvr


def test_single_task_naive_is_a_cvr_model_fitted_to_the_clicks_alone():
    """With ``ctr_trains_backbone=False`` the CTR loss changes nothing the CVR head computes:
    training on both terms gives exactly the pCVR of training on the CVR term alone. In the
    multi-task form it does change it (the shared backbone), so the check is not vacuous."""
    single = build_objective("naive", ctr_trains_backbone=False)
    assert single.detached_heads == {"ctr"} and build_objective("naive").detached_heads == set()
    alone = _trained_cvr("naive", ("cvr",), ctr_trains_backbone=False)
    torch.testing.assert_close(
        _trained_cvr("naive", ("ctr", "cvr"), ctr_trains_backbone=False), alone, rtol=0, atol=0
    )
    shared = _trained_cvr("naive", ("ctr", "cvr"))
    assert (shared - _trained_cvr("naive", ("cvr",))).abs().max() > 1e-4


def test_esmm_by_hand():
    out = outputs_from_probs(ctr=PCTR, cvr=PCVR)
    loss = build_objective("esmm", ctcvr_weight=0.5)(out, tiny_batch(CLICK, CONVERSION))
    ctr = -(math.log(0.5) + math.log(0.8) + math.log(0.75)) / 3
    # pCTCVR = pCTR x pCVR = 0.25, 0.32, 0.225 against labels 1, 0, 0 over the whole space.
    ctcvr = -(math.log(0.25) + math.log(1 - 0.32) + math.log(1 - 0.225)) / 3
    assert loss.terms["ctcvr"].item() == pytest.approx(ctcvr, rel=1e-6)
    assert loss.total.item() == pytest.approx(ctr + 0.5 * ctcvr, rel=1e-6)


def test_esmm_trains_cvr_on_unclicked_rows_through_ctcvr():
    out = outputs_from_probs(ctr=PCTR, cvr=PCVR)
    build_objective("esmm")(out, tiny_batch(CLICK, CONVERSION)).total.backward()
    # d/dlogit_cvr of BCE(pctr * pcvr, 0) = pctr * pcvr * (1 - pcvr) / (1 - pctr * pcvr), / 3 rows
    p, q = 0.25, 0.9
    expected = p * q * (1 - q) / (1 - p * q) / 3
    assert out.logits["cvr"].grad[2].item() == pytest.approx(expected, rel=1e-5)
    assert out.logits["ctr"].grad.abs().min().item() > 0


def test_unknown_objective_and_bad_params_are_named():
    with pytest.raises(ValueError, match="unknown objective 'nope'; choose one of"):
        build_objective("nope")
    with pytest.raises(
        ValueError, match=r"objective 'esmm': objective\.params\.weight: unknown parameter"
    ):
        build_objective("esmm", weight=3)
    assert {"naive", "esmm"} <= set(OBJECTIVES)


def test_required_heads_declared():
    for name in ("naive", "esmm"):
        assert build_objective(name).required_heads == frozenset()
