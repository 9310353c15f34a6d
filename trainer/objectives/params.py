"""Typed hyper-parameters of the objectives: frozen dataclasses checked field by field.

Each objective takes one frozen dataclass of hyper-parameters (``MultiDrParams`` in
``multi_dr.py``, ...) whose defaults are the paper's. A field is declared with :func:`param`,
which attaches its value ``Rule`` (``NON_NEGATIVE``, ``PROPENSITY_BOUND``, ...); its type
annotation is checked as well (``float``, ``int``, ``bool``, a ``str`` enum, ``X | None``).

A field typed as another such dataclass is a *parameter group* (``PropensityParams`` and
``ImputationParams`` in ``estimators.py``): the DR family shares one definition of its
propensity and imputation options instead of repeating them. Configs stay flat: a group's
fields are read at the level of the objective's own (``objective.params.tau``, not
``objective.params.propensity.tau``), so every config key is a field name.

- :func:`parse_params` turns a config's flat ``objective.params`` mapping into the dataclass and
  reports every problem at once, each named by its key (``ParamsError``):
  ``objective.params.tau: must be in (0, 1], got 0.0``,
  ``objective.params.tua: unknown parameter (did you mean tau?)``.
- :func:`params_to_dict` is the reverse, defaults filled in: what a run records it used.
- Building a dataclass in code runs the same checks: its ``__post_init__`` calls
  :func:`check_params`.

Example::

    @dataclass(frozen=True)
    class MyParams:
        propensity: PropensityParams = field(default_factory=PropensityParams)
        cvr_weight: float = param(1.0, NON_NEGATIVE)

        def __post_init__(self) -> None:
            check_params(self)

    parse_params(MyParams, {"tau": 0.02, "cvr_weight": 2})  # MyParams(PropensityParams(0.02), 2.0)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

__all__ = [
    "KEY_PREFIX",
    "NON_NEGATIVE",
    "POSITIVE",
    "PROPENSITY_BOUND",
    "ParamProblem",
    "ParamsError",
    "Rule",
    "at_least",
    "check_params",
    "param",
    "param_names",
    "params_to_dict",
    "parse_params",
]

KEY_PREFIX = "objective.params."  # where the hyper-parameters sit in a training config

P = TypeVar("P")
_RULE = "ctcvr.rule"  # the dataclass field metadata key holding a field's Rule


@dataclass(frozen=True)
class ParamProblem:
    """One invalid hyper-parameter: its flat key (``tau``) and what is wrong with it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{KEY_PREFIX}{self.key}: {self.message}"


class ParamsError(ValueError):
    """Invalid hyper-parameters; ``problems`` lists every one, each named by its config key.

    Args:
        owner: where the values came from: ``objective 'multi_dr'`` for a config's, the
            dataclass's name for one built in code.
        problems: at least one problem.
    """

    def __init__(self, owner: str, problems: list[ParamProblem]) -> None:
        self.owner = owner
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = f"{owner}: {self.problems[0]}"
        else:
            lines = "".join(f"\n  {problem}" for problem in self.problems)
            text = f"{owner}: {len(self.problems)} invalid parameters:{lines}"
        super().__init__(text)


# Declaring fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A value check: ``holds(value)``, else the problem ``must be <requirement>, got <value>``."""

    requirement: str  # e.g. ">= 0"
    holds: Callable[[Any], bool]


NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)  # loss weights, L2 coefficients
POSITIVE = Rule("> 0", lambda v: v > 0)  # a variance floor
# A propensity clipping bound tau: inverse-propensity weights are at most 1 / tau.
PROPENSITY_BOUND = Rule("in (0, 1]", lambda v: 0.0 < v <= 1.0)


def at_least(bound: float) -> Rule:
    """``>= bound`` (a sampling rate, a number of layers)."""
    return Rule(f">= {bound:g}", lambda v: v >= bound)


def param(default: Any, rule: Rule | None = None) -> Any:
    """A hyper-parameter field: its default and its value check (``None``: any value of the
    annotated type). The rule never sees ``None``: an optional field's null is always valid."""
    return dataclasses.field(default=default, metadata={_RULE: rule})


# Checking a dataclass built in code -------------------------------------------------------------


def check_params(params: object) -> None:
    """Check every field of a params dataclass (its type and value) and normalise ints given for
    floats to floats; for its ``__post_init__``.

    Raises:
        ParamsError: every invalid field, named by its key.
    """
    problems: list[ParamProblem] = []
    hints = _hints(type(params))
    for f in dataclasses.fields(params):  # type: ignore[arg-type]
        value, problem = _check_value(f, hints[f.name], getattr(params, f.name))
        if problem is not None:
            problems.append(ParamProblem(f.name, problem))
        else:
            object.__setattr__(params, f.name, value)  # frozen: the normalised value
    if problems:
        raise ParamsError(type(params).__name__, problems)


