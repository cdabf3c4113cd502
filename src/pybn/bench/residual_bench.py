"""The fused-residual section of ``python -m pybn bench``: a ResNet block's tail in one pass.

Cells (:mod:`.table`): ``relu(bn(x) + r)`` in training mode (batch statistics, running
statistics updated) and in inference mode, on float32 x and r of one shape, outputs
preallocated, the same arrays for everyone, each result checked (against a NumPy float64
statistics / float32 composite) before it is timed. The bound is ``t_read + t_stream``
(the pass reads x and r, writes y), pybn's probe on the same array; pybn is timed call for
call in turn with it, in every round. Against: pybn unfused (the batch norm, then NumPy's
``add`` and ``maximum`` in place: three passes) and torch (``F.batch_norm``, then ``+ r``
and ``relu``; and the same with ``add_`` / ``relu_`` in place: the faster is reported),
one round each.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .probe import Prober
from .report import rows_with_peers
from .reference import EPS, MOMENTUM
from .schema import Bound, Cell, Context, Result, Timed, WrongResult
from .shapes import Shape
from .timing import fmt_time, measure, measure_alternating

RTOL = ATOL = 1e-4


@dataclass
class ResidualCase:
    """The arrays of one shape, made once and shared by every implementation."""

    shape: Shape
    x: np.ndarray
    r: np.ndarray
    y: np.ndarray                 # the preallocated output
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray      # initial running statistics (each call works on a copy's copy)
    running_var: np.ndarray
    expected: dict[str, np.ndarray]   # kernel name -> relu(bn(x) + r)


def make_case(shape: Shape) -> ResidualCase:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape.array_shape, dtype=np.float32)
    r = rng.standard_normal(shape.array_shape, dtype=np.float32)
    c = shape.channels
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm = rng.standard_normal(c).astype(np.float32) * np.float32(0.1)
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    axis = shape.axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    mean = np.mean(x, axis=axes, dtype=np.float64)
    var = np.var(x, axis=axes, dtype=np.float64)
    expected = {"train": _composite(x, r, w, b, mean, var, axis), "infer": _composite(x, r, w, b, rm, rv, axis)}
    return ResidualCase(shape, x, r, np.empty_like(x), w, b, rm, rv, expected)


def _composite(x: np.ndarray, r: np.ndarray, w: np.ndarray, b: np.ndarray, mean: Any, var: Any,
               axis: int) -> np.ndarray:
    """relu((x - mean) * invstd * w + b + r), coefficients in float64, the pass in float32."""
    shape = [1] * x.ndim
    shape[axis] = -1
    alpha = (w / np.sqrt(np.asarray(var, np.float64) + EPS)).astype(np.float32).reshape(shape)
    y = (x - np.asarray(mean, np.float32).reshape(shape)) * alpha
    y += b.reshape(shape)
    y += r
    out: np.ndarray = np.maximum(y, 0, out=y)
    return out


def _check(what: str, got: Any, want: np.ndarray) -> None:
    if not np.allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL):
        raise WrongResult(f"residual bench: {what} differs from relu(bn(x) + r)")


# ----------------------------------------------------------------------------- pybn

def _running(case: ResidualCase) -> tuple[np.ndarray, np.ndarray]:
    return case.running_mean.copy(), case.running_var.copy()


def pybn_train(case: ResidualCase) -> Timed:
    import pybn

    x, r, y, w, b, axis = case.x, case.r, case.y, case.weight, case.bias, case.shape.axis
    rm, rv = _running(case)
    return Timed(lambda: pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=MOMENTUM, eps=EPS,
                                               axis=axis, relu=True, residual=r, out=y).y,
                 lambda got: _check("pybn.batch_norm_train(residual=, relu=True)", got, case.expected["train"]))


def pybn_infer(case: ResidualCase) -> Timed:
    import pybn

    x, r, y, w, b, axis = case.x, case.r, case.y, case.weight, case.bias, case.shape.axis
    rm, rv = case.running_mean, case.running_var
    return Timed(lambda: pybn.batch_norm_infer(x, rm, rv, w, b, eps=EPS, axis=axis, relu=True, residual=r, out=y),
                 lambda got: _check("pybn.batch_norm_infer(residual=, relu=True)", got, case.expected["infer"]))


def _add_relu_in_place(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    np.add(y, r, out=y)
    out: np.ndarray = np.maximum(y, 0, out=y)
    return out


def unfused_train(case: ResidualCase) -> Timed:
    import pybn

    x, r, y, w, b, axis = case.x, case.r, case.y, case.weight, case.bias, case.shape.axis
    rm, rv = _running(case)

    def call() -> np.ndarray:
        pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=MOMENTUM, eps=EPS, axis=axis, out=y)
        return _add_relu_in_place(y, r)

    return Timed(call, lambda got: _check("pybn unfused (train)", got, case.expected["train"]))


def unfused_infer(case: ResidualCase) -> Timed:
    import pybn

    x, r, y, w, b, axis = case.x, case.r, case.y, case.weight, case.bias, case.shape.axis
    rm, rv = case.running_mean, case.running_var

    def call() -> np.ndarray:
        pybn.batch_norm_infer(x, rm, rv, w, b, eps=EPS, axis=axis, out=y)
        return _add_relu_in_place(y, r)

    return Timed(call, lambda got: _check("pybn unfused (infer)", got, case.expected["infer"]))


# ----------------------------------------------------------------------------- torch

def _torch_tail(case: ResidualCase, kernel: str, in_place: bool) -> Timed:
    import torch
    import torch.nn.functional as F

    def logical(a: np.ndarray) -> Any:  # the NCHW-logical tensor over the array's memory
        t = torch.from_numpy(a)
        return t.movedim(-1, 1) if case.shape.channels_last else t

    x, r = logical(case.x), logical(case.r)
    w, b = torch.from_numpy(case.weight), torch.from_numpy(case.bias)
    training = kernel == "train"
    rm_np, rv_np = _running(case)
    rm, rv = torch.from_numpy(rm_np), torch.from_numpy(rv_np)

    def call() -> Any:
        y = F.batch_norm(x, rm, rv, w, b, training=training, momentum=MOMENTUM, eps=EPS)
        return y.add_(r).relu_() if in_place else torch.relu(y + r)

    def check(got: Any) -> None:
        arr = got.movedim(1, -1).numpy() if case.shape.channels_last else got.numpy()
        _check(f"torch ({kernel}{', in place' if in_place else ''})", arr, case.expected[kernel])

    return Timed(call, check)


def torch_composite(kernel: str) -> Callable[[ResidualCase], Timed]:
    return lambda case: _torch_tail(case, kernel, False)


def torch_in_place(kernel: str) -> Callable[[ResidualCase], Timed]:
    return lambda case: _torch_tail(case, kernel, True)


# ----------------------------------------------------------------------------- the section

ResidualCell = Cell[Shape, Callable[[ResidualCase], Timed]]


def _checked(timed: Timed) -> Timed:
    timed.check(timed.call())
    return timed


def run(cells: Sequence[ResidualCell], ctx: Context) -> Result:
    """Time ``cells`` (grouped by shape, in the order given); one row per cell."""
    shapes: dict[str, Any] = {}
    for shape, group in itertools.groupby(cells, key=lambda c: c.shape):
        case = make_case(shape)
        prober = Prober(case.x)
        shapes[shape.name] = {"shape": list(shape.array_shape), "layout": shape.layout,
                              "rows": {cell.kernel.name: _run_cell(cell, case, prober, ctx) for cell in group}}
        prober.close()
        del case, prober
    peers = dict.fromkeys(p.name for c in cells for p in c.peers)
    return {"peers": list(peers), "shapes": shapes}


def _reads_x_twice(cell: ResidualCell) -> bool:
    """Training on channels-last x past the L3: every row's statistics come before any
    output, so x is read from memory twice (docs/performance.md, "Each layout's floor")."""
    from pybn._C import cache_sizes

    return cell.kernel.name == "train" and cell.shape.channels_last and cell.shape.nbytes > cache_sizes()[1]


def _run_cell(cell: ResidualCell, case: ResidualCase, prober: Prober, ctx: Context) -> Result:
    # pybn and the bound call for call; the round with pybn's best median is reported, with the
    # bound's median from the same round
    assert cell.bound is not None
    pybn = _checked(cell.kernel.pybn.make(case))
    paired = [measure_alternating((pybn.call, *prober.calls(cell.bound)), ctx.cfg) for _ in range(ctx.rounds)]
    # the floor: the bound, with x's second read from memory where it cannot come from the cache
    floor_bytes = Bound(cell.bound.reads + 1, cell.bound.streams) if _reads_x_twice(cell) else cell.bound
    t, bound, floor = min((p[0].median, prober.seconds(cell.bound, p[1:]), prober.seconds(floor_bytes, p[1:]))
                          for p in paired)
    row: Result = {"pybn_s": t, "bound_s": bound, "floor_s": floor, "peers": {}}
    name = f"residual {cell.shape.name:<3} {cell.kernel.name:<6}"
    ctx.progress(f"{name} pybn {fmt_time(t)} | bound {fmt_time(bound)}")
    for peer in (p for p in cell.peers if ctx.uses(p)):
        timed = {v.key: measure(_checked(v.make(case)).call, ctx.cfg).median
                 for v in cell.kernel.variants(peer.name, cell.shape)}
        fastest = min(timed, key=lambda k: timed[k])
        row["peers"][peer.name] = timed[fastest]
        row[f"{peer.name}_variant"] = fastest
        ctx.progress(f"{name} {fastest} {fmt_time(timed[fastest])}")
    return row


PEER_TITLES = {"numpy": "unfused", "torch": "torch"}


def render(result: Result, meta: Result | None = None) -> str:
    lines = ["fused residual: y = relu(bn(x) + r), x and r float32, out= preallocated; bound = t_read + t_stream "
             "(reads x and r, writes y; timed call for call in turn with pybn's); floor: the bound, plus t_read where "
             "x is read twice (training on channels-last x past the L3); x = other time / pybn time",
             f"{'shape':<5} {'kernel':<6} {'pybn':>10} {'bound':>10} {'% bound':>7} {'% floor':>7}"
             + "".join(f" {PEER_TITLES.get(peer, peer):>11} {'x':>6}" for peer in result["peers"])]

    def first_cells(shape_name: str, name: str, r: Result) -> list[str]:
        t, b = r["pybn_s"], r["bound_s"]
        return [f"{shape_name:<5}", f"{name:<6}", f"{fmt_time(t):>10}", f"{fmt_time(b):>10}",
                f"{b / t * 100:>6.0f}%", f"{r.get('floor_s', b) / t * 100:>6.0f}%"]

    lines += rows_with_peers(result, first_cells)
    lines.append("pybn: pybn.batch_norm_train / batch_norm_infer(x, ..., relu=True, residual=r, out=y), one pass;"
                 " unfused: the same call without residual, then np.add(y, r, out=y), np.maximum(y, 0, out=y);"
                 " torch: relu(F.batch_norm(x, ...) + r), or F.batch_norm(...).add_(r).relu_() (faster shown).")
    return "\n".join(lines)
