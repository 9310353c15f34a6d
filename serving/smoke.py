"""A scoring smoke check: a loaded model scores synthetic rows, and every score is a probability.

``load_artifact`` already scores one row of missing values; this check goes through every
feature with values drawn from the schema (ids inside each vocabulary, hashed ints and strings,
lists of every length up to ``max_len``, dense values around their normalisation, some rows with
features left out), so that a model that loads but produces NaN, infinity or values outside
[0, 1] for real-looking input is caught before it is made current (``trainer.publish``).

Example::

    artifact = load_artifact("runs/demo/model")
    scores = smoke_check(artifact)  # (16, 3): pctr, pcvr, pctcvr, each in [0, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.features import FeatureSchema, NormalizationKind, OOVPolicy, SparseDType
from serving.artifact import Artifact, ArtifactError

__all__ = ["SMOKE_ROWS", "smoke_check", "synthetic_rows"]

SMOKE_ROWS = 16
_MISSING_EVERY = 3  # every third row leaves out the features that may be missing


def synthetic_rows(schema: FeatureSchema, n: int = SMOKE_ROWS, seed: int = 0) -> list[dict]:
    """``n`` request rows of raw values that the schema accepts (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        leave_out = i % _MISSING_EVERY == _MISSING_EVERY - 1
        row: dict[str, Any] = {}
        for feature in schema.sparse:
            if leave_out and feature.oov is not OOVPolicy.ERROR:
                continue
            table = schema.table_of(feature.name)

            def value(feature=feature, table=table) -> int | str:
                if feature.dtype is SparseDType.STRING:
                    return f"smoke-{int(rng.integers(0, 1_000))}"
                if table.is_hashed:
                    return int(rng.integers(-(2**40), 2**40))
                return int(rng.integers(0, table.buckets))

            if feature.multi_valued:
                row[feature.name] = [
                    value() for _ in range(int(rng.integers(0, feature.max_len + 1)))
                ]
            else:
                row[feature.name] = value()
        for feature in schema.dense:
            if leave_out:
                continue
            norm = feature.normalization
            spread = norm.std if norm.kind is NormalizationKind.STANDARD else 2.0
            centre = norm.mean if norm.kind is NormalizationKind.STANDARD else feature.default
            row[feature.name] = float(centre + spread * rng.standard_normal())
        rows.append(row)
    return rows


def smoke_check(artifact: Artifact, rows: int = SMOKE_ROWS, seed: int = 0) -> np.ndarray:
    """Score :func:`synthetic_rows` with a loaded model.

    Returns:
        ``(rows, 3)`` scores: pctr, pcvr, pctcvr.

    Raises:
        ArtifactError: the rows are refused, or a score is not a finite number in [0, 1].
    """
    try:
        features = artifact.featurizer(synthetic_rows(artifact.schema, rows, seed))
    except ValueError as err:  # Unreadable, RowErrors: the schema and its featurizer disagree
        raise ArtifactError(
            f"{artifact.path}: the model refuses synthetic rows of its own schema: {err}"
        ) from None
    scores = artifact.model.predict(features)
    if scores.shape != (rows, 3):
        raise ArtifactError(
            f"{artifact.path}: {rows} synthetic rows gave scores of shape {scores.shape}"
        )
    bad = ~(np.isfinite(scores) & (scores >= 0.0) & (scores <= 1.0))
    if bad.any():
        row, column = map(int, np.argwhere(bad)[0])
        name = ("pctr", "pcvr", "pctcvr")[column]
        raise ArtifactError(
            f"{artifact.path}: synthetic row {row} scored {name}={scores[row, column]!r}, not a "
            f"probability ({int(bad.sum())} bad scores of {scores.size})"
        )
    return scores
