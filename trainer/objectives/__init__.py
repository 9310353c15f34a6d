"""Training objectives, one file per paper, selected by name in the config.

Every objective implements the whole ``Objective`` protocol (``base.py``) and takes one frozen
dataclass of typed hyper-parameters (its ``params_type``, e.g. ``MultiDrParams``), which the
config loader builds from ``objective.params`` (:func:`objective_params`), reporting every
problem at once. ``build_objective(name, **params)`` is how the recipe gets one; ``OBJECTIVES``
maps the names to the classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.objectives.badr import BadrObjective
from trainer.objectives.base import LossOutput, Objective, detached_heads, model_structure
from trainer.objectives.ddpo import DdpoObjective
from trainer.objectives.escm2 import Escm2DrObjective, Escm2IpwObjective
from trainer.objectives.esmm import EsmmObjective
from trainer.objectives.evi import EviObjective
from trainer.objectives.multi_dr import MultiDrObjective
from trainer.objectives.multi_ipw import MultiIpwObjective
from trainer.objectives.naive import NaiveObjective
from trainer.objectives.params import (
    ParamProblem,
    ParamsError,
    param_names,
    params_to_dict,
    parse_params,
)

__all__ = [
    "OBJECTIVES",
    "LossOutput",
    "Objective",
    "ParamProblem",
    "ParamsError",
    "build_objective",
    "detached_heads",
    "model_structure",
    "objective_class",
    "objective_params",
    "param_names",
    "params_to_dict",
]

OBJECTIVES: dict[str, type[Objective]] = {
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


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_params(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The typed hyper-parameters of objective ``name`` from a config's flat ``objective.params``
    (absent keys take the paper's defaults).

    Raises:
        ValueError: an unknown objective.
        ParamsError: every unknown key, wrong type and invalid value, each named by its key.
    """
    return parse_params(objective_class(name).params_type, values or {}, owner=name)


def build_objective(name: str, /, **params: Any) -> Objective:
    """Instantiate an objective by its config name from flat hyper-parameter values.

    Example::

        build_objective("multi_dr", tau=0.02, undersample_rate=None)

    Raises:
        ValueError: an unknown name.
        ParamsError: invalid parameters (all of them, named by key).
    """
    return objective_class(name)(objective_params(name, params))  # type: ignore[call-arg]
