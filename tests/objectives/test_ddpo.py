"""DDPO (ddpo.txt Eq. 6, 9-10, 12-18): every term by hand, the soft labels, the self-normalised
weights, the stop-gradients, and which towers each term trains on a real tiny model."""

import math

import pytest
import torch

from tests.helpers import outputs_from_probs, tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.model import CausalTransfer, CausalTransferFusion
from trainer.objectives import build_objective, model_structure
from trainer.objectives.ddpo import dynamic_soft_label
from trainer.objectives.estimators import self_normalized_weights

# Four impressions: clicked and converted, clicked only, and two unclicked.
CLICK, CONVERSION = [1, 1, 0, 0], [1, 0, 0, 0]
PCTR, PCVR, RC = [0.5, 0.8, 0.2, 0.6], [0.5, 0.4, 0.3, 0.1], [0.7, 0.2, 0.25, 0.05]


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


L_O = sum(bce(p, o) for p, o in zip(PCTR, CLICK)) / 4  # Eq. 16
L_C = (bce(0.7, 1) + bce(0.2, 0)) / 4  # Eq. 6: clicked rows only, divided by |D| = 4
SOFT = [1.0, 0.2, 0.25, 0.05]  # Eq. 9: r where r = 1, else r^c (clicked rows too)
W_O = [(1 / 0.5) / (1 / 0.5 + 1 / 0.8), (1 / 0.8) / (1 / 0.5 + 1 / 0.8)]  # Eq. 15, click space
W_N = [
    (1 / 0.8) / (1 / 0.8 + 1 / 0.4),
    (1 / 0.4) / (1 / 0.8 + 1 / 0.4),
]  # non-click space, 1 - o_hat
L_R = (
    W_O[0] * bce(0.5, SOFT[0])
    + W_O[1] * bce(0.4, SOFT[1])
    + W_N[0] * bce(0.3, SOFT[2])
    + W_N[1] * bce(0.1, SOFT[3])
)  # Eq. 10 with Eq. 15
L_T = (bce(0.5 * 0.5, 1) + bce(0.8 * 0.4, 0) + bce(0.2 * 0.3, 0) + bce(0.6 * 0.1, 0)) / 4  # Eq. 17


def outputs(pctr=PCTR, pcvr=PCVR, rc=RC):
    return outputs_from_probs(ctr=pctr, cvr=pcvr, conversion_propensity=rc)


def test_every_term_and_the_total_by_hand():
    loss = build_objective("ddpo")(outputs(), tiny_batch(CLICK, CONVERSION))
    assert set(loss.terms) == {"ctr", "conversion_propensity", "cvr_ddpo", "ctcvr"}
    assert loss.terms["ctr"].item() == pytest.approx(L_O, rel=1e-6)
    assert loss.terms["conversion_propensity"].item() == pytest.approx(L_C, rel=1e-6)
    assert loss.terms["cvr_ddpo"].item() == pytest.approx(L_R, rel=1e-6)
    assert loss.terms["ctcvr"].item() == pytest.approx(L_T, rel=1e-6)
    assert loss.total.item() == pytest.approx(L_O + L_C + L_R + L_T, rel=1e-6)


def test_the_four_weights_of_eq_18():
    objective = build_objective(
        "ddpo", click_weight=0.5, conversion_weight=2.0, cvr_weight=3.0, ctcvr_weight=0.1
    )
    loss = objective(outputs(), tiny_batch(CLICK, CONVERSION))
    assert loss.total.item() == pytest.approx(
        0.5 * L_O + 2.0 * L_C + 3.0 * L_R + 0.1 * L_T, rel=1e-6
    )


def test_dynamic_soft_labels():
    labels = dynamic_soft_label(
        torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.7, 0.2, 0.25, 0.3])
    )
    assert labels.tolist() == pytest.approx([1.0, 0.2, 0.25, 1.0])


