"""The batch-norm section: every (shape, kernel) cell, pybn and each peer in its own batch,
rounds in turn, the bound's probe timed call for call with pybn (docs/benchmark.md)."""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Sequence
from typing import Any, Callable

from .batchnorm_calls import Runner
from .probe import Prober, summarize
from .reference import Case, make_case
from .report import CellResult
from .schema import Cell, Context, Impl, Result, Unavailable, WrongResult
from .shapes import Shape
from .timing import Timing, fmt_time, measure, measure_alternating

BatchNormCell = Cell[Shape, Callable[[Case, int], Runner]]


def run(cells: Sequence[BatchNormCell], ctx: Context) -> Result:
    """Time ``cells`` (grouped by shape, in the order given). Returns the probe summary per
    shape and a :class:`CellResult` per cell."""
    probes: dict[str, Any] = {}
    results: list[CellResult] = []
    for shape, group in itertools.groupby(cells, key=lambda c: c.shape):
        shape_cells = list(group)
        t_shape = time.perf_counter()
        case = make_case(shape, seed=ctx.seed, need_backward=any(c.kernel.needs_dy for c in shape_cells))
        prober = Prober(case.x)
        ctx.progress(f"{shape.name:<3} {shape.describe()}: data, float64 reference and probe check "
                     f"{time.perf_counter() - t_shape:.1f} s")
        for cell in shape_cells:
            t_cell = time.perf_counter()
            result = _run_cell(cell, case, prober, ctx)
            results.append(result)
            ctx.progress(_progress_line(result, len(results), len(cells), time.perf_counter() - t_cell))
        probes[shape.name] = summarize(prober.history)
        prober.close()
        del case, prober
        gc.collect()
    return {"probe": probes, "cells": results}


def _run_cell(cell: BatchNormCell, case: Case, prober: Prober, ctx: Context) -> CellResult:
    result = CellResult(spec=cell, bound=float("nan"))
    impls = cell.impls(ctx.peers)
    paired = []   # (pybn's median, the probe timed with it), per round
    for round_ in range(ctx.rounds):
        for impl in impls:
            if impl.peer == "pybn":
                # The bound's probes are timed call for call with pybn's kernel, so all
                # three medians come from the same seconds of a machine whose memory
                # changes speed every few seconds (docs/benchmark.md, "The bound").
                timing, probe = _run_impl(result, impl, case, ctx, round_, alongside=prober.calls())
                if timing is not None:
                    paired.append((timing.median, prober.record(*probe)))
            else:
                _run_impl(result, impl, case, ctx, round_)
            # (no gc.collect() here: with torch loaded it costs ~70 ms; arrays are freed
            # by reference counting as soon as a runner goes)
    result.probe_rounds = [p for _, p in paired]
    # the bound from the probe of pybn's best round (alone, if pybn gave no time)
    result.probe = (min(paired, key=lambda p: p[0])[1] if paired
                    else prober.record(*measure_alternating(prober.calls(), ctx.cfg)))
    assert cell.bound is not None
    result.bound = result.probe.bound(cell.bound)
    if cell.kernel.one_pass is not None:
        result.one_pass = result.probe.bound(cell.kernel.one_pass)
    result.order = [i.key for i in impls]
    return result


def _fail(result: CellResult, impl: Impl[Any], what: str, said: str, ctx: Context) -> None:
    """Record why ``impl`` has no time (``what``) and say so on the progress stream."""
    result.errors[impl.key] = what
    ctx.progress(f"ERROR: {impl.key} {result.spec.kernel.title} on {result.shape.name}{said}")


def _run_impl(result: CellResult, impl: Impl[Callable[[Case, int], Runner]], case: Case, ctx: Context, round_: int,
              alongside: tuple[Callable[[], object], ...] = ()) -> tuple[Timing | None, tuple[Timing, ...]]:
    """One timing round of one implementation, in its own batch; the calls ``alongside`` (the
    probe's) are timed call for call with it. Returns its Timing and theirs, or None and ().

    Round 0 first checks the result of one call against the float64 reference (that call is
    the first warm-up call); a wrong result is reported and never timed.
    """
    key = impl.key
    if key in result.errors or key in result.skipped:
        return None, ()
    try:
        runner = impl.make(case, ctx.threads)
    except Unavailable as e:
        result.skipped[key] = str(e)
        return None, ()
    except Exception as e:  # noqa: BLE001 - a failing implementation is reported, not fatal
        what = f"setup raised {type(e).__name__}: {e}"
        _fail(result, impl, what, f": {what}", ctx)
        return None, ()
    result.labels[key] = runner.label
    try:
        dt = _first_call(result, impl, runner, case, check=round_ == 0)
    except WrongResult as e:
        _fail(result, impl, f"wrong result: {e}", f" is WRONG: {e}", ctx)
        return None, ()
    except Exception as e:  # noqa: BLE001
        what = f"raised {type(e).__name__}: {e}"
        _fail(result, impl, what, f" {what}", ctx)
        return None, ()
    try:
        if alongside:
            timing, *others = measure_alternating((runner.call, *alongside), ctx.cfg)
        else:
            timing, others = measure(runner.call, ctx.cfg, calls_done=1, last_call_s=dt), []
    except Exception as e:  # noqa: BLE001
        what = f"raised {type(e).__name__} while timed: {e}"
        _fail(result, impl, what, f" {what}", ctx)
        return None, ()
    result.rounds.setdefault(key, []).append(timing)
    best = result.times.get(key)
    if best is None or timing.median < best.median:
        result.times[key] = timing
    del runner
    return timing, tuple(others)


def _first_call(result: CellResult, impl: Impl[Any], runner: Runner, case: Case, check: bool) -> float:
    """The first (warm-up) call, checked against the reference when ``check``; returns its time."""
    runner.reset()
    t0 = time.perf_counter()
    ret = runner.call()
    dt = time.perf_counter() - t0
    if check:
        assert result.spec.kernel.check is not None
        state = runner.state() if runner.state is not None else None
        result.check_err[impl.key] = result.spec.kernel.check(case, runner.outputs(ret), state)
    return dt


def _progress_line(result: CellResult, n: int, n_cells: int, seconds: float) -> str:
    parts = []
    for key in result.order:
        if key in result.times:
            parts.append(f"{key} {fmt_time(result.t(key))}")
        elif key in result.errors:
            parts.append(f"{key} WRONG")
    pct = result.pct_bound
    return (f"[{n:2d}/{n_cells}] {result.shape.name:<3} {result.spec.kernel.name:<8} "
            + " | ".join(parts)
            + f" | bound {fmt_time(result.bound)}"
            + (f", {pct:.0f}%" if pct is not None else "")
            + f"  ({seconds:.1f} s)")


def failures(result: Result) -> list[str]:
    """Every implementation that returned a wrong result or raised, with the reason."""
    return [f"{c.shape.name} {c.spec.kernel.title} {k}: {v}" for c in result["cells"] for k, v in c.errors.items()]
