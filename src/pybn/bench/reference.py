"""Benchmark data, its float64 reference, and the checks every result must pass.

All work here runs in chunks of the canonical ``(outer, C, inner)`` view, so
the float64 reference never materializes a float64 copy of a 100 MB array.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import finfo
from .schema import WrongResult
from .shapes import Shape

EPS = 1e-5
MOMENTUM = 0.1
RTOL = 1e-4          # float32 tolerance (float32 epsilon is 1.2e-7; a kernel sums ~1e5 terms)
ATOL = 1e-4          # data and outputs are O(1) by construction
SUM_TOL = 2e-6       # per-channel sums: |error| <= SUM_TOL * sum of |terms| + RTOL * |sum|
CHUNK = 1 << 19      # elements per reference chunk


def canonical(a: np.ndarray, axis: int) -> np.ndarray:
    """The ``(outer, C, inner)`` view of a C-contiguous array (a copy only if it is not)."""
    axis = axis % a.ndim
    outer = int(np.prod(a.shape[:axis], dtype=np.int64))
    inner = int(np.prod(a.shape[axis + 1:], dtype=np.int64))
    return np.ascontiguousarray(a).reshape(outer, a.shape[axis], inner)


def _chunks(*arrays3: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    outer, c, inner = arrays3[0].shape
    rows = max(1, CHUNK // max(1, c * inner))
    for r0 in range(0, outer, rows):
        yield tuple(a[r0:r0 + rows] for a in arrays3)


@dataclass
class Case:
    """The arrays of one shape, made once and shared by every implementation."""

    shape: Shape
    x: np.ndarray            # float32 (or a 16-bit dtype: as_dtype), shape.array_shape
    dy: np.ndarray | None    # x's dtype, for the backward kernel
    weight: np.ndarray       # float32 (C,)
    bias: np.ndarray
    running_mean: np.ndarray  # initial running statistics (each implementation works on copies)
    running_var: np.ndarray
    # float64 reference
    n: int                   # values per channel
    mean64: np.ndarray
    var64: np.ndarray
    # saved statistics fed to every backward implementation (float32, as a forward returns them)
    save_mean: np.ndarray
    save_invstd: np.ndarray
    dbias64: np.ndarray | None = None
    dweight64: np.ndarray | None = None
    dbias_l1: np.ndarray | None = None
    dweight_l1: np.ndarray | None = None

    @property
    def axis(self) -> int:
        return self.shape.axis

    @property
    def C(self) -> int:
        return self.shape.channels

    @property
    def rtol(self) -> float:
        """The relative tolerance of an output of x's dtype: RTOL, or one unit in the last
        place of a 16-bit dtype (every output is rounded once to it, docs/dtypes.md)."""
        return max(RTOL, float(finfo(self.x.dtype).eps))

    def reduce_axes(self) -> tuple[int, ...]:
        ax = self.axis % self.x.ndim
        return tuple(i for i in range(self.x.ndim) if i != ax)

    def bshape(self) -> tuple[int, ...]:
        """Shape that broadcasts a (C,) vector along the channel axis of x."""
        b = [1] * self.x.ndim
        b[self.axis % self.x.ndim] = self.C
        return tuple(b)


def _fill(rng: np.random.Generator, shape: tuple[int, ...], loc: np.ndarray, scale: np.ndarray,
          logical_axis: int = 1) -> np.ndarray:
    """float32 data of per-channel mean ``loc_c`` and standard deviation ``scale_c``
    (uniform, which NumPy draws about 6x faster than normal), in NCHW order."""
    a = rng.random(shape, dtype=np.float32)
    b = [1] * len(shape)
    b[logical_axis] = shape[logical_axis]
    half = np.float32(np.sqrt(3.0)) * scale          # U(loc - half, loc + half) has std = scale
    a *= (2 * half).reshape(b)
    a += (loc - half).reshape(b)
    return a


def make_case(shape: Shape, *, seed: int = 0, need_backward: bool = True) -> Case:
    """Random data for ``shape``; the channels-last shapes hold the same values as their NCHW twin."""
    rng = np.random.default_rng(seed)
    C = shape.channels
    loc = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, C).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, C).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    running_mean = (loc + rng.uniform(-0.1, 0.1, C)).astype(np.float32)
    running_var = (scale * scale * rng.uniform(0.8, 1.25, C)).astype(np.float32)
    data_rng = np.random.default_rng(seed + 1)

    def gen(loc_: np.ndarray, scale_: np.ndarray) -> np.ndarray:
        a = _fill(data_rng, tuple(shape.logical), loc_, scale_)
        if shape.channels_last:
            nhwc = np.ascontiguousarray(np.moveaxis(a, 1, -1))
            del a
            return nhwc
        return a

    x = gen(loc, scale)
    dy = gen(np.zeros(C, np.float32), np.ones(C, np.float32)) if need_backward else None
    return _referenced(shape, x, dy, weight, bias, running_mean, running_var)


def as_dtype(case: Case, dtype: Any) -> Case:
    """``case`` with x and dy rounded to ``dtype`` (a 16-bit one) and the float64 reference
    of the rounded data; parameters and statistics stay float32, as in PyTorch's mixed mode."""
    dy = case.dy.astype(dtype) if case.dy is not None else None
    return _referenced(case.shape, case.x.astype(dtype), dy, case.weight, case.bias, case.running_mean,
                       case.running_var)


