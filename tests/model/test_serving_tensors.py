"""Each structural option declares the tensors the service needs, and the service computes with
them what the trainer's model computes.

For every option (plain, DDPO's causal transfer, Adap-SL's partially shared and pruned towers,
the dot interaction, EVI's propensity-conditioned teacher as a training-only head): the names
and shapes ``CtcvrModel.serving_tensors`` declares are ``ModelSpec.dense_shapes()`` of the
model's spec, and ``serving.model.ScoringModel`` loaded with them (and the tables) scores the
same impressions as the trainer's model in evaluation mode, through the trainer's reader on one
side and the service's featurizer on the other.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from schemas.artifact import SERVED_HEADS
from serving.features import Featurizer
from serving.model import ScoringModel
from tests.serving.artifacts import edge_schema, edge_table, request_rows
from trainer.builders import build_model
from trainer.config import ModelConfig
from trainer.data import ImpressionReader
from trainer.export import model_spec
from trainer.model import ModelStructure

BASE = ModelConfig(num_experts=3, expert_sizes=[8, 6], tower_sizes=[6, 4], dropout=0.1)

OPTIONS = {
    "plain": (BASE, ModelStructure(), None),
    "ddpo_transfer": (
        BASE,
        ModelStructure(
            extra_heads=frozenset({"conversion_propensity"}),
            cvr_transfer=("ctr", "conversion_propensity"),
        ),
        None,
    ),
    "adap_sl": (
        dataclasses.replace(BASE, tower_sharing="adap_sl"),
        ModelStructure(extra_heads=frozenset({"imputation"})),
        None,
    ),
    "interaction_dot": (dataclasses.replace(BASE, interaction="dot"), ModelStructure(), 4),
    "evi_teacher": (
        BASE,
        ModelStructure(
            extra_heads=frozenset({"cvr_teacher"}), conditioned_heads=frozenset({"cvr_teacher"})
        ),
        None,
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("serving_tensors") / "part.parquet"
    pq.write_table(edge_table(300, seed=21), path, row_group_size=120)
    return path


def _model(option: str):
    config, structure, dim = OPTIONS[option]
    schema = edge_schema(dim)
    torch.manual_seed(5)
    model = build_model(schema, config, structure=structure, embedding_device="cpu")
    with torch.no_grad():  # larger weights and biases away from 0: every tensor matters
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.uniform_(-0.5, 0.5)
            elif param.dim() >= 2:  # linear weights, the experts' (E, out, in) included
                param.mul_(3.0)
    if model.partially_shared is not None:  # prune a third of each tower's weights at random
        generator = torch.Generator().manual_seed(0)
        for tower in model.partially_shared.towers:
            for module, _ in model.partially_shared.masked_linears(tower):
                mask = module.mask(tower)
                mask.copy_((torch.rand(mask.shape, generator=generator) > 1 / 3).float())
        model.partially_shared.zero_pruned_()
    return schema, model, model_spec(schema, config, structure)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_the_model_declares_the_tensors_of_its_spec(option):
    _, model, spec = _model(option)
    declared = {name: tuple(t.shape) for name, t in model.serving_tensors().items()}
    assert declared == spec.dense_shapes()
    assert all(not t.requires_grad for t in model.serving_tensors().values())
    for head in model.training_only_heads:  # their towers stay behind (a source keeps its gate)
        assert not [n for n in declared if n.startswith(f"towers.{head}.")]
    assert model.training_only_heads == tuple(h for h in model.heads if h not in SERVED_HEADS)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_the_serving_model_scores_what_the_trainer_model_scores(option, data):
    schema, model, spec = _model(option)
    model.eval()
    reader = ImpressionReader(data, schema, batch_size=128, shuffle=False, with_truth=False)
    with torch.no_grad():
        outputs = [model(batch.sparse, batch.dense) for batch in reader]
    expected = torch.cat([torch.stack([o.pctr, o.pcvr, o.pctcvr], dim=1) for o in outputs]).numpy()

    featurizer = Featurizer(schema, spec)
    served = ScoringModel(spec, featurizer.multi_valued)
    state = model.state_dict()
    for table, key in model.table_keys().items():
        served.set_table(table, state[key])
    served.set_dense(model.serving_tensors())
    served.check_loaded()
    got = served.predict(featurizer(request_rows(data, schema)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.ptp(got, axis=0).min() > 0.05  # scores vary widely: the check has teeth


def test_table_keys_name_every_table_in_config_order():
    _, model, spec = _model("plain")
    keys = model.table_keys()
    assert list(keys) == [t.name for t in spec.tables]
    state = model.state_dict()
    assert [tuple(state[k].shape) for k in keys.values()] == [
        (t.num_rows, t.dim) for t in spec.tables
    ]
