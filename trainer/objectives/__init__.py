"""Training objectives, one file per paper, selected by name in the config.

``build_objective(name, **params)`` is how the recipe gets one; ``OBJECTIVES`` lists the names.
"""

from __future__ import annotations

from trainer.objectives.badr import BadrObjective
from trainer.objectives.base import LossOutput, Objective, detached_heads, model_structure
from trainer.objectives.ddpo import DdpoObjective
from trainer.objectives.escm2 import Escm2DrObjective, Escm2IpwObjective
from trainer.objectives.esmm import EsmmObjective
from trainer.objectives.evi import EviObjective
from trainer.objectives.multi_dr import MultiDrObjective
from trainer.objectives.multi_ipw import MultiIpwObjective
from trainer.objectives.naive import NaiveObjective

__all__ = [
    "OBJECTIVES",
    "LossOutput",
    "Objective",
    "build_objective",
    "detached_heads",
    "model_structure",
]

OBJECTIVES: dict[str, type] = {
    "naive": NaiveObjective,
    "esmm": EsmmObjective,
    "multi_ipw": MultiIpwObjective,
    "multi_dr": MultiDrObjective,
    "escm2_ipw": Escm2IpwObjective,
    "escm2_dr": Escm2DrObjective,
    "badr": BadrObjective,
    "ddpo": DdpoObjective,
    "evi": EviObjective,
}


def build_objective(name: str, **params: object) -> Objective:
    """Instantiate an objective by its config name.

    Raises:
        ValueError: unknown name, or parameters the objective does not take.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**params)
    except TypeError as err:
        raise ValueError(f"objective {name!r}: bad parameters {params}: {err}") from None
