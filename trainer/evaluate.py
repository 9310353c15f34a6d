"""Evaluate a trained run: predictions on every rank, metrics on rank 0.

Run on a finished (or interrupted) training run; it reads the run's resolved config, schema and
latest checkpoint (never its training data), and writes ``eval/metrics.json`` and
``eval/metrics.md`` into the run::

    python -m trainer.evaluate --run runs/esmm_sim
    torchrun --nproc_per_node=2 -m trainer.evaluate --run-dir runs/esmm_sim --data data/sim/test

(Under torchrun the flag is ``--run-dir``: torchrun takes ``--run`` for its own ``--run-path``.)

Training evaluates its own model the same way at its end (``trainer.evaluation.predict``).
"""

from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError
from trainer.data import DataError
from trainer.evaluation import format_table
from trainer.evaluation.run import evaluate_run
from trainer.run_dir import RunDirError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run directory written by trainer.train (a path or a URI: s3://bucket/runs/x)",
    )
    parser.add_argument(
        "--data", help="Parquet file or directory to evaluate (default: the run's data.test)"
    )
    parser.add_argument("--out", help="where to write metrics, a path or a URI (default: RUN/eval)")
    parser.add_argument(
        "--checkpoint", help="checkpoint name under RUN/checkpoints or a path (default: latest)"
    )
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(
            args.run, data=args.data, out_dir=args.out, checkpoint=args.checkpoint
        )
    except (RunDirError, ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"step {result.step} evaluated; written to {result.written_to}")
        print(format_table(result.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
