"""The 16-bit section of ``python -m pybn bench``: bfloat16 and float16 activations.

Cells (:mod:`.table`): batch norm (infer, train, backward) on A, A' and L and the dropout
forward on A, for each 16-bit dtype, with float32 weight, bias and statistics (PyTorch's
mixed mode; docs/dtypes.md). Each cell times, call for call in turn in one batch
(:func:`timing.measure_alternating`), pybn on the 16-bit arrays, pybn on the float32 arrays of
the same shape, and the bound's probe over the 16-bit arrays' bytes (the probe reads x's own
buffer, viewed as float32); torch's same-dtype kernel is timed in a batch of its own (its
OpenMP runtime is not interleaved with pybn's), in every round. Every result is checked against
a float64 reference before it is timed (docs/benchmark.md, "16-bit").
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable

import numpy as np

from .._checks import finfo, float_dtype
from . import dropout_bench
from .batchnorm_calls import Runner, torch_array, torch_tensor
from .probe import Prober
from .reference import Case, as_dtype, make_case
from .schema import Cell, Context, Kernel, Result, WrongResult
from .shapes import Shape
from .timing import Timing, fmt_time, measure, measure_alternating

DTYPES = ("bfloat16", "float16")

# Targets (docs/benchmark.md, "16-bit"): as float32 in every cell, a speed-up over float32
# where the arrays are past the cache, and faster than torch's kernel of the same dtype.
TARGET_PCT_BOUND = 80.0
TARGET_X_FLOAT32 = 1.6
TARGET_X_FLOAT32_SHAPES = ("L",)
TARGET_X_TORCH = 1.0


def unavailable(dtype: str) -> str | None:
    """Why ``dtype``'s rows cannot run here, or None."""
    if float_dtype(dtype) is None:  # bfloat16 without ml_dtypes
        return "bfloat16 needs ml_dtypes (pip install ml_dtypes)"
    return None


@dataclass(frozen=True)
class HalfShape:
    """A benchmark shape with its activations stored in a 16-bit dtype."""

    base: Shape
    dtype: str

    @property
    def name(self) -> str:   # the base shape's, so that A-only implementations run on A
        return self.base.name

    @property
    def out(self) -> bool:
        return self.base.out


def bytes_as_float32(a: np.ndarray) -> np.ndarray:
    """The buffer of a contiguous 16-bit array, as float32 (no copy): the probe reads the very
    bytes the kernel reads. The values are finite (the high half of each float32 is a finite
    16-bit value's bits: a bfloat16's exponent, or a float16's below 2**8)."""
    if not a.flags.c_contiguous or a.dtype.itemsize != 2 or a.size % 2:
        raise ValueError(f"a: a C-contiguous 16-bit array of even size is needed, got {a.dtype} {a.shape}")
    return a.reshape(-1).view(np.float32)


# ----------------------------------------------------------------------------- cases

class ShapeCases:
    """The float32 data of one shape (shared by both dtypes), made when first asked for."""

    def __init__(self, shape: Shape, seed: int):
        self.shape, self.seed = shape, seed

    @cached_property
    def batch_norm(self) -> Case:
        return make_case(self.shape, seed=self.seed, need_backward=True)

    @cached_property
    def dropout(self) -> dropout_bench.DropoutCase:
        return dropout_bench.make_case(self.shape)


