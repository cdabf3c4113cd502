"""Which kernel path runs, and on how many threads."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator

from . import _C, _threadpoolctl
from ._checks import integer


def isa() -> str:
    """The active kernel path, one of :func:`supported_isas` (e.g. ``"avx2"``).

    The best path this CPU supports is chosen at import; the environment variable
    ``PYBN_ISA=<name>`` forces a lower one.
    """
    return _C.isa()


def supported_isas() -> list[str]:
    """The kernel paths this CPU can run, lowest first."""
    return list(_C.supported_isas())


#: The most threads pybn uses. Its kernels are bound by memory bandwidth, which a few dozen
#: cores saturate even on a two-socket server; 256 leaves room for the largest machines.
MAX_THREADS: int = _C.MAX_THREADS


def get_num_threads() -> int:
    """Threads pybn's kernels use.

    The default, set at import: ``OMP_NUM_THREADS`` when it holds a positive integer (the
    first of a comma-separated list, as OpenMP reads it), else the number of CPUs this
    process may run on (its affinity mask); at most ``MAX_THREADS`` (256). A larger or
    invalid ``OMP_NUM_THREADS`` gives a ``RuntimeWarning`` at import saying what is used.

    A child process made by ``fork`` (multiprocessing's default start method on Linux,
    torch DataLoader workers) uses 1 thread until it calls :func:`set_num_threads`: the
    parent's threads do not exist in the child, and N workers each starting the parent's
    count would oversubscribe the machine N times.
    """
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads pybn's kernels use, 1 <= n <= ``MAX_THREADS`` (256).

    Results do not depend on it, and torch's or NumPy's thread settings do not change it.
    pybn runs its own thread pool, or, when a GNU OpenMP runtime is already loaded (torch's),
    that runtime's threads (``PYBN_THREADING=own|openmp|auto`` chooses; docs/threads.md):
    threads are started when a call first needs them, and if the system refuses to create
    one the calls run on those that exist. Idle threads of pybn's pool spin about 0.1 ms
    after a call, then sleep; OpenMP's follow ``OMP_WAIT_POLICY``. Small inputs (under 32K
    elements per thread) use fewer threads, and a call made while another Python thread's
    call is using the pool runs single-threaded, on its calling thread.
    """
    n = integer(n, "n")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n: must be in [1, {MAX_THREADS}], got {n}")
    _C.set_num_threads(n)


def _default_num_threads() -> int:
    """OMP_NUM_THREADS, or the CPUs of the affinity mask (see get_num_threads)."""
    cpus = min(len(os.sched_getaffinity(0)), MAX_THREADS)
    value = os.environ.get("OMP_NUM_THREADS", "")
    if not value.strip():
        return cpus
    first = value.split(",")[0].strip()
    if not re.fullmatch(r"[0-9]+", first) or int(first) == 0:
        warnings.warn(f"OMP_NUM_THREADS={value!r} is not a positive integer: pybn uses {cpus} threads, "
                      "the CPUs this process may run on", RuntimeWarning, stacklevel=2)
        return cpus
    if int(first) > MAX_THREADS:
        warnings.warn(f"OMP_NUM_THREADS={value!r} is above pybn's maximum: pybn uses {MAX_THREADS} threads",
                      RuntimeWarning, stacklevel=2)
        return MAX_THREADS
    return int(first)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the block on another kernel path (for tests and benchmarks)."""
    previous = _C.isa()
    try:
        _C.use_isa(name)
    except RuntimeError as e:
        raise ValueError(f"name: {e}") from None
    try:
        yield
    finally:
        _C.use_isa(previous)


_C.set_num_threads(_default_num_threads())
# threadpoolctl's threadpool_info() / threadpool_limits() see and set this count too.
_threadpoolctl.register_when_imported()
