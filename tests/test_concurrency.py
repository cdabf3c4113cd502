"""Concurrency.

* 8 Python threads call every kernel at once, each on its own arrays, for a few
  seconds; every result equals, bit for bit, the same call made serially beforehand.
* In a child process (a deadlock would fail the test, not hang the run): threads calling
  every kernel while another thread keeps changing the thread count (results bitwise
  equal to the serial ones) or the kernel path (results within tolerance of them).
* The GIL is released inside the kernels: while one thread runs a long pybn call,
  another Python thread keeps running (it makes progress in most 10 ms slots of the
  call, where a call holding the GIL would stop it for the whole call; a builtin that
  holds the GIL is the negative control). The wall time of 2 threads running
  batch_norm_infer on large arrays at once, against one after the other, is measured and
  reported (this machine has 2 cores shared with other jobs, so it is not asserted).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import pybn
import pybn._runtime
import pybn.nn

FIGURES: list[str] = []   # printed at the end of the run (conftest.py)
N_THREADS = 8
RUN_SECONDS = 2.5


# ---------------------------------------------------------------- workloads

def make_inputs(k):
    """Thread k's arrays: a mix of sizes (one thread / several pool threads), layouts
    (NCHW, channels-last) and dtypes."""
    rng = np.random.default_rng(100 + k)
    dtype = np.float32 if k % 2 == 0 else np.float64
    shape, axis = [((4, 3, 5), 1), ((8, 16, 24, 24), 1), ((2048, 24), -1), ((2, 8, 9, 10), -1)][k % 4]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    c = shape[axis]
    return dict(x=x, dy=rng.standard_normal(shape).astype(dtype), axis=axis, c=c,
                w=rng.uniform(0.5, 2, c).astype(dtype), b=rng.standard_normal(c).astype(dtype),
                rm=rng.standard_normal(c).astype(dtype), rv=rng.uniform(0.5, 2, c).astype(dtype),
                conv_w=rng.standard_normal((c, 4, 3, 3)).astype(dtype),
                lin_w=rng.standard_normal((7, c)).astype(dtype),
                seed=int(rng.integers(0, 2**64, dtype=np.uint64)), offset=2**64 - 16 * (k + 1))


def run_all(a, out):
    """Every kernel once on thread k's arrays; `out` holds preallocated outputs (distinct
    per thread). Returns {name: array} of everything computed."""
    x, dy, axis = a["x"], a["dy"], a["axis"]
    r = {}
    rm, rv = a["rm"].copy(), a["rv"].copy()
    y, r["train.mean"], r["train.invstd"] = pybn.batch_norm_train(
        x, a["w"], a["b"], running_mean=rm, running_var=rv, axis=axis, relu=True, out=out["y"])
    r["train.y"], r["train.rm"], r["train.rv"] = y.copy(), rm, rv
    r["infer"] = pybn.batch_norm_infer(x, a["rm"], a["rv"], a["w"], a["b"], axis=axis)
    r["backward.dx"], r["backward.dw"], r["backward.db"] = pybn.batch_norm_backward(
        dy, x, r["train.mean"], r["train.invstd"], a["w"], axis=axis, y=y)
    r["backward.eval"] = pybn.batch_norm_backward(dy, x, a["rm"], a["rv"], a["w"], training=False, axis=axis).dx
    stats = pybn.batch_norm_stats(x, axis=axis)
    r["stats.mean"], r["stats.m2"] = stats.mean, stats.m2
    r["merge.mean"], r["merge.m2"] = pybn.batch_norm_merge_stats([stats.count] * 2, np.stack([stats.mean] * 2),
                                                              np.stack([stats.m2] * 2))[1:]
    r["invstd"] = pybn.batch_norm_invstd(stats)
    r["apply"] = pybn.batch_norm_apply(x, r["train.mean"], r["invstd"], a["w"], a["b"], axis=axis)
    sums = pybn.batch_norm_backward_reduce(dy, x, r["train.mean"], r["train.invstd"], axis=axis)
    r["reduce.sum_dy"], r["reduce.sum_dy_xhat"] = sums
    r["backward_apply"] = pybn.batch_norm_backward_apply(dy, x, r["train.mean"], r["train.invstd"], sums.sum_dy,
                                                         sums.sum_dy_xhat, stats.count, a["w"], axis=axis)
    r["dropout"] = pybn.dropout(x, 0.3, seed=a["seed"], offset=a["offset"], out=out["drop"]).copy()
    r["mask"] = pybn.dropout_mask(x.shape, 0.3, seed=a["seed"], offset=a["offset"])
    r["dropout_apply"] = pybn.dropout_apply(x, r["mask"], 0.3)
    r["dropout.relu"] = pybn.dropout(x, 0.3, seed=a["seed"], offset=a["offset"], relu=True)
    r["dropout_apply.relu"] = pybn.dropout_apply(x, r["mask"], 0.3, relu=True)
    r["relu_dropout_backward"] = pybn.relu_dropout_backward(dy, r["dropout.relu"], 0.3)
    r["dropout2d"] = pybn.dropout(x, 0.5, seed=a["seed"], noise_shape=x.shape[:2] + (1,) * (x.ndim - 2))
    r["drop_path"] = pybn.drop_path(x, 0.3, seed=a["seed"], offset=a["offset"])
    if x.ndim == 4:
        r["drop_block"] = pybn.drop_block(x, 0.3, block_size=3, seed=a["seed"], offset=a["offset"], axis=axis)
        r["drop_block.per-channel"] = pybn.drop_block(x, 0.3, block_size=4, seed=a["seed"], couple_channels=False)
        r["drop_block_mask"] = pybn.drop_block_mask(x.shape, 0.3, block_size=3, seed=a["seed"], offset=a["offset"])
    r["alpha_dropout"] = pybn.alpha_dropout(x, 0.3, seed=a["seed"], offset=a["offset"])
    r["alpha_dropout_backward"] = pybn.alpha_dropout_backward(dy, 0.3, seed=a["seed"], offset=a["offset"])
    r["gaussian_dropout"] = pybn.gaussian_dropout(x, 0.3, seed=a["seed"], offset=a["offset"])
    r["gaussian_noise"] = pybn.gaussian_noise(x, 0.5, seed=a["seed"], offset=a["offset"])
    res = pybn.batch_norm_train(x, a["w"], a["b"], axis=axis, relu=True, residual=dy)
    r["residual.train"] = res.y
    r["residual.infer"] = pybn.batch_norm_infer(x, a["rm"], a["rv"], a["w"], a["b"], axis=axis, relu=True, residual=dy)
    g = pybn.batch_norm_backward(dy, x, res.mean, res.invstd, a["w"], axis=axis, y=res.y, residual=True)
    r["residual.dx"], r["residual.d_residual"] = g.dx, g.d_residual
    r["fold_conv.w"], r["fold_conv.b"] = pybn.fold_conv_bn(a["conv_w"], a["b"], a["rm"], a["rv"], a["w"], a["b"])
    r["fold_linear.w"], r["fold_linear.b"] = pybn.fold_bn_linear(a["lin_w"], None, a["rm"], a["rv"], a["w"], a["b"])
    return r


def outputs(a):
    return dict(y=np.empty_like(a["x"]), drop=np.empty_like(a["x"]))


def differences(got, want):
    return [k for k in want if got[k].tobytes() != want[k].tobytes() or got[k].shape != want[k].shape]


def test_threads_calling_every_kernel_match_serial_results():
    inputs = [make_inputs(k) for k in range(N_THREADS)]
    expected = [run_all(a, outputs(a)) for a in inputs]
    assert all(v.size for r in expected for v in r.values())
    failures, rounds = [], [0] * N_THREADS
    deadline = [0.0]
    start = threading.Barrier(N_THREADS, action=lambda: deadline.__setitem__(0, time.perf_counter() + RUN_SECONDS))

    def worker(k):
        a, out = inputs[k], outputs(inputs[k])
        try:
            start.wait()
            while rounds[k] == 0 or time.perf_counter() < deadline[0]:
                bad = differences(run_all(a, out), expected[k])
                if bad:
                    failures.append((k, rounds[k], bad))
                    return
                rounds[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((k, rounds[k], repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"(thread, round, results that differ from the serial ones): {failures}"
    assert min(rounds) >= 2, rounds
    FIGURES.append(f"concurrency: {N_THREADS} threads x {len(expected[0])} results per round, "
                   f"{sum(rounds)} rounds in {RUN_SECONDS} s, all bitwise equal to the serial results")


RACING = """
import random, sys, threading, time
import numpy as np
import pybn
from test_concurrency import differences, make_inputs, outputs, run_all

