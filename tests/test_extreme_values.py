"""Statistics and gradients of channels holding infinities, NaN and values near the ends of
the float range, against an exact float64 reference and against torch where torch is right.

The kernels accumulate in the input's type and sum a block again in double (scaled by a
power of two for float64) when its fast sums come out non-finite (csrc/kernels/exact_sums.h).
So every finite input whose statistics the output types hold gets them right: a float32
channel of values near +-3e38, or past 1e19 (whose squares overflow float32), has its
mean and invstd; a float64 channel its mean up to 1.8e308, and its variance while that is
below 1.8e308 (above, var is inf and invstd 0, as in torch). Infinities propagate as IEEE
says: the mean of {+inf, finite} is +inf, of {+inf, -inf} NaN, and the variance of any
channel with an infinity is NaN (torch.native_batch_norm gives the same).

Every case runs through each loop family (row mode, period mode, chunks of a long period,
channel blocks), on every ISA path, and with 1 and 2 threads, which must agree to the bit.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import pybn

# layout: (shape for float32, shape for float64, axis); C >= 7 everywhere
LAYOUTS = {
    "rows": ((4, 7, 20000), (4, 7, 20000), 1),              # row mode, groups inside periods
    "period": ((30000, 7), (30000, 7), -1),                 # period mode, several ranges
    "chunks": ((8, 70001), (8, 70001), -1),                 # period mode, a long period in chunks
    "blocked": ((2, 16, 200000), (2, 16, 100000), 1),       # channel blocks (> 24 MB)
}
DTYPES = {"f32": np.float32, "f64": np.float64}
TOL = {np.float32: 2e-5, np.float64: 1e-12}
BWD_TOL = {np.float32: 2e-4, np.float64: 1e-10}
STATS_TOL = {np.float32: 2e-6, np.float64: 1e-13}
EPS = 1e-5
MOMENTUM = 0.25


# ------------------------------------------------------------ the data

def extreme_channels(rng, n, dtype):
    """Channel patterns, each n values: [(name, values)]."""
    big = float(np.finfo(dtype).max)
    half_range = 1e20 if dtype == np.float32 else 1e200   # squares past the type's range
    normal = lambda: rng.standard_normal(n) * 1.5 + 0.3   # noqa: E731
    pos = rng.permutation(n)[:2]
    one_inf = normal()
    one_inf[pos[0]] = np.inf
    both_inf = normal()
    both_inf[pos[0]], both_inf[pos[1]] = np.inf, -np.inf
    one_nan = normal()
    one_nan[pos[0]] = np.nan
    return [
        ("normal", normal()),
        ("one +inf", one_inf),
        ("+inf and -inf", both_inf),
        ("one nan", one_nan),
        ("near +-max", rng.uniform(-0.9, 0.9, n) * big),
        ("squares overflow", half_range * (1 + 0.5 * rng.standard_normal(n))),
        ("sums overflow", big / 4 * (1 + 0.1 * rng.standard_normal(n))),
    ]


def make_x(rng, layout, dtype):
    """x of the layout with the extreme channels first (the rest normal), and their names."""
    shape32, shape64, axis = LAYOUTS[layout]
    shape = shape32 if dtype == np.float32 else shape64
    ax = axis % len(shape)
    c = shape[ax]
    n = math.prod(shape) // c
    patterns = extreme_channels(rng, n, dtype)
    rows = [v for _, v in patterns] + [rng.standard_normal(n) * 2 - 1 for _ in range(c - len(patterns))]
    names = [p for p, _ in patterns] + ["normal"] * (c - len(patterns))
    moved = np.stack(rows).astype(dtype).reshape((c,) + tuple(np.delete(shape, ax)))
    return np.ascontiguousarray(np.moveaxis(moved, 0, ax)), names, axis


def channel_rows(a, axis):
    """(C, n) float64 copy: row c holds channel c's values."""
    a = np.asarray(a, dtype=np.float64)
    ax = axis % a.ndim
    return np.ascontiguousarray(np.moveaxis(a, ax, 0)).reshape(a.shape[ax], -1)


# ------------------------------------------------------------ the exact reference
# Row by row (one row per channel), vectorized over rows: each row scaled by a power of two
# (exact) so that its largest finite magnitude is below 1, summed in float64 (NumPy's
# pairwise sums), then scaled back: nothing overflows that the result does not. Rows with
# an infinity or a NaN are not scaled and get NumPy's IEEE results.

def row_exponents(*rows):
    """Per row: e such that the row's values (of every array given) times 2**-e are below 1
    in magnitude; 0 for rows with a non-finite value or no non-zero one."""
    rows = [np.broadcast_to(np.asarray(r, dtype=np.float64).reshape(len(r), -1), (len(rows[0]), 1))
            if np.ndim(r) == 1 else np.asarray(r, dtype=np.float64) for r in rows]
    finite = np.logical_and.reduce([np.isfinite(r).all(axis=1) for r in rows])
    with np.errstate(invalid="ignore"):
        big = np.max([np.max(np.abs(r), axis=1) for r in rows], axis=0)
    e = np.frexp(np.where(finite, big, 0.0))[1]
    return np.where(finite, e, 0)


