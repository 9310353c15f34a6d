"""Label rates of an impression log, and, with ground truth, how biased the clicked space is.

The selection gap is the quantity debiasing objectives exist for: the conversion rate a model
sees on clicked impressions minus the true post-click conversion rate averaged over every
impression, which is what CVR must be predicted on at serving time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from trainer.data._decode import TRUTH_COLUMNS, Site, binary_column, column_array, truth_columns
from trainer.data._parquet import (
    DataError,
    PathsLike,
    inspect_files,
    locate,
    open_file,
    read_row_group,
    resolve_files,
)

__all__ = ["LogSummary", "format_summaries", "summarize"]


@dataclass
class LogSummary:
    """Running sums over impressions; rates are derived from them.

    Attributes:
        rows: impressions.
        clicks: clicked impressions.
        conversions: converted impressions (all clicked).
        truth_rows: impressions with ground truth (0 for a real log).
        true_ctr_sum: sum of ``true_ctr``.
        true_cvr_sum: sum of ``true_cvr`` over all impressions.
        true_cvr_clicked_sum: sum of ``true_cvr`` over clicked impressions.
        cf_conversions: sum of ``cf_conversion`` over all impressions.
    """

    rows: int = 0
    clicks: int = 0
    conversions: int = 0
    truth_rows: int = 0
    true_ctr_sum: float = 0.0
    true_cvr_sum: float = 0.0
    true_cvr_clicked_sum: float = 0.0
    cf_conversions: int = 0

    def add(
        self, click: np.ndarray, conversion: np.ndarray, truth: np.ndarray | None = None
    ) -> None:
        """Accumulate ``(n,)`` 0/1 labels and optionally ``(n, 3)`` truth (ctr, cvr, cf)."""
        clicked = click != 0
        self.rows += len(click)
        self.clicks += int(np.count_nonzero(clicked))
        self.conversions += int(np.count_nonzero(conversion))
        if truth is not None:
            true_cvr = truth[:, 1].astype(np.float64)
            self.truth_rows += len(truth)
            self.true_ctr_sum += float(truth[:, 0].sum(dtype=np.float64))
            self.true_cvr_sum += float(true_cvr.sum())
            self.true_cvr_clicked_sum += float(true_cvr[clicked].sum())
            self.cf_conversions += int(np.count_nonzero(truth[:, 2]))

    def merge(self, other: LogSummary) -> LogSummary:
        """The summary of both logs together."""
        return LogSummary(
            **{
                name: getattr(self, name) + getattr(other, name)
                for name in self.__dataclass_fields__
            }
        )

    @property
    def ctr(self) -> float:
        return self.clicks / self.rows if self.rows else float("nan")

    @property
    def cvr_on_clicks(self) -> float:
        """Observed conversions per click: what a model trained on clicks only targets."""
        return self.conversions / self.clicks if self.clicks else float("nan")

    @property
    def ctcvr(self) -> float:
        return self.conversions / self.rows if self.rows else float("nan")

    @property
    def has_truth(self) -> bool:
        return self.truth_rows > 0 and self.truth_rows == self.rows

    @property
    def mean_true_ctr(self) -> float:
        return self.true_ctr_sum / self.rows if self.has_truth else float("nan")

    @property
    def mean_true_cvr(self) -> float:
        """True post-click CVR averaged over all impressions: the inference-space target."""
        return self.true_cvr_sum / self.rows if self.has_truth else float("nan")

    @property
    def true_cvr_on_clicks(self) -> float:
        ok = self.has_truth and self.clicks
        return self.true_cvr_clicked_sum / self.clicks if ok else float("nan")

    @property
    def selection_gap(self) -> float:
        """``cvr_on_clicks - mean_true_cvr``: positive when clicks select likelier converters."""
        return self.cvr_on_clicks - self.mean_true_cvr

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rows": self.rows,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "ctr": self.ctr,
            "cvr_on_clicks": self.cvr_on_clicks,
            "ctcvr": self.ctcvr,
            "mean_true_ctr": self.mean_true_ctr,
            "mean_true_cvr": self.mean_true_cvr,
            "true_cvr_on_clicks": self.true_cvr_on_clicks,
            "selection_gap": self.selection_gap,
        }


def summarize(
    paths: PathsLike,
    *,
    click: str = "click",
    conversion: str = "conversion",
    filter: str | None = None,
) -> LogSummary:
    """Summarise the labels (and ground truth, if every file has it) of Parquet impression logs.

    Reads only the label and truth columns, one row group at a time.

    Args:
        paths: a directory of ``*.parquet`` files (or of hive partitions), a file, or a list of
            either; local paths or storage URIs.
        click: name of the click column.
        conversion: name of the conversion column.
        filter: a partition filter, as for :class:`~trainer.data.ImpressionReader`.

    Raises:
        DataError: unreadable files, missing label columns, null or non-binary labels.
        StorageError: a missing bucket, denied access, an unreachable store.
    """
    parts = inspect_files(resolve_files(paths, filter=filter))
    with_truth = all(set(TRUTH_COLUMNS) <= set(p.arrow_schema.names) for p in parts)
    columns = [click, conversion] + (list(TRUTH_COLUMNS) if with_truth else [])
    summary = LogSummary()
    for part in parts:
        for column in (click, conversion):
            if column not in part.arrow_schema.names:
                where = locate(part.path, column=column)
                raise DataError(f"{where} (file schema, every row group): missing label column")
        handle = open_file(part)
        try:
            for row_group in range(len(part.row_group_rows)):
                table = read_row_group(handle, part, row_group, columns)
                site = Site(part.path, row_group, 0, part.first_row(row_group))
                summary.add(
                    binary_column(column_array(table, click), site, click),
                    binary_column(column_array(table, conversion), site, conversion),
                    truth_columns(table, site) if with_truth else None,
                )
        finally:
            handle.close(force=True)
    return summary


def format_summaries(summaries: Mapping[str, LogSummary]) -> str:
    """A plain-text table, one line per named summary (e.g. per split)."""
    header = (
        "split",
        "rows",
        "clicks",
        "CTR",
        "CVR|click",
        "CTCVR",
        "true CVR",
        "true CVR|click",
        "gap",
    )
    lines = [header]
    for name, s in summaries.items():
        truth = s.has_truth
        lines.append(
            (
                name,
                f"{s.rows:,}",
                f"{s.clicks:,}",
                _pct(s.ctr),
                _pct(s.cvr_on_clicks),
                _pct(s.ctcvr),
                _pct(s.mean_true_cvr) if truth else "-",
                _pct(s.true_cvr_on_clicks) if truth else "-",
                f"{100 * s.selection_gap:+.2f} pp" if truth else "-",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    notes = []
    if any(s.has_truth for s in summaries.values()):
        notes.append(
            "true CVR: mean true post-click CVR over all impressions; gap: CVR|click - true CVR "
            "(selection bias of training on clicks only)"
        )
    return "\n".join(text + notes)


def _pct(x: float) -> str:
    return "nan" if np.isnan(x) else f"{100 * x:.3f}%"
