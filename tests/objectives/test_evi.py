"""EVI (evi.txt Eq. 11-16, Figure 1): every term by hand, the teacher's pseudo-labels and
propensity input detached, the variational information loss and its learned parameters."""

import math
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import outputs_from_probs, tiny_batch, tiny_schema
from trainer.builders import build_model
from trainer.config import ModelConfig
from trainer.model import PropensityConditionedTower
from trainer.objectives import build_objective, model_structure
from trainer.objectives.evi import VariationalInformation
from trainer.train_module import TrainModule

CLICK, CONVERSION = [1, 1, 0, 0], [1, 0, 0, 0]
PCTR, PCVR, PT = [0.5, 0.8, 0.2, 0.6], [0.5, 0.4, 0.3, 0.1], [0.6, 0.3, 0.1, 0.05]
TEACHER_LAYER = [[0.5, 1.0], [0.0, 2.0], [1.5, 0.0], [0.2, 0.3]]
STUDENT_LAYER = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [2.0, 1.0]]
MEAN_W, MEAN_B, RHO = [[1.0, 0.0], [0.5, 2.0]], [0.1, -0.1], [0.0, 1.0]


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


L_CTR = sum(bce(p, o) for p, o in zip(PCTR, CLICK)) / 4  # Eq. 12
L_CTCVR = sum(bce(c * v, r) for c, v, r in zip(PCTR, PCVR, CONVERSION)) / 4  # Eq. 13
L_T = sum(bce(p, r) for p, r in zip(PT, CONVERSION)) / 4  # Eq. 14: r = 0 on unclicked rows
L_CVR = (bce(0.5, 1) / 0.5 + bce(0.4, 0) / 0.8) / 8 + (
    bce(0.3, 0.1) / 0.8 + bce(0.1, 0.05) / 0.4
) / 8  # Eq. 15


def vie_by_hand(t_rows, s_rows) -> float:
    """Eq. 11 with mu(s) = W s + b and sigma^2 = softplus(rho) + 1e-3, averaged over rows."""
    variance = [softplus(r) + 1e-3 for r in RHO]
    total = 0.0
    for t, s in zip(t_rows, s_rows):
        mu = [sum(w * x for w, x in zip(MEAN_W[n], s)) + MEAN_B[n] for n in range(2)]
        total += sum(
            0.5 * math.log(variance[n]) + (t[n] - mu[n]) ** 2 / (2 * variance[n]) for n in range(2)
        )
    return total / len(t_rows)


L_VIE = vie_by_hand(TEACHER_LAYER, STUDENT_LAYER)


def attached(**params):
    """An EVI objective attached to a model whose towers have one hidden layer of width 2, its
    VIE layer set to MEAN_W, MEAN_B and RHO."""
    objective = build_objective("evi", **params)
    objective.attach(SimpleNamespace(tower_sizes=(2,)))
    with torch.no_grad():
        objective.vie[0].mean.weight.copy_(torch.tensor(MEAN_W))
        objective.vie[0].mean.bias.copy_(torch.tensor(MEAN_B))
        objective.vie[0].rho.copy_(torch.tensor(RHO))
    return objective


def outputs():
    out = outputs_from_probs(ctr=PCTR, cvr=PCVR, cvr_teacher=PT)
    out.features["cvr_teacher.layers"] = [torch.tensor(TEACHER_LAYER, requires_grad=True)]
    out.features["cvr.layers"] = [torch.tensor(STUDENT_LAYER, requires_grad=True)]
    return out


def test_every_term_and_the_total_by_hand():
    loss = attached()(outputs(), tiny_batch(CLICK, CONVERSION))
    assert set(loss.terms) == {"ctr", "cvr_teacher", "cvr_evi", "vie", "ctcvr"}
    assert loss.terms["ctr"].item() == pytest.approx(L_CTR, rel=1e-6)
    assert loss.terms["ctcvr"].item() == pytest.approx(L_CTCVR, rel=1e-6)
    assert loss.terms["cvr_teacher"].item() == pytest.approx(L_T, rel=1e-6)
    assert loss.terms["cvr_evi"].item() == pytest.approx(L_CVR, rel=1e-6)
    assert loss.terms["vie"].item() == pytest.approx(L_VIE, rel=1e-6)
    # Eq. 16 with Appendix A.3's weights: l_c = 0.2, l_t = 0.2, l_r = 2, l_i = 0.2, l_g = 0.2
    expected = 0.2 * L_CTR + 0.2 * L_T + 2 * L_CVR + 0.2 * L_VIE + 0.2 * L_CTCVR
    assert loss.total.item() == pytest.approx(expected, rel=1e-6)


def test_the_weights_of_eq_16():
    weights = {
        "ctr_weight": 1.0,
        "teacher_weight": 0.5,
        "cvr_weight": 3.0,
        "vie_weight": 0.0,
        "ctcvr_weight": 0.1,
    }
    loss = attached(**weights)(outputs(), tiny_batch(CLICK, CONVERSION))
    expected = 1.0 * L_CTR + 0.5 * L_T + 3.0 * L_CVR + 0.1 * L_CTCVR
    assert loss.total.item() == pytest.approx(expected, rel=1e-6)