def ldexp(v, e):
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(v, e)


def exact_mean_m2(rows):
    n = rows.shape[1]
    e = row_exponents(rows)
    s = ldexp(rows, -e[:, None])
    with np.errstate(invalid="ignore"):
        mean = s.sum(axis=1) / n
        m2 = ((s - mean[:, None]) ** 2).sum(axis=1)
    return ldexp(mean, e), ldexp(m2, 2 * e)


def scaled_xhat(rows, mean, invstd):
    """(x - mean) * invstd per row, with x - mean taken scaled (it may overflow float64)."""
    e = row_exponents(rows, mean)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        return (ldexp(rows, -e) - ldexp(mean[:, None], -e)) * ldexp(invstd[:, None], e)


def reference_train(x, w, b, rm, rv, axis, dtype):
    """Per channel: mean, m2, invstd, running stats, and y (rows of channel_rows' layout),
    from the exact statistics; y uses the mean rounded to x's dtype, as pybn documents."""
    rows = channel_rows(x, axis)
    n = rows.shape[1]
    mean, m2 = exact_mean_m2(rows)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        invstd = 1.0 / np.sqrt(m2 / n + EPS)
        out = {"mean": mean, "m2": m2, "invstd": invstd,
               "rm": (1 - MOMENTUM) * rm.astype(np.float64) + MOMENTUM * mean,
               "rv": (1 - MOMENTUM) * rv.astype(np.float64) + MOMENTUM * (m2 / (n - 1))}
        mean_t = mean.astype(dtype).astype(np.float64)
        y = scaled_xhat(rows, mean_t, invstd) * w.astype(np.float64)[:, None] + b.astype(np.float64)[:, None]
    return out, y


def reference_backward(dy, x, mean, invstd, w, axis):
    """dx rows, dweight, dbias of the training backward (mean/invstd as given)."""
    g = channel_rows(dy, axis)
    rows = channel_rows(x, axis)
    n = rows.shape[1]
    xhat = scaled_xhat(rows, mean.astype(np.float64), invstd.astype(np.float64))
    eg = row_exponents(g)[:, None]
    gs = ldexp(g, -eg)
    with np.errstate(invalid="ignore", over="ignore"):
        sg = gs.sum(axis=1)
        sgx = (gs * xhat).sum(axis=1)
        k = (w.astype(np.float64) * invstd.astype(np.float64))[:, None]
        dx = ldexp((gs - sg[:, None] / n - xhat * (sgx[:, None] / n)) * k, eg)
        # the sums' scales: sums of magnitudes (what their rounding errors are relative to)
        scales = ldexp(np.abs(gs * xhat).sum(axis=1), eg[:, 0]), ldexp(np.abs(gs).sum(axis=1), eg[:, 0])
    return dx, ldexp(sgx, eg[:, 0]), ldexp(sg, eg[:, 0]), scales


# ------------------------------------------------------------ comparison

