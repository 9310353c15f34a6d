"""Metrics of a CTR / CVR / CTCVR model, from numpy arrays to one flat dict of floats.

``compute_metrics`` is the one evaluation function: training, ``python -m trainer.evaluate``,
the benchmarks and the Coat / MNAR protocol all call it, so a number means the same thing
wherever it is printed. ``ranking_metrics`` adds the per-user ranking metrics of the
random-exposure test protocol (BADR, Adap-SL). Both take numpy arrays (or anything
``np.asarray`` accepts); a caller holding tensors moves them to the CPU first. No torch here.

Every array has shape ``(N,)`` over the whole impression space. ``pctcvr = pctr * pcvr``;
``conversion`` is 0 wherever ``click`` is 0, so it is the CTCVR label over all impressions
and the CVR label on clicked ones.

Keys of ``compute_metrics`` (a key is absent when its input, ``group`` or ``truth``, is not given):

=========================== ============ ================================================
key                         rows         definition
=========================== ============ ================================================
``ctr_auc``                 all          ROC AUC of ``pctr`` against ``click``
``ctr_logloss``             all          mean binary cross-entropy of ``pctr``, ``click``
``ctr_calibration``         all          ``mean(pctr) / mean(click)`` (1 is calibrated)
``ctr_gauc``                all          GAUC of ``pctr`` against ``click`` by ``group``
``cvr_auc``                 clicked      ROC AUC of ``pcvr`` against ``conversion``
``cvr_logloss``             clicked      log loss of ``pcvr`` against ``conversion``
``cvr_calibration``         clicked      ``mean(pcvr) / mean(conversion)``
``cvr_gauc``                clicked      GAUC of ``pcvr`` against ``conversion``
``ctcvr_auc``               all          ROC AUC of ``pctr * pcvr`` against ``conversion``
``ctcvr_logloss``           all          log loss of ``pctr * pcvr`` against ``conversion``
``ctcvr_calibration``       all          ``mean(pctr * pcvr) / mean(conversion)``
``ctcvr_gauc``              all          GAUC of ``pctr * pcvr`` against ``conversion``
``cvr_ips_estimate``        all          ``sum(conversion / pctr) / sum(click / pctr)``
``cvr_auc_whole_space``     all          ROC AUC of ``pcvr`` against ``truth.cf_conversion``
``cvr_logloss_whole_space`` all          log loss of ``pcvr`` against ``truth.cf_conversion``
``cvr_bias``                all          ``mean(pcvr) - mean(truth.true_cvr)``
``cvr_ips_bias``            all          ``cvr_ips_estimate - mean(truth.true_cvr)``
``true_cvr_mean``           all          ``mean(truth.true_cvr)``
``pcvr_mean``               all          ``mean(pcvr)``
``impressions``             all          N
``clicks``                  all          ``sum(click)``
``conversions``             all          ``sum(conversion)``
=========================== ============ ================================================

Definitions:
    * Log loss is ``-mean(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to
      ``[1e-7, 1 - 1e-7]``; it equals ``sklearn.metrics.log_loss`` on the clipped ``p``.
    * GAUC (Zhou et al., DIN, KDD 2018) is ``sum_g n_g AUC_g / sum_g n_g`` over the groups
      ``g`` whose labels are not all identical, ``n_g`` the group's impressions (its clicked
      impressions for ``cvr_gauc``). ``AUC_g`` is the Mann-Whitney statistic with ties
      counted as one half, exactly as ``roc_auc_score`` computes it.
    * ``cvr_ips_estimate`` is the self-normalised inverse-propensity estimate of the mean CVR
      over all impressions, from the logged labels and the model's own ``pctr`` as the click
      propensity (clipped to ``LOGLOSS_EPS``): what IPW with these propensities makes of the
      whole space at the level of the mean. Set beside ``mean(pcvr)`` it checks, without ground
      truth, whether the CVR tower agrees with its own propensities; ``cvr_ips_bias`` is its
      error against the truth, the part of the selection bias that weighting by ``1 / pctr``
      cannot see (propensities too flat, or selection on something the model does not resolve).

Undefined metrics come back as ``nan`` with no exception and no warning: an AUC or GAUC
with one class present, a calibration whose labels are all 0, any metric of an empty row set.
Invalid input raises ``ValueError`` naming the array and the first bad index.

Example::

    >>> m = compute_metrics(pctr=[0.9, 0.2], pcvr=[0.5, 0.1], click=[1, 0], conversion=[1, 0])
    >>> m["ctr_auc"], m["cvr_auc"], m["clicks"]
    (1.0, nan, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

__all__ = ["LOGLOSS_EPS", "METRIC_SECTIONS", "SupportsTruth", "compute_metrics", "ranking_metrics"]

# Predictions are clipped to [LOGLOSS_EPS, 1 - LOGLOSS_EPS] so one confident miss costs at
# most -log(1e-7) ~ 16.1 nats instead of infinity.
LOGLOSS_EPS = 1e-7

# Section title -> keys in display order; report.py groups its tables by this.
METRIC_SECTIONS: dict[str, tuple[str, ...]] = {
    "CTR": ("ctr_auc", "ctr_gauc", "ctr_logloss", "ctr_calibration"),
    "CVR (clicks)": ("cvr_auc", "cvr_gauc", "cvr_logloss", "cvr_calibration"),
    "CTCVR": ("ctcvr_auc", "ctcvr_gauc", "ctcvr_logloss", "ctcvr_calibration"),
    "CVR (whole space, inverse-propensity estimate)": ("cvr_ips_estimate",),
    "ground truth": (
        "cvr_auc_whole_space",
        "cvr_logloss_whole_space",
        "cvr_bias",
        "cvr_ips_bias",
        "true_cvr_mean",
        "pcvr_mean",
    ),
    "counts": ("impressions", "clicks", "conversions"),
    # ndcg@k / recall@k carry k in their name; report.py matches them by prefix.
    "ranking": ("auc", "ndcg@", "recall@", "users", "users_evaluated"),
}

_NAN = float("nan")
_EMPTY_USER_POLICIES = ("skip", "count")


class SupportsTruth(Protocol):
    """What ``compute_metrics`` reads from ground truth (``trainer.data.GroundTruth`` fits).

    Attributes:
        true_cvr: ``(N,)`` true post-click conversion probability of every impression.
        cf_conversion: ``(N,)`` counterfactual conversion label (0/1) of every impression.
    """

    true_cvr: ArrayLike
    cf_conversion: ArrayLike


# ---------------------------------------------------------------------------------------------
# public API


def compute_metrics(
    pctr: ArrayLike,
    pcvr: ArrayLike,
    click: ArrayLike,
    conversion: ArrayLike,
    *,
    group: ArrayLike | None = None,
    truth: Mapping[str, ArrayLike] | SupportsTruth | None = None,
) -> dict[str, float]:
    """All CTR, CVR and CTCVR metrics of one prediction set (keys: see the module docstring).

    Args:
        pctr: ``(N,)`` predicted click probabilities in [0, 1].
        pcvr: ``(N,)`` predicted post-click conversion probabilities in [0, 1], for every
            impression (clicked or not).
        click: ``(N,)`` click labels, 0 or 1.
        conversion: ``(N,)`` conversion labels, 0 or 1, and 0 wherever ``click`` is 0.
        group: ``(N,)`` group ids (e.g. user id) for the GAUC keys, or None to skip them.
        truth: simulator ground truth with ``true_cvr`` and ``cf_conversion`` of shape
            ``(N,)`` (a mapping or an object with those attributes), or None to skip the
            ground-truth keys.

    Returns:
        A flat ``dict[str, float]``; undefined metrics are ``nan``, counts are whole floats.

    Raises:
        ValueError: an array is not 1-D, has a different length from ``pctr``, is not numeric;
            a prediction is NaN or outside [0, 1]; a label is not 0/1; ``conversion`` is 1
            where ``click`` is 0; ``truth`` lacks a field. The message names the array and
            the first bad index.

    Example::

        >>> m = compute_metrics([0.8, 0.4, 0.3], [0.5, 0.6, 0.1], [1, 1, 0], [1, 0, 0])
        >>> m["ctr_auc"], m["cvr_auc"]
        (1.0, 0.0)
    """
    pctr_a = _probabilities("pctr", pctr, None)
    n = pctr_a.shape[0]
    pcvr_a = _probabilities("pcvr", pcvr, n)
    click_a = _labels("click", click, n)
    conversion_a = _labels("conversion", conversion, n)
    _check_conversion_needs_click(click_a, conversion_a)
    group_a = None if group is None else _group_ids("group", group, n)

    pctcvr = pctr_a * pcvr_a
    clicked = click_a == 1
    pcvr_c, conversion_c = pcvr_a[clicked], conversion_a[clicked]

    metrics: dict[str, float] = {}
    metrics.update(_binary_metrics("ctr", click_a, pctr_a, group_a))
    metrics.update(
        _binary_metrics("cvr", conversion_c, pcvr_c, None if group_a is None else group_a[clicked])
    )
    metrics.update(_binary_metrics("ctcvr", conversion_a, pctcvr, group_a))
    metrics["cvr_ips_estimate"] = _ips_estimate(click_a, conversion_a, pctr_a)
    if truth is not None:
        metrics.update(_truth_metrics(truth, pcvr_a, n))
        metrics["cvr_ips_bias"] = metrics["cvr_ips_estimate"] - metrics["true_cvr_mean"]
    metrics["impressions"] = float(n)
    metrics["clicks"] = float(click_a.sum())
    metrics["conversions"] = float(conversion_a.sum())
    return metrics


def ranking_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    users: ArrayLike,
    k: int = 5,
    *,
    users_without_positives: str = "skip",
) -> dict[str, float]:
    """AUC over all rows and per-user NDCG@k and Recall@k (random-exposure test protocol).

    Each user's items are ranked by descending score; tied scores keep their input order
    (a stable sort), so break ties before calling if that matters. With ``rel_i`` the 0/1
    label of the item at 1-based position ``i`` of a user's ranking and ``P_u`` that user's
    positives::

        DCG@k    = sum_{i <= k} rel_i / log2(i + 1)
        IDCG@k   = sum_{i <= min(P_u, k)} 1 / log2(i + 1)     (the ideal order's DCG@k)
        NDCG@k   = DCG@k / IDCG@k
        Recall@k = (positives among the top k) / P_u

    A user with fewer than ``k`` items ranks all of them. A user without a positive has no
    defined NDCG; ``users_without_positives`` says what to do with such users:

    * ``"skip"`` (default): both metrics average with equal weight over users with
      ``P_u >= 1`` only.
    * ``"count"``: every user counts, one without a positive with NDCG 1 and Recall 0. This is
      the convention of the public code of the MNAR debiasing literature (the DR-JL lineage
      that the BADR and Adap-SL baselines run on: ``ndcg = 1`` when the ideal DCG is 0,
      ``recall = hits / max(1, P_u)``), so Coat / Yahoo! R3 numbers compare with theirs.

    Args:
        scores: ``(N,)`` finite real scores (any scale; higher ranks first).
        labels: ``(N,)`` relevance labels, 0 or 1.
        users: ``(N,)`` user ids.
        k: cut-off, a positive int.
        users_without_positives: ``"skip"`` or ``"count"``, see above.

    Returns:
        ``{"auc", f"ndcg@{k}", f"recall@{k}", "users", "users_evaluated"}``: ``users`` counts
        distinct users and ``users_evaluated`` those with a positive. The AUC is ``nan`` with
        one class present; with ``"skip"``, NDCG and Recall are ``nan`` when no user has a
        positive (with ``"count"`` only when there is no row at all).

    Raises:
        ValueError: ``k`` is not a positive int, an array is not 1-D or has a different
            length from ``scores``, a score is not finite, a label is not 0/1,
            ``users_without_positives`` is neither ``"skip"`` nor ``"count"``.

    Example::

        >>> m = ranking_metrics([0.9, 0.1, 0.8, 0.3], [0, 1, 1, 0], ["a", "a", "b", "b"], k=1)
        >>> m["ndcg@1"], m["recall@1"]
        (0.5, 0.5)
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    if users_without_positives not in _EMPTY_USER_POLICIES:
        raise ValueError(
            f"users_without_positives must be one of {_EMPTY_USER_POLICIES}, "
            f"got {users_without_positives!r}"
        )
    scores_a = _finite("scores", scores, None)
    n = scores_a.shape[0]
    labels_a = _labels("labels", labels, n)
    users_a = _group_ids("users", users, n)

    metrics = {"auc": _auc(labels_a, scores_a)}
    ndcg, recall, num_users, num_evaluated = _ndcg_recall_at_k(
        scores_a, labels_a, users_a, k, count_empty=users_without_positives == "count"
    )
    metrics[f"ndcg@{k}"] = ndcg
    metrics[f"recall@{k}"] = recall
    metrics["users"] = float(num_users)
    metrics["users_evaluated"] = float(num_evaluated)
    return metrics


# ---------------------------------------------------------------------------------------------
# metric groups


def _binary_metrics(
    prefix: str, labels: np.ndarray, preds: np.ndarray, group: np.ndarray | None
) -> dict[str, float]:
    """``{prefix}_auc``, ``_logloss``, ``_calibration`` and, with ``group``, ``_gauc``."""
    out = {
        f"{prefix}_auc": _auc(labels, preds),
        f"{prefix}_logloss": _log_loss(labels, preds),
        f"{prefix}_calibration": _calibration(labels, preds),
    }
    if group is not None:
        out[f"{prefix}_gauc"] = _gauc(labels, preds, group)
    return out


def _truth_metrics(
    truth: Mapping[str, ArrayLike] | SupportsTruth, pcvr: np.ndarray, n: int
) -> dict[str, float]:
    """Whole-space CVR metrics against the simulator's ground truth."""
    true_cvr = _probabilities("truth.true_cvr", _truth_field(truth, "true_cvr"), n)
    cf_conversion = _labels("truth.cf_conversion", _truth_field(truth, "cf_conversion"), n)
    pcvr_mean, true_cvr_mean = _mean(pcvr), _mean(true_cvr)
    return {
        "cvr_auc_whole_space": _auc(cf_conversion, pcvr),
        "cvr_logloss_whole_space": _log_loss(cf_conversion, pcvr),
        "cvr_bias": pcvr_mean - true_cvr_mean,
        "true_cvr_mean": true_cvr_mean,
        "pcvr_mean": pcvr_mean,
    }


def _truth_field(truth: Mapping[str, ArrayLike] | SupportsTruth, name: str) -> ArrayLike:
    """Read ``name`` from a mapping or an attribute container."""
    if isinstance(truth, Mapping):
        if name not in truth:
            raise ValueError(f"truth has no key {name!r}; it needs 'true_cvr' and 'cf_conversion'")
        return truth[name]
    if not hasattr(truth, name):
        raise ValueError(
            f"truth ({type(truth).__name__}) has no attribute {name!r}; "
            "it needs 'true_cvr' and 'cf_conversion'"
        )
    return getattr(truth, name)


# ---------------------------------------------------------------------------------------------
# single metrics; inputs are validated float64 arrays


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else _NAN


def _ips_estimate(click: np.ndarray, conversion: np.ndarray, pctr: np.ndarray) -> float:
    """Self-normalised IPS mean of the conversion labels over the clicks, weights ``1 / pctr``;
    nan without clicks."""
    weights = click / np.maximum(pctr, LOGLOSS_EPS)
    total = weights.sum()
    return float((weights * conversion).sum() / total) if total > 0 else _NAN


def _auc(labels: np.ndarray, preds: np.ndarray) -> float:
    """ROC AUC, or nan when fewer than two classes are present."""
    num_pos = labels.sum()
    if num_pos == 0 or num_pos == labels.size:
        return _NAN
    return float(roc_auc_score(labels, preds))


def _log_loss(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean binary cross-entropy in nats with clipped predictions; nan on no rows."""
    if labels.size == 0:
        return _NAN
    p = np.clip(preds, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    # log1p(-p) keeps precision for small p, where most CVR predictions live.
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))


def _calibration(labels: np.ndarray, preds: np.ndarray) -> float:
    """``mean(preds) / mean(labels)``; nan when there are no positive labels."""
    num_pos = labels.sum()
    if num_pos == 0:
        return _NAN
    return float(preds.sum() / num_pos)


def _gauc(labels: np.ndarray, preds: np.ndarray, group: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups with both classes.

    One sort by (group, prediction) gives every row its rank within its group, with tied
    predictions sharing their average rank; each group's AUC is then the Mann-Whitney
    statistic ``(R_pos - P (P + 1) / 2) / (P * Q)`` (``R_pos`` the positives' rank sum, ``P``
    positives, ``Q`` negatives), the same value ``roc_auc_score`` gives. No Python loop over
    groups, so 1M rows in 100k groups take well under a second.
    """
    n = labels.size
    if n == 0:
        return _NAN
    _, group_index = np.unique(group, return_inverse=True)
    group_index = group_index.reshape(-1)
    order = np.lexsort((preds, group_index))
    g, p, y = group_index[order], preds[order], labels[order]

    # A tie run is a maximal stretch of equal (group, prediction); its rows share a rank.
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(g[1:], g[:-1], out=new_run[1:])
    new_run[1:] |= p[1:] != p[:-1]
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)  # exclusive
    run_mean_position = (run_start + run_end - 1) / 2.0  # 0-based, over the sorted array
    position = run_mean_position[np.cumsum(new_run) - 1]

    sizes = np.bincount(g)
    group_start = np.cumsum(sizes) - sizes
    rank = position - group_start[g] + 1.0  # 1-based within the group
    num_pos = np.bincount(g, weights=y, minlength=sizes.size)
    pos_rank_sum = np.bincount(g, weights=y * rank, minlength=sizes.size)
    num_neg = sizes - num_pos

    valid = (num_pos > 0) & (num_neg > 0)
    if not valid.any():
        return _NAN
    num_pos, num_neg, pos_rank_sum = num_pos[valid], num_neg[valid], pos_rank_sum[valid]
    group_auc = (pos_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
    weights = sizes[valid].astype(np.float64)
    return float(np.dot(weights, group_auc) / weights.sum())


def _ndcg_recall_at_k(
    scores: np.ndarray, labels: np.ndarray, users: np.ndarray, k: int, *, count_empty: bool
) -> tuple[float, float, int, int]:
    """Mean NDCG@k and Recall@k, plus user counts.

    Users without a positive are left out, or with ``count_empty`` averaged in with NDCG 1 and
    Recall 0.
    """
    n = scores.size
    if n == 0:
        return _NAN, _NAN, 0, 0
    _, user_index = np.unique(users, return_inverse=True)
    user_index = user_index.reshape(-1)
    order = np.lexsort((-scores, user_index))  # lexsort is stable: ties keep input order
    u, y = user_index[order], labels[order]

    sizes = np.bincount(u)
    position = np.arange(n) - (np.cumsum(sizes) - sizes)[u]  # 0-based within the user
    in_top_k = position < k
    discount = 1.0 / np.log2(np.minimum(position, k) + 2.0)  # clamp: rows past k get 0 gain
    dcg = np.bincount(u, weights=np.where(in_top_k, y * discount, 0.0), minlength=sizes.size)
    hits = np.bincount(u, weights=y * in_top_k, minlength=sizes.size)
    num_pos = np.bincount(u, weights=y, minlength=sizes.size)

    evaluated = num_pos > 0
    num_evaluated = int(evaluated.sum())
    if num_evaluated == 0 and not count_empty:
        return _NAN, _NAN, int(sizes.size), 0
    # ideal_dcg[m - 1] is the DCG@k of a ranking with its m positives on top.
    ideal_dcg = np.cumsum(1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64)))
    idcg = ideal_dcg[np.minimum(num_pos[evaluated], k).astype(np.int64) - 1]
    ndcg_u = np.ones(sizes.size)  # users without a positive keep 1 (read only with count_empty)
    ndcg_u[evaluated] = dcg[evaluated] / idcg
    recall_u = hits / np.maximum(num_pos, 1.0)  # 0 for users without a positive
    averaged = slice(None) if count_empty else evaluated
    ndcg = float(np.mean(ndcg_u[averaged]))
    recall = float(np.mean(recall_u[averaged]))
    return ndcg, recall, int(sizes.size), num_evaluated


