"""Small builders shared by tests: a tiny schema and hand-made batches."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import torch
from torchrec import KeyedJaggedTensor

from schemas import FeatureSchema
from trainer.data.batch import Batch
from trainer.model import TaskOutputs


def tiny_schema() -> FeatureSchema:
    return FeatureSchema.from_dict(
        {
            "sparse": [
                {"name": "user", "hash_buckets": 50, "dim": 4},
                {"name": "item", "hash_buckets": 40, "dim": 4},
                {"name": "tags", "table": "tag_table", "multi_valued": True, "max_len": 3},
            ],
            "tables": [{"name": "tag_table", "vocab_size": 10, "dim": 4}],
            "dense": [{"name": "price"}],
            "labels": {"click": "click", "conversion": "conversion"},
        }
    )


def tiny_batch(click, conversion, schema: FeatureSchema | None = None) -> Batch:
    schema = schema or tiny_schema()
    n = len(click)
    lengths, values = [], []
    for name in schema.sparse_names:  # KJT layout: all rows of key 1, then all rows of key 2...
        for row in range(n):
            count = (row % 3) if schema.sparse_feature(name).multi_valued else 1
            lengths.append(count)
            values.extend((row * 7 + k) % 10 for k in range(count))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.sparse_names,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )
    return Batch(
        sparse=sparse,
        dense=torch.arange(n, dtype=torch.float32).unsqueeze(1),
        click=torch.tensor(click, dtype=torch.float32),
        conversion=torch.tensor(conversion, dtype=torch.float32),
    )


def outputs_from_probs(**probs) -> TaskOutputs:
    """TaskOutputs whose heads have the given probabilities (logits = log(p / (1 - p)))."""
    return TaskOutputs(
        logits={
            head: torch.tensor([math.log(p / (1 - p)) for p in ps], requires_grad=True)
            for head, ps in probs.items()
        }
    )


def load_benchmark(script: Path, name: str) -> ModuleType:
    """Import a ``benchmarks/`` script as module ``name`` (registered before it runs: dataclasses
    look their module up while the file executes). ``name`` must not shadow a package of ours
    (``serving``)."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
