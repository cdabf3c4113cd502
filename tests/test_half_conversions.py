"""The 16-bit storage conversions (csrc/include/pybn/half.h, the vector loads and stores of
each path): every float16 and bfloat16 value widened, and float32 values narrowed at and
around every rounding boundary, bit for bit against NumPy (float16) and ml_dtypes
(bfloat16), on every path. NaN bits follow the rule of docs/dtypes.md (quiet, sign and the
top of the payload kept), which the test states independently of the code."""

import numpy as np
import pytest

from pybn import _C

try:  # (the bfloat16 expectations need ml_dtypes' dtype; the float16 ones run without it, as in the wheel tests)
    from ml_dtypes import bfloat16 as BF16
except ImportError:
    BF16 = None
needs_ml_dtypes = pytest.mark.skipif(BF16 is None, reason="bfloat16 values need ml_dtypes")
CONVERT = _C.diagnostics.convert_16bit
ALL16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def widen(bits, bfloat16):
    out = np.empty(bits.shape, np.float32)
    CONVERT(bits, out, bfloat16, True)
    return out.view(np.uint32)


def narrow(values, bfloat16):
    out = np.empty(values.shape, np.uint16)
    CONVERT(values.astype(np.float32), out, bfloat16, False)
    return out


def f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def expected_narrow(values, bfloat16):
    """NumPy's/ml_dtypes' rounding, NaN as the rule says: sign, all-ones exponent, quiet
    bit, then the payload's top bits (10 - 1 of float16's, 7 - 1 of bfloat16's)."""
    values = values.astype(np.float32)
    bits = values.view(np.uint32)
    with np.errstate(invalid="ignore", over="ignore"):
        want = (values.astype(BF16) if bfloat16 else values.astype(np.float16)).view(np.uint16).copy()
    nan = np.isnan(values)
    sign = (bits >> 16) & 0x8000
    nan_bits = (bits >> 16) | 0x0040 if bfloat16 else sign | 0x7E00 | ((bits >> 13) & 0x3FF)
    want[nan] = nan_bits[nan].astype(np.uint16)
    return want


def boundaries_float16():
    """Every float16 value, the midpoints between neighbours (exact in float32) and the
    float32 values just below and above each, with both signs; past the largest finite value,
    the overflow threshold 65520 and its neighbours; float32 subnormals, zeros, infinities."""
    h = np.arange(0x7C00, dtype=np.uint16)  # non-negative finite float16
    v = h.view(np.float16).astype(np.float64)
    nxt = np.append(v[1:], 65536.0)  # 65536 stands for the rounding threshold past 65504
    mid = ((v + nxt) / 2).astype(np.float32)
    pts = np.concatenate([v.astype(np.float32), mid, np.nextafter(mid, np.float32(0)),
                          np.nextafter(mid, np.float32(np.inf)), np.float32([65520, 65536, 1e30, 3.4e38])])
    pts = np.concatenate([pts, f32([1, 0x7FFFFF, 0x7F800000, 0x00800000, 0x33000000, 0x33000001, 0x32FFFFFF])])
    return np.concatenate([pts, -pts])