def test_self_normalised_weights_sum_to_one_in_each_space():
    o = torch.tensor(CLICK, dtype=torch.float32)
    p = torch.tensor(PCTR)
    click, non_click = self_normalized_weights(o, p), self_normalized_weights(1 - o, 1 - p)
    assert click.tolist() == pytest.approx(W_O + [0.0, 0.0], rel=1e-6)
    assert non_click.tolist() == pytest.approx([0.0, 0.0] + W_N, rel=1e-6)
    assert click.sum().item() == pytest.approx(1.0) and non_click.sum().item() == pytest.approx(1.0)
    assert self_normalized_weights(torch.zeros(3), torch.full((3,), 0.5)).tolist() == [
        0.0,
        0.0,
        0.0,
    ]


def test_propensities_are_floored_at_tau_on_both_sides():
    # o_hat = 0.5 is raised to 0.6 on the clicked side; 1 - o_hat = 0.4 is raised to 0.6 too.
    loss = build_objective("ddpo", tau=0.6)(outputs(), tiny_batch(CLICK, CONVERSION))
    w_o = [(1 / 0.6) / (1 / 0.6 + 1 / 0.8), (1 / 0.8) / (1 / 0.6 + 1 / 0.8)]
    w_n = [(1 / 0.8) / (1 / 0.8 + 1 / 0.6), (1 / 0.6) / (1 / 0.8 + 1 / 0.6)]
    expected = (
        w_o[0] * bce(0.5, 1.0)
        + w_o[1] * bce(0.4, 0.2)
        + w_n[0] * bce(0.3, 0.25)
        + w_n[1] * bce(0.1, 0.05)
    )
    assert loss.terms["cvr_ddpo"].item() == pytest.approx(expected, rel=1e-6)


def test_soft_labels_and_weights_are_detached():
    out = outputs()
    build_objective("ddpo")(out, tiny_batch(CLICK, CONVERSION)).terms["cvr_ddpo"].backward()
    assert out.logits["conversion_propensity"].grad is None  # r^c inside r* is a fixed target
    assert out.logits["ctr"].grad is None  # the inverse propensities only weight rows
    # d/dlogit of w BCE(r*, r_hat) is w (r_hat - r*)
    expected = [
        W_O[0] * (0.5 - 1.0),
        W_O[1] * (0.4 - 0.2),
        W_N[0] * (0.3 - 0.25),
        W_N[1] * (0.1 - 0.05),
    ]
    assert out.logits["cvr"].grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_the_conversion_propensity_learns_from_clicked_rows_only():
    out = outputs()
    build_objective("ddpo")(out, tiny_batch(CLICK, CONVERSION)).terms[
        "conversion_propensity"
    ].backward()
    expected = [(0.7 - 1) / 4, (0.2 - 0) / 4, 0.0, 0.0]
    assert out.logits["conversion_propensity"].grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_a_batch_without_clicks_trains_on_the_non_click_space_only():
    out = outputs()
    loss = build_objective("ddpo")(out, tiny_batch([0, 0, 0, 0], [0, 0, 0, 0]))
    w = [1 / (1 - p) for p in PCTR]
    expected = sum(wi / sum(w) * bce(p, rc) for wi, p, rc in zip(w, PCVR, RC))
    assert loss.terms["cvr_ddpo"].item() == pytest.approx(expected, rel=1e-6)
    assert loss.terms["conversion_propensity"].item() == 0.0
    loss.total.backward()
    assert all(torch.isfinite(t.grad).all() for t in out.logits.values() if t.grad is not None)


def test_bad_parameters_are_named():
    with pytest.raises(
        ValueError, match=r"objective 'ddpo': objective\.params\.cvr_weight: must be >= 0"
    ):
        build_objective("ddpo", cvr_weight=-1.0)
    with pytest.raises(ValueError, match=r"objective\.params\.tau: must be in \(0, 1\]"):
        build_objective("ddpo", tau=0.0)


# The causal transfer modules (Eq. 12-14) ----------------------------------------------------------


