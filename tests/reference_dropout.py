"""Independent plain-NumPy reference for pybn's dropout mask stream.

Follows docs/dropout.md, whose mask stream is normative. Nothing here calls pybn.
Everything is vectorized with uint64 arithmetic (no Python loop over
elements); the only loop is over Philox's 10 rounds.

Philox4x32-10 is Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As
Easy as 1, 2, 3", SC'11, as implemented in Random123 (philox.h):

    round(c, k):  (hi0, lo0) = mulhilo(0xD2511F53, c0)
                  (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
                  c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    bumpkey(k):   k0 += 0x9E3779B9, k1 += 0xBB67AE85   (mod 2**32)
    philox4x32_10(c, k) = round(c, k); then 9 times: k = bumpkey(k); c = round(c, k)

Mask element k (C-order flat index over the mask's shape):
    g = k // 128, i = k % 128, j = i // 32, t = i % 32, lane = t // 2, h = t % 2
    b = (offset + 16*g + lane) mod 2**64
    r = philox4x32_10(counter=(b mod 2**32, b >> 32, 0, 0),
                      key=(seed mod 2**32, seed >> 32))
    u_k = (r[j] >> (16*h)) & 0xFFFF
    kept iff u_k >= T, T = floor(p * 65536), for p < 1; nothing kept for p == 1.

Scaling (dropout_ref): y = np.where(keep, x * scale, 0) computed in x's dtype,
with scale = x.dtype.type(65536 / (65536 - T)), the inverse of the actual keep
probability q = 1 - T / 65536 (the division done in float64, then rounded once
to x's dtype), so that E[y] = x for every p < 1; for p a multiple of 2**-16 it
is 1 / (1 - p). Dropped elements are exactly +0.0 whatever x holds (also -0.0,
NaN, Inf). p == 1 gives +0.0 everywhere, no division.
"""

import math
import numbers

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SH32 = np.uint64(32)
_SH16 = np.uint64(16)
_MASK16 = np.uint64(0xFFFF)

U64_LIMIT = 2**64
GROUP = 128          # elements per group of 16 Philox calls
COUNTERS_PER_GROUP = 16


# ------------------------------------------------------------------ Philox

def philox4x32_10(counter, key):
    """Philox4x32-10 of `counter` (..., 4) under `key` (..., 2), both uint32
    (broadcast against each other). Returns uint32 (..., 4)."""
    counter = np.asarray(counter)
    key = np.asarray(key)
    if counter.shape[-1:] != (4,):
        raise ValueError(f"counter must have a last axis of 4, got {counter.shape}")
    if key.shape[-1:] != (2,):
        raise ValueError(f"key must have a last axis of 2, got {key.shape}")
    counter = counter.astype(np.uint32, copy=False)
    key = key.astype(np.uint32, copy=False)

    # every word held in uint64 so that the 32x32 products are exact
    c0, c1, c2, c3 = (counter[..., i].astype(np.uint64) for i in range(4))
    k0 = key[..., 0].astype(np.uint64)
    k1 = key[..., 1].astype(np.uint64)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        p0 = PHILOX_M0 * c0          # < 2**64: exact
        p1 = PHILOX_M1 * c2
        hi0, lo0 = p0 >> _SH32, p0 & _MASK32
        hi1, lo1 = p1 >> _SH32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    out = np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1)
    return out.astype(np.uint32)


# ------------------------------------------------------- argument checking

