"""float16 and bfloat16 activations (docs/dtypes.md): batch norm, its split phases, dropout
and the folds on 16-bit arrays with float32 parameters, against a float64 reference rounded
once to the storage type (within 1 unit in the last place of the storage type) and against
torch's own 16-bit batch norm; statistics as accurate as the float32 path; dropout keeps
the same elements whatever the dtype; ml_dtypes optional."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

import pybn
import pybn.nn
from reference import nearest_even
from reference_dropout import keep_mask, scale_for

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")

HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
IDS = [dt.name for dt in HALF]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = 1e-5
# (shape, axis): rows (NCHW), channels-last (period mode), short rows, one long row per channel
LAYOUTS = [((6, 5, 9, 11), 1), ((300, 13), -1), ((40, 7, 3), 1), ((2, 3, 5000), 1)]
LAYOUT_IDS = ["nchw", "nhwc", "short-rows", "long-rows"]


def ulps(got, want):
    """Distance in units of the last place of their 16-bit dtype (both finite, same dtype):
    the difference of their positions in the ordered sequence of the type's values."""
    assert got.dtype == want.dtype and got.dtype.itemsize == 2

    def position(a):
        bits = a.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(position(got) - position(want))


def assert_near(got, want, scale, name):
    """got within 1 ulp of `want` (16-bit, or float64 rounded once to got's dtype), or, where
    the result cancels to far below the terms it is computed from (`scale`, the largest of
    them), within a few units of float32's last place of those terms (scale * 2**-20): near
    zero float16's spacing is finer than float32's error on terms of order 1."""
    want = want if want.dtype == got.dtype else nearest_even(want, got.dtype)
    close = (ulps(got, want) <= 1) | (np.abs(got.astype(np.float64) - want.astype(np.float64)) <= scale * 2**-20)
    assert close.all(), f"{name}: {int((~close).sum())} of {close.size} values off"


def channel_view(a, axis):
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def bshape(shape, axis):
    s = [1] * len(shape)
    s[axis] = -1
    return s


