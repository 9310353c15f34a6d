"""Ranks of a CPU training bound to disjoint shares of the cores (trainer.cpu_binding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import cpu_binding
from trainer.cpu_binding import cpu_cores, cpu_shares, rank_threads

REPO = Path(__file__).resolve().parents[2]


def _topology(table: dict[int, tuple[int, int]]):
    """A ``read`` for :func:`cpu_cores`: cpu -> (socket, core); CPUs not in ``table`` have none."""

    def read(cpu: int, name: str) -> str | None:
        if cpu not in table:
            return None
        socket, core = table[cpu]
        return str(socket if name == "physical_package_id" else core)

    return read


def test_smt_siblings_stay_on_one_core_and_cores_follow_socket_order():
    # two sockets of two cores, two threads a core; Linux numbers the second threads last
    table = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    assert cpu_cores(range(8), _topology(table)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert cpu_shares(cpu_cores(range(8), _topology(table)), 2) == [[0, 4, 1, 5], [2, 6, 3, 7]]


def test_cpus_without_topology_are_cores_of_their_own_after_the_known_ones():
    assert cpu_cores([3, 0, 1], _topology({3: (0, 0)})) == [[3], [0], [1]]


def test_shares_are_equal_the_first_ones_larger_when_cores_do_not_divide():
    cores = [[c] for c in range(5)]
    assert cpu_shares(cores, 2) == [[0, 1, 2], [3, 4]]
    assert cpu_shares(cores, 3) == [[0, 1], [2, 3], [4]]
    assert cpu_shares(cores, 5) == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="5 cores cannot give 6 ranks one each"):
        cpu_shares(cores, 6)


def test_a_bound_rank_runs_a_thread_per_core_unless_omp_num_threads_asks_otherwise():
    # a share of 8 cores, 16 CPUs with their SMT siblings
    assert rank_threads(8, 16, None) == 8
    assert rank_threads(8, 16, "1") == 8  # torchrun's default for several ranks, not a request
    assert rank_threads(8, 16, "") == 8
    assert rank_threads(8, 16, "four") == 8
    assert rank_threads(8, 16, "4") == 4
    assert rank_threads(8, 16, "12") == 12  # SMT siblings too, when asked for
    assert rank_threads(8, 16, "64") == 16  # never more than the share's CPUs


@pytest.mark.parametrize("omp_num_threads, threads", [(None, 2), ("1", 2), ("3", 3)])
def test_binding_sets_the_threads_of_a_share_larger_than_one_core(
    monkeypatch, omp_num_threads, threads
):
    """A machine larger than this one, faked: 4 cores of 2 SMT siblings (CPU c and c + 4)."""
    bound_to: list[list[int]] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: bound_to.append(list(cpus)))
    monkeypatch.setattr(
        cpu_binding, "_read_topology", _topology({cpu: (0, cpu % 4) for cpu in range(8)})
    )
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun's OMP_NUM_THREADS=1 leaves a rank with
    try:
        assert cpu_binding.bind_local_rank(local_rank=1, local_world_size=2) == [2, 6, 3, 7]
        assert bound_to == [[2, 6, 3, 7]]
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


_PROBE = """
import json, os, sys, torch
from trainer.distributed import init_distributed, shutdown_distributed
before, threads_before = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
init_distributed("gloo", "cpu", sys.argv[1])
print(json.dumps({"before": before, "after": sorted(os.sched_getaffinity(0)),
                  "threads_before": threads_before, "threads": torch.get_num_threads()}))
shutdown_distributed()
"""


def _probe(binding: str, local_rank: int, local_world_size: int, omp_num_threads: str) -> dict:
    """``init_distributed`` in a fresh process that torchrun would have started as local rank
    ``local_rank`` of ``local_world_size`` (a 1-rank group: no RANK in its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS=omp_num_threads,
    )
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, binding],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(cpu_cores(sorted(os.sched_getaffinity(0)))) < 2,
    reason="needs Linux and at least 2 cores",
)
def test_on_cpu_each_local_rank_runs_on_its_own_share_unless_binding_is_off():
    cores = cpu_cores(sorted(os.sched_getaffinity(0)))
    shares = cpu_shares(cores, 2)
    for rank in (0, 1):
        share_cores = sum(1 for core in cores if core[0] in shares[rank])
        bound = _probe("auto", rank, 2, omp_num_threads="1")  # as torchrun starts it
        assert bound["after"] == sorted(shares[rank])
        assert bound["threads_before"] == 1
        assert bound["threads"] == share_cores
        asked = _probe("auto", rank, 2, omp_num_threads="64")
        assert asked["threads"] == len(shares[rank])  # at most one a CPU of the share
    alone = _probe("auto", 0, 1, omp_num_threads="1")  # one rank on the machine: nothing to share
    off = _probe("none", 1, 2, omp_num_threads="1")
    for left in (alone, off):
        assert left["after"] == left["before"]
        assert left["threads"] == left["threads_before"] == 1
