"""Each rank of a CPU training on its own share of the machine's cores.

``torchrun --nproc_per_node=N`` on a CPU machine starts N ranks that all may run on every CPU
the launcher may use, and the kernel moves their threads (and gloo's) between CPUs as it sees
fit. Bound instead to disjoint shares, each rank keeps its caches and no two ranks' compute
threads take turns on one core: on the 2-core machine of ``benchmarks/README.md`` two ranks of
one thread each trained 2.4 % faster bound than unbound (median step 229 ms against 235 ms, four
alternating pairs of runs).

Shares are whole physical cores (the SMT siblings of a core stay together) in the order of
their socket and core ids, so a rank's share stays on one socket where it can; ranks get equal
numbers of cores, the first ones one more when they do not divide evenly. Binding splits the
CPUs this process may use (``os.sched_getaffinity``): every local rank inherits the same set
from the launcher. A user who places each rank themselves (``numactl``, ``taskset`` per rank)
turns it off (``cpu_binding: none``, ``trainer.config.CpuBinding``).

A bound rank runs one torch thread per core of its share, as torch's own CPU launcher
(``torch.backends.xeon.run_cpu``) sizes its instances: torchrun sets ``OMP_NUM_THREADS=1`` for
every rank when several run on a machine and the user set nothing, which would leave all but
one core of each share idle (:func:`rank_threads` says how an explicit setting is read).

Example::

    cpus = bind_local_rank(local_rank=1, local_world_size=2)  # e.g. [1], or None: left alone
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["bind_local_rank", "cpu_cores", "cpu_shares", "rank_threads"]

log = logging.getLogger(__name__)

_TOPOLOGY = Path("/sys/devices/system/cpu")


def cpu_cores(
    cpus: Sequence[int], read: Callable[[int, str], str | None] | None = None
) -> list[list[int]]:
    """``cpus`` grouped by physical core (SMT siblings together), cores in socket, core order.

    Args:
        cpus: CPU numbers.
        read: ``(cpu, name)`` to the text of ``topology/<name>`` of that CPU, None when absent
            (default: sysfs). A CPU without topology counts as a core of its own.
    """
    read = read or _read_topology
    cores: dict[tuple[int, int, int], list[int]] = {}
    for cpu in sorted(cpus):
        package, core = read(cpu, "physical_package_id"), read(cpu, "core_id")
        if package is None or core is None:
            key = (1 << 30, cpu, cpu)  # unknown topology: after the known cores, one CPU each
        else:
            key = (int(package), int(core), -1)
        cores.setdefault(key, []).append(cpu)
    return [cores[key] for key in sorted(cores)]


def cpu_shares(cores: Sequence[Sequence[int]], ranks: int) -> list[list[int]]:
    """Split ``cores`` (each a list of CPUs) into ``ranks`` contiguous shares of CPUs: equal
    numbers of cores, the first shares one more when they do not divide evenly.

    Raises:
        ValueError: fewer cores than ranks.
    """
    if len(cores) < ranks:
        raise ValueError(f"{len(cores)} cores cannot give {ranks} ranks one each")
    per_rank, extra = divmod(len(cores), ranks)
    shares, start = [], 0
    for rank in range(ranks):
        stop = start + per_rank + (1 if rank < extra else 0)
        shares.append([cpu for core in cores[start:stop] for cpu in core])
        start = stop
    return shares


def rank_threads(cores: int, cpus: int, omp_num_threads: str | None) -> int:
    """The intra-op threads of a rank bound to a share of ``cores`` physical cores (``cpus``
    CPUs with their SMT siblings).

    Args:
        omp_num_threads: the rank's ``OMP_NUM_THREADS``. Unset, ``"1"`` (what torchrun sets
            for each of several ranks when the user set nothing) or not a positive integer:
            one thread per core. Any other value: that many, at most one per CPU of the share.
    """
    try:
        requested = int(omp_num_threads or "")
    except ValueError:
        requested = 0
    if requested <= 1:
        return cores
    return min(requested, cpus)


def bind_local_rank(local_rank: int, local_world_size: int) -> list[int] | None:
    """Bind this process to its share of the CPUs it may use, and set torch's intra-op threads
    for it (:func:`rank_threads`).

    Returns:
        The CPUs of the share, or None when the process was left alone: a single local rank,
        fewer cores than local ranks (a warning says so), or no ``sched_setaffinity`` (not
        Linux).
    """
    if local_world_size < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = cpu_cores(sorted(os.sched_getaffinity(0)))
    if len(cores) < local_world_size:
        log.warning(
            "cpu_binding: %d ranks on %d cores; leaving their placement to the kernel",
            local_world_size,
            len(cores),
        )
        return None
    share = cpu_shares(cores, local_world_size)[local_rank]
    share_cores = sum(1 for core in cores if core[0] in share)
    threads = rank_threads(share_cores, len(share), os.environ.get("OMP_NUM_THREADS"))
    os.sched_setaffinity(0, share)
    torch.set_num_threads(threads)
    log.info(
        "cpu_binding: local rank %d runs on CPUs %s with %d threads", local_rank, share, threads
    )
    return share


def _read_topology(cpu: int, name: str) -> str | None:
    try:
        return (_TOPOLOGY / f"cpu{cpu}" / "topology" / name).read_text().strip()
    except OSError:
        return None
