"""``trainer.train`` that stops right after setup: it saves the step-0 checkpoint and exits.

The warm-start tests read that checkpoint: the new run's weights and optimizer state exactly as
the warm start (or a fresh initialisation) left them, before any step changes them.
"""

from __future__ import annotations

import sys

from trainer import recipe, train


def _save_instead_of_training(self: recipe.TrainRecipe) -> None:
    self.save_checkpoint()


if __name__ == "__main__":
    recipe.TrainRecipe.train = _save_instead_of_training
    sys.exit(train.main())