def inputs(rng, shape, axis, dtype):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_train_within_one_ulp_of_the_rounded_reference(isa, shape, axis, dtype, rng):
    x, w, b = inputs(rng, shape, axis, dtype)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    r = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=0.25, eps=EPS, axis=axis)
    assert r.y.dtype == dtype and r.mean.dtype == r.invstd.dtype == np.float32
    xs = channel_view(x, axis)
    mean64, var64 = xs.mean(0), xs.var(0)
    n = xs.shape[0]
    # the statistics as accurate as float32's (test_batchnorm's tolerances)
    np.testing.assert_allclose(r.mean, mean64, rtol=1e-6, atol=1e-6 * np.sqrt(var64).max())
    np.testing.assert_allclose(r.invstd, 1 / np.sqrt(var64 + EPS), rtol=1e-5)
    np.testing.assert_allclose(rm, 0.25 * mean64, rtol=1e-6, atol=1e-6 * np.sqrt(var64).max())
    np.testing.assert_allclose(rv, 0.75 + 0.25 * var64 * n / (n - 1), rtol=1e-5)
    # y from the statistics the kernel returns (its own rounding of them is float32's)
    bs = bshape(shape, axis)
    want = ((x.astype(np.float64) - r.mean.astype(np.float64).reshape(bs))
            * (r.invstd.astype(np.float64) * w).reshape(bs) + b.reshape(bs))
    assert_near(r.y, want, np.abs(want).max() + np.abs(b).max(), "y")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_infer_and_apply_within_one_ulp(isa, shape, axis, dtype, rng):
    x, w, b = inputs(rng, shape, axis, dtype)
    c = shape[axis]
    mean = rng.standard_normal(c).astype(np.float32)
    var = rng.uniform(0.5, 4, c).astype(np.float32)
    y = pybn.batch_norm_infer(x, mean, var, w, b, eps=EPS, axis=axis)
    bs = bshape(shape, axis)
    invstd = 1 / np.sqrt(var.astype(np.float64) + EPS)
    want = (x.astype(np.float64) - mean.reshape(bs)) * (invstd * w).reshape(bs) + b.reshape(bs)
    assert y.dtype == dtype
    scale = np.abs(want).max() + np.abs(b).max()
    assert_near(y, want, scale, "infer")
    ya = pybn.batch_norm_apply(x, mean, invstd, w, b, axis=axis, relu=True)
    assert_near(ya, np.maximum(want, 0), scale, "apply")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_backward_against_float64(isa, shape, axis, dtype, rng):
    """dx within 1 ulp of the rounded reference where it does not cancel (assert_near);
    dweight and dbias (float32) as the float32 path computes them."""
    x, w, _ = inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    r = pybn.batch_norm_train(x, w, axis=axis)
    g = pybn.batch_norm_backward(dy, x, r.mean, r.invstd, w, axis=axis)
    assert g.dx.dtype == dtype and g.dweight.dtype == g.dbias.dtype == np.float32
    bs = bshape(shape, axis)
    m, s = r.mean.astype(np.float64), r.invstd.astype(np.float64)
    xhat = (x.astype(np.float64) - m.reshape(bs)) * s.reshape(bs)
    dys, xh = channel_view(dy, axis), channel_view(xhat, axis)
    sum_g, sum_gx = dys.sum(0), (dys * xh).sum(0)
    n = dys.shape[0]
    np.testing.assert_allclose(g.dbias, sum_g, rtol=1e-5, atol=1e-5 * np.abs(dys).sum(0).max())
    np.testing.assert_allclose(g.dweight, sum_gx, rtol=1e-5, atol=1e-5 * np.abs(dys * xh).sum(0).max())
    dx = (w * s).reshape(bs) * (dy.astype(np.float64) - (sum_g / n).reshape(bs) - xhat * (sum_gx / n).reshape(bs))
    assert_near(g.dx, dx, np.abs(dx).max(), "dx")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("shape,axis", [((6, 5, 9, 11), 1), ((300, 13), -1)], ids=["nchw", "nhwc"])
