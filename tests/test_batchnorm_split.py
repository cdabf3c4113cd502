"""Batch norm in phases (stats / merge / apply, backward reduce / apply): one worker equals
the single-process functions bit for bit; W workers over slices of a batch equal batch
norm over the whole batch (float64 reference and torch autograd)."""
import numpy as np
import pytest
import torch

import pybn
from error_checks import assert_raises_naming

DTYPES = [np.float32, np.float64]


def ref_stats(x, axis):
    xs = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    mean = xs.mean(axis=1)
    return xs.shape[1], mean, ((xs - mean[:, None]) ** 2).sum(axis=1)


def split_batch(x, sizes):
    assert sum(sizes) == x.shape[0]
    return np.split(x, np.cumsum(sizes)[:-1], axis=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 5, 7), 1), ((9, 4), 1), ((3, 4, 5, 17), -1), ((2, 3, 130), 1)])
def test_stats_match_float64_reference(isa, threads, dtype, shape, axis, rng):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    got = pybn.batch_norm_stats(x, axis=axis)
    n, mean, m2 = ref_stats(x, axis)
    assert got.count == n and got.mean.dtype == np.float64
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got.mean, mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.m2, m2, rtol=tol)


@pytest.mark.parametrize("sizes", [[5, 3, 8], [16], [0, 7, 9], [1, 1, 14], [7, 0, 0, 9]])
def test_merged_stats_equal_stats_of_the_whole_batch(sizes, rng):
    x = (1e4 + rng.standard_normal((16, 6, 33))).astype(np.float32)  # large offset: no E[x^2]-E[x]^2
    parts = [pybn.batch_norm_stats(p) for p in split_batch(x, sizes)]
    merged = pybn.batch_norm_merge_stats([p.count for p in parts], [p.mean for p in parts], [p.m2 for p in parts])
    n, mean, m2 = ref_stats(x, 1)
    assert merged.count == n and isinstance(merged.count, int)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-6)  # float32 data: m2 to float32 precision


def test_merge_takes_unaligned_statistics(rng):
    # float64 statistics one byte off their alignment (C-contiguous, unaligned: NumPy's
    # astype(copy=False) keeps them so) are read by the kernel as doubles: made aligned first
    mean, m2 = rng.standard_normal((3, 4)), rng.random((3, 4))
    raw = np.zeros(2 * mean.nbytes + 1, np.uint8)
    views = [np.frombuffer(raw.data, np.float64, 12, 1 + i * mean.nbytes).reshape(3, 4) for i in range(2)]
    views[0][...], views[1][...] = mean, m2
    assert not views[0].flags.aligned
    got = pybn.batch_norm_merge_stats([2, 3, 4], *views)
    want = pybn.batch_norm_merge_stats([2, 3, 4], mean, m2)
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.m2, want.m2)


def test_merge_per_channel_counts_and_float_counts():
    # two workers with different counts per channel, written out by hand
    a = np.array([1.0, 2.0, 4.0])
    b = np.array([3.0, 5.0])
    mean = [[a.mean(), 0.0], [b.mean(), 7.0]]
    m2 = [[((a - a.mean()) ** 2).sum(), 0.0], [((b - b.mean()) ** 2).sum(), 0.0]]
    merged = pybn.batch_norm_merge_stats([[3, 0], [2, 1]], mean, m2)
    ab = np.concatenate([a, b])
    np.testing.assert_array_equal(merged.count, [5, 1])
    np.testing.assert_allclose(merged.mean, [ab.mean(), 7.0], rtol=1e-15)
    np.testing.assert_allclose(merged.m2, [((ab - ab.mean()) ** 2).sum(), 0.0], rtol=1e-14)
    assert pybn.batch_norm_merge_stats(np.array([3.0, 2.0]), mean, m2).count == 5.0


def test_backward_apply_takes_the_per_channel_counts_of_a_merge(rng):
    """Counts that differ by channel (values masked per channel): merge_stats gives one
    count per channel, and backward_apply divides each channel's sums by its own."""
    x, dy = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    keep = [slice(0, 6), slice(0, 4)]  # channel 1 has 4 values (its last two are padding)
    counts = [[3, 3], [3, 1]]  # two workers of 3 rows
    parts = [x[:3], x[3:]]
    values = [[p[:n, c] for c, n in enumerate(row)] for p, row in zip(parts, counts)]
    mean = [[v.mean() for v in row] for row in values]
    m2 = [[((v - v.mean()) ** 2).sum() for v in row] for row in values]
    stats = pybn.batch_norm_merge_stats(counts, mean, m2)
    np.testing.assert_array_equal(stats.count, [6, 4])
    invstd = pybn.batch_norm_invstd(stats, 1e-5)
    sums = [(dy[k, c].sum(), (dy[k, c] * (x[k, c] - stats.mean[c]) * invstd[c]).sum()) for c, k in enumerate(keep)]
    sum_dy, sum_dy_xhat = (np.array(v) for v in zip(*sums))
    dx = pybn.batch_norm_backward_apply(dy, x, stats.mean, invstd, sum_dy, sum_dy_xhat, stats.count)
    for c, k in enumerate(keep):  # torch over each channel's own values
        xt = torch.from_numpy(x[k, c].copy()).requires_grad_()
        yt = torch.nn.functional.batch_norm(xt[:, None], None, None, training=True, eps=1e-5)
        yt.backward(torch.from_numpy(dy[k, c].copy())[:, None])
        np.testing.assert_allclose(dx[k, c], xt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_one_worker_equals_single_process_bitwise(isa, dtype, relu, rng):
    x = rng.standard_normal((8, 5, 11)).astype(dtype)
    w = rng.uniform(0.5, 2, 5).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    want = pybn.batch_norm_train(x, w, b, eps=1e-3, relu=relu)
    stats = pybn.batch_norm_stats(x)
    invstd = pybn.batch_norm_invstd(stats, 1e-3)
    y = pybn.batch_norm_apply(x, stats.mean, invstd, w, b, relu=relu)
    np.testing.assert_array_equal(y, want.y)
    np.testing.assert_array_equal(stats.mean.astype(dtype), want.mean)
    np.testing.assert_array_equal(invstd.astype(dtype), want.invstd)

    dy = rng.standard_normal(x.shape).astype(dtype)
    grads = pybn.batch_norm_backward(dy, x, want.mean, want.invstd, w, y=want.y if relu else None)
    sums = pybn.batch_norm_backward_reduce(dy, x, want.mean, want.invstd, y=want.y if relu else None)
    dx = pybn.batch_norm_backward_apply(dy, x, want.mean, want.invstd, *sums, stats.count, w,
                                        y=want.y if relu else None)
    np.testing.assert_array_equal(dx, grads.dx)
    per_channel = pybn.batch_norm_backward_apply(dy, x, want.mean, want.invstd, *sums, np.full(5, stats.count), w,
                                                 y=want.y if relu else None)
    np.testing.assert_array_equal(per_channel, grads.dx)  # (the same count in every channel: the same bits)
    np.testing.assert_array_equal(sums.sum_dy.astype(dtype), grads.dbias)
    np.testing.assert_array_equal(sums.sum_dy_xhat.astype(dtype), grads.dweight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[4, 9, 3], [0, 10, 6]])