def check_u64(value, name):
    """An integer in [0, 2**64) as a Python int (bool and floats refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if not 0 <= v < U64_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def check_p(p):
    p = float(p)
    if not 0.0 <= p <= 1.0:       # also refuses NaN
        raise ValueError(f"p must be in [0, 1], got {p}")
    return p


def threshold(p):
    """T = floor(p * 65536) for p < 1 (p * 65536 is exact in float64);
    None for p == 1 (nothing kept)."""
    p = check_p(p)
    if p == 1.0:
        return None
    return math.floor(p * 65536.0)


def n_counters(n):
    """Counters a mask of n elements uses: 16 * ceil(n / 128)."""
    return COUNTERS_PER_GROUP * (-(-int(n) // GROUP))


# ----------------------------------------------------------- mask stream

def random_u16(n, seed, offset):
    """The 16-bit random numbers u_0 .. u_{n-1} (uint16) of the stream."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = check_u64(seed, "seed")
    offset = check_u64(offset, "offset")
    G = -(-n // GROUP)
    # counters b = offset + 0 .. 16G-1, wrapping mod 2**64 (uint64 array
    # arithmetic wraps silently)
    b = np.arange(COUNTERS_PER_GROUP * G, dtype=np.uint64) + np.uint64(offset)
    ctr = np.zeros((b.size, 4), dtype=np.uint32)
    ctr[:, 0] = (b & _MASK32).astype(np.uint32)
    ctr[:, 1] = (b >> _SH32).astype(np.uint32)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
    r = philox4x32_10(ctr, key).astype(np.uint64)        # (16G, 4): [b, j]
    r = r.reshape(G, COUNTERS_PER_GROUP, 4)              # [g, lane, j]
    r = r.transpose(0, 2, 1)                             # [g, j, lane]
    halves = np.stack([r & _MASK16, (r >> _SH16) & _MASK16], axis=-1)  # [g, j, lane, h]
    # flat index within the group: 32*j + 2*lane + h = i
    return halves.reshape(-1)[:n].astype(np.uint16)


def mask_bits(n, p, seed, offset=0):
    """Boolean keep-mask of n elements (True = kept)."""
    T = threshold(p)
    u = random_u16(n, seed, offset)
    if T is None:
        return np.zeros(u.shape, dtype=bool)
    return u >= T


def packed_mask(n, p, seed, offset=0):
    """uint8, ceil(n/8) bytes, bit k % 8 of byte k // 8, trailing bits zero."""
    return np.packbits(mask_bits(n, p, seed, offset), bitorder="little")


def unpack_mask(packed, n):
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=int(n),
                         bitorder="little").astype(bool)


# ---------------------------------------------------------------- dropout

def check_noise_shape(noise_shape, shape):
    shape = tuple(int(s) for s in shape)
    if noise_shape is None:
        return shape
    ns = tuple(int(s) for s in noise_shape)
    if len(ns) != len(shape) or any(a not in (1, s) for a, s in zip(ns, shape)):
        raise ValueError(f"noise_shape {ns} does not fit x's shape {shape}")
    return ns


def scale64(p):
    """1 / q in float64, q = 1 - T / 65536 the probability that an element is
    kept (None for p == 1)."""
    T = threshold(p)
    if T is None:
        return None
    return 65536.0 / (65536 - T)


def scale_for(p, dtype):
    """scale64(p) rounded once to dtype (None for p == 1)."""
    s = scale64(p)
    return None if s is None else np.dtype(dtype).type(s)


def keep_mask(shape, p, seed, offset=0, noise_shape=None):
    """Boolean keep-mask broadcast to `shape` (drawn over noise_shape)."""
    ns = check_noise_shape(noise_shape, shape)
    n = math.prod(ns)
    m = mask_bits(n, p, seed, offset).reshape(ns)
    return np.broadcast_to(m, tuple(shape))


def _apply(x, keep, p):
    scale = scale_for(p, x.dtype)
    if scale is None:
        return np.zeros(x.shape, dtype=x.dtype)
    y = np.where(keep, x * scale, x.dtype.type(0))
    assert y.dtype == x.dtype
    return np.ascontiguousarray(y)


def dropout_ref(x, p, seed, offset=0, noise_shape=None):
    """Inverted dropout of x (float32/float64) with the normative mask."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    keep = keep_mask(x.shape, p, seed, offset, noise_shape)
    return _apply(x, keep, p)


def dropout_apply_ref(x, packed, p, noise_shape=None):
    """Inverted dropout of x with a packed mask drawn over noise_shape."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    ns = check_noise_shape(noise_shape, x.shape)
    n = math.prod(ns)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != -(-n // 8):
        raise ValueError(f"mask must have {-(-n // 8)} bytes, got {packed.size}")
    keep = np.broadcast_to(unpack_mask(packed, n).reshape(ns), x.shape)
    return _apply(x, keep, p)