def test_matches_torch_16bit_batch_norm(isa, shape, axis, dtype, rng):
    """torch's CPU batch norm on the same 16-bit input with float32 parameters (its mixed
    mode): y, the statistics and the gradients agree, y and dx within 1 ulp of the storage
    type where they do not cancel."""
    x, w, b = inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    r = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    g = pybn.batch_norm_backward(dy, x, r.mean, r.invstd, w, axis=axis)

    def to_torch(a):
        t = torch.from_numpy(np.moveaxis(a.astype(np.float32), axis, 1).copy())
        return t.to(TORCH[dtype.name])

    xt = to_torch(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    trm, trv = torch.zeros(c), torch.ones(c)
    yt = torch.nn.functional.batch_norm(xt, trm, trv, wt, bt, training=True, eps=EPS)
    yt.backward(to_torch(dy))

    def from_torch(t):
        return np.moveaxis(t.detach().float().numpy(), 1, axis).astype(dtype)

    assert_near(r.y, from_torch(yt), np.abs(r.y.astype(np.float64)).max() + np.abs(b).max(), "y")
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5)
    np.testing.assert_allclose(g.dweight, wt.grad.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(g.dbias, bt.grad.numpy(), rtol=1e-3, atol=1e-3)
    dxt = from_torch(xt.grad)
    assert_near(g.dx, dxt, np.abs(dxt.astype(np.float64)).max(), "dx")


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_split_phases_give_the_single_process_results(isa, dtype, rng):
    x, w, b = inputs(rng, (8, 4, 6, 5), 1, dtype)
    st = pybn.batch_norm_stats(x)
    invstd = pybn.batch_norm_invstd(st, EPS)
    r = pybn.batch_norm_train(x, w, b, eps=EPS)
    np.testing.assert_array_equal(st.mean.astype(np.float32), r.mean)
    y = pybn.batch_norm_apply(x, r.mean, invstd, w, b)
    assert y.dtype == dtype
    assert ulps(y, r.y).max() <= 1
    dy = rng.standard_normal(x.shape).astype(dtype)
    sums = pybn.batch_norm_backward_reduce(dy, x, r.mean, r.invstd)
    dx = pybn.batch_norm_backward_apply(dy, x, r.mean, r.invstd, sums.sum_dy, sums.sum_dy_xhat, st.count, w)
    g = pybn.batch_norm_backward(dy, x, r.mean, r.invstd, w)
    np.testing.assert_array_equal(dx.view(np.uint16), g.dx.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_running_stats_of_the_activation_dtype(isa, dtype, rng):
    """Running statistics in x's 16-bit dtype: updated as float32 ones, then rounded to it,
    on the fused and the split path alike."""
    x, _, _ = inputs(rng, (16, 3, 7), 1, dtype)
    rm16, rv16 = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype)
    rm32, rv32 = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    pybn.batch_norm_train(x, running_mean=rm16, running_var=rv16, momentum=0.3)
    pybn.batch_norm_train(x, running_mean=rm32, running_var=rv32, momentum=0.3)
    np.testing.assert_array_equal(rm16, rm32.astype(dtype))
    np.testing.assert_array_equal(rv16, rv32.astype(dtype))
    rm_split, rv_split = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype)
    from pybn.batchnorm_split import _update_running_stats
    _update_running_stats(rm_split, rv_split, pybn.batch_norm_stats(x), 0.3)
    np.testing.assert_array_equal(rm_split, rm16)
    np.testing.assert_array_equal(rv_split, rv16)
    # each statistic float32 or x's dtype on its own (docs/dtypes.md), in either pairing
    for mean_dtype, var_dtype in ((np.float32, dtype), (dtype, np.float32)):
        for update in ("fused", "split"):
            rm, rv = np.full(3, 0.5, mean_dtype), np.full(3, 2.0, var_dtype)
            if update == "fused":
                pybn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.3)
            else:
                _update_running_stats(rm, rv, pybn.batch_norm_stats(x), 0.3)
            np.testing.assert_array_equal(rm, rm32.astype(mean_dtype))
            np.testing.assert_array_equal(rv, rv32.astype(var_dtype))
    with pytest.raises(TypeError, match="^running_mean"):
        pybn.batch_norm_train(x, running_mean=np.zeros(3), running_var=np.ones(3))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_nan_and_inf_propagate(isa, dtype):
    x = np.ones((4, 3, 5), dtype)
    x[:, 0] = np.arange(20).reshape(4, 5)
    x[1, 1, 2] = np.nan
    x[2, 2, 3] = np.inf
    r = pybn.batch_norm_train(x)
    assert np.isfinite(r.y[:, 0].astype(np.float32)).all()
    assert np.isnan(r.y[:, 1].astype(np.float32)).all() and np.isnan(r.y[:, 2].astype(np.float32)).all()
    y = pybn.batch_norm_infer(x, np.zeros(3, np.float32), np.ones(3, np.float32), eps=0.0)
    assert np.isnan(y.astype(np.float32)[1, 1, 2]) and np.isposinf(y.astype(np.float32)[2, 2, 3])
    big = np.full((2, 2), 60000, np.float16) if dtype == np.float16 else np.full((2, 2), 3e38, dtype)
    y = pybn.batch_norm_infer(big, np.zeros(2, np.float32), np.full(2, 1e-6, np.float32), eps=0.0)
    assert np.isposinf(y.astype(np.float32)).all()  # past the largest value: infinity


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
def test_dropout_keeps_the_same_elements_in_every_dtype(isa, p):
    """The keep bits depend on the index alone: float32, float64, float16 and bfloat16 arrays
    keep the same elements at the same (seed, offset), and kept values are the exact product
    of x and the scale rounded to float32, rounded once to the storage type."""
    n = 1000 + 37
    rng = np.random.default_rng(8)
    x = rng.uniform(0.5, 2, n)
    keep = keep_mask((n,), p, 123, 7)
    for dtype in [np.dtype(np.float32), np.dtype(np.float64)] + HALF:
        xs = x.astype(dtype)
        y = pybn.dropout(xs, p, seed=123, offset=7)
        np.testing.assert_array_equal(y.astype(np.float64) != 0, keep)
        if dtype.itemsize == 2:
            kept = nearest_even(xs.astype(np.float64) * np.float64(scale_for(p, np.float32)), dtype)
        else:
            kept = xs * scale_for(p, dtype)
        want = np.where(keep, kept, np.zeros(1, dtype))
        np.testing.assert_array_equal(y.view(f"u{dtype.itemsize}"), want.view(f"u{dtype.itemsize}"))
        mask = pybn.dropout_mask((n,), p, seed=123, offset=7)
        ya = pybn.dropout_apply(xs, mask, p)
        np.testing.assert_array_equal(ya.view(f"u{dtype.itemsize}"), want.view(f"u{dtype.itemsize}"))


