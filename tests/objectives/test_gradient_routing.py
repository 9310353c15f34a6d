"""Which towers each loss term trains, on a real (tiny) model.

A head's own parameters are its MMoE gate and its tower. For every term of every debiasing
objective, backpropagate that term alone and list the heads whose parameters get a non-zero
gradient; the expected sets are the papers' (with the documented stop-gradients). Every term
also trains the shared backbone (experts and embeddings), except the imputation loss while the
imputation head is detached (``imputation_trains_backbone=False``, the default) and the CTR loss
of the single-task naive baseline (``ctr_trains_backbone=False``).
"""

import pytest
import torch

from tests.helpers import tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.model import CtcvrModel
from trainer.objectives import build_objective, detached_heads, model_structure
from trainer.train_module import TrainModule

CLICK = [1, 0, 1, 0, 0, 1, 0, 0]
CONVERSION = [1, 0, 0, 0, 0, 1, 0, 0]

CTR, CVR, IMP = frozenset({"ctr"}), frozenset({"cvr"}), frozenset({"imputation"})
TEACHER, CONV = frozenset({"cvr_teacher"}), frozenset({"conversion_propensity"})
BOTH = CTR | CVR

# (objective, params) -> {term: heads it trains}
EXPECTED = [
    ("naive", {}, {"ctr": CTR, "cvr": CVR}),
    ("naive", {"ctr_trains_backbone": False}, {"ctr": CTR, "cvr": CVR}),  # single-task
    ("multi_ipw", {}, {"ctr": CTR, "cvr_ipw": CVR}),
    ("multi_ipw", {"propensity_grad": True}, {"ctr": CTR, "cvr_ipw": BOTH}),  # Algorithm 1
    ("multi_dr", {}, {"ctr": CTR, "cvr_dr": CVR, "imputation": IMP}),
    ("multi_dr", {"undersample_rate": None}, {"ctr": CTR, "cvr_dr": CVR, "imputation": IMP}),
    (
        "multi_dr",
        {"dr_trains_imputation": True, "undersample_rate": None},
        {"ctr": CTR, "cvr_dr": CVR | IMP, "imputation": IMP},
    ),  # Algorithm 2 read literally
    ("escm2_ipw", {}, {"ctr": CTR, "cvr_ipw": CVR, "ctcvr": BOTH}),
    ("escm2_dr", {}, {"ctr": CTR, "cvr_dr": CVR, "ctcvr": BOTH, "imputation": IMP}),
    (
        "escm2_dr",
        {"propensity_grad": True},
        {"ctr": CTR, "cvr_dr": BOTH, "ctcvr": BOTH, "imputation": IMP},
    ),
    ("badr", {}, {"ctr": CTR, "cvr_badr": CVR, "imputation": IMP}),
    (
        "badr",
        {"ctcvr_weight": 1.0},
        {"ctr": CTR, "cvr_badr": CVR, "imputation": IMP, "ctcvr": BOTH},
    ),
    # The teacher reads sg(pCTR) and its pseudo-labels are detached; VIE fits the student to it.
    ("evi", {}, {"ctr": CTR, "cvr_teacher": TEACHER, "cvr_evi": CVR, "vie": CVR, "ctcvr": BOTH}),
    *(
        (
            "evi",
            {"teacher_labels": labels},
            {"ctr": CTR, "cvr_teacher": TEACHER, "cvr_evi": CVR, "vie": CVR, "ctcvr": BOTH},
        )
        for labels in ("over_propensity", "clicked")
    ),
    (
        "evi",
        {"vie_trains_teacher": True},
        {"ctr": CTR, "cvr_teacher": TEACHER, "cvr_evi": CVR, "vie": CVR | TEACHER, "ctcvr": BOTH},
    ),
    # Without transfer modules; with them the CVR losses also reach the source heads' gates
    # (test_ddpo.py tells gates and towers apart).
    (
        "ddpo",
        {"causal_transfer": False},
        {"ctr": CTR, "conversion_propensity": CONV, "cvr_ddpo": CVR, "ctcvr": BOTH},
    ),
    (
        "ddpo",
        {},
        {"ctr": CTR, "conversion_propensity": CONV, "cvr_ddpo": BOTH | CONV, "ctcvr": BOTH | CONV},
    ),
    (
        "multi_dr",
        {"imputation_trains_backbone": True},
        {"ctr": CTR, "cvr_dr": CVR, "imputation": IMP},
    ),
    (
        "escm2_dr",
        {"imputation_trains_backbone": True},
        {"ctr": CTR, "cvr_dr": CVR, "ctcvr": BOTH, "imputation": IMP},
    ),
    (
        "badr",
        {"imputation_trains_backbone": True},
        {"ctr": CTR, "cvr_badr": CVR, "imputation": IMP},
    ),
]
IMPUTATION_OBJECTIVES = ("multi_dr", "escm2_dr", "badr")