def finite_scale(rows):
    """Per row: the largest finite magnitude (the scale a mean's error is relative to)."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.max(np.abs(np.where(np.isfinite(rows), rows, 0.0)), axis=1)


def assert_channels_close(actual, expected, tol, what, names, scale=None):
    """Row by row: the same NaN and infinities (with signs), finite values within tol of
    the row's scale: its largest finite expected magnitude unless given (at least 1e-300,
    so that subnormal-scale results compare relatively)."""
    c = len(names)
    a = np.asarray(actual, dtype=np.float64).reshape(c, -1)
    e = np.asarray(expected, dtype=np.float64).reshape(c, -1)
    s = np.maximum(finite_scale(e) if scale is None else np.asarray(scale, dtype=np.float64), 1e-300)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        good = np.where(np.isnan(e), np.isnan(a),
                        np.where(np.isinf(e), a == e, np.abs(a - e) <= tol * (s + np.abs(e))))
    bad = np.argwhere(~good)
    if bad.size:
        k, i = bad[0]
        raise AssertionError(f"{what}: {len(bad)} values differ; first in channel {k} ({names[k]}): "
                             f"{a[k, i]!r}, expected {e[k, i]!r} (scale {s[k, 0]:g}, tol {tol:g})")


def run_threads(f):
    """f() with 1 and with 2 threads: the results must agree to the bit."""
    prev = pybn.get_num_threads()
    try:
        pybn.set_num_threads(1)
        one = f()
        pybn.set_num_threads(2)
        two = f()
    finally:
        pybn.set_num_threads(prev)
    for a, b in zip(one, two):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), "1 and 2 threads differ"
    return one


def params(rng, c, dtype):
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    return w, b, rm, rv


# ------------------------------------------------------------ tests

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_and_stats_exact_on_extreme_channels(layout, dtype, isa, rng):
    x, names, axis = make_x(rng, layout, dtype)
    c = len(names)
    w, b, rm0, rv0 = params(rng, c, dtype)

    def call():
        rm, rv = rm0.copy(), rv0.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no NumPy warning leaks out of pybn's checks
            y, mean, invstd = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                                    momentum=MOMENTUM, eps=EPS, axis=axis)
        stats = pybn.batch_norm_stats(x, axis=axis)
        return y, mean, invstd, rm, rv, stats.mean, stats.m2

    y, mean, invstd, rm, rv, smean, sm2 = run_threads(call)
    exp, ey = reference_train(x, w, b, rm0, rv0, axis, dtype)
    tol = TOL[dtype]
    # the statistics, rounded once to x's dtype (and in float64 for the split phase)
    cast = lambda v: v.astype(dtype).astype(np.float64)  # noqa: E731
    data_scale = finite_scale(channel_rows(x, axis))   # a mean is as accurate as the data's scale
    with np.errstate(over="ignore"):
        assert_channels_close(mean, cast(exp["mean"]), tol, "mean", names, data_scale)
        assert_channels_close(invstd, cast(exp["invstd"]), tol, "invstd", names)
        assert_channels_close(rm, cast(exp["rm"]), tol, "running_mean", names, np.maximum(data_scale, 3))
        assert_channels_close(rv, cast(exp["rv"]), tol, "running_var", names)
    # in float64, accurate to the input's precision
    assert_channels_close(smean, exp["mean"], STATS_TOL[dtype], "stats mean", names, data_scale)
    assert_channels_close(sm2, exp["m2"], STATS_TOL[dtype], "stats m2", names)
    assert_channels_close(channel_rows(y, axis), ey, tol, "y", names)
    # the headline cases, spelled out
    assert mean[1] == np.inf and np.isnan(invstd[1]) and np.isnan(channel_rows(y, axis)[1]).all()
    assert np.isnan(mean[2]) and np.isnan(mean[3])
    assert np.isfinite(mean[4:]).all() and np.isfinite(invstd[4:]).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_exact_on_extreme_channels(layout, dtype, isa, rng):
    x, names, axis = make_x(rng, layout, dtype)
    c = len(names)
    w, b, _, _ = params(rng, c, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    stats, _ = reference_train(x, w, b, w, w, axis, dtype)   # the forward's statistics, exact
    with np.errstate(over="ignore"):
        mean, invstd = stats["mean"].astype(dtype), stats["invstd"].astype(dtype)

    def call():
        dx, dw, db = pybn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        sums = pybn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
        dx2 = pybn.batch_norm_backward_apply(dy, x, mean, invstd, *sums, x.size // c, w, axis=axis)
        return dx, dw, db, sums.sum_dy, sums.sum_dy_xhat, dx2

    dx, dw, db, sum_dy, sum_dy_xhat, dx2 = run_threads(call)
    edx, edw, edb, (sdw, sdb) = reference_backward(dy, x, mean, invstd, w, axis)
    tol = BWD_TOL[dtype]
    with np.errstate(over="ignore"):
        assert_channels_close(dw, edw.astype(dtype), tol, "dweight", names, sdw)
        assert_channels_close(db, edb.astype(dtype), tol, "dbias", names, sdb)
    assert_channels_close(sum_dy, edb, tol, "sum_dy", names, sdb)
    assert_channels_close(sum_dy_xhat, edw, tol, "sum_dy_xhat", names, sdw)
    assert_channels_close(channel_rows(dx, axis), edx, tol, "dx", names)
    assert_channels_close(channel_rows(dx2, axis), edx, tol, "dx (two phases)", names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_infinities_as_torch(layout, dtype, isa, rng):
    """Channels with an infinity or a NaN: the same mean, invstd, running statistics and y
    as torch.native_batch_norm (which is right there, and wrong on huge finite values)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    x, names, axis = make_x(rng, layout, np_dtype)
    x = np.take(x, range(4), axis=axis % x.ndim)   # normal, +inf, +inf/-inf, NaN
    names = names[:4]
    w, b, rm, rv = params(rng, 4, np_dtype)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1)))
    ty, tmean, tinvstd = torch.ops.aten.native_batch_norm(xt, torch.from_numpy(w), torch.from_numpy(b), rm_t, rv_t,
                                                          True, MOMENTUM, EPS)
    y, mean, invstd = pybn.batch_norm_train(np.ascontiguousarray(x), w, b, running_mean=rm, running_var=rv,
                                            momentum=MOMENTUM, eps=EPS, axis=axis)
    assert mean[1] == np.inf and tmean[1] == np.inf
    tol = TOL[np_dtype] * 10
    assert_channels_close(mean, tmean.numpy(), tol, "mean", names)
    assert_channels_close(invstd, tinvstd.numpy(), tol, "invstd", names)
    assert_channels_close(rm, rm_t.numpy(), tol, "running_mean", names)
    assert_channels_close(rv, rv_t.numpy(), tol, "running_var", names)
    assert_channels_close(channel_rows(y, axis), channel_rows(np.moveaxis(ty.numpy(), 1, axis), axis), tol, "y",
                          names)