what = sys.argv[1]
inputs = [make_inputs(k) for k in range(4)]
expected = [run_all(a, outputs(a)) for a in inputs]
deadline = time.perf_counter() + 3
failures, rounds = [], [0] * 4

def same(got, want):
    if what == "threads":   # results do not depend on the thread count, bit for bit
        return differences(got, want)
    return [k for k in want if not np.allclose(got[k], want[k], rtol=1e-3, atol=1e-4)]

def worker(k):
    try:
        while time.perf_counter() < deadline:
            bad = same(run_all(inputs[k], outputs(inputs[k])), expected[k])
            if bad:
                failures.append((k, bad))
            rounds[k] += 1
    except Exception as e:
        failures.append((k, repr(e)))

def churn():
    isas = pybn.supported_isas()
    while time.perf_counter() < deadline:
        if what == "threads":
            pybn.set_num_threads(random.randint(1, 6))
        else:
            pybn._C.use_isa(random.choice(isas))
        time.sleep(0.0003)

threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)] + [threading.Thread(target=churn)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not failures, failures
assert min(rounds) >= 2, rounds
print("ok", sum(rounds))
"""


@pytest.mark.parametrize("what", ["threads", "isa"])
def test_kernels_while_another_thread_changes_threads_or_isa(what):
    """4 threads call every kernel for 3 s while a fifth calls set_num_threads (1..6) or
    switches the kernel path every 0.3 ms; in a child process, so that a deadlock in the
    pool fails the test instead of hanging the run."""
    from child_process import run_child

    proc = run_child(RACING, what, timeout=180, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout + proc.stderr
    FIGURES.append(f"concurrency: {proc.stdout.split()[1]} rounds of every kernel in 4 threads while another "
                   f"changed the {'thread count' if what == 'threads' else 'kernel path'}: all correct")


def test_inputs_are_untouched_and_layers_are_independent_across_threads():
    """Layers in different threads (each its own layer and data) give what they give alone."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((16, 8, 12, 12)).astype(np.float32) for _ in range(N_THREADS)]
    copies = [x.copy() for x in xs]

    def steps(k):
        bn, drop = pybn.nn.BatchNorm(8), pybn.nn.Dropout(0.25, seed=k)
        outs = []
        for _ in range(20):
            y = drop(bn(xs[k]))
            outs.append(bn.backward(drop.backward(y)))
        return np.stack(outs), bn.running_mean.copy(), bn.running_var.copy()

    serial = [steps(k) for k in range(N_THREADS)]
    results = [None] * N_THREADS
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, steps(k))) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(N_THREADS):
        for got, want in zip(results[k], serial[k]):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(xs[k], copies[k])


