"""Names of the files and directories that several on-disk layouts share. No torch here.

The feature schema is stored as :data:`SCHEMA_FILE` in each of the three directories ctcvr
writes: a data set, a training run (``trainer.run_dir``) and a model directory
(``schemas.artifact``). A data set directory, as the simulator and the converters write it and
the reader and the trainer read it::

    DATA/
      schema.yaml          the FeatureSchema of every split
      train/*.parquet      training impressions
      valid/*.parquet      optional: a validation split (converters' --validation-fraction)
      test/*.parquet       evaluation impressions
"""

from __future__ import annotations

__all__ = ["SCHEMA_FILE", "SPLITS", "TEST_SPLIT", "TRAIN_SPLIT", "VALID_SPLIT"]

SCHEMA_FILE = "schema.yaml"
TRAIN_SPLIT = "train"
VALID_SPLIT = "valid"
TEST_SPLIT = "test"
SPLITS = (TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT)  # every split a data set may hold, in this order