def test_propensities_are_floored_at_tau_on_both_sides():
    loss = attached(tau=0.6)(outputs(), tiny_batch(CLICK, CONVERSION))
    expected = (bce(0.5, 1) / 0.6 + bce(0.4, 0) / 0.8) / 8 + (
        bce(0.3, 0.1) / 0.8 + bce(0.1, 0.05) / 0.6
    ) / 8
    assert loss.terms["cvr_evi"].item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_labels_and_propensities_are_detached_in_the_student_loss():
    out = outputs()
    attached()(out, tiny_batch(CLICK, CONVERSION)).terms["cvr_evi"].backward()
    assert out.logits["cvr_teacher"].grad is None  # the teacher's pseudo-labels are targets
    assert out.logits["ctr"].grad is None
    # d/dlogit BCE(y, r_hat) / (2 |D| p) = (r_hat - y) / (8 p)
    expected = [
        (0.5 - 1) / (8 * 0.5),
        (0.4 - 0) / (8 * 0.8),
        (0.3 - 0.1) / (8 * 0.8),
        (0.1 - 0.05) / (8 * 0.4),
    ]
    assert out.logits["cvr"].grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_the_teacher_learns_over_the_whole_space():
    out = outputs()
    attached()(out, tiny_batch(CLICK, CONVERSION)).terms["cvr_teacher"].backward()
    expected = [(p - r) / 4 for p, r in zip(PT, CONVERSION)]  # every row, r = 0 where unclicked
    assert out.logits["cvr_teacher"].grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_the_teachers_estimating_the_post_click_cvr_by_hand():
    """``over_propensity``: the same whole-space teacher, its pseudo-labels divided by the
    propensity; ``clicked``: the teacher fitted on clicked rows only, its output as the label."""
    batch = tiny_batch(CLICK, CONVERSION)
    divided = attached(teacher_labels="over_propensity")(outputs(), batch)
    # Unclicked rows 2 and 3: r_T / o_hat = 0.1 / 0.2 and 0.05 / 0.6.
    expected = (bce(0.5, 1) / 0.5 + bce(0.4, 0) / 0.8) / 8 + (
        bce(0.3, 0.5) / 0.8 + bce(0.1, 0.05 / 0.6) / 0.4
    ) / 8
    assert divided.terms["cvr_evi"].item() == pytest.approx(expected, rel=1e-6)
    assert divided.terms["cvr_teacher"].item() == pytest.approx(L_T, rel=1e-6)  # still Eq. 14
    # Capped at 1, and o_hat floored at tau: 0.05 / max(0.02, 0.1) = 0.5; 0.6 / 0.5 -> 1.
    capped = attached(teacher_labels="over_propensity", tau=0.1)(
        outputs_with(ctr=[0.5, 0.8, 0.02, 0.5], cvr_teacher=[0.6, 0.3, 0.05, 0.6]),
        tiny_batch([1, 1, 0, 0], CONVERSION),
    )
    expected = (bce(0.5, 1) / 0.5 + bce(0.4, 0) / 0.8) / 8 + (
        bce(0.3, 0.5) / 0.98 + bce(0.1, 1.0) / 0.5
    ) / 8
    assert capped.terms["cvr_evi"].item() == pytest.approx(expected, rel=1e-6)

    out = outputs()
    clicked = attached(teacher_labels="clicked")(out, batch)
    assert clicked.terms["cvr_teacher"].item() == pytest.approx(
        (bce(0.6, 1) + bce(0.3, 0)) / 2, rel=1e-6
    )
    assert clicked.terms["cvr_evi"].item() == pytest.approx(L_CVR, rel=1e-6)  # labels r_T
    clicked.terms["cvr_teacher"].backward()
    expected_grad = [(0.6 - 1) / 2, (0.3 - 0) / 2, 0.0, 0.0]  # clicked rows only
    assert out.logits["cvr_teacher"].grad.tolist() == pytest.approx(expected_grad, rel=1e-5)
    with pytest.raises(ValueError, match=r"objective\.params\.teacher_labels: must be one of"):
        build_objective("evi", teacher_labels="oracle")


def outputs_with(ctr, cvr_teacher):
    out = outputs_from_probs(ctr=ctr, cvr=PCVR, cvr_teacher=cvr_teacher)
    out.features["cvr_teacher.layers"] = [torch.tensor(TEACHER_LAYER, requires_grad=True)]
    out.features["cvr.layers"] = [torch.tensor(STUDENT_LAYER, requires_grad=True)]
    return out


