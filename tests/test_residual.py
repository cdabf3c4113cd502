"""The fused residual add of batch norm (docs/batchnorm.md, "Fused residual"):
``y = relu(bn(x) + residual)`` in the normalize pass, and d_residual in the backward's dx
pass, against torch's composite (F.batch_norm, then + r, then relu) and its autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pybn
from test_half_dtypes import HALF, IDS as HALF_IDS, assert_near

EPS = 1e-5
# (shape, axis): NCHW rows, channels-last (period mode), short rows with an odd tail, one
# long row per channel with a tail that is no whole vector, a wide channels-last row
LAYOUTS = [((6, 5, 9, 11), 1), ((300, 13), -1), ((40, 7, 3), 1), ((2, 3, 1001), 1), ((7, 3, 5, 67), -1)]
LAYOUT_IDS = ["nchw", "nhwc", "short-rows", "long-rows", "wide-nhwc"]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def inputs(rng, shape, axis, dtype):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(pybn._checks.param_dtype(np.dtype(dtype)))
    b = rng.standard_normal(c).astype(w.dtype)
    return x, r, w, b


def channels_first(a, axis):
    """A torch tensor with the channel axis at 1 (what F.batch_norm takes)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), axis, 1)))


def back(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def torch_composite(x, r, w, b, axis, relu, training, mean=None, var=None):
    """relu(F.batch_norm(x) + r) with torch, in x's layout."""
    y = F.batch_norm(channels_first(x, axis), None if mean is None else torch.from_numpy(mean),
                     None if var is None else torch.from_numpy(var), torch.from_numpy(w), torch.from_numpy(b),
                     training=training, eps=EPS) + channels_first(r, axis)
    return back(torch.relu(y) if relu else y, axis)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_matches_the_torch_composite(isa, threads, shape, axis, dtype, relu, rng):
    x, r, w, b = inputs(rng, shape, axis, dtype)
    c = shape[axis]
    r_before = r.copy()
    train = pybn.batch_norm_train(x, w, b, axis=axis, relu=relu, residual=r)
    np.testing.assert_allclose(train.y, torch_composite(x, r, w, b, axis, relu, True), **TOL[dtype])
    mean, var = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 3, c).astype(dtype)
    want = torch_composite(x, r, w, b, axis, relu, False, mean, var)
    np.testing.assert_allclose(pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, relu=relu, residual=r), want,
                               **TOL[dtype])
    invstd = 1 / np.sqrt(var.astype(np.float64) + EPS)
    np.testing.assert_allclose(pybn.batch_norm_apply(x, mean, invstd, w, b, axis=axis, relu=relu, residual=r),
                               want, **TOL[dtype])
    np.testing.assert_array_equal(r, r_before)  # read only


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_16bit_forward_rounds_once(isa, shape, axis, dtype, rng):
    """bn(x) + r and the ReLU in float32, then one rounding: within 1 ulp of the float64
    value rounded once (a composite in 16 bits rounds twice)."""
    x, r, w, b = inputs(rng, shape, axis, dtype)
    c = shape[axis]
    bs = [1] * len(shape)
    bs[axis] = -1
    res = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, residual=r)
    want = ((x.astype(np.float64) - res.mean.astype(np.float64).reshape(bs))
            * (res.invstd.astype(np.float64) * w).reshape(bs) + b.reshape(bs) + r.astype(np.float64))
    scale = np.abs(want).max() + np.abs(b).max()
    assert_near(res.y, np.maximum(want, 0), scale, "train")
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 3, c).astype(np.float32)
    invstd = 1 / np.sqrt(var.astype(np.float64) + EPS)
    want = ((x.astype(np.float64) - mean.reshape(bs)) * (invstd * w).reshape(bs) + b.reshape(bs)
            + r.astype(np.float64))
    assert_near(pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, residual=r), want, scale, "infer")
    assert_near(pybn.batch_norm_apply(x, mean, invstd, w, b, axis=axis, relu=True, residual=r),
                np.maximum(want, 0), scale, "apply")


