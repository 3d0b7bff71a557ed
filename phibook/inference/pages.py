"""Giving memory back: the pages of memory-mapped weights a process no longer needs, and malloc's
free lists (used by fast_decode and quant after they copy weights into their own layouts); and
taking it in 2 MiB pages where a kernel streams it (``huge_page_copy`` for weights,
``huge_page_zeros`` for KV caches)."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files (safetensors maps rw-p)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] in ("r--p", "rw-p") and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def file_page_range(t: Tensor) -> tuple[int, int] | None:
    """The whole pages of ``t`` when they lie in a private file mapping, else None."""
    if t.device.type != "cpu" or t.numel() == 0 or not hasattr(os, "sysconf"):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    lo_page, hi_page = -(-lo // page) * page, hi // page * page
    if hi_page <= lo_page or not any(a <= lo_page and hi_page <= b for a, b in _file_mappings()):
        return None
    return lo_page, hi_page


def malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _madvise(start: int, length: int, advice: int) -> None:
    """madvise(2) on [start, start + length); advice the system refuses is ignored (it is advice)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice)
    except (OSError, AttributeError):
        pass


def dontneed(pages: tuple[int, int]) -> None:
    _madvise(pages[0], pages[1] - pages[0], _MADV_DONTNEED)


def drop_file_pages(t: Tensor) -> None:
    """madvise(DONTNEED) the whole pages of ``t`` when they lie in a private file mapping.

    For a page never written, the call only evicts it from this process (a
    later read faults it back in from the file, unchanged), so neighbouring
    tensors sharing an edge page keep their values; loaded weights are never
    written in place. Anonymous memory is never touched.
    """
    pages = file_page_range(t)
    if pages is not None:
        dontneed(pages)


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor in fresh memory that starts on a 2 MiB boundary and
    is madvise(MADV_HUGEPAGE)'d before anything touches it, so the kernel backs it with huge pages
    where transparent huge pages are allowed ("madvise" or "always"). Decode streams every weight
    once a step, and attention reads every cached key and value: with 4 KiB pages the TLB misses
    cost the weights about a tenth of their bandwidth, and a step's attention over 1,024 cached
    tokens a third of its time (docs/performance.md). Where the advice is refused the memory is
    ordinary. The slack before the boundary is never touched, so it is address space, not memory.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    _madvise(raw.data_ptr() + start, nbytes, _MADV_HUGEPAGE)
    return raw[start : start + nbytes].view(dtype).view(shape)


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Zeros in huge pages (``huge_page_empty``) on the CPU; plain ``torch.zeros`` elsewhere. The
    signature of ``KVCache(allocate=...)``: phibook's CPU KV caches live here."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return huge_page_empty(shape, dtype).zero_()


def huge_page_copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` in huge pages (``huge_page_empty``): FastForward's GEMV weights."""
    return huge_page_empty(tuple(t.shape), t.dtype).copy_(t)
