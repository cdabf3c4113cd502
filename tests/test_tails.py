"""Tails and alignment: every kernel on lengths 1..67 at every alignment offset, with the
input ending exactly where its allocation ends, so an out-of-bounds vector load or store is
caught by AddressSanitizer (.ci/sanitize runs this file in a sanitized build) and shows up
here as a wrong value otherwise. Results are checked against float64 NumPy formulas."""
import numpy as np
import pytest

import pybn
from reference import assert_bits_equal, nearest_even
from reference_dropblock import drop_block_ref, keep_ref
from reference_dropout import keep_mask, scale_for
from reference_noise import normal_variates

LENGTHS = range(1, 68)
DTYPES = [np.float32, np.float64, np.float16]
try:  # bfloat16 is ml_dtypes' (optional)
    import ml_dtypes
    DTYPES.append(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    pass
DTYPES = [np.dtype(dt) for dt in DTYPES]
DTYPE_IDS = [dt.name for dt in DTYPES]


def scaled(x, p):
    """x * dropout_scale(p) as the kernels give it: in x's dtype, or for 16-bit x the exact
    product with the scale rounded to float32, rounded once to x's dtype."""
    if x.dtype.itemsize == 2:
        return nearest_even(x.astype(np.float64) * np.float64(scale_for(p, np.float32)), x.dtype)
    return x * scale_for(p, x.dtype)


def times(x, s):
    """x * s as dropout's kernel gives it for a scale s (alpha dropout's backward passes its a):
    s rounded to x's compute type (float32 for 16-bit x) and the exact product rounded once."""
    if x.dtype.itemsize == 2:
        return nearest_even(x.astype(np.float64) * np.float64(np.float32(s)), x.dtype)
    return x * x.dtype.type(s)


def relu(x):
    return np.where(x < 0, np.zeros(1, x.dtype), x)


ALPHA = 1.7580993408473766  # SELU's lambda * alpha, as torch


def alpha_coefficients(p):
    """(a, b, c) of alpha dropout in float64 (torch's formula, with the 16-bit test's p)."""
    q = np.floor(p * 65536) / 65536
    a = 1 / np.sqrt((ALPHA * ALPHA * q + 1) * (1 - q))
    return a, ALPHA * a * q, ALPHA * a


def alpha_dropped(x, keep, p):
    """keep ? a*x + b : b - c, each operation in x's compute type, then one rounding."""
    a, b, c = alpha_coefficients(p)
    t = np.float64 if x.dtype == np.float64 else np.float32
    y = np.where(keep, x.astype(t) * t(a) + t(b), t(b) - t(c)).astype(t)
    return y if x.dtype.itemsize > 2 else nearest_even(y.astype(np.float64), x.dtype)


def gaussian(x, z, sigma, multiply):
    """x * (1 + sigma*z) or x + sigma*z for the float32 variates z: in float64 for float64 x,
    else in float32 (the 16-bit product exact, each result rounded once to x's dtype)."""
    if x.dtype == np.float64:
        z = z.astype(np.float64)
        return x * (1 + sigma * z) if multiply else x + sigma * z
    noise = np.float32(1) + np.float32(sigma) * z if multiply else np.float32(sigma) * z
    if x.dtype == np.float32:
        return x * noise if multiply else x + noise
    exact = x.astype(np.float64) * noise.astype(np.float64) if multiply else (x.astype(np.float32) + noise)
    return nearest_even(exact.astype(np.float64), x.dtype)


def tolerance(dtype):
    """Of results normalized to about 1: a few units of dtype's last place."""
    return {2: 1e-2 if dtype.name == "bfloat16" else 2e-3, 4: 1e-4, 8: 1e-10}[dtype.itemsize]


def at_end(values, offset):
    """`values` copied to the end of a fresh allocation, starting `offset` elements past an
    allocation boundary (NumPy aligns to 16 bytes or more): every alignment in a vector."""
    buf = np.empty(offset + values.size, values.dtype)
    out = buf[offset:].reshape(values.shape)
    out[...] = values
    return out


def offsets(dtype):
    return range(64 // np.dtype(dtype).itemsize)  # every element position in a 64-byte line


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_norm_tails(isa, dtype):
    rng = np.random.default_rng(1)
    for n in LENGTHS:
        for off in offsets(dtype)[:: 3 if n > 20 else 1]:
            # rows of n, channels-last, 1 channel (rows of n; and a period of one position)
            for shape, axis in (((2, n), 0), ((n, 2), 1), ((2, 1, n), 1), ((n, 1), 1)):
                x = at_end(rng.standard_normal(shape).astype(dtype), off)
                xs = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
                mean, var = xs.mean(0), xs.var(0)
                bshape = [1] * x.ndim
                bshape[axis] = -1
                want = (x.astype(np.float64) - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5)
                tol = tolerance(dtype)
                if xs.shape[0] >= 2:
                    got = pybn.batch_norm_train(x, axis=axis)
                    np.testing.assert_allclose(got.y.astype(np.float64), want, rtol=tol, atol=tol)
                    dy = at_end(np.ones_like(x), off)
                    dx = pybn.batch_norm_backward(dy, x, got.mean, got.invstd, axis=axis).dx
                    np.testing.assert_allclose(dx.astype(np.float64), 0, atol=tol * 10)  # d/dx of sum(y) is 0
                    # the split kernels: statistics, two workers' merged, normalization, backward
                    stats = pybn.batch_norm_stats(x, axis=axis)
                    assert stats.count == xs.shape[0]
                    np.testing.assert_allclose(stats.mean, mean, rtol=tol, atol=tol)
                    np.testing.assert_allclose(stats.m2, var * xs.shape[0], rtol=tol, atol=tol)
                    merged = pybn.batch_norm_merge_stats([stats.count] * 2, np.stack([mean] * 2),
                                                         np.stack([var * xs.shape[0]] * 2))
                    np.testing.assert_allclose(merged.mean, mean, rtol=tol, atol=tol)
                    np.testing.assert_allclose(merged.m2, 2 * var * xs.shape[0], rtol=tol, atol=tol)
                    invstd = pybn.batch_norm_invstd(stats)
                    np.testing.assert_allclose(invstd, 1 / np.sqrt(var + 1e-5), rtol=tol)
                    y = pybn.batch_norm_apply(x, mean, 1 / np.sqrt(var + 1e-5), axis=axis,
                                              out=at_end(np.empty_like(x), off))
                    np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)
                    sums = pybn.batch_norm_backward_reduce(dy, x, mean, 1 / np.sqrt(var + 1e-5), axis=axis)
                    np.testing.assert_allclose(sums.sum_dy, xs.shape[0], rtol=tol)  # sum of ones
                    np.testing.assert_allclose(sums.sum_dy_xhat, 0, atol=tol * xs.shape[0])  # sum of xhat
                    dx = pybn.batch_norm_backward_apply(dy, x, mean, 1 / np.sqrt(var + 1e-5), sums.sum_dy,
                                                        sums.sum_dy_xhat, stats.count, axis=axis)
                    np.testing.assert_allclose(dx.astype(np.float64), 0, atol=tol * 10)
                rm, rv = mean.astype(dtype), var.astype(dtype)  # statistics of x's dtype
                want = ((x.astype(np.float64) - rm.astype(np.float64).reshape(bshape))
                        / np.sqrt(rv.astype(np.float64).reshape(bshape) + 1e-5))
                y = pybn.batch_norm_infer(x, rm, rv, axis=axis, out=at_end(np.empty_like(x), off))
                np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_tails(isa, dtype):
    rng = np.random.default_rng(2)
    for n in LENGTHS:
        keep = keep_mask((n,), 0.5, 7, 3)
        for off in offsets(dtype):
            x = at_end(rng.standard_normal(n).astype(dtype), off)
            want = np.where(keep, scaled(x, 0.5), np.zeros(1, dtype))
            got = pybn.dropout(x, 0.5, seed=7, offset=3, out=at_end(np.empty_like(x), off))
            np.testing.assert_array_equal(got, want)
            mask = pybn.dropout_mask((n,), 0.5, seed=7, offset=3)
            np.testing.assert_array_equal(np.unpackbits(mask, count=n, bitorder="little"), keep)
            mask_at_end = at_end(mask, off % 8)
            np.testing.assert_array_equal(pybn.dropout_apply(x, mask_at_end, 0.5), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_dropout_tails(isa, dtype):
    rng = np.random.default_rng(8)
    for n in LENGTHS:
        keep = keep_mask((n,), 0.5, 7, 3)
        for off in offsets(dtype):
            x = at_end(rng.standard_normal(n).astype(dtype), off)
            want = np.where(keep, scaled(relu(x), 0.5), np.zeros(1, dtype))
            got = pybn.dropout(x, 0.5, seed=7, offset=3, relu=True, out=at_end(np.empty_like(x), off))
            np.testing.assert_array_equal(got, want)
            mask_at_end = at_end(pybn.dropout_mask((n,), 0.5, seed=7, offset=3), off % 8)
            np.testing.assert_array_equal(pybn.dropout_apply(x, mask_at_end, 0.5, relu=True), want)
            dy = at_end(rng.standard_normal(n).astype(dtype), off)
            got = pybn.relu_dropout_backward(dy, at_end(want, off), 0.5, out=at_end(np.empty_like(x), off))
            np.testing.assert_array_equal(got, np.where(want > 0, scaled(dy, 0.5), np.zeros(1, dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_drop_path_tails(isa, dtype):
    rng = np.random.default_rng(9)
    for n in LENGTHS:
        for off in offsets(dtype)[:: 3 if n > 20 else 1]:
            # rows of n (one decision per row, broadcast along it), and n rows of 3
            for shape in ((2, n), (n, 3)):
                x = at_end(rng.standard_normal(shape).astype(dtype), off)
                for mode, keep in (("row", keep_mask((shape[0],), 0.5, 7, 3)[:, None]),
                                   ("batch", keep_mask((1,), 0.5, 7, 3))):
                    want = np.where(keep, scaled(x, 0.5), np.zeros(1, dtype))
                    got = pybn.drop_path(x, 0.5, seed=7, offset=3, mode=mode, out=at_end(np.empty_like(x), off))
                    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_alpha_dropout_tails(isa, dtype):
    rng = np.random.default_rng(10)
    a = alpha_coefficients(0.5)[0]
    for n in LENGTHS:
        keep = keep_mask((n,), 0.5, 7, 3)
        for off in offsets(dtype):
            x = at_end(rng.standard_normal(n).astype(dtype), off)
            got = pybn.alpha_dropout(x, 0.5, seed=7, offset=3, out=at_end(np.empty_like(x), off))
            assert_bits_equal(got, alpha_dropped(x, keep, 0.5))
            got = pybn.alpha_dropout_backward(x, 0.5, seed=7, offset=3, out=at_end(np.empty_like(x), off))
            np.testing.assert_array_equal(got, np.where(keep, times(x, a), np.zeros(1, dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gaussian_tails(isa, dtype):
    rng = np.random.default_rng(11)
    s = np.sqrt(0.3 / 0.7)  # gaussian_dropout's stddev for rate 0.3 (Keras')
    for n in LENGTHS:
        z = normal_variates(n, 7, 48)
        for off in offsets(dtype):
            x = at_end(rng.standard_normal(n).astype(dtype), off)
            got = pybn.gaussian_dropout(x, 0.3, seed=7, offset=48, out=at_end(np.empty_like(x), off))
            assert_bits_equal(got, np.asarray(gaussian(x, z, s, True), dtype))
            got = pybn.gaussian_noise(x, 0.7, seed=7, offset=48, out=at_end(np.empty_like(x), off))
            assert_bits_equal(got, np.asarray(gaussian(x, z, 0.7, False), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fold_tails(isa, dtype):
    rng = np.random.default_rng(3)
    for n in LENGTHS:
        for off in offsets(dtype)[::2]:
            w = at_end(rng.standard_normal((2, n)).astype(dtype), off)
            var = rng.uniform(0.5, 2, n)
            s = 1 / np.sqrt(var + 1e-5)
            got = pybn.fold_bn_linear(w, None, np.zeros(n), var)
            np.testing.assert_array_equal(got.weight, nearest_even(w.astype(np.float64) * s, dtype))
            conv = at_end(rng.standard_normal((3, 1, n)).astype(dtype), off)
            s3 = 1 / np.sqrt(var[:3] + 1e-5)
            got = pybn.fold_conv_bn(conv, None, np.zeros(3), var[:3]) if n >= 3 else None
            if got is not None:
                np.testing.assert_array_equal(got.weight,
                                              nearest_even(conv.astype(np.float64) * s3[:, None, None], dtype))


# noise_shape patterns: (x shape, noise shape). Each is applied by the broadcast kernel as
# (f0, b1, f2, b3) runs of drawn and broadcast axes, except the last, whose five alternating
# runs take the NumPy path; run lengths around the vector widths test the tails.
NOISE_CASES = [
    ((3, 5, 7, 9), (3, 5, 1, 1)),     # Dropout2d: one bit per run of 63
    ((4, 6, 17), (4, 6, 1)),          # Dropout1d
    ((2, 3, 4, 5), (1, 3, 1, 1)),     # the same channels dropped in every sample
    ((5, 7, 33), (5, 1, 33)),         # shared along the middle axis
    ((6, 19), (1, 19)),               # shared along the batch
    ((6, 19), (6, 1)),
    ((2, 9, 1, 16), (2, 1, 1, 16)),   # a size-1 axis is either kind
    ((3, 4, 5), (1, 1, 1)),           # one bit for everything
    ((2, 3, 2, 3, 2), (2, 1, 2, 1, 2)),  # f b f b f: the NumPy path
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,noise", NOISE_CASES, ids=[f"{s}-{n}" for s, n in NOISE_CASES])
def test_noise_shape_patterns(isa, threads, dtype, shape, noise):
    rng = np.random.default_rng(4)
    for off in (0, 1, 3):
        x = at_end(rng.standard_normal(shape).astype(dtype), off)
        keep = keep_mask(shape, 0.3, 11, 5, noise_shape=noise)
        want = np.where(keep, scaled(x, 0.3), np.zeros(1, dtype))
        got = pybn.dropout(x, 0.3, seed=11, offset=5, noise_shape=noise, out=at_end(np.empty_like(x), off))
        assert_bits_equal(got, want)  # dropped values are +0.0, whatever x's sign
        mask = pybn.dropout_mask(noise, 0.3, seed=11, offset=5)
        assert_bits_equal(pybn.dropout_apply(x, mask, 0.3, noise_shape=noise), want)


def test_noise_shape_large_streams_and_splits(isa, threads):
    # large enough for 2 threads and non-temporal stores: (N, C, 1, 1) and (1, C, H, W) masks
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 32, 48, 50)).astype(np.float32)  # 4.9 MB
    for noise in ((16, 32, 1, 1), (1, 32, 48, 50), (16, 1, 48, 50)):
        keep = keep_mask(x.shape, 0.5, 2, 0, noise_shape=noise)
        got = pybn.dropout(x, 0.5, seed=2, noise_shape=noise)
        assert_bits_equal(got, np.where(keep, x * np.float32(2), np.float32(0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_large_streams_at_every_alignment(isa, threads, dtype):
    # past the streaming threshold (4 MB): the fused forward writes cache-line-aligned vectors
    # whose keep bits straddle groups of 128; every output alignment, a length that ends
    # mid-group and mid-vector, two thread ranges
    n = (5 << 20) // np.dtype(dtype).itemsize + 77
    rng = np.random.default_rng(6)
    x = rng.standard_normal(n + 16).astype(dtype)
    keep = keep_mask((n,), 0.25, 2**40 + 9, 2**64 - 40)
    for off in offsets(dtype):
        xs = x[off % 3: off % 3 + n]
        want = np.where(keep, scaled(xs, 0.25), np.zeros(1, dtype))
        out = at_end(np.empty(n, dtype), off)
        got = pybn.dropout(xs, 0.25, seed=2**40 + 9, offset=2**64 - 40, out=out)
        assert got is out
        assert_bits_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES[2:], ids=DTYPE_IDS[2:])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_16bit_batch_norm_large_streams_at_every_alignment(isa, threads, dtype, layout):
    # 16-bit outputs past the streaming threshold (4 MB) are written with non-temporal
    # stores after a head up to a vector boundary: row mode (rows of 997, so every row has a
    # head and a tail) and period mode (channels-last), every output alignment in a line
    # and in place. The elementwise results depend on the values alone, so they must equal
    # those of the same rows computed in pieces under the threshold (never streamed).
    rng = np.random.default_rng(9)
    shape, axis = ((6, 360, 997), 1) if layout == "nchw" else ((2240, 1000), -1)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    pieces = np.array_split(np.arange(shape[0]), 8)
    want = np.concatenate([pybn.batch_norm_infer(x[i], mean, var, w, b, axis=axis) for i in pieces])
    assert want[pieces[0]].nbytes < 4 << 20 <= want.nbytes
    for off in offsets(dtype)[::3]:
        got = pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, out=at_end(np.empty_like(x), off))
        assert_bits_equal(got, want)
    inplace = x.copy()
    assert pybn.batch_norm_infer(inplace, mean, var, w, b, axis=axis, out=inplace) is inplace
    assert_bits_equal(inplace, want)


def test_misaligned_inputs_give_the_aligned_results(isa):
    # arrays viewed at an odd byte offset (flags.aligned False) are copied, not read in place;
    # large enough that the outputs are streamed
    from error_checks import misaligned
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 8, 200, 170)).astype(np.float32)  # 4.4 MB
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    mx, mm, mv = misaligned(x), misaligned(mean), misaligned(var)
    assert_bits_equal(pybn.dropout(mx, 0.5, seed=3), pybn.dropout(x, 0.5, seed=3))
    mask = pybn.dropout_mask(x.shape, 0.5, seed=3)
    assert_bits_equal(pybn.dropout_apply(mx, mask, 0.5), pybn.dropout_apply(x, mask, 0.5))
    assert_bits_equal(pybn.batch_norm_infer(mx, mm, mv), pybn.batch_norm_infer(x, mean, var))
    got, want = pybn.batch_norm_train(mx), pybn.batch_norm_train(x)
    assert_bits_equal(got.y, want.y)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert_bits_equal(pybn.batch_norm_backward(misaligned(dy), mx, want.mean, want.invstd).dx,
                      pybn.batch_norm_backward(dy, x, want.mean, want.invstd).dx)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    assert_bits_equal(pybn.fold_conv_bn(misaligned(w), None, mm, mv).weight,
                      pybn.fold_conv_bn(w, None, mean, var).weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_drop_block_on_every_row_and_column_length(isa, dtype):
    """drop_block's mask kernel on maps of 1..67 rows or columns (seed and keep masks of every
    length in bytes, planes that end inside a byte), and its apply on the same tails."""
    rng = np.random.default_rng(5)
    for n in LENGTHS:
        for shape, options in [((1, 1, 1, n), {}), ((2, 1, n, 1), {}), ((1, 3, 2, n), dict(couple_channels=False))]:
            x = at_end(rng.standard_normal(shape).astype(dtype), n % 3)
            assert_bits_equal(pybn.drop_block(x, 0.4, block_size=3, seed=n, **options),
                              drop_block_ref(x, 0.4, 3, n, **options))
            keep = keep_ref(shape, 0.4, 3, n, **options)
            mask = pybn.drop_block_mask(shape, 0.4, block_size=3, seed=n, **options)
            np.testing.assert_array_equal(np.unpackbits(mask, count=keep.size, bitorder="little"), keep.reshape(-1))