# channel blocks: 8 of one channel; 37 channels in forward blocks of 2 on a 1 MB L2 and a 32 MB
# L3, the last a single channel, so a thread's pipelined blocks (the next block's statistics
# read while one is written) end in a short one (the backward's, over x, dy and y, hold one
# channel each; tests/test_channel_blocks.py has a backward with a short last block)
LARGE = [((4, 32, 96, 96), 1), ((4, 96, 96, 32), -1), ((64, 8, 160, 160), 1), ((16, 37, 112, 112), 1)]
LARGE_IDS = ["streamed", "streamed-nhwc", "channel-blocked", "channel-blocked-short-last"]


@pytest.mark.parametrize("shape,axis", LARGE, ids=LARGE_IDS)
def test_large_arrays_stream_and_block(isa, threads, shape, axis, rng):
    """Outputs past the streaming threshold (non-temporal stores), and a training forward
    large enough for the channel-blocked schedule: the residual still lands on every element."""
    c = shape[axis]
    x = rng.standard_normal(shape, np.float32)
    r = rng.standard_normal(shape, np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    got = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, residual=r).y
    np.testing.assert_allclose(got, torch_composite(x, r, w, b, axis, True, True), rtol=2e-5, atol=2e-5)
    mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
    got = pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, residual=r)
    np.testing.assert_allclose(got, torch_composite(x, r, w, b, axis, False, False, mean, var), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_out_may_be_the_residual(isa, relu, rng):
    """out=residual is an in-place add (r += bn(x)), like torch's ``r.add_(bn(x))``."""
    x, r, w, b = inputs(rng, (5, 6, 37), 1, np.float32)
    want = torch_composite(x, r, w, b, 1, relu, True)
    y = pybn.batch_norm_train(x, w, b, relu=relu, residual=r, out=r).y
    assert y is r
    np.testing.assert_allclose(r, want, rtol=2e-5, atol=2e-5)


def test_residual_may_be_x(isa, rng):
    x, _, w, b = inputs(rng, (5, 6, 37), 1, np.float64)
    want = torch_composite(x, x, w, b, 1, True, True)
    np.testing.assert_allclose(pybn.batch_norm_train(x, w, b, relu=True, residual=x, out=x).y, want, rtol=1e-12,
                               atol=1e-12)


def test_residual_of_another_dtype_is_refused():
    x = np.ones((4, 3, 5), np.float32)
    with pytest.raises(TypeError, match="^residual: dtype float64 does not match x"):
        pybn.batch_norm_train(x, residual=np.ones(x.shape))
    with pytest.raises(ValueError, match="^residual: shape"):
        pybn.batch_norm_infer(x, np.zeros(3), np.ones(3), residual=np.ones((4, 3, 6), np.float32))
    with pytest.raises(ValueError, match="^out: overlaps residual"):
        buf = np.ones(60 + 5, np.float32)
        pybn.batch_norm_train(x, residual=buf[:60].reshape(x.shape), out=buf[5:].reshape(x.shape))


# ------------------------------------------------------------------ backward

def torch_grads(x, r, w, b, dy, axis, relu, training, mean=None, var=None):
    """Grads of relu(bn(x) + r) by torch's autograd: dx, dweight, dbias, d_residual."""
    xt = channels_first(x, axis).requires_grad_()
    rt = channels_first(r, axis).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    bt = torch.from_numpy(b).requires_grad_()
    y = F.batch_norm(xt, None if mean is None else torch.from_numpy(mean),
                     None if var is None else torch.from_numpy(var), wt, bt, training=training, eps=EPS) + rt
    if relu:
        y = torch.relu(y)
    y.backward(channels_first(dy, axis))
    return back(xt.grad, axis), wt.grad.numpy(), bt.grad.numpy(), back(rt.grad, axis)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_relu_gradient_passes_where_the_output_is_nan(isa, dtype, rng):
    """A NaN in the residual makes that output NaN: torch's ReLU gradient passes dy there
    (threshold_backward masks y <= 0 only), and so do d_residual and dx's sums."""
    shape, axis = (6, 3, 40), 1
    x, r, w, b = inputs(rng, shape, axis, dtype)
    r[2, 1, 7] = r[4, 0, 0] = np.nan
    dy = rng.standard_normal(shape).astype(dtype)
    fwd = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, residual=r)
    assert np.isnan(fwd.y[2, 1, 7]) and np.isnan(fwd.y[4, 0, 0])
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, axis=axis, y=fwd.y, residual=True)
    want = torch_grads(x, r, w, b, dy, axis, True, True)
    assert g.d_residual[2, 1, 7] == dy[2, 1, 7] and g.d_residual[4, 0, 0] == dy[4, 0, 0]
    for got, ref, name in zip(g, want, ("dx", "dweight", "dbias", "d_residual")):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_backward_matches_torch_autograd(isa, threads, shape, axis, dtype, relu, rng):
    x, r, w, b = inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    fwd = pybn.batch_norm_train(x, w, b, axis=axis, relu=relu, residual=r)
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, axis=axis, y=fwd.y if relu else None,
                                 residual=True)
    assert isinstance(g, pybn.BatchNormResidualGrads)
    want = torch_grads(x, r, w, b, dy, axis, relu, True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else TOL[dtype]
    for got, ref, name in zip(g, want, ("dx", "dweight", "dbias", "d_residual")):
        np.testing.assert_allclose(got, ref, **tol, err_msg=name)
    np.testing.assert_array_equal(g.d_residual, np.where(fwd.y <= 0, 0, dy) if relu else dy)  # exactly g
    if not relu:  # no mask: dy itself, no copy
        assert g.d_residual is dy
    # evaluation mode (running statistics)
    c = shape[axis]
    mean, var = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 3, c).astype(dtype)
    y = pybn.batch_norm_infer(x, mean, var, w, b, axis=axis, relu=relu, residual=r)
    invstd = (1 / np.sqrt(var.astype(np.float64) + EPS)).astype(dtype)
    g = pybn.batch_norm_backward(dy, x, mean, invstd, w, training=False, axis=axis, y=y if relu else None,
                                 residual=True)
    want = torch_grads(x, r, w, b, dy, axis, relu, False, mean, var)
    for got, ref, name in zip(g, want, ("dx", "dweight", "dbias", "d_residual")):
        np.testing.assert_allclose(got, ref, **tol, err_msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_16bit_d_residual_is_the_masked_dy(isa, dtype, rng):
    x, r, w, b = inputs(rng, (6, 5, 9, 11), 1, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    fwd = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True)
    plain = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y)
    assert g.d_residual.dtype == dtype
    want = np.where(fwd.y > 0, dy, 0).astype(dtype)
    np.testing.assert_array_equal(g.d_residual.view(np.uint16), want.view(np.uint16))
    for got, ref in zip(g[:3], plain):  # dx and the parameter grads are unchanged by the extra output
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(ref).view(np.uint8))


