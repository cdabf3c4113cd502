"""Memory: repeated calls leave no growth.

* tracemalloc (Python objects and NumPy's array buffers, which NumPy reports to it):
  10**4 calls of each kernel, after a warm-up, keep at most a few KiB (caches that fill
  once), and 5000 more calls keep nothing (< 2 KiB: under half a byte per call).
* RSS (/proc/self/statm, native allocations of the compiled module included): 10**4
  rounds of every kernel on small arrays, and 300 on arrays large enough for several
  pool threads and the kernels' scratch buffers, grow the resident set by < 5 MiB.
* Peak memory (VmHWM in a child): one call on a 32 MiB array, NCHW, channels-last and
  wide layouts (few values per channel, up to 2**19 channels), grows the high-water mark
  by its output plus O(C) scratch (64 bytes per channel), 1/16 of the array and 16 MiB.
* valgrind (opt-in, ``-m slow``): tests/leak_script.py, which calls every kernel, run under
  ``valgrind --leak-check=full``; no block "definitely lost" (nor "possibly lost") has a
  frame in pybn's compiled module, and memcheck reports no error in one either.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import pybn
import pybn.nn

FIGURES: list[str] = []   # printed at the end of the run (conftest.py)
CALLS = 10**4
WARMUP = 200
FIRST_BOUND = 32 * 1024    # bytes kept after 10**4 calls (caches that fill once: a few KiB)
SECOND_BOUND = 2 * 1024    # bytes kept after 5000 more: under half a byte per call
RSS_BOUND = 5 * 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def kernels(shape=(4, 3, 5), dtype=np.float32):
    """{name: a function calling one kernel} on arrays made once."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    out = np.empty_like(x)
    y, mean, invstd = pybn.batch_norm_train(x, w, b, relu=True)
    stats = pybn.batch_norm_stats(x)
    s64 = pybn.batch_norm_invstd(stats)
    sums = pybn.batch_norm_backward_reduce(dy, x, mean, invstd)
    mask = pybn.dropout_mask(x.shape, 0.5, seed=1)
    conv_w, lin_w = rng.standard_normal((c, 4, 3, 3)).astype(dtype), rng.standard_normal((5, c)).astype(dtype)
    bn, drop = pybn.nn.BatchNorm(c, dtype=dtype), pybn.nn.Dropout(0.5, seed=2)
    stacked = (np.stack([stats.mean] * 2), np.stack([stats.m2] * 2))
    noise_shape = shape[:2] + (1,) * (len(shape) - 2)
    x4 = rng.standard_normal((2, c, 6, 7)).astype(dtype)
    out4 = np.empty_like(x4)

    def rejected():
        for bad in (lambda: pybn.batch_norm_train(x, running_mean=rm, running_var=rv[:-1]),
                    lambda: pybn.dropout(x, 1.5, seed=1),
                    lambda: pybn.batch_norm_infer(x.astype(np.int32), rm, rv)):
            with contextlib.suppress(TypeError, ValueError):
                bad()

    return {
        "batch_norm_train": lambda: pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, relu=True),
        "batch_norm_train(out=)": lambda: pybn.batch_norm_train(x, w, b, out=out),
        "batch_norm_infer": lambda: pybn.batch_norm_infer(x, rm, rv, w, b),
        "batch_norm_backward": lambda: pybn.batch_norm_backward(dy, x, mean, invstd, w, y=y),
        "batch_norm_backward(eval)": lambda: pybn.batch_norm_backward(dy, x, mean, invstd, w, training=False),
        "batch_norm_stats": lambda: pybn.batch_norm_stats(x),
        "batch_norm_merge_stats": lambda: pybn.batch_norm_merge_stats([stats.count] * 2, *stacked),
        "batch_norm_invstd": lambda: pybn.batch_norm_invstd(stats),
        "batch_norm_apply": lambda: pybn.batch_norm_apply(x, mean, s64, w, b),
        "batch_norm_backward_reduce": lambda: pybn.batch_norm_backward_reduce(dy, x, mean, invstd),
        "batch_norm_backward_apply": lambda: pybn.batch_norm_backward_apply(dy, x, mean, invstd, *sums,
                                                                            stats.count, w),
        "dropout": lambda: pybn.dropout(x, 0.5, seed=3, offset=5),
        "dropout(noise_shape)": lambda: pybn.dropout(x, 0.5, seed=3, noise_shape=noise_shape),
        "dropout_mask": lambda: pybn.dropout_mask(x.shape, 0.5, seed=3),
        "dropout_apply": lambda: pybn.dropout_apply(x, mask, 0.5, out=out),
        "dropout(relu)": lambda: pybn.dropout(x, 0.5, seed=3, offset=5, relu=True, out=out),
        "dropout_apply(relu)": lambda: pybn.dropout_apply(x, mask, 0.5, relu=True, out=out),
        "relu_dropout_backward": lambda: pybn.relu_dropout_backward(dy, y, 0.5, out=out),
        "drop_path": lambda: pybn.drop_path(x, 0.5, seed=3, offset=5),
        "drop_block": lambda: pybn.drop_block(x4, 0.5, block_size=3, seed=3, out=out4),
        "drop_block(per-channel)": lambda: pybn.drop_block(x4, 0.5, block_size=2, seed=3, couple_channels=False),
        "drop_block_mask": lambda: pybn.drop_block_mask(x4.shape, 0.5, block_size=3, seed=3),
        "alpha_dropout": lambda: pybn.alpha_dropout(x, 0.5, seed=3, out=out),
        "alpha_dropout_backward": lambda: pybn.alpha_dropout_backward(dy, 0.5, seed=3, out=out),
        "gaussian_dropout": lambda: pybn.gaussian_dropout(x, 0.3, seed=3, out=out),
        "gaussian_noise": lambda: pybn.gaussian_noise(x, 0.5, seed=3),
        "batch_norm_train(residual)": lambda: pybn.batch_norm_train(x, w, b, relu=True, residual=dy, out=out),
        "batch_norm_backward(residual)": lambda: pybn.batch_norm_backward(dy, x, mean, invstd, w, y=y, residual=True),
        "fold_conv_bn": lambda: pybn.fold_conv_bn(conv_w, b, rm, rv, w, b),
        "fold_bn_linear": lambda: pybn.fold_bn_linear(lin_w, b[:1].repeat(5), rm, rv, w, b),
        "nn.BatchNorm": lambda: bn.backward(bn(x)),
        "nn.Dropout": lambda: drop.backward(drop(x)),
        "rejected calls": rejected,
    }


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def traced_growth(call, n):
    """Traced bytes still allocated after n more calls (and the snapshot taken before)."""
    snap = tracemalloc.take_snapshot()   # first: the snapshot's own memory is not growth
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        call()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, snap


