"""Outputs past the streaming threshold written row by row, with rows that start and end
inside cache lines: non-temporal stores may cover only the whole lines of a row, the rest is
stored ordinarily (csrc/kernels/channel_loops.h, for_each_vector). Each large result is
compared bit for bit with per-sample calls small enough not to stream, for float32 and the
16-bit types, with the output at element offsets 0, 1 and 3 of its buffer: batch-norm
inference over NCHW rows of 7x7, and the broadcast dropout masks over the same rows
(noise_shape (N, C, 1, 1): one bit per row) and over channels-last rows of 2000 elements
(noise_shape (N, 1, 1, C): one bit per element)."""
import numpy as np
import pytest

import pybn
from streamed_outputs import OFFSETS, STREAM_BYTES, bits, out_at, streamed_batch

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
NCHW_7x7 = (streamed_batch((2048, 7, 7)), 2048, 7, 7)       # rows of 49 elements, 200 KB a sample in 16 bits
NHWC_2000 = (streamed_batch((7, 7, 2000)), 7, 7, 2000)      # rows of 2000 elements (4000 bytes in 16 bits)
P = 0.25


def assert_streamed(shape, dtype):
    itemsize = np.dtype(dtype).itemsize
    assert int(np.prod(shape)) * itemsize >= STREAM_BYTES
    assert int(np.prod(shape[1:])) * itemsize < STREAM_BYTES


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_norm_infer_rows_of_7x7(isa, threads, dtype, offset, rng):
    assert_streamed(NCHW_7x7, dtype)
    c = NCHW_7x7[1]
    x = rng.standard_normal(NCHW_7x7).astype(dtype)
    mean, w, b = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    y = pybn.batch_norm_infer(x, mean, var, w, b, relu=True, out=out_at(offset, NCHW_7x7, dtype))
    for n in range(NCHW_7x7[0]):
        want = pybn.batch_norm_infer(x[n:n + 1], mean, var, w, b, relu=True)
        np.testing.assert_array_equal(bits(y[n:n + 1]), bits(want), err_msg=f"sample {n}")


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_one_bit_per_row_of_7x7(isa, threads, dtype, offset, rng):
    assert_streamed(NCHW_7x7, dtype)
    n_, c = NCHW_7x7[:2]
    x = rng.standard_normal(NCHW_7x7).astype(dtype)
    mask = pybn.dropout_mask((n_, c, 1, 1), P, seed=7)
    y = pybn.dropout_apply(x, mask, P, noise_shape=(n_, c, 1, 1), out=out_at(offset, NCHW_7x7, dtype))
    per = c // 8  # mask bytes of one sample (c is a multiple of 8)
    for n in range(n_):
        want = pybn.dropout_apply(x[n:n + 1], mask[n * per:(n + 1) * per], P, noise_shape=(1, c, 1, 1))
        np.testing.assert_array_equal(bits(y[n:n + 1]), bits(want), err_msg=f"sample {n}")
    kept = np.unpackbits(mask, bitorder="little")[:n_ * c].reshape(n_, c).astype(bool)
    assert 0 < kept.sum() < kept.size  # both branches ran
    assert (bits(y)[~kept] == 0).all()


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_one_bit_per_element_of_channels_last_rows(isa, threads, dtype, offset, rng):
    assert_streamed(NHWC_2000, dtype)
    n_, c = NHWC_2000[0], NHWC_2000[-1]
    x = rng.standard_normal(NHWC_2000).astype(dtype)
    mask = pybn.dropout_mask((n_, 1, 1, c), P, seed=11)
    y = pybn.dropout_apply(x, mask, P, noise_shape=(n_, 1, 1, c), out=out_at(offset, NHWC_2000, dtype))
    per = c // 8
    for n in range(n_):
        want = pybn.dropout_apply(x[n:n + 1], mask[n * per:(n + 1) * per], P, noise_shape=(1, 1, 1, c))
        np.testing.assert_array_equal(bits(y[n:n + 1]), bits(want), err_msg=f"sample {n}")