@pytest.mark.parametrize("p", [0.57, 0.41, 0.3])
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_dropout_rounds_every_16bit_value_once(isa, dtype, p):
    """Every finite 16-bit value kept and scaled: the exact product with the float32 scale
    rounded once. For float16 and p = 0.57 or 0.41, rounding the float32 product again
    gives another value for some x (checked, so that the test tells the two apart); for
    bfloat16 no such x was found (8 bits against the scale's 24), and the rule is the same."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(dtype)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on casting a NaN
        x = x[np.isfinite(x.astype(np.float64))]
    s32 = scale_for(p, np.float32)
    want = nearest_even(x.astype(np.float64) * np.float64(s32), dtype)
    with np.errstate(over="ignore"):
        twice = (x.astype(np.float32) * s32).astype(dtype)
    if dtype == np.float16 and p != 0.3:
        assert (twice.view(np.uint16) != want.view(np.uint16)).any()
    mask = np.full((x.size + 7) // 8, 0xFF, np.uint8)
    for y in (pybn.dropout_apply(x, mask, p), pybn.dropout(x, p, seed=1, offset=0)):
        kept = y.astype(np.float64) != 0
        assert kept.mean() > 0.2
        np.testing.assert_array_equal(y.view(np.uint16)[kept], want.view(np.uint16)[kept])


# p = T / 65536 whose float32 scale 65536 / (65536 - T) has few significant bits: 2.0
# (p = 0.5) and 4.0 (0.75) with one; 13 bits (T = 3470), within float16's 24 - 11; 14 bits
# (T = 8), within bfloat16's 24 - 8 only; 17 bits (T = 1), within neither. Where the
# scale fits, x * scale is exact in float32 and the kernels skip the round-to-odd steps.
FEW_BIT_SCALES = [0.5, 0.75, 3470 / 65536, 8 / 65536, 1 / 65536]


@pytest.mark.parametrize("p", FEW_BIT_SCALES)
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_dropout_with_a_short_scale_rounds_every_16bit_value_once(isa, dtype, p):
    """Every 16-bit value, infinities, NaN, subnormals and the largest (whose product
    overflows) included, kept and scaled by a scale of few bits, in the fused forward and
    from a mask, large enough to be streamed: the exact product rounded once, NaN kept NaN."""
    x = np.tile(np.arange(2**16, dtype=np.uint32).astype(np.uint16), 40).view(dtype)  # 5 MB
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on casting a NaN
        wide = x.astype(np.float64)
    nan = np.isnan(wide)
    with np.errstate(invalid="ignore"):
        want = nearest_even(wide * np.float64(scale_for(p, np.float32)), dtype)
    mask = np.full((x.size + 7) // 8, 0xFF, np.uint8)
    for y in (pybn.dropout_apply(x, mask, p), pybn.dropout(x, p, seed=1, offset=0)):
        kept = (y.view(np.uint16) & 0x7FFF) != 0
        assert kept.mean() > 1 - p - 0.05
        assert np.isnan(y[kept & nan].astype(np.float32)).all()
        np.testing.assert_array_equal(y.view(np.uint16)[kept & ~nan], want.view(np.uint16)[kept & ~nan])


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_dropout_and_elementwise_paths_are_bitwise_identical(dtype, rng):
    """The conversions give the same bits on every path, so the passes made of one rounding
    per output do too: dropout, dropout_apply, and folding."""
    x = rng.standard_normal((7, 33, 5)).astype(dtype)
    w = rng.standard_normal((9, 33)).astype(dtype)
    var = rng.uniform(0.5, 2, 33)
    results = {}
    for isa in pybn.supported_isas():
        with pybn._runtime.use_isa(isa):
            f = pybn.fold_bn_linear(w, None, np.ones(33), var)
            results[isa] = [pybn.dropout(x, 0.3, seed=5).view(np.uint16),
                            pybn.dropout_apply(x, pybn.dropout_mask(x.shape, 0.3, seed=5), 0.3).view(np.uint16),
                            f.weight.view(np.uint16), f.bias.view(np.uint16)]
    first = next(iter(results.values()))
    for got in results.values():
        for a, b in zip(got, first):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_fold_16bit_weights_rounded_once(isa, dtype, rng):
    w = rng.standard_normal((6, 10, 3, 3)).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype)
    mean, var = rng.standard_normal(6), rng.uniform(0.1, 3, 6)
    gamma, beta = rng.standard_normal(6), rng.standard_normal(6)
    f = pybn.fold_conv_bn(w, bias, mean, var, gamma, beta, eps=EPS)
    s = gamma / np.sqrt(var + EPS)
    assert f.weight.dtype == f.bias.dtype == dtype
    np.testing.assert_array_equal(f.weight, nearest_even(w.astype(np.float64) * s[:, None, None, None], dtype))
    np.testing.assert_array_equal(f.bias, nearest_even((bias.astype(np.float64) - mean) * s + beta, dtype))
    lw = rng.standard_normal((5, 6)).astype(dtype)
    f = pybn.fold_bn_linear(lw, None, mean, var, gamma, beta, eps=EPS)
    t = beta - mean * s
    np.testing.assert_array_equal(f.weight, nearest_even(lw.astype(np.float64) * s, dtype))
    np.testing.assert_allclose(f.bias.astype(np.float64), lw.astype(np.float64) @ t, rtol=2**-7, atol=1e-6)
    assert ulps(f.bias, nearest_even(lw.astype(np.float64) @ t, dtype)).max() <= 1


def test_without_ml_dtypes_float16_still_works():
    """ml_dtypes is optional: without it pybn imports, float16 works, and bfloat16 is not among
    the dtypes (no array can hold it)."""
    code = """
