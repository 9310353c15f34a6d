"""The loop's synchronisation points: loss reads and stop checks only at log and checkpoint steps."""

from __future__ import annotations

import json

from tests.trainer.conftest import check, run_train


def test_the_loop_reads_losses_and_agrees_on_stops_only_every_log_and_checkpoint_step(
    sim_data, tmp_path
):
    result = check(
        run_train(
            sim_data,
            tmp_path / "run",
            "train.steps=23",
            "train.log_every=5",
            "train.checkpoint_every=7",
            "train.evaluate=false",
            entry="tests.trainer.count_syncs",
        )
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("SYNCS "))
    syncs = json.loads(line.removeprefix("SYNCS "))
    assert syncs["loss_reads"] == [5, 10, 15, 20, 23]  # every log_every steps and the last
    assert syncs["stop_checks"] == [5, 7, 10, 14, 15, 20, 21, 23]  # ... and at checkpoints
    assert syncs["host_reads_in_steps"] == []  # no step waits for the device
