"""Calls one pybn kernel under a shrinking address-space limit (run as a child process by
tests/test_memory_limits.py; it may die, the test process must not).

    python memory_limit_child.py THREADS CASE [CASE ...]

For each CASE (see CASES): builds its inputs, calls the kernel once without a limit for
the expected results, then, for each margin, limits the address space (RLIMIT_AS) to what
is mapped now plus the margin and calls it again. Every call must either raise MemoryError
or return results bitwise equal to the first. Prints "CASE MARGIN OUTCOME" per call (ok,
MemoryError or WRONG-RESULT; another exception ends the script with a traceback) and
"done" at the end; a signal is the failure the test looks for.
"""
from __future__ import annotations

import os
import resource
import sys

import numpy as np

import pybn

PAGE = os.sysconf("SC_PAGE_SIZE")
KIB = 1024


def mapped_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * PAGE


def arrays(shape, axis, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis % len(shape)]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, dy, w, b


def bn_cases():
    """{name: (setup)}: setup() returns a function that calls the kernel and returns its
    results as a list of arrays (outputs preallocated where the API allows, so that the
    limit bites inside the kernel)."""
    layouts = {
        "nchw": ((8, 16, 40, 40), 1),            # row mode
        "nchw-blocked": ((1, 49152, 16, 16), 1),  # channel blocks (> 4 MiB): 256 channels on a 1 MB L2
        "nhwc": ((64, 16, 16, 96), -1),          # period mode, C < W * 4 x reps
        "wide": ((24, 120_000), -1),             # period mode, chunks of a long period
        "wide-rows": ((2, 100_000, 9), 1),       # row mode, groups inside a period
    }
    cases = {}
    for lname, (shape, axis) in layouts.items():
        def train(shape=shape, axis=axis):
            x, _, w, b = arrays(shape, axis)
            c = x.shape[axis % x.ndim]
            rm, rv, out = np.zeros(c, x.dtype), np.ones(c, x.dtype), np.empty_like(x)

            def call():
                rm[:], rv[:] = 0, 1
                r = pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, axis=axis, relu=True, out=out)
                return [r.y, r.mean, r.invstd, rm, rv]
            return call

        def backward(shape=shape, axis=axis):
            x, dy, w, b = arrays(shape, axis)
            y, mean, invstd = pybn.batch_norm_train(x, w, b, axis=axis, relu=True)
            out = np.empty_like(x)
            return lambda: list(pybn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, y=y, out=out))

        def stats(shape=shape, axis=axis):
            x, _, _, _ = arrays(shape, axis)

            def call():
                st = pybn.batch_norm_stats(x, axis=axis)
                merged = pybn.batch_norm_merge_stats([st.count] * 2, np.stack([st.mean] * 2), np.stack([st.m2] * 2))
                return [*st[1:], *merged[1:], pybn.batch_norm_invstd(merged)]
            return call

        def reduce(shape=shape, axis=axis):
            x, dy, w, b = arrays(shape, axis)
            _, mean, invstd = pybn.batch_norm_train(x, w, b, axis=axis)
            return lambda: list(pybn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis))

        def infer(shape=shape, axis=axis):
            x, _, w, b = arrays(shape, axis)
            c = x.shape[axis % x.ndim]
            rm, rv, out = np.zeros(c, x.dtype), np.ones(c, x.dtype), np.empty_like(x)
            return lambda: [pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out)]

        def forward_apply(shape=shape, axis=axis):
            x, _, w, b = arrays(shape, axis)
            _, mean, invstd = pybn.batch_norm_train(x, w, b, axis=axis)
            out = np.empty_like(x)
            return lambda: [pybn.batch_norm_apply(x, mean, invstd, w, b, axis=axis, relu=True, out=out)]

        def apply(shape=shape, axis=axis):
            x, dy, w, b = arrays(shape, axis)
            _, mean, invstd = pybn.batch_norm_train(x, w, b, axis=axis)
            sums = pybn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
            n = x.size // x.shape[axis % x.ndim]
            out = np.empty_like(x)
            return lambda: [pybn.batch_norm_backward_apply(dy, x, mean, invstd, *sums, n, w, axis=axis, out=out)]

        kernels = (("train", train), ("backward", backward), ("stats", stats),
                   ("backward_reduce", reduce), ("infer", infer), ("backward_apply", apply),
                   ("apply", forward_apply))
        for kname, setup in kernels[:2] if lname == "nchw-blocked" else kernels:  # the blocked passes
            cases[f"{kname}-{lname}"] = setup
    return cases


