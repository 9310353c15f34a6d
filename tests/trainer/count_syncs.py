"""``trainer.train`` that records when the loop synchronises with the host or the other ranks.

Printed as one ``SYNCS {...}`` JSON line at the end: the steps at which the stop signal was
agreed on (``stop_checks``), the steps at which loss means were read (``loss_reads``), and the
places in ``trainer/`` that read a tensor's value on the host (``.item()``, ``.tolist()``,
``float()``, ``int()``, ``bool()``) during a training step (``host_reads_in_steps``). Libraries'
own reads are not counted (Adam and FBGEMM read step counters that live on the CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer import recipe, train

_TRAINER = str(Path(recipe.__file__).parent)
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
_record: dict = {"stop_checks": [], "loss_reads": [], "host_reads_in_steps": []}
_state = {"step": 0, "in_step": False}


def _install() -> None:
    train_step = recipe.TrainRecipe._train_step
    max_over_ranks, all_reduce_mean = recipe.max_over_ranks, recipe.all_reduce_mean

    def counted_step(self: recipe.TrainRecipe):
        _state["in_step"] = True
        try:
            return train_step(self)
        finally:
            _state["in_step"], _state["step"] = False, self.step

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if _state["in_step"] and caller.co_filename.startswith(_TRAINER):
                _record["host_reads_in_steps"].append(f"{caller.co_filename}:{name}")
            return original(self, *args, **kwargs)

        return read

    def stop_check(value, ctx):
        _record["stop_checks"].append(_state["step"])
        return max_over_ranks(value, ctx)

    def loss_read(values, ctx):
        _record["loss_reads"].append(_state["step"])
        return all_reduce_mean(values, ctx)

    recipe.TrainRecipe._train_step = counted_step
    for name in _HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    recipe.max_over_ranks, recipe.all_reduce_mean = stop_check, loss_read


if __name__ == "__main__":
    _install()
    code = train.main()
    print("SYNCS " + json.dumps(_record), flush=True)
    sys.exit(code)
