"""Batch norm on arrays dense in memory in another axis order than C's (a transposed array,
NumPy's view of a channels_last torch tensor): computed on the memory-order view without a
copy, results laid out as x is. Each result is the call on the C-contiguous memory-order view
(channel axis moved) transposed back, bit for bit, and agrees with the float64 reference."""
import numpy as np
import pytest

import pybn
import reference as ref
from reference import assert_bits_equal

# (memory shape, permutation giving the user's view, channel axis of the view)
VIEWS = {
    "NCHW view of NHWC": ((4, 5, 3, 6), (0, 3, 1, 2), 1),
    "transposed (N, C)": ((6, 33), (1, 0), 1),
    "transposed (C, N), axis 0": ((7, 40), (1, 0), 0),
    "3-D, channels in the middle of memory": ((5, 6, 7), (2, 0, 1), 2),
}


def view_and_memory(rng, name, dtype=np.float32):
    memory_shape, perm, axis = VIEWS[name]
    base = rng.normal(1.0, 2.0, memory_shape).astype(dtype)
    x = base.transpose(perm)
    assert not x.flags.c_contiguous
    memory_axis = perm[axis]  # the channel axis of base (memory order)
    return x, base, axis, memory_axis, tuple(np.argsort(perm)), perm


@pytest.mark.parametrize("name", VIEWS)
def test_forward_and_backward_run_in_memory_order(name, isa, rng):
    x, base, axis, memory_axis, to_memory, perm = view_and_memory(rng, name)
    c = x.shape[axis]
    w, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(0, 1, c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    rm_m, rv_m = rm.copy(), rv.copy()

    got = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, axis=axis, relu=True)
    want = pybn.batch_norm_train(base, w, b, running_mean=rm_m, running_var=rv_m, axis=memory_axis, relu=True)
    assert got.y.strides == x.strides and not np.shares_memory(got.y, x)
    assert_bits_equal(got.y, want.y.transpose(perm))
    for a, bb in ((got.mean, want.mean), (got.invstd, want.invstd), (rm, rm_m), (rv, rv_m)):
        assert_bits_equal(a, bb)
    r = ref.batch_norm_train(x, w, b, np.zeros(c), np.ones(c), axis=axis, relu=True)
    np.testing.assert_allclose(got.y, r.y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rv, r.running_var, rtol=1e-5)

    dy = rng.normal(size=base.shape).astype(np.float32).transpose(perm)
    g = pybn.batch_norm_backward(dy, x, got.mean, got.invstd, w, axis=axis, y=got.y)
    gm = pybn.batch_norm_backward(dy.transpose(to_memory), base, want.mean, want.invstd, w, axis=memory_axis,
                                  y=want.y)
    assert g.dx.strides == x.strides
    assert_bits_equal(g.dx, gm.dx.transpose(perm))
    assert_bits_equal(g.dweight, gm.dweight)
    dx, dw, _ = ref.batch_norm_backward(dy, x, got.mean, got.invstd, w, axis=axis, y=got.y)
    np.testing.assert_allclose(g.dx, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.dweight, dw, rtol=1e-4, atol=1e-4)

    y = pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    assert y.strides == x.strides
    assert_bits_equal(y, pybn.batch_norm_infer(base, rm, rv, w, b, axis=memory_axis).transpose(perm))
    np.testing.assert_allclose(y, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VIEWS)
def test_the_phases_run_in_memory_order(name, rng):
    x, base, axis, memory_axis, to_memory, perm = view_and_memory(rng, name, np.float64)
    stats = pybn.batch_norm_stats(x, axis=axis)
    want = pybn.batch_norm_stats(base, axis=memory_axis)
    assert stats.count == want.count
    assert_bits_equal(stats.mean, want.mean)
    assert_bits_equal(stats.m2, want.m2)
    mean, var = ref.mean_var(x, axis)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
    invstd = pybn.batch_norm_invstd(stats)
    y = pybn.batch_norm_apply(x, stats.mean, invstd, axis=axis)
    assert y.strides == x.strides
    assert_bits_equal(y, pybn.batch_norm_apply(base, stats.mean, invstd, axis=memory_axis).transpose(perm))
    dy = rng.normal(size=base.shape).transpose(perm)
    sums = pybn.batch_norm_backward_reduce(dy, x, stats.mean, invstd, axis=axis)
    sums_m = pybn.batch_norm_backward_reduce(dy.transpose(to_memory), base, stats.mean, invstd, axis=memory_axis)
    assert_bits_equal(sums.sum_dy, sums_m.sum_dy)
    dx = pybn.batch_norm_backward_apply(dy, x, stats.mean, invstd, *sums, stats.count, axis=axis)
    assert dx.strides == x.strides
    want_dx, _, _ = ref.batch_norm_backward(dy, x, stats.mean, invstd, axis=axis)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-10)


def test_out_in_x_layout_is_written_and_c_order_out_still_taken(rng):
    x, base, axis, memory_axis, _, perm = view_and_memory(rng, "NCHW view of NHWC")
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.full(c, 2.0, np.float32)
    want = pybn.batch_norm_infer(base, rm, rv, axis=memory_axis).transpose(perm)
    out = np.empty_like(base).transpose(perm)  # x's layout
    assert pybn.batch_norm_infer(x, rm, rv, out=out) is out
    assert_bits_equal(out, want)
    c_out = np.empty(x.shape, np.float32)  # C order: the input is copied, as before
    assert pybn.batch_norm_infer(x, rm, rv, out=c_out) is c_out
    np.testing.assert_allclose(c_out, want, rtol=1e-6, atol=1e-6)
    in_place = x.copy(order="K")  # x's layout, in place
    y = pybn.batch_norm_infer(in_place, rm, rv, out=in_place)
    assert y is in_place
    assert_bits_equal(in_place, want)


def test_a_residual_of_another_layout_is_copied(rng):
    """Arrays of other strides than x's are converted as before (the call stays correct)."""
    x, base, axis, memory_axis, _, perm = view_and_memory(rng, "NCHW view of NHWC")
    residual = rng.normal(size=x.shape).astype(np.float32)  # C order
    got = pybn.batch_norm_train(x, axis=axis, residual=residual).y
    r = ref.batch_norm_train(x, axis=axis)
    np.testing.assert_allclose(got, r.y + residual, rtol=1e-5, atol=1e-5)


def test_torch_channels_last_tensor_is_read_in_place(rng):
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    y = pybn.batch_norm_infer(t, np.zeros(6), np.ones(6))
    assert y.strides == np.asarray(t).strides
    want = torch.nn.functional.batch_norm(t, torch.zeros(6), torch.ones(6), eps=1e-5)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-6, atol=1e-6)