import sys
sys.modules["ml_dtypes"] = None  # import ml_dtypes raises ImportError
import numpy as np
import pybn, pybn._checks
assert "bfloat16" not in pybn._checks.DTYPE_NAMES, pybn._checks.DTYPE_NAMES
y = pybn.batch_norm_infer(np.ones((2, 3), np.float16), np.zeros(3, np.float32), np.ones(3, np.float32))
assert y.dtype == np.float16
try:
    pybn.batch_norm_infer(np.ones((2, 3), np.int8), np.zeros(3), np.ones(3))
except TypeError as e:
    assert "bfloat16" not in str(e) and "float16" in str(e), e
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_ml_dtypes_is_imported_only_for_bfloat16_data():
    """Importing ml_dtypes costs several times NumPy's import: pybn and its modules do not
    import it, yet bfloat16 arrays made after `import pybn` are taken (the compiled module
    looks the dtype up when it meets one), error messages name bfloat16, and pybn imports
    ml_dtypes itself where it makes bfloat16 arrays: a bfloat16 layer, a bfloat16 tensor."""
    code = """
import sys
import numpy as np
import pybn, pybn.nn, pybn.torch, pybn.fold
assert "ml_dtypes" not in sys.modules
try:
    pybn.dropout(np.ones(3, np.int8), 0.5, seed=1)
except TypeError as e:
    assert str(e).endswith("(pybn takes float32 or float64 or float16 or bfloat16)"), e
assert "ml_dtypes" not in sys.modules
import torch
t = torch.linspace(-2, 2, 24, dtype=torch.bfloat16).reshape(4, 6)
y = torch.ops.pybn.batch_norm_infer(t, torch.zeros(6), torch.ones(6), None, None, 0.0)
assert "ml_dtypes" in sys.modules and y.dtype == torch.bfloat16
assert torch.equal(y, t), (y, t)
import ml_dtypes
x = np.linspace(-2, 2, 40, dtype=np.float32).astype(ml_dtypes.bfloat16)
keep = pybn.dropout(np.ones(40, np.float32), 0.5, seed=3) != 0
assert np.array_equal(pybn.dropout(x, 0.5, seed=3), np.where(keep, x.astype(np.float32) * 2, 0).astype(x.dtype))
layer = pybn.nn.BatchNorm(4, dtype="bfloat16")
assert layer.dtype == np.dtype(ml_dtypes.bfloat16)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


# --------------------------------------------------------------------------- layers and torch

@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_nn_layer_with_16bit_activations(dtype, rng):
    """pybn.nn.BatchNorm(dtype=16-bit): 16-bit inputs and outputs, float32 parameters and
    statistics; the same results as the functions on the same arrays."""
    layer = pybn.nn.BatchNorm(5, dtype=dtype.name, momentum=0.2)
    assert layer.dtype == dtype and layer.weight.dtype == layer.running_mean.dtype == np.float32
    x, w, b = inputs(rng, (7, 5, 6), 1, dtype)
    layer.weight[...], layer.bias[...] = w, b
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    want = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=0.2)
    y = layer(x)
    np.testing.assert_array_equal(y.view(np.uint16), want.y.view(np.uint16))
    np.testing.assert_array_equal(layer.running_mean, rm)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = layer.backward(dy)
    g = pybn.batch_norm_backward(dy, x, want.mean, want.invstd, w)
    np.testing.assert_array_equal(dx.view(np.uint16), g.dx.view(np.uint16))
    np.testing.assert_array_equal(layer.grad_weight, g.dweight)
    layer.eval()
    y = layer(x)
    np.testing.assert_array_equal(y.view(np.uint16), pybn.batch_norm_infer(x, rm, rv, w, b).view(np.uint16))
    with pytest.raises(TypeError, match="^x"):
        layer(x.astype(np.float32))


def test_sync_batch_norm_with_16bit_activations():
    """pybn.distributed.SyncBatchNorm over one MPI process (COMM_SELF) in float16 and
    bfloat16 gives the single-process layer's results (in a child process: MPI's start)."""
    code = """
