"""``trainer.train`` whose rank 1 dies at step 13 on torchrun's first attempt.

Used by the restart test: torchrun (``--max-restarts``) restarts every worker, ``--resume``
loads the step-8 checkpoint, and the run must end exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
import sys

from trainer import recipe, train

CRASH_AT_STEP = 13


def _install_crash() -> None:
    train_step = recipe.TrainRecipe._train_step

    def step_then_maybe_crash(self: recipe.TrainRecipe):
        done = train_step(self)
        if self.step == CRASH_AT_STEP:
            os._exit(17)  # no cleanup, no checkpoint: a hard failure
        return done

    recipe.TrainRecipe._train_step = step_then_maybe_crash


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK") == "1":
        _install_crash()
    sys.exit(train.main())