# Flat config mappings ---------------------------------------------------------------------------


def param_names(params_type: type) -> tuple[str, ...]:
    """The flat config keys of ``params_type``, its groups' fields in place, in field order."""
    return tuple(_flat_fields(params_type))


def parse_params(params_type: type[P], values: Mapping[str, Any], owner: str) -> P:
    """``params_type`` from a flat mapping (``objective.params``); absent keys take defaults.

    Args:
        params_type: a params dataclass.
        values: flat ``key -> value``, e.g. ``{"tau": 0.02, "undersample_rate": None}``.
        owner: the objective's name, for the error message.

    Raises:
        ParamsError: every unknown key (with the closest known one), wrong type and invalid value.
    """
    known = _flat_fields(params_type)
    problems: list[ParamProblem] = []
    given: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            problems.append(ParamProblem(str(key), _unknown(str(key), known, owner)))
            continue
        f, hint = known[key]
        checked, problem = _check_value(f, hint, value)
        if problem is not None:
            problems.append(ParamProblem(key, problem))
        else:
            given[key] = checked
    if problems:
        raise ParamsError(f"objective {owner!r}", problems)
    return _build(params_type, given)


def params_to_dict(params: object) -> dict[str, Any]:
    """The flat config mapping of ``params``, every key present (defaults filled), enums as their
    string values: the form a run's ``config.yaml`` records."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):  # type: ignore[arg-type]
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            out.update(params_to_dict(value))
        else:
            out[f.name] = value.value if isinstance(value, Enum) else value
    return out


# Internals --------------------------------------------------------------------------------------


@functools.cache
def _hints(params_type: type) -> dict[str, Any]:
    return typing.get_type_hints(params_type)


@functools.cache
def _flat_fields(params_type: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``key -> (field, annotated type)`` with each group's fields in its place.

    Raises:
        TypeError: two fields (of the class or its groups) with the same name.
    """
    flat: dict[str, tuple[dataclasses.Field, Any]] = {}
    hints = _hints(params_type)
    for f in dataclasses.fields(params_type):
        hint = hints[f.name]
        members = _flat_fields(hint) if _is_group(hint) else {f.name: (f, hint)}
        for key, member in members.items():
            if key in flat:
                raise TypeError(f"{params_type.__name__}: parameter {key!r} is declared twice")
            flat[key] = member
    return flat


def _build(params_type: type[P], given: dict[str, Any]) -> P:
    """``params_type`` with the flat values ``given``; each group from its default, replaced."""
    kwargs: dict[str, Any] = {}
    hints = _hints(params_type)
    for f in dataclasses.fields(params_type):  # type: ignore[arg-type]
        hint = hints[f.name]
        if _is_group(hint):
            own = {k: v for k, v in given.items() if k in _flat_fields(hint)}
            kwargs[f.name] = dataclasses.replace(_default(f), **own) if own else _default(f)
        elif f.name in given:
            kwargs[f.name] = given[f.name]
    return params_type(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _check_value(f: dataclasses.Field, hint: Any, value: Any) -> tuple[Any, str | None]:
    """``(normalised value, None)`` or ``(value, problem)`` for one field."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{f.name}: a parameter has one type, or one type or None: {hint}")
        hint, optional = members[0], True
    if value is None:
        return (None, None) if optional else (value, f"must not be null ({_expected(hint)})")
    value, problem = _check_type(hint, value)
    rule: Rule | None = f.metadata.get(_RULE)
    if problem is not None or rule is None or rule.holds(value):
        return value, problem
    return value, f"must be {rule.requirement}{' or null' if optional else ''}, got {value!r}"


def _check_type(hint: Any, value: Any) -> tuple[Any, str | None]:
    if hint is bool:
        return value, None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return (float(value), None) if ok else (value, f"must be a number, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value), None
        except (ValueError, TypeError):
            return value, f"must be one of {[m.value for m in hint]}, got {value!r}"
    if _is_group(hint):
        ok = isinstance(value, hint)
        return value, None if ok else f"must be a {hint.__name__}, got {value!r}"
    raise TypeError(f"parameters of type {hint!r} are not supported")


def _expected(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"one of {[m.value for m in hint]}"
    names = {bool: "true or false", int: "an integer", float: "a number"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _unknown(key: str, known: Mapping[str, Any], owner: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown parameter (did you mean {close[0]}?)"
    return f"unknown parameter; {owner} takes {', '.join(sorted(known))}"
