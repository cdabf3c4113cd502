"""The memory-bandwidth bound, from pybn's own probe, on pybn's threads and the shape's size."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .schema import Bound
from .timing import Timing


@dataclass
class Probe:
    """One probe measurement: probe_read and probe_stream, timed call for call with pybn's kernel."""

    nbytes: int          # bytes of one float32 array of the shape's size
    read: Timing         # probe_read: one vectorized pass that reads the array (a parallel sum)
    stream: Timing       # probe_stream: copy into a preallocated array with non-temporal stores

    @property
    def t_read(self) -> float:
        return self.read.median

    @property
    def t_stream(self) -> float:
        return self.stream.median

    @property
    def read_gbs(self) -> float:
        return self.nbytes / self.t_read / 1e9

    @property
    def stream_gbs(self) -> float:
        """Bytes moved (read + written) per second."""
        return 2 * self.nbytes / self.t_stream / 1e9

    def bound(self, bound: Bound) -> float:
        """What a kernel must move, in this probe's time."""
        return bound.seconds(self.t_read, self.t_stream)

    def as_dict(self, samples: bool = True) -> dict[str, Any]:
        return {"bytes": self.nbytes, "t_read_s": self.t_read, "t_stream_s": self.t_stream,
                "read_GBps": self.read_gbs, "stream_GBps": self.stream_gbs,
                "read": self.read.as_dict(samples), "stream": self.stream.as_dict(samples)}


class Prober:
    """Probes one array (the shape's x) on pybn's threads, into one preallocated destination."""

    def __init__(self, x: np.ndarray):
        from pybn._C import diagnostics

        self._diagnostics = diagnostics
        self.src = np.ascontiguousarray(x, dtype=np.float32)
        self.dst = np.empty_like(self.src)
        self.dst.fill(0.0)                      # fault the pages in before timing
        self.history: list[Probe] = []          # every Probe taken
        self._check()

    def _check(self) -> None:
        d, src, dst = self._diagnostics, self.src, self.dst
        total = float(d.probe_read(src))
        exact = float(src.sum(dtype=np.float64))
        if not abs(total - exact) <= 1e-3 * float(np.abs(src).sum(dtype=np.float64)) + 1e-6:
            raise AssertionError(f"pybn._C.diagnostics.probe_read returned {total!r}, the array sums to {exact!r}")
        d.probe_stream(src, dst)
        if not np.array_equal(dst, src):
            raise AssertionError("pybn._C.diagnostics.probe_stream did not copy its input")

    def calls(self, bound: Bound | None = None) -> tuple[Callable[[], object], ...]:
        """probe_read and probe_stream of the array, to be timed call for call with a kernel's;
        only those ``bound`` counts, if given."""
        d, src, dst = self._diagnostics, self.src, self.dst
        if bound is None:
            return (lambda: d.probe_read(src)), (lambda: d.probe_stream(src, dst))
        return (((lambda: d.probe_read(src)),) * (bound.reads > 0)
                + ((lambda: d.probe_stream(src, dst)),) * (bound.streams > 0))

    @staticmethod
    def seconds(bound: Bound, timings: Sequence[Timing]) -> float:
        """``bound`` from the medians of the calls ``calls(bound)`` returned, in their order."""
        medians = iter(t.median for t in timings)
        t_read = next(medians) if bound.reads else 0.0
        t_stream = next(medians) if bound.streams else 0.0
        return bound.seconds(t_read, t_stream)

    def record(self, read: Timing, stream: Timing) -> Probe:
        p = Probe(nbytes=self.src.nbytes, read=read, stream=stream)
        self.history.append(p)
        return p

    def close(self) -> None:
        del self.src, self.dst


def summarize(probes: Sequence[Probe]) -> dict[str, Any]:
    """Per shape: the median, min and max over its probe batches."""
    reads = [p.t_read for p in probes]
    streams = [p.t_stream for p in probes]
    nbytes = probes[0].nbytes
    t_read, t_stream = statistics.median(reads), statistics.median(streams)
    return {"bytes": nbytes, "batches": len(probes),
            "t_read_s": t_read, "t_read_min_s": min(reads), "t_read_max_s": max(reads),
            "t_stream_s": t_stream, "t_stream_min_s": min(streams), "t_stream_max_s": max(streams),
            "read_GBps": nbytes / t_read / 1e9, "stream_GBps": 2 * nbytes / t_stream / 1e9}