class HalfCase:
    """One shape in one 16-bit dtype: its 16-bit data, the float32 twin, and the probes over
    the 16-bit bytes, made when first asked for."""

    def __init__(self, cases: ShapeCases, dtype: np.dtype):
        self.cases, self.dtype = cases, dtype
        self._probers: dict[str, Prober] = {}

    @property
    def float32(self) -> Case:
        return self.cases.batch_norm

    @cached_property
    def half(self) -> Case:
        return as_dtype(self.cases.batch_norm, self.dtype)

    @property
    def dropout32(self) -> dropout_bench.DropoutCase:
        return self.cases.dropout

    @cached_property
    def dropout16(self) -> dropout_bench.DropoutCase:
        from pybn._checks import round_to

        case = self.cases.dropout
        x = case.x.astype(self.dtype)
        kept = np.where(case.keep, x.astype(np.float64) * float(case.scale), 0.0)
        return replace(case, x=x, y=np.empty_like(x), expected=round_to(kept, self.dtype))

    def prober(self, kind: str) -> Prober:
        """The probe over the bytes of the 16-bit x of ``kind`` ("batch norm" or "dropout")."""
        if kind not in self._probers:
            x = self.half.x if kind == "batch norm" else self.dropout16.x
            self._probers[kind] = Prober(bytes_as_float32(x))
        return self._probers[kind]

    def close(self) -> None:
        for p in self._probers.values():
            p.close()
        self._probers.clear()


# ----------------------------------------------------------------------------- the calls

@dataclass(frozen=True)
class Checked:
    """A timed call, the check of its result (raises WrongResult; returns the worst error
    over the tolerance where it has one) and the exact call, for the JSON."""

    call: Callable[[], Any]
    check: Callable[[Any], float | None]
    label: str = ""


HalfMake = Callable[[HalfCase, int], Checked]


def on_case(make: Callable[[Case, int], Runner], check: Callable[..., float], which: str) -> HalfMake:
    """A batch-norm call of :mod:`.batchnorm_calls` on the 16-bit case (``which="half"``) or
    its float32 twin (``"float32"``), checked against that case's float64 reference."""
    def checked(hc: HalfCase, threads: int) -> Checked:
        case: Case = getattr(hc, which)
        runner = make(case, threads)
        runner.reset()
        state = runner.state

        def check_result(ret: Any) -> float:
            return check(case, runner.outputs(ret), state() if state is not None else None)

        # (check_result holds the runner, and with it what its calls need alive)
        return Checked(runner.call, check_result, runner.label)

    return checked


def pybn_dropout(hc: HalfCase, threads: int) -> Checked:
    return _dropout_pybn(hc.dropout16)


def float32_dropout(hc: HalfCase, threads: int) -> Checked:
    return _dropout_pybn(hc.dropout32)


def _dropout_pybn(case: dropout_bench.DropoutCase) -> Checked:
    import pybn

    x, y, p, seed = case.x, case.y, dropout_bench.P, dropout_bench.SEED

    def check(r: Any) -> None:
        r = np.asarray(r)
        if r.dtype != x.dtype or not np.array_equal(r.astype(np.float32), case.expected.astype(np.float32)):
            raise WrongResult(f"pybn.dropout on {x.dtype}: not x * scale rounded once where its mask keeps, "
                              "0 elsewhere")

    return Checked(lambda: pybn.dropout(x, p, seed=seed, out=y), check, "pybn.dropout(x, p, seed=, out=y)")


def torch_dropout(hc: HalfCase, threads: int) -> Checked:
    import torch

    case = hc.dropout16
    xt, drop = torch_tensor(torch, case.x), torch.nn.Dropout(dropout_bench.P).train()
    return Checked(lambda: drop(xt), lambda r: _check_dropped(case, r), "torch.nn.Dropout(p).train()(x)")


def torch_native_dropout(hc: HalfCase, threads: int) -> Checked:
    import torch

    case = hc.dropout16
    xt, native = torch_tensor(torch, case.x), torch.ops.aten.native_dropout
    return Checked(lambda: native(xt, dropout_bench.P, True), lambda r: _check_dropped(case, r[0]),
                   "torch.ops.aten.native_dropout(x, p, True)")


def _check_dropped(case: dropout_bench.DropoutCase, result: Any) -> None:
    """A dropout with a mask of its own: of x's dtype, kept values within one unit in the
    last place of x * 1 / (1 - p), the kept fraction right."""
    y = torch_array(result)
    if y.dtype != case.x.dtype:
        raise WrongResult(f"torch dropout returned {y.dtype} for {case.x.dtype}")
    y64 = y.astype(np.float64)
    kept = y64 != 0
    exact = case.x.astype(np.float64)[kept] * float(case.scale)
    ulp = float(finfo(case.x.dtype).eps)
    if not np.all(np.abs(y64[kept] - exact) <= ulp * np.abs(exact)):
        raise WrongResult(f"torch dropout on {case.x.dtype} scales the kept values wrongly")
    dropout_bench.check_fraction(f"torch dropout on {case.x.dtype}", kept)


