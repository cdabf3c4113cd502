"""Unusual inputs that are valid, and what they give: the other half of the input matrix
(tests/test_input_matrix.py lists the invalid ones and their errors).

eps = 0 on a constant channel (PyTorch's kernels as the reference), arrays in the other byte
order, memory-mapped arrays, `out=` being exactly one of the inputs, statistics merged with
counts past 2**63 or with infinite means (float64 NumPy as the reference), fractions as
probabilities.
"""
from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch

import pybn
import pybn.nn

C = 3


def data(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- eps = 0

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCL", "NLC"])
def test_eps_zero_on_a_constant_channel_normalizes_it_to_zero_as_torchs_kernel(isa, dtype, axis):
    """torch.nn.functional.batch_norm refuses eps <= 0 in training; its kernel
    (torch.batch_norm, torch.native_batch_norm) takes it and gives a channel of variance 0
    invstd 0, so y = bias there and dx = 0. pybn gave NaN (1/sqrt(0) = inf times 0)."""
    x = data((6, C, 7), dtype)
    x[:, 1, :] = 2.5   # channel 1 is constant
    w = np.array([2.0, 3.0, 0.5], dtype)
    b = np.array([0.5, -0.5, 1.0], dtype)
    dy = data(x.shape, dtype, seed=1)
    xs = np.ascontiguousarray(np.moveaxis(x, 1, axis))
    dys = np.ascontiguousarray(np.moveaxis(dy, 1, axis))

    y, mean, invstd = pybn.batch_norm_train(xs, w, b, eps=0.0, axis=axis)
    dx, dw, db = pybn.batch_norm_backward(dys, xs, mean, invstd, w, axis=axis)

    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    yt = torch.batch_norm(xt, wt, bt, None, None, True, 0.1, 0.0, False)
    yt.backward(torch.from_numpy(dy))
    _, mean_t, invstd_t = torch.native_batch_norm(torch.from_numpy(x), torch.from_numpy(w),
                                                  torch.from_numpy(b), None, None, True, 0.1, 0.0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert invstd[1] == 0 and invstd_t[1] == 0
    np.testing.assert_array_equal(np.moveaxis(y, axis, 1)[:, 1], b[1])
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), yt.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, mean_t.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(invstd, invstd_t.numpy(), rtol=tol)
    np.testing.assert_allclose(np.moveaxis(dx, axis, 1), xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=tol, atol=tol)


def test_eps_zero_in_the_split_phases_and_the_layer():
    """The same rule where pybn computes invstd itself (batch_norm_invstd: SyncBatchNorm's
    path) and through nn.BatchNorm(eps=0)."""
    x = data((8, C), np.float64)
    x[:, 0] = -1.0
    stats = pybn.batch_norm_stats(x)
    invstd = pybn.batch_norm_invstd(stats, eps=0.0)
    var = x.var(axis=0)
    assert invstd[0] == 0.0
    np.testing.assert_allclose(invstd[1:], 1 / np.sqrt(var[1:]), rtol=1e-14)
    y = pybn.batch_norm_apply(x, stats.mean, invstd)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    layer = pybn.nn.BatchNorm(C, eps=0.0, dtype="float64")
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
    assert np.all(np.isfinite(layer.backward(np.ones_like(x))))


# --------------------------------------------------------------------------- odd arrays

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_arrays_in_the_other_byte_order_are_read_as_their_values(dtype):
    """'>f4' is float32: read-only inputs in the non-native byte order give the results of
    the native arrays (they were a TypeError, 'dtype >f4 is not supported')."""
    x, w, rv = data((4, C, 5), dtype), data((C,), dtype, 1) + 2, np.abs(data((C,), dtype, 2)) + 0.5
    other = np.dtype(dtype).newbyteorder()
    swapped = {k: v.astype(other) for k, v in dict(x=x, w=w, rv=rv).items()}
    assert swapped["x"].dtype != dtype and np.array_equal(swapped["x"], x)
    for got, want in [
        (pybn.batch_norm_train(swapped["x"], swapped["w"]).y, pybn.batch_norm_train(x, w).y),
        (pybn.batch_norm_infer(swapped["x"], swapped["w"], swapped["rv"]), pybn.batch_norm_infer(x, w, rv)),
        (pybn.dropout(swapped["x"], 0.3, seed=5), pybn.dropout(x, 0.3, seed=5)),
        (pybn.batch_norm_stats(swapped["x"]).m2, pybn.batch_norm_stats(x).m2),
    ]:
        assert got.dtype == want.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, want)


def test_memory_mapped_input_and_output(tmp_path):
    """A read-only memmap as x, a writeable one as out= (the kernels write the file)."""
    x = data((4, C, 5))
    x.tofile(tmp_path / "x.bin")
    xm = np.memmap(tmp_path / "x.bin", np.float32, "r", shape=x.shape)
    out = np.memmap(tmp_path / "y.bin", np.float32, "w+", shape=x.shape)
    want = pybn.batch_norm_infer(x, np.zeros(C, np.float32), np.ones(C, np.float32))
    assert pybn.batch_norm_infer(xm, np.zeros(C, np.float32), np.ones(C, np.float32), out=out) is out
    out.flush()
    np.testing.assert_array_equal(np.fromfile(tmp_path / "y.bin", np.float32).reshape(x.shape), want)
    np.testing.assert_array_equal(pybn.dropout(xm, 0.5, seed=1), pybn.dropout(x, 0.5, seed=1))


@pytest.mark.parametrize("shape,axis", [((8, 5, 33), 1), ((8, 33, 5), -1), ((16, 8, 40, 40), 1)],
                         ids=["NCL", "NLC", "NCHW"])