def other_cases():
    def dropout():  # and the kernels on dropout's streams: ReLU-dropout, alpha dropout, the normal variates
        x, dy, _, _ = arrays((64, 32, 32, 16), 1)
        out, relu_out, dx, alpha, alpha_dx, gauss, noise = (np.empty_like(x) for _ in range(7))
        return lambda: [pybn.dropout(x, 0.3, seed=1, out=out),
                        pybn.dropout(x, 0.3, seed=1, relu=True, out=relu_out),
                        pybn.relu_dropout_backward(dy, relu_out, 0.3, out=dx),
                        pybn.alpha_dropout(x, 0.3, seed=1, out=alpha),
                        pybn.alpha_dropout_backward(dy, 0.3, seed=1, out=alpha_dx),
                        pybn.gaussian_dropout(x, 0.3, seed=1, out=gauss),
                        pybn.gaussian_noise(x, 0.5, seed=1, out=noise)]

    def dropout_noise_shape():
        x, _, _, _ = arrays((64, 32, 32, 16), 1)
        out, path = np.empty_like(x), np.empty_like(x)
        return lambda: [pybn.dropout(x, 0.3, seed=1, noise_shape=(64, 32, 1, 1), out=out),
                        pybn.drop_path(x, 0.3, seed=1, out=path)]

    def dropout_mask_apply():
        x, _, _, _ = arrays((64, 32, 32, 16), 1)
        mask = pybn.dropout_mask(x.shape, 0.3, seed=2)
        out, relu_out = np.empty_like(x), np.empty_like(x)
        return lambda: [pybn.dropout_mask(x.shape, 0.3, seed=2), pybn.dropout_apply(x, mask, 0.3, out=out),
                        pybn.dropout_apply(x, mask, 0.3, relu=True, out=relu_out)]

    def drop_block():
        x, _, _, _ = arrays((64, 32, 32, 16), 1)
        out = np.empty_like(x)
        return lambda: [pybn.drop_block(x, 0.3, block_size=5, seed=1, out=out),
                        pybn.drop_block(x, 0.3, block_size=4, seed=2, couple_channels=False, out=out),
                        pybn.drop_block_mask(x.shape, 0.3, block_size=5, seed=1)]

    def fold():
        rng = np.random.default_rng(1)
        conv = rng.standard_normal((256, 128, 3, 3)).astype(np.float32)
        lin = rng.standard_normal((512, 2048)).astype(np.float32)
        c = 256
        rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
        w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        rm2, rv2 = rng.standard_normal(2048).astype(np.float32), rng.uniform(0.5, 2, 2048).astype(np.float32)
        return lambda: [*pybn.fold_conv_bn(conv, b, rm, rv, w, b),
                        *pybn.fold_bn_linear(lin, np.zeros(512, np.float32), rm2, rv2, None, None)]

    return {"dropout": dropout, "dropout-noise-shape": dropout_noise_shape,
            "dropout-mask-apply": dropout_mask_apply, "drop-block": drop_block, "fold": fold}


CASES = {**bn_cases(), **other_cases()}
# Margins above what is mapped: from nothing to past every kernel's scratch (64 MiB), each
# 20% above the last, so that some margin falls between any two allocations of a call
# that differ by more than 20% in the address space they need.
MARGINS = [0] + [int(4 * KIB * 1.2 ** i) for i in range(54)]


def run(name):
    call = CASES[name]()
    expected = [np.array(a, copy=True) for a in call()]
    for _ in range(3):  # the threads and their arenas exist before any limit
        call()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    for margin in MARGINS:
        print(name, margin, end=" ", flush=True)  # the case and margin a crash happened at
        limit = mapped_bytes() + margin
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            got = call()
            outcome = "ok"
        except MemoryError:
            outcome = "MemoryError"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if outcome == "ok":
            same = len(got) == len(expected) and all(
                np.asarray(g).tobytes() == e.tobytes() for g, e in zip(got, expected))
            outcome = "ok" if same else "WRONG-RESULT"
        print(outcome, flush=True)


def main():
    pybn.set_num_threads(int(sys.argv[1]))
    for name in sys.argv[2:]:
        run(name)
    print("done", flush=True)
if __name__ == "__main__":
    main()
