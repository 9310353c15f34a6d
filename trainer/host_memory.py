"""Host memory for training steps: large temporaries reused from the heap, not mapped afresh.

A training step allocates and frees the same large activations and gradients every step (at
batch 4096, the MMoE's ``(B, E, H)`` expert outputs of 8 experts of 256 units are 32 MiB, as are
their gradient and ReLU mask). glibc's ``malloc`` serves every request above its mmap threshold
(adjusted dynamically, but never above 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``;
the kernel then zero-fills the new mapping page by page, on first touch, every step: writing
a fresh 32 MiB tensor that way takes several times as long as writing a reused one, and the MMoE
of ``benchmarks/train_throughput.py`` writes several such tensors a step (``benchmarks/README.md``).

:func:`tune_host_allocator` raises the mmap threshold to 1 GiB and the heap's trim threshold
above it, so such blocks come from the heap and return to it: after the first steps, a step
reuses the memory of the previous one. The cost: the process keeps the heap at its high-water
mark instead of returning freed blocks to the system (as PyTorch's CUDA caching allocator does on
GPUs). Only glibc is tuned; with another C library (musl, macOS) nothing changes.

Example::

    tune_host_allocator()  # once, at the start of a training or evaluation process
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_host_allocator"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 30  # bytes: smaller blocks come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept before returning any to the system
# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_host_allocator() -> bool:
    """Keep large blocks on glibc's heap (see the module docstring); safe to call repeatedly.

    Returns:
        True if glibc accepted both settings; False on another C library, or if it refused one
        (the process then runs with glibc's defaults, only slower).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter is linked against
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not accepted:
        log.warning("glibc refused the allocator settings; large tensors stay on fresh mmaps")
    return accepted
