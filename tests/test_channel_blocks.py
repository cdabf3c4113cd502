"""The pipelined channel blocks (csrc/kernels/channel_loops.h, pipelined_channel_blocks):
NCHW arrays of more than 4 MiB per pass are trained in blocks of channels, each thread
reading the next block's statistics between the writes of the current one. A block writes
only its own channels, so outputs written over the inputs (out=x, out=dy) must leave the
next block's reads untouched, and 16-bit storage takes the same schedule. Block sizes come
from the CPU's caches; the comments give them for a 1 MB L2 and a 32 MB L3 (2 threads:
blocks of 2 channels, the last of 37 a single one)."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import pybn
from test_half_dtypes import HALF, IDS as HALF_IDS, assert_near
from reference import assert_bits_equal

EPS = 1e-5
FORWARD = (16, 37, 112, 112)   # 29.7 MB of float32: the training forward is blocked
BACKWARD = (8, 37, 96, 96)     # x, dy and y: 32.7 MB a pass of the backward with a ReLU mask
HALF_FORWARD = (32, 37, 112, 112)  # 29.7 MB of 16-bit storage


def params(rng, c):
    return rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def test_training_forward_in_place(isa, threads, rng):
    """out=x with a residual and a ReLU: the bits of the out-of-place call."""
    x = rng.standard_normal(FORWARD, np.float32)
    r = rng.standard_normal(FORWARD, np.float32)
    w, b = params(rng, FORWARD[1])
    want = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    got = pybn.batch_norm_train(x, w, b, relu=True, residual=r, out=x)
    assert got.y is x
    for g, e in zip(got, want):
        assert_bits_equal(g, e)


@pytest.mark.parametrize("shape", [FORWARD, (4, 37, 56, 112)], ids=["blocked", "x-3.5MiB"])
def test_residual_keeps_the_statistics(shape, threads, rng):
    """Blocks sized for x and the residual it passes (channel_block's passing bytes) sum each
    channel in the same order as blocks sized for x alone, and whether x is blocked at all
    does not depend on the residual (3.5 MiB of x: not blocked, 7 MiB with r; blocked, its
    statistics would have other bits): the statistics
    have the plain call's bits, y is the plain y plus r through the ReLU."""
    x = rng.standard_normal(shape, np.float32) + np.float32(20)
    r = rng.standard_normal(shape, np.float32)
    w, b = params(rng, shape[1])
    plain = pybn.batch_norm_train(x, w, b)
    fused = pybn.batch_norm_train(x, w, b, relu=True, residual=r)
    assert_bits_equal(fused.mean, plain.mean)
    assert_bits_equal(fused.invstd, plain.invstd)
    np.testing.assert_allclose(fused.y, np.maximum(plain.y + r, 0), rtol=1e-5, atol=1e-5)


def test_backward_in_place(isa, threads, rng):
    """dx written over dy, and d_residual over dy too, the ReLU mask from y: the bits of the
    out-of-place call, on a blocked backward whose last block is shorter than the others."""
    x = rng.standard_normal(BACKWARD, np.float32)
    dy = rng.standard_normal(BACKWARD, np.float32)
    w, b = params(rng, BACKWARD[1])
    fwd = pybn.batch_norm_train(x, w, b, relu=True)
    want = pybn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True)
    d = dy.copy()
    got = pybn.batch_norm_backward(d, x, fwd.mean, fwd.invstd, w, y=fwd.y, out=d)
    assert got.dx is d
    for g, e in zip(got, want[:3]):
        assert_bits_equal(g, e)
    d = dy.copy()
    got = pybn.batch_norm_backward(d, x, fwd.mean, fwd.invstd, w, y=fwd.y, residual=True, d_residual_out=d)
    assert got.d_residual is d
    for g, e in zip(got, want):
        assert_bits_equal(g, e)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_16bit_training_forward(isa, threads, dtype, rng):
    """16-bit x on the blocked schedule: float32 statistics as accurate as the float32 path,
    y within 1 ulp of the float64 result rounded once."""
    x = (rng.standard_normal(HALF_FORWARD) * 2 + 3).astype(dtype)
    w, b = params(rng, HALF_FORWARD[1])
    res = pybn.batch_norm_train(x, w, b)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + EPS)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.invstd, invstd, rtol=1e-6)
    shape = (1, -1, 1, 1)
    mean32, invstd32 = res.mean.astype(np.float64).reshape(shape), res.invstd.astype(np.float64).reshape(shape)
    want = (x64 - mean32) * (invstd32 * w.reshape(shape)) + b.reshape(shape)
    scale = float(np.abs((x64 - mean32) * invstd32 * w.reshape(shape)).max() + np.abs(b).max())
    assert_near(res.y, want, scale, "y")


