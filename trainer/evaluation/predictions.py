"""One evaluation set's predictions and labels, and their metrics (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.evaluation.metrics import compute_metrics, ranking_metrics

__all__ = ["Predictions"]


@dataclass
class Predictions:
    """Predictions and labels of one evaluation set, ``(N,)`` numpy arrays."""

    pctr: np.ndarray
    pcvr: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    group: np.ndarray | None = None
    truth: dict[str, np.ndarray] | None = None

    def metrics(self, ranking_k: int = 0) -> dict[str, float]:
        """``compute_metrics``; with ``ranking_k > 0`` also the random-exposure ranking metrics.

        Those rank each user's clicked (rated) rows by pCVR against conversion, users from
        ``group``, users without a positive counted as the debiasing papers' code does (NDCG 1,
        Recall 0; see ``ranking_metrics``). Their AUC is ``cvr_auc`` and is not repeated.

        Raises:
            ValueError: ``ranking_k > 0`` without ``group``.
        """
        metrics = compute_metrics(
            self.pctr, self.pcvr, self.click, self.conversion, group=self.group, truth=self.truth
        )
        if ranking_k > 0:
            if self.group is None:
                raise ValueError("ranking metrics need the schema's group column (the user id)")
            rated = self.click == 1
            ranking = ranking_metrics(
                self.pcvr[rated],
                self.conversion[rated],
                self.group[rated],
                k=ranking_k,
                users_without_positives="count",
            )
            metrics.update({key: value for key, value in ranking.items() if key != "auc"})
        return metrics
