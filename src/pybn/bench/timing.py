"""Medians of repeated calls after warm-up, under a time budget per measurement."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class TimingConfig:
    budget: float = 0.15     # seconds of timed repetitions per measurement (one round)
    warmup: int = 3          # warm-up calls (the correctness-check call counts as the first)
    min_reps: int = 5        # at least this many timed calls (3 for calls slower than budget/5)
    max_reps: int = 1000     # at most this many timed calls
    pause: float = 0.01      # idle gap before each batch, so the previous runtime's spinning threads settle

    @classmethod
    def quick(cls) -> TimingConfig:
        return cls(budget=0.06, warmup=2, min_reps=3, max_reps=200, pause=0.005)


@dataclass
class Timing:
    median: float
    min: float
    max: float
    mean: float
    reps: int
    warmup: int
    samples: list[float] = field(repr=False, default_factory=list)

    def as_dict(self, samples: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"median_s": self.median, "min_s": self.min, "max_s": self.max,
             "mean_s": self.mean, "reps": self.reps, "warmup": self.warmup}
        if samples:
            d["samples_s"] = self.samples
        return d


@contextlib.contextmanager
def _batch(cfg: TimingConfig) -> Iterator[None]:
    """A timed batch: after an idle pause (so the previous runtime's spinning threads settle),
    with the garbage collector off."""
    if cfg.pause > 0:
        time.sleep(cfg.pause)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_was_enabled:
            gc.enable()


def _timing(samples: list[float], warm: int) -> Timing:
    return Timing(median=statistics.median(samples), min=min(samples), max=max(samples),
                  mean=statistics.fmean(samples), reps=len(samples), warmup=warm, samples=samples)


def measure(fn: Callable[[], object], cfg: TimingConfig, *, calls_done: int = 0,
            last_call_s: float | None = None) -> Timing:
    """Time ``fn()`` in one consecutive batch: warm-up, then repetitions.

    ``calls_done`` is the number of calls of ``fn`` made just before (the
    correctness check, which took ``last_call_s``); they count towards the
    warm-up. Warm-up stops early
    (after at least one call) once it has used half the budget, so a slow
    peer is not run many times untimed. Repetitions continue until both
    ``min_reps`` calls and ``budget`` seconds are reached, or ``max_reps``.
    The result is the median of the timed calls.
    """
    perf = time.perf_counter
    with _batch(cfg):
        warm = calls_done
        est = last_call_s
        w_start = perf()
        # a call slower than half the budget: the check call was warm-up enough
        slow = warm > 0 and est is not None and est > cfg.budget / 2
        while warm < cfg.warmup and not slow:
            t0 = perf()
            fn()
            est = perf() - t0
            warm += 1
            if perf() - w_start > cfg.budget / 2:
                break
        if warm == 0:  # cfg.warmup == 0 and no check call: still do not time a cold first call
            t0 = perf()
            fn()
            est = perf() - t0
            warm = 1
        min_reps = cfg.min_reps
        if est is not None and est * min_reps > cfg.budget:
            min_reps = min(min_reps, 3)
        samples: list[float] = []
        start = perf()
        while True:
            t0 = perf()
            fn()
            t1 = perf()
            samples.append(t1 - t0)
            n = len(samples)
            if n >= cfg.max_reps or (n >= min_reps and t1 - start >= cfg.budget):
                break
    return _timing(samples, warm)


def measure_alternating(fns: Sequence[Callable[[], object]], cfg: TimingConfig) -> tuple[Timing, ...]:
    """Time the calls ``fns`` in turn, call for call, for ``len(fns)`` times the budget: their
    medians come from the same seconds, so a change of the machine's speed during the batch
    (this machine's memory changes state every few seconds) reaches all of them alike. The
    first of ``fns`` sets the number of repetitions (``min_reps`` / budget / ``max_reps``).
    Returns one Timing per call, in the order given."""
    perf = time.perf_counter
    with _batch(cfg):
        for _ in range(cfg.warmup):
            for f in fns:
                f()
        samples: tuple[list[float], ...] = tuple([] for _ in fns)
        start = perf()
        while True:
            for f, out in zip(fns, samples):
                t0 = perf()
                f()
                out.append(perf() - t0)
            n = len(samples[0])
            if n >= cfg.max_reps or (n >= cfg.min_reps and perf() - start >= len(fns) * cfg.budget):
                break
    return tuple(_timing(s, cfg.warmup) for s in samples)


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"