def test_workers_equal_torch_on_the_concatenated_batch(dtype, sizes, rng):
    x = (rng.standard_normal((16, 3, 5, 4)) + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(0.5, 2, 3).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    eps = 1e-5
    # the workers: local stats, merged, applied to each slice
    xs, dys = split_batch(x, sizes), split_batch(dy, sizes)
    parts = [pybn.batch_norm_stats(p) for p in xs]
    stats = pybn.batch_norm_merge_stats([p.count for p in parts], [p.mean for p in parts], [p.m2 for p in parts])
    invstd = pybn.batch_norm_invstd(stats, eps)
    mean_t, invstd_t = stats.mean.astype(dtype), invstd.astype(dtype)
    y = np.concatenate([pybn.batch_norm_apply(p, mean_t, invstd_t, w, b) for p in xs])
    local = [pybn.batch_norm_backward_reduce(g, p, mean_t, invstd_t) for g, p in zip(dys, xs)]
    sum_dy = np.sum([s.sum_dy for s in local], axis=0)
    sum_dy_xhat = np.sum([s.sum_dy_xhat for s in local], axis=0)
    dx = np.concatenate([pybn.batch_norm_backward_apply(g, p, mean_t, invstd_t, sum_dy, sum_dy_xhat, stats.count, w)
                         for g, p in zip(dys, xs)])
    # torch over the whole batch
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    bt = torch.from_numpy(b).requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    yt.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(sum_dy, bt.grad.numpy(), **tol)
    np.testing.assert_allclose(sum_dy_xhat, wt.grad.numpy(), **tol)


def test_empty_x_gives_zero_stats():
    s = pybn.batch_norm_stats(np.zeros((0, 3), np.float32))
    assert s.count == 0
    np.testing.assert_array_equal(s.mean, 0)
    np.testing.assert_array_equal(s.m2, 0)
    with pytest.raises(ValueError, match="count"):
        pybn.batch_norm_invstd(s)


def _x():
    return np.ones((4, 3), np.float32)


BAD = [
    ("stats int x", TypeError, "x", lambda: pybn.batch_norm_stats(np.ones((4, 3), int))),
    ("stats axis", ValueError, "axis", lambda: pybn.batch_norm_stats(_x(), axis=2)),
    ("merge mean 1-d", ValueError, "mean", lambda: pybn.batch_norm_merge_stats([1], [1.0], [[0.0]])),
    ("merge m2 shape", ValueError, "m2", lambda: pybn.batch_norm_merge_stats([1], [[1.0]], [[0.0, 1.0]])),
    ("merge count shape", ValueError, "count", lambda: pybn.batch_norm_merge_stats([1, 2], [[1.0]], [[0.0]])),
    ("merge count negative", ValueError, "count", lambda: pybn.batch_norm_merge_stats([-1], [[1.0]], [[0.0]])),
    ("merge count str", TypeError, "count", lambda: pybn.batch_norm_merge_stats(["a"], [[1.0]], [[0.0]])),
    ("apply mean length", ValueError, "mean", lambda: pybn.batch_norm_apply(_x(), np.zeros(2), np.ones(3))),
    ("apply invstd None", TypeError, "invstd", lambda: pybn.batch_norm_apply(_x(), np.zeros(3), None)),
    ("reduce x shape", ValueError, "x", lambda: pybn.batch_norm_backward_reduce(
        _x(), np.ones((4, 4), np.float32), np.zeros(3), np.ones(3))),
    ("apply sum_dy length", ValueError, "sum_dy", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(2), np.zeros(3), 4)),
    ("apply count 0", ValueError, "count", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), 0)),
    ("apply count nan", ValueError, "count", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), float("nan"))),
    ("apply counts length", ValueError, "count", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), [4, 4])),
    ("apply counts 0", ValueError, "count", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), [4, 0, 4])),
    ("apply counts str", TypeError, "count", lambda: pybn.batch_norm_backward_apply(
        _x(), _x(), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), ["4", "4", "4"])),
]


@pytest.mark.parametrize("label,exc,name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_name_the_argument(label, exc, name, call):
    assert_raises_naming(exc, name, call)
