"""Statistics and gradients of channels holding infinities, NaN and values near the ends of
the float range, against an exact float64 reference and against torch where torch is right.

The kernels accumulate in the input's type and sum a block again in double (scaled by a
power of two for float64) when its fast sums come out non-finite (csrc/kernels/exact_sums.h).
So every finite input whose statistics the output types hold gets them right: a float32
channel of values near +-3e38, or past 1e19 (whose squares overflow float32), has its
mean and invstd; a float64 channel its mean up to 1.8e308, and its variance while n times
it (m2, the sum of squared deviations the statistics carry) is below 1.8e308 (above, var is
inf and invstd 0, as in torch). Infinities propagate as IEEE
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
from reference import assert_bits_equal

# layout: (shape for float32, shape for float64, axis); C >= 7 everywhere
LAYOUTS = {
    "rows": ((4, 7, 20000), (4, 7, 20000), 1),              # row mode, groups inside periods
    "period": ((30000, 7), (30000, 7), -1),                 # period mode, several ranges
    "chunks": ((8, 70001), (8, 70001), -1),                 # period mode, a long period in chunks
    "blocked": ((2, 16, 200000), (2, 16, 100000), 1),       # channel blocks (> 4 MiB)
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
        return ldexp((ldexp(rows, -e) - ldexp(mean[:, None], -e)) * invstd[:, None], e)


def reference_train(x, w, b, rm, rv, axis, dtype, eps=EPS, momentum=MOMENTUM):
    """Per channel: mean, m2, invstd, running stats, and y (rows of channel_rows' layout),
    from the exact statistics; y uses the mean rounded to x's dtype, as pybn documents."""
    rows = channel_rows(x, axis)
    n = rows.shape[1]
    mean, m2 = exact_mean_m2(rows)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        invstd = 1.0 / np.sqrt(m2 / n + eps)
        out = {"mean": mean, "m2": m2, "invstd": invstd,
               "rm": (1 - momentum) * rm.astype(np.float64) + momentum * mean,
               "rv": (1 - momentum) * rv.astype(np.float64) + momentum * (m2 / (n - 1))}
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


# ------------------------------------------------------------ every argument, adversarially
# One value at a time made extreme in each argument (x, weight, bias, running statistics,
# dy, mean, invstd), plus eps and momentum at their extremes and channels of tiny or
# subnormal values with a tiny eps, against the exact reference with its results rounded
# to x's dtype. Where the reference itself overflows, pybn must overflow the same way.
#
# Outside the contract, and so not compared (RELIABILITY.md): the backward where a term
# of dx (weight * invstd times g, sum(g) / n or xhat * sum(g * xhat) / n) is past the
# dtype's range, or invstd is infinite: dx is taken as k_dy * g + k_x * (x - mean) + k_0,
# whose terms then overflow with opposite signs where the factored product is finite or
# has one sign.

SPECIALS = ["inf", "-inf", "nan", "max", "-max", "max/2", "0", "-0", "subnormal", "1e-30"]
SMALL_LAYOUTS = {"rows": ((6, 4, 9), 1), "period": ((40, 4), -1)}


def special(name, dtype):
    big = float(np.finfo(dtype).max)
    return {"inf": np.inf, "-inf": -np.inf, "nan": np.nan, "max": big, "-max": -big, "max/2": big / 2, "0": 0.0,
            "-0": -0.0, "subnormal": float(np.finfo(dtype).smallest_subnormal), "1e-30": 1e-30}[name]


class Mismatches(list):
    """Collects every disagreement with the reference, so one run reports them all."""

    def check(self, label, got, expected, tol, dtype, scale=None):
        a = np.asarray(got, np.float64)
        with np.errstate(over="ignore"):
            e = np.asarray(expected, np.float64).astype(dtype).astype(np.float64)
        if a.ndim == 1:
            a, e = a[:, None], e[:, None]
        s = np.maximum(finite_scale(e) if scale is None else np.asarray(scale, np.float64), 1e-300)[:, None]
        floor = 4 * float(np.finfo(dtype).tiny)   # results in the subnormal range: absolute
        with np.errstate(all="ignore"):
            good = np.where(np.isnan(e), np.isnan(a),
                            np.where(np.isinf(e), a == e, np.abs(a - e) <= tol * (s + np.abs(e)) + floor))
        if not good.all():
            k, i = np.argwhere(~good)[0]
            self.append(f"{label}: {(~good).sum()} differ; channel {k} [{i}]: {a[k, i]!r}, expected {e[k, i]!r}")


def reference_infer(x, rm, rv, w, b, eps, axis):
    with np.errstate(all="ignore"):
        invstd = 1 / np.sqrt(rv.astype(np.float64) + eps)
        return (scaled_xhat(channel_rows(x, axis), rm.astype(np.float64), invstd) * w.astype(np.float64)[:, None]
                + b.astype(np.float64)[:, None])


def reference_backward_eval(dy, x, mean, invstd, w, axis):
    g = channel_rows(dy, axis)
    with np.errstate(all="ignore"):
        xhat = scaled_xhat(channel_rows(x, axis), mean.astype(np.float64), invstd.astype(np.float64))
        dx = g * (w.astype(np.float64) * invstd.astype(np.float64))[:, None]
        return dx, (g * xhat).sum(1), g.sum(1), (np.abs(g * xhat).sum(1), np.abs(g).sum(1))


def backward_in_contract(dy, x, mean, invstd, w, axis, dtype):
    """Whether each term of dx, weight * invstd times g, sum(g)/n and xhat * sum(g xhat)/n,
    is within the dtype's range (and invstd finite)."""
    if not np.isfinite(invstd).all():
        return False
    g, rows = channel_rows(dy, axis), channel_rows(x, axis)
    n = rows.shape[1]
    with np.errstate(all="ignore"):
        xhat = np.abs(scaled_xhat(rows, mean.astype(np.float64), invstd.astype(np.float64)))
        k = np.abs(w.astype(np.float64) * invstd.astype(np.float64))
        terms = k * (np.abs(g).max(1) + np.abs(g.sum(1)) / n + xhat.max(1) * np.abs((g * xhat).sum(1)) / n)
    return bool(np.all(terms <= float(np.finfo(dtype).max) / 2))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", SMALL_LAYOUTS)
def test_every_argument_extreme_against_reference(layout, dtype, isa):
    rng = np.random.default_rng(11)
    shape, axis = SMALL_LAYOUTS[layout]
    c = shape[axis]
    tol = TOL[dtype]
    btol = BWD_TOL[dtype]
    x = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    base = dict(zip(("w", "b", "rm", "rv"), params(rng, c, dtype)))
    bad = Mismatches()

    def train(label, xx, p, eps=EPS, momentum=MOMENTUM):
        rm, rv = p["rm"].copy(), p["rv"].copy()
        res = pybn.batch_norm_train(xx, p["w"], p["b"], running_mean=rm, running_var=rv, momentum=momentum,
                                    eps=eps, axis=axis)
        out, ey = reference_train(xx, p["w"], p["b"], p["rm"], p["rv"], axis, dtype, eps=eps, momentum=momentum)
        data = finite_scale(channel_rows(xx, axis))
        bad.check(label + " y", channel_rows(res.y, axis), ey, tol, dtype)
        bad.check(label + " mean", res.mean, out["mean"], tol, dtype, data)
        bad.check(label + " invstd", res.invstd, out["invstd"], tol, dtype)
        bad.check(label + " running_mean", rm, out["rm"], tol, dtype, np.maximum(data, np.abs(p["rm"])))
        bad.check(label + " running_var", rv, out["rv"], tol, dtype)
        stats = pybn.batch_norm_stats(xx, axis=axis)
        bad.check(label + " stats mean", stats.mean, out["mean"], STATS_TOL[dtype], np.float64, data)
        bad.check(label + " stats m2", stats.m2, out["m2"], STATS_TOL[dtype] * 10, np.float64)
        return res

    def infer(label, xx, p, eps=EPS):
        y = pybn.batch_norm_infer(xx, p["rm"], p["rv"], p["w"], p["b"], eps=eps, axis=axis)
        bad.check(label + " infer y", channel_rows(y, axis), reference_infer(xx, p["rm"], p["rv"], p["w"], p["b"],
                                                                             eps, axis), tol, dtype)

    def backward(label, g, xx, mean, invstd, w):
        if not backward_in_contract(g, xx, mean, invstd, w, axis, dtype):
            return
        for training in (True, False):
            dx, dw, db = pybn.batch_norm_backward(g, xx, mean, invstd, w, training=training, axis=axis)
            ref = reference_backward if training else reference_backward_eval
            edx, edw, edb, (sdw, sdb) = ref(g, xx, mean, invstd, w, axis)
            bad.check(f"{label} backward({training}) dx", channel_rows(dx, axis), edx, btol, dtype)
            bad.check(f"{label} backward({training}) dweight", dw, edw, btol, dtype, sdw)
            bad.check(f"{label} backward({training}) dbias", db, edb, btol, dtype, sdb)

    for name in SPECIALS:
        v = special(name, dtype)
        for arg in ("w", "b", "rm", "rv"):
            p = {k: a.copy() for k, a in base.items()}
            p[arg][1] = v
            train(f"{arg}[1]={name}", x, p)
            infer(f"{arg}[1]={name}", x, p)
        xx = x.copy()
        xx.flat[5] = v
        infer(f"x.flat[5]={name}", xx, base)
        res = train(f"x.flat[5]={name}", xx, base)
        backward(f"x.flat[5]={name}", dy, xx, res.mean, res.invstd, base["w"])
        res = pybn.batch_norm_train(x, base["w"], base["b"], axis=axis)
        for arg in ("dy", "mean", "invstd", "w"):
            g, mean, invstd, w = dy.copy(), res.mean.copy(), res.invstd.copy(), base["w"].copy()
            {"dy": g.reshape(-1), "mean": mean, "invstd": invstd, "w": w}[arg][1] = v
            backward(f"{arg}[1]={name}", g, x, mean, invstd, w)
    for eps in (1e-45, 1e-300, 1e30):
        for momentum in (0.0, 1.0, -1.0, 2.0, 1e300):
            train(f"eps={eps} momentum={momentum}", x, base, eps=eps, momentum=momentum)
            infer(f"eps={eps}", x, base, eps=eps)
    for scale in (float(np.finfo(dtype).smallest_subnormal) * 64, 1e-30, 1e-20):
        xs = (x.astype(np.float64) * scale).astype(dtype)
        for eps in (float(np.finfo(dtype).smallest_subnormal), 1e-300):
            res = train(f"x*{scale:g} eps={eps}", xs, base, eps=eps)
            backward(f"x*{scale:g} eps={eps}", dy, xs, res.mean, res.invstd, base["w"])
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:40])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["rows", "period"])
def test_weights_past_the_range_scale_instead_of_overflowing(layout, dtype, isa, threads):
    """weight * invstd past the type's range (alpha would be inf) moves the excess into a
    power-of-two scale of x - mean (Affine::set), for either sign of invstd (batch_norm_apply
    takes any): x == mean gives the bias exactly (inf * 0 would be NaN), x = mean + 2**-10
    gives 2**-10 * invstd * weight (finite, an inf without the scale)."""
    top = 127 if dtype == np.float32 else 1023
    weights = [2.0**top, 2.0**top, 2.0**top, 2.0**(top - 3)]
    invstds = [4.0, -4.0, 2.0, -8.0]
    mean = np.array([0.5, -3.0, 1.0, 0.0], dtype)
    C = 4
    offsets = np.array([0.0, 2.0**-10, 0.0, -(2.0**-10), 0.0, 2.0**-10])
    values = (mean[:, None] + offsets[None, :]).astype(dtype)  # (C, 6)
    x = values.T.copy() if layout == "period" else values[None]
    axis = -1 if layout == "period" else 1
    bias = np.full(C, 1.0, dtype)
    y = pybn.batch_norm_apply(x, mean, np.array(invstds, dtype), np.array(weights, dtype), bias, axis=axis)
    got = y.T if layout == "period" else y[0]
    want = np.where(offsets[None, :] == 0, 1.0,
                    offsets[None, :] * np.array(invstds)[:, None] * np.array(weights)[:, None] + 1.0).astype(dtype)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["rows", "period"])
