"""Kernel scratch (per-channel coefficients, partial sums) is kept by the calling thread for
its next call (csrc/include/pybn/scratch.h): fresh from glibc's malloc, a few MB of it took
a page fault per 4 KiB on every call (320 faults on a (2, 16384) training forward, 12 times
its arithmetic)."""
import os
import resource
import sys
import threading

import numpy as np
import pytest

import pybn
from pybn import _C


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux") or "asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="glibc's malloc and Linux's fault counts (AddressSanitizer's allocator faults its own)")
def test_repeated_calls_take_no_fresh_pages(threads):
    x = np.random.default_rng(0).normal(size=(2, 16384)).astype(np.float32)
    dy, y = np.ones_like(x), np.empty_like(x)
    dx = np.empty_like(x)

    def step():
        r = pybn.batch_norm_train(x, out=y)
        pybn.batch_norm_backward(dy, x, r.mean, r.invstd, out=dx)

    for _ in range(3):
        step()
    before = minor_faults()
    for _ in range(20):
        step()
    assert minor_faults() - before < 40  # (was 480 a step)


KEEPS = _C.diagnostics.scratch_limits() != (0, 0)  # (nothing is kept under AddressSanitizer)


@pytest.mark.skipif(not KEEPS, reason="a sanitizer build keeps no scratch")
def test_kept_scratch_stays_within_its_limits():
    blocks, limit = _C.diagnostics.scratch_limits()
    for c in (3, 1000, 100_000, 2_000_000):  # the last one's scratch is past the limit: freed
        x = np.ones((2, c), np.float32)
        r = pybn.batch_norm_train(x)
        pybn.batch_norm_backward(x, x, r.mean, r.invstd)
        kept, kept_bytes = _C.diagnostics.scratch_kept()
        assert 1 <= kept <= blocks and kept_bytes <= limit
    x = np.ones((2, 100_000), np.float32)
    pybn.batch_norm_train(x)
    steady = _C.diagnostics.scratch_kept()
    for _ in range(3):
        pybn.batch_norm_train(x)
        assert _C.diagnostics.scratch_kept() == steady  # the same blocks, taken and given back


@pytest.mark.skipif(not KEEPS, reason="a sanitizer build keeps no scratch")
def test_each_thread_keeps_its_own():
    kept = []

    def run():
        pybn.batch_norm_train(np.ones((2, 5000), np.float32))
        kept.append(_C.diagnostics.scratch_kept())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert kept[0][0] >= 1 and kept[0][1] >= 5000 * 8
