"""Adap-SL: partially shared CVR/imputation towers (Eq. 7-17) and their hard-mask pruning (Algorithm 1)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny
from trainer.config import AdapSlConfig, ConfigError, ModelConfig, PruningConfig, load_config
from trainer.model import CtcvrModel, PartiallySharedTowers
from trainer.model.adap_sl import PartiallySharedLinear, split_width
from trainer.objectives import build_objective, detached_heads, model_structure
from trainer.pruning import AdaptivePruner, density_report, magnitude_prune_
from trainer.train_module import TrainModule

ADAP_SL = "model.tower_sharing=adap_sl"
CLICK = [1, 0, 1, 0, 0, 1, 0, 1]
CONVERSION = [1, 0, 0, 0, 0, 1, 0, 0]


def adap_sl_config(**adap: object) -> ModelConfig:
    config = mmoe_tiny()  # experts [16], towers [8]
    config.tower_sizes = [8, 6]
    config.tower_sharing = "adap_sl"
    config.adap_sl = AdapSlConfig(**adap)
    return config


def adap_sl_model(seed: int = 0, **adap: object) -> CtcvrModel:
    torch.manual_seed(seed)
    return build_model(
        tiny_schema(), adap_sl_config(**adap), {"imputation"}, embedding_device="cpu"
    )


def cvr_and_imputation(model: CtcvrModel) -> tuple[list, list]:
    towers = model.partially_shared
    return towers.masked_linears("cvr"), towers.masked_linears("imputation")


# Structure -----------------------------------------------------------------------------------


def test_shared_units_are_one_set_of_parameters_and_private_units_are_not():
    model = adap_sl_model()
    assert model.heads == ("ctr", "cvr", "imputation") and set(model.towers) == {"ctr"}
    cvr, imputation = cvr_and_imputation(model)
    assert [shared for _, shared in cvr] == [
        True,
        False,
        True,
        False,
        False,
    ]  # 2 layers, then the head
    for (a, shared), (b, _) in zip(cvr, imputation):
        if shared:
            assert a is b and a.linear.weight is b.linear.weight
            assert a.mask("cvr") is not a.mask(
                "imputation"
            )  # one mask per tower over the same weights
        else:
            assert a.linear.weight is not b.linear.weight
    # No parameter is counted twice, and the halves add up to an ordinary tower's layer.
    names = [name for name, _ in model.partially_shared.named_parameters()]
    assert len(names) == len(set(names))
    first = model.partially_shared.layers[0]
    assert first.shared.linear.weight.shape == (4, 16) and first.private[
        "cvr"
    ].linear.weight.shape == (4, 16)


def test_each_layer_is_shared_units_then_private_units():
    """Eq. 16-17 by hand: LN^PS_t(x) = concat(W_share x + b_share, W_self_t x + b_self_t)."""
    torch.manual_seed(1)
    layer = PartiallySharedLinear(3, 4, shared_fraction=0.5)
    x = torch.randn(2, 3)
    shared, private = layer.shared.linear, layer.private["imputation"].linear
    expected = torch.cat(
        [x @ shared.weight.T + shared.bias, x @ private.weight.T + private.bias], dim=1
    )
    torch.testing.assert_close(layer(x, "imputation"), expected)
    layer.shared.mask("imputation")[1, 2] = 0
    expected[:, 1] -= x[:, 2] * shared.weight[1, 2]
    torch.testing.assert_close(layer(x, "imputation"), expected)
    torch.testing.assert_close(
        layer(x, "cvr")[:, :2], (x @ shared.weight.T + shared.bias)
    )  # cvr's mask is whole


def test_the_input_is_shared_on_its_first_dims_and_private_on_the_rest():
    towers = PartiallySharedTowers(6, (4,), shared_fraction=0.5)
    cvr, imputation = torch.randn(3, 6), torch.randn(3, 6)
    inputs = towers.tower_inputs({"cvr": cvr, "imputation": imputation})
    assert torch.equal(inputs["cvr"], cvr)
    assert torch.equal(inputs["imputation"], torch.cat([cvr[:, :3], imputation[:, 3:]], dim=1))


def test_losses_reach_the_shared_units_and_only_their_own_private_units():
    model = adap_sl_model()
    objective = build_objective("multi_dr", undersample_rate=None)
    batch = tiny_batch(CLICK, CONVERSION)
    loss = objective(model(batch.sparse, batch.dense), batch)
    towers = model.partially_shared
    layer = towers.layers[0]
    watched = {
        "shared": layer.shared.linear.weight,
        "cvr_private": layer.private["cvr"].linear.weight,
        "imputation_private": layer.private["imputation"].linear.weight,
        "cvr_gate": model.mmoe.gates["cvr"].weight,
        "imputation_gate": model.mmoe.gates["imputation"].weight,
    }

    def reached(term: torch.Tensor) -> set[str]:
        grads = torch.autograd.grad(
            term, list(watched.values()), retain_graph=True, allow_unused=True
        )
        return {name for name, g in zip(watched, grads) if g is not None and g.abs().sum() > 0}

    # The imputation loss trains the shared units and, through the shared input dims, the CVR gate.
    assert reached(loss.terms["imputation"]) == {
        "shared",
        "imputation_private",
        "cvr_gate",
        "imputation_gate",
    }
    assert reached(loss.terms["cvr_dr"]) == {
        "shared",
        "cvr_private",
        "cvr_gate",
    }  # e_hat is detached


ADAP_SL_CONFIGS = sorted(
    Path(__file__).resolve().parents[2].glob("trainer/configs/*_adapsl_*.yaml"), key=str
)


def model_as_the_config_builds_it(config_file: Path, *overrides: str) -> tuple[CtcvrModel, object]:
    """The objective and the model of an Adap-SL config, built as the recipe builds them (the
    objective's structure and ``detached_heads``), over the tiny schema."""
    config = load_config(config_file, ["output_dir=x", "data.train=x", *overrides])
    objective = build_objective(config.objective.name, **config.objective.params)
    torch.manual_seed(0)
    model = build_model(
        tiny_schema(),
        config.model,
        structure=model_structure(objective),
        detached_heads=detached_heads(objective),
        embedding_device="cpu",
    )
    return model, objective


def test_every_adap_sl_config_is_checked():
    assert {p.stem for p in ADAP_SL_CONFIGS} >= {
        "multi_dr_adapsl_simulated",
        "badr_adapsl_simulated",
    }


@pytest.mark.parametrize("config_file", ADAP_SL_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("trains_backbone", [False, True])
def test_a_detached_imputation_head_trains_its_own_gate_and_tower_only(
    config_file, trains_backbone
):
    """The configs say "the imputation loss trains its own gate and tower only": with the head
    detached, no gradient of the imputation loss may reach the CVR gate (whose mixture is the
    shared half of the imputation tower's input), the experts or the embeddings. With
    ``imputation_trains_backbone`` it reaches all three, as in the papers' shared model."""
    model, objective = model_as_the_config_builds_it(
        config_file,
        f"objective.params.imputation_trains_backbone={str(trains_backbone).lower()}",
    )
    assert (detached_heads(objective) == {"imputation"}) is not trains_backbone
    batch = tiny_batch(CLICK, CONVERSION)
    loss = objective(model(batch.sparse, batch.dense), batch)
    towers = model.partially_shared
    groups = {
        "embeddings": list(model.sparse_arch.parameters()),
        "experts": list(model.mmoe.experts.parameters()),
        "ctr_gate": list(model.mmoe.gates["ctr"].parameters()),
        "cvr_gate": list(model.mmoe.gates["cvr"].parameters()),
        "imputation_gate": list(model.mmoe.gates["imputation"].parameters()),
        "shared_units": [p for layer in towers.layers for p in layer.shared.parameters()],
        "cvr_private": [
            *(p for layer in towers.layers for p in layer.private["cvr"].parameters()),
            *towers.heads["cvr"].parameters(),
        ],
        "imputation_private": [
            *(p for layer in towers.layers for p in layer.private["imputation"].parameters()),
            *towers.heads["imputation"].parameters(),
        ],
    }
    flat = [p for params in groups.values() for p in params]
    grads = torch.autograd.grad(
        loss.terms["imputation"], flat, retain_graph=True, allow_unused=True
    )
    reached, i = set(), 0
    for name, params in groups.items():
        if any(g is not None and g.abs().sum() > 0 for g in grads[i : i + len(params)]):
            reached.add(name)
        i += len(params)
    own = {"imputation_gate", "shared_units", "imputation_private"}
    backbone = {"cvr_gate", "experts", "embeddings"}
    assert reached == (own | backbone if trains_backbone else own)


def test_head_l2_covers_what_the_imputation_tower_computes_with():
    objective = build_objective("multi_dr", imputation_l2=1e-2, undersample_rate=None)
    model = adap_sl_model()
    model.partially_shared.layers[0].shared.mask("imputation")[0] = 0  # pruned for imputation only
    batch = tiny_batch(CLICK, CONVERSION)
    _, (loss_out, _) = TrainModule(model, objective).train()(batch)
    towers = model.partially_shared
    expected = sum(p.square().sum() for p in model.mmoe.gates["imputation"].parameters())
    expected += sum(t.square().sum() for t in towers.tower_tensors("imputation"))
    assert loss_out.terms["l2_imputation"].item() == pytest.approx(expected.item(), rel=1e-6)
    raw = towers.layers[0].shared.linear.weight
    assert towers.tower_tensors("imputation")[0][0].abs().sum() == 0 and raw[0].abs().sum() > 0


def test_a_folded_tower_computes_the_same_logit():
    model = adap_sl_model()
    towers = model.partially_shared
    AdaptivePruner(towers, AdapSlConfig(epoch_steps=1, cvr=PruningConfig(0.5, 0.2, 0))).after_step(
        1
    )
    mixtures = {"cvr": torch.randn(5, 16), "imputation": torch.randn(5, 16)}
    out = towers(mixtures)
    for tower, x in towers.tower_inputs(mixtures).items():
        folded = towers.folded_tower(tower)
        logit, activations = folded(x)
        torch.testing.assert_close(logit, out[tower][0], rtol=0, atol=1e-6)
        assert [a.shape for a in activations] == [(5, 8), (5, 6)]
    folded = towers.folded_tower("cvr")
    zeros = sum(
        int((p == 0).sum()) for name, p in folded.named_parameters() if name.endswith("weight")
    )
    assert (
        zeros
        == density_report(towers)["cvr"]["total_weights"]
        - density_report(towers)["cvr"]["total_kept"]
    )


def test_objectives_without_an_imputation_head_are_refused():
    with pytest.raises(
        ConfigError,
        match=r"model\.tower_sharing: adap_sl .* objective 'esmm' has no imputation head; "
        r"use a DR-family objective \(badr, escm2_dr, multi_dr\)",
    ):
        load_config(None, ["output_dir=x", "data.train=x", ADAP_SL])
    # The builder refuses such a model too, whoever calls it.
    with pytest.raises(ConfigError, match=r"no imputation head \(heads: ctr, cvr\)"):
        build_model(
            tiny_schema(),
            adap_sl_config(),
            build_objective("esmm").required_heads,
            embedding_device="cpu",
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.adap_sl.shared_fraction=1.0", "shared_fraction must be in"),
        ("model.tower_sizes=[]", "tower_sizes is empty"),
        ("model.adap_sl.epoch_steps=0", "epoch_steps must be >= 1"),
        ("model.adap_sl.cvr.rate=1.0", r"adap_sl.cvr.rate must be in \[0, 1\)"),
        ("model.adap_sl.imputation.min_density=0", r"imputation.min_density must be in \(0, 1\]"),
        ("model.tower_sharing=shared", "model.tower_sharing: 'shared' is not one of"),
    ],
)
def test_bad_adap_sl_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(
            None,
            ["output_dir=x", "data.train=x", "objective.name=multi_dr", ADAP_SL, override],
        )


def test_a_width_that_cannot_be_split_is_refused():
    assert split_width(5, 0.5) == (2, 3) and split_width(128, 0.25) == (32, 96)
    with pytest.raises(ValueError, match="width of 1 cannot be split"):
        split_width(1, 0.5)


# Pruning -------------------------------------------------------------------------------------


def test_magnitude_pruning_by_hand():
    weights = [torch.tensor([[0.5, -0.1], [0.3, 0.05]]), torch.tensor([[-0.2]])]
    masks = [torch.ones(2, 2), torch.ones(1, 1)]
    # 5 kept; floor(0.4 x 5) = 2 smallest magnitudes over both tensors: 0.05 and -0.1.
    assert magnitude_prune_(weights, masks, rate=0.4, min_density=0.2) == 2
    assert masks[0].tolist() == [[1, 0], [1, 0]] and masks[1].tolist() == [[1]]
    # 3 kept: floor(0.4 x 3) = 1, the smallest of what is left (-0.2), even if a pruned raw weight grew.
    weights[0][1, 1] = 0.0001
    assert magnitude_prune_(weights, masks, rate=0.4, min_density=0.2) == 1
    assert masks[0].tolist() == [[1, 0], [1, 0]] and masks[1].tolist() == [[0]]
    # The floor: at least ceil(0.5 x 5) = 3 kept, so nothing more goes.
    masks = [torch.ones(2, 2), torch.ones(1, 1)]
    assert magnitude_prune_(weights, masks, rate=0.9, min_density=0.5) == 2
    assert magnitude_prune_(weights, masks, rate=0.9, min_density=0.5) == 0
    assert sum(int(m.sum()) for m in masks) == 3


def _train_steps(
    model: CtcvrModel, pruner: AdaptivePruner, steps: range, optimizer
) -> list[dict[str, torch.Tensor]]:
    """Adam steps on Multi-DR with the pruner after each; every tower mask after every step."""
    objective = build_objective("multi_dr", undersample_rate=None)
    module = TrainModule(model, objective).train()
    batch = tiny_batch(CLICK, CONVERSION)
    history = []
    for step in steps:
        loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.after_step(step)
        history.append(
            {k: v.clone() for k, v in model.partially_shared.state_dict().items() if ".mask_" in k}
        )
    return history


def test_masks_are_nested_reach_the_target_density_and_follow_the_schedule():
    cvr, imputation = (
        PruningConfig(rate=0.2, min_density=0.3, warmup_epochs=1),
        PruningConfig(0.1, 0.6, 3),
    )
    config = AdapSlConfig(epoch_steps=2, cvr=cvr, imputation=imputation)
    model = adap_sl_model(**vars(config))
    pruner = AdaptivePruner(model.partially_shared, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    history = _train_steps(model, pruner, range(1, 31), optimizer)
    for before, after in itertools.pairwise(history):
        for key in before:
            assert torch.all(after[key] <= before[key]), key  # a pruned weight never comes back
    densities = [density_report_of(model, masks) for masks in history]
    # Epoch e ends at step 2(e+1); cvr prunes from epoch 1 (step 4), imputation from epoch 3 (step 8).
    assert [d["cvr"] < 1 for d in densities[:4]] == [False, False, False, True]
    assert [d["imputation"] < 1 for d in densities[:8]] == [False] * 7 + [True]
    report = density_report(model.partially_shared)
    for tower, schedule in (("cvr", cvr), ("imputation", imputation)):
        weights = report[tower]["total_weights"]
        assert report[tower]["total_kept"] == math.ceil(schedule.min_density * weights)
    assert 0 < report["cvr"]["shared"] < 1 and 0 < report["cvr"]["private"] < 1


def density_report_of(model: CtcvrModel, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    kept = {tower: [0, 0] for tower in ("cvr", "imputation")}
    for key, mask in masks.items():
        tower = key.rsplit("mask_", 1)[1]
        kept[tower][0] += int(mask.sum())
        kept[tower][1] += mask.numel()
    return {tower: k / n for tower, (k, n) in kept.items()}


def test_pruned_weights_stay_zero_and_receive_no_update():
    config = AdapSlConfig(
        epoch_steps=3, cvr=PruningConfig(0.5, 0.1, 0), imputation=PruningConfig(0.5, 0.1, 0)
    )
    model = adap_sl_model(**vars(config))
    towers = model.partially_shared
    pruner = AdaptivePruner(towers, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    _train_steps(model, pruner, range(1, 4), optimizer)  # one prune at step 3
    masks = {key: mask.clone() for key, mask in towers.state_dict().items() if ".mask_" in key}
    raw_before = {name: p.detach().clone() for name, p in towers.named_parameters()}
    _train_steps(model, pruner, range(4, 6), optimizer)  # two Adam steps, no prune
    assert all(torch.equal(mask, towers.state_dict()[key]) for key, mask in masks.items())
    for name, weight in towers.named_parameters():
        if not name.endswith("weight"):
            continue
        module = towers.get_submodule(name.removesuffix(".linear.weight"))
        unread = torch.stack([module.mask(t) for t in module.towers]).amax(0) == 0
        assert unread.any(), name
        assert torch.all(weight.detach()[unread] == 0) and torch.all(
            raw_before[name][unread] == 0
        ), name
        assert torch.all(weight.grad[unread] == 0), (
            name
        )  # masked in the forward: no gradient at all
        read = ~unread
        assert not torch.equal(weight.detach()[read], raw_before[name][read]), (
            name
        )  # the rest trains
    for tower in ("cvr", "imputation"):
        for module, _ in towers.masked_linears(tower):
            assert torch.all(module.masked_weight(tower)[module.mask(tower) == 0] == 0)


def test_shared_weights_pruned_by_one_tower_keep_training_for_the_other():
    config = AdapSlConfig(
        epoch_steps=1, cvr=PruningConfig(0.6, 0.1, 0), imputation=PruningConfig(0.0, 1.0, 0)
    )
    model = adap_sl_model(**vars(config))
    towers = model.partially_shared
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    _train_steps(model, AdaptivePruner(towers, config), range(1, 3), optimizer)
    shared = towers.layers[0].shared
    only_imputation = (shared.mask("cvr") == 0) & (shared.mask("imputation") == 1)
    assert only_imputation.any()
    before = shared.linear.weight.detach()[only_imputation].clone()
    _train_steps(
        model, AdaptivePruner(towers, AdapSlConfig(epoch_steps=10**6)), range(3, 5), optimizer
    )
    after = shared.linear.weight.detach()[only_imputation]
    assert torch.all(after != 0) and not torch.equal(before, after)
    assert torch.all(shared.masked_weight("cvr")[only_imputation] == 0)
    assert density_report(towers)["imputation"]["total"] == 1.0