def _model(objective) -> CtcvrModel:
    torch.manual_seed(0)
    model = build_model(
        tiny_schema(),
        mmoe_tiny(),
        structure=model_structure(objective),
        detached_heads=detached_heads(objective),
        embedding_device="cpu",
    )
    TrainModule(model, objective)  # attaches an objective's own layers (EVI's VIE)
    return model


def _head_parameters(model: CtcvrModel, head: str) -> list[torch.Tensor]:
    return [*model.mmoe.gates[head].parameters(), *model.towers[head].parameters()]


def _heads_reached(model: CtcvrModel, term: torch.Tensor) -> tuple[frozenset[str], bool]:
    """Heads whose own parameters get a non-zero gradient, and whether the shared backbone (the
    experts and the embedding tables) does."""
    heads = model.heads
    backbone = [*model.mmoe.experts.parameters(), *model.sparse_arch.parameters()]
    params = [p for head in heads for p in _head_parameters(model, head)] + backbone
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    nonzero = [g is not None and g.abs().sum().item() > 0 for g in grads]
    reached, i = set(), 0
    for head in heads:
        n = len(_head_parameters(model, head))
        if any(nonzero[i : i + n]):
            reached.add(head)
        i += n
    return frozenset(reached), any(nonzero[i:])


@pytest.mark.parametrize(
    ("name", "params", "expected"), EXPECTED, ids=lambda v: str(v) if isinstance(v, str) else None
)
def test_each_term_trains_exactly_the_papers_towers(name, params, expected):
    objective = build_objective(name, **params)
    model = _model(objective)
    batch = tiny_batch(CLICK, CONVERSION)
    loss = objective(model(batch.sparse, batch.dense), batch)
    assert set(loss.terms) == set(expected)
    for term, heads in expected.items():
        reached, shared = _heads_reached(model, loss.terms[term])
        assert reached == heads, (
            f"{name} {params}: term {term!r} reached {sorted(reached)}, expected {sorted(heads)}"
        )
        isolated = (
            term == "imputation" and not params.get("imputation_trains_backbone", False)
        ) or (term == "ctr" and params.get("ctr_trains_backbone") is False)
        assert shared != isolated, f"{name} {params}: term {term!r} reaches the backbone: {shared}"


@pytest.mark.parametrize("name", IMPUTATION_OBJECTIVES)
def test_imputation_head_is_detached_from_the_backbone_by_default(name):
    assert detached_heads(build_objective(name)) == IMP
    assert detached_heads(build_objective(name, imputation_trains_backbone=True)) == frozenset()
    assert detached_heads(build_objective("multi_ipw")) == frozenset()


def test_detached_head_reads_the_same_features():
    """Detaching changes the gradient only: the imputation logits are those of the shared model."""
    objective = build_objective("escm2_dr")
    detached, shared = (
        _model(objective),
        _model(build_objective("escm2_dr", imputation_trains_backbone=True)),
    )
    shared.load_state_dict(detached.state_dict())
    batch = tiny_batch(CLICK, CONVERSION)
    a, b = detached(batch.sparse, batch.dense), shared(batch.sparse, batch.dense)
    for head in ("ctr", "cvr", "imputation"):
        assert torch.equal(a.logits[head], b.logits[head])


def test_train_module_adds_the_l2_on_the_imputation_tower_only():
    objective = build_objective(
        "multi_dr", imputation_l2=1e-2, undersample_rate=None
    )  # deterministic
    model = _model(objective)
    module = TrainModule(model, objective).train()
    batch = tiny_batch(CLICK, CONVERSION)
    total, (loss_out, _) = module(batch)
    without = objective(model(batch.sparse, batch.dense), batch).total
    params = _head_parameters(model, "imputation")
    squares = sum(p.detach().square().sum() for p in params)
    assert loss_out.terms["l2_imputation"].item() == pytest.approx(squares.item(), rel=1e-6)
    assert total.item() == pytest.approx(without.item() + 1e-2 * squares.item(), rel=1e-6)
    reached, _ = _heads_reached(model, total - without)
    assert reached == IMP


def test_train_module_without_head_l2_is_unchanged():
    objective = build_objective("escm2_dr")
    model = _model(objective)
    batch = tiny_batch(CLICK, CONVERSION)
    total, (loss_out, _) = TrainModule(model, objective).train()(batch)
    assert total.item() == pytest.approx(
        objective(model(batch.sparse, batch.dense), batch).total.item(), rel=1e-6
    )
    assert not any(name.startswith("l2_") for name in loss_out.terms)
