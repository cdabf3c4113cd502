"""pybn.dropout / dropout_mask / dropout_apply against the NumPy reference of
the normative mask stream (tests/reference_dropout.py, itself checked against
Random123's known answers in tests/test_philox.py), bit for bit, on every ISA
path and thread count; torch as the reference for the gradient and for
Dropout2d's behaviour; edge cases and errors; statistics.

Contract: docs/dropout.md:
    pybn.dropout(x, p, *, seed, offset=0, noise_shape=None, out=None) -> y
    pybn.dropout_mask(shape, p, *, seed, offset=0) -> uint8 packed mask
    pybn.dropout_apply(x, mask, p, *, noise_shape=None, out=None) -> y
Scaling the reference fixes (and these tests hold pybn to, bitwise):
    y = where(keep, x * scale, +0.0) in x's dtype,
    scale = x.dtype.type(65536 / (65536 - T)), T = floor(p * 65536)
(1 / P(keep) in float64, one rounding; 1/(1-p) for p a multiple of 2**-16)
so a dropped element is +0.0 (never -0.0 or NaN), p == 1 gives +0.0, and
E[y] = x for every p.
"""

import math

import numpy as np
import pytest

import pybn
import pybn._runtime
from error_checks import assert_raises_naming, bad_outs

import reference_dropout as rd

DTYPES = [np.float32, np.float64]
DT_IDS = ["f32", "f64"]
U64 = 2**64


# ------------------------------------------------------------------ helpers

