"""Alpha dropout, Gaussian dropout and Gaussian noise (docs/dropout.md): the normal variates
against the independent NumPy reference bit for bit on every ISA path and thread count,
their moments, tails and the accuracy of their log and sincos, each dtype's rounding,
alpha dropout against PyTorch's formula and moments, and the backward passes."""
import math

import numpy as np
import pytest

import pybn
import pybn._C as C
from pybn._checks import round_to
from reference import assert_bits_equal
from reference_dropout import keep_mask
from reference_noise import normal_variates

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
SEED = 0x0123456789ABCDEF
ALPHA = 1.7580993408473766  # SELU's lambda * alpha, as torch


def variates(n, seed=SEED, offset=0):
    return pybn.gaussian_noise(np.zeros(n, np.float32), 1.0, seed=seed, offset=offset)


# ------------------------------------------------------------------ the normal stream

@pytest.mark.parametrize("n, offset", [(1, 0), (63, 5), (64, 0), (65, 17), (1000, 2**32 - 40),
                                       (129, 2**64 - 20), (300_001, 12345)])
def test_variates_match_the_reference_bit_for_bit(isa, threads, n, offset):
    assert_bits_equal(variates(n, offset=offset), normal_variates(n, SEED, offset))


def test_large_streamed_output_and_misaligned_views_match_the_reference(isa, threads):
    n = 1_500_001  # > 4 MB of float32: non-temporal stores
    want = normal_variates(n, SEED, 7)
    assert_bits_equal(variates(n, offset=7), want)
    buf = np.zeros(n + 3, np.float32)
    out = np.zeros(n + 3, np.float32)
    for start in (1, 3):  # x and out off the 64-byte boundary: a head of ordinary stores
        x, y = buf[start:start + n - 2], out[start:start + n - 2]
        pybn.gaussian_noise(x, 1.0, seed=SEED, offset=7, out=y)
        assert_bits_equal(y, want[:n - 2])


def test_a_variate_depends_on_its_index_only():
    whole = variates(10_000, offset=160)
    assert_bits_equal(variates(5000, offset=160 + pybn.normal_counters_used(5000))[:64 * 10],
              whole[5056:5056 + 640])
    assert pybn.normal_counters_used(5000) == 16 * 79
    assert_bits_equal(variates(100, offset=160), whole[:100])


def test_every_dtype_uses_the_same_float32_variates(isa):
    n = 20_011
    z = normal_variates(n, SEED, 3)
    assert_bits_equal(pybn.gaussian_noise(np.zeros(n), 1.0, seed=SEED, offset=3), z.astype(np.float64))
    for dtype in (np.float16, ml_dtypes.bfloat16):
        got = pybn.gaussian_noise(np.zeros(n, dtype), 1.0, seed=SEED, offset=3)
        assert_bits_equal(got, round_to(z, np.dtype(dtype)))


def test_moments(isa):
    n = 10_000_000
    z = variates(n, seed=20261204).astype(np.float64)
    mean = z.mean()
    d = z - mean
    var = (d * d).mean()
    skew = (d**3).mean() / var**1.5
    kurt = (d**4).mean() / var**2 - 3
    # 6 standard errors of each estimate for normal samples
    assert abs(mean) < 6 * math.sqrt(1 / n)
    assert abs(var - 1) < 6 * math.sqrt(2 / n)
    assert abs(skew) < 6 * math.sqrt(6 / n)
    assert abs(kurt) < 6 * math.sqrt(24 / n)


def test_tails_and_kolmogorov_smirnov(isa):
    n = 10_000_000
    z = variates(n, seed=99).astype(np.float64)
    for k in (2.0, 3.0, 4.0):
        expected = math.erfc(k / math.sqrt(2))  # P(|z| > k)
        count = np.count_nonzero(np.abs(z) > k)
        assert abs(count - n * expected) < 6 * math.sqrt(n * expected), (k, count, n * expected)
    assert np.abs(z).max() < math.sqrt(-2 * math.log(2.0**-31)) + 1e-6  # u >= 2**-31
    sample = np.sort(z[:1_000_000])
    cdf = 0.5 * np.frompyfunc(lambda v: math.erfc(-v / math.sqrt(2)), 1, 1)(sample).astype(np.float64)
    m = sample.size
    ks = max((np.arange(1, m + 1) / m - cdf).max(), (cdf - np.arange(m) / m).max())
    assert ks < 1.95 / math.sqrt(m)  # the 0.1% critical value


