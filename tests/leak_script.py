"""Calls every pybn kernel a few times, on one and on two threads, including calls that
fail validation: the script tests/test_memory.py runs under valgrind (or LeakSanitizer)
to look for memory that pybn's compiled module allocates and never frees.

    PYBN_ISA=avx2 PYTHONMALLOC=malloc valgrind --leak-check=full python tests/leak_script.py
"""
import contextlib

import numpy as np

# ml_dtypes (bfloat16) is imported first, as NumPy is: pybn's module looks it up when it
# meets bfloat16 data, and the allocations and memcheck reports of ml_dtypes' own import
# would otherwise sit under pybn's frame. Only pybn's code is under test here.
with contextlib.suppress(ImportError):
    import ml_dtypes  # noqa: F401

import pybn
import pybn.nn


def run_every_kernel(x, dtype):
    c = x.shape[1]
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = np.zeros(c, dtype)
    rv = np.ones(c, dtype)
    y, mean, invstd = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, relu=True)
    xt = x.copy()
    pybn.batch_norm_train(xt, axis=-1, out=xt)
    pybn.batch_norm_infer(x, rm, rv, w, b, relu=True)
    pybn.batch_norm_backward(x, x, mean, invstd, w, y=y)
    pybn.batch_norm_backward(x, x, mean, invstd, w, training=False)
    stats = pybn.batch_norm_stats(x)
    merged = pybn.batch_norm_merge_stats([stats.count, stats.count], np.stack([stats.mean] * 2),
                                         np.stack([stats.m2] * 2))
    s = pybn.batch_norm_invstd(merged)
    pybn.batch_norm_apply(x, mean, s, w, b, relu=True)
    sums = pybn.batch_norm_backward_reduce(x, x, mean, invstd, y=y)
    pybn.batch_norm_backward_apply(x, x, mean, invstd, sums.sum_dy, sums.sum_dy_xhat, stats.count, w, y=y)
    pybn.dropout(x, 0.3, seed=1, offset=2**64 - 16)
    pybn.dropout(x, 0.3, seed=1, noise_shape=(x.shape[0], c) + (1,) * (x.ndim - 2))
    mask = pybn.dropout_mask(x.shape, 0.3, seed=2)
    pybn.dropout_apply(x, mask, 0.3)
    yr = pybn.dropout(x, 0.3, seed=1, offset=2**64 - 16, relu=True)
    pybn.relu_dropout_backward(x, yr, 0.3)
    pybn.dropout_apply(x, mask, 0.3, relu=True)
    pybn.drop_path(x, 0.3, seed=6, offset=2**64 - 16)
    pybn.drop_path(x, 0.3, seed=6, mode="batch", out=yr)
    x4 = rng.standard_normal((2, c, 9, 7)).astype(dtype)
    pybn.drop_block(x4, 0.3, block_size=3, seed=4)
    pybn.drop_block(x4, 0.3, block_size=2, seed=4, couple_channels=False, out=x4)
    pybn.drop_block_mask(x4.shape, 0.3, block_size=3, seed=4)
    pybn.alpha_dropout(x, 0.3, seed=5, offset=2**64 - 16)
    pybn.alpha_dropout_backward(x, 0.3, seed=5)
    pybn.gaussian_dropout(x, 0.3, seed=5, offset=2**64 - 16)
    pybn.gaussian_noise(x, 0.5, seed=5)
    res = pybn.batch_norm_train(x, w, b, relu=True, residual=x)
    pybn.batch_norm_infer(x, rm, rv, w, b, relu=True, residual=x)
    pybn.batch_norm_backward(x, x, res.mean, res.invstd, w, y=res.y, residual=True)
    pybn.fold_conv_bn(rng.standard_normal((c, 4, 3, 3)).astype(dtype), b, rm, rv, w, b)
    pybn.fold_conv_bn(rng.standard_normal((c, 1, 3)).astype(dtype), None, rm, rv, transposed=True, groups=c)
    pybn.fold_bn_linear(rng.standard_normal((7, c)).astype(dtype), None, rm, rv, w, b)
    layer = pybn.nn.BatchNorm(c, dtype=dtype)
    layer.backward(layer(x))
    drop = pybn.nn.Dropout(0.5, seed=3)
    drop.backward(drop(x))
    for bad in (lambda: pybn.batch_norm_train(x.astype(np.int32)),
                lambda: pybn.batch_norm_infer(x, rm[:-1], rv),
                lambda: pybn.dropout(x, 2.0, seed=1),
                lambda: pybn.dropout_apply(x, mask[:-1], 0.3)):
        with contextlib.suppress(TypeError, ValueError):
            bad()


def main():
    rng = np.random.default_rng(1)
    for threads in (1, 2):
        pybn.set_num_threads(threads)
        for dtype in (np.float32, np.float64):
            for shape in [(4, 3, 5), (2, 7), (4, 16, 24, 24), (1100, 33)]:   # the last two: threads, period mode
                x = rng.standard_normal(shape).astype(dtype)
                for _ in range(2):
                    run_every_kernel(x, dtype)
    print("leak script done")


if __name__ == "__main__":
    main()