def assert_bitwise(got, want, what="y"):
    """Same shape, dtype and bits (so -0.0 != +0.0, NaN payloads compared)."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    ui = {1: np.uint8, 4: np.uint32, 8: np.uint64}[got.itemsize]
    a = np.ascontiguousarray(got).view(ui).reshape(-1)
    b = np.ascontiguousarray(want).view(ui).reshape(-1)
    if not np.array_equal(a, b):
        bad = np.flatnonzero(a != b)
        k = int(bad[0])
        idx = np.unravel_index(k, got.shape) if got.ndim else ()
        raise AssertionError(
            f"{what}: {bad.size} of {a.size} elements differ bitwise; first at "
            f"{idx}: got {got.reshape(-1)[k]!r}, want {want.reshape(-1)[k]!r}")


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)


def check_all_three(x, p, seed, offset, noise_shape=None, what=""):
    """dropout, dropout_mask and dropout_apply agree with the reference."""
    want = rd.dropout_ref(x, p, seed, offset, noise_shape)
    y = pybn.dropout(x, p, seed=seed, offset=offset, noise_shape=noise_shape)
    assert_bitwise(y, want, f"dropout {what}")
    assert y.flags.c_contiguous
    ns = tuple(x.shape) if noise_shape is None else tuple(noise_shape)
    n = math.prod(ns)
    m = pybn.dropout_mask(ns, p, seed=seed, offset=offset)
    assert isinstance(m, np.ndarray)
    assert_bitwise(m, rd.packed_mask(n, p, seed, offset), f"dropout_mask {what}")
    ya = pybn.dropout_apply(x, m, p, noise_shape=noise_shape)
    assert_bitwise(ya, want, f"dropout_apply {what}")
    return y, m


# ------------------------------------------- small lengths, every ISA path

SMALL_CASES = [  # (p, seed, offset)
    (0.5, 1, 0),
    (0.1, 2**32 + 7, U64 - 17),          # seed high word, offset wraps
    (0.9, U64 - 1, 3),
    (1 / 3, 12345, 2**32 - 1),           # counter crosses into word 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_small_lengths_match_reference(isa, dtype):
    for n in range(1, 68):
        x = data((n,), dtype, seed=n)
        for p, seed, offset in SMALL_CASES:
            check_all_three(x, p, seed, offset,
                            what=f"n={n} p={p} seed={seed} offset={offset}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_small_shapes_match_reference(isa, dtype):
    """The mask follows the C-order flat index over the shape."""
    for shape in [(1, 1), (3, 5), (2, 3, 7), (5, 1, 13), (2, 2, 2, 17), (1, 67)]:
        x = data(shape, dtype, seed=len(shape))
        check_all_three(x, 0.5, 77, 5, what=str(shape))


# ----------------------------------------------- big arrays, threads x ISA

BIG_SHAPES = [(300_007,), (2, 3, 250, 201), (1_200_007,)]
_big_cache = {}


def big_case(shape, dtype, p, seed, offset, noise_shape=None):
    key = (shape, np.dtype(dtype).name, p, seed, offset, noise_shape)
    if key not in _big_cache:
        x = data(shape, dtype, seed=7)
        ns = shape if noise_shape is None else noise_shape
        _big_cache[key] = (x, rd.dropout_ref(x, p, seed, offset, noise_shape),
                           rd.packed_mask(math.prod(ns), p, seed, offset))
    return _big_cache[key]


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_big_matches_reference(isa, threads, dtype, shape):
    # offset chosen so that the counters wrap past 2**64 inside the array
    p, seed = 0.5, 2**40 + 1
    offset = U64 - 16 * 1000 - 3
    x, want, wmask = big_case(shape, dtype, p, seed, offset)
    y = pybn.dropout(x, p, seed=seed, offset=offset)
    assert_bitwise(y, want, "dropout")
    m = pybn.dropout_mask(shape, p, seed=seed, offset=offset)
    assert_bitwise(m, wmask, "dropout_mask")
    assert_bitwise(pybn.dropout_apply(x, m, p), want, "dropout_apply")
    out = np.full_like(x, 7)
    assert pybn.dropout(x, p, seed=seed, offset=offset, out=out) is out
    assert_bitwise(out, want, "dropout out=")


# Counters whose high word changes at a block edge (40 groups in: an edge for blocks of 1, 2,
# 4 or 8 groups) or inside a block (41 groups in), and across the 2**64 wrap: the kernels'
# round-1 products advance by addition within a high word and must start afresh after it.
HIGH_WORD_OFFSETS = [2**32 - 16 * 40, 2**32 - 16 * 41, 5 * 2**32 - 16 * 40, U64 - 16 * 40]


@pytest.mark.parametrize("offset", HIGH_WORD_OFFSETS, ids=lambda o: f"o{o:x}")
def test_high_word_changes_match_reference(isa, threads, offset):
    p, seed, n = 0.5, 0xC0FFEE, 128 * 97 + 5
    x = data((n,), np.float32, seed=3)
    check_all_three(x, p, seed, offset, what=f"offset={offset:#x}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_big_noise_shape_matches_reference(isa, threads, dtype):
    shape, ns = (64, 48, 10, 10), (64, 48, 1, 1)
    p, seed, offset = 0.3, 5, 0
    x, want, wmask = big_case(shape, dtype, p, seed, offset, ns)
    assert_bitwise(pybn.dropout(x, p, seed=seed, offset=offset, noise_shape=ns),
                   want, "dropout")
    m = pybn.dropout_mask(ns, p, seed=seed, offset=offset)
    assert_bitwise(m, wmask, "dropout_mask")
    assert_bitwise(pybn.dropout_apply(x, m, p, noise_shape=ns), want,
                   "dropout_apply")
    # and a mask shared along the last axes, (1, C, H, W)
    ns2 = (1, 48, 10, 10)
    x, want, wmask = big_case(shape, dtype, p, seed, offset, ns2)
    assert_bitwise(pybn.dropout(x, p, seed=seed, offset=offset, noise_shape=ns2),
                   want, "dropout (1,C,H,W)")


# --------------------------------------------------- seeds and offsets

SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63, U64 - 1]
OFFSETS = [0, 1, 15, 2**32 - 8, 2**63 - 1, U64 - 16, U64 - 16 * 3 - 5, U64 - 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_extreme_seeds_and_offsets(isa, dtype):
    x = data((1000,), dtype, seed=3)
    x129 = data((129,), dtype, seed=4)
    for seed in SEEDS:
        for offset in OFFSETS:
            check_all_three(x, 0.5, seed, offset, what=f"seed={seed} offset={offset}")
            check_all_three(x129, 0.25, seed, offset,
                            what=f"n=129 seed={seed} offset={offset}")


def test_seed_high_word_matters(isa):
    x = np.ones(4096, np.float32)
    a = pybn.dropout(x, 0.5, seed=5, offset=0)
    b = pybn.dropout(x, 0.5, seed=5 + 2**32, offset=0)
    assert 0.4 < np.mean(a == b) < 0.6


def test_numpy_integer_seed_and_offset():
    x = data((300,), np.float32)
    want = rd.dropout_ref(x, 0.5, U64 - 1, 2**40)
    y = pybn.dropout(x, 0.5, seed=np.uint64(U64 - 1), offset=np.int64(2**40))
    assert_bitwise(y, want)


def test_offset_advance_continues_stream(isa):
    """A caller advancing offset by 16*ceil(n/128) gets the continuation."""
    seed, p, o = 31, 0.5, U64 - 40
    n1, n2 = 128 * 7, 1001
    m1 = pybn.dropout_mask((n1,), p, seed=seed, offset=o)
    adv = 16 * -(-n1 // 128)
    m2 = pybn.dropout_mask((n2,), p, seed=seed, offset=(o + adv) % U64)
    whole = pybn.dropout_mask((n1 + n2,), p, seed=seed, offset=o)
    bits = np.concatenate([rd.unpack_mask(m1, n1), rd.unpack_mask(m2, n2)])
    np.testing.assert_array_equal(bits, rd.unpack_mask(whole, n1 + n2))


def test_deterministic_across_isas_and_threads():
    x = data((100_003,), np.float32, seed=11)
    results = []
    prev = pybn.get_num_threads()
    try:
        for name in pybn.supported_isas():
            with pybn._runtime.use_isa(name):
                for t in (1, 2):
                    pybn.set_num_threads(t)
                    results.append((name, t, pybn.dropout(x, 0.37, seed=9, offset=123),
                                    pybn.dropout_mask(x.shape, 0.37, seed=9, offset=123)))
    finally:
        pybn.set_num_threads(prev)
    for name, t, y, m in results[1:]:
        assert_bitwise(y, results[0][2], f"dropout {name} t{t}")
        assert_bitwise(m, results[0][3], f"dropout_mask {name} t{t}")


# ----------------------------------------------------------- noise_shape

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_noise_shape_dropout2d_channels(isa, dtype):
    """(N, C, 1, 1): whole channels zeroed, survivors scaled (Dropout2d)."""
    x = data((4, 16, 7, 9), dtype, seed=5)
    p, ns = 0.5, (4, 16, 1, 1)
    y, m = check_all_three(x, p, 123, 456, noise_shape=ns)
    keep = rd.unpack_mask(m, 64).reshape(4, 16)
    scale = rd.scale_for(p, dtype)
    for a in range(4):
        for c in range(16):
            if keep[a, c]:
                assert_bitwise(y[a, c], x[a, c] * scale, f"kept channel {a},{c}")
            else:
                assert not y[a, c].view(np.uint8).any(), f"channel {a},{c}"
    assert 0 < keep.sum() < 64


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,ns", [
    ((4, 8, 33), (4, 8, 1)),           # Dropout1d
    ((4, 8, 33), (4, 1, 33)),          # mask shared along axis 1
    ((4, 8, 5, 3), (1, 8, 1, 1)),      # one mask per channel for all samples
    ((4, 8, 5, 3), (1, 1, 1, 1)),      # one bit for everything
    ((4, 8, 5, 3), (4, 8, 5, 3)),      # == x.shape
    ((300,), (1,)),
    ((3, 1, 5), (3, 1, 1)),            # axis of length 1 either way
    ((2, 129, 3), (2, 129, 1)),        # mask length not a multiple of 8/128
], ids=["N_C_1", "N_1_W", "1_C_1_1", "all1", "full", "1d", "len1axis", "odd"])
def test_noise_shape_variants(isa, dtype, shape, ns):
    x = data(shape, dtype, seed=6)
    for p, seed, offset in [(0.5, 3, 0), (0.2, 2**33 + 1, U64 - 2)]:
        check_all_three(x, p, seed, offset, noise_shape=ns)
    # a list is as good as a tuple
    assert_bitwise(pybn.dropout(x, 0.5, seed=3, noise_shape=list(ns)),
                   rd.dropout_ref(x, 0.5, 3, 0, ns))


def test_torch_dropout2d_behaviour():
    """torch's Dropout2d and pybn with noise_shape=(N, C, 1, 1) behave alike:
    each channel is either all zero or x times the scale (torch: 1/(1-p); pybn:
    1 / P(keep), 1.7e-5 larger relative at p = 0.3); and the zeroed channel
    fraction is near p for both (different RNGs, so not the same channels)."""
    torch = pytest.importorskip("torch")
    p = 0.3
    x = data((64, 64, 3, 3), np.float32, seed=8) + np.float32(3)   # no zeros
    torch.manual_seed(0)
    yt = torch.nn.functional.dropout2d(torch.from_numpy(x), p, training=True).numpy()
    yp = pybn.dropout(x, p, seed=1, noise_shape=(64, 64, 1, 1))
    for y, who, scale in ((yt, "torch", 1 / (1 - p)), (yp, "pybn", rd.scale64(p))):
        zero = (y == 0).reshape(64 * 64, 9)
        assert np.all(zero.all(axis=1) | ~zero.any(axis=1)), who
        kept = ~zero[:, 0]
        ratio = (y.reshape(64 * 64, 9)[kept] / x.reshape(64 * 64, 9)[kept])
        np.testing.assert_allclose(ratio, scale, rtol=1e-6, err_msg=who)
        n = 64 * 64
        assert abs((~kept).mean() - p) < 5 * math.sqrt(p * (1 - p) / n), who
    # pybn's channels are exactly the reference mask's
    keep = rd.mask_bits(64 * 64, p, 1, 0).reshape(64, 64)
    np.testing.assert_array_equal(yp[:, :, 0, 0] != 0, keep)


def test_scale_matches_torch_dropout():
    """p is the drop probability, as in torch.nn.functional.dropout; survivors are
    scaled by 1 / P(keep): torch's 1/(1-p) (to float rounding) for p a multiple of
    2**-16, within 2**-16 / (1 - p) of it otherwise."""
    torch = pytest.importorskip("torch")
    for p in (0.1, 0.5, 0.75, 0.8):
        ones = np.ones(10_000, np.float32)
        yt = torch.nn.functional.dropout(torch.from_numpy(ones), p, training=True).numpy()
        yp = pybn.dropout(ones, p, seed=2)
        vt = np.unique(yt)
        vp = np.unique(yp)
        assert len(vt) == len(vp) == 2 and vt[0] == vp[0] == 0
        exact = p * 65536 == int(p * 65536)
        np.testing.assert_allclose(vp[1], vt[1], rtol=2e-7 if exact else 2**-16 / (1 - p))
        assert vp[1] == np.float32(65536 / (65536 - math.floor(p * 65536)))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 1 / 3, 0.9, 0.999, 1 - 2**-16, 1 - 1e-9, 1 - 2**-53, 1.0])
def test_dropout_scale_is_the_inverse_keep_probability(p):
    """pybn.dropout_scale(p) * P(keep) == 1, P(keep) = 1 - floor(p * 65536) / 65536,
    the fraction of 16-bit words at or above the threshold; 0.0 for p == 1."""
    got = pybn.dropout_scale(p)
    assert type(got) is float
    if p == 1.0:
        assert got == 0.0
        return
    keep = 1 - math.floor(p * 65536) / 65536
    assert got == 1 / keep  # both one correctly rounded division of exact values
    assert got <= 65536.0
    if p * 65536 == int(p * 65536):  # multiples of 2**-16: PyTorch's 1/(1-p)
        assert got == 1 / (1 - p)
    for dtype in DTYPES:  # what the kernels multiply by: the scale rounded once to x's dtype
        y = pybn.dropout(np.ones(4096, dtype), p, seed=9)
        assert set(np.unique(y)) <= {0.0, dtype(got)}


def test_dropout_scale_bad_p():
    for bad, exc in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.5", TypeError),
                     (None, TypeError), (True, TypeError)):
        assert_raises_naming(exc, "p", pybn.dropout_scale, bad)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9, 1 - 2**-16, 1 - 1e-9])
def test_dropout_of_ones_has_mean_one(p):
    """Inverted dropout keeps the expectation for every p: the mean of dropout(ones) over
    n elements is 1 within 5 standard errors, sqrt((1 - q) / (q n)) with q = P(keep).
    (Scaling by 1/(1-p) made the mean 1e9 / 65536 = 15259 at p = 1 - 1e-9.)"""
    n = 20_000_000
    y = pybn.dropout(np.ones(n, np.float32), p, seed=0xD00D, offset=2**64 - 777)
    q = 1 - math.floor(p * 65536) / 65536
    kept = np.count_nonzero(y)
    assert kept > 0
    mean = y.mean(dtype=np.float64)
    se = math.sqrt((1 - q) / (q * n))
    assert abs(mean - 1) < 5 * se, (mean, se, kept)


# ------------------------------------------------- backward by regeneration

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("ns", [None, (8, 33, 1)], ids=["full", "N_C_1"])
def test_backward_by_regeneration_equals_torch_autograd(isa, dtype, ns):
    torch = pytest.importorskip("torch")
    p, seed, offset = 0.3, 2**63 + 11, U64 - 50
    x = data((8, 33, 17), dtype, seed=12)
    dy = data((8, 33, 17), dtype, seed=13)

    y = pybn.dropout(x, p, seed=seed, offset=offset, noise_shape=ns)
    dx = pybn.dropout(dy, p, seed=seed, offset=offset, noise_shape=ns)

    # torch: the same mask (from the reference), as a float tensor; autograd
    mask_shape = x.shape if ns is None else ns
    keep = rd.mask_bits(math.prod(mask_shape), p, seed, offset).reshape(mask_shape)
    mask_t = torch.from_numpy(keep.astype(dtype))
    scale_t = torch.tensor(rd.scale_for(p, dtype))        # 0-d, x's dtype
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = xt * mask_t * scale_t
    yt.backward(torch.from_numpy(dy.copy()))
    # value equality (torch gives -0.0 where a negative value was dropped)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert dx.dtype == dtype

    # with a stored mask: dropout_apply on dy
    m = pybn.dropout_mask(mask_shape, p, seed=seed, offset=offset)
    assert_bitwise(pybn.dropout_apply(dy, m, p, noise_shape=ns), dx, "dx via mask")


# -------------------------------------------------------- p = 0, p = 1

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_p0_is_identity(isa, dtype):
    for shape in [(1,), (67,), (3, 50, 7), (300_007,)]:
        x = data(shape, dtype, seed=14)
        x.reshape(-1)[0] = -0.0
        assert_bitwise(pybn.dropout(x, 0.0, seed=1), x, "dropout p=0")
        assert_bitwise(pybn.dropout(x, 0, seed=1, offset=U64 - 1), x, "int p=0")
        m = pybn.dropout_mask(shape, 0.0, seed=1)
        assert_bitwise(m, rd.packed_mask(math.prod(shape), 0.0, 1, 0))
        assert_bitwise(pybn.dropout_apply(x, m, 0.0), x, "dropout_apply p=0")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_p1_gives_zeros(isa, dtype):
    for shape in [(1,), (67,), (3, 50, 7), (300_007,)]:
        x = data(shape, dtype, seed=15)
        y = pybn.dropout(x, 1.0, seed=1)
        assert y.dtype == dtype and y.shape == x.shape
        assert not y.view(np.uint8).any(), "p=1 must give +0.0 everywhere"
        assert not pybn.dropout(x, 1, seed=1).view(np.uint8).any()
        m = pybn.dropout_mask(shape, 1.0, seed=1)
        assert m.shape == (-(-math.prod(shape) // 8),) and not m.any()
        ya = pybn.dropout_apply(x, m, 1.0)
        assert ya.dtype == dtype and not ya.view(np.uint8).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_specials(isa, dtype):
    """Kept NaN/Inf propagate (NaN*s, Inf*s); dropped elements are +0.0."""
    s = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, -1.0, 1e-45, 3.0] * 40, dtype)
    for p in (0.5, 0.25):
        check_all_three(s, p, 3, 7, what=f"p={p}")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 / 3, 0.999, 1e-3, 2**-17, 1 - 2**-17])
def test_threshold_and_scale_for_many_p(isa, p):
    for dtype in DTYPES:
        x = data((1001,), dtype, seed=16)
        check_all_three(x, p, 44, 55, what=f"p={p}")


# -------------------------------------------------------------- out=

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_and_in_place(isa, dtype):
    x = data((5, 7, 11), dtype, seed=17)
    want = rd.dropout_ref(x, 0.4, 8, 9)
    out = np.full_like(x, 7)
    assert pybn.dropout(x, 0.4, seed=8, offset=9, out=out) is out
    assert_bitwise(out, want)
    m = pybn.dropout_mask(x.shape, 0.4, seed=8, offset=9)
    out2 = np.full_like(x, 7)
    assert pybn.dropout_apply(x, m, 0.4, out=out2) is out2
    assert_bitwise(out2, want)
    # in place
    xi = x.copy()
    assert pybn.dropout(xi, 0.4, seed=8, offset=9, out=xi) is xi
    assert_bitwise(xi, want, "in place")
    xi = x.copy()
    assert pybn.dropout_apply(xi, m, 0.4, out=xi) is xi
    assert_bitwise(xi, want, "dropout_apply in place")
    # with noise_shape
    ns = (5, 1, 11)
    out3 = np.empty_like(x)
    assert pybn.dropout(x, 0.4, seed=8, noise_shape=ns, out=out3) is out3
    assert_bitwise(out3, rd.dropout_ref(x, 0.4, 8, 0, ns))


BAD_OUT_IDS = [k for k, _, _ in bad_outs((4, 3, 5), np.float32, transposed=False)]


@pytest.mark.parametrize("which", range(len(BAD_OUT_IDS)), ids=BAD_OUT_IDS)
def test_bad_out(which):
    x = data((4, 3, 5), np.float32)
    _, out, exc = bad_outs(x.shape, x.dtype, transposed=False)[which]
    snapshot = out.copy() if isinstance(out, np.ndarray) else None
    assert_raises_naming(exc, "out", pybn.dropout, x, 0.5, seed=1, out=out)
    m = pybn.dropout_mask(x.shape, 0.5, seed=1)
    assert_raises_naming(exc, "out", pybn.dropout_apply, x, m, 0.5, out=out)
    if snapshot is not None:
        np.testing.assert_array_equal(out, snapshot)


# ------------------------------------------- layouts and array-likes

def test_non_contiguous_and_fortran_inputs(isa):
    """The mask follows the logical C-order index, not the memory order."""
    base = data((6, 40, 9), np.float32, seed=18)
    for x in (base[:, ::2], base[::-1], np.asfortranarray(base), base.transpose(2, 0, 1)):
        want = rd.dropout_ref(np.ascontiguousarray(x), 0.5, 4, 1)
        y = pybn.dropout(x, 0.5, seed=4, offset=1)
        assert y.flags.c_contiguous
        assert_bitwise(y, want)
        m = pybn.dropout_mask(x.shape, 0.5, seed=4, offset=1)
        assert_bitwise(pybn.dropout_apply(x, m, 0.5), want, "dropout_apply")


def test_array_like_inputs():
    lst = [[0.5, -1.0, 2.0], [3.0, 4.0, -5.0]]
    y = pybn.dropout(lst, 0.5, seed=6)
    assert y.dtype == np.float64
    assert_bitwise(y, rd.dropout_ref(np.asarray(lst), 0.5, 6))
    m = pybn.dropout_mask((2, 3), 0.5, seed=6)
    assert_bitwise(pybn.dropout_apply(lst, m, 0.5), y)


def test_mask_shape_as_int():
    """shape may be an int, as in np.zeros(n)."""
    assert_bitwise(pybn.dropout_mask(1001, 0.5, seed=3),
                   rd.packed_mask(1001, 0.5, 3, 0))


def test_mask_format():
    for n in (1, 7, 8, 9, 1001):
        m = pybn.dropout_mask((n,), 0.5, seed=3, offset=2)
        assert m.dtype == np.uint8 and m.shape == (-(-n // 8),)
        if n % 8:
            assert int(m[-1]) >> (n % 8) == 0, "trailing bits must be zero"
        np.testing.assert_array_equal(np.unpackbits(m, count=n, bitorder="little"),
                                      rd.mask_bits(n, 0.5, 3, 2))
    # a multi-dimensional shape gives the same flat packed mask
    assert_bitwise(pybn.dropout_mask((7, 11, 13), 0.5, seed=3),
                   pybn.dropout_mask((1001,), 0.5, seed=3))


# --------------------------------------------------------------- empty

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (0, 4)], ids=["0", "3x0x5", "0x4"])
def test_empty(isa, dtype, shape):
    x = np.zeros(shape, dtype)
    for p in (0.0, 0.5, 1.0):
        y = pybn.dropout(x, p, seed=1, offset=U64 - 1)
        assert y.shape == shape and y.dtype == dtype
        m = pybn.dropout_mask(shape, p, seed=1)
        assert m.dtype == np.uint8 and m.shape == (0,)
        ya = pybn.dropout_apply(x, m, p)
        assert ya.shape == shape and ya.dtype == dtype
        out = np.empty(shape, dtype)
        assert pybn.dropout(x, p, seed=1, out=out) is out


# -------------------------------------------------------------- errors

BAD_P = [-0.1, -1e-12, 1.0000001, 2.0, float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("p", BAD_P, ids=str)
def test_bad_p(p):
    x = data((10,), np.float32)
    m = pybn.dropout_mask((10,), 0.5, seed=1)
    assert_raises_naming(ValueError, "p", pybn.dropout, x, p, seed=1)
    assert_raises_naming(ValueError, "p", pybn.dropout_mask, (10,), p, seed=1)
    assert_raises_naming(ValueError, "p", pybn.dropout_apply, x, m, p)


@pytest.mark.parametrize("bad", [-1, -(2**63), U64, U64 + 5, 2**100],
                         ids=["-1", "-2^63", "2^64", "2^64+5", "2^100"])
def test_bad_seed_offset_range(bad):
    x = data((10,), np.float32)
    assert_raises_naming(ValueError, "seed", pybn.dropout, x, 0.5, seed=bad)
    assert_raises_naming(ValueError, "offset", pybn.dropout, x, 0.5, seed=1, offset=bad)
    assert_raises_naming(ValueError, "seed", pybn.dropout_mask, (10,), 0.5, seed=bad)
    assert_raises_naming(ValueError, "offset", pybn.dropout_mask, (10,), 0.5,
                         seed=1, offset=bad)


def test_bad_seed_offset_type():
    x = data((10,), np.float32)
    for bad in (1.5, None, "3"):
        assert_raises_naming((TypeError, ValueError), "seed", pybn.dropout, x, 0.5,
                             seed=bad)
        assert_raises_naming((TypeError, ValueError), "offset", pybn.dropout, x, 0.5,
                             seed=1, offset=bad)
        assert_raises_naming((TypeError, ValueError), "seed", pybn.dropout_mask,
                             (10,), 0.5, seed=bad)


def test_seed_is_required_keyword():
    x = data((10,), np.float32)
    with pytest.raises(TypeError):
        pybn.dropout(x, 0.5)
    with pytest.raises(TypeError):
        pybn.dropout(x, 0.5, 1)             # seed is keyword-only
    with pytest.raises(TypeError):
        pybn.dropout_mask((10,), 0.5)


def test_limits_accepted():
    x = data((10,), np.float32)
    assert_bitwise(pybn.dropout(x, 0.5, seed=U64 - 1, offset=U64 - 1),
                   rd.dropout_ref(x, 0.5, U64 - 1, U64 - 1))
    assert_bitwise(pybn.dropout(x, 1.0, seed=0, offset=0), np.zeros_like(x))


def test_bad_mask():
    x = data((5, 7), np.float32)                       # 35 elements: 5 bytes
    m = pybn.dropout_mask(x.shape, 0.5, seed=1)
    assert m.shape == (5,)
    for bad in (m[:4], np.concatenate([m, m[:1]]), m[:0]):
        assert_raises_naming(ValueError, "mask", pybn.dropout_apply, x, bad, 0.5)
    # the mask of x.shape where noise_shape asks for a smaller one
    assert_raises_naming(ValueError, "mask", pybn.dropout_apply, x, m, 0.5,
                         noise_shape=(5, 1))
    # and the other way round
    small = pybn.dropout_mask((5, 1), 0.5, seed=1)
    assert_raises_naming(ValueError, "mask", pybn.dropout_apply, x, small, 0.5)
    # an unpacked (bool / float) mask is not a packed uint8 mask
    keep = rd.mask_bits(35, 0.5, 1, 0)
    for bad in (keep, keep.astype(np.float32)):
        assert_raises_naming((TypeError, ValueError), "mask", pybn.dropout_apply,
                             x, bad, 0.5)


def test_noise_shape_none_entries_are_xs_extents():
    """Keras' noise_shape=(None, 1, ...): None stands for x's extent on that axis (as
    pybn.nn.Dropout takes it)."""
    x = data((4, 8, 5, 3), np.float32, seed=7)
    want = rd.dropout_ref(x, 0.5, 3, 0, (4, 8, 1, 1))
    assert_bitwise(pybn.dropout(x, 0.5, seed=3, noise_shape=(None, None, 1, 1)), want)
    assert_bitwise(pybn.dropout(x, 0.5, seed=3, noise_shape=[4, None, 1, 1]), want)
    mask = pybn.dropout_mask((4, 8, 1, 1), 0.5, seed=3)
    assert_bitwise(pybn.dropout_apply(x, mask, 0.5, noise_shape=(None, 8, 1, 1)), want)
    assert_bitwise(pybn.dropout(x, 0.5, seed=3, noise_shape=(None,) * 4), rd.dropout_ref(x, 0.5, 3, 0, None))
    for bad in ((None, 1, 1), (None, 8, 1, 1, 1)):  # (a None needs one entry per axis)
        assert_raises_naming(ValueError, "noise_shape", pybn.dropout, x, 0.5, seed=1, noise_shape=bad)


@pytest.mark.parametrize("ns", [(5, 7, 1), (5,), (5, 2), (2, 7), (5, 0), (-5, 7),
                                (5, 14), ()],
                         ids=["too-long", "too-short", "2-not-7", "2-not-5",
                              "zero", "negative", "double", "empty"])
def test_bad_noise_shape(ns):
    x = data((5, 7), np.float32)
    assert_raises_naming(ValueError, "noise_shape", pybn.dropout, x, 0.5, seed=1,
                         noise_shape=ns)
    m = pybn.dropout_mask(x.shape, 0.5, seed=1)
    assert_raises_naming(ValueError, "noise_shape", pybn.dropout_apply, x, m, 0.5,
                         noise_shape=ns)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_,
                                   np.longdouble, np.complex64],
                         ids=["i32", "i64", "u8", "bool", "longdouble", "c64"])
def test_bad_x_dtype(dtype):
    x = np.ones((4, 5), dtype)
    m = pybn.dropout_mask(x.shape, 0.5, seed=1)
    assert_raises_naming(TypeError, "x", pybn.dropout, x, 0.5, seed=1)
    assert_raises_naming(TypeError, "x", pybn.dropout_apply, x, m, 0.5)


def test_bad_mask_shape_argument():
    assert_raises_naming(ValueError, "shape", pybn.dropout_mask, (3, -1), 0.5, seed=1)


# ---------------------------------------------------------- statistics

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_statistics(p):
    """Over 10**7 elements: kept fraction within 5 sigma of 1 - p, mean of the
    output within 5 sigma of the mean of x (inverted dropout is unbiased)."""
    n = 10**7
    rng = np.random.default_rng(20)
    x = rng.uniform(0.5, 1.5, n).astype(np.float32)     # no zeros
    seed, offset = 0xC0FFEE, 2**64 - 12345
    y = pybn.dropout(x, p, seed=seed, offset=offset)
    m = pybn.dropout_mask((n,), p, seed=seed, offset=offset)

    q = 1 - p
    sig_keep = math.sqrt(p * q / n)
    kept_mask = int(np.unpackbits(m, count=n, bitorder="little").sum()) / n
    kept_y = np.count_nonzero(y) / n
    assert kept_mask == kept_y
    assert abs(kept_y - q) < 5 * sig_keep, (kept_y, q, sig_keep)

    mx = x.mean(dtype=np.float64)
    my = y.mean(dtype=np.float64)
    ex2 = np.mean(np.square(x, dtype=np.float64))
    # Var(mean(y) | x) = sum x_i^2 * ((1 - qk) / qk) / n^2, qk = P(keep); the scale
    # 1 / qk leaves no bias
    qk = 1 - math.floor(p * 65536) / 65536
    sig_mean = math.sqrt((1 - qk) / qk * ex2 / n)
    assert abs(my - mx) < 5 * sig_mean, (my, mx, sig_mean)


# ------------------------------------------------------ random problems
# (a seeded sweep of the API's argument space; tests/test_fuzz.py adds hypothesis)

def random_problems(count, seed=2024):
    rng = np.random.default_rng(seed)
    isas = list(pybn.supported_isas())
    for _ in range(count):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(s) for s in rng.integers(0, 10, ndim))
        ns = tuple(1 if rng.random() < 0.5 else s for s in shape)
        ns = ns if rng.random() < 0.5 else None
        p = float(rng.choice([0.0, 0.1, 0.5, 0.75, 0.9, 1.0]))
        if rng.random() < 0.5:
            seed_ = int(rng.integers(0, 2**32, endpoint=True))
        else:
            seed_ = U64 - 1 - int(rng.integers(0, 2**32))
        offset = int(rng.integers(0, 1000)) if rng.random() < 0.5 else U64 - 1 - int(rng.integers(0, 2000))
        dtype = DTYPES[int(rng.integers(0, 2))]
        isa_name = isas[int(rng.integers(0, len(isas)))]
        yield shape, ns, p, seed_, offset, dtype, isa_name


def test_random_problems_against_reference():
    for problem in random_problems(200):
        shape, ns, p, seed, offset, dtype, isa_name = problem
        x = data(shape, dtype, seed=seed % 1000)
        with pybn._runtime.use_isa(isa_name):
            check_all_three(x, p, seed, offset, noise_shape=ns, what=str(problem))


def test_zero_dimensional_arrays_are_numbers():
    """A 0-d array (np.asarray of a configured 0.3) is the number it holds, as NumPy's own
    functions take it; a 1-element 1-d array is not."""
    x = np.random.default_rng(0).normal(size=(64, 33)).astype(np.float32)
    np.testing.assert_array_equal(pybn.dropout(x, np.array(0.3), seed=5), pybn.dropout(x, 0.3, seed=5))
    y, _, _ = pybn.batch_norm_train(x, eps=np.array(1e-3, dtype=np.float32), axis=1)
    np.testing.assert_array_equal(y, pybn.batch_norm_train(x, eps=1e-3, axis=1)[0])
    with pytest.raises(TypeError, match="^p: must be a real number"):
        pybn.dropout(x, np.array([0.3]), seed=5)
    with pytest.raises(TypeError, match="^p: must be a real number"):
        pybn.dropout(x, np.array(True), seed=5)