def _referenced(shape: Shape, x: np.ndarray, dy: np.ndarray | None, weight: np.ndarray, bias: np.ndarray,
                running_mean: np.ndarray, running_var: np.ndarray) -> Case:
    """The case of these arrays, with its float64 reference computed from x and dy (whatever their dtype)."""
    C = shape.channels
    # float64 statistics, two passes (exact to float64 rounding)
    x3 = canonical(x, shape.axis)
    outer, _, inner = x3.shape
    n = outer * inner
    s = np.zeros(C)
    for (xc,) in _chunks(x3):
        s += xc.astype(np.float64).sum(axis=(0, 2))
    mean64 = s / n
    m64 = mean64.reshape(1, C, 1)
    ss = np.zeros(C)
    for (xc,) in _chunks(x3):
        d = xc.astype(np.float64)
        d -= m64
        d *= d
        ss += d.sum(axis=(0, 2))
    var64 = ss / n
    save_mean = mean64.astype(np.float32)
    save_invstd = (1.0 / np.sqrt(var64 + EPS)).astype(np.float32)
    case = Case(shape=shape, x=x, dy=dy, weight=weight, bias=bias,
                running_mean=running_mean, running_var=running_var, n=n,
                mean64=mean64, var64=var64, save_mean=save_mean, save_invstd=save_invstd)
    if dy is not None:
        dy3 = canonical(dy, shape.axis)
        sm = save_mean.astype(np.float64).reshape(1, C, 1)
        si = save_invstd.astype(np.float64)
        db = np.zeros(C)
        dbl1 = np.zeros(C)
        dw = np.zeros(C)
        dwl1 = np.zeros(C)
        for xc, gc in _chunks(x3, dy3):
            g = gc.astype(np.float64)
            db += g.sum(axis=(0, 2))
            dbl1 += np.abs(g).sum(axis=(0, 2))
            d = xc.astype(np.float64)
            d -= sm
            d *= g
            dw += d.sum(axis=(0, 2))
            dwl1 += np.abs(d).sum(axis=(0, 2))
        case.dbias64, case.dbias_l1 = db, dbl1
        case.dweight64, case.dweight_l1 = dw * si, dwl1 * si
    return case


# ----------------------------------------------------------------------------- checks

def _check_vec(what: str, got: Any, exp: np.ndarray, atol: Any, rtol: float = RTOL) -> float:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    exp = np.asarray(exp, dtype=np.float64)
    if got.shape != exp.shape:
        raise WrongResult(f"{what}: shape {got.shape}, expected {exp.shape}")
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), exp.shape)
    err = np.abs(got - exp)
    bad = ~(err <= atol + rtol * np.abs(exp))   # NaN counts as bad
    if bad.any():
        i = int(np.argmax(bad))
        raise WrongResult(f"{what}: {int(bad.sum())} of {exp.size} channels differ from the "
                          f"float64 reference, e.g. channel {i}: {got[i]!r} vs {exp[i]!r}")
    scale = np.maximum(atol + rtol * np.abs(exp), 1e-300)
    return float((err / scale).max()) if err.size else 0.0


