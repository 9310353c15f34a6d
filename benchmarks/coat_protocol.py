"""How the per-user ranking numbers of Coat runs depend on the evaluation protocol.

Run from the repository root on run directories of ``quality.py --data coat``::

    .venv/bin/python benchmarks/coat_protocol.py runs/quality/runs/naive-seed*-* \\
        runs/quality/runs/badr-seed*-* --out benchmarks/results/coat_protocol

Each run's latest checkpoint scores the random-exposure test ratings in this process, and the
same predictions are ranked under the protocols the literature uses:

- **ours**: every test rating (4,640, 16 per user), a user without a positive counted with
  NDCG 1 and Recall 0 (``users_without_positives="count"``, the convention of the public code of
  the DR-JL lineage, e.g. ``ndcg_func`` / ``recall_func`` that HungPaan/DR-ALR's
  ``code/dr_alr_main.py`` imports), ties in pCVR kept in input order (a stable sort);
- **skip**: the same ratings, users without a positive left out;
- **BADR split**: the BADR paper evaluates on 80 % of the random-exposure ratings, the other 20 %
  being its validation set (badr.txt Section 4.1.3; HungPaan/DR-ALR's
  ``data/coat/{x,y}_{test,val}_3_20.txt``: 3,712 and 928 ratings, drawn at random over all
  ratings). The mean over ``--draws`` such random 80 % subsets, users without a positive
  counted as in their code;
- **fixed split** (``--split FILE``): one given test split, the ``user item`` pairs of a file
  (the format of DR-ALR's ``data/coat/x_test_3_20.txt``, the BADR paper's own test set; not
  shipped here), and the other random-exposure ratings as its validation set, both ranked as
  ours.

A random ranking (uniform scores, averaged over as many draws) gives each protocol's floor.
The table also counts users without a positive and pCVR ties within a user (a tie is the only
place where the order of equal scores, stable here, unspecified in numpy's default argsort,
could matter).

Outputs ``<out>.md`` (also printed) and ``<out>.json`` (every run's numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

from trainer.distributed import init_distributed, quiet_library_warnings, shutdown_distributed
from trainer.evaluation import metrics_table, ranking_metrics
from trainer.evaluation.predict import evaluation_reader, predict
from trainer.evaluation.predictions import Predictions
from trainer.run_dir import RunDir, RunDirError
from trainer.run_model import restore_model

__all__ = [
    "FixedSplit",
    "RatedTest",
    "fixed_split_metrics",
    "main",
    "protocol_metrics",
    "random_ranking_metrics",
    "score_run",
]

K = 5
BADR_TEST_SHARE = 0.8  # badr.txt 4.1.3: 20 % of Coat's unbiased ratings are its validation set
COLUMNS = {
    "ndcg@5": "NDCG@5, ours (all ratings, empty users count)",
    "ndcg@5_skip": "NDCG@5, users without a positive left out",
    "ndcg@5_badr_split": "NDCG@5 on random 80 % splits (the BADR paper's test)",
    "recall@5": "Recall@5, ours",
    "recall@5_badr_split": "Recall@5 on random 80 % splits",
    "users_without_positives": "users without a positive (all ratings)",
    "users_without_positives_badr_split": "users without a positive (80 % splits, mean)",
    "tied_rows": "test rows whose pCVR ties another of the same user",
}
SPLIT_COLUMNS = {
    "ndcg@5_fixed": "NDCG@5 on the fixed split's test pairs (`--split`)",
    "recall@5_fixed": "Recall@5 on them",
    "ndcg@5_fixed_valid": "NDCG@5 on the other ratings (the fixed split's validation set)",
    "recall@5_fixed_valid": "Recall@5 on them",
}
ITEM_COLUMN = "item_id"  # the item id of Coat's converted test set, which a fixed split names


class RatedTest:
    """The rated test rows of one evaluation: pCVR, the 0/1 label, the user and (when known)
    the item of each."""

    def __init__(self, predictions: Predictions, items: np.ndarray | None = None) -> None:
        if predictions.group is None:
            raise ValueError("the test set has no group column (the user id): nothing to rank")
        if items is not None and len(items) != len(predictions.pcvr):
            raise ValueError(f"{len(items)} item ids for {len(predictions.pcvr)} predictions")
        rated = predictions.click == 1
        self.scores = predictions.pcvr[rated].astype(np.float64)
        self.labels = predictions.conversion[rated].astype(np.int64)
        self.users = predictions.group[rated]
        self.items = None if items is None else np.asarray(items)[rated]


class FixedSplit:
    """A fixed test split of the rated test rows: the ``(user, item)`` pairs it tests. The
    other rated rows are its validation set."""

    def __init__(self, pairs: np.ndarray, source: str = "the split", sha256: str = "") -> None:
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.source = source
        self.sha256 = sha256  # of the file read, so a result names the split it used

    @classmethod
    def read(cls, path: Path) -> FixedSplit:
        """``user item`` lines, whitespace-separated integers.

        Raises:
            ValueError: naming the file and line of a malformed or repeated pair.
        """
        pairs: list[tuple[int, int]] = []
        seen: dict[tuple[int, int], int] = {}
        data = path.read_bytes()
        for number, line in enumerate(data.decode().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not all(f.isdigit() for f in fields):
                raise ValueError(f"{path}:{number}: expected 'user item' integers, got {line!r}")
            pair = (int(fields[0]), int(fields[1]))
            if pair in seen:
                raise ValueError(f"{path}:{number}: pair {pair} repeats line {seen[pair]}")
            seen[pair] = number
            pairs.append(pair)
        if not pairs:
            raise ValueError(f"{path}: no pairs")
        return cls(np.array(pairs), source=str(path), sha256=hashlib.sha256(data).hexdigest())

    def mask(self, test: RatedTest) -> np.ndarray:
        """Which rated rows the split tests.

        Raises:
            ValueError: the rows have no item ids, or a pair of the split is not a rated row
                (the split belongs to other data).
        """
        if test.items is None:
            raise ValueError(f"a fixed split needs the test set's {ITEM_COLUMN!r} column")
        rows = np.stack([np.asarray(test.users, dtype=np.int64), test.items.astype(np.int64)], 1)
        wanted = {tuple(p) for p in self.pairs.tolist()}
        mask = np.fromiter((tuple(r) in wanted for r in rows.tolist()), bool, len(rows))
        missing = len(wanted) - int(mask.sum())
        if missing:
            found = {tuple(r) for r in rows[mask].tolist()}
            example = next(p for p in self.pairs.tolist() if tuple(p) not in found)
            raise ValueError(
                f"{self.source}: {missing} of its {len(wanted)} pairs are not rated test rows "
                f"(e.g. user {example[0]}, item {example[1]}): a split of other data?"
            )
        return mask


def score_run(run_dir: Path, test: str | None = None) -> RatedTest:
    """The run's latest checkpoint's predictions on ``test`` (default: its ``data.test``), in
    this process, with the test rows' item ids when the data has them."""
    quiet_library_warnings()
    ctx = init_distributed("gloo", "cpu")
    restored = None
    try:
        restored = restore_model(RunDir(run_dir), ctx)
        reader = evaluation_reader(restored.config, restored.schema, ctx, test)
        predictions = predict(restored.model, reader, ctx)
        source, group = test or restored.config.data.test, restored.schema.group
    finally:
        del restored  # the sharded model before the process group
        shutdown_distributed()
    assert predictions is not None, "a single process is rank 0"
    return RatedTest(predictions, _items_in_file_order(source, group, predictions))