def ulps(got, exact):
    """|got - exact| in units of the last place of float32 at `exact` (float64)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_log_and_sincos_accuracy():
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**32, size=(1_000_000, 2), dtype=np.uint64).astype(np.uint32)
    edges = np.array([[0, 0], [1, 1], [2**32 - 1, 2**32 - 1], [2**31, 2**31], [2**31 - 1, 2**30],
                      [0x5A827999 * 2, 31], [0x5A827999 * 2 + 2, 32]], np.uint64).astype(np.uint32)
    words = np.concatenate([words, edges])
    u, log_u, phi, cos, sin = C.diagnostics.normal_math(words).T
    exact_u = ((words[:, 0] >> 1) | 1).astype(np.float64) * 2.0**-31
    assert np.array_equal(u, exact_u.astype(np.float32))  # one rounding of the odd integer
    assert u.min() > 0 and u.max() <= 1
    exact_log = np.log(u.astype(np.float64))
    nonzero = exact_log != 0
    assert np.all(log_u[~nonzero] == 0)
    log_err = ulps(log_u[nonzero], exact_log[nonzero]).max()
    k = (((words[:, 1] >> 5) & 0x1FFFFFF) | 1).astype(np.float64) - 2.0**24
    # the product k * step (exact in float64) rounded once to float32
    assert np.array_equal(phi, (k * float(np.float32(np.pi / 4)) * 2.0**-24).astype(np.float32))
    assert np.abs(phi).max() < np.pi / 4
    phi64 = phi.astype(np.float64)
    cos_err = ulps(cos, np.cos(phi64)).max()
    sin_err = ulps(sin[phi != 0], np.sin(phi64[phi != 0])).max()
    # the bounds docs/dropout.md states
    print(f"max error: log {log_err:.3f} ulp, cos {cos_err:.3f} ulp, sin {sin_err:.3f} ulp")
    assert log_err <= 2.0, log_err
    assert cos_err <= 1.5, cos_err
    assert sin_err <= 1.0, sin_err


# ------------------------------------------------------------------ Gaussian dropout and noise

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gaussian_dropout_and_noise_round_once_per_dtype(isa, threads, dtype, rng):
    n = 70_001
    x = rng.standard_normal(n).astype(dtype)
    z = normal_variates(n, SEED, 11)
    rate, stddev = 0.3, 0.7
    s = math.sqrt(rate / (1 - rate))
    y_drop = pybn.gaussian_dropout(x, rate, seed=SEED, offset=11)
    y_noise = pybn.gaussian_noise(x, stddev, seed=SEED, offset=11)
    if dtype == np.float64:
        want_drop = x * (1 + s * z.astype(np.float64))
        want_noise = x + stddev * z.astype(np.float64)
    else:
        multiplier = np.float32(1) + np.float32(s) * z  # Keras' N(1, s) in float32
        noise32 = np.float32(stddev) * z
        if dtype == np.float32:
            want_drop, want_noise = x * multiplier, x + noise32
        else:  # the exact product rounded once; the float32 sum rounded to the 16-bit type
            want_drop = round_to(x.astype(np.float64) * multiplier.astype(np.float64), np.dtype(dtype))
            want_noise = round_to((x.astype(np.float32) + noise32).astype(np.float64), np.dtype(dtype))
    assert_bits_equal(y_drop, np.asarray(want_drop, dtype))
    assert_bits_equal(y_noise, np.asarray(want_noise, dtype))


def test_gaussian_moments_follow_keras_semantics():
    n = 4_000_000
    x = np.full(n, 2.0, np.float32)
    y = pybn.gaussian_dropout(x, 0.2, seed=1).astype(np.float64)
    sd = 2.0 * math.sqrt(0.2 / 0.8)  # x * N(1, rate / (1 - rate))
    assert abs(y.mean() - 2.0) < 6 * sd / math.sqrt(n)
    assert abs(y.std() / sd - 1) < 6 * math.sqrt(1 / (2 * n))
    y = pybn.gaussian_noise(x, 0.5, seed=1).astype(np.float64)
    assert abs(y.mean() - 2.0) < 6 * 0.5 / math.sqrt(n)
    assert abs(y.std() / 0.5 - 1) < 6 * math.sqrt(1 / (2 * n))


def test_gaussian_backward_is_regeneration():
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((2, 3, 1000)).astype(np.float64)
    kw = dict(seed=42, offset=96)
    multiplier = pybn.gaussian_dropout(np.ones_like(x), 0.4, **kw)
    # y is linear in x: its gradient is dy * (the same multiplier), the same call on dy
    assert_bits_equal(pybn.gaussian_dropout(dy, 0.4, **kw), dy * multiplier)
    assert_bits_equal(pybn.gaussian_dropout(x, 0.4, **kw), x * multiplier)


def test_identity_cases_and_in_place():
    x = np.arange(1000, dtype=np.float32)
    for y in (pybn.gaussian_dropout(x, 0.0, seed=1), pybn.gaussian_noise(x, 0.0, seed=1),
              pybn.alpha_dropout(x, 0.0, seed=1), pybn.alpha_dropout(x, 0.5, seed=1, training=False)):
        assert_bits_equal(y, x)
        assert y is not x
    assert_bits_equal(pybn.alpha_dropout(x, 1.0, seed=1), np.zeros_like(x))
    want = pybn.gaussian_noise(x, 1.5, seed=9, offset=32)
    z = x.copy()
    assert pybn.gaussian_noise(z, 1.5, seed=9, offset=32, out=z) is z
    assert_bits_equal(z, want)
    z = x.copy()
    pybn.alpha_dropout(z, 0.25, seed=9, out=z)
    assert_bits_equal(z, pybn.alpha_dropout(x, 0.25, seed=9))


# ------------------------------------------------------------------ alpha dropout

def alpha_reference(x, p, seed, offset):
    """torch's formula in x's dtype (float32 for 16-bit, then rounded once), mask from the
    independent mask reference."""
    keep = keep_mask(x.shape, p, seed, offset)
    q_drop = math.floor(p * 65536) / 65536
    a = 1 / math.sqrt((ALPHA * ALPHA * q_drop + 1) * (1 - q_drop))
    t = np.float64 if x.dtype == np.float64 else np.float32
    kept = x.astype(t) * t(a) + t(ALPHA * a * q_drop)
    dropped = t(ALPHA * a * q_drop) - t(ALPHA * a)
    y = np.where(keep, kept, dropped).astype(t)
    return y if x.dtype in (np.float32, np.float64) else round_to(y.astype(np.float64), x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("p", [0.5, 0.1, 0.9])
def test_alpha_dropout_matches_the_float64_reference(isa, threads, dtype, p, rng):
    x = rng.standard_normal((7, 3, 1111)).astype(dtype)
    assert_bits_equal(pybn.alpha_dropout(x, p, seed=SEED, offset=48), alpha_reference(x, p, SEED, 48))


def test_alpha_dropout_every_tail(isa, threads, rng):
    # lengths around the window (32) and group (128) sizes: the pass's partial windows
    for n in [*range(1, 70), 127, 128, 129, 255, 257, 4095, 4097]:
        x = rng.standard_normal(n).astype(np.float32)
        assert_bits_equal(pybn.alpha_dropout(x, 0.3, seed=21, offset=n), alpha_reference(x, 0.3, 21, n))


def test_alpha_dropout_large_streamed(isa, threads, rng):
    x = rng.standard_normal(1_200_003).astype(np.float32)
    assert_bits_equal(pybn.alpha_dropout(x, 0.2, seed=5, offset=16), alpha_reference(x, 0.2, 5, 16))
    out = np.zeros(x.size + 1, np.float32)[1:]  # off the 64-byte boundary
    pybn.alpha_dropout(x, 0.2, seed=5, offset=16, out=out)
    assert_bits_equal(out, alpha_reference(x, 0.2, 5, 16))


def test_alpha_dropout_keeps_dropouts_elements(rng):
    x = rng.standard_normal(50_000)
    for p in (0.1, 0.5, 0.77):
        keep = np.unpackbits(pybn.dropout_mask(x.size, p, seed=77, offset=32), count=x.size,
                             bitorder="little").astype(bool)
        assert np.array_equal(pybn.dropout(x, p, seed=77, offset=32) != 0, keep & (x != 0))
        a, b, c = pybn.noise.alpha_dropout_coefficients(p)
        y = pybn.alpha_dropout(x, p, seed=77, offset=32)
        assert np.all(y[~keep] == b - c)
        assert np.all(y[keep] == x[keep] * a + b)


def test_alpha_dropout_bits_equal_torchs_formula_given_the_mask(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((64, 257)).astype(np.float32))
    for p in (0.5, 0.25, 0.125, 0.75):  # multiples of 2**-16: torch's p is pybn's
        keep = keep_mask(tuple(x.shape), p, 3, 0)
        # aten's alpha dropout given its noise tensor (ATen/native/Dropout.cpp)
        noise = torch.from_numpy(keep.astype(np.float32))
        a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1) * (1 - p))
        b = noise.add(-1).mul_(ALPHA * a).add_(ALPHA * a * p)
        noise.mul_(a)
        want = (x * noise).add_(b)
        assert_bits_equal(pybn.alpha_dropout(x.numpy(), p, seed=3), want.numpy())


def test_alpha_dropout_moments_match_torchs_on_selu_input():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    n = 4_000_000
    # SELU of N(0, 1) has mean 0 and variance 1: alpha dropout must keep them
    x = torch.selu(torch.randn(n, dtype=torch.float64))
    for p in (0.1, 0.5):
        ours = torch.from_numpy(pybn.alpha_dropout(x.numpy(), p, seed=11))
        theirs = torch.nn.functional.alpha_dropout(x, p, training=True)
        for y in (ours, theirs):
            assert abs(y.mean().item() - x.mean().item()) < 6 * math.sqrt(2 / n)
            assert abs(y.var().item() / x.var().item() - 1) < 0.01
        assert abs(ours.mean().item() - theirs.mean().item()) < 8 * math.sqrt(2 / n)
        assert abs(ours.var().item() - theirs.var().item()) < 0.01


def test_alpha_dropout_backward_is_a_times_dy_where_kept(isa, rng):
    dy = rng.standard_normal((5, 999)).astype(np.float32)
    p = 0.3
    keep = keep_mask(dy.shape, p, 8, 64)
    a = pybn.noise.alpha_dropout_coefficients(p)[0]
    got = pybn.alpha_dropout_backward(dy, p, seed=8, offset=64)
    assert_bits_equal(got, np.where(keep, dy * np.float32(a), np.float32(0)))
    # the derivative of the forward, by finite differences in float64
    x = rng.standard_normal((5, 999))
    h = 1e-6
    kw = dict(seed=8, offset=64)
    numeric = (pybn.alpha_dropout(x + h, p, **kw) - pybn.alpha_dropout(x - h, p, **kw)) / (2 * h)
    assert np.allclose(numeric, pybn.alpha_dropout_backward(np.ones_like(x), p, seed=8, offset=64), atol=1e-8)


def test_a_dropped_nan_or_infinity_gives_the_dropped_value():
    x = np.full(4096, np.nan, np.float32)
    x[::2] = np.inf
    y = pybn.alpha_dropout(x, 0.5, seed=1)
    keep = keep_mask(x.shape, 0.5, 1, 0)
    a, b, c = pybn.noise.alpha_dropout_coefficients(0.5)
    assert np.all(y[~keep] == np.float32(b) - np.float32(c))
    assert np.array_equal(np.isnan(y[keep]), np.isnan(x[keep]))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call, exc, prefix", [
    (lambda x: pybn.gaussian_dropout(x, 1.0, seed=1), ValueError, "rate:"),
    (lambda x: pybn.gaussian_dropout(x, -0.1, seed=1), ValueError, "rate:"),
    (lambda x: pybn.gaussian_dropout(x, float("nan"), seed=1), ValueError, "rate:"),
    (lambda x: pybn.gaussian_dropout(x, "0.1", seed=1), TypeError, "rate:"),
    (lambda x: pybn.gaussian_noise(x, -1.0, seed=1), ValueError, "stddev:"),
    (lambda x: pybn.gaussian_noise(x, float("inf"), seed=1), ValueError, "stddev:"),
    (lambda x: pybn.gaussian_noise(x, float("nan"), seed=1), ValueError, "stddev:"),
    (lambda x: pybn.gaussian_noise(x, 1.0, seed=-1), ValueError, "seed:"),
    (lambda x: pybn.gaussian_noise(x, 1.0, seed=1.5), TypeError, "seed:"),
    (lambda x: pybn.gaussian_noise(x, 1.0, seed=1, offset=2**64), ValueError, "offset:"),
    (lambda x: pybn.alpha_dropout(x, 1.5, seed=1), ValueError, "p:"),
    (lambda x: pybn.alpha_dropout(x, -0.5, seed=1), ValueError, "p:"),
    (lambda x: pybn.alpha_dropout(x, 0.5, seed=None), TypeError, "seed:"),
    (lambda x: pybn.alpha_dropout(x, 0.5, seed=1, training="yes"), TypeError, "training:"),
    (lambda x: pybn.alpha_dropout(x.astype(np.int32), 0.5, seed=1), TypeError, "x:"),
    (lambda x: pybn.gaussian_noise(x, 1.0, seed=1, out=np.zeros(3)), TypeError, "out:"),
])
def test_bad_arguments_name_themselves(call, exc, prefix):
    with pytest.raises(exc) as info:
        call(np.ones(8, np.float32))
    assert str(info.value).startswith(prefix), str(info.value)