# ----------------------------------------------------------------------------- results

@dataclass
class Row:
    """One cell's measurements."""

    cell: Cell[HalfShape, HalfMake]
    probe_kind: str                            # the probe's array: "batch norm" or "dropout" x
    probe_bytes: int = 0
    pybn: Timing | None = None                 # pybn on the 16-bit arrays, its best round
    float32: Timing | None = None              # pybn on float32, from the same round
    probe: tuple[Timing, ...] = ()             # the bound's probe calls, from the same round
    bound_s: float | None = None
    torch: dict[str, Timing] = field(default_factory=dict)   # torch variant -> its best round
    rounds: list[Result] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    check_err: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return self.cell.shape.name

    @property
    def dtype(self) -> str:
        return self.cell.shape.dtype

    @property
    def pybn_s(self) -> float | None:
        return self.pybn.median if self.pybn is not None else None

    @property
    def pct_of_bound(self) -> float | None:
        t = self.pybn_s
        return None if t is None or self.bound_s is None else self.bound_s / t * 100

    @property
    def x_float32(self) -> float | None:
        t = self.pybn_s
        return None if t is None or self.float32 is None else self.float32.median / t

    @property
    def torch_variant(self) -> str | None:
        return min(self.torch, key=lambda k: self.torch[k].median) if self.torch else None

    @property
    def torch_s(self) -> float | None:
        v = self.torch_variant
        return self.torch[v].median if v is not None else None

    @property
    def x_torch(self) -> float | None:
        t, tt = self.pybn_s, self.torch_s
        return None if t is None or tt is None else tt / t

    def misses(self) -> list[str]:
        """Why this row misses a target ([] when it meets them all, or has nothing to judge)."""
        if "pybn" in self.errors:
            return ["pybn result WRONG"]
        out = []
        pct, xf, xt = self.pct_of_bound, self.x_float32, self.x_torch
        if pct is not None and pct < TARGET_PCT_BOUND:
            out.append(f"{pct:.0f}% of bound < {TARGET_PCT_BOUND:.0f}%")
        if self.shape in TARGET_X_FLOAT32_SHAPES and xf is not None and xf < TARGET_X_FLOAT32:
            out.append(f"{xf:.2f}x pybn float32 < {TARGET_X_FLOAT32:.1f}x")
        if xt is not None and xt <= TARGET_X_TORCH:
            out.append(f"not faster than torch ({xt:.2f}x)")
        return out

    def as_dict(self) -> Result:
        bound = self.cell.bound
        return {"shape": self.shape, "dtype": self.dtype, "kernel": self.cell.kernel.name,
                "bound_formula": bound.formula if bound is not None else None, "bound_s": self.bound_s,
                "probe_bytes": self.probe_bytes, "pybn_s": self.pybn_s, "pct_of_bound": self.pct_of_bound,
                "float32_s": self.float32.median if self.float32 is not None else None,
                "x_float32": self.x_float32, "torch_s": self.torch_s, "torch_variant": self.torch_variant,
                "x_torch": self.x_torch, "misses": self.misses(), "meets_target": not self.misses(),
                "timings": {"pybn": _as_dict(self.pybn), "float32": _as_dict(self.float32),
                            "probe": [t.as_dict(samples=False) for t in self.probe],
                            **{k: t.as_dict(samples=False) for k, t in self.torch.items()}},
                "rounds": self.rounds, "calls": self.calls, "errors": self.errors,
                "check_worst_err_over_tol": self.check_err}


def _as_dict(t: Timing | None) -> Result | None:
    return t.as_dict(samples=False) if t is not None else None


# ----------------------------------------------------------------------------- the section

