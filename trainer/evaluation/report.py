"""Metrics dicts as files and markdown tables.

``write_report`` writes one run's metrics as ``<name>.json`` and ``<name>.md`` (the texts of
``report_files``, which a run directory writes through ``trainer.run_dir``);
``format_table`` is that markdown (the trainer prints it); ``metrics_table`` compares several
runs, one row each, and shows ``mean ± std`` where a cell holds one value per seed.

Formatting: values have 4 decimal places, the counts (``impressions``, ``clicks``,
``conversions``, ``users``, ``users_evaluated``) are printed as integers, and NaN (an
undefined metric) is printed ``nan`` in markdown and written ``null`` in JSON. The std of a
list of values is the sample standard deviation (``ddof=1``): the runs are a sample of seeds,
so ``[0.70, 0.71, 0.69]`` prints ``0.7000 ± 0.0100``.

Example::

    >>> print(format_table({"ctr_auc": 0.75, "clicks": 3.0}))
    | metric | value |
    |---|---:|
    | **CTR** | |
    | ctr_auc | 0.7500 |
    | **counts** | |
    | clicks | 3 |
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trainer.evaluation.metrics import METRIC_SECTIONS

__all__ = ["format_table", "metrics_table", "report_files", "write_report"]

# Keys printed as integers rather than with 4 decimals.
_COUNT_KEYS = frozenset({"impressions", "clicks", "conversions", "users", "users_evaluated"})
_OTHER_SECTION = "other"
_MISSING = "–"  # a metric a run did not report

CellValue = float | Sequence[float] | np.ndarray


def write_report(
    metrics: Mapping[str, float], out_dir: str | Path, name: str = "metrics"
) -> tuple[Path, Path]:
    """Write ``metrics`` to ``out_dir/<name>.json`` and ``out_dir/<name>.md``
    (:func:`report_files`). ``out_dir`` is created if needed.

    Args:
        metrics: metric name -> number, e.g. the output of ``compute_metrics``.
        out_dir: directory for the two files.
        name: file stem.

    Returns:
        The paths of the JSON and markdown files.

    Raises:
        ValueError: a value is not a real number (the message names its key).
    """
    out = Path(out_dir)
    files = report_files(metrics, name)
    out.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        (out / file).write_text(text)
    return out / f"{name}.json", out / f"{name}.md"


def report_files(metrics: Mapping[str, float], name: str = "metrics") -> dict[str, str]:
    """The two report files of ``metrics``: ``<name>.json`` and ``<name>.md`` -> their text.

    The JSON has sorted keys and ``null`` for NaN or infinite values, so any JSON reader
    parses it. The markdown is ``format_table(metrics)``.

    Raises:
        ValueError: a value is not a real number (the message names its key).
    """
    values = _check_numbers(metrics)
    as_json = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
    return {
        f"{name}.json": json.dumps(as_json, sort_keys=True, indent=2, allow_nan=False) + "\n",
        f"{name}.md": format_table(values) + "\n",
    }


def format_table(metrics: Mapping[str, float]) -> str:
    """One run's metrics as a markdown ``metric | value`` table, grouped by section.

    Sections come in the order of ``METRIC_SECTIONS`` (CTR, CVR (clicks), CTCVR, ground
    truth, counts, ranking), then ``other`` for unknown keys; empty sections are left out.

    Args:
        metrics: metric name -> number.

    Returns:
        The markdown table, without a trailing newline.

    Raises:
        ValueError: a value is not a real number (the message names its key).
    """
    values = _check_numbers(metrics)
    lines = ["| metric | value |", "|---|---:|"]
    for section, keys in _by_section(values).items():
        lines.append(f"| **{section}** | |")
        lines.extend(f"| {key} | {_format_value(key, values[key])} |" for key in keys)
    return "\n".join(lines)


def metrics_table(rows: Mapping[str, Mapping[str, CellValue]], columns: Sequence[str]) -> str:
    """Several runs side by side: one markdown row per run, one column per metric.

    A cell is a number (printed with 4 decimals) or a sequence of numbers, one per seed,
    printed as ``mean ± std`` with the sample std (``ddof=1``); a single-element sequence
    prints its value alone, and a NaN anywhere makes the cell ``nan``. A metric missing
    from a run prints ``–``.

    Args:
        rows: run name -> metric name -> value or values.
        columns: metric names, in column order.

    Returns:
        The markdown table, without a trailing newline.

    Raises:
        ValueError: ``columns`` is empty, or a cell is not a number or a non-empty sequence
            of numbers (the message names the run and the metric).

    Example::

        >>> print(metrics_table({"naive": {"cvr_auc": [0.70, 0.71, 0.69]}}, ["cvr_auc"]))
        | run | cvr_auc |
        |---|---:|
        | naive | 0.7000 ± 0.0100 |
    """
    if not columns:
        raise ValueError("columns is empty; name at least one metric")
    lines = [
        "| run | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for run, cells in rows.items():
        formatted = [_format_cell(run, c, cells[c]) if c in cells else _MISSING for c in columns]
        lines.append(f"| {run} | " + " | ".join(formatted) + " |")
    return "\n".join(lines)


def _by_section(values: Mapping[str, float]) -> dict[str, list[str]]:
    """Section title -> its keys present in ``values``, known keys first in table order."""
    grouped: dict[str, list[str]] = {s: [] for s in (*METRIC_SECTIONS, _OTHER_SECTION)}
    for key in values:
        grouped[_section_of(key)].append(key)
    ordered: dict[str, list[str]] = {}
    for section, keys in grouped.items():
        if keys:
            ordered[section] = sorted(keys, key=lambda k: _position(section, k))
    return ordered


def _section_of(key: str) -> str:
    for section, known in METRIC_SECTIONS.items():
        if key in known or any(p.endswith("@") and key.startswith(p) for p in known):
            return section
    return _OTHER_SECTION


def _position(section: str, key: str) -> tuple[int, str]:
    """Sort key: index in ``METRIC_SECTIONS`` (prefix entries match ``ndcg@5``), then name."""
    known = METRIC_SECTIONS.get(section, ())
    for i, entry in enumerate(known):
        if key == entry or (entry.endswith("@") and key.startswith(entry)):
            return i, key
    return len(known), key


def _format_value(key: str, value: float) -> str:
    if math.isnan(value):
        return "nan"
    if key in _COUNT_KEYS and math.isfinite(value) and value == int(value):
        return str(int(value))
    return f"{value:.4f}"


def _format_cell(run: str, column: str, cell: CellValue) -> str:
    if _is_number(cell):
        return _format_value(column, float(cell))
    if isinstance(cell, (str, bytes)) or not isinstance(cell, (Sequence, np.ndarray)):
        raise ValueError(  # noqa: TRY004 (callers handle every bad cell as a ValueError)
            f"{run}/{column} is {cell!r}; expected a number or a list of numbers"
        )
    values = list(cell)
    if not values or not all(_is_number(v) for v in values):
        raise ValueError(f"{run}/{column} is {cell!r}; expected a number or a list of numbers")
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 1 or np.isnan(arr).any():
        return _format_value(column, float(arr.mean()) if arr.size == 1 else math.nan)
    return f"{arr.mean():.4f} ± {arr.std(ddof=1):.4f}"


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_numbers(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` with every value a Python float; refuses non-numbers by key."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not _is_number(value):
            raise ValueError(f"metric {key!r} is {value!r}; expected a real number")
        out[key] = float(value)
    return out