@pytest.mark.parametrize("trains_teacher", [False, True])
def test_vie_moves_the_student_and_its_own_parameters_and_the_teacher_only_if_asked(trains_teacher):
    objective, out = attached(vie_trains_teacher=trains_teacher), outputs()
    objective(out, tiny_batch(CLICK, CONVERSION)).terms["vie"].backward()
    teacher, student = out.features["cvr_teacher.layers"][0], out.features["cvr.layers"][0]
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert (teacher.grad is not None) == trains_teacher
    vie = objective.vie[0]
    assert (
        vie.rho.grad.abs().min() > 0 and vie.mean.weight.grad.abs().sum() > 0
    )  # Eq. 11's rho is trained
    variance = [softplus(r) + 1e-3 for r in RHO]
    # d/d rho_n of the mean NLL: (1/2 - mean (t - mu)^2 / (2 sigma^2)) / sigma^2 * sigmoid(rho)
    t, s = torch.tensor(TEACHER_LAYER), torch.tensor(STUDENT_LAYER)
    residual2 = ((t - vie.mean(s)) ** 2).mean(dim=0).tolist()
    expected = [
        (0.5 - residual2[n] / (2 * variance[n])) / variance[n] / (1 + math.exp(-RHO[n]))
        for n in range(2)
    ]
    assert vie.rho.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_variational_information_module_by_hand():
    vie = VariationalInformation(2, initial_rho=0.0, min_variance=1e-3)
    with torch.no_grad():
        vie.mean.weight.copy_(torch.tensor(MEAN_W))
        vie.mean.bias.copy_(torch.tensor(MEAN_B))
        vie.rho.copy_(torch.tensor(RHO))
    got = vie(torch.tensor(TEACHER_LAYER), torch.tensor(STUDENT_LAYER))
    assert got.item() == pytest.approx(L_VIE, rel=1e-6)
    assert vie.variance.tolist() == pytest.approx([softplus(r) + 1e-3 for r in RHO], rel=1e-6)


def test_transfer_layers_pair_the_last_k_hidden_layers():
    objective = build_objective("evi", transfer_layers=2)
    objective.attach(SimpleNamespace(tower_sizes=(8, 4, 2)))
    assert [vie.mean.in_features for vie in objective.vie] == [4, 2]
    every = build_objective("evi")
    every.attach(SimpleNamespace(tower_sizes=(8, 4, 2)))
    assert [vie.mean.in_features for vie in every.vie] == [
        8,
        4,
        2,
    ]  # the paper's K = 3 of [128, 64, 32]
    with pytest.raises(
        ValueError,
        match=r"evi: transfer_layers=4 needs that many hidden tower layers; model.tower_sizes is \[8, 4, 2\]",
    ):
        build_objective("evi", transfer_layers=4).attach(SimpleNamespace(tower_sizes=(8, 4, 2)))
    with pytest.raises(ValueError, match="needs that many hidden tower layers"):
        build_objective("evi").attach(SimpleNamespace(tower_sizes=()))
    with pytest.raises(
        ValueError, match=r"objective\.params\.transfer_layers: must be >= 1 or null, got 0"
    ):
        build_objective("evi", transfer_layers=0)
    with pytest.raises(RuntimeError, match="attach"):
        build_objective("evi")(outputs(), tiny_batch(CLICK, CONVERSION))
    with pytest.raises(
        ValueError, match=r"objective 'evi': objective\.params\.vie_weight: must be >= 0"
    ):
        build_objective("evi", vie_weight=-0.2)


# The conditional teacher (Figure 1) ---------------------------------------------------------------


def test_the_teacher_predicts_from_its_representation_times_a_projected_propensity():
    torch.manual_seed(0)
    tower = PropensityConditionedTower(3, (2,), propensity_dim=4)
    x, propensity = torch.randn(5, 3), torch.rand(5)
    logit, layers = tower(x, propensity)
    h = layers[0]
    for row in range(5):
        projected = tower.projection.weight[:, 0] * propensity[row] + tower.projection.bias  # (P,)
        conditioned = torch.outer(h[row], projected).flatten()  # vec(h ⊗ pi(o_hat)), (D * P,)
        expected = tower.head.weight[0].dot(conditioned) + tower.head.bias[0]
        torch.testing.assert_close(logit[row], expected, rtol=1e-5, atol=1e-6)


def test_the_teacher_loss_never_reaches_the_ctr_head_and_the_vie_layers_are_checkpointed():
    objective = build_objective("evi", propensity_dim=3)
    torch.manual_seed(0)
    config = ModelConfig(num_experts=2, expert_sizes=[16], tower_sizes=[8, 4])
    model = build_model(
        tiny_schema(), config, structure=model_structure(objective), embedding_device="cpu"
    )
    module = TrainModule(model, objective).train()
    assert [vie.mean.in_features for vie in objective.vie] == [8, 4]
    assert {k for k in module.state_dict() if k.startswith("objective.")} == {
        f"objective.vie.{i}.{name}" for i in (0, 1) for name in ("rho", "mean.weight", "mean.bias")
    }
    assert model.towers["cvr_teacher"].projection.out_features == 3
    batch = tiny_batch([1, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0])
    outputs = model(batch.sparse, batch.dense)
    teacher = objective(outputs, batch).terms["cvr_teacher"]
    ctr_params = [*model.towers["ctr"].parameters(), *model.mmoe.gates["ctr"].parameters()]
    grads = torch.autograd.grad(teacher, ctr_params, allow_unused=True)
    # The teacher reads sg(o_hat). The MMoE mixes all heads in one batched product, so the CTR
    # gate is in the graph but gets an exactly-zero gradient.
    assert all(g is None or not g.any() for g in grads)
