"""Host memory for training steps and scoring batches: large temporaries reused from the heap,
not mapped afresh.

A training step allocates and frees the same large activations and gradients every step (at
batch 4096, the MMoE's ``(B, E, H)`` expert outputs of 8 experts of 256 units are 32 MiB, as are
their gradient and ReLU mask); a scoring batch of a few thousand rows does the same with
intermediates of a few MiB (a 4,096-row batch of the demo model: 4 MiB for the first layer's
output alone). glibc's ``malloc`` serves every request above its mmap threshold (adjusted
dynamically, never above 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and gives the
free top of a heap back to the system once it exceeds the trim threshold (twice the largest block
freed so far). Either way the kernel zero-fills the memory again page by page, on first touch:

* in training, every step: writing a fresh 32 MiB tensor that way takes several times as long as
  writing a reused one, and the MMoE of ``benchmarks/train_throughput.py`` writes several such
  tensors a step (``benchmarks/README.md``);
* in the service, the micro-batcher's thread has a heap (arena) of its own, and after each batch
  its top holds all of the batch's freed intermediates: over HTTP (``/v1/rank``, 256 candidates,
  concurrency 32, one worker, int8 tables) 0.36 to 1.1 page faults per scored row and 210,000 to
  302,000 rows/s over three server starts (how often the arena trims depends on what else it
  holds), against 0.004 faults per row and 314,000 to 334,000 rows/s tuned (``benchmarks/README.md``,
  "Freed memory kept for the next batch").

:func:`tune_host_allocator` raises the mmap threshold to 1 GiB and the trim threshold above it,
so such blocks come from the heaps and return to them: after the first steps or batches, each
reuses the memory of the previous one. The cost: a process keeps its heaps at their high-water
mark instead of returning freed blocks to the system (as PyTorch's CUDA caching allocator does on
GPUs); :func:`release_free_memory` hands back what a one-off phase left free (the service calls it
after loading a model, whose reading and checking temporaries would otherwise stay in its heap:
a model of one file per table held 1.5 GiB a worker instead of 0.5). Only glibc is tuned; with another C library (musl, macOS) nothing changes, and thresholds
the environment sets (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``)
are left as the user chose.

Example::

    tune_host_allocator()  # once, at the start of a training, evaluation or scoring process
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "release_free_memory", "tune_host_allocator"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 30  # bytes: smaller blocks come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept before returning any to the system
# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# How a user sets the thresholds themselves.
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def tune_host_allocator() -> bool:
    """Keep large blocks on glibc's heaps (see the module docstring); safe to call repeatedly.

    Returns:
        True if glibc accepted both settings; False on another C library, when the environment
        sets either threshold, or if glibc refused one (the process then runs with glibc's
        defaults, only slower).
    """
    if not _glibc():
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(v in os.environ for v in _USER_VARIABLES) or any(t in tunables for t in _USER_TUNABLES):
        log.info("malloc thresholds left as the environment sets them")
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked against
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not accepted:
        log.warning("glibc refused the allocator settings; large tensors stay on fresh mmaps")
    return accepted


def release_free_memory() -> bool:
    """Return the free memory of glibc's heaps to the system (``malloc_trim(0)``), as after a
    one-off phase such as loading a model; the memory of the steps or batches that follow is
    kept again by :func:`tune_host_allocator`'s thresholds.

    Returns:
        True if glibc returned some memory; False if there was none to return, or on another C
        library.
    """
    if not _glibc():
        return False
    return ctypes.CDLL(None).malloc_trim(0) == 1


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