def test_a_causal_transfer_module_by_hand():
    torch.manual_seed(0)
    transfer = CausalTransfer(3)
    source, cvr = torch.randn(2, 3), torch.randn(2, 3)
    out = transfer(source, cvr)
    for row in range(2):
        tokens = [source[row], cvr[row]]
        scores = [
            transfer.query(t).dot(transfer.key(t)).item() / math.sqrt(3) for t in tokens
        ]  # Eq. 13
        alpha = [
            math.exp(s) / sum(math.exp(x) for x in scores) for s in scores
        ]  # softmax over the tokens
        expected = alpha[0] * transfer.value(tokens[0]) + alpha[1] * transfer.value(
            tokens[1]
        )  # Eq. 12
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-6)


def test_the_fusion_concatenates_both_modules_then_one_linear_layer():
    torch.manual_seed(0)
    fusion = CausalTransferFusion(4, ("ctr", "conversion_propensity"))
    f = {head: torch.randn(5, 4) for head in ("ctr", "cvr", "conversion_propensity")}
    t_o = fusion.transfers["ctr"](f["ctr"], f["cvr"])
    t_c = fusion.transfers["conversion_propensity"](f["conversion_propensity"], f["cvr"])
    torch.testing.assert_close(fusion(f), fusion.fuse(torch.cat([t_o, t_c], dim=1)))  # Eq. 14


def test_the_model_builds_the_transfer_modules_only_when_asked():
    with_transfer = build_model(
        tiny_schema(),
        mmoe_tiny(),
        structure=model_structure(build_objective("ddpo")),
        embedding_device="cpu",
    )
    assert with_transfer.heads == ("ctr", "cvr", "conversion_propensity")
    assert with_transfer.cvr_transfer.sources == ("ctr", "conversion_propensity")
    ablated = build_objective("ddpo", causal_transfer=False)
    without = build_model(
        tiny_schema(), mmoe_tiny(), structure=model_structure(ablated), embedding_device="cpu"
    )
    assert without.heads == with_transfer.heads and without.cvr_transfer is None


# Gradient routing on a real tiny model ------------------------------------------------------------


def _grad_reaches(model, term, modules) -> set[str]:
    names = list(modules)
    params = [p for name in names for p in modules[name].parameters()]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    reached, i = set(), 0
    for name in names:
        n = len(list(modules[name].parameters()))
        if any(g is not None and g.abs().sum() > 0 for g in grads[i : i + n]):
            reached.add(name)
        i += n
    return reached


@pytest.mark.parametrize("causal_transfer", [True, False])
def test_each_term_trains_exactly_its_towers(causal_transfer):
    objective = build_objective("ddpo", causal_transfer=causal_transfer)
    torch.manual_seed(0)
    model = build_model(
        tiny_schema(), mmoe_tiny(), structure=model_structure(objective), embedding_device="cpu"
    )
    batch = tiny_batch([1, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0])
    loss = objective(model(batch.sparse, batch.dense), batch)
    towers = {f"tower:{h}": model.towers[h] for h in model.heads}
    gates = {f"gate:{h}": model.mmoe.gates[h] for h in model.heads}
    transfer = {"transfer": model.cvr_transfer} if causal_transfer else {}
    parts = {**towers, **gates, **transfer}
    # Through the fused feature the CVR losses reach the click and conversion gates (not towers).
    fused_inputs = (
        {"gate:ctr", "gate:conversion_propensity", "transfer"} if causal_transfer else set()
    )
    expected = {
        "ctr": {"tower:ctr", "gate:ctr"},
        "conversion_propensity": {"tower:conversion_propensity", "gate:conversion_propensity"},
        "cvr_ddpo": {"tower:cvr", "gate:cvr"} | fused_inputs,
        "ctcvr": {"tower:ctr", "gate:ctr", "tower:cvr", "gate:cvr"} | fused_inputs,
    }
    for term, parts_expected in expected.items():
        assert _grad_reaches(model, loss.terms[term], parts) == parts_expected, term
