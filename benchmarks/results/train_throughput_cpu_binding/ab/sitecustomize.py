"""The binding of the A/B runs in this directory, before trainer.cpu_binding existed: with
``PIN_RANKS=1`` and this directory on ``PYTHONPATH``, each torchrun rank runs on its own
contiguous share of the CPUs."""

import os

_rank = os.environ.get("LOCAL_RANK")
_world = os.environ.get("LOCAL_WORLD_SIZE")
if _rank is not None and _world is not None and os.environ.get("PIN_RANKS"):
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // int(_world))
    os.sched_setaffinity(0, cpus[int(_rank) * per : (int(_rank) + 1) * per])
