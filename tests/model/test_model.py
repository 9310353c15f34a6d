import dataclasses

import pytest
import torch
from torchrec import PoolingType

from schemas import FeatureSchema
from tests.helpers import tiny_batch, tiny_schema
from trainer.builders import build_model, mmoe_tiny, model_heads
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.model import MLP, DotInteraction, MMoE, Tower, embedding_bag_configs


def test_embedding_configs_follow_the_schema():
    configs = embedding_bag_configs(tiny_schema())
    by_name = {c.name: c for c in configs}
    assert list(by_name) == ["tag_table", "user", "item"]
    assert by_name["tag_table"].num_embeddings == 11  # vocab 10 + OOV row
    assert by_name["tag_table"].feature_names == ["tags"]
    assert by_name["tag_table"].pooling == PoolingType.MEAN  # multi-valued
    assert by_name["user"].pooling == PoolingType.SUM
    assert by_name["user"].num_embeddings == 51


def test_model_forward_shapes_and_ctcvr_product():
    torch.manual_seed(0)
    model = build_model(tiny_schema(), mmoe_tiny(), embedding_device="cpu")
    batch = tiny_batch([1, 0, 0, 1], [1, 0, 0, 0])
    out = model(batch.sparse, batch.dense)
    assert set(out.logits) == {"ctr", "cvr"}
    assert out.logits["ctr"].shape == (4,)
    assert torch.allclose(
        out.pctcvr, torch.sigmoid(out.logits["ctr"]) * torch.sigmoid(out.logits["cvr"])
    )
    assert [a.shape for a in out.features["cvr.layers"]] == [(4, 8)]


def test_extra_heads_get_a_gate_and_a_tower():
    model = build_model(tiny_schema(), mmoe_tiny(), {"imputation"}, embedding_device="cpu")
    assert model.heads == ("ctr", "cvr", "imputation")
    assert set(model.mmoe.gates) == {"ctr", "cvr", "imputation"}
    batch = tiny_batch([1, 0], [0, 0])
    assert model(batch.sparse, batch.dense).logits["imputation"].shape == (2,)
    assert model_heads({"b", "a", "ctr"}) == ("ctr", "cvr", "a", "b")


def test_mmoe_gates_are_softmax_mixtures_of_experts():
    torch.manual_seed(0)
    mmoe = MMoE(6, ("a", "b"), num_experts=3, expert_sizes=(5,))
    x = torch.randn(4, 6)
    # Each expert as the service reads it: its own Linear -> ReLU, from the exported tensors.
    tensors = mmoe.serving_tensors(("a",))
    experts = torch.stack(
        [
            torch.relu(
                x @ tensors[f"mmoe.experts.{e}.layers.0.weight"].T
                + tensors[f"mmoe.experts.{e}.layers.0.bias"]
            )
            for e in range(3)
        ],
        dim=1,
    )
    weights = torch.softmax(x @ tensors["mmoe.gates.a.weight"].T + tensors["mmoe.gates.a.bias"], -1)
    expected = (weights.unsqueeze(-1) * experts).sum(1)
    assert torch.allclose(mmoe(x)["a"], expected, atol=1e-6)


def test_mmoe_detached_task_trains_its_gate_only():
    torch.manual_seed(0)
    mmoe = MMoE(6, ("a", "b"), num_experts=3, expert_sizes=(5,), detached_tasks=("b",))
    x = torch.randn(4, 6, requires_grad=True)
    out = mmoe(x)
    plain = MMoE(6, ("a", "b"), num_experts=3, expert_sizes=(5,))
    plain.load_state_dict(mmoe.state_dict())
    assert torch.equal(out["b"], plain(x)["b"])  # same values, only the gradient is cut
    out["b"].sum().backward()
    assert x.grad is None
    assert all(p.grad is None for p in mmoe.experts.parameters())
    assert mmoe.gates["b"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="detached_tasks"):
        MMoE(6, ("a",), num_experts=2, expert_sizes=(4,), detached_tasks=("c",))


