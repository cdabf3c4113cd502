"""Batch normalization against PyTorch and an independent NumPy reference."""

import functools
import os
import pathlib
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pybn
import pybn._runtime

import reference as ref

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
# tolerance relative to max(1, max |expected|)
FWD_TOL = {np.float32: 1e-5, np.float64: 1e-12}
BWD_TOL = {np.float32: 1e-4, np.float64: 1e-11}

# (shape, axis): 2-D to 5-D, C in {1, 3, 17, 64}, inner 1 / 7 / 3136,
# every axis, negative axes, and a few cases large enough for two threads.
CASES = [
    ((7, 3), 1),
    ((7, 3), -1),
    ((17, 5), 0),
    ((9, 64), -1),
    ((6, 1), 1),
    ((4, 17, 7), 1),
    ((4, 17, 7), -1),
    ((4, 17, 7), 0),
    ((4, 17, 7), -2),
    ((3, 64, 7), 1),
    ((1, 3, 7), 1),
    ((2, 3, 56, 56), 1),
    ((2, 56, 56, 3), -1),
    ((2, 56, 56, 3), 3),
    ((2, 5, 4, 6), 2),
    ((2, 5, 4, 6), -3),
    ((2, 5, 4, 6), 0),
    ((2, 3, 4, 5, 6), 1),
    ((2, 3, 4, 5, 6), 4),
    ((2, 3, 4, 5, 6), -2),
    ((2, 1, 4, 5, 6), 1),
    ((8, 16, 32, 32), 1),    # 131072 elements: multi-threaded
    ((8, 32, 32, 16), -1),   # 131072 elements, channels last
    ((4096, 64), 1),         # 262144 elements, inner 1
]
CASE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in CASES]

# (affine, relu, track running stats, eps)
VARIANTS = [
    (False, False, False, 1e-5),
    (True, False, True, 1e-3),
    (True, True, False, 1e-5),
    (False, True, True, 1e-5),
]
VARIANT_IDS = ["plain", "affine-track", "affine-relu", "relu-track"]


# ----------------------------------------------------------------- helpers

def assert_close(actual, expected, tol, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol,
                               atol=tol * scale, err_msg=what)


def t64(a):
    """float64 torch tensor from a contiguous, writable copy of `a`."""
    return torch.from_numpy(np.array(a, dtype=np.float64, order="C", copy=True))


def channel_count(shape, axis):
    return shape[axis % len(shape)]


def make_inputs(rng, shape, axis, dtype):
    c = channel_count(shape, axis)
    x = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return x, w, b, rm, rv


def torch_train(x, w, b, rm, rv, momentum, eps, axis, relu):
    """Returns y, mean, invstd, new running_mean, new running_var (float64)."""
    xt = t64(np.moveaxis(np.asarray(x), axis, 1))
    rmt = None if rm is None else t64(rm)
    rvt = None if rv is None else t64(rv)
    wt = None if w is None else t64(w)
    bt = None if b is None else t64(b)
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=momentum,
                     eps=eps)
    if relu:
        y = F.relu(y)
    dims = [d for d in range(xt.ndim) if d != 1]
    var, mean = torch.var_mean(xt, dim=dims, unbiased=False)
    invstd = torch.rsqrt(var + eps)
    return (np.moveaxis(y.numpy(), 1, axis), mean.numpy(), invstd.numpy(),
            None if rmt is None else rmt.numpy(),
            None if rvt is None else rvt.numpy())


def torch_infer(x, rm, rv, w, b, eps, axis, relu):
    xt = t64(np.moveaxis(np.asarray(x), axis, 1))
    wt = None if w is None else t64(w)
    bt = None if b is None else t64(b)
    y = F.batch_norm(xt, t64(rm), t64(rv), wt, bt, training=False, eps=eps)
    if relu:
        y = F.relu(y)
    return np.moveaxis(y.numpy(), 1, axis)


def torch_backward(dy, x, w, axis, training, *, mean=None, invstd=None,
                   rm=None, rv=None, eps=1e-5, y=None):
    """Gradients of BN (plus ReLU masking when `y` is given) via
    aten.native_batch_norm_backward in float64."""
    g = np.asarray(dy, dtype=np.float64)
    if y is not None:
        g = g * (np.asarray(y) > 0)
    gt = t64(np.moveaxis(g, axis, 1))
    xt = t64(np.moveaxis(np.asarray(x), axis, 1))
    wt = None if w is None else t64(w)
    if training:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            gt, xt, wt, None, None, t64(mean), t64(invstd), True, eps,
            [True, True, True])
    else:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            gt, xt, wt, t64(rm), t64(rv), None, None, False, eps,
            [True, True, True])
    return np.moveaxis(dx.numpy(), 1, axis), dw.numpy(), db.numpy()


def check_train_result(res, x, c):
    y, mean, invstd = res
    assert res.y is y and res.mean is mean and res.invstd is invstd
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    assert y.dtype == x.dtype and y.flags.c_contiguous
    for v in (mean, invstd):
        assert isinstance(v, np.ndarray)
        assert v.shape == (c,) and v.dtype == x.dtype


# ------------------------------------------------------- forward vs torch