def _items_in_file_order(source: str, group: str | None, predictions: Predictions):
    """The item id of each evaluated row: the evaluation read ``source`` in file order, which
    the user column, read again here, confirms. None when the data has no item column."""
    dataset = pads.dataset(source, format="parquet")
    if ITEM_COLUMN not in dataset.schema.names or group not in dataset.schema.names:
        return None
    table = dataset.to_table(columns=[group, ITEM_COLUMN])
    if not np.array_equal(table.column(group).to_numpy(), predictions.group):
        raise RuntimeError(f"{source}: rows not in the order the evaluation read them")
    return table.column(ITEM_COLUMN).to_numpy()


def protocol_metrics(
    test: RatedTest, *, draws: int, seed: int = 0, split: FixedSplit | None = None
) -> dict[str, float]:
    """The run's ranking metrics under every protocol above.

    Args:
        test: the rated test rows and their pCVR.
        draws: random 80 % subsets averaged for the BADR split.
        seed: seed of those subsets (the same subsets for every run with the same seed).
        split: a fixed split to rank on as well (its test pairs and the other rows).
    """
    scores, users, labels = test.scores, test.users, test.labels
    ours = ranking_metrics(scores, labels, users, K, users_without_positives="count")
    skip = ranking_metrics(scores, labels, users, K, users_without_positives="skip")
    rng = np.random.default_rng(seed)
    random_splits = [_badr_split(scores, labels, users, rng) for _ in range(draws)]
    _, first = np.unique(np.stack([_user_codes(users), scores]), axis=1, return_index=True)
    return {
        "ndcg@5": ours[f"ndcg@{K}"],
        "ndcg@5_skip": skip[f"ndcg@{K}"],
        "ndcg@5_badr_split": float(np.mean([m[f"ndcg@{K}"] for m in random_splits])),
        "recall@5": ours[f"recall@{K}"],
        "recall@5_badr_split": float(np.mean([m[f"recall@{K}"] for m in random_splits])),
        "users_without_positives": ours["users"] - ours["users_evaluated"],
        "users_without_positives_badr_split": float(
            np.mean([m["users"] - m["users_evaluated"] for m in random_splits])
        ),
        "tied_rows": float(len(scores) - len(first)),
        **(fixed_split_metrics(scores, labels, users, split.mask(test)) if split else {}),
    }


