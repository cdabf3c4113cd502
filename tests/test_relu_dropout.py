"""dropout(relu(x)) in one pass (``pybn.dropout(..., relu=True)``, ``dropout_apply(...,
relu=True)``) and its gradient from the output (``pybn.relu_dropout_backward``), against the
NumPy reference of the mask stream applied to torch's ReLU (``x < 0 ? 0 : x``, checked
against torch.relu), bit for bit, on every ISA path and thread count, every dtype, tails,
streamed outputs and specials; torch's autograd of ``relu`` and the same mask as the
reference for the gradient (docs/dropout.md). Only that test needs torch."""

import numpy as np
import pytest

import pybn
import pybn.nn
from error_checks import assert_raises_naming
from reference import nearest_even

import reference_dropout as rd

try:
    import ml_dtypes
    HALF, HALF_IDS = [np.float16, ml_dtypes.bfloat16], ["f16", "bf16"]
except ImportError:  # (a NumPy-only run: float16 alone)
    HALF, HALF_IDS = [np.float16], ["f16"]
DTYPES, IDS = [np.float32, np.float64, *HALF], ["f32", "f64", *HALF_IDS]


def relu_ref(x):
    """torch.relu of an array of any of DTYPES, as float64 (exact): x < 0 ? 0 : x, so -0.0 and
    NaN stay (test_relu_ref_is_torchs)."""
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns on casting a NaN)
        x = np.asarray(x).astype(np.float64)
    return np.where(x < 0, 0.0, x)


def test_relu_ref_is_torchs():
    torch = pytest.importorskip("torch")
    x = np.array([-0.0, 0.0, np.nan, -np.nan, np.inf, -np.inf, -1.5, 2.5, 5e-324, -5e-324])
    assert_bitwise(relu_ref(x), torch.relu(torch.from_numpy(x)).numpy(), "relu")


def relu_dropout_ref(x, p, seed, offset=0, noise_shape=None):
    """keep ? relu(x) * scale : +0.0, the product exact then rounded once to x's dtype (the
    scale rounded once to x's compute type: float32 for the 16-bit types)."""
    compute = np.float64 if x.dtype == np.float64 else np.float32
    keep = rd.keep_mask(x.shape, p, seed, offset, noise_shape)
    with np.errstate(invalid="ignore", over="ignore"):
        kept = nearest_even(relu_ref(x) * np.float64(rd.scale_for(p, compute)), x.dtype)
    return np.where(keep, kept, np.zeros(1, x.dtype))


def relu_dropout_backward_ref(dy, y, p):
    compute = np.float64 if dy.dtype == np.float64 else np.float32
    with np.errstate(invalid="ignore", over="ignore"):
        g = nearest_even(dy.astype(np.float64) * np.float64(rd.scale_for(p, compute)), dy.dtype)
        return np.where(y.astype(np.float64) <= 0, np.zeros(1, dy.dtype), g)  # (NaN passes, as in torch)


def bits(a):
    return np.ascontiguousarray(a).view(f"u{np.dtype(a.dtype).itemsize}")


def assert_bitwise(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bad = np.flatnonzero(bits(got).reshape(-1) != bits(want).reshape(-1))
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[0]}: " \
                          f"{got.reshape(-1)[bad[0]]!r} != {want.reshape(-1)[bad[0]]!r}"


def data(shape, dtype, seed=0, specials=True):
    x = np.random.default_rng(seed).standard_normal(shape)
    if specials and x.size >= 8:
        flat = x.reshape(-1)
        flat[1::97] = 0.0
        flat[2::89] = -0.0
        flat[3::83] = np.nan
        flat[4::79] = np.inf
        flat[5::73] = -np.inf
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_every_length_matches_the_reference(isa, dtype):
    for n in range(1, 300):
        x = data((n,), dtype, seed=n)
        for p, seed, offset in [(0.5, 1, 0), (0.3, 2**32 + 7, 2**64 - 17), (0.1, 9, 2**32 - 1)]:
            want = relu_dropout_ref(x, p, seed, offset)
            assert_bitwise(pybn.dropout(x, p, seed=seed, offset=offset, relu=True), want, f"n={n} p={p}")
            mask = pybn.dropout_mask(x.shape, p, seed=seed, offset=offset)
            assert_bitwise(pybn.dropout_apply(x, mask, p, relu=True), want, f"apply n={n} p={p}")


