"""Model components: embeddings from the schema, feature interactions, MMoE, towers (Adap-SL's
partially shared ones too), and the CTR/CVR model.

The modules the service computes with declare the tensors they export (``serving_tensors``,
see ``trainer.model.exported``); ``CtcvrModel.serving_tensors`` composes them."""

from trainer.model.adap_sl import PartiallySharedTowers
from trainer.model.conditioning import PropensityConditionedTower
from trainer.model.ctcvr import CORE_HEADS, CtcvrModel
from trainer.model.embeddings import SparseArch, embedding_bag_configs
from trainer.model.interaction import DotInteraction
from trainer.model.mlp import MLP
from trainer.model.mmoe import MMoE
from trainer.model.outputs import TaskOutputs
from trainer.model.structure import ModelStructure
from trainer.model.towers import Tower
from trainer.model.transfer import CausalTransfer, CausalTransferFusion

__all__ = [
    "CORE_HEADS",
    "MLP",
    "CausalTransfer",
    "CausalTransferFusion",
    "CtcvrModel",
    "DotInteraction",
    "MMoE",
    "ModelStructure",
    "PartiallySharedTowers",
    "PropensityConditionedTower",
    "SparseArch",
    "TaskOutputs",
    "Tower",
    "embedding_bag_configs",
]