def test_scales_at_the_edges_of_the_unit_range(layout, isa, threads):
    """Channels whose invstd, or weight * invstd, sits at the edges where the elementwise
    passes start scaling x - mean by a power of two (xhat_scale, Affine::set): xhat is +-1
    exactly in each, so y = +-weight exactly, on either side of every edge."""
    stds = [2.0**32, 2.0**33, 2.0**-32, 2.0**-33, 2.0**-20, 2.0**-20, 2.0**-20]
    weights = [1.0, 1.0, 1.0, 1.0, 2.0**100, 2.0**99, 2.0**101]  # weight * invstd: 2**120 and its neighbours
    n = 64
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    values = (signs[None, :] * np.array(stds)[:, None]).astype(np.float32)  # (C, n): mean 0, biased var std**2
    x = values.T.copy() if layout == "period" else values[None]  # (n, C) or (1, C, n)
    axis = -1 if layout == "period" else 1
    w = np.array(weights, np.float32)
    y = pybn.batch_norm_train(x, w, np.zeros(7, np.float32), eps=0.0, axis=axis).y
    want = (signs[None, :] * w[:, None]).astype(np.float32)
    got = y.T if layout == "period" else y[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("extra", ["huge weight", "tiny variance"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["rows", "period"])
def test_common_channels_keep_their_bits_beside_an_extreme_one(layout, dtype, extra, isa, threads, rng):
    """The coefficients of channels in the common case (scale 1) are set by vector loops over
    all channels when every channel is common (Affine::set_all), and channel by channel when
    one is not (Affine::set): an extreme channel added to the call must leave the other
    channels' outputs (elementwise, given their statistics) bit for bit as they were."""
    C = 37
    top = 127 if dtype == np.float32 else 1023
    x = rng.standard_normal((50, C + 1) if layout == "period" else (3, C + 1, 50)).astype(dtype)
    axis = -1 if layout == "period" else 1
    mean = rng.standard_normal(C + 1).astype(dtype)
    var = (rng.random(C + 1) + 0.5).astype(dtype)
    w = rng.standard_normal(C + 1).astype(dtype)
    b = rng.standard_normal(C + 1).astype(dtype)
    if extra == "huge weight":
        w[C] = dtype(2.0**top)  # |weight * invstd| past 2**120: a power-of-two scale
    else:
        var[C] = dtype(2.0**-80 if dtype == np.float32 else 2.0**-600)  # invstd past the unit range (eps = 0)
    common = (slice(None), slice(0, C)) if layout == "period" else (slice(None), slice(0, C), slice(None))
    invstd = (1 / np.sqrt(var.astype(np.float64))).astype(dtype)
    for call in (lambda xs, k: pybn.batch_norm_infer(xs, mean[:k], var[:k], w[:k], b[:k], eps=0.0, axis=axis),
                 lambda xs, k: pybn.batch_norm_apply(xs, mean[:k], invstd[:k], w[:k], b[:k], axis=axis)):
        alone = call(np.ascontiguousarray(x[common]), C)
        beside = call(x, C + 1)[common]
        assert_bits_equal(alone, beside)


@pytest.mark.parametrize("extra", ["tiny variance", "huge sum", "NaN sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["rows", "period"])
def test_common_channels_keep_their_gradient_bits_beside_an_extreme_one(layout, dtype, extra, isa, threads, rng):
    """The backward's coefficients likewise: set by vector loops when every channel is in the
    common case (common_dx_coefficients), channel by channel when one needs a power-of-two
    scale (an invstd past the unit range, or a k_x past the type's range) or is NaN. The
    other channels' dx must not change by a bit. 70 channels: more than a vector's lanes."""
    C = 70
    top = 127 if dtype == np.float32 else 1023
    shape = (50, C + 1) if layout == "period" else (3, C + 1, 50)
    x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    axis = -1 if layout == "period" else 1
    mean = rng.standard_normal(C + 1).astype(dtype)
    invstd = (rng.random(C + 1) + 0.5).astype(dtype)
    w = rng.standard_normal(C + 1).astype(dtype)
    sum_dy, sum_dy_xhat = rng.standard_normal(C + 1) * 40, rng.standard_normal(C + 1) * 40
    count = shape[0] * (shape[2] if layout == "rows" else 1)
    if extra == "tiny variance":
        invstd[C] = dtype(2.0**40 if dtype == np.float32 else 2.0**300)  # past the unit range
    elif extra == "huge sum":
        # k_x = -w * invstd**2 * sum_dy_xhat / count = -2**(top - 1): past x_coefficient's limit
        # of 2**(top - 4), so the scale takes its excess
        w[C], invstd[C], sum_dy_xhat[C] = 64.0, 1.0, 2.0 ** (top - 7) * count
        assert abs(float(w[C]) * float(invstd[C]) ** 2 * (sum_dy_xhat[C] / count)) >= 2.0 ** (top - 4)
    else:
        sum_dy_xhat[C] = np.nan
    common = (slice(None), slice(0, C)) if layout == "period" else (slice(None), slice(0, C), slice(None))

    def dx(k, xs, dys):
        return pybn.batch_norm_backward_apply(dys, xs, mean[:k], invstd[:k], sum_dy[:k], sum_dy_xhat[:k], count,
                                              w[:k], axis=axis)

    alone = dx(C, np.ascontiguousarray(x[common]), np.ascontiguousarray(dy[common]))
    assert_bits_equal(alone, dx(C + 1, x, dy)[common])
    want = (w[:C] * invstd[:C]).astype(np.float64)
    xhat = (x[common].astype(np.float64) - (mean[:C] if layout == "period" else mean[:C, None])) * \
        (invstd[:C] if layout == "period" else invstd[:C, None])
    per = (lambda v: v) if layout == "period" else (lambda v: v[:, None])
    ref = per(want) * (dy[common] - per(sum_dy[:C] / count) - xhat * per(sum_dy_xhat[:C] / count))
    np.testing.assert_allclose(alone, ref, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("layout", ["rows", "period"])
def test_tiny_variance_of_large_values_gives_beta_at_the_mean(layout, dtype, isa, threads):
    """A channel of large values with a tiny variance: invstd is past the unit range, so the
    elementwise pass scales x - mean up by a power of two (ScaledDeviation). Scaling x first
    overflowed (x * s): a constant float32 channel of 1e30 with eps 1e-30 gave NaN on the
    scalar path and -inf on the vector ones, for y = beta (found by differential fuzzing)."""
    value, eps = {np.float32: (1e30, 1e-30), np.float64: (1e250, 1e-200), np.float16: (60000.0, 1e-70)}[dtype]
    C, n = 3, 33
    rows = np.full((C, n), value, dtype)
    rows[1] = -rows[1]  # (either sign)
    rows[2, ::2] = dtype(value / 2)  # not constant (in float64 its variance is past the range: invstd 0, y = beta)
    x = rows.T.copy() if layout == "period" else rows[None]
    axis = -1 if layout == "period" else 1
    bias = np.array([0.5, -2.0, 0.0], np.float32 if dtype == np.float16 else dtype)
    res = pybn.batch_norm_train(x, None, bias, eps=eps, axis=axis)
    y = (res.y.T if layout == "period" else res.y[0]).astype(np.float64)
    np.testing.assert_array_equal(y[:2], np.repeat(bias[:2, None].astype(np.float64), n, axis=1))
    r = rows[2].astype(np.float64) / value
    want = (r - r.mean()) / r.std() if dtype != np.float64 else np.zeros(n)
    assert np.isfinite(y[2]).all()
    np.testing.assert_allclose(y[2], want, rtol=0, atol={np.float32: 1e-5, np.float64: 1e-12, np.float16: 4e-3}[dtype])


@pytest.mark.parametrize("layout", ["rows", "period"])
def test_inference_near_the_mean_with_a_large_invstd(layout, isa, threads):
    """y = (x - mean) * alpha with invstd 1e10 and alpha 1: x - mean up to 7.6e22 is y,
    where x * s overflowed to inf (then NaN or -inf with the wrong sign)."""
    top = np.float32(1e30)
    values = np.array([top, np.nextafter(top, np.float32(np.inf)), np.nextafter(top, np.float32(0))], np.float32)
    rows = np.tile(values, (2, 1))  # (C=2, 3)
    x = rows.T.copy() if layout == "period" else rows[None]
    axis = -1 if layout == "period" else 1
    y = pybn.batch_norm_infer(x, np.full(2, top), np.zeros(2, np.float32), np.full(2, 1e-10, np.float32),
                              eps=1e-20, axis=axis)
    got = y.T if layout == "period" else y[0]
    alpha = np.float64(np.float32(1e-10)) / np.sqrt(np.float64(np.float32(1e-20)))  # (the float64 eps of the call)
    want = ((rows.astype(np.float64) - np.float64(top)) * np.float32(alpha)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["rows", "period"])
def test_backward_with_large_gradients_stays_finite(layout, dtype, isa, threads):
    """dy near the top of the range: the coefficient of x - mean (invstd^2 * mean(g * xhat))
    passed the type's range though every dx is finite, and dx came out +-inf; its excess now
    moves into the power-of-two scale of x - mean (x_coefficient)."""
    big = 2.0**116 if dtype == np.float32 else 2.0**1012
    x = np.array([9.4e-4, -7.43e-3, 1.0e-3, -2.0e-3, 4.0e-3], dtype)
    g = np.array([0.3, -0.7, 0.1, 0.2, -0.4]) * big
    rows_x, rows_g = np.tile(x, (2, 1)), np.tile(g, (2, 1)).astype(dtype)
    xs = rows_x.T.copy() if layout == "period" else rows_x[None]
    gs = rows_g.T.copy() if layout == "period" else rows_g[None]
    axis = -1 if layout == "period" else 1
    f = pybn.batch_norm_train(xs, eps=1e-5, axis=axis)
    dx = pybn.batch_norm_backward(gs, xs, f.mean, f.invstd, axis=axis).dx
    got = dx.T if layout == "period" else dx[0]
    scale = big  # the reference in float64 on g / big, scaled back
    gg = rows_g.astype(np.float64) / scale
    xh = (rows_x.astype(np.float64) - f.mean.astype(np.float64)[:, None]) * f.invstd.astype(np.float64)[:, None]
    n = x.size
    k = f.invstd.astype(np.float64)[:, None]
    ref = k * (gg - gg.sum(1, keepdims=True) / n - xh * (gg * xh).sum(1, keepdims=True) / n)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64) / scale, ref, rtol=BWD_TOL[dtype], atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_float64_channels_past_the_squares_range(layout, isa):
    """float64 values whose squares overflow are summed again, scaled (exact_moments): its
    mean, summed one value after another, was some ulps off, so a constant channel of 1e160
    got m2 = 1.6e290 and y = 1 for y = beta = 0. The mean is now corrected by a pass."""
    shape, axis = LAYOUTS[layout][1], LAYOUTS[layout][2]
    for value in (1e160, -5.12175012e191, 1e300):
        x = np.full(shape, value)
        s = pybn.batch_norm_stats(x, axis=axis)
        assert (s.mean == value).all() and (s.m2 == 0).all(), (value, s.mean[:2], s.m2[:2])
        res = pybn.batch_norm_train(x, eps=1e-5, axis=axis)
        assert (res.y == 0).all()


@pytest.mark.parametrize("layout", ["rows", "period"])
def test_backward_coefficient_of_a_zero_sum_with_overflowing_factors(layout, isa, threads):
    """float64, weight * invstd^2 past double's range and sum(g * xhat) exactly 0 (a constant
    gradient over values symmetric about the mean): k_x is 0, where the plain product of its
    factors, (w * invstd * invstd) * 0, was inf * 0 = NaN, and every dx NaN (review)."""
    n = 16
    values = np.where(np.arange(n) % 2 == 0, 1e-60, -1e-60)
    rows = np.tile(values, (2, 1))  # (C=2, n), mean 0 exactly
    x = rows.T.copy() if layout == "period" else rows[None]
    axis = -1 if layout == "period" else 1
    w = np.array([1e240, 1e240])
    f = pybn.batch_norm_train(x, w, eps=1e-300, axis=axis)
    dy = np.full(x.shape, 1e-300)
    dx = pybn.batch_norm_backward(dy, x, f.mean, f.invstd, w, axis=axis).dx
    # invstd * w * (g - mean(g) - xhat * 0): 0 up to the roundings of the coefficients
    assert np.isfinite(dx).all() and np.abs(dx).max() < 1e-15
