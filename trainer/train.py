"""Train a CTR/CVR model with TorchRec-sharded embeddings.

Single process::

    python -m trainer.train --config trainer/configs/esmm_simulated.yaml

Two processes on one machine (tables split between the ranks)::

    torchrun --nproc_per_node=2 -m trainer.train --config trainer/configs/esmm_simulated.yaml

Two machines, 2 processes each (run on both, ``--node_rank`` 0 and 1)::

    torchrun --nnodes=2 --nproc_per_node=2 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST0:29500 -m trainer.train --config CONFIG

Override any config key on the command line (OmegaConf dot-list)::

    python -m trainer.train --config CONFIG train.steps=200 objective.name=naive

``--resume`` continues from the run's latest checkpoint if it has one (and starts fresh
otherwise), so it is also what to pass under ``torchrun --max-restarts``. SIGTERM or Ctrl-C
writes a checkpoint before exiting, at the next log or checkpoint step (up to
``train.log_every`` steps later). The recipe is ``trainer.recipe.TrainRecipe``.

``output_dir``, ``data.*`` and ``--config`` may be URIs (``s3://bucket/runs/x``; credentials and
endpoint from the AWS environment variables, see ``schemas.storage``). A storage fault during
training (the store unreachable after ``AWS_MAX_ATTEMPTS`` tries, denied access) stops the run
with the error naming the URI and what to check (exit 1); its last complete checkpoint stays
usable: rerun with ``--resume`` once the store is back.
"""

from __future__ import annotations

import argparse
import sys

from schemas.storage import StorageError
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.recipe import TrainRecipe
from trainer.run_dir import RunDirError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--config", help="YAML config file (see trainer/configs/)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint, if any"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        recipe = TrainRecipe.from_files(args.config, args.overrides, resume=args.resume)
    except (ConfigError, RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        recipe.train()
    # RunDirError covers CheckpointError and the run directory's own reads and writes (e.g. of
    # checkpoints/latest while a checkpoint is saved) cut off by a storage fault.
    except (StorageError, RunDirError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