# ---------------------------------------------------------------------------------------------
# validation: every error names the array and the first bad index


def _array(name: str, values: ArrayLike, n: int | None) -> np.ndarray:
    """``values`` as a 1-D array of length ``n`` (any length when ``n`` is None)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {n} (the first array's)")
    return arr


def _numeric(name: str, values: ArrayLike, n: int | None) -> np.ndarray:
    arr = _array(name, values, n)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _first(bad: np.ndarray) -> int | None:
    """Index of the first True in ``bad``, or None."""
    return int(np.argmax(bad)) if bad.any() else None


def _probabilities(name: str, values: ArrayLike, n: int | None) -> np.ndarray:
    arr = _numeric(name, values, n)
    i = _first(~((arr >= 0.0) & (arr <= 1.0)))  # NaN fails both comparisons
    if i is not None:
        what = "NaN" if math.isnan(arr[i]) else f"{arr[i].item()!r}, outside [0, 1]"
        raise ValueError(f"{name}[{i}] is {what}; it must be a probability in [0, 1]")
    return arr


def _finite(name: str, values: ArrayLike, n: int | None) -> np.ndarray:
    arr = _numeric(name, values, n)
    i = _first(~np.isfinite(arr))
    if i is not None:
        raise ValueError(f"{name}[{i}] is {arr[i].item()!r}; it must be finite")
    return arr


def _labels(name: str, values: ArrayLike, n: int | None) -> np.ndarray:
    arr = _numeric(name, values, n)
    i = _first((arr != 0.0) & (arr != 1.0))
    if i is not None:
        raise ValueError(f"{name}[{i}] is {arr[i].item()!r}; a label must be 0 or 1")
    return arr


def _group_ids(name: str, values: ArrayLike, n: int) -> np.ndarray:
    arr = _array(name, values, n)
    if np.issubdtype(arr.dtype, np.floating):
        i = _first(~np.isfinite(arr))
        if i is not None:
            raise ValueError(f"{name}[{i}] is {arr[i].item()!r}; an id must be finite")
    return arr


def _check_conversion_needs_click(click: np.ndarray, conversion: np.ndarray) -> None:
    i = _first((conversion == 1.0) & (click == 0.0))
    if i is not None:
        raise ValueError(
            f"conversion[{i}] is 1 but click[{i}] is 0; conversion must be 0 wherever click is 0"
        )
