"""Keep freed memory inside the process on CPU training (glibc ``mallopt``).

A training step on CPU allocates the same large tensors every step: the
logits of a micro-batch (105M values at 8 x 256 tokens and a 51,200-row
vocabulary), activations, and a fresh gradient for every parameter. glibc
serves blocks above 32 MB with ``mmap`` and unmaps them on ``free``, so every
step touches hundreds of MB of brand-new pages, and the kernel's page faults
and zeroing cost more than the arithmetic done on them: measured on 2 cores,
``x.float()`` of a 2048 x 51,200 bf16 tensor takes 0.20 CPU-seconds into
fresh memory and 0.024 into reused memory (docs/performance-training.md).

``keep_freed_memory()`` switches glibc to serve large blocks from the heap
(``M_MMAP_MAX = 0``) and never to hand the heap's top back to the kernel
(``M_TRIM_THRESHOLD``), so from the second step on the same memory is reused.
The process's peak footprint is unchanged (it is reached in the first step);
freed memory is simply not returned until exit. This is the effect that
jemalloc/tcmalloc preloading gives PyTorch CPU training, without a
dependency. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc accepted them."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Order matters: stop trimming first, then stop using mmap for big blocks.
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
    _done = ok
    return ok