def fixed_split_metrics(
    scores: np.ndarray, labels: np.ndarray, users: np.ndarray, tested: np.ndarray
) -> dict[str, float]:
    """Ours on the rows a fixed split tests, and on the others (its validation set)."""
    metrics = {}
    for suffix, rows in (("fixed", tested), ("fixed_valid", ~tested)):
        m = ranking_metrics(
            scores[rows], labels[rows], users[rows], K, users_without_positives="count"
        )
        metrics[f"ndcg@{K}_{suffix}"] = m[f"ndcg@{K}"]
        metrics[f"recall@{K}_{suffix}"] = m[f"recall@{K}"]
    return metrics


def random_ranking_metrics(
    test: RatedTest, *, draws: int, seed: int = 1, split: FixedSplit | None = None
) -> dict[str, float]:
    """The same metrics for uniformly random scores, averaged over ``draws`` draws (one 80 %
    split each): every protocol's floor."""
    rng = np.random.default_rng(seed)
    tested = split.mask(test) if split else None
    rows = []
    for _ in range(draws):
        scores = rng.random(len(test.labels))
        ours = ranking_metrics(scores, test.labels, test.users, K, users_without_positives="count")
        skip = ranking_metrics(scores, test.labels, test.users, K, users_without_positives="skip")
        random_split = _badr_split(scores, test.labels, test.users, rng)
        rows.append(
            {
                "ndcg@5": ours[f"ndcg@{K}"],
                "ndcg@5_skip": skip[f"ndcg@{K}"],
                "ndcg@5_badr_split": random_split[f"ndcg@{K}"],
                "recall@5": ours[f"recall@{K}"],
                "recall@5_badr_split": random_split[f"recall@{K}"],
                "users_without_positives": ours["users"] - ours["users_evaluated"],
                "users_without_positives_badr_split": random_split["users"]
                - random_split["users_evaluated"],
                "tied_rows": 0.0,
                **(
                    fixed_split_metrics(scores, test.labels, test.users, tested)
                    if tested is not None
                    else {}
                ),
            }
        )
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _badr_split(
    scores: np.ndarray, labels: np.ndarray, users: np.ndarray, rng: np.random.Generator
) -> dict[str, float]:
    """The metrics on a random 80 % of the rows, users without a positive counted."""
    rows = rng.permutation(len(scores))[: round(BADR_TEST_SHARE * len(scores))]
    return ranking_metrics(
        scores[rows], labels[rows], users[rows], K, users_without_positives="count"
    )


def _user_codes(users: np.ndarray) -> np.ndarray:
    return np.unique(users, return_inverse=True)[1].reshape(-1).astype(np.float64)


def _run_name(run_dir: Path) -> str:
    """``quality.py``'s run directories are ``<run>-seed<N>-<digest>``: the run's name."""
    match = re.fullmatch(r"(.+)-seed\d+-[0-9a-f]+", run_dir.name)
    return match.group(1) if match else run_dir.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of quality.py (Coat)")
    parser.add_argument("--draws", type=int, default=200, help="random 80 %% splits per run")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    parser.add_argument(
        "--split",
        type=Path,
        help="a fixed test split: 'user item' lines (e.g. DR-ALR's data/coat/x_test_3_20.txt)",
    )
    parser.add_argument(
        "--test",
        help="score this test set instead of each run's data.test (e.g. all the random-exposure "
        "ratings for runs that held some out with --validation-from test)",
    )
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    try:
        split = FixedSplit.read(args.split) if args.split else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    columns = {**COLUMNS, **(SPLIT_COLUMNS if split else {})}
    table: dict[str, dict[str, list[float]]] = {}
    raw = []
    for run_dir in args.runs:
        try:
            test = score_run(run_dir, args.test)
            metrics = protocol_metrics(test, draws=args.draws, split=split)
        except (ValueError, RunDirError) as error:  # unreadable data or run, a foreign split
            parser.exit(2, f"{parser.prog}: error: {run_dir}: {error}\n")
        raw.append({"run_dir": str(run_dir), "metrics": metrics})
        row = table.setdefault(_run_name(run_dir), {})
        for key, value in metrics.items():
            row.setdefault(key, []).append(value)
        if "random ranking" not in table:
            random = random_ranking_metrics(test, draws=args.draws, split=split)
            table["random ranking"] = {key: [value] for key, value in random.items()}
    text = (
        f"NDCG@{K} / Recall@{K} of the same predictions under each protocol (mean ± std over "
        f"runs; {args.draws} random 80 % splits per run):\n\n"
        + metrics_table(table, list(columns))
        + "\n\n"
        + "\n".join(f"- `{key}`: {title}" for key, title in columns.items())
        + (
            f"\n\nFixed split: `{split.source}`, {len(split.pairs)} test pairs, sha256 "
            f"`{split.sha256}`"
            if split
            else ""
        )
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        (args.out.parent / f"{args.out.name}.md").write_text(
            f"# Coat: the ranking protocol\n\nCommand: `python benchmarks/coat_protocol.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}\n"
        )
        (args.out.parent / f"{args.out.name}.json").write_text(
            json.dumps(
                {
                    "draws": args.draws,
                    "split": {"path": split.source, "sha256": split.sha256} if split else None,
                    "runs": raw,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