from mpi4py import MPI
import numpy as np, ml_dtypes
import pybn.nn as nn, pybn.distributed as d
for dt in ("float16", "bfloat16"):
    s, b = d.SyncBatchNorm(4, comm=MPI.COMM_SELF, dtype=dt), nn.BatchNorm(4, dtype=dt)
    x = np.random.default_rng(0).standard_normal((8, 4, 5)).astype(b.dtype)
    ys, yb = s(x), b(x)
    assert ys.dtype == b.dtype and s.running_mean.dtype == np.float32
    assert np.array_equal(ys.view(np.uint16), yb.view(np.uint16))
    assert np.array_equal(s.running_var, b.running_var)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(b.dtype)
    assert np.array_equal(s.backward(dy).view(np.uint16), b.backward(dy).view(np.uint16))
    np.testing.assert_allclose(s.grad_weight, b.grad_weight, rtol=1e-6, atol=1e-6)
print("ok")
"""
    pytest.importorskip("mpi4py")
    if shutil.which("mpirun") is None:  # mpi4py imports, but MPI.* needs the runtime's libmpi
        pytest.skip("no MPI runtime: mpirun not found (apt-get install openmpi-bin)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_torch_modules_in_16bit(dtype):
    """pybn.torch.nn.BatchNorm2d and Dropout on a module converted to 16 bits (parameters and
    running statistics 16-bit too, as module.to(dtype) makes them), against torch's module
    in its mixed mode on the same values (float32 parameters and statistics holding the
    16-bit ones exactly, which torch computes with in float as pybn does; torch's all-16-bit
    kernels round its coefficients to 16 bits first): y within 1 ulp, x.grad where it does
    not cancel, the running statistics within 1 ulp of their dtype."""
    import pybn.torch.nn as pnn

    tdt = TORCH[dtype.name]
    torch.manual_seed(0)
    ours, theirs = pnn.BatchNorm2d(4).to(tdt), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(4) + 0.5)
        ours.bias.copy_(torch.randn(4))
        theirs.weight.copy_(ours.weight.float())
        theirs.bias.copy_(ours.bias.float())
    x = (torch.randn(8, 4, 5, 5) * 2 + 1).to(tdt).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), theirs(x2)
    dy = torch.randn(x.shape).to(tdt)
    y.backward(dy)
    y2.backward(dy)

    def np16(t):
        return t.detach().view(torch.int16).numpy().view(dtype)

    assert y.dtype == tdt
    assert_near(np16(y), np16(y2), 8.0, "y")
    assert ulps(np16(ours.running_mean), np16(theirs.running_mean.to(tdt))).max() <= 1
    assert ulps(np16(ours.running_var), np16(theirs.running_var.to(tdt))).max() <= 1
    assert_near(np16(x.grad), np16(x2.grad), float(x2.grad.float().abs().max()), "dx")
    drop = pnn.Dropout(0.5)
    xd = torch.randn(6, 70).to(tdt)
    yd = drop(xd)
    assert yd.dtype == tdt
    keep = yd.float() != 0
    assert torch.equal(yd[keep].float(), (xd.float() * 2)[keep].to(tdt).float())


@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn_add_relu"])
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_double_backward_of_16bit_batch_norm_with_16bit_parameters(dtype, fused):
    """A backward with create_graph=True takes torch's native_batch_norm_backward, which
    refused pybn's float32 statistics beside a 16-bit weight ("expected scalar type BFloat16
    but found Float") where stock torch works: the weight is widened to float32 for it. The
    second-order gradient against float64 autograd on the same values."""
    import pybn.torch.nn as pnn

    tdt = TORCH[dtype.name]
    torch.manual_seed(0)
    bn = pnn.BatchNorm2d(4).to(tdt)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4) + 0.5)
    x = torch.randn(3, 4, 5, 5).to(tdt).requires_grad_()
    r = torch.randn(3, 4, 5, 5).to(tdt)
    y = bn(x, r, relu=False) if fused else bn(x)
    (gx,) = torch.autograd.grad((y.float() ** 3).sum() / 8, x, create_graph=True)   # (scaled: float16's range)
    (ggx, gw) = torch.autograd.grad(gx.float().square().sum() / 8, (x, bn.weight))
    assert gx.dtype == ggx.dtype == gw.dtype == tdt

    x64 = x.detach().double().requires_grad_()
    w64 = bn.weight.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, torch.zeros(4, dtype=torch.float64), training=True)
    if fused:
        y64 = y64 + r.double()
    (gx64,) = torch.autograd.grad((y64 ** 3).sum() / 8, x64, create_graph=True)
    (ggx64, gw64) = torch.autograd.grad(gx64.square().sum() / 8, (x64, w64))
    # 16-bit y and gradients feed each other: a few percent of the largest value
    for ours, ref in ((gx, gx64), (ggx, ggx64), (gw, gw64)):
        ref = ref.detach()
        torch.testing.assert_close(ours.detach().double(), ref, rtol=0.1, atol=0.05 * float(ref.abs().max()))


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@pytest.mark.parametrize("x_dtype,param_dtype,stats_dtype", [
    (F32, BF16, F32), (F32, F64, F32), (F64, F32, F64), (BF16, BF16, F32), (BF16, F32, BF16),
    (F16, BF16, BF16), (F16, F16, F32), (F32, F32, F16)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtype_mixes_torch_refuses_are_refused_in_both_modes(x_dtype, param_dtype, stats_dtype, training):
    """torch's batch norm takes weight, bias and running statistics of x's dtype, or all
    float32 beside a 16-bit x; pybn's module accepted other mixes in evaluation mode and some
    in training (a model that then failed without pybn, or once trained)."""
    import pybn.torch.nn as pnn

    stock, ours = torch.nn.BatchNorm2d(4), pnn.BatchNorm2d(4)
    for m in (stock, ours):
        m.weight.data, m.bias.data = m.weight.data.to(param_dtype), m.bias.data.to(param_dtype)
        m.running_mean, m.running_var = m.running_mean.to(stats_dtype), m.running_var.to(stats_dtype)
        m.train(training)
    x = torch.randn(3, 4, 5, 5).to(x_dtype)
    with pytest.raises(RuntimeError):
        stock(x)
    name = "weight" if param_dtype != x_dtype and not (x_dtype in (BF16, F16) and param_dtype == F32) \
        else "running_mean"
    # the running statistics are named beside the weight they differ from (not "beside x" of
    # their own dtype)
    beside = f"weight of {param_dtype}" if name == "running_mean" else f"x of {x_dtype}"
    with pytest.raises(TypeError, match=rf"^{name}: dtype {stats_dtype if name == 'running_mean' else param_dtype} "
                                        rf"beside {beside}"):
        ours(x)


@pytest.mark.parametrize("x_dtype,param_dtype", [(F32, F32), (F64, F64), (BF16, F32), (BF16, BF16),
                                                 (F16, F32), (F16, F16)])
def test_dtype_mixes_torch_takes_are_taken(x_dtype, param_dtype):
    import pybn.torch.nn as pnn

    for training in (True, False):
        ours = pnn.BatchNorm2d(4).to(param_dtype).train(training)
        assert ours(torch.randn(3, 4, 5, 5).to(x_dtype)).dtype == x_dtype


def test_layer_state_of_bfloat16_arrays():
    """load_state_dict and from_keras take bfloat16 ndarrays (ml_dtypes), as float16 ones: the
    values cast to the layer's parameter dtype."""
    from pybn import nn
    bf = np.dtype(ml_dtypes.bfloat16)
    values = np.array([0.5, -1.25, 3.0])
    layer = nn.BatchNorm(3, dtype="bfloat16")
    layer.load_state_dict({**layer.state_dict(), "running_mean": values.astype(bf)})
    np.testing.assert_array_equal(layer.running_mean, values.astype(np.float32))
    keras = nn.BatchNorm.from_keras(values.astype(bf), values.astype(bf), values.astype(bf), np.ones(3, bf))
    assert keras.dtype == bf and keras.param_dtype == np.float32
    np.testing.assert_array_equal(keras.weight, values.astype(np.float32))
    np.testing.assert_array_equal(keras.running_var, np.ones(3, np.float32))
