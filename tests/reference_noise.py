"""Independent plain-NumPy reference for pybn's normal variates (docs/dropout.md, "Normal variates").

Follows the page, not pybn's code; nothing here calls pybn. Every float operation is a
NumPy float32 operation (each rounded once, as IEEE prescribes), in the order the page
gives, so the variates must equal pybn's bit for bit.

Variate k of (seed, offset):
    g = k // 64, i = k % 64, p = i // 32, t = i % 32, c = t % 16
    b = (offset + 16*g + c) mod 2**64, r = Philox4x32-10((b mod 2**32, b >> 32, 0, 0), key)
    R = sqrt(-2 ln u(r[2p])), (cos, sin) of the angle of r[2p + 1]
    z_k = R * cos if t < 16 else R * sin
"""
import numpy as np

from reference_dropout import check_u64, philox4x32_10

F = np.float32
GROUP = 64
COUNTERS = 16


def unit(w):
    """u in (0, 1]: float32((w >> 1) | 1) * 2**-31."""
    odd = ((w >> np.uint32(1)) | np.uint32(1)).astype(np.int32)
    return odd.astype(np.float32) * F(2.0**-31)


def log_unit(u):
    """ln u: u = m * 2**e, m in [sqrt(1/2), sqrt(2)); 2 atanh(s) to s**9; e * ln 2 in two parts."""
    bits = u.view(np.uint32)
    e = (bits - np.uint32(0x3F3504F3)).view(np.int32) >> 23
    m = (bits - (e.view(np.uint32) << np.uint32(23))).view(np.float32)
    f = m - F(1)
    s = f / (m + F(1))
    s2 = s * s
    p = s2 * (F(1) / F(3) + s2 * (F(1) / F(5) + s2 * (F(1) / F(7) + s2 * (F(1) / F(9)))))
    half_log = s + s * p
    ef = e.astype(np.float32)
    return ef * F(0.693145751953125) + (ef * F(1.428606765330187e-06) + (half_log + half_log))


def reduced_angle(w):
    """phi = k * (pi/4 rounded to float32) * 2**-24, k = ((w >> 5) & (2**25 - 1) | 1) - 2**24."""
    k = (((w >> np.uint32(5)) & np.uint32(0x1FFFFFF)) | np.uint32(1)).astype(np.int64) - (1 << 24)
    return k.astype(np.float32) * (F(np.pi / 4) * F(2.0**-24))


def sin_reduced(phi):
    p2 = phi * phi
    c3, c5, c7, c9 = F(-1) / F(6), F(1) / F(120), F(-1) / F(5040), F(1) / F(362880)
    return phi + phi * (p2 * (c3 + p2 * (c5 + p2 * (c7 + p2 * c9))))


def cos_reduced(phi):
    p2 = phi * phi
    c4, c6, c8, c10 = F(1) / F(24), F(-1) / F(720), F(1) / F(40320), F(-1) / F(3628800)
    return F(1) + p2 * (F(-0.5) + p2 * (c4 + p2 * (c6 + p2 * (c8 + p2 * c10))))


def rotated(q, c, s):
    """(cos, sin) of q quarter turns plus phi, from (cos phi, sin phi)."""
    quarter = [(c, s), (-s, c), (-c, -s), (s, -c)]
    cos = np.select([q == k for k in range(4)], [quarter[k][0] for k in range(4)])
    sin = np.select([q == k for k in range(4)], [quarter[k][1] for k in range(4)])
    return cos.astype(np.float32), sin.astype(np.float32)


def normal_variates(n, seed, offset):
    """z_0 .. z_{n-1} (float32) of the normal stream."""
    seed, offset = check_u64(seed, "seed"), check_u64(offset, "offset")
    groups = -(-int(n) // GROUP)
    b = np.arange(COUNTERS * groups, dtype=np.uint64) + np.uint64(offset)
    ctr = np.zeros((b.size, 4), np.uint32)
    ctr[:, 0] = (b & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    ctr[:, 1] = (b >> np.uint64(32)).astype(np.uint32)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    r = philox4x32_10(ctr, key).reshape(groups, COUNTERS, 4)  # [g, c, word]
    z = np.empty((groups, GROUP), np.float32)
    for p in range(2):
        radius = np.sqrt(F(-2) * log_unit(unit(r[:, :, 2 * p])))
        angle_words = r[:, :, 2 * p + 1]
        phi = reduced_angle(angle_words)
        cos, sin = rotated(angle_words >> np.uint32(30), cos_reduced(phi), sin_reduced(phi))
        z[:, 32 * p:32 * p + 16] = radius * cos
        z[:, 32 * p + 16:32 * p + 32] = radius * sin
    return z.reshape(-1)[:n]