def boundaries_bfloat16():
    """For every 16-bit pattern u, the float32 values u << 16 plus the low halves 0 (exact),
    1, 0x7FFF, 0x8000 (the tie), 0x8001 and 0xFFFF: every boundary and its neighbours,
    subnormals, the overflow to infinity and NaNs included."""
    hi = ALL16.astype(np.uint32) << 16
    lows = np.uint32([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    return f32((hi[:, None] | lows[None, :]).ravel())


def nan_payloads():
    rng = np.random.default_rng(3)
    mant = rng.integers(1, 2**23, 4000, dtype=np.uint32)
    sign = rng.integers(0, 2, 4000, dtype=np.uint32) << 31
    return f32(sign | 0x7F800000 | mant)


def random_floats(n=1 << 20):
    return f32(np.random.default_rng(9).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32))


def test_float16_widening_is_exact_with_quiet_nans(isa):
    got = widen(ALL16, False)
    with np.errstate(invalid="ignore"):  # NumPy converts in hardware on AArch64: a signalling NaN raises
        want = ALL16.view(np.float16).astype(np.float32).view(np.uint32).copy()
    nan = np.isnan(ALL16.view(np.float16))
    want[nan] |= 0x00400000  # a signalling NaN comes back quiet (as F16C's vcvtph2ps)
    np.testing.assert_array_equal(got, want)
    assert nan.sum() == 2 * 1023


@needs_ml_dtypes
def test_bfloat16_widening_is_exact(isa):
    np.testing.assert_array_equal(widen(ALL16, True), ALL16.view(BF16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("values", [boundaries_float16, nan_payloads, random_floats])
def test_float16_narrowing_rounds_to_nearest_even(isa, values):
    v = values()
    np.testing.assert_array_equal(narrow(v, False), expected_narrow(v, False))


@needs_ml_dtypes
@pytest.mark.parametrize("values", [boundaries_bfloat16, nan_payloads, random_floats])
def test_bfloat16_narrowing_rounds_to_nearest_even(isa, values):
    v = values()
    np.testing.assert_array_equal(narrow(v, True), expected_narrow(v, True))


def test_ties_go_to_even_and_overflow_to_infinity(isa):
    """A few cases spelled out: 1 + 2^-11 (float16 tie, down to 1), 1 + 3 * 2^-11 (tie, up),
    65519 (65504), 65520 (inf), 2^-25 (tie with 0: 0), 2^-25 + (tiny) (the smallest
    subnormal); bfloat16 1 + 2^-8 (down), 1 + 3 * 2^-8 (up), the largest float (inf)."""
    v = np.float32([1 + 2**-11, 1 + 3 * 2**-11, 65519, 65520, 2**-25, np.nextafter(np.float32(2**-25), np.float32(1))])
    np.testing.assert_array_equal(narrow(v, False), np.uint16([0x3C00, 0x3C02, 0x7BFF, 0x7C00, 0, 1]))
    v = np.float32([1 + 2**-8, 1 + 3 * 2**-8, np.finfo(np.float32).max, -np.inf])
    np.testing.assert_array_equal(narrow(v, True), np.uint16([0x3F80, 0x3F82, 0x7F80, 0xFF80]))


@pytest.mark.parametrize("bfloat16", [False, pytest.param(True, marks=needs_ml_dtypes)], ids=["float16", "bfloat16"])
def test_every_length_and_offset(isa, bfloat16):
    """Whole vectors and a partial last one at any start: lengths 0..40 from offsets 0..3,
    nothing read or written past the end (the neighbours keep their values)."""
    rng = np.random.default_rng(1)
    src = rng.standard_normal(64).astype(np.float32)
    for off in range(4):
        for n in range(41):
            out = np.full(64, 0xABCD, np.uint16)
            CONVERT(src[off:off + n], out[off:off + n], bfloat16, False)
            np.testing.assert_array_equal(out[off:off + n], expected_narrow(src[off:off + n], bfloat16))
            assert (out[:off] == 0xABCD).all() and (out[off + n:] == 0xABCD).all()
            back = np.full(64, 7, np.float32)
            CONVERT(out[off:off + n], back[off:off + n], bfloat16, True)
            want = (out[off:off + n].view(BF16) if bfloat16 else out[off:off + n].view(np.float16)).astype(np.float32)
            np.testing.assert_array_equal(back[off:off + n], want)
            assert (back[:off] == 7).all() and (back[off + n:] == 7).all()


@needs_ml_dtypes
def test_bfloat16_subnormals_among_normals_and_zeros(isa):
    """The avx512bf16 path rounds with vcvtneps2bf16, which reads subnormal inputs as zero,
    and sends a vector holding one to the integer rounding: one subnormal at each lane of
    a vector of normals, and vectors of normals and signed zeros only (the fast branch), give
    ml_dtypes' bits on every path. 0x007FFFFF rounds up to the smallest normal, 0x00008000
    is a tie that goes to even (0), 0x00018000 a tie that goes up."""
    rng = np.random.default_rng(5)
    for sub in (0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80400000):
        for lane in range(32):
            v = rng.standard_normal(32).astype(np.float32)
            v[lane] = f32(sub)
            np.testing.assert_array_equal(narrow(v, True), expected_narrow(v, True))
    v = rng.standard_normal(64).astype(np.float32)
    v[::3] = 0.0
    v[1::5] = -0.0
    np.testing.assert_array_equal(narrow(v, True), expected_narrow(v, True))
    assert narrow(f32([0x007FFFFF, 0x00008000, 0x00018000]), True).tolist() == [0x0080, 0x0000, 0x0002]