HalfCell = Cell[HalfShape, HalfMake]


def kind(kernel: Kernel[HalfMake]) -> str:
    return "dropout" if kernel.name == "dropout" else "batch norm"


def run(cells: Sequence[HalfCell], ctx: Context) -> Result:
    """Time ``cells`` (grouped by shape, then dtype, in the order given); one row per cell."""
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for base, by_shape in itertools.groupby(cells, key=lambda c: c.shape.base):
        cases = ShapeCases(base, ctx.seed)
        for dtype, group in itertools.groupby(by_shape, key=lambda c: c.shape.dtype):
            why = unavailable(dtype)
            if why is not None:
                if dtype not in skipped:
                    ctx.progress(f"16-bit {dtype}: skipped, {why}")
                skipped[dtype] = why
                continue
            np_dtype = float_dtype(dtype)
            assert np_dtype is not None
            hc = HalfCase(cases, np_dtype)
            for cell in group:
                rows.append(_run_cell(cell, hc, ctx))
                ctx.progress(_progress_line(rows[-1]))
            hc.close()
            del hc
        del cases
    return {"dtypes": list(dict.fromkeys(c.shape.dtype for c in cells)), "skipped": skipped,
            "threads": ctx.threads, "rows": rows}


def _make(row: Row, key: str, make: HalfMake, hc: HalfCase, ctx: Context) -> Checked | None:
    """The call ``key``, its result checked once; None (the reason in ``row.errors``) when it fails."""
    try:
        checked = make(hc, ctx.threads)
        row.calls[key] = checked.label
        err = checked.check(checked.call())
    except WrongResult as e:
        row.errors[key] = f"wrong result: {e}"
    except Exception as e:  # noqa: BLE001 - a failing implementation is reported, not fatal
        row.errors[key] = f"raised {type(e).__name__}: {e}"
    else:
        if err is not None:
            row.check_err[key] = err
        return checked
    ctx.progress(f"ERROR: {key} {row.cell.kernel.title} on {row.shape} {row.dtype}: {row.errors[key]}")
    return None


def _run_cell(cell: HalfCell, hc: HalfCase, ctx: Context) -> Row:
    kernel, bound = cell.kernel, cell.bound
    assert bound is not None
    row = Row(cell, kind(kernel))
    prober = hc.prober(row.probe_kind)
    row.probe_bytes = prober.src.nbytes
    half = _make(row, "pybn", kernel.pybn.make, hc, ctx)
    float32 = _make(row, "float32", kernel.variants("float32")[0].make, hc, ctx)
    torch = {i.key: c for i in cell.impls(ctx.peers) if i.peer == "torch"
             and (c := _make(row, i.key, i.make, hc, ctx)) is not None}
    probe_calls = prober.calls(bound)
    for _ in range(ctx.rounds):
        # pybn 16-bit, pybn float32 and the probe over the 16-bit bytes, call for call: the
        # three medians come from the same seconds (docs/benchmark.md, "The bound")
        calls = tuple(c.call for c in (half, float32) if c is not None)
        timed = measure_alternating(calls + probe_calls, ctx.cfg) if calls else ()
        it = iter(timed)
        t16 = next(it) if half is not None else None
        t32 = next(it) if float32 is not None else None
        probe = tuple(it)
        record: Result = {"pybn": _as_dict(t16), "float32": _as_dict(t32),
                          "probe": [t.as_dict(samples=False) for t in probe]}
        for key, checked in torch.items():   # torch in its own batch: its OpenMP runtime stays apart
            t = measure(checked.call, ctx.cfg)
            record[key] = t.as_dict(samples=False)
            if key not in row.torch or t.median < row.torch[key].median:
                row.torch[key] = t
        row.rounds.append(record)
        # the round of pybn's best median (of float32's, if pybn gave no time) gives every figure
        lead, best = t16 or t32, row.pybn or row.float32
        if lead is not None and (best is None or lead.median < best.median):
            row.pybn, row.float32, row.probe = t16, t32, probe
            row.bound_s = Prober.seconds(bound, probe)
    return row