def test_out_may_be_exactly_any_one_input_of_the_backward(isa, threads, shape, axis):
    """dx written over dy, x or y (the relu mask) gives the dx of a separate output: every
    pass reads an element before its own dx is written."""
    x, dy = data(shape), data(shape, seed=1)
    w = np.abs(data((shape[axis],), seed=2)) + 0.5
    y, mean, invstd = pybn.batch_norm_train(x, w, axis=axis, relu=True)
    want = pybn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, y=y).dx
    sums = pybn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis, y=y)
    count = x.size // shape[axis]
    for name in ("dy", "x", "y"):
        args = dict(dy=dy.copy(), x=x.copy(), y=y.copy())
        got = pybn.batch_norm_backward(args["dy"], args["x"], mean, invstd, w, axis=axis, y=args["y"],
                                       out=args[name]).dx
        assert got is args[name]
        np.testing.assert_array_equal(got, want, err_msg=f"out={name}")
        args = dict(dy=dy.copy(), x=x.copy(), y=y.copy())
        got = pybn.batch_norm_backward_apply(args["dy"], args["x"], mean, invstd, sums.sum_dy, sums.sum_dy_xhat,
                                             count, w, axis=axis, y=args["y"], out=args[name])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"apply, out={name}")


# --------------------------------------------------------------------------- merging statistics

def test_merged_integer_counts_past_2_63_are_exact():
    """The total of integer counts is a Python int (an int64 sum wrapped to -2**63)."""
    for counts in (np.array([2**62, 2**62], np.int64), np.array([2**63, 2**63], np.uint64)):
        stats = pybn.batch_norm_merge_stats(counts, np.ones((2, C)), np.zeros((2, C)))
        assert stats.count == 2 * int(counts[0])
        np.testing.assert_array_equal(stats.mean, 1.0)
        # a total past 2**64 normalizes as any count (its float64 value)
        m2 = np.full((2, C), float(counts[0]))
        np.testing.assert_array_equal(pybn.batch_norm_invstd(stats._replace(m2=m2.sum(axis=0)), eps=0), 1.0)


@pytest.mark.parametrize("counts, total", [
    (np.full((2, C), 2**62 + 2**61, np.int64), np.float64(2 * (2**62 + 2**61))),   # past int64: float64
    (np.full((2, C), 2**63, np.uint64), np.float64(2**64)),                       # past uint64: float64
    (np.full((2, C), 2**62, np.uint64), np.uint64(2**63)),                        # fits: the counts' dtype
    (np.full((3, C), 5, np.int64), np.int64(15)),
    (np.full((3, C), 100, np.int8), np.int64(300)),                               # NumPy's int64 sum
    (np.full((2, C), 2**31 - 1, np.int32), np.int64(2**32 - 2))])
def test_merged_per_channel_integer_counts_do_not_wrap(counts, total):
    """The (W, C) form summed in the counts' dtype, which wrapped (2 * 2**63 gave 0 in uint64;
    int64 totals came out negative and batch_norm_invstd called every worker empty); exact
    totals are NumPy's integer sums."""
    stats = pybn.batch_norm_merge_stats(counts, np.ones((counts.shape[0], C)), np.ones((counts.shape[0], C)))
    assert stats.count.dtype == total.dtype
    np.testing.assert_array_equal(stats.count, np.full(C, total))
    invstd = pybn.batch_norm_invstd(stats._replace(m2=stats.count.astype(np.float64) * 4), eps=0)
    np.testing.assert_allclose(invstd, 0.5, rtol=1e-15)


def test_merging_infinite_means_gives_what_float64_numpy_gives_on_the_whole_batch():
    """+inf in one worker's channel: the merged mean is +inf (Chan's delta form gave
    inf - inf = NaN), +inf and -inf give NaN, and m2 is NaN as sum((x - mean)**2) is."""
    parts = [np.array([[np.inf, 1.0, np.inf], [2.0, 3.0, 0.0]]),
             np.array([[5.0, 2.0, -np.inf], [1.0, 1.0, 7.0], [0.0, 4.0, 1.0]]),
             np.zeros((0, C))]
    rows = []
    for p in parts:
        with np.errstate(invalid="ignore"):
            mean = p.mean(axis=0) if len(p) else np.zeros(C)
            rows.append((len(p), mean, ((p - mean) ** 2).sum(axis=0)))
    with np.errstate(invalid="ignore"):
        stats = pybn.batch_norm_merge_stats(*map(np.array, zip(*rows)))
        whole = np.concatenate(parts)
        want_mean = whole.mean(axis=0)
        want_m2 = ((whole - want_mean) ** 2).sum(axis=0)
    assert stats.count == 5
    np.testing.assert_array_equal(stats.mean, want_mean)   # [inf, 2.2, nan]
    np.testing.assert_allclose(stats.m2, want_m2)          # [nan, 4.8, nan]
    assert np.isinf(stats.mean[0]) and np.isnan(stats.mean[2]) and np.isnan(stats.m2[0])


# --------------------------------------------------------------------------- numbers

def test_a_fraction_is_a_real_number():
    """p, eps, momentum accept any numbers.Real ('p: must be a real number, got Fraction')."""
    x = data((4, C, 5))
    np.testing.assert_array_equal(pybn.dropout(x, fractions.Fraction(1, 4), seed=3), pybn.dropout(x, 0.25, seed=3))
    assert pybn.dropout_scale(fractions.Fraction(1, 2)) == 2.0
    got = pybn.batch_norm_train(x, eps=fractions.Fraction(1, 1000))
    np.testing.assert_array_equal(got.y, pybn.batch_norm_train(x, eps=1e-3).y)
    assert math.isclose(pybn.nn.Dropout(fractions.Fraction(1, 3), seed=1).p, 1 / 3)