def _check_affine(what: str, got: np.ndarray, case: Case, terms: list[tuple[np.ndarray, np.ndarray]],
                  const: np.ndarray) -> float:
    """Check ``got == sum_k coef_k[c] * arr_k + const[c]`` elementwise (float64 expectation)."""
    shp = case.x.shape
    if tuple(got.shape) != tuple(shp):
        raise WrongResult(f"{what}: shape {tuple(got.shape)}, expected {tuple(shp)}")
    if got.dtype != case.x.dtype:
        raise WrongResult(f"{what}: dtype {got.dtype}, expected {case.x.dtype}")
    C = case.C
    g3 = canonical(got, case.axis)
    arrs = [canonical(a, case.axis) for a, _ in terms]
    coefs = [np.asarray(c, np.float64).reshape(1, C, 1) for _, c in terms]
    const = np.asarray(const, np.float64).reshape(1, C, 1)
    worst = 0.0
    for chunk in _chunks(g3, *arrs):
        gc, parts = chunk[0], chunk[1:]
        exp = np.broadcast_to(const, gc.shape).copy()
        for a, c in zip(parts, coefs):
            exp += a.astype(np.float64) * c
        err = np.abs(gc.astype(np.float64) - exp)
        tol = ATOL + case.rtol * np.abs(exp)
        bad = ~(err <= tol)
        if bad.any():
            k = int(bad.sum())
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
            raise WrongResult(f"{what}: {k} elements in one chunk differ from the float64 "
                              f"reference, e.g. (outer, channel, inner)={idx}: "
                              f"{float(gc[idx])!r} vs {float(exp[idx])!r}")
        worst = max(worst, float((err / tol).max()))
    return worst


Arrays = dict[str, Any]


def check_infer(case: Case, outs: Arrays, state: Arrays | None = None) -> float:
    """Raise WrongResult unless ``outs`` matches the reference. Returns the worst error / tolerance."""
    w = case.weight.astype(np.float64)
    b = case.bias.astype(np.float64)
    a = w / np.sqrt(case.running_var.astype(np.float64) + EPS)
    c = b - case.running_mean.astype(np.float64) * a
    return _check_affine("y", outs["y"], case, [(case.x, a)], c)


def check_train(case: Case, outs: Arrays, state: Arrays | None = None) -> float:
    """Raise WrongResult unless ``outs`` (and the running statistics ``state``) match the
    reference. Returns the worst error / tolerance."""
    w = case.weight.astype(np.float64)
    b = case.bias.astype(np.float64)
    invstd = 1.0 / np.sqrt(case.var64 + EPS)
    a = w * invstd
    c = b - case.mean64 * a
    sd = np.sqrt(case.var64)
    worst = _check_affine("y", outs["y"], case, [(case.x, a)], c)
    worst = max(worst, _check_vec("mean", outs["mean"], case.mean64, ATOL * sd))
    worst = max(worst, _check_vec("invstd", outs["invstd"], invstd, 0.0))
    if state is not None:
        m = MOMENTUM
        rm = (1 - m) * case.running_mean.astype(np.float64) + m * case.mean64
        rv = (1 - m) * case.running_var.astype(np.float64) + m * case.var64 * case.n / (case.n - 1)
        worst = max(worst, _check_vec("running_mean", state["running_mean"], rm, ATOL * sd))
        worst = max(worst, _check_vec("running_var", state["running_var"], rv, 0.0))
    return worst


def check_backward(case: Case, outs: Arrays, state: Arrays | None = None) -> float:
    """Raise WrongResult unless ``outs`` matches the reference. Returns the worst error / tolerance."""
    assert case.dy is not None and case.dweight64 is not None and case.dbias64 is not None
    assert case.dweight_l1 is not None and case.dbias_l1 is not None
    n = case.n
    w = case.weight.astype(np.float64)
    mean = case.save_mean.astype(np.float64)
    invstd = case.save_invstd.astype(np.float64)
    k1 = w * invstd
    k2 = -w * invstd * invstd * case.dweight64 / n
    k3 = -w * invstd * (case.dbias64 / n) + w * invstd * mean * invstd * case.dweight64 / n
    worst = _check_affine("dx", outs["dx"], case, [(case.dy, k1), (case.x, k2)], k3)
    worst = max(worst, _check_vec("dweight", outs["dweight"], case.dweight64, SUM_TOL * case.dweight_l1))
    return max(worst, _check_vec("dbias", outs["dbias"], case.dbias64, SUM_TOL * case.dbias_l1))