# ------------------------------------------------------------- GIL release

SLOT = 0.01   # seconds


def progress_during(call):
    """Run call() while another Python thread counts; the fraction of the call's 10 ms
    slots in which the counter advanced, and the call's duration."""
    stop = threading.Event()
    hits: list[float] = []
    ready = threading.Event()

    def counter():
        last_slot = -1
        ready.set()
        while not stop.is_set():
            now = time.perf_counter()
            slot = int(now / SLOT)
            if slot != last_slot:    # one timestamp per slot: a cheap record of progress
                hits.append(now)
                last_slot = slot

    t = threading.Thread(target=counter)
    t.start()
    ready.wait()
    time.sleep(0.03)
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    stop.set()
    t.join()
    slots = max(1, int((t1 - t0) / SLOT))
    inside = {int(h / SLOT) for h in hits if t0 <= h <= t1}
    return min(1.0, len(inside) / slots), t1 - t0


@pytest.fixture
def one_thread():
    n = pybn.get_num_threads()
    pybn.set_num_threads(1)
    yield
    pybn.set_num_threads(n)


def long_call_inputs(n=16 * 2**20):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 64, n // 1024), dtype=np.float32)
    c = x.shape[1]
    return x, np.zeros(c, np.float32), np.ones(c, np.float32), np.empty_like(x)