@pytest.mark.parametrize("shape,axis", LARGE, ids=LARGE_IDS)
def test_large_backward(isa, threads, shape, axis, rng):
    """d_residual beside a streamed dx, and in the channel-blocked backward; dx as without it."""
    c = shape[axis]
    x = rng.standard_normal(shape, np.float32)
    r = rng.standard_normal(shape, np.float32)
    dy = rng.standard_normal(shape, np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    fwd = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, residual=r)
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, axis=axis, y=fwd.y, residual=True)
    np.testing.assert_array_equal(g.d_residual, dy * (fwd.y > 0))
    plain = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, axis=axis, y=fwd.y)
    np.testing.assert_array_equal(g.dx, plain.dx)


def test_d_residual_when_dx_overwrites_dy(isa, rng):
    """out=dy without a ReLU: dy is gone after the pass, so d_residual is a copy of it made in
    the same pass (not dy, which now holds dx)."""
    x, r, w, b = inputs(rng, (4, 3, 50), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    dy_before = dy.copy()
    fwd = pybn.batch_norm_train(x, w, b, residual=r)
    want = pybn.batch_norm_backward(dy_before, x, fwd.mean, fwd.invstd, w)
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, out=dy, residual=True)
    assert g.dx is dy and g.d_residual is not dy
    np.testing.assert_array_equal(g.d_residual, dy_before)
    np.testing.assert_array_equal(g.dx, want.dx)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_d_residual_out_may_be_dy(isa, relu, rng):
    """d_residual_out=dy masks dy in place (dx elsewhere); without relu it copies dy onto
    itself, which leaves it as it was."""
    x, r, w, b = inputs(rng, (4, 3, 50), 1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    fwd = pybn.batch_norm_train(x, w, b, relu=relu, residual=r)
    y = fwd.y if relu else None
    want = pybn.batch_norm_backward(dy.copy(), x, fwd.mean, fwd.invstd, w, y=y)
    masked = dy * (fwd.y > 0) if relu else dy.copy()
    g = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=y, residual=True, d_residual_out=dy)
    assert g.d_residual is dy
    np.testing.assert_array_equal(dy, masked)
    np.testing.assert_array_equal(g.dx, want.dx)


