"""trainer.host_memory: large blocks reused from the heap instead of faulted in afresh."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from trainer import host_memory

# Page faults of writing 10 fresh 40 MiB tensors, after 20 others were written and freed (glibc
# settles into reusing the freed blocks after a few rounds: torch asks for 64-byte alignment,
# which the first freed blocks are a few bytes too small to give).
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from trainer.host_memory import tune_host_allocator
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


def _faults(mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")
def test_a_tuned_process_reuses_large_blocks_instead_of_faulting_them_in():
    pages = 10 * 40 * 2**20 // 4096
    assert _faults("default") > pages // 2  # fresh mappings: every page faults on first write
    assert _faults("tuned") < pages // 20  # freed heap blocks again


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.tune_host_allocator() is False
