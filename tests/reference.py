"""Independent float64 NumPy reference for pybn's batch normalization.

Straightforward formulas, two-pass mean/variance, everything in float64.
Nothing here calls pybn.
"""

from types import SimpleNamespace

import numpy as np


def norm_axis(axis, ndim):
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for ndim {ndim}")
    return axis % ndim


def canonical(a, axis):
    """View `a` as (outer, C, inner) with the channel axis `axis`."""
    a = np.asarray(a)
    ax = norm_axis(axis, a.ndim)
    outer = int(np.prod(a.shape[:ax], dtype=np.int64))
    inner = int(np.prod(a.shape[ax + 1:], dtype=np.int64))
    return a.reshape(outer, a.shape[ax], inner)


def channel_rows(a, axis):
    """Contiguous (C, n) float64 copy: row c holds channel c's n values, so
    NumPy reduces each row with pairwise summation (accurate)."""
    a = np.asarray(a, dtype=np.float64)
    ax = norm_axis(axis, a.ndim)
    return np.ascontiguousarray(np.moveaxis(a, ax, 0)).reshape(a.shape[ax], -1)


def mean_var(x, axis):
    """Per-channel mean and biased variance, two-pass, pairwise sums."""
    r = channel_rows(x, axis)
    mean = r.mean(axis=1)
    d = r - mean[:, None]
    return mean, (d * d).mean(axis=1)


def _per_channel(v, c):
    return None if v is None else np.asarray(v, dtype=np.float64).reshape(c)


def batch_norm_train(x, weight=None, bias=None, running_mean=None,
                     running_var=None, momentum=0.1, eps=1e-5, axis=1,
                     relu=False):
    """Returns a namespace: y, mean, var (biased), invstd, running_mean,
    running_var (the updated values, or None), all float64."""
    x = np.asarray(x, dtype=np.float64)
    v = canonical(x, axis)
    _, c, _ = v.shape
    n = v.shape[0] * v.shape[2]
    mean, var = mean_var(x, axis)
    d = v - mean[None, :, None]
    invstd = 1.0 / np.sqrt(var + eps)
    gamma = np.ones(c) if weight is None else _per_channel(weight, c)
    beta = np.zeros(c) if bias is None else _per_channel(bias, c)
    y = d * (invstd * gamma)[None, :, None] + beta[None, :, None]
    if relu:
        y = np.maximum(y, 0.0)
    new_rm = new_rv = None
    if running_mean is not None:
        new_rm = (1 - momentum) * _per_channel(running_mean, c) + momentum * mean
    if running_var is not None:
        new_rv = ((1 - momentum) * _per_channel(running_var, c)
                  + momentum * var * n / (n - 1))
    return SimpleNamespace(y=y.reshape(x.shape), mean=mean, var=var,
                           invstd=invstd, running_mean=new_rm,
                           running_var=new_rv)


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None,
                     eps=1e-5, axis=1, relu=False):
    x = np.asarray(x, dtype=np.float64)
    v = canonical(x, axis)
    c = v.shape[1]
    rm = _per_channel(running_mean, c)
    rv = _per_channel(running_var, c)
    gamma = np.ones(c) if weight is None else _per_channel(weight, c)
    beta = np.zeros(c) if bias is None else _per_channel(bias, c)
    invstd = 1.0 / np.sqrt(rv + eps)
    y = (v - rm[None, :, None]) * (invstd * gamma)[None, :, None] + beta[None, :, None]
    if relu:
        y = np.maximum(y, 0.0)
    return y.reshape(x.shape)


def batch_norm_backward(dy, x, mean, invstd, weight=None, training=True,
                        axis=1, y=None):
    """Returns (dx, dweight, dbias) in float64.

    `mean`/`invstd` are the saved batch statistics (training=True) or the
    running statistics (training=False, invstd = 1/sqrt(running_var+eps)).
    `y` (the forward output of a relu-fused forward) masks the gradient
    where y <= 0."""
    x = np.asarray(x, dtype=np.float64)
    g = canonical(np.asarray(dy, dtype=np.float64), axis)
    v = canonical(x, axis)
    _, c, _ = v.shape
    n = v.shape[0] * v.shape[2]
    if y is not None:
        g = np.where(canonical(np.asarray(y, dtype=np.float64), axis) <= 0, 0.0, g)  # (a NaN y passes dy, as torch)
    mean = _per_channel(mean, c)
    invstd = _per_channel(invstd, c)
    gamma = np.ones(c) if weight is None else _per_channel(weight, c)
    xhat = (v - mean[None, :, None]) * invstd[None, :, None]
    dbias = g.sum(axis=(0, 2))
    dweight = (g * xhat).sum(axis=(0, 2))
    if training:
        dx = (gamma * invstd)[None, :, None] * (
            g - (dbias / n)[None, :, None] - xhat * (dweight / n)[None, :, None])
    else:
        dx = g * (gamma * invstd)[None, :, None]
    return dx.reshape(x.shape), dweight, dbias


def nearest_even(values, dtype):
    """float64 `values` rounded once to `dtype`, to nearest, ties to even: the reference for
    results pybn computes in float64 and stores in 16 bits. NumPy's float64 to float16 cast
    is that rounding; ml_dtypes' to bfloat16 rounds through float32 (twice), so for bfloat16
    the neighbours of its result are compared with the value (the differences are exact:
    the candidates are within a factor 2 of the value)."""
    dtype = np.dtype(dtype)
    values = np.asarray(values, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        first = values.astype(dtype)
    if dtype.name != "bfloat16":
        return first
    bits = first.view(np.uint16).astype(np.int32)
    best = first.copy()
    with np.errstate(over="ignore", invalid="ignore"):  # the neighbours of infinities are NaN
        for step in (-1, 1):
            other = (bits + step).astype(np.uint16).view(dtype)
            d_best = np.abs(values - best.astype(np.float64))
            d_other = np.abs(values - other.astype(np.float64))
            even = (other.view(np.uint16) & 1) == 0
            better = (d_other < d_best) | ((d_other == d_best) & even)
            finite = np.isfinite(values) & np.isfinite(other.astype(np.float64))
            take = better & finite & (bits != 0x7F80) & (bits != 0xFF80)
            best[take] = other[take]
    return best


def assert_bits_equal(got, want):
    """got and want hold the same values to the bit (same dtype and shape); the message
    names the first elements that differ."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    differ = np.flatnonzero(got.view(f"u{got.itemsize}") != want.view(f"u{want.itemsize}"))
    first = differ[:5]
    assert differ.size == 0, f"{differ.size} elements differ, first at {first}: {got.flat[first]} vs {want.flat[first]}"


def result_strides(x, *others):
    """The strides of a batch-norm result for x (those of its axes longer than 1, which alone
    place elements): x's layout when x is dense in memory in another axis order than C's and
    each of `others` (the other arrays of x's shape given, None skipped) has its strides
    (docs/conventions.md, "Layout"), else C order's."""
    others = [o for o in others if o is not None]
    order = sorted(range(x.ndim), key=lambda i: -x.strides[i])
    dense_elsewhere = not x.flags.c_contiguous and x.transpose(order).flags.c_contiguous
    like = np.empty(x.shape, x.dtype)
    if dense_elsewhere and all(o.strides == x.strides for o in others):
        like = np.empty(tuple(x.shape[i] for i in order), x.dtype).transpose(np.argsort(order))
    return long_axis_strides(like)


def long_axis_strides(a):
    return tuple(s for s, n in zip(a.strides, a.shape) if n > 1)