@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_train_matches_torch(shape, axis, dtype, variant, isa, threads, rng):
    affine, relu, track, eps = variant
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    if not affine:
        w = b = None
    if not track:
        rm = rv = None
    momentum = 0.3
    x_before = x.copy()
    ey, emean, einvstd, erm, erv = torch_train(x, w, b, rm, rv, momentum, eps,
                                               axis, relu)
    kw = {}
    if track:
        kw = dict(running_mean=rm, running_var=rv, momentum=momentum)
    res = pybn.batch_norm_train(x, w, b, eps=eps, axis=axis, relu=relu, **kw)
    c = channel_count(shape, axis)
    check_train_result(res, x, c)
    tol = FWD_TOL[dtype]
    assert_close(res.y, ey, tol, "y")
    assert_close(res.mean, emean, tol, "mean")
    assert_close(res.invstd, einvstd, tol, "invstd")
    if relu:
        assert (res.y >= 0).all()
    if track:  # updated in place, compared with torch's in-place update
        assert_close(rm, erm, tol, "running_mean")
        assert_close(rv, erv, tol, "running_var")
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_infer_matches_torch(shape, axis, dtype, variant, isa, threads, rng):
    affine, relu, _, eps = variant
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    if not affine:
        w = b = None
    rm0, rv0, x0 = rm.copy(), rv.copy(), x.copy()
    expected = torch_infer(x, rm, rv, w, b, eps, axis, relu)
    y = pybn.batch_norm_infer(x, rm, rv, w, b, eps=eps, axis=axis, relu=relu)
    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype and y.shape == x.shape and y.flags.c_contiguous
    assert_close(y, expected, FWD_TOL[dtype], "y")
    # inputs untouched
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------ backward vs torch

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_backward_matches_torch(shape, axis, dtype, variant, training, isa,
                                threads, rng):
    affine, relu, _, eps = variant
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    if not affine:
        w = b = None
    dy = rng.standard_normal(shape).astype(dtype)
    if training:
        r = ref.batch_norm_train(x, w, b, eps=eps, axis=axis, relu=relu)
        mean = r.mean.astype(dtype)
        invstd = r.invstd.astype(dtype)
        y = r.y.astype(dtype) if relu else None
        edx, edw, edb = torch_backward(dy, x, w, axis, True, mean=mean,
                                       invstd=invstd, eps=eps, y=y)
    else:
        mean = rm
        invstd = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(dtype)
        y = (ref.batch_norm_infer(x, rm, rv, w, b, eps=eps, axis=axis,
                                  relu=True).astype(dtype) if relu else None)
        edx, edw, edb = torch_backward(dy, x, w, axis, False, rm=rm, rv=rv,
                                       eps=eps, y=y)
    dy0, x0 = dy.copy(), x.copy()
    res = pybn.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                   axis=axis, y=y)
    dx, dw, db = res
    assert res.dx is dx and res.dweight is dw and res.dbias is db
    c = channel_count(shape, axis)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.flags.c_contiguous
    assert dw.shape == (c,) and dw.dtype == dtype
    assert db.shape == (c,) and db.dtype == dtype
    tol = BWD_TOL[dtype]
    assert_close(dx, edx, tol, "dx")
    assert_close(dw, edw, tol, "dweight")
    assert_close(db, edb, tol, "dbias")
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(x, x0)


def test_backward_relu_matches_torch_autograd(isa, rng):
    """relu(batch_norm(x)) differentiated by torch autograd; pybn gets the
    forward output as y=."""
    shape, axis, eps = (4, 6, 5, 3), 1, 1e-5
    x = rng.standard_normal(shape)
    w = rng.standard_normal(6)
    b = rng.standard_normal(6)
    dy = rng.standard_normal(shape)
    xt, wt, bt = (t64(a).requires_grad_() for a in (x, w, b))
    yt = F.relu(F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps))
    yt.backward(t64(dy))
    y = yt.detach().numpy().copy()
    r = ref.batch_norm_train(x, eps=eps)
    dx, dw, db = pybn.batch_norm_backward(dy, x, r.mean, r.invstd, w,
                                          training=True, axis=axis, y=y)
    assert (y == 0).any() and (y > 0).any()
    assert_close(dx, xt.grad.numpy(), 1e-11, "dx")
    assert_close(dw, wt.grad.numpy(), 1e-11, "dweight")
    assert_close(db, bt.grad.numpy(), 1e-11, "dbias")


# ------------------------------------- sizes around the SIMD vector widths

LENGTHS = [1, 7, 8, 9, 15, 16, 17, 31, 33, 67]


def width_cases(n):
    # (shape, axis): reduced inner dim n; channels-last with C=n and n+1 rows;
    # reduced outer dim n+1 with inner 1
    return [((2, 3, n), 1), ((n + 1, n), -1), ((n + 1, 3), 1), ((n, 2, n + 1), 1)]


