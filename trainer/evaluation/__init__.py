"""Evaluation: one metrics function and its reports, shared by training, ``trainer.evaluate``,
the benchmarks and the Coat / MNAR ranking protocol. Pure numpy and scikit-learn; callers pass
CPU arrays (``tensor.detach().cpu().numpy()``).
"""

from trainer.evaluation.metrics import (
    LOGLOSS_EPS,
    METRIC_SECTIONS,
    SupportsTruth,
    compute_metrics,
    ranking_metrics,
)
from trainer.evaluation.report import format_table, metrics_table, write_report

__all__ = [
    "LOGLOSS_EPS",
    "METRIC_SECTIONS",
    "SupportsTruth",
    "compute_metrics",
    "format_table",
    "metrics_table",
    "ranking_metrics",
    "write_report",
]