@pytest.mark.parametrize("shape", [(300_007,), (64, 33, 1000)], ids=["300007", "64x33x1000"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_big_and_streamed_match_the_reference(isa, threads, dtype, shape):
    """The second shape's outputs (2.1 MB at 16 bits and more) pass the streaming threshold on
    most machines; outputs at an odd element offset too (unaligned heads)."""
    x = data(shape, dtype, seed=3)
    want = relu_dropout_ref(x, 0.3, 11, 5)
    assert_bitwise(pybn.dropout(x, 0.3, seed=11, offset=5, relu=True), want, "fused")
    mask = pybn.dropout_mask(shape, 0.3, seed=11, offset=5)
    buf = np.empty(x.size + 1, dtype)
    out = buf[1:].reshape(shape)
    assert pybn.dropout_apply(x, mask, 0.3, relu=True, out=out) is out
    assert_bitwise(out, want, "apply at offset 1")
    dy = data(shape, dtype, seed=4, specials=False)
    dx = pybn.relu_dropout_backward(dy, want, 0.3, out=np.empty(x.size + 1, dtype)[1:].reshape(shape))
    assert_bitwise(dx, relu_dropout_backward_ref(dy, want, 0.3), "backward at offset 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("ns", [(8, 33, 1), (1, 33, 9), (2, 1, 3, 1, 5, 1)], ids=["N_C_1", "1_C_L", "six_runs"])
def test_noise_shapes(isa, dtype, ns):
    """Broadcast masks (the kernels' broadcast path, and NumPy's for the six-run pattern)."""
    shape = tuple(8 if d == 1 else d for d in ns) if len(ns) == 3 else (2, 2, 3, 2, 5, 2)
    x = data(shape, dtype, seed=5)
    want = relu_dropout_ref(x, 0.5, 21, 3, ns)
    assert_bitwise(pybn.dropout(x, 0.5, seed=21, offset=3, noise_shape=ns, relu=True), want, "fused")
    mask = pybn.dropout_mask(ns, 0.5, seed=21, offset=3)
    assert_bitwise(pybn.dropout_apply(x, mask, 0.5, noise_shape=ns, relu=True), want, "apply")


@pytest.mark.parametrize("p", [0.5, 0.57, 0.3])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_every_16bit_value_rounded_once(isa, dtype, p):
    """Every 16-bit value, kept: relu(x) times the float32 scale, rounded once (0.57 and 0.41
    need the round-to-odd product; 0.5 is exact)."""
    x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    mask = np.full((x.size + 7) // 8, 0xFF, np.uint8)
    with np.errstate(invalid="ignore"):  # (ml_dtypes warns on casting a NaN)
        nan = np.isnan(x.astype(np.float64))
    y = pybn.dropout_apply(x, mask, p, relu=True)
    with np.errstate(invalid="ignore", over="ignore"):
        want = nearest_even(relu_ref(x) * np.float64(rd.scale_for(p, np.float32)), x.dtype)
    assert_bitwise(y[~nan], want[~nan], "every value")
    assert np.isnan(y[nan].astype(np.float32)).all()
    dx = pybn.relu_dropout_backward(x, np.ones_like(x), p)
    assert_bitwise(dx[~nan], relu_dropout_backward_ref(x, np.ones_like(x), p)[~nan], "backward of every value")
    assert np.isnan(dx[nan].astype(np.float32)).all()
    dy = np.full_like(x, 1.5)  # every 16-bit y: -0.0, subnormals and NaNs of either sign
    assert_bitwise(pybn.relu_dropout_backward(dy, x, p), relu_dropout_backward_ref(dy, x, p), "every y")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_backward_equals_torch_autograd(isa, threads, dtype):
    """The gradient of relu then the mask, by torch's autograd in float64 (exact: dy times a
    scale or 0), rounded once to the dtype: what relu_dropout_backward gives from y alone."""
    torch = pytest.importorskip("torch")
    x = data((7, 300, 11), dtype, seed=8)
    p, seed = 0.3, 77
    y = pybn.dropout(x, p, seed=seed, relu=True)
    dy = data(x.shape, dtype, seed=9, specials=False)
    compute = np.float64 if dtype == np.float64 else np.float32
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    keep = torch.from_numpy(rd.keep_mask(x.shape, p, seed).copy())
    out = torch.where(keep, torch.relu(xt) * float(rd.scale_for(p, compute)), torch.zeros(()))
    out.backward(torch.from_numpy(dy.astype(np.float64)))
    want = nearest_even(xt.grad.numpy(), dtype)
    assert_bitwise(pybn.relu_dropout_backward(dy, y, p), want, "dx")
    assert_bitwise(pybn.relu_dropout_backward(dy.copy(), y, p, out=None), want, "dx again")
    inplace = dy.copy()
    assert pybn.relu_dropout_backward(inplace, y, p, out=inplace) is inplace
    assert_bitwise(inplace, want, "dx in place")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_p_zero_and_one(isa, dtype):
    x = data((1000,), dtype, seed=1)
    assert_bitwise(pybn.dropout(x, 0.0, seed=1, relu=True), relu_dropout_ref(x, 0.0, 1), "p=0")
    assert not pybn.dropout(x, 1.0, seed=1, relu=True).any()
    assert not pybn.relu_dropout_backward(x, np.abs(x), 1.0).any()


def test_bad_arguments():
    x = np.ones((4, 5), np.float32)
    assert_raises_naming(TypeError, "relu", pybn.dropout, x, 0.5, seed=1, relu=1)
    assert_raises_naming(TypeError, "relu", pybn.dropout_apply, x, pybn.dropout_mask(x.shape, 0.5, seed=1), 0.5,
                         relu="yes")
    assert_raises_naming(ValueError, "y", pybn.relu_dropout_backward, x, np.ones((4, 6), np.float32), 0.5)
    assert_raises_naming(TypeError, "y", pybn.relu_dropout_backward, x, np.ones((4, 5)), 0.5)
    assert_raises_naming(TypeError, "dy", pybn.relu_dropout_backward, np.ones(3, np.int32), np.ones(3, np.int32), 0.5)
    assert_raises_naming(ValueError, "p", pybn.relu_dropout_backward, x, x, 1.5)
    assert_raises_naming(ValueError, "out", pybn.relu_dropout_backward, x, x, 0.5, out=np.empty((5, 4), np.float32))
    assert_raises_naming(TypeError, "out", pybn.relu_dropout_backward, x, x, 0.5, out=np.empty((4, 5)))


def test_empty():
    for dtype in (np.float32, np.float16):
        e = np.empty((3, 0), dtype)
        assert pybn.dropout(e, 0.5, seed=1, relu=True).shape == (3, 0)
        assert pybn.relu_dropout_backward(e, e, 0.5).shape == (3, 0)


# ------------------------------------------------------------------ pybn.nn.Dropout(x, relu=True)

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("noise_shape", [None, (None, 12, 1)], ids=["elementwise", "channels"])
def test_layer_forward_and_backward(isa, dtype, noise_shape):
    """Two training steps (the offset advances as for dropout) and one in evaluation mode
    (a ReLU), each forward and backward against the references."""
    layer = pybn.nn.Dropout(0.3, seed=5, noise_shape=noise_shape)
    x = data((6, 12, 40), dtype, seed=11)
    dy = data(x.shape, dtype, seed=12, specials=False)
    ns = None if noise_shape is None else (6, 12, 1)
    offset = 0
    for _ in range(2):
        y = layer(x, relu=True)
        assert_bitwise(y, relu_dropout_ref(x, 0.3, 5, offset, ns), "forward")
        assert_bitwise(layer.backward(dy), relu_dropout_backward_ref(dy, y, 0.3), "backward")
        offset += pybn.counters_used(x.size if ns is None else 6 * 12)
        assert layer.offset == offset
    layer.training = False
    y = layer(x, relu=True)
    assert_bitwise(y, relu_ref(x).astype(dtype), "evaluation forward")
    assert_bitwise(layer.backward(dy), np.where(relu_ref(x) <= 0, np.zeros(1, dtype), dy), "evaluation backward")
    assert layer(x) is x  # without relu, as before
    assert_bitwise(layer.backward(dy), dy, "evaluation backward without relu")


def test_layer_relu_must_be_a_bool():
    assert_raises_naming(TypeError, "relu", pybn.nn.Dropout(0.5, seed=1), np.ones(4, np.float32), relu=1)
