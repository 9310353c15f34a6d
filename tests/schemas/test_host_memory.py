"""schemas.host_memory: large blocks reused from the heap instead of faulted in afresh."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from schemas import host_memory

# Page faults of writing 10 fresh 40 MiB tensors, after 20 others were written and freed (glibc
# settles into reusing the freed blocks after a few rounds: torch asks for 64-byte alignment,
# which the first freed blocks are a few bytes too small to give).
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from schemas.host_memory import tune_host_allocator
    if sys.argv[1] == "tuned":
        assert tune_host_allocator()
    for _ in range(20):
        torch.empty(10 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(10 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _printed(script: str, mode: str) -> float:
    """The number ``script`` prints last, run in a fresh interpreter with argument ``mode``."""
    proc = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
    )
    return float(proc.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_a_tuned_process_reuses_large_blocks_instead_of_faulting_them_in():
    pages = 10 * 40 * 2**20 // 4096
    assert _printed(_FAULTS, "default") > pages // 2  # fresh mappings: every page faults
    assert _printed(_FAULTS, "tuned") < pages // 20  # freed heap blocks again


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.tune_host_allocator() is False


# A thread like the service's micro-batcher: five 4 MiB arrays live at once, then freed, batch
# after batch; the page faults of each batch after the first.
_THREAD_BATCHES = textwrap.dedent(
    """
    import resource, sys, threading
    import numpy as np
    from schemas.host_memory import tune_host_allocator
    if sys.argv[1] == "tuned":
        assert tune_host_allocator()
    faults = []
    def batches():
        for _ in range(21):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            arrays = [np.ones((1024, 1024), dtype=np.float32) for _ in range(5)]
            del arrays
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    thread = threading.Thread(target=batches)
    thread.start()
    thread.join()
    print(sum(faults[1:]) / 20)
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_a_thread_of_a_tuned_process_reuses_its_last_batch_memory():
    pages = 5 * 4 * 2**20 // 4096
    assert _printed(_THREAD_BATCHES, "default") > pages // 4  # the heap's top given back each time
    assert _printed(_THREAD_BATCHES, "tuned") < pages // 100


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),
        ("MALLOC_MMAP_THRESHOLD_", "1000000"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"),
    ],
)
def test_thresholds_the_environment_sets_are_left_alone(monkeypatch, name, value):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setenv(name, value)
    assert host_memory.tune_host_allocator() is False


# Resident MiB of a tuned process after it frees 256 MiB of heap blocks, then after it releases
# them.
_RELEASE = textwrap.dedent(
    """
    import numpy as np
    from schemas.host_memory import release_free_memory, tune_host_allocator
    def resident_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    assert tune_host_allocator()
    blocks = [np.ones(8 * 2**20) for _ in range(4)]  # 64 MiB each, below the mmap threshold
    del blocks
    kept = resident_mib()
    assert release_free_memory()
    print(kept - resident_mib())
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_release_free_memory_hands_back_what_a_tuned_process_kept():
    assert _printed(_RELEASE, "tuned") > 200  # of the 256 MiB freed


def test_release_free_memory_leaves_other_c_libraries_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.release_free_memory() is False
