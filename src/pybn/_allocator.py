"""Keeping freed memory in the process: glibc's ``malloc`` told at run time what
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` tells it at start.

glibc serves large blocks with a fresh ``mmap`` and trims the top of its heap when much of
it is free, so the next large array or tensor is new memory: a page fault and a page of
zeros per 4 KiB before anything writes it (docs/pytorch.md, "Memory allocator"). On a
training loop's arrays of a few MB that costs as much as the kernels themselves.
"""
from __future__ import annotations

import ctypes
import functools

__all__ = ["keep_freed_memory"]

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1   # the most an int holds: 2 GiB kept free at the top of the heap


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it exports gnu_get_libc_version) and its
    malloc is the one the process calls, else None: with jemalloc or tcmalloc preloaded
    (LD_PRELOAD), glibc's mallopt would tune an allocator nobody uses (tcmalloc's own
    mallopt accepts and ignores the settings)."""
    try:
        libc = ctypes.CDLL(None)
        own = ctypes.CDLL("libc.so.6")
    except OSError:  # (no dynamic C library to ask, or not glibc's)
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    address = ctypes.c_void_p
    if any(ctypes.cast(getattr(libc, f), address).value != ctypes.cast(getattr(own, f), address).value
           for f in ("malloc", "mallopt")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for the next allocations, for NumPy, torch and
    everything else that uses ``malloc``: no ``mmap`` for large blocks (they come from the
    heap) and the heap's top trimmed only past 2 GiB free. Large arrays and tensors are then
    reused memory, not fresh pages, from the second step of a loop on.

    The price: the process keeps its peak memory (freed blocks are not returned to the
    system). The application decides; pybn never calls this itself. It acts from the call
    on (set ``GLIBC_TUNABLES`` before Python starts to cover the whole run).

    Returns
    -------
    bool
        True when glibc took the settings; False elsewhere (another C library: musl, macOS;
        another allocator preloaded: jemalloc, tcmalloc), where nothing changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1)
