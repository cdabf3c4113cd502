"""16-bit outputs past the streaming threshold (non-temporal stores of narrowed vectors) in
the kernels that gained them together with their 16-bit paths: the fused residual, alpha
dropout and the Gaussian noises. Each large result is compared with the same computation on
pieces small enough not to stream, bit for bit, with the output at element offsets 0, 1 and
3 of its buffer (a head before the first aligned vector, then whole streamed vectors)."""
import numpy as np
import pytest

import pybn
from streamed_outputs import OFFSETS, STREAM_BYTES, bits, out_at, streamed_batch
from test_half_dtypes import HALF, IDS as HALF_IDS, assert_near

EPS = 1e-5
N_STREAMED = STREAM_BYTES // 2 + 3 * 128 + 37   # 16-bit elements: past the threshold, odd tail
# NCHW rows and channels-last, each sample (1 MB in 16 bits) well under the threshold
SAMPLES = streamed_batch((32, 130, 130))
LAYOUTS = [((SAMPLES, 32, 130, 130), 1), ((SAMPLES, 130, 130, 32), -1)]
LAYOUT_IDS = ["nchw", "nhwc"]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_streamed_residual_equals_per_sample_results(isa, threads, shape, axis, dtype, offset, rng):
    assert int(np.prod(shape)) * 2 >= STREAM_BYTES
    assert int(np.prod(shape[1:])) * 2 < STREAM_BYTES
    c = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 3, c).astype(np.float32)
    invstd = (1 / np.sqrt(var.astype(np.float64) + EPS)).astype(np.float32)
    for relu in (False, True):
        infer = pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, relu=relu, residual=r,
                                      out=out_at(offset, shape, dtype))
        apply = pybn.batch_norm_apply(x, mean, invstd, w, b, axis=axis, relu=relu, residual=r,
                                      out=out_at(offset, shape, dtype))
        for n in range(shape[0]):
            s = slice(n, n + 1)
            np.testing.assert_array_equal(bits(infer[s]), bits(pybn.batch_norm_infer(
                x[s], mean, var, w, b, axis=axis, relu=relu, residual=r[s])))
            np.testing.assert_array_equal(bits(apply[s]), bits(pybn.batch_norm_apply(
                x[s], mean, invstd, w, b, axis=axis, relu=relu, residual=r[s])))
    # the training forward: within 1 ulp of the float64 value of its own statistics, rounded
    # once (its coefficients are not batch_norm_apply's to the bit)
    train = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, residual=r, out=out_at(offset, shape, dtype))
    bs = [1] * len(shape)
    bs[axis] = -1
    want = ((x.astype(np.float64) - train.mean.astype(np.float64).reshape(bs))
            * (train.invstd.astype(np.float64) * w).reshape(bs) + b.reshape(bs) + r.astype(np.float64))
    assert_near(train.y, np.maximum(want, 0), np.abs(want).max() + np.abs(b).max(), "train")


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_streamed_d_residual_and_dx_equal_small_calls(isa, threads, dtype, offset, rng):
    shape = (4, 32, 130, 130)
    c = shape[1]
    x, r, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    fwd = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True,
                                 out=out_at(offset, shape, dtype), d_residual_out=out_at(offset, shape, dtype))
    np.testing.assert_array_equal(bits(g.d_residual), bits(np.where(fwd.y > 0, dy, 0).astype(dtype)))
    plain = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y)
    np.testing.assert_array_equal(bits(g.dx), bits(plain.dx))


def windows(n):
    """Starts (multiples of 128 elements, whole counter groups of both streams) and lengths of
    pieces at the start, in the middle and at the end of n elements."""
    return [(0, 4096), (128 * (n // 256), 4096 + 77), (128 * ((n - 5000) // 128), n - 128 * ((n - 5000) // 128))]


NOISES = {
    # name: (call(x, seed, offset, out), counters used by the first k elements)
    "alpha_dropout": (lambda x, s, o, out: pybn.alpha_dropout(x, 0.3, seed=s, offset=o, out=out),
                      pybn.counters_used),
    "gaussian_dropout": (lambda x, s, o, out: pybn.gaussian_dropout(x, 0.3, seed=s, offset=o, out=out),
                         pybn.normal_counters_used),
    "gaussian_noise": (lambda x, s, o, out: pybn.gaussian_noise(x, 0.5, seed=s, offset=o, out=out),
                       pybn.normal_counters_used),
}


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", list(NOISES))
def test_streamed_noise_equals_unstreamed_pieces(isa, threads, name, dtype, offset, rng):
    call, counters = NOISES[name]
    n = N_STREAMED
    x = rng.standard_normal(n).astype(dtype)
    seed, base = 2024, 5
    y = call(x, seed, base, out_at(offset, (n,), dtype))
    for start, length in windows(n):
        piece = call(x[start:start + length], seed, base + counters(start), None)
        np.testing.assert_array_equal(bits(y[start:start + length]), bits(piece), err_msg=f"{name} at {start}")