def test_tracemalloc_no_growth_per_kernel():
    """10**4 calls of each kernel keep at most a few KiB, and the next 5000 calls none: a
    leak grows in both windows, a cache fills once (CPython's and NumPy's own, e.g. while
    formatting a dtype name in an error message, hold a few KiB after the first calls)."""
    first, second = {}, {}
    for name, call in kernels().items():
        for _ in range(WARMUP):
            call()
        tracemalloc.start()
        try:
            call()
            first[name], _ = traced_growth(call, CALLS)
            second[name], snap = traced_growth(call, CALLS // 2)
            if second[name] > SECOND_BOUND:  # a cache that filled late does not grow again; a leak does
                second[name], snap = traced_growth(call, CALLS // 2)
            if first[name] > FIRST_BOUND or second[name] > SECOND_BOUND:
                top = tracemalloc.take_snapshot().compare_to(snap, "lineno")[:5]
                pytest.fail(f"{name}: traced memory grew by {first[name]} bytes over {CALLS} calls, then by "
                            f"{second[name]} bytes over {CALLS // 2} more:\n" + "\n".join(map(str, top)))
        finally:
            tracemalloc.stop()
    w1, w2 = max(first, key=first.get), max(second, key=second.get)
    FIGURES.append(f"memory (tracemalloc): {len(first)} kernels x {CALLS} calls each after {WARMUP} warm-up calls: "
                   f"traced memory growth at most {first[w1]} bytes ({w1}; bound {FIRST_BOUND}), then over "
                   f"{CALLS // 2} more calls at most {second[w2]} bytes ({w2}; bound {SECOND_BOUND})")


@pytest.mark.parametrize("shape,rounds", [((4, 3, 5), CALLS), ((8, 16, 24, 24), 300), ((4096, 24), 300)],
                         ids=["small", "threads-nchw", "threads-channels-last"])
def test_rss_no_growth(shape, rounds):
    calls = list(kernels(shape).values())
    for _ in range(WARMUP // 2):
        for call in calls:
            call()
    gc.collect()
    before = rss()
    for _ in range(rounds):
        for call in calls:
            call()
    gc.collect()
    grown = rss() - before
    FIGURES.append(f"memory (RSS): {len(calls)} kernels x {rounds} calls on {shape}: RSS grew by "
                   f"{grown / 2**20:.2f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)")
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over {rounds} rounds of {len(calls)} kernels"


# ------------------------------------------------------------------ valgrind

PYTHON = Path(sys.executable).resolve()
LEAK_SCRIPT = Path(__file__).with_name("leak_script.py")


def _records(log, start):
    """valgrind's reports in `log`: each begins at a line for which start(body) gives a new
    record (a tuple whose last item is its list of frames) and runs to the next blank line."""
    records, current = [], None
    for line in log.splitlines():
        body = re.sub(r"^==\d+==\s?", "", line)
        record = start(body)
        if record is not None:
            current = record
            records.append(current)
        elif current is not None and body.strip():
            current[-1].append(body.strip())
        else:
            current = None
    return records


def loss_records(log, kinds=("definitely", "possibly")):
    """[(kind, bytes, frames)] of valgrind's leak records."""
    def start(body):
        m = re.match(r"([\d,]+) (?:\([\d,]+ direct, [\d,]+ indirect\) )?bytes in [\d,]+ blocks are "
                     r"(definitely|possibly) lost", body)
        return (m.group(2), int(m.group(1).replace(",", "")), []) if m and m.group(2) in kinds else None

    return _records(log, start)


def error_records(log):
    """memcheck's error reports (invalid read/write, uninitialised values...): [(title, frames)]."""
    def start(body):
        m = re.match(r"(Invalid (read|write|free)|Conditional jump|Use of uninitialised|Syscall param|"
                     r"Mismatched free|Source and destination overlap)", body)
        return (body, []) if m else None

    return _records(log, start)


def in_pybn(frames):
    return any("_C.cpython" in f or "pybn" in f for f in frames)


def at_import(frames):
    """Allocated while the extension module was imported (pybind11's type objects and
    interned names: made once, kept for the life of the process)."""
    return any(k in f for f in frames for k in ("PyInit__C", "_imp_exec_dynamic", "_imp_create_dynamic"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_valgrind_reports_no_leak_from_pybn(tmp_path):
    log_file = tmp_path / "valgrind.log"
    # AVX2: this valgrind cannot decode AVX-512; PYTHONMALLOC=malloc: every allocation is
    # a malloc valgrind can follow (pymalloc's arenas would hide them).
    env = dict(os.environ, PYBN_ISA="avx2", PYTHONMALLOC="malloc")
    cmd = ["valgrind", "--leak-check=full", "--show-leak-kinds=definite,possible", "--num-callers=40",
           f"--log-file={log_file}", str(PYTHON), str(LEAK_SCRIPT)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and "leak script done" in proc.stdout, proc.stdout + proc.stderr
    log = log_file.read_text()
    summary = {k: int(re.search(rf"{k} lost: ([\d,]+) bytes", log).group(1).replace(",", ""))
               for k in ("definitely", "possibly")}
    leaks = loss_records(log)
    ours = [r for r in leaks if in_pybn(r[2])]
    ours_definite = sum(n for kind, n, _ in ours if kind == "definitely")
    import_time = [r for r in ours if r[0] == "possibly" and at_import(r[2])]
    errors = [e for e in error_records(log) if in_pybn(e[1])]
    FIGURES.append(f"valgrind (PYBN_ISA=avx2, PYTHONMALLOC=malloc, tests/leak_script.py): definitely lost "
                   f"{ours_definite} bytes in frames of pybn's _C (whole process: {summary['definitely']} bytes, "
                   f"in CPython/NumPy); possibly lost with a pybn frame: "
                   f"{sum(r[1] for r in import_time)} bytes in {len(import_time)} records, all made once at import "
                   f"(pybind11 type objects); {len(errors)} memcheck errors with a pybn frame")
    bad = [r for r in ours if r not in import_time]
    assert not bad, "leak records with a pybn frame:\n" + "\n\n".join(
        f"{kind} {n} bytes\n" + "\n".join(frames) for kind, n, frames in bad)
    assert not errors, "memcheck errors with a pybn frame:\n" + "\n\n".join(
        title + "\n" + "\n".join(frames) for title, frames in errors)


# ------------------------------------------------------------------ peak memory
# The kernels' scratch is O(C): a call's peak resident memory grows by its output and
# little more, whatever the layout (a wide channels-last array of a few rows once needed
# 16 partial states per channel and row-sized buffers per thread: 5x the array).

# The child reads its high-water mark from /proc/self/status (VmHWM), not ru_maxrss:
# Linux carries ru_maxrss over exec from the forking process (here pytest, hundreds of MB
# into a run), which would hide any growth below it.
PEAK_CHILD = r"""
import re, sys
import numpy as np
import pybn


def high_water_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


kernel, shape, axis, threads = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pybn.set_num_threads(threads)
rng = np.random.default_rng(0)
x = rng.standard_normal(shape, dtype=np.float32)  # made in place: no float64 temporary
c = shape[axis]
w, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
if kernel == "backward":
    dy = rng.standard_normal(shape, dtype=np.float32)
    mean, invstd = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
calls = {
    "train": lambda: pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, axis=axis, relu=True).y,
    "infer": lambda: pybn.batch_norm_infer(x, rm, rv, w, b, axis=axis),
    "backward": lambda: pybn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, y=x).dx,
    "stats": lambda: pybn.batch_norm_stats(x, axis=axis).mean,
    "dropout": lambda: pybn.dropout(x, 0.3, seed=1),
}
before = high_water_kib()
out = calls[kernel]()
grown = (high_water_kib() - before) * 1024
print(grown, out.nbytes)
"""
PEAK_LAYOUTS = {"nchw": ((8, 64, 128, 128), 1), "nhwc": ((8, 128, 128, 64), -1),
                "wide": ((16, 1 << 19), -1), "wide-rows": ((1, 1 << 19, 16), 1)}
PEAK_PER_CHANNEL = 64          # bytes of scratch per channel allowed (the kernels use at most 56)
PEAK_FIXED = 16 * 2**20        # thread stacks, NumPy's and the allocator's own


@pytest.mark.parametrize("kernel", ["train", "infer", "backward", "stats", "dropout"])
@pytest.mark.parametrize("layout", list(PEAK_LAYOUTS))
def test_peak_memory_is_output_plus_o_c(layout, kernel, threads=2):
    shape, axis = PEAK_LAYOUTS[layout]
    channels = shape[axis]
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, kernel, repr(shape), str(axis), str(threads)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, out_bytes = map(int, proc.stdout.split())
    if out_bytes >= 2**20:  # the measurement sees the output itself
        assert grown >= out_bytes * 0.9, f"high-water mark grew by {grown} bytes, less than the output {out_bytes}"
    array_bytes = 4 * int(np.prod(shape))
    # the reductions may keep up to 1/16 of the array in partial states (channel_loops.h)
    bound = out_bytes + PEAK_PER_CHANNEL * channels + array_bytes // 16 + PEAK_FIXED
    FIGURES.append(f"peak memory: {kernel} {shape} axis {axis}, {threads} threads: grew by "
                   f"{grown / 2**20:.1f} MiB, output {out_bytes / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)")
    assert grown <= bound, (f"{kernel} on {shape} (axis {axis}): peak memory grew by {grown / 2**20:.1f} MiB for "
                            f"{out_bytes / 2**20:.1f} MiB of output (bound {bound / 2**20:.1f} MiB)")
