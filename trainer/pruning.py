"""Adap-SL's adaptive sparse pruning (``adap-sl.txt`` Section 4.4, Algorithm 1) and its report.

Algorithm 1 trains the imputation model ``g_phi`` and the prediction model ``f_theta`` together
for ``k`` steps (one "epoch"), then, for each model whose warm-up ``E`` is over and whose density
``||M||_0 / |theta|`` (share of weights kept) is still above its minimum ``S``, prunes the
share ``alpha`` of its remaining weights with the smallest magnitudes, and repeats. Masks only
ever lose ones (nested sub-networks). Here:

- **Epoch.** A streaming run has no natural epoch: epoch ``e`` (0-based) is the
  ``model.adap_sl.epoch_steps`` steps ending at step ``(e + 1) * epoch_steps``. Algorithm 1's
  test ``Epoch >= E`` runs after each of them, so with ``warmup_epochs = E`` the first prune
  comes after ``(E + 1) * epoch_steps`` steps.
- **Which weights.** A tower's weights are every weight it reads (``masked_linears``): its
  private units, its logit layer, and the shared units through its own mask. The ``alpha``
  lowest magnitudes are taken over all of them together (one global ranking per tower, as
  Algorithm 1 ranks ``phi`` or ``theta`` whole), ties broken by position. Biases are not pruned.
- **Scope: tower weights only, not the embeddings (a deviation).** The paper's masks cover
  every parameter of ``g_phi`` and ``f_theta``, the embeddings included: its Fig. 4 masks the
  common and the task-specific halves of each embedding separately for each model, after
  "removing irrelevant embeddings". Here nothing in the embedding tables, the MMoE experts or
  the gates is pruned. In this model the tables and experts are shared by every head (the CTR
  head too, whose pCTR every DR estimator divides by), not split into halves owned by the
  prediction and imputation models (``trainer.model.adap_sl`` says why), so a mask on them
  would prune the propensity model as well; and the tables are sharded and updated by
  TorchRec's fused optimizer kernels, which would need the masks inside the lookup and inside
  the fused update. The sparsity the paper's Table 4 reports for the embeddings has no
  counterpart in ``pruning.json``.
- **Magnitude only.** Section 5.4.4 also tries ranking by a weighted sum of normalised weight
  and gradient; Algorithm 1 and this module use the weight's magnitude (gradient share 0).
- **Minimum density as a floor.** The last prune is cut short so that a tower keeps at least
  ``ceil(S x |theta|)`` weights; Algorithm 1 would overshoot ``S`` by up to ``alpha``.

:func:`density_report` is the paper's Table 4: per tower, the share of its weights remaining in
total, in the shared units and in its private ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trainer.config import AdapSlConfig, PruningConfig
from trainer.distributed import broadcast_from_main_
from trainer.model.adap_sl import TOWERS, MaskedLinear, PartiallySharedTowers

__all__ = ["AdaptivePruner", "density_report", "format_density", "magnitude_prune_"]

_EPS = 1e-9  # keeps float rounding of rate x kept and S x total from moving a count by one


@torch.no_grad()
def magnitude_prune_(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], rate: float, min_density: float
) -> int:
    """Zero, in ``masks``, the ``floor(rate x kept)`` kept entries of smallest ``|weight|``,
    ranked across all the tensors together, keeping at least ``ceil(min_density x total)``.

    Args:
        weights: the raw weights.
        masks: their 0/1 masks (same shapes), updated in place.
        rate: share ``alpha`` of the kept entries to prune.
        min_density: share ``S`` of all entries that stays kept.

    Returns:
        How many entries were pruned.
    """
    flat_masks = torch.cat([mask.flatten() for mask in masks])
    kept, total = int(flat_masks.sum().item()), flat_masks.numel()
    count = min(math.floor(rate * kept + _EPS), kept - math.ceil(min_density * total - _EPS))
    if count <= 0:
        return 0
    # Pruned entries rank last, so they are never counted again (masks are nested).
    scores = torch.cat(
        [
            torch.where(mask.flatten() > 0, weight.detach().abs().flatten(), torch.inf)
            for weight, mask in zip(weights, masks)
        ]
    )
    flat_masks[torch.argsort(scores, stable=True)[:count]] = 0
    for mask, part in zip(masks, flat_masks.split([mask.numel() for mask in masks])):
        mask.copy_(part.view_as(mask))
    return count


def density_report(towers: PartiallySharedTowers) -> dict[str, dict[str, float | int]]:
    """Table 4: per tower, the share of its weights kept in total, in shared and in private units,
    with the counts behind them (``*_weights``: all, ``*_kept``: remaining)."""
    report: dict[str, dict[str, float | int]] = {}
    for tower in towers.towers:
        counts = {"shared": [0, 0], "private": [0, 0]}
        for module, shared in towers.masked_linears(tower):
            mask = module.mask(tower)
            part = counts["shared" if shared else "private"]
            part[0] += int(mask.sum().item())
            part[1] += mask.numel()
        kept = counts["shared"][0] + counts["private"][0]
        weights = counts["shared"][1] + counts["private"][1]
        report[tower] = {
            "total": kept / weights,
            "shared": counts["shared"][0] / counts["shared"][1],
            "private": counts["private"][0] / counts["private"][1],
            "total_kept": kept,
            "total_weights": weights,
            **{
                f"{part}_{what}": n
                for part, (k, w) in counts.items()
                for what, n in (("kept", k), ("weights", w))
            },
        }
    return report


def format_density(report: dict[str, dict[str, float | int]]) -> str:
    """One line of :func:`density_report`, e.g. ``cvr 59.0% (shared 41.2%, private 76.9%); ...``."""
    return "; ".join(
        f"{tower} {r['total']:.1%} (shared {r['shared']:.1%}, private {r['private']:.1%})"
        for tower, r in report.items()
    )


class AdaptivePruner:
    """Algorithm 1's pruning schedule over the partially shared towers of a model.

    Call :meth:`after_step` after every optimizer step with the number of steps done. Its
    decisions depend only on that number and on the weights, so a resumed run (masks restored
    from the checkpoint) prunes exactly as an uninterrupted one.

    Args:
        towers: the model's ``PartiallySharedTowers``.
        config: ``model.adap_sl``.

    Example::

        pruner = AdaptivePruner(model.partially_shared, config.model.adap_sl)
        for step in range(1, steps + 1):
            ...  # forward, backward, optimizer.step()
            pruned = pruner.after_step(step)  # e.g. ["cvr", "imputation"] at an epoch's end
    """

    def __init__(self, towers: PartiallySharedTowers, config: AdapSlConfig) -> None:
        self.towers = towers
        self.config = config

    def schedule(self, tower: str) -> PruningConfig:
        return getattr(self.config, tower)

    def after_step(self, step: int) -> list[str]:
        """Prune the towers due at the end of an epoch, then zero the raw weights no tower reads.

        Returns:
            The towers pruned at this step (usually none).
        """
        pruned = []
        if step % self.config.epoch_steps == 0:
            epoch = step // self.config.epoch_steps - 1
            for tower in TOWERS:
                if epoch >= self.schedule(tower).warmup_epochs and self.prune(tower):
                    pruned.append(tower)
        if pruned:
            self._agree_across_ranks()
        self.towers.zero_pruned_()
        return pruned

    def prune(self, tower: str) -> int:
        """One prune of ``tower`` at its rate, down to at most its minimum density."""
        modules = [module for module, _ in self.towers.masked_linears(tower)]
        schedule = self.schedule(tower)
        return magnitude_prune_(
            [module.linear.weight for module in modules],
            [module.mask(tower) for module in modules],
            schedule.rate,
            schedule.min_density,
        )

    def _agree_across_ranks(self) -> None:
        # Data parallelism keeps the dense weights identical on every rank, so every rank picks
        # the same weights; rank 0's masks are broadcast anyway, so the ranks can never train
        # different structures.
        broadcast_from_main_(
            module.mask(tower)
            for module in self.towers.modules()
            if isinstance(module, MaskedLinear)
            for tower in module.towers
        )
