"""The plan of a warm start: what every table and tensor of the new run starts from, or why not.

:func:`plan_warm_start` compares the source's layout with the new run's and decides, reading no
tensor (so every rank decides the same):

- **tables**, by name: the same size is carried; a resized one keeps its rows as
  ``trainer.warm_start._rows`` says (grown or shrunk); a table the source does not have (a new
  feature's) is initialised as usual. Another embedding dim, or hashed ids where the source had
  a vocabulary (or the reverse), is refused, naming the table.
- **dense tensors**, by state-dict key: the same shape is carried; a tensor the source does not
  have is initialised (a head that is new to this run, a training-only head that an exported
  model does not hold, DDPO's transfer modules...). The weights that read the MMoE's input are
  matched column by column, by feature, so a new feature (or a new interaction pair) gets
  freshly initialised columns and a removed one's columns go, while every other column keeps
  its trained weights. Any other change of shape (other expert or tower sizes, a head's tower
  built differently) is refused, naming the head or module.
- **the served heads** (ctr, cvr) must come from the source: one whose tensors the source does
  not have (an Adap-SL tower against an ordinary one) is refused, naming the head.
- **the optimizer state** is carried only with ``train.init_optimizer=true``, and only from a
  run or checkpoint whose every table and tensor is carried unchanged, with the same objective
  and sparse optimizer; an objective's own parameters (EVI's networks) come with it then, and
  are initialised otherwise.

Every problem is collected and reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique
from typing import Any

import torch

from trainer.model import CORE_HEADS
from trainer.model.adap_sl import TOWERS as PARTIALLY_SHARED_HEADS
from trainer.warm_start._layout import InputColumn, ModelLayout
from trainer.warm_start._rows import RowMap, RowRule, row_map
from trainer.warm_start._source import SourceKind, WarmSource, WarmStartError

__all__ = ["Fate", "TablePlan", "TensorPlan", "WarmStartPlan", "component_of", "plan_warm_start"]


@unique
class Fate(str, Enum):
    CARRIED = "carried"  # the source's values, unchanged
    GROWN = "grown"  # a table with more rows: rows matched by its row map, new ones initialised
    SHRUNK = "shrunk"  # a table with fewer rows: rows matched by its row map
    REMAPPED = "remapped"  # an input weight: columns matched by feature, new ones initialised
    INITIALISED = "initialised"  # not in the source: the new run's own initialisation


@dataclass(frozen=True)
class TablePlan:
    """What one embedding table of the new run starts from.

    Attributes:
        name: the table.
        fate: carried, grown, shrunk or initialised.
        rows: its rows in the new run.
        source_rows: its rows in the source (None if the source has no such table).
        rows_from: where each row starts from (None when initialised).
    """

    name: str
    fate: Fate
    rows: int
    source_rows: int | None = None
    rows_from: RowMap | None = None

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"fate": self.fate.value, "rows": self.rows}
        if self.rows_from is not None:
            entry |= {
                "source_rows": self.source_rows,
                "rule": self.rows_from.rule.value,
                "rows_carried": self.rows_from.carried,
                "ids_kept": round(self.rows_from.ids_kept, 6),
            }
        return entry

    def describe(self) -> str:
        if self.rows_from is None or self.fate is Fate.CARRIED:
            return self.name
        what = {
            RowRule.VOCABULARY: "every id in both keeps its row",
            RowRule.MODULO: "hash buckets x k: every id keeps its row",
            RowRule.POSITION: (
                f"rows kept by position; {self.rows_from.ids_kept:.1%} of ids keep their "
                "bucket (grow hashed tables by a whole multiple to keep them all)"
            ),
        }[self.rows_from.rule]
        return f"{self.name} {self.source_rows} -> {self.rows} rows ({what})"


@dataclass(frozen=True)
class TensorPlan:
    """What one dense tensor of the new run starts from.

    Attributes:
        key: its model state-dict key.
        component: the head or module it belongs to (``head 'ctr'``, ``experts``...).
        fate: carried, remapped or initialised.
        columns: for a remapped input weight, the source column of each column (-1: new).
    """

    key: str
    component: str
    fate: Fate
    columns: torch.Tensor | None = None


@dataclass(frozen=True)
class WarmStartPlan:
    """A warm start, decided: see the module docstring.

    Attributes:
        source: where the weights come from.
        tables: one per table of the new run.
        tensors: one per dense tensor of the new run.
        heads: each head of the new run: ``carried``, ``initialised`` or ``partly carried``.
        columns: the new run's input columns, and how many start from trained weights.
        new_features: features of the new run the source does not have.
        removed_features: features of the source the new run does not have.
        dropped_tables: tables of the source the new run does not have.
        dropped_heads: heads the source holds that the new run does not have.
        with_optimizer: the optimizer state (and the objective's parameters) comes too.
        objective_parameters: the new run's objective has parameters of its own.
    """

    source: WarmSource
    tables: tuple[TablePlan, ...]
    tensors: tuple[TensorPlan, ...]
    heads: dict[str, str]
    columns: tuple[int, int]
    new_features: tuple[str, ...]
    removed_features: tuple[str, ...]
    dropped_tables: tuple[str, ...]
    dropped_heads: tuple[str, ...]
    with_optimizer: bool
    objective_parameters: bool

    def report(self) -> dict[str, Any]:
        """The content of the run's ``warm_start.json``."""
        source = self.source
        by_fate = {
            fate.value: [t.key for t in self.tensors if t.fate is fate]
            for fate in (Fate.CARRIED, Fate.REMAPPED, Fate.INITIALISED)
        }
        objective = "none"
        if self.objective_parameters:
            objective = "carried" if self.with_optimizer else "initialised"
        return {
            "source": {
                "kind": source.kind.value,
                "location": source.location,
                "checkpoint": source.checkpoint.name if source.checkpoint is not None else None,
                "version": source.version,
                "step": source.step,
                "objective": source.objective,
            },
            "optimizer": "carried" if self.with_optimizer else "initialised",
            "objective_parameters": objective,
            "tables": {t.name: t.as_dict() for t in self.tables},
            "dropped_tables": list(self.dropped_tables),
            "heads": dict(self.heads),
            "dropped_heads": list(self.dropped_heads),
            "dense": by_fate,
            "input_columns": {
                "total": self.columns[0],
                "carried": self.columns[1],
                "initialised": self.columns[0] - self.columns[1],
            },
            "features": {"new": list(self.new_features), "removed": list(self.removed_features)},
        }

    def summary(self) -> str:
        """What the log says: a few lines naming what was carried, grown and initialised."""
        lines = [f"warm start from {self.source.describe()}:"]
        for fate in (Fate.CARRIED, Fate.GROWN, Fate.SHRUNK, Fate.INITIALISED):
            tables = [t.describe() for t in self.tables if t.fate is fate]
            if tables:
                lines.append(f"  tables {fate.value} ({len(tables)}): {', '.join(tables)}")
        if self.dropped_tables:
            lines.append(f"  tables not used: {', '.join(self.dropped_tables)}")
        heads = ", ".join(f"{head} {fate}" for head, fate in self.heads.items())
        lines.append(f"  heads: {heads}")
        if self.dropped_heads:
            lines.append(f"  heads of the source not used: {', '.join(self.dropped_heads)}")
        total, carried = self.columns
        if carried != total:
            lines.append(
                f"  input columns: {carried} of {total} carried; new features "
                f"{list(self.new_features)}, removed {list(self.removed_features)}"
            )
        initialised = [t.key for t in self.tensors if t.fate is Fate.INITIALISED]
        if initialised:
            lines.append(f"  dense tensors initialised ({len(initialised)}): {_few(initialised)}")
        lines.append(f"  optimizer state: {'carried' if self.with_optimizer else 'initialised'}")
        if self.objective_parameters and not self.with_optimizer:
            lines.append("  the objective's own parameters: initialised")
        return "\n".join(lines)


def component_of(key: str) -> tuple[str, tuple[str, ...]]:
    """The head or module a dense tensor belongs to, and the heads it serves.

    Example::

        component_of("towers.cvr.head.weight")  # ("head 'cvr'", ("cvr",))
        component_of("mmoe.experts.0.layers.0.0.bias")  # ("experts", ())
    """
    parts = key.split(".")
    if parts[:2] == ["mmoe", "gates"]:
        return f"head {parts[2]!r}", (parts[2],)
    if parts[0] == "towers":
        return f"head {parts[1]!r}", (parts[1],)
    if parts[0] == "partially_shared":
        return "the partially shared towers", PARTIALLY_SHARED_HEADS
    if parts[:2] == ["mmoe", "experts"]:
        return "experts", ()
    return parts[0], ()


def plan_warm_start(
    source: WarmSource,
    target: ModelLayout,
    *,
    init_optimizer: bool,
    objective: str,
    sparse_optimizer: str,
    objective_parameters: bool,
) -> WarmStartPlan:
    """Decide what every table and dense tensor of a new run with layout ``target`` starts from.

    Args:
        source: the previous model.
        target: the new run's model layout.
        init_optimizer: carry the optimizer state (``train.init_optimizer``).
        objective: the new run's objective.
        sparse_optimizer: the new run's sparse optimizer.
        objective_parameters: the new run's objective has parameters of its own.

    Raises:
        WarmStartError: every change that cannot be carried over, one line each, naming the
            table, head or module.
    """
    problems: list[str] = []
    tables = _plan_tables(source, target, problems)
    columns = _column_sources(source.layout.columns, target.columns)
    tensors = _plan_tensors(source, target, columns, problems)
    heads = _head_fates(target, tensors)
    for head in CORE_HEADS:
        missing = [
            t.key for t in tensors if head in component_of(t.key)[1] and t.fate is Fate.INITIALISED
        ]
        if missing:
            problems.append(_missing_head(source, head, missing))
    if init_optimizer:
        problems += _optimizer_problems(source, tables, tensors, objective, sparse_optimizer)
    if problems:
        lines = "".join(f"\n  {problem}" for problem in problems)
        raise WarmStartError(f"cannot warm-start from {source.describe()}:{lines}")
    held_heads = {h for key in source.dense for h in component_of(key)[1]}
    return WarmStartPlan(
        source=source,
        tables=tuple(tables),
        tensors=tuple(tensors),
        heads=heads,
        columns=(len(target.columns), int((columns >= 0).sum())),
        new_features=tuple(f for f in target.features if f not in source.layout.features),
        removed_features=tuple(f for f in source.layout.features if f not in target.features),
        dropped_tables=tuple(t for t in source.layout.tables if t not in target.tables),
        dropped_heads=tuple(h for h in source.layout.heads if h in held_heads - set(target.heads)),
        with_optimizer=init_optimizer,
        objective_parameters=objective_parameters,
    )


def _plan_tables(source: WarmSource, target: ModelLayout, problems: list[str]) -> list[TablePlan]:
    plans = []
    for name, table in target.tables.items():
        old = source.layout.tables.get(name)
        if old is None:
            plans.append(TablePlan(name, Fate.INITIALISED, table.rows))
        elif old.dim != table.dim:
            problems.append(
                f"table {name!r}: embedding dim {old.dim} in the source, {table.dim} here; a "
                "table keeps its dim (name the new one differently to start it fresh)"
            )
        elif old.hashed != table.hashed:
            problems.append(
                f"table {name!r}: {old.kind} in the source, {table.kind} here; its rows mean "
                "different things (name the new one differently to start it fresh)"
            )
        else:
            rows = row_map(old, table)
            fate = (
                Fate.CARRIED
                if rows.rule is RowRule.SAME
                else Fate.GROWN
                if table.rows > old.rows
                else Fate.SHRUNK
            )
            plans.append(TablePlan(name, fate, table.rows, old.rows, rows))
    return plans


def _column_sources(
    source: tuple[InputColumn, ...], target: tuple[InputColumn, ...]
) -> torch.Tensor:
    """The source column of each target input column, -1 where the source has none."""
    where = {column: i for i, column in enumerate(source)}
    return torch.tensor([where.get(column, -1) for column in target], dtype=torch.int64)


def _plan_tensors(
    source: WarmSource, target: ModelLayout, columns: torch.Tensor, problems: list[str]
) -> list[TensorPlan]:
    same_columns = len(source.layout.columns) == len(columns) and bool(
        (columns == torch.arange(len(columns))).all()
    )
    plans = []
    for key, shape in target.dense.items():
        component = component_of(key)[0]
        found = source.dense.get(key)
        if found is None:
            plans.append(TensorPlan(key, component, Fate.INITIALISED))
            continue
        reads_input = key in target.input_keys and key in source.layout.input_keys
        if found.shape[: -1 if reads_input else None] != shape[: -1 if reads_input else None]:
            problems.append(
                f"{component}: {key} has shape {found.shape} in the source and {shape} here "
                "(model.expert_sizes, model.tower_sizes or model.num_experts changed?); a layer "
                "of another shape cannot be carried over"
            )
        elif reads_input and not same_columns:
            plans.append(TensorPlan(key, component, Fate.REMAPPED, columns))
        else:
            plans.append(TensorPlan(key, component, Fate.CARRIED))
    return plans


def _head_fates(target: ModelLayout, tensors: list[TensorPlan]) -> dict[str, str]:
    fates = {}
    for head in target.heads:
        mine = [t.fate for t in tensors if head in component_of(t.key)[1]]
        fresh = sum(fate is Fate.INITIALISED for fate in mine)
        fates[head] = (
            Fate.CARRIED.value
            if fresh == 0
            else Fate.INITIALISED.value
            if fresh == len(mine)
            else "partly carried"
        )
    return fates


def _missing_head(source: WarmSource, head: str, missing: list[str]) -> str:
    why = (
        "an exported model holds its towers as ordinary ones (an Adap-SL tower folded): "
        "warm-start model.tower_sharing=adap_sl from the run or a checkpoint"
        if source.kind is SourceKind.MODEL
        else "its tower is built differently there (model.tower_sharing?)"
    )
    return f"head {head!r}: this run needs {_few(missing)}, which the source does not have; {why}"


def _optimizer_problems(
    source: WarmSource,
    tables: list[TablePlan],
    tensors: list[TensorPlan],
    objective: str,
    sparse_optimizer: str,
) -> list[str]:
    if source.kind is SourceKind.MODEL:
        message = (
            "train.init_optimizer=true: an exported model holds no optimizer state; start from "
            "the run or one of its checkpoints, or set train.init_optimizer=false"
        )
        return [message]
    changed = [f"table {t.name!r} {t.fate.value}" for t in tables if t.fate is not Fate.CARRIED]
    changed += [f"{t.key} {t.fate.value}" for t in tensors if t.fate is not Fate.CARRIED]
    problems = []
    if changed:
        problems.append(
            "train.init_optimizer=true needs the source's very layout, but "
            f"{_few(changed)}; set train.init_optimizer=false to carry the weights alone"
        )
    if source.objective != objective:
        problems.append(
            f"train.init_optimizer=true needs the same objective: the source trained "
            f"{source.objective!r}, this run {objective!r}"
        )
    source_sparse = source.config.get("sparse_optimizer", {}).get("name")
    if source_sparse != sparse_optimizer:
        problems.append(
            f"train.init_optimizer=true needs the same sparse optimizer: the source used "
            f"{source_sparse!r}, this run {sparse_optimizer!r}"
        )
    return problems


def _few(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
