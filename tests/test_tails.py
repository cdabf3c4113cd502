"""Tails and alignment: every kernel on lengths 1..67 at every alignment offset, with the
input ending exactly where its allocation ends, so an out-of-bounds vector load or store is
caught by AddressSanitizer (.ci/sanitize runs this file in a sanitized build) and shows up
here as a wrong value otherwise. Results are checked against float64 NumPy formulas."""
import numpy as np
import pytest

import pybn
from reference_dropout import keep_mask

LENGTHS = range(1, 68)
DTYPES = [np.float32, np.float64]


def at_end(values, offset):
    """`values` copied to the end of a fresh allocation, starting `offset` elements past an
    allocation boundary (NumPy aligns to 16 bytes or more): every alignment in a vector."""
    buf = np.empty(offset + values.size, values.dtype)
    out = buf[offset:].reshape(values.shape)
    out[...] = values
    return out


def offsets(dtype):
    return range(64 // np.dtype(dtype).itemsize)  # every element position in a 64-byte line


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_tails(isa, dtype):
    rng = np.random.default_rng(1)
    for n in LENGTHS:
        for off in offsets(dtype)[:: 3 if n > 20 else 1]:
            for shape, axis in (((2, n), 0), ((n, 2), 1), ((2, 1, n), 1)):  # rows of n, channels-last, 1 channel
                x = at_end(rng.standard_normal(shape).astype(dtype), off)
                xs = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
                mean, var = xs.mean(0), xs.var(0)
                bshape = [1] * x.ndim
                bshape[axis] = -1
                want = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5)
                tol = 1e-4 if dtype == np.float32 else 1e-10
                if xs.shape[0] >= 2:
                    got = pybn.batch_norm_train(x, axis=axis)
                    np.testing.assert_allclose(got.y, want, rtol=tol, atol=tol)
                    dy = at_end(np.ones_like(x), off)
                    dx = pybn.batch_norm_backward(dy, x, got.mean, got.invstd, axis=axis).dx
                    np.testing.assert_allclose(dx, 0, atol=tol * 10)  # d/dx of sum(y) is 0
                y = pybn.batch_norm_infer(x, mean.astype(dtype), var.astype(dtype), axis=axis,
                                          out=at_end(np.empty_like(x), off))
                np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_tails(isa, dtype):
    rng = np.random.default_rng(2)
    for n in LENGTHS:
        keep = keep_mask((n,), 0.5, 7, 3)
        for off in offsets(dtype):
            x = at_end(rng.standard_normal(n).astype(dtype), off)
            want = np.where(keep, x * dtype(2.0), 0)
            got = pybn.dropout(x, 0.5, seed=7, offset=3, out=at_end(np.empty_like(x), off))
            np.testing.assert_array_equal(got, want)
            mask = pybn.dropout_mask((n,), 0.5, seed=7, offset=3)
            np.testing.assert_array_equal(np.unpackbits(mask, count=n, bitorder="little"), keep)
            mask_at_end = at_end(mask, off % 8)
            np.testing.assert_array_equal(pybn.dropout_apply(x, mask_at_end, 0.5), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_tails(isa, dtype):
    rng = np.random.default_rng(3)
    for n in LENGTHS:
        for off in offsets(dtype)[::2]:
            w = at_end(rng.standard_normal((2, n)).astype(dtype), off)
            var = rng.uniform(0.5, 2, n)
            s = 1 / np.sqrt(var + 1e-5)
            got = pybn.fold_bn_linear(w, None, np.zeros(n), var)
            np.testing.assert_array_equal(got.weight, (w * s).astype(dtype))
            conv = at_end(rng.standard_normal((3, 1, n)).astype(dtype), off)
            s3 = 1 / np.sqrt(var[:3] + 1e-5)
            got = pybn.fold_conv_bn(conv, None, np.zeros(3), var[:3]) if n >= 3 else None
            if got is not None:
                np.testing.assert_array_equal(got.weight, (conv * s3[:, None, None]).astype(dtype))
