"""The memory-bandwidth bound, from pybn's own probe, on pybn's threads and the shape's size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .timing import Timing, TimingConfig, measure


@dataclass
class Probe:
    """Probe timings of one array size. ``read`` / ``stream`` hold one batch each, measured
    before the shape's kernels; ``read2`` / ``stream2`` a second batch after them. Each
    figure is the smaller of its batches' medians (a burst of noise from other processes
    on a shared machine then disturbs only one of them)."""

    nbytes: int          # bytes of one float32 array of the shape's size
    read: Timing         # probe_read: one vectorized pass that reads the array (a parallel sum)
    stream: Timing       # probe_stream: copy into a preallocated array with non-temporal stores
    read2: Timing | None = None
    stream2: Timing | None = None

    @property
    def t_read(self) -> float:
        return min(t.median for t in (self.read, self.read2) if t is not None)

    @property
    def t_stream(self) -> float:
        return min(t.median for t in (self.stream, self.stream2) if t is not None)

    @property
    def read_gbs(self) -> float:
        return self.nbytes / self.t_read / 1e9

    @property
    def stream_gbs(self) -> float:
        """Bytes moved (read + written) per second."""
        return 2 * self.nbytes / self.t_stream / 1e9

    def bound(self, kernel: str) -> float:
        """What the kernel must move, in probe time (DESIGN.md, "How performance is judged")."""
        if kernel == "infer":
            return self.t_stream
        if kernel == "train":
            return self.t_read + self.t_stream
        if kernel == "backward":
            return 3 * self.t_read + self.t_stream
        raise ValueError(kernel)

    def as_dict(self) -> dict:
        return {"bytes": self.nbytes, "t_read_s": self.t_read, "t_stream_s": self.t_stream,
                "read_GBps": self.read_gbs, "stream_GBps": self.stream_gbs,
                "read": self.read.as_dict(), "stream": self.stream.as_dict(),
                "read_after": self.read2.as_dict() if self.read2 else None,
                "stream_after": self.stream2.as_dict() if self.stream2 else None}


BOUND_FORMULA = {"infer": "t_stream", "train": "t_read + t_stream", "backward": "3*t_read + t_stream"}


def measure_probe(x: np.ndarray, cfg: TimingConfig, *, check: bool = True) -> tuple:
    """Time probe_read over ``x`` and probe_stream from ``x`` into a preallocated, touched array.

    Returns ``(read, stream)`` timings; ``check`` first verifies what the probe computes.
    """
    from pybn import _C

    src = np.ascontiguousarray(x, dtype=np.float32)
    dst = np.empty_like(src)
    dst.fill(0.0)                                     # fault the pages in before timing
    if check:
        total = float(_C.probe_read(src))
        exact = float(src.sum(dtype=np.float64))
        if not abs(total - exact) <= 1e-3 * float(np.abs(src).sum(dtype=np.float64)) + 1e-6:
            raise AssertionError(f"pybn._C.probe_read returned {total!r}, the array sums to {exact!r}")
    read = measure(lambda: _C.probe_read(src), cfg, calls_done=int(check))
    stream = measure(lambda: _C.probe_stream(src, dst), cfg)
    if check and not np.array_equal(dst, src):
        raise AssertionError("pybn._C.probe_stream did not copy its input")
    del dst
    return read, stream
