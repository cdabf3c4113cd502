"""The pipelined channel blocks (csrc/kernels/channel_loops.h, pipelined_channel_blocks):
NCHW arrays of more than 24 MB per pass are trained in blocks of channels, each thread
reading the next block's statistics between the writes of the current one. A block writes
only its own channels, so outputs written over the inputs (out=x, out=dy) must leave the
next block's reads untouched, and 16-bit storage takes the same schedule. Block sizes come
from the CPU's caches; the comments give them for a 1 MB L2 and a 32 MB L3 (2 threads:
blocks of 2 channels, the last of 37 a single one)."""
import numpy as np
import pytest

import pybn
from test_half_dtypes import HALF, IDS as HALF_IDS, assert_near

EPS = 1e-5
FORWARD = (16, 37, 112, 112)   # 29.7 MB of float32: the training forward is blocked
BACKWARD = (8, 37, 96, 96)     # x, dy and y: 32.7 MB a pass of the backward with a ReLU mask
HALF_FORWARD = (32, 37, 112, 112)  # 29.7 MB of 16-bit storage


def params(rng, c):
    return rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def same_bits(got, want):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


def test_training_forward_in_place(isa, threads, rng):
    """out=x with a residual and a ReLU: the bits of the out-of-place call."""
    x = rng.standard_normal(FORWARD, np.float32)
    r = rng.standard_normal(FORWARD, np.float32)
    w, b = params(rng, FORWARD[1])
    want = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    got = pybn.batch_norm_train(x, w, b, relu=True, residual=r, out=x)
    assert got.y is x
    for g, e in zip(got, want):
        same_bits(g, e)


def test_backward_in_place(isa, threads, rng):
    """dx written over dy, and d_residual over dy too, the ReLU mask from y: the bits of the
    out-of-place call, on a blocked backward whose last block is shorter than the others."""
    x = rng.standard_normal(BACKWARD, np.float32)
    dy = rng.standard_normal(BACKWARD, np.float32)
    w, b = params(rng, BACKWARD[1])
    fwd = pybn.batch_norm_train(x, w, b, relu=True)
    want = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True)
    d = dy.copy()
    got = pybn.batch_norm_backward(d, x, fwd.mean, fwd.invstd, w, y=fwd.y, out=d)
    assert got.dx is d
    for g, e in zip(got, want[:3]):
        same_bits(g, e)
    d = dy.copy()
    got = pybn.batch_norm_backward(d, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True, d_residual_out=d)
    assert got.d_residual is d
    for g, e in zip(got, want):
        same_bits(g, e)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_16bit_training_forward(isa, threads, dtype, rng):
    """16-bit x on the blocked schedule: float32 statistics as accurate as the float32 path,
    y within 1 ulp of the float64 result rounded once."""
    x = (rng.standard_normal(HALF_FORWARD) * 2 + 3).astype(dtype)
    w, b = params(rng, HALF_FORWARD[1])
    res = pybn.batch_norm_train(x, w, b)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + EPS)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.invstd, invstd, rtol=1e-6)
    shape = (1, -1, 1, 1)
    mean32, invstd32 = res.mean.astype(np.float64).reshape(shape), res.invstd.astype(np.float64).reshape(shape)
    want = (x64 - mean32) * (invstd32 * w.reshape(shape)) + b.reshape(shape)
    scale = float(np.abs((x64 - mean32) * invstd32 * w.reshape(shape)).max() + np.abs(b).max())
    assert_near(res.y, want, scale, "y")