# The blocks other CPUs' caches give (channel_block), with PYBN_L2_BYTES standing in for the
# CPU. Each channel of the ALONE shapes has 1.77 MB of inputs per pass. With a 2 MiB L2 (an
# Intel server core) a channel fits its L2 once but not twice, so it is a block of its own,
# reduced and then written with nothing pipelined; with a 1 MiB L2 the blocks are sized to
# the L3 and pipelined. MEDIUM (6.4 MB) takes 16- and 8-channel blocks filling 40% of a 2
# MiB L2 (forward, backward), 16-channel L3 blocks with a 1 MiB L2. The bits must be those
# of this process, whatever its CPU.
ALONE_BACKWARD = (24, 16, 96, 96)  # x and dy: 1.77 MB a channel, 28 MB a pass
ALONE_FORWARD = (48, 16, 96, 96)   # x alone: 1.77 MB a channel
MEDIUM = (32, 256, 14, 14)         # the bench's M: 25 KB a channel of x
ALONE_CHILD = """
import sys
import pybn
from test_channel_blocks import alone_case_digests
assert pybn._C.cache_sizes()[0] == int(sys.argv[1])
print(alone_case_digests())
"""


def alone_case_digests():
    """sha256 of every output of a training forward and a backward on the shapes above, at 1
    and 2 threads; the inputs drawn from a fixed seed."""
    rng = np.random.default_rng(2026)
    cases = []
    for forward, backward in ((ALONE_FORWARD, ALONE_BACKWARD), (MEDIUM, MEDIUM)):
        xf = (rng.standard_normal(forward) * 3 + 20).astype(np.float32)
        x = (rng.standard_normal(backward) * 3 + 20).astype(np.float32)
        dy = rng.standard_normal(backward).astype(np.float32)
        cases.append((xf, x, dy, *params(rng, forward[1])))

    def outputs():
        for xf, x, dy, w, b in cases:
            fwd = pybn.batch_norm_train(xf, w, b)
            stats = pybn.batch_norm_train(x, w, b)
            yield from (*fwd[:3], *pybn.batch_norm_backward(dy, x, stats.mean, stats.invstd, w))
    return thread_digests(outputs)


def thread_digests(outputs):
    """sha256 of the arrays outputs() yields, at 1 and at 2 threads."""
    digests = []
    prev = pybn.get_num_threads()
    try:
        for t in (1, 2):
            pybn.set_num_threads(t)
            h = hashlib.sha256()
            for a in outputs():
                h.update(np.ascontiguousarray(a).tobytes())
            digests.append(h.hexdigest())
    finally:
        pybn.set_num_threads(prev)
    return digests


