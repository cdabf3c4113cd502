"""Which kernel path runs, and on how many threads."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import _C
from ._checks import integer


def isa() -> str:
    """The active kernel path: "scalar", "avx2" or "avx512".

    The best path this CPU supports is chosen at import; the environment variable
    ``PYBN_ISA=scalar|avx2|avx512`` forces a lower one.
    """
    return _C.isa()


def supported_isas() -> list[str]:
    """The kernel paths this CPU can run, lowest first."""
    return list(_C.supported_isas())


def get_num_threads() -> int:
    """Threads pybn's kernels use (default: OpenMP's, which honours ``OMP_NUM_THREADS``)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads pybn's kernels use (n >= 1). Results do not depend on it."""
    n = integer(n, "n")
    if not 1 <= n < 2**31:
        raise ValueError(f"n: must be in [1, 2**31), got {n}")
    _C.set_num_threads(n)


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