def test_gil_is_released_inside_kernels(one_thread):
    # One call long enough to watch (the check needs one call of many 10 ms slots; short
    # calls in a loop would let the other thread in between them anyway): dropout in
    # place on 64M float32 on the scalar path, about 0.1-0.3 s.
    x = np.ones(64 * 2**20, np.float32)

    def pybn_call():
        with pybn._runtime.use_isa("scalar"):
            pybn.dropout(x, 0.5, seed=1, out=x)

    def holds_gil():   # negative control: a builtin that never releases the GIL
        sum(range(20_000_000))

    # The counter's progress is held against its progress while this thread sleeps for as
    # long (the GIL free, nothing else of ours running) in the same attempt: on a loaded
    # machine the counter gets fewer slots either way, so an absolute fraction would blame
    # the scheduler on the kernel.
    for _attempt in range(5):
        frac, seconds = progress_during(pybn_call)
        free, _ = progress_during(lambda: time.sleep(seconds))
        control, control_seconds = progress_during(holds_gil)
        if frac >= 0.5 * free and frac > 2 * control and control <= 0.3:
            break
    FIGURES.append(f"GIL: another Python thread advanced in {frac:.0%} of the 10 ms slots of a "
                   f"{seconds * 1e3:.0f} ms pybn.dropout call (64M float32, scalar path, 1 pybn thread), "
                   f"{free:.0%} while the caller slept as long; "
                   f"control holding the GIL: {control:.0%} of {control_seconds * 1e3:.0f} ms")
    assert control_seconds > 0.05, "the control call is too short to tell"
    assert control <= 0.3, f"the detector cannot see a held GIL ({control:.0%})"
    assert seconds > 0.05, "the kernel call is too short to tell"
    assert free > 2 * control, f"the counter barely ran even with the GIL free ({free:.0%}): machine too busy"
    assert frac >= 0.5 * free and frac > 2 * control, \
        f"another thread advanced in only {frac:.0%} of the kernel's slots ({free:.0%} with the GIL free): GIL held?"


def concurrent_vs_serial(work, tries=5):
    """Best-of-`tries` wall times of work(0); work(1) one after the other, and of the two in
    two threads at once; and the CPU time each thread used."""
    for k in range(2):
        work(k)   # warm up (page faults on the outputs)
    serial, parallel, cpu = float("inf"), float("inf"), [0.0, 0.0]
    for _ in range(tries):
        t0 = time.perf_counter()
        work(0)
        work(1)
        serial = min(serial, time.perf_counter() - t0)

        def timed(k):
            c0 = time.thread_time()
            work(k)
            cpu[k] = time.thread_time() - c0

        threads = [threading.Thread(target=timed, args=(k,)) for k in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel = min(parallel, time.perf_counter() - t0)
    return serial, parallel, cpu


def test_two_threads_run_kernels_concurrently(one_thread):
    """Reported, not asserted: 2 cores shared with other jobs, and batch norm is bound by
    memory bandwidth, which two cores share (the GIL test above is the assertion)."""
    arrays = [long_call_inputs() for _ in range(2)]
    kernels = {
        "batch_norm_infer": lambda x, rm, rv, out: pybn.batch_norm_infer(x, rm, rv, out=out),
        "batch_norm_train": lambda x, rm, rv, out: pybn.batch_norm_train(x, out=out),
        "dropout (scalar path)": lambda x, rm, rv, out: pybn.dropout(x, 0.5, seed=1, out=out),
    }
    for name, kernel in kernels.items():
        def work(k):
            with pybn._runtime.use_isa("scalar" if "scalar" in name else pybn.supported_isas()[-1]):
                for _ in range(4):
                    kernel(*arrays[k])

        serial, parallel, cpu = concurrent_vs_serial(work)
        FIGURES.append(f"GIL timing, {name}: 2 Python threads x 4 calls on 16M float32 (1 pybn thread each): "
                       f"{parallel * 1e3:.0f} ms at once vs {serial * 1e3:.0f} ms one after the other "
                       f"(ratio {parallel / serial:.2f}, best of 5); CPU time per thread "
                       f"{cpu[0] * 1e3:.0f} / {cpu[1] * 1e3:.0f} ms")