WIDTH_CASES = [(s, a) for n in LENGTHS for s, a in width_cases(n)]
WIDTH_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in WIDTH_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", WIDTH_CASES, ids=WIDTH_IDS)
def test_vector_width_sizes(shape, axis, dtype, isa, rng):
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    # train (relu fused) with running stats
    ey, emean, einvstd, erm, erv = torch_train(x, w, b, rm, rv, 0.1, 1e-5,
                                               axis, True)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd = pybn.batch_norm_train(x, w, b, running_mean=rm1,
                                            running_var=rv1, axis=axis,
                                            relu=True)
    assert_close(y, ey, tol, "y")
    assert_close(mean, emean, tol, "mean")
    assert_close(invstd, einvstd, tol, "invstd")
    assert_close(rm1, erm, tol, "running_mean")
    assert_close(rv1, erv, tol, "running_var")
    # infer
    assert_close(pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis),
                 torch_infer(x, rm, rv, w, b, 1e-5, axis, False), tol, "infer")
    # backward, through the relu mask
    r = ref.batch_norm_train(x, w, b, axis=axis, relu=True)
    dy = rng.standard_normal(shape).astype(dtype)
    m32, i32, y32 = (r.mean.astype(dtype), r.invstd.astype(dtype),
                     r.y.astype(dtype))
    edx, edw, edb = torch_backward(dy, x, w, axis, True, mean=m32,
                                   invstd=i32, y=y32)
    dx, dw, db = pybn.batch_norm_backward(dy, x, m32, i32, w, axis=axis, y=y32)
    assert_close(dx, edx, btol, "dx")
    assert_close(dw, edw, btol, "dweight")
    assert_close(db, edb, btol, "dbias")


# ------------------------------------------------------------ running stats

@pytest.mark.parametrize("momentum", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_running_stats_momentum(momentum, dtype, isa, rng):
    shape, axis = (5, 4, 9), 1
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    _, _, _, erm, erv = torch_train(x, w, b, rm, rv, momentum, 1e-5, axis, False)
    rm_id, rv_id = id(rm), id(rv)
    pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                          momentum=momentum, axis=axis)
    assert id(rm) == rm_id and id(rv) == rv_id
    tol = FWD_TOL[dtype]
    assert_close(rm, erm, tol, "running_mean")
    assert_close(rv, erv, tol, "running_var")


def test_running_stats_repeated_updates_match_torch(isa, rng):
    """Several training steps: the running stats track torch's exactly."""
    shape = (6, 5, 4, 4)
    rm = np.zeros(5, np.float32)
    rv = np.ones(5, np.float32)
    rmt, rvt = t64(rm), t64(rv)
    for _ in range(4):
        x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
        pybn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.2)
        F.batch_norm(t64(x), rmt, rvt, training=True, momentum=0.2)
    assert_close(rm, rmt.numpy(), 1e-5, "running_mean")
    assert_close(rv, rvt.numpy(), 1e-5, "running_var")


# ------------------------------------------------------------------- out=

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1),
                                        ((300, 20, 60), 1)],
                         ids=["nchw", "nhwc", "big"])
def test_out_argument(shape, axis, dtype, isa, rng):
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    rt = ref.batch_norm_train(x, w, b, axis=axis, relu=True)
    ri = ref.batch_norm_infer(x, rm, rv, w, b, axis=axis)

    out = np.full(shape, np.nan, dtype)
    res = pybn.batch_norm_train(x, w, b, axis=axis, relu=True, out=out)
    assert res.y is out
    assert_close(out, rt.y, tol, "train out")

    out = np.full(shape, np.nan, dtype)
    y = pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out)
    assert y is out
    assert_close(out, ri, tol, "infer out")

    dy = rng.standard_normal(shape).astype(dtype)
    m, s = rt.mean.astype(dtype), rt.invstd.astype(dtype)
    yy = rt.y.astype(dtype)
    edx, edw, edb = ref.batch_norm_backward(dy, x, m, s, w, axis=axis, y=yy)
    out = np.full(shape, np.nan, dtype)
    dx, dw, db = pybn.batch_norm_backward(dy, x, m, s, w, axis=axis, y=yy,
                                          out=out)
    assert dx is out
    assert_close(out, edx, btol, "backward out")
    assert_close(dw, edw, btol, "dweight")
    assert_close(db, edb, btol, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1),
                                        ((300, 20, 60), 1)],
                         ids=["nchw", "nhwc", "big"])