def test_mlp_and_tower_validate_arguments():
    with pytest.raises(ValueError, match="at least one layer"):
        MLP(4, ())
    with pytest.raises(ValueError, match="dropout"):
        MLP(4, (2,), dropout=1.0)
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(4, ("a",), num_experts=0, expert_sizes=(2,))
    logit, acts = Tower(4, ())(torch.randn(3, 4))
    assert logit.shape == (3,) and acts == []


def test_heads_must_start_with_ctr_cvr():
    from torchrec import EmbeddingBagCollection

    from trainer.model import CtcvrModel, SparseArch

    arch = SparseArch(EmbeddingBagCollection(tables=embedding_bag_configs(tiny_schema())))
    with pytest.raises(ValueError, match="heads must start with"):
        CtcvrModel(arch, 1, ("cvr", "ctr"), 2, (4,), (2,))


def test_model_config_defaults_are_the_benchmark_mmoe():
    config = ModelConfig()
    assert (config.num_experts, config.expert_sizes) == (8, [256])


def test_dot_interaction_by_hand():
    # three features of dim 2: e0 = (1, 2), e1 = (3, 4), e2 = (5, 6)
    pooled = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 0.0, 0.0, 1.0, 2.0, 2.0]])
    interaction = DotInteraction(num_features=3, dim=2)
    # pairs (0, 1), (0, 2), (1, 2): 1*3 + 2*4, 1*5 + 2*6, 3*5 + 4*6; then 0, 2, 2
    assert torch.equal(interaction(pooled), torch.tensor([[11.0, 17.0, 39.0], [0.0, 2.0, 2.0]]))
    assert interaction.out_features == 3
    with pytest.raises(ValueError, match="at least 2 sparse features"):
        DotInteraction(num_features=1, dim=2)


def test_model_with_dot_interaction_feeds_the_products_to_the_mmoe():
    torch.manual_seed(0)
    config = dataclasses.replace(mmoe_tiny(), interaction="dot")
    model = build_model(tiny_schema(), config, embedding_device="cpu")
    # 3 sparse features of dim 4, 1 dense feature, 3 pairs
    assert model.mmoe.gates["ctr"].in_features == 3 * 4 + 1 + 3
    batch = tiny_batch([1, 0, 0, 1], [1, 0, 0, 0])
    pooled = model.sparse_arch(batch.sparse)
    captured = {}
    model.mmoe.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    model(batch.sparse, batch.dense).logits["ctr"].sum().backward()
    assert torch.allclose(captured["x"][:, 13:], DotInteraction(3, 4)(pooled))
    assert (
        model.sparse_arch.embedding_bag_collection.embedding_bags["user"].weight.grad.abs().sum()
        > 0
    )


def test_dot_interaction_needs_one_embedding_dim_and_says_which_features_differ():
    schema = FeatureSchema.from_dict(
        {
            "sparse": [
                {"name": "user", "hash_buckets": 50, "dim": 4},
                {"name": "item", "hash_buckets": 40, "dim": 3},
            ],
            "labels": {"click": "click", "conversion": "conversion"},
        }
    )
    config = dataclasses.replace(mmoe_tiny(), interaction="dot")
    with pytest.raises(ConfigError, match=r"3: \['item'\], 4: \['user'\]"):
        build_model(schema, config, embedding_device="cpu")
    assert build_model(schema, mmoe_tiny(), embedding_device="cpu").interaction is None


def test_unknown_interaction_is_a_config_error():
    with pytest.raises(ConfigError, match="model.interaction: 'cross' is not one of"):
        load_config(None, ["output_dir=x", "data.train=x", "model.interaction=cross"])


def test_sparse_arch_output_is_the_regrouped_pooled_embeddings_in_config_order():
    from torchrec import EmbeddingBagCollection, KeyedTensor

    from trainer.model import SparseArch

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(tiny_schema()))
    arch = SparseArch(ebc)
    batch = tiny_batch([1, 0, 1], [0, 0, 1])
    pooled = ebc(batch.sparse)
    # Unsharded, the collection's keys are already in config order: no regrouping copy is made.
    assert pooled.keys() == arch.feature_names
    expected = KeyedTensor.regroup([pooled], [arch.feature_names])[0]
    assert torch.equal(arch(batch.sparse), expected)
