"""Warm start: a new run that begins from a previous model's weights (``train.init_from``).

::

    python -m trainer.train --config CONFIG output_dir=runs/2026-12-02 \\
        data.train=logs/train data.filter="day == '2026-12-02'" train.init_from=runs/2026-12-01

The source is a run directory (its latest checkpoint), one checkpoint of a run
(``RUN/checkpoints/step_<N>``) or a model directory written by ``trainer.export``, on a local
path or a URI; the new run starts at step 0 in its own ``output_dir`` on its own data, with the
source's embeddings and dense layers, and the optimizer state too with
``train.init_optimizer=true``. It works across world sizes (tables are read whole, one at a
time, and each rank copies its own shards' rows) and across schema changes:

- a table whose size changed keeps the rows that exist in both (``_rows`` says exactly what that
  means for hashed and vocabulary tables, and for the OOV row); a new feature's table and input
  columns are initialised as usual; a removed feature's are dropped;
- a change that cannot be carried over (an embedding dim, a layer of another shape, a served
  head the source does not have) is refused with every problem named at once (``_plan``);
- from an exported model, the served heads' tensors map back to the model through
  ``CtcvrModel.serving_tensors``; training-only heads start fresh.

What was carried, grown and initialised goes to the log and to ``warm_start.json`` in the run
directory (``WarmStartPlan.report``). ``--resume`` of a warm-started run continues from its own
checkpoints; the warm start happens only when the run has none.
"""

from trainer.warm_start._apply import run_layout, warm_start
from trainer.warm_start._layout import (
    InputColumn,
    ModelLayout,
    TableLayout,
    input_columns,
    model_layout,
    reference_model,
)
from trainer.warm_start._plan import (
    Fate,
    TablePlan,
    TensorPlan,
    WarmStartPlan,
    component_of,
    plan_warm_start,
)
from trainer.warm_start._rows import RowMap, RowRule, row_map
from trainer.warm_start._source import SourceKind, WarmSource, WarmStartError, open_source

__all__ = [
    "Fate",
    "InputColumn",
    "ModelLayout",
    "RowMap",
    "RowRule",
    "SourceKind",
    "TableLayout",
    "TablePlan",
    "TensorPlan",
    "WarmSource",
    "WarmStartError",
    "WarmStartPlan",
    "component_of",
    "input_columns",
    "model_layout",
    "open_source",
    "plan_warm_start",
    "reference_model",
    "row_map",
    "run_layout",
    "warm_start",
]