def test_out_in_place(shape, axis, dtype, isa, rng):
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    c = channel_count(shape, axis)

    # train, out=x
    rt = ref.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                              axis=axis)
    xx = x.copy()
    rm1, rv1 = rm.copy(), rv.copy()
    res = pybn.batch_norm_train(xx, w, b, running_mean=rm1, running_var=rv1,
                                axis=axis, out=xx)
    assert res.y is xx
    assert_close(xx, rt.y, tol, "train in-place y")
    assert_close(res.mean, rt.mean, tol, "mean")
    assert_close(res.invstd, rt.invstd, tol, "invstd")
    assert_close(rm1, rt.running_mean, tol, "running_mean")
    assert_close(rv1, rt.running_var, tol, "running_var")
    assert res.mean.shape == (c,)

    # infer, out=x
    xx = x.copy()
    y = pybn.batch_norm_infer(xx, rm, rv, w, b, axis=axis, relu=True, out=xx)
    assert y is xx
    assert_close(xx, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis,
                                          relu=True), tol, "infer in-place")

    # backward, out=dy
    dy = rng.standard_normal(shape).astype(dtype)
    m, s = rt.mean.astype(dtype), rt.invstd.astype(dtype)
    edx, edw, edb = ref.batch_norm_backward(dy, x, m, s, w, axis=axis)
    dd = dy.copy()
    dx, dw, db = pybn.batch_norm_backward(dd, x, m, s, w, axis=axis, out=dd)
    assert dx is dd
    assert_close(dd, edx, btol, "backward in-place dx")
    assert_close(dw, edw, btol, "dweight")
    assert_close(db, edb, btol, "dbias")

    # eval backward, out=dy
    s_eval = (1 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(dtype)
    edx, edw, edb = ref.batch_norm_backward(dy, x, rm, s_eval, w,
                                            training=False, axis=axis)
    dd = dy.copy()
    dx, dw, db = pybn.batch_norm_backward(dd, x, rm, s_eval, w, training=False,
                                          axis=axis, out=dd)
    assert dx is dd
    assert_close(dd, edx, btol, "eval backward in-place dx")
    assert_close(dw, edw, btol, "dweight")
    assert_close(db, edb, btol, "dbias")


# ---------------------------------------------------- non-contiguous input

def _noncontig_views(rng, dtype):
    base = (rng.standard_normal((6, 10, 8)) + 0.5).astype(dtype)
    big = (rng.standard_normal((8, 12, 40, 40)) - 0.2).astype(dtype)
    return [
        ("transposed", base.transpose(0, 2, 1), 1),          # (6, 8, 10)
        ("strided", base[:, ::2, 1::3], 1),                  # (6, 5, 3)
        ("fortran", np.asfortranarray(base), 1),             # (6, 10, 8)
        ("reversed", base[::-1, :, ::-1], -1),
        ("big-strided", big[:, :, ::2, ::2], 1),             # (8, 12, 20, 20)
        ("big-nhwc-view", big.transpose(0, 2, 3, 1), -1),    # (8, 40, 40, 12)
    ]


@pytest.mark.parametrize("which", range(6),
                         ids=["transposed", "strided", "fortran", "reversed",
                              "big-strided", "big-nhwc-view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_input(which, dtype, isa, rng):
    _, x, axis = _noncontig_views(rng, dtype)[which]
    assert not x.flags.c_contiguous
    c = channel_count(x.shape, axis)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    x0 = x.copy()

    ey, emean, einvstd, erm, erv = torch_train(x, w, b, rm, rv, 0.1, 1e-5,
                                               axis, False)
    y, mean, invstd = pybn.batch_norm_train(x, w, b, running_mean=rm,
                                            running_var=rv, axis=axis)
    assert y.shape == x.shape and ref.long_axis_strides(y) == ref.result_strides(x)
    assert_close(y, ey, tol, "y")
    assert_close(mean, emean, tol, "mean")
    assert_close(invstd, einvstd, tol, "invstd")
    assert_close(rm, erm, tol, "running_mean")
    assert_close(rv, erv, tol, "running_var")

    yi = pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    assert ref.long_axis_strides(yi) == ref.result_strides(x)
    assert_close(yi, torch_infer(x, rm, rv, w, b, 1e-5, axis, False), tol,
                 "infer")

    # non-contiguous dy as well
    dy = rng.standard_normal(x.shape[::-1]).astype(dtype).T
    assert dy.shape == x.shape and not dy.flags.c_contiguous
    r = ref.batch_norm_train(x, axis=axis)
    m, s = r.mean.astype(dtype), r.invstd.astype(dtype)
    edx, edw, edb = torch_backward(dy, x, w, axis, True, mean=m, invstd=s)
    dx, dw, db = pybn.batch_norm_backward(dy, x, m, s, w, axis=axis)
    assert ref.long_axis_strides(dx) == ref.result_strides(x, dy)
    assert_close(dx, edx, btol, "dx")
    assert_close(dw, edw, btol, "dweight")
    assert_close(db, edb, btol, "dbias")
    np.testing.assert_array_equal(x, x0)


def test_array_like_inputs(isa):
    """Python lists are accepted for inputs that are only read."""
    x = [[1.0, 2.0, 0.5], [3.0, -1.0, 0.25], [0.0, 4.0, 2.0]]
    w, b = [1.5, -0.5, 2.0], [0.1, 0.2, 0.3]
    rm, rv = [0.5, 0.0, -1.0], [1.0, 2.0, 0.5]
    xa = np.asarray(x)
    r = ref.batch_norm_train(xa, w, b)
    y, mean, invstd = pybn.batch_norm_train(x, w, b)
    assert y.dtype == np.float64
    assert_close(y, r.y, 1e-12, "y")
    assert_close(mean, r.mean, 1e-12, "mean")
    assert_close(invstd, r.invstd, 1e-12, "invstd")
    # inference only reads running stats: lists and read-only arrays are fine
    yi = pybn.batch_norm_infer(x, rm, rv, w, b)
    assert_close(yi, ref.batch_norm_infer(xa, rm, rv, w, b), 1e-12, "infer")
    rmr, rvr = np.array(rm), np.array(rv)
    rmr.flags.writeable = False
    rvr.flags.writeable = False
    yi = pybn.batch_norm_infer(xa, rmr, rvr, w, b)
    assert_close(yi, ref.batch_norm_infer(xa, rm, rv, w, b), 1e-12, "infer ro")
    dy = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [2.0, -2.0, 1.0]]
    edx, edw, edb = ref.batch_norm_backward(dy, xa, r.mean, r.invstd, w)
    dx, dw, db = pybn.batch_norm_backward(dy, x, list(r.mean), list(r.invstd), w)
    assert_close(dx, edx, 1e-11, "dx")
    assert_close(dw, edw, 1e-11, "dweight")
    assert_close(db, edb, 1e-11, "dbias")


def test_nan_and_inf_propagate(isa):
    for shape, axis in [((4, 3, 5), 1), ((4, 5, 3), -1)]:
        x = (np.arange(60, dtype=np.float32).reshape(shape) % 7) - 2.5
        idx = [0] * 3
        idx[axis % 3] = 1  # channel 1 gets a NaN
        x[tuple(idx)] = np.nan
        idx[axis % 3] = 2  # channel 2 gets an Inf
        x[tuple(idx)] = np.inf
        y, mean, invstd = pybn.batch_norm_train(x, axis=axis)
        yc = ref.canonical(y, axis)
        assert np.isnan(mean[1]) and np.isnan(yc[:, 1]).all()
        assert not np.isfinite(mean[2])
        assert not np.isfinite(yc[:, 2]).any()
        # channel 0 is clean and as the reference says
        x0 = ref.canonical(x, axis)[:, :1]
        r = ref.batch_norm_train(x0, axis=1)
        assert_close(mean[:1], r.mean, 1e-5, "mean")
        assert_close(yc[:, :1], r.y, 1e-5, "y")
        # inference propagates NaN element-wise only
        yi = pybn.batch_norm_infer(x, np.zeros(3, np.float32),
                                   np.ones(3, np.float32), axis=axis)
        assert np.array_equal(np.isnan(yi), np.isnan(x))
        assert np.array_equal(np.isinf(yi), np.isinf(x))


def test_concurrent_python_threads(isa):
    """The GIL is released; concurrent calls on distinct outputs are safe."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((8, 16, 40, 40)).astype(np.float32)
          for _ in range(4)]
    results = [None] * 4
    errors = []

    def work(i):
        try:
            for _ in range(3):
                results[i] = pybn.batch_norm_train(xs[i], relu=True)
        except Exception as e:  # noqa: BLE001  # pragma: no cover - collected, the test reports it
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for x, res in zip(xs, results):
        r = ref.batch_norm_train(x, relu=True)
        assert_close(res.y, r.y, 1e-5, "y")
        assert_close(res.mean, r.mean, 1e-5, "mean")


# --------------------------------------------------- thread bitwise identity

BIG_CASES = [((16, 32, 32, 32), 1), ((16, 32, 32, 32), -1), ((8192, 64), 1),
             ((64, 8193), 0), ((262144, 2), -1), ((2, 3, 90001), 1),
             ((3, 200003), -1), ((4, 4, 8, 64, 64), 2),
             # few values per channel: reductions cut by channels (chunks of a long
             # period, groups inside a period) to keep their partial states O(C)
             ((16, 65536), -1), ((9, 4099, 17), 1), ((1, 75001, 8), 1), ((4, 40000, 7), 1),
             ((2, 150000, 4), 1),
             # period layouts with rows of >= 16 (elementwise passes row by row): a long
             # period cut into column chunks of ranges of 16 rows (streamed), and 4x4 rows
             ((64, 512, 7, 7), 1), ((128, 256, 4, 4), 1),
             # row mode with short rows: two samples of 7x7 (16 groups cut inside rows) and 14x14
             ((2, 6000, 7, 7), 1), ((16, 256, 14, 14), 1)]
BIG_IDS = ["nchw", "nhwc", "2d", "2d-ax0", "nhwc-c2", "nchw-c3-long",
           "wide-c", "5d-ax2", "wide-16-rows", "short-rows-17", "one-row", "wide-short-rows", "one-group",
           "long-period-7x7", "period-4x4", "rows-7x7-two-samples", "rows-14x14"]


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _run_all(x, w, b, dy, rm, rv, axis):
    rm, rv = rm.copy(), rv.copy()
    tr = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                               axis=axis, relu=True)
    inf = pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    bw = pybn.batch_norm_backward(dy, x, tr.mean, tr.invstd, w, axis=axis,
                                  y=tr.y)
    bw_eval = pybn.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w,
                                       training=False, axis=axis)
    return [tr.y, tr.mean, tr.invstd, rm, rv, inf, *bw, *bw_eval]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", BIG_CASES, ids=BIG_IDS)
def test_threads_bitwise_identical(shape, axis, dtype, isa, rng):
    assert np.prod(shape) >= 500_000
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    prev = pybn.get_num_threads()
    runs = {}
    try:
        for t in (1, 2, 3, 4):  # 3 and 4 oversubscribe 2 cores: still equal
            pybn.set_num_threads(t)
            assert pybn.get_num_threads() == t
            runs[t] = _run_all(x, w, b, dy, rm, rv, axis)
    finally:
        pybn.set_num_threads(prev)
    names = ["y", "mean", "invstd", "running_mean", "running_var", "infer",
             "dx", "dweight", "dbias", "eval dx", "eval dweight", "eval dbias"]
    r1 = runs[1]
    for t in (2, 3, 4):
        for name, a, b_ in zip(names, r1, runs[t]):
            assert _bits_equal(a, b_), f"{name} differs between 1 and {t} threads"
    # and the results are right
    r = ref.batch_norm_train(x, w, b, axis=axis, relu=True)
    assert_close(r1[0], r.y, FWD_TOL[dtype], "y")
    assert_close(r1[1], r.mean, FWD_TOL[dtype], "mean")


# ------------------------------------------------- every ISA vs the scalar path

DIFF_CASES = [((4, 19, 33, 17), 1), ((4, 33, 17, 19), -1), ((1031, 37), 1),
              ((3, 5, 7), 0), ((16, 64, 30, 30), 1), ((16, 40, 4, 4), 1), ((12, 30, 5, 5), 1),
              ((3, 40, 20), 1), ((1, 33, 16), 1), ((6, 300, 49), 1)]
DIFF_IDS = ["nchw-odd", "nhwc-odd", "2d", "ax0", "big", "period-rows-4x4", "period-rows-5x5",
            "period-3-samples", "period-1-sample", "period-6-samples-7x7"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", DIFF_CASES, ids=DIFF_IDS)
@pytest.mark.parametrize("other", [i for i in pybn.supported_isas() if i != "scalar"]
                         or [pytest.param("none", marks=pytest.mark.skip(
                             reason="only the scalar path is supported here"))])
def test_isa_paths_agree_with_scalar(other, shape, axis, dtype, rng):
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    with pybn._runtime.use_isa("scalar"):
        assert pybn.isa() == "scalar"
        rs = _run_all(x, w, b, dy, rm, rv, axis)
    with pybn._runtime.use_isa(other):
        assert pybn.isa() == other
        ro = _run_all(x, w, b, dy, rm, rv, axis)
    names = ["y", "mean", "invstd", "running_mean", "running_var", "infer",
             "dx", "dweight", "dbias", "eval dx", "eval dweight", "eval dbias"]
    for i, (name, a, s) in enumerate(zip(names, ro, rs)):
        tol = (FWD_TOL if i < 6 else BWD_TOL)[dtype]
        assert_close(a, s, tol, name)
    # and the scalar path itself is right
    r = ref.batch_norm_train(x, w, b, axis=axis, relu=True)
    assert_close(rs[0], r.y, FWD_TOL[dtype], "scalar y")


# ------------------------------------------------ finite-difference gradients

FD_CASES = [((3, 2, 4), 1), ((5, 3), -1), ((2, 3, 2, 2), 2)]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("affine", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("shape,axis", FD_CASES,
                         ids=[f"{'x'.join(map(str, s))}-ax{a}" for s, a in FD_CASES])
def test_backward_finite_differences(shape, axis, affine, relu, isa):
    """Central differences of L = sum(r * y(x, w, b)) with y from the float64
    reference forward, against pybn.batch_norm_backward(dy=r)."""
    eps, h = 1e-5, 1e-6
    c = channel_count(shape, axis)
    for seed in range(100):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape)
        w = rng.standard_normal(c) if affine else None
        b = rng.standard_normal(c) if affine else None
        pre = ref.batch_norm_train(x, w, b, eps=eps, axis=axis).y
        # with relu, keep every pre-activation well away from the kink
        if not relu or ((np.abs(pre) > 1e-3).all() and (pre > 0).any() and (pre < 0).any()):
            break
    rvec = rng.standard_normal(shape)
    wf = np.ones(c) if w is None else w
    bf = np.zeros(c) if b is None else b

    def loss(x_, w_, b_):
        return float(np.sum(rvec * ref.batch_norm_train(
            x_, w_, b_, eps=eps, axis=axis, relu=relu).y))

    fx = ref.batch_norm_train(x, w, b, eps=eps, axis=axis, relu=relu)
    dx, dw, db = pybn.batch_norm_backward(
        rvec, x, fx.mean, fx.invstd, w, training=True, axis=axis,
        y=fx.y if relu else None)

    def fd(arr, setter):
        g = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            a_p, a_m = arr.copy(), arr.copy()
            a_p[i] += h
            a_m[i] -= h
            g[i] = (setter(a_p) - setter(a_m)) / (2 * h)
        return g

    gx = fd(x, lambda a: loss(a, wf, bf))
    gw = fd(wf, lambda a: loss(x, a, bf))
    gb = fd(bf, lambda a: loss(x, wf, a))
    np.testing.assert_allclose(dx, gx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, gw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, gb, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------- statistics accuracy

@functools.cache
def _offset_data(shape, axis):
    rng = np.random.default_rng(1234)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    x.flags.writeable = False
    mean64, var64 = ref.mean_var(x, axis)
    # naive float32 E[x^2] - E[x]^2, even with NumPy's pairwise summation
    r32 = ref.channel_rows(x, axis).astype(np.float32)
    naive = (np.mean(r32 * r32, axis=1, dtype=np.float32)
             - np.mean(r32, axis=1, dtype=np.float32) ** 2)
    return x, mean64, var64, naive


@pytest.mark.parametrize("shape,axis", [((1000, 1, 10000), 1),
                                        ((5_000_000, 2), -1),
                                        ((2500, 4, 1000), 1)],
                         ids=["nchw-1x1e7", "nhwc-2x5e6", "nchw-4x2.5e6"])
def test_statistics_accuracy_large_offset(shape, axis, isa):
    """x = 1e4 + N(0,1) over 10**7 positions in float32: mean and var to
    float32 precision (a naive float32 E[x^2]-E[x]^2 is off by ~900%)."""
    x, mean64, var64, naive = _offset_data(shape, axis)
    c = channel_count(shape, axis)
    n = x.size // c
    eps = 1e-5
    rm = np.zeros(c, np.float32)
    rv = np.ones(c, np.float32)
    y, mean, invstd = pybn.batch_norm_train(x, running_mean=rm, running_var=rv,
                                            momentum=1.0, eps=eps, axis=axis)
    assert mean.dtype == np.float32
    # mean: within a few float32 ulps of 1e4 (ulp = 9.8e-4)
    np.testing.assert_allclose(mean, mean64, rtol=1e-6, atol=0)
    var_from_invstd = 1.0 / invstd.astype(np.float64) ** 2 - eps
    np.testing.assert_allclose(var_from_invstd, var64, rtol=1e-4, atol=0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var64 + eps), rtol=5e-5,
                               atol=0)
    # momentum=1: the running stats are the batch mean / unbiased var
    np.testing.assert_allclose(rm, mean64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(rv, var64 * n / (n - 1), rtol=1e-4, atol=0)
    # y is standardized: its float64 mean/std per channel ~ 0 / 1
    yv = ref.canonical(y.astype(np.float64), axis)
    assert np.all(np.abs(yv.mean(axis=(0, 2))) < 1e-3)
    np.testing.assert_allclose(yv.std(axis=(0, 2)), 1.0, rtol=1e-3)

    # The threshold is meaningful: naive float32 E[x^2] - E[x]^2 fails it.
    assert np.all(np.abs(naive.astype(np.float64) - var64) / var64 > 1e-4)


@pytest.mark.parametrize("shape,axis", [((100, 2, 5000), 1),
                                        ((500_000, 2), -1)],
                         ids=["nchw", "nhwc"])
def test_statistics_accuracy_large_offset_float64(shape, axis, isa):
    """The same in float64 with x = 1e8 + N(0,1): a naive float64
    E[x^2]-E[x]^2 loses every digit; a shifted/blocked one keeps ~1e-8."""
    rng = np.random.default_rng(99)
    x = 1e8 + rng.standard_normal(shape)
    mean64, var64 = ref.mean_var(x, axis)
    y, mean, invstd = pybn.batch_norm_train(x, eps=0.0, axis=axis)
    np.testing.assert_allclose(mean, mean64, rtol=1e-15, atol=0)
    np.testing.assert_allclose(1.0 / invstd ** 2, var64, rtol=1e-8, atol=0)
    r = ref.channel_rows(x, axis)
    naive = (r * r).mean(axis=1) - r.mean(axis=1) ** 2
    assert np.all(np.abs(naive - var64) / var64 > 1e-8)


# ------------------------------------------------------------ property based

try:
    from hypothesis import given, settings, strategies as st, HealthCheck
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @st.composite
    def bn_problem(draw):
        ndim = draw(st.integers(2, 5))
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim,
                                    max_size=ndim)))
        axis = draw(st.integers(-ndim, ndim - 1))
        c = shape[axis]
        if np.prod(shape) // c < 2:  # train needs >= 2 values per channel
            j = 1 if axis % ndim == 0 else 0
            shape = shape[:j] + (2,) + shape[j + 1:]
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**32 - 1))
        affine = draw(st.booleans())
        relu = draw(st.booleans())
        isa_name = draw(st.sampled_from(list(pybn.supported_isas())))
        return shape, axis, dtype, seed, affine, relu, isa_name

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(bn_problem())
    def test_random_shapes_against_reference(problem):
        shape, axis, dtype, seed, affine, relu, isa_name = problem
        rng = np.random.default_rng(seed)
        x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
        if not affine:
            w = b = None
        tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
        with pybn._runtime.use_isa(isa_name):
            r = ref.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                     axis=axis, relu=relu)
            rm1, rv1 = rm.copy(), rv.copy()
            y, mean, invstd = pybn.batch_norm_train(
                x, w, b, running_mean=rm1, running_var=rv1, axis=axis,
                relu=relu)
            assert_close(y, r.y, tol, "y")
            assert_close(mean, r.mean, tol, "mean")
            assert_close(invstd, r.invstd, tol, "invstd")
            assert_close(rm1, r.running_mean, tol, "running_mean")
            assert_close(rv1, r.running_var, tol, "running_var")
            yi = pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis, relu=relu)
            assert_close(yi, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis,
                                                  relu=relu), tol, "infer")
            dy = rng.standard_normal(shape).astype(dtype)
            m, s = r.mean.astype(dtype), r.invstd.astype(dtype)
            yy = r.y.astype(dtype) if relu else None
            edx, edw, edb = ref.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                    y=yy)
            dx, dw, db = pybn.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                  y=yy)
            assert_close(dx, edx, btol, "dx")
            assert_close(dw, edw, btol, "dweight")
            assert_close(db, edb, btol, "dbias")


@pytest.mark.parametrize("axis", [1, -1])
def test_output_exact_near_mean_at_large_offset(axis, isa):
    # y is computed as (x - mean) * alpha + beta: a constant channel far from zero gives
    # exactly beta, where x * alpha + (beta - mean * alpha) would cancel two products of
    # size 1e7 and keep their rounding error (torch's CPU kernel gives about 0.1 here).
    shape = (4, 3, 37) if axis == 1 else (4, 37, 3)
    x = np.full(shape, 12345.678, np.float32)
    beta = np.array([0.5, -2.0, 0.0], np.float32)
    expected = np.moveaxis(np.broadcast_to(beta, (4, 37, 3)), -1, axis)
    np.testing.assert_array_equal(pybn.batch_norm_train(x, None, beta, axis=axis).y, expected)
    y = pybn.batch_norm_infer(x, np.full(3, 12345.678, np.float32), np.ones(3, np.float32), None, beta, axis=axis)
    np.testing.assert_array_equal(y, expected)


def test_channels_last_few_channels_accurate(isa, rng):
    # 200003 values in each of 3 channels, channels-last: within a few float32 ulps of a
    # float64 computation (torch 2.13's CPU kernel is off by about 4e-5 here).
    x = (rng.standard_normal((200003, 3)) * 3 + 2).astype(np.float32)
    y, mean, invstd = pybn.batch_norm_train(x)
    xd = x.astype(np.float64)
    yd = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
    assert np.abs(y - yd).max() < 2e-6
    np.testing.assert_allclose(mean, xd.mean(0), rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(xd.var(0) + 1e-5), rtol=1e-6)


# ------------------------------------------ channel blocks (NCHW arrays past the caches)
# Training forward and backward of NCHW-like arrays of more than 4 MiB reduce and then
# normalize one block of channels at a time (csrc/kernels/channel_loops.h, channel_block),
# blocks sized to the L2 where a channel's slice fits there and the block's rows are long
# enough for the prefetchers (64 KB), else to a share of the L3. Which sizes a case gets
# depends on the CPU's caches (noted for a 1 MB L2); the results must not.

BLOCKED_CASES = [((8, 16, 256, 200), 1, np.float32),    # 1.6 MB a channel: L3 blocks
                 ((4, 20, 100, 501), 1, np.float64),
                 ((2, 8, 3, 140000), 1, np.float32),    # 3.4 MB a channel, past an L3 block
                 ((8, 512, 40, 40), 1, np.float32),     # 51 KB a channel: L2 blocks' rows too short, L3 blocks
                 ((2, 1024, 64, 64), 1, np.float32),    # 32 KB a channel: L2 blocks on any L2 >= 512 KB
                 ((24, 64, 96, 96), 1, np.float32),     # 57 MB, past the L3; 0.9 MB a channel
                 ((32, 256, 14, 14), 1, np.float32)]    # 6.4 MB (the bench's M), 25 KB a channel
BLOCKED_IDS = ["f32-16ch", "f64-20ch", "f32-8ch-long-rows", "f32-L2-blocks", "f32-L2-long-rows", "f32-past-L3",
               "f32-medium"]


def test_cache_sizes_are_the_cpus():
    # what Linux says of cpu0's L2 and L3 (data or unified), else the documented defaults;
    # the L3 counted is at most 32 MiB (a server's reading is its socket's, shared)
    found = {}
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
        if kind in ("Data", "Unified") and level in ("2", "3") and level not in found:
            found[level] = _size_bytes((index / "size").read_text().strip())
    # PYBN_L2_BYTES / PYBN_L3_BYTES, where set, stand in for the CPU's (tests/test_channel_blocks.py)
    l2, l3 = os.environ.get("PYBN_L2_BYTES", ""), os.environ.get("PYBN_L3_BYTES", "")
    want_l2 = _size_bytes(l2) if l2 else found.get("2", 512 << 10)
    want_l3 = _size_bytes(l3) if l3 else min(found.get("3", 16 << 20), 32 << 20)
    assert pybn._C.cache_sizes() == (want_l2, want_l3)


def _size_bytes(text):
    """'2048K', '2M' or a byte count, as sysfs and PYBN_L2_BYTES write sizes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    unit = text[-1].upper()
    return int(text[:-1]) * units[unit] if unit in units else int(text)


@pytest.mark.parametrize("shape,axis,dtype", BLOCKED_CASES, ids=BLOCKED_IDS)
def test_channel_blocked_passes(shape, axis, dtype, isa, rng):
    assert np.prod(shape) * np.dtype(dtype).itemsize >= 4 << 20  # large enough to be blocked
    x, w, b, rm, rv = make_inputs(rng, shape, axis, dtype)
    x += dtype(50)  # an offset the statistics must not lose
    dy = rng.standard_normal(shape).astype(dtype)
    prev = pybn.get_num_threads()
    runs = {}
    try:
        for t in (1, 2):
            pybn.set_num_threads(t)
            runs[t] = _run_all(x, w, b, dy, rm, rv, axis)
    finally:
        pybn.set_num_threads(prev)
    for a, b_ in zip(runs[1], runs[2]):
        assert _bits_equal(a, b_)
    y, mean, invstd, new_rm, new_rv, _, dx, dweight, dbias = runs[1][:9]
    r = ref.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, axis=axis, relu=True)
    assert_close(y, r.y, FWD_TOL[dtype], "y")
    assert_close(mean, r.mean, FWD_TOL[dtype], "mean")
    assert_close(invstd, r.invstd, FWD_TOL[dtype], "invstd")
    assert_close(new_rm, r.running_mean, FWD_TOL[dtype], "running_mean")
    assert_close(new_rv, r.running_var, FWD_TOL[dtype], "running_var")
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, y=y)
    assert_close(dx, rdx, BWD_TOL[dtype], "dx")
    assert_close(dweight, rdw, BWD_TOL[dtype], "dweight")
    assert_close(dbias, rdb, BWD_TOL[dtype], "dbias")