def _progress_line(row: Row) -> str:
    parts = [f"pybn {fmt_time(row.pybn_s)}" if "pybn" not in row.errors else "pybn WRONG",
             f"float32 {fmt_time(row.float32.median if row.float32 else None)}",
             f"torch {fmt_time(row.torch_s)}", f"bound {fmt_time(row.bound_s)}"]
    pct = row.pct_of_bound
    return (f"16-bit {row.shape:<2} {row.dtype:<8} {row.cell.kernel.name:<8} " + " | ".join(parts)
            + (f", {pct:.0f}%" if pct is not None else ""))


def failures(result: Result) -> list[str]:
    """Every implementation that returned a wrong result or raised, with the reason."""
    return [f"16-bit {r.shape} {r.dtype} {r.cell.kernel.title} {k}: {v}" for r in result["rows"]
            for k, v in r.errors.items()]


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render(result: Result, meta: Result | None = None) -> str:
    th = result["threads"]
    lines = [f"16-bit: x (and dy) bfloat16 / float16, float32 weight, bias and statistics, {th} thread"
             f"{'s' if th != 1 else ''}; bound = the probe over the 16-bit arrays' bytes, timed call for call "
             "with pybn 16-bit and pybn float32; x f32 = pybn float32 / pybn 16-bit (same round); "
             "x torch = torch same dtype / pybn 16-bit",
             f"targets: >= {TARGET_PCT_BOUND:.0f}% of bound in every cell; >= {TARGET_X_FLOAT32:.1f}x pybn float32 "
             f"on {', '.join(TARGET_X_FLOAT32_SHAPES)}; faster than torch (x torch > 1)"]
    for dtype, why in result["skipped"].items():
        lines.append(f"{dtype}: skipped, {why}")
    cols = (f"{'shape':<5} {'dtype':<8} {'kernel':<8} {'pybn':>10} {'bound':>10} {'%bound':>6} "
            f"{'float32':>10} {'x f32':>6} {'torch':>10} {'x torch':>7} ok")
    lines += [cols, "-" * len(cols)]
    missed = []
    for r in result["rows"]:
        m = r.misses()
        if m:
            missed.append((r, m))
        pct = r.pct_of_bound
        lines.append(" ".join([
            f"{r.shape:<5}", f"{r.dtype:<8}", f"{r.cell.kernel.label:<8}",
            f"{'WRONG' if 'pybn' in r.errors else fmt_time(r.pybn_s):>10}", f"{fmt_time(r.bound_s):>10}",
            f"{'-' if pct is None else f'{pct:.0f}%':>6}",
            f"{'WRONG' if 'float32' in r.errors else fmt_time(r.float32.median if r.float32 else None):>10}",
            f"{_x(r.x_float32):>6}", f"{_torch_cell(r):>10}", f"{_x(r.x_torch):>7}", "MISS" if m else "ok"]))
    lines.append(f"targets met in {len(result['rows']) - len(missed)} of {len(result['rows'])} rows")
    for r, m in missed:
        lines.append(f"  MISS {r.shape} {r.dtype} {r.cell.kernel.title}: " + "; ".join(m))
    wrong = failures(result)
    if wrong:
        lines += ["WRONG RESULTS OR ERRORS (not timed):"] + [f"  {w}" for w in wrong]
    return "\n".join(lines)


def _torch_cell(r: Row) -> str:
    if r.torch_s is None and any(k not in ("pybn", "float32") for k in r.errors):
        return "WRONG"
    return fmt_time(r.torch_s)


def to_json(result: Result) -> Result:
    return {"dtypes": result["dtypes"], "skipped": result["skipped"], "threads": result["threads"],
            "targets": {"pct_of_bound": TARGET_PCT_BOUND, "x_float32": TARGET_X_FLOAT32,
                        "x_float32_shapes": list(TARGET_X_FLOAT32_SHAPES), "x_torch_above": TARGET_X_TORCH},
            "rows": [r.as_dict() for r in result["rows"]]}