def test_split_backward_apply_gives_d_residual(isa, rng):
    """The split phases (SyncBatchNorm's) give what the single-process backward gives."""
    x, r, w, b = inputs(rng, (6, 5, 40), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    fwd = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    one = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True)
    sums = pybn.batch_norm_backward_reduce(dy, x, fwd.mean, fwd.invstd, y=fwd.y)
    dx, dr = pybn.batch_norm_backward_apply(dy, x, fwd.mean, fwd.invstd, *sums, 6 * 40, w, y=fwd.y, residual=True)
    np.testing.assert_allclose(dx, one.dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dr, one.d_residual)
    _, dr = pybn.batch_norm_backward_apply(dy, x, fwd.mean, fwd.invstd, *sums, 6 * 40, w, residual=True)
    assert dr is dy


# ------------------------------------------------------------------ pybn.nn.BatchNorm

@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_block_tail_matches_torch(isa, training, relu, rng):
    """bn(x, r, relu=...) and backward -> (dx, d_residual), against torch.nn.BatchNorm2d in the
    composite, weights and running statistics alike."""
    shape = (4, 6, 7, 9)
    x, r, w, b = inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)
    layer = pybn.nn.BatchNorm(6, dtype="float64")
    layer.weight[...], layer.bias[...] = w, b
    ref = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        ref.weight[...], ref.bias[...] = torch.from_numpy(w), torch.from_numpy(b)
    if not training:
        layer(x)
        ref(torch.from_numpy(x))  # the same running statistics, then evaluation mode
        layer.eval()
        ref.eval()
    y = layer(x, r, relu=relu)
    xt, rt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(r).requires_grad_()
    yt = ref(xt) + rt
    yt = torch.relu(yt) if relu else yt
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-12, atol=1e-12)
    yt.backward(torch.from_numpy(dy))
    dx, dr = layer.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dr, rt.grad.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(layer.grad_weight, ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_bias, ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    # a plain forward afterwards: backward returns dx alone again
    layer(x)
    assert isinstance(layer.backward(dy), np.ndarray)


def test_layer_relu_without_residual_masks_dy(isa, rng):
    x, _, w, b = inputs(rng, (8, 3, 10), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    layer = pybn.nn.BatchNorm(3, dtype="float64")
    y = layer(x, relu=True)
    xt = torch.from_numpy(x).requires_grad_()
    torch.relu(F.batch_norm(xt, None, None, training=True, eps=EPS)).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, np.maximum(torch_composite(x, np.zeros_like(x), np.ones(3), np.zeros(3), 1, False,
                                                             True), 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_layer_refuses_a_bad_residual_and_keeps_its_state():
    layer = pybn.nn.BatchNorm(3)
    x = np.ones((4, 3, 5), np.float32)
    rm = layer.running_mean.copy()
    with pytest.raises(TypeError, match="^residual: dtype float64"):
        layer(x, np.ones(x.shape))
    with pytest.raises(ValueError, match="^residual: shape"):
        layer(x, np.ones((4, 3, 6), np.float32))
    np.testing.assert_array_equal(layer.running_mean, rm)
    assert layer.num_batches_tracked == 0