def _moments64(x, axes=(0, 2, 3)):
    """x in float64, and its per-channel mean and invstd over `axes` (NCHW by default)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes)
    return x64, mean, 1 / np.sqrt(x64.var(axis=axes) + EPS)


def test_alone_blocks_match_reference(isa):
    """The outputs of this process's blocks against float64 (the children below compare
    their bits with these): the training forward on ALONE_FORWARD, the backward on
    ALONE_BACKWARD."""
    rng = np.random.default_rng(7)
    w, b = params(rng, 16)
    axes, shape = (0, 2, 3), (1, -1, 1, 1)
    xf = (rng.standard_normal(ALONE_FORWARD) * 3 + 20).astype(np.float32)
    res = pybn.batch_norm_train(xf, w, b)
    x64, mean, invstd = _moments64(xf)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(res.invstd, invstd, rtol=1e-6)
    xhat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    np.testing.assert_allclose(res.y, xhat * w.reshape(shape) + b.reshape(shape), rtol=1e-5, atol=1e-5)
    del xf, x64, xhat
    x = (rng.standard_normal(ALONE_BACKWARD) * 3 + 20).astype(np.float32)
    dy = rng.standard_normal(ALONE_BACKWARD).astype(np.float32)
    res = pybn.batch_norm_train(x, w, b)
    grads = pybn.batch_norm_backward(dy, x, res.mean, res.invstd, w)
    x64, mean, invstd = _moments64(x)
    dy64 = dy.astype(np.float64)
    xhat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    dbias, dweight = dy64.sum(axis=axes), (dy64 * xhat).sum(axis=axes)
    n = x.size // 16
    dx = (w * invstd).reshape(shape) * (dy64 - (dbias.reshape(shape) + xhat * dweight.reshape(shape)) / n)
    np.testing.assert_allclose(grads.dbias, dbias, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(grads.dweight, dweight, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(grads.dx, dx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("l2", ["2M", "1M"])
def test_blocks_of_other_caches_give_the_same_bits(isa, l2, tmp_path):
    want = alone_case_digests()
    assert want[0] == want[1]  # 1 and 2 threads
    l2_bytes = {"2M": 2 << 20, "1M": 1 << 20}[l2]
    assert run_child(tmp_path, isa, ALONE_CHILD, str(l2_bytes), PYBN_L2_BYTES=l2) == str(want)


def run_child(cwd, isa, code, *args, **cache_sizes):
    """The output of `code` run by a child process on path `isa`, with PYBN_L2_BYTES /
    PYBN_L3_BYTES as given (else unset) and this directory on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYBN_ISA", "PYBN_L2_BYTES", "PYBN_L3_BYTES")}
    tests = os.path.dirname(os.path.abspath(__file__))
    env.update(cache_sizes, PYBN_ISA=isa, PYTHONPATH=os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# (text after the unit and a size that wrapped past 2**63 to exactly 1G were taken before)
@pytest.mark.parametrize(("name", "value"), [("PYBN_L2_BYTES", v) for v in ("abc", "1G", "12Q", "-1", "1M junk", "1MB")]
                         + [("PYBN_L3_BYTES", "17179869185G"), ("PYBN_L3_BYTES", "99999999999999999999")])
def test_bad_cache_size_fails_the_import(name, value, tmp_path):
    env = dict(os.environ, **{name: value})
    proc = subprocess.run([sys.executable, "-c", "import pybn"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    limits = "64K to 64M" if name == "PYBN_L2_BYTES" else "1024K to 1024M"
    assert f"{name}={value}: must be a size from {limits}" in proc.stderr


@pytest.mark.parametrize("value", ["1M", "1m ", "1024K\t", "1048576 "])
def test_a_cache_size_may_end_in_blanks(value, tmp_path):
    env = dict(os.environ, PYBN_L2_BYTES=value)
    proc = subprocess.run([sys.executable, "-c", "import pybn; print(pybn._C.cache_sizes()[0])"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(1 << 20), proc.stderr


# The channels-last statistics pass requests its lines ahead where x is at least twice the
# L3 (moments_period_group's kReadAhead); PYBN_L3_BYTES=1M puts this 3.2 MB array there in
# a child process. The requests change no value: the bits must be this process's.
READ_AHEAD = (8, 28, 28, 128)
READ_AHEAD_CHILD = """
import pybn
from test_channel_blocks import read_ahead_digests
assert pybn._C.cache_sizes()[1] == 1 << 20
print(read_ahead_digests())
"""


def read_ahead_inputs():
    """x, weight and bias of the READ_AHEAD case, from a fixed seed."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(READ_AHEAD) * 3 + 20).astype(np.float32)
    w, b = params(rng, READ_AHEAD[-1])
    return x, w, b


def read_ahead_digests():
    """sha256 of a channels-last training forward's outputs and its statistics, at 1 and 2
    threads."""
    x, w, b = read_ahead_inputs()
    return thread_digests(lambda: (*pybn.batch_norm_train(x, w, b, axis=-1), *pybn.batch_norm_stats(x, axis=-1)[1:]))


def test_read_ahead_gives_the_same_bits(isa, tmp_path):
    assert np.prod(READ_AHEAD) * 4 < 2 * pybn._C.cache_sizes()[1]  # not read ahead here
    x, w, b = read_ahead_inputs()
    res = pybn.batch_norm_train(x, w, b, axis=-1)
    x64, mean, invstd = _moments64(x, axes=(0, 1, 2))
    np.testing.assert_allclose(res.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(res.invstd, invstd, rtol=1e-6)
    np.testing.assert_allclose(res.y, (x64 - mean) * invstd * w + b, rtol=1e-5, atol=1e-5)
    want = read_ahead_digests()
    assert want[0] == want[1]
    assert run_child(tmp_path, isa, READ_AHEAD_CHILD, PYBN_L3_BYTES="1M") == str(want)
