"""Evaluation: one metrics function and its reports, shared by training, ``trainer.evaluate``,
the benchmarks and the Coat / MNAR ranking protocol.

What this package exports is pure numpy and scikit-learn; callers pass CPU arrays
(``tensor.detach().cpu().numpy()``). Scoring a data set with a (sharded) model is
``trainer.evaluation.predict`` (``predict``, ``evaluate``, ``evaluation_reader``), and evaluating
a finished run from its directory ``trainer.evaluation.run`` (``evaluate_run``, the body of
``python -m trainer.evaluate``); they import torch and are not re-exported here.
"""

from trainer.evaluation.metrics import (
    LOGLOSS_EPS,
    METRIC_SECTIONS,
    SupportsTruth,
    compute_metrics,
    ranking_metrics,
)
from trainer.evaluation.predictions import Predictions
from trainer.evaluation.report import format_table, metrics_table, report_files, write_report

__all__ = [
    "LOGLOSS_EPS",
    "METRIC_SECTIONS",
    "Predictions",
    "SupportsTruth",
    "compute_metrics",
    "format_table",
    "metrics_table",
    "ranking_metrics",
    "report_files",
    "write_report",
]
