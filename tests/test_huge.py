"""More than 2**31 elements (opt-in: ``python -m pytest -m slow tests/test_huge.py``).

One float32 array of 2**31 + 2**20 + 1 elements in a (N, C) = (429706445, 5) shape, 8.6 GB,
worked on in place (out=x) so that it is the only big allocation (plus a 268 MB packed
mask). x holds a pattern of period 2**20 + 1 (prime to C and not dividing 2**31), so an
index that wrapped at 2**31 or 2**32 would read other values or another channel.
Checked at the start, around the elements whose byte offsets are 2**31 and 2**32 (2**29,
2**30), around element 2**31, at the end and at 64 random places, against NumPy on those
slices only:

* batch_norm_train (the per-channel mean and variance of all 2**31 + 2**20 + 1 values,
  computed exactly from the pattern's counts, and the running statistics), then
  batch_norm_infer on its output (channel of element i: i % 5);
* dropout, with an offset that makes the Philox counters wrap past 2**64 at element
  2**31, against tests/reference_dropout.py bit for bit;
* dropout_mask of the same length (bytes around 2**28 and the last one), and
  dropout_apply with that mask.

Skipped when /proc/meminfo's MemAvailable is below what it needs.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

import pybn
import reference_dropout as rd

FIGURES: list[str] = []   # printed at the end of the run (conftest.py)
C = 5
N = (2**31 + 2**20) // C + 1
TOTAL = N * C
assert TOTAL == 2**31 + 2**20 + 1   # a vector body and a tail past element 2**31
PERIOD = 2**20 + 1
MASK_BYTES = (TOTAL + 7) // 8
NEEDED = TOTAL * 4 + MASK_BYTES + 2**30   # x, the mask, and 1 GiB for everything else
U64 = 2**64


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def windows():
    """(start, stop) of the flat ranges checked: starts are multiples of 128 (a mask group)."""
    w = 4096
    end = TOTAL - TOTAL % 128
    return [(0, w), (2**29 - w, 2**29 + w), (2**30 - w, 2**30 + w), (2**31 - w, 2**31 + w), (end - w, TOTAL)]


def pattern_values(block, start, stop):
    return block[np.arange(start, stop) % PERIOD]


def pattern_moments(block):
    """Count, mean and biased variance per channel of the whole patterned x, in float64:
    element i = j + k * PERIOD holds block[j] and has channel (j + k * PERIOD) % C, which
    only depends on k % C, so each block value enters each channel a countable number of times."""
    j = np.arange(PERIOD)
    repeats = (TOTAL - j + PERIOD - 1) // PERIOD       # k = 0 .. repeats-1 for this j
    v = block.astype(np.float64)
    n, s1, s2 = np.zeros(C), np.zeros(C), np.zeros(C)
    for r in range(C):
        times = np.maximum(0, (repeats - r + C - 1) // C)   # how many k < repeats with k % C == r
        ch = (j + r * PERIOD) % C
        n += np.bincount(ch, weights=times, minlength=C)
        s1 += np.bincount(ch, weights=times * v, minlength=C)
        s2 += np.bincount(ch, weights=times * v * v, minlength=C)
    mean = s1 / n
    return n, mean, s2 / n - mean * mean


def keep_bits(start, stop, p, seed, offset):
    """The reference keep mask of elements start..stop-1 (start a multiple of 128)."""
    assert start % 128 == 0
    return rd.mask_bits(stop - start, p, seed, (offset + 16 * (start // 128)) % U64)


@pytest.mark.huge
@pytest.mark.skipif(mem_available() < NEEDED,
                    reason=f"needs {NEEDED / 2**30:.1f} GiB of available memory "
                           f"(MemAvailable: {mem_available() / 2**30:.1f} GiB)")
def test_more_than_2_31_elements():
    timings = {}
    rng = np.random.default_rng(31)
    block = rng.standard_normal(PERIOD).astype(np.float32)
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    eps = 1e-5

    t0 = time.perf_counter()
    x = np.empty((N, C), np.float32)
    flat = x.reshape(-1)
    for start in range(0, TOTAL, PERIOD):
        stop = min(start + PERIOD, TOTAL)
        flat[start:stop] = block[:stop - start]
    timings["fill"] = time.perf_counter() - t0
    checks = sorted(rng.choice(TOTAL // 128, 64, replace=False) * 128)   # random groups of 128
    places = windows() + [(int(s), int(s) + 128) for s in checks]

    # ---- batch_norm_train, in place, with running statistics
    n, mean, var = pattern_moments(block)
    assert np.all(n == N)
    run_mean, run_var = rm.copy(), rv.copy()
    t0 = time.perf_counter()
    y, got_mean, got_invstd = pybn.batch_norm_train(x, w, b, running_mean=run_mean, running_var=run_var,
                                                    momentum=0.1, eps=eps, out=x)
    timings["batch_norm_train"] = time.perf_counter() - t0
    assert y is x
    np.testing.assert_allclose(got_mean, mean, rtol=0, atol=1e-6, err_msg="batch_norm_train mean")
    np.testing.assert_allclose(got_invstd, 1 / np.sqrt(var + eps), rtol=2e-6, err_msg="batch_norm_train invstd")
    np.testing.assert_allclose(run_mean, 0.9 * rm + 0.1 * mean, rtol=2e-6, atol=1e-7, err_msg="running_mean")
    np.testing.assert_allclose(run_var, 0.9 * rv + 0.1 * var * N / (N - 1), rtol=2e-6, err_msg="running_var")
    for start, stop in places:
        ch = np.arange(start, stop) % C
        scale = (1 / np.sqrt(var + eps) * w)[ch]
        want = (pattern_values(block, start, stop) - got_mean[ch].astype(np.float64)) * scale + b[ch]
        np.testing.assert_allclose(flat[start:stop], want, rtol=2e-6, atol=2e-6,
                                   err_msg=f"batch_norm_train y, elements {start}..{stop}")

    # ---- batch_norm_infer, in place, on the training output
    before = {(s, e): flat[s:e].astype(np.float64) for s, e in places}
    t0 = time.perf_counter()
    y = pybn.batch_norm_infer(x, rm, rv, w, b, eps=eps, out=x)
    timings["batch_norm_infer"] = time.perf_counter() - t0
    assert y is x
    invstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
    for (start, stop), values in before.items():
        ch = np.arange(start, stop) % C
        want = (values - rm[ch].astype(np.float64)) * invstd[ch] * w[ch] + b[ch]
        np.testing.assert_allclose(flat[start:stop], want, rtol=2e-6, atol=2e-6,
                                   err_msg=f"batch_norm_infer, elements {start}..{stop}")

    # ---- dropout, in place; the counters wrap past 2**64 at element 2**31
    p, seed = 0.3, 2**64 - 12345
    offset = U64 - 16 * (2**31 // 128)
    before = {(s, e): flat[s:e].copy() for s, e in places}
    t0 = time.perf_counter()
    z = pybn.dropout(x, p, seed=seed, offset=offset, out=x)
    timings["dropout"] = time.perf_counter() - t0
    assert z is x
    scale = rd.scale_for(p, np.float32)
    for (start, stop), values in before.items():
        keep = keep_bits(start, stop, p, seed, offset)
        want = np.where(keep, values * scale, np.float32(0))
        np.testing.assert_array_equal(flat[start:stop].view(np.uint32), want.view(np.uint32),
                                      err_msg=f"dropout, elements {start}..{stop}")

    # ---- dropout_mask of the same length, then dropout_apply with it, in place
    t0 = time.perf_counter()
    mask = pybn.dropout_mask(TOTAL, p, seed=seed, offset=offset)
    timings["dropout_mask"] = time.perf_counter() - t0
    assert mask.shape == (MASK_BYTES,)
    before = {(s, e): flat[s:e].copy() for s, e in places}
    t0 = time.perf_counter()
    pybn.dropout_apply(x, mask, p, out=x)
    timings["dropout_apply"] = time.perf_counter() - t0
    for (start, stop), values in before.items():
        keep = keep_bits(start, stop, p, seed, offset)
        got_bits = np.unpackbits(mask[start // 8:(stop + 7) // 8], bitorder="little")[:stop - start].astype(bool)
        np.testing.assert_array_equal(got_bits, keep, err_msg=f"dropout_mask, elements {start}..{stop}")
        want = np.where(keep, values * scale, np.float32(0))
        np.testing.assert_array_equal(flat[start:stop].view(np.uint32), want.view(np.uint32),
                                      err_msg=f"dropout_apply, elements {start}..{stop}")
    assert np.all(mask[-1] >> (TOTAL % 8) == 0), "the trailing bits of the last byte are zero"

    FIGURES.append(f"huge: float32 {x.shape} = 2**31 + 2**20 + 1 elements ({x.nbytes / 1e9:.2f} GB, "
                   f"needs {NEEDED / 2**30:.1f} GiB available), pybn threads {pybn.get_num_threads()}, "
                   f"ISA {pybn.isa()}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
