"""pybn across process and thread boundaries: fork, spawn, DataLoader workers, interpreter
exit with a daemon thread inside a kernel, thread creation failing, signals.

Each case runs in a child process with a timeout (tests/child_process.py), so a hang or an
abort fails the test instead of the run. The children check their results against float64
NumPy references and print "ok"; the tests assert the exit status and that line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from child_process import run_child

# Shared by the child scripts: an input large enough for several threads (64 grains of
# 32K elements), its inference statistics, and a float64 reference of batch_norm_infer.
PRELUDE = """
import os, sys, threading, time
import numpy as np
import pybn

rng = np.random.default_rng(0)
x = rng.standard_normal((32, 64, 32, 32)).astype(np.float32)
rm = rng.standard_normal(64).astype(np.float32)
rv = rng.uniform(0.5, 2, 64).astype(np.float32)
c = (slice(None), None, None)
reference = ((x - rm[c].astype(np.float64)) / np.sqrt(rv[c].astype(np.float64) + 1e-5)).astype(np.float32)

def check_infer(label):
    y = pybn.batch_norm_infer(x, rm, rv)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5, err_msg=label)
    return y

def os_threads():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
"""


def assert_ok(proc: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert proc.returncode == returncode, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1:] == ["ok"], proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- fork

FORK_AFTER_POOL = PRELUDE + """
import multiprocessing as mp, queue

pybn.set_num_threads(2)
before = os_threads()
parent_y = check_infer("parent")
assert os_threads() > before, "the parent's call did not start a thread"

def child(q):
    default = pybn.get_num_threads()
    y1 = check_infer("child, default threads")
    pybn.set_num_threads(2)
    started = os_threads()
    y2 = check_infer("child, 2 threads")
    q.put((default, os_threads() > started, y1, y2))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
try:
    default, started_thread, y1, y2 = q.get(timeout=60)
except queue.Empty:
    p.kill()
    sys.exit("the forked child did not answer: hung")
p.join()
assert p.exitcode == 0, p.exitcode
assert default == 1, f"the child starts with {default} threads, expected 1 (until set_num_threads)"
assert started_thread, "set_num_threads(2) in the child did not start a thread"
assert y1.tobytes() == parent_y.tobytes() and y2.tobytes() == parent_y.tobytes()
print("ok")
"""


def test_fork_after_a_multithreaded_call():
    """A child made by fork (multiprocessing's default on Linux) after the parent's pool ran
    computes on 1 thread, then on 2 once it asks, the same bits as the parent."""
    assert_ok(run_child(FORK_AFTER_POOL, timeout=120))


DATALOADER = PRELUDE + """
import torch
from torch.utils.data import DataLoader, Dataset

busy_parent, worker_threads = sys.argv[1] == "busy", int(sys.argv[2])
pybn.set_num_threads(2)
xs = [rng.standard_normal((8, 16, 32, 32)).astype(np.float32) for _ in range(6)]   # 4 grains each

class BatchMeans(Dataset):
    def __len__(self):
        return len(xs)

    def __getitem__(self, i):
        result = pybn.batch_norm_train(xs[i])
        return torch.from_numpy(result.mean), pybn.get_num_threads()

def init(worker_id):
    if worker_threads > 1:
        pybn.set_num_threads(worker_threads)

check_infer("parent")   # the parent's pool runs before the workers are forked
stop = threading.Event()

def keep_busy():   # another thread of the parent inside kernels while the workers are forked
    while not stop.is_set():
        pybn.batch_norm_infer(x, rm, rv)

if busy_parent:
    threading.Thread(target=keep_busy, daemon=True).start()
loader = DataLoader(BatchMeans(), batch_size=None, num_workers=2, worker_init_fn=init,
                    multiprocessing_context="fork", timeout=60)
for epoch in range(2):
    for i, (mean, threads) in enumerate(loader):
        want = xs[i].mean(axis=(0, 2, 3), dtype=np.float64)
        np.testing.assert_allclose(mean.numpy(), want, rtol=1e-5, atol=1e-6)
        assert threads == worker_threads, (threads, worker_threads)
stop.set()
print("ok")
"""


@pytest.mark.parametrize("busy_parent", ["idle", "busy"])
@pytest.mark.parametrize("worker_threads", [1, 2])
def test_dataloader_workers_call_pybn(busy_parent, worker_threads):
    """torch DataLoader(num_workers=2) whose Dataset calls pybn, after the parent's pool ran;
    "busy": a thread of the parent is inside kernels while the workers are forked. The
    workers use 1 thread, or 2 when worker_init_fn asks for it."""
    pytest.importorskip("torch")
    assert_ok(run_child(DATALOADER, busy_parent, str(worker_threads), timeout=180))


FORK_DURING_KERNEL = PRELUDE + """
pybn.set_num_threads(2)
check_infer("parent")   # this thread, which forks, has used the pool too
big = np.ones(2**25, np.float32)
out = np.empty_like(big)
spans, stop, inside = [], threading.Event(), threading.Event()

def loop():   # long multi-threaded calls, back to back
    while not stop.is_set():
        t0 = time.monotonic()
        inside.set()
        pybn.dropout(big, 0.5, seed=1, out=out)
        spans.append((t0, time.monotonic()))

worker = threading.Thread(target=loop, daemon=True)   # daemon: a failed check ends the script
worker.start()
inside.wait()
forks = []
for attempt in range(5):
    time.sleep(0.013 * (attempt + 1))
    at = time.monotonic()
    pid = os.fork()
    if pid == 0:   # the child: only this thread exists; the parent's pool was busy
        try:
            default = pybn.get_num_threads()
            check_infer("child, default threads")
            pybn.set_num_threads(2)
            check_infer("child, 2 threads")
            assert default == 1, default
            code = 0
        except BaseException as e:
            print("child:", repr(e), flush=True)
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        sys.exit("a child forked during a kernel hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0, done
    forks.append(at)
stop.set()
worker.join()
inside_kernel = sum(any(t0 < at < t1 for t0, t1 in spans) for at in forks)
assert inside_kernel >= 1, "no fork happened while the other thread was inside a kernel"
print(f"{inside_kernel} of {len(forks)} forks inside a kernel")
print("ok")
"""


def test_fork_while_another_thread_is_inside_a_kernel():
    """The parent's pool is busy (held by another thread) at the fork: the child must not
    inherit that state; it computes on 1 thread, then on 2."""
    proc = run_child(FORK_DURING_KERNEL, timeout=180)
    assert_ok(proc)


FORK_FROM_THREAD = PRELUDE + """
pybn.set_num_threads(2)
check_infer("parent")
status = []

def forker():
    pid = os.fork()
    if pid == 0:
        try:
            pybn.set_num_threads(2)
            check_infer("child of a thread")
            os._exit(0)
        except BaseException as e:
            print("child:", repr(e), flush=True)
            os._exit(1)
    status.append(os.waitpid(pid, 0)[1])

t = threading.Thread(target=forker)
t.start()
t.join()
assert os.waitstatus_to_exitcode(status[0]) == 0, status
check_infer("parent after the fork")
print("ok")
"""


def test_fork_from_a_python_thread():
    assert_ok(run_child(FORK_FROM_THREAD, timeout=120))


START_METHODS = PRELUDE + """
import multiprocessing as mp

def child(q):
    default = pybn.get_num_threads()
    pybn.set_num_threads(2)
    q.put((default, pybn.batch_norm_infer(x, rm, rv)))

if __name__ == "__main__":
    pybn.set_num_threads(2)
    check_infer("parent")
    ctx = mp.get_context(sys.argv[1])
    if sys.argv[1] == "forkserver":
        ctx.set_forkserver_preload(["pybn"])
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    threads, y = q.get(timeout=100)
    p.join()
    print("default threads in the child:", threads)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    print("ok")
"""


@pytest.mark.parametrize("method, threads", [
    ("spawn", 2),        # a fresh interpreter: the default, here OMP_NUM_THREADS
    ("forkserver", 1),   # a fork of the server, which imported pybn (preload)
])
def test_spawn_and_forkserver_children(method, threads, tmp_path):
    script = tmp_path / "start_method.py"   # spawn runs the main module again: it must be a file
    script.write_text(START_METHODS)
    proc = run_child(script, method, timeout=180, env={"OMP_NUM_THREADS": "2"})
    assert_ok(proc)
    assert f"default threads in the child: {threads}" in proc.stdout


# ------------------------------------------------------------- interpreter exit

DAEMON_AT_EXIT = """
import sys, threading, time
import numpy as np
import pybn

threads, first_call_in_main, pause = int(sys.argv[1]), sys.argv[2] == "main", int(sys.argv[3])
pybn.set_num_threads(threads)
x = np.ones(2**24, np.float32)
out = np.empty_like(x)
if first_call_in_main:
    pybn.dropout(x, 0.5, seed=1, out=out)
started = threading.Event()

def loop():
    while True:
        started.set()
        pybn.dropout(x, 0.5, seed=1, out=out)

threading.Thread(target=loop, daemon=True).start()
started.wait()
time.sleep(0.002 * pause)
print("exiting", flush=True)
sys.exit(3)
"""


def test_daemon_thread_inside_a_kernel_at_exit():
    """A script whose daemon thread is inside (or entering) a kernel when the interpreter
    exits ends with the script's status, 30 times over: 1 and 2 threads, first kernel call
    in the daemon thread or before it, exits at various points of the calls."""
    runs = [(str(threads), first, str(pause)) for threads in (1, 2) for first in ("main", "daemon")
            for pause in range(8)][:30]
    failures = []
    for batch in range(0, len(runs), 6):   # a few at once: the timing varies more, and it is quicker
        procs = [subprocess.Popen([sys.executable, "-c", DAEMON_AT_EXIT, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True, cwd="/")
                 for args in runs[batch:batch + 6]]
        for args, proc in zip(runs[batch:batch + 6], procs):
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                failures.append((args, "hung", err[-300:]))
                continue
            if proc.returncode != 3 or out.strip() != "exiting" or err:
                failures.append((args, proc.returncode, err[-300:]))
    assert not failures, f"{len(failures)} of {len(runs)} runs (threads, first call, pause): {failures}"


# ------------------------------------------------------- thread creation failing

THREADS_REFUSED = PRELUDE + """
import resource

big = rng.standard_normal(2**24).astype(np.float32).reshape(16, 64, 128, 128)   # 512 grains
m64 = rng.standard_normal(64).astype(np.float32)
want = ((big - m64[c].astype(np.float64)) / np.sqrt(1 + 1e-5)).astype(np.float32)
out = np.empty_like(big)
ones = np.ones(64, np.float32)
pybn.batch_norm_infer(big[:1], m64, ones, out=out[:1])   # everything imported and touched once

with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
# Room for a few thread stacks (8 MiB each by default here), not for 255.
resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
pybn.set_num_threads(256)
pybn.batch_norm_infer(big, m64, ones, out=out)
started = pybn._C.diagnostics.pool_threads()
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))   # to compare
assert 1 < started < 256, f"{started} threads: the limit did not refuse some and allow others"
np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
print(f"{started} of 256 threads started")
print("ok")
"""


@pytest.mark.parametrize("threading_env", ["own", "openmp"])
def test_thread_creation_failure_runs_on_the_threads_it_has(threading_env):
    """set_num_threads(256) under an address-space limit that lets only some threads start:
    the call completes, right, on the threads that exist (libgomp printed "Thread creation
    failed" and exited with status 1), on pybn's pool and on a libgomp team alike."""
    proc = run_child(THREADS_REFUSED, timeout=120, env={"PYBN_THREADING": threading_env})
    assert_ok(proc)
    assert "Thread creation failed" not in proc.stderr


LIBGOMP_STACKS_REFUSED = PRELUDE + """
import resource

check_infer("before")
out = np.empty_like(x)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
# Room for one of libgomp's stacks, not for three (argv[1]; the default stacks are 8 MiB)
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), resource.RLIM_INFINITY))
pybn.set_num_threads(4)
pybn.batch_norm_infer(x, rm, rv, out=out)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))   # to compare
np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize(("stack_size", "room"), [("512M", 2**30), (" 768 m ", 2**30 + 2**29),
                                                   ("1.5G", 12 * 2**20), ("4", 12 * 2**20)])
def test_libgomp_threads_are_probed_with_its_stack_size(stack_size, room):
    """The probe made threads with default stacks, which fit where libgomp's OMP_STACKSIZE
    ones did not: libgomp printed "Thread creation failed" and exited with status 1. A value
    libgomp rejects ("1.5G"), or one below the system's minimum ("4", KiB), leaves libgomp's
    stacks at the default, and so the probe's."""
    proc = run_child(LIBGOMP_STACKS_REFUSED, str(room), timeout=120,
                     env={"PYBN_THREADING": "openmp", "OMP_STACKSIZE": stack_size})
    assert_ok(proc)
    assert "Thread creation failed" not in proc.stderr


SMALLER_TEAM_THEN_LIMIT = PRELUDE + """
import ctypes, resource

ctypes.CDLL("libgomp.so.1")   # loaded, as torch loads its own: "auto" would run on it

tasks = lambda: len(os.listdir("/proc/self/task"))
pybn.set_num_threads(3)
check_infer("a team of 3")
pybn.batch_norm_infer(x[:1], rm, rv)   # 64K elements: a team of 2, which retires libgomp's third thread
time.sleep(0.2)
os.setgid(65534)
os.setuid(65534)   # (root is not held to RLIMIT_NPROC)
resource.setrlimit(resource.RLIMIT_NPROC, (tasks(), tasks()))   # no thread more for this user
check_infer("a team of 3 again, one thread refused")
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become user nobody")
@pytest.mark.parametrize("threading_env", ["openmp", "auto"])
def test_threads_retired_by_a_smaller_team_are_probed_again(threading_env):
    """libgomp retires the threads a smaller team does not use; pybn counted the largest team
    ever formed, skipped the probe, and libgomp exited when the system refused the thread it
    re-created. Under "auto" a tight RLIMIT_NPROC now takes pybn's own pool."""
    proc = run_child(SMALLER_TEAM_THEN_LIMIT, timeout=120,
                     env={"PYBN_THREADING": threading_env, "OMP_NUM_THREADS": "1"})
    assert_ok(proc)
    assert "Thread creation failed" not in proc.stderr


# ----------------------------------------------------------- exceptions in slices

SLICE_THROWS = """
import numpy as np
import pybn

pybn.set_num_threads(4)
grain = 1 << 15
rows = np.full((8, 4), -1, np.int64)
try:
    pybn._C.diagnostics.trace_parallel_for(8, 8 * grain, rows, throw_in=0, slice_ms=100)
except MemoryError:
    pass
else:
    raise AssertionError("no MemoryError")
done = rows[rows[:, 0] >= 0]
assert [tuple(r[:2]) for r in done] == [(2, 4), (4, 6), (6, 8)], done   # the other slices all finished
assert not done[:, 2].any() and len(set(done[:, 3])) == 3   # on 3 workers

rows[:] = -1
try:
    pybn._C.diagnostics.trace_parallel_for(8, 8 * grain, rows, throw_in=7, slice_ms=100)   # in a worker's slice
except MemoryError:
    pass
else:
    raise AssertionError("no MemoryError")
assert [tuple(r[:3]) for r in rows[rows[:, 0] >= 0]] == [(0, 2, 1), (2, 4, 0), (4, 6, 0)]

pybn._C.diagnostics.trace_parallel_for(8, 8 * grain, rows)   # the pool still works
assert [tuple(r[:3]) for r in rows[[0, 2, 4, 6]]] == [(0, 2, 1), (2, 4, 0), (4, 6, 0), (6, 8, 0)]
print("ok")
"""


def test_an_exception_in_a_slice_reaches_python_after_every_slice():
    """std::bad_alloc thrown in one slice (the caller's or a worker's) becomes MemoryError once
    the other slices have finished; with OpenMP it escaped the parallel region:
    std::terminate."""
    assert_ok(run_child(SLICE_THROWS, timeout=60))


# --------------------------------------------------------------------- signals

LONG_KERNELS = PRELUDE + """
import signal
# Python's own dispositions whatever the parent left (a child inherits an ignored or
# blocked SIGINT, and Python then installs no KeyboardInterrupt handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, (lambda *a: sys.exit(5)) if sys.argv[1] == "handler" else signal.SIG_DFL)
pybn.set_num_threads(2)
big = np.ones(2**25, np.float32)
out = np.empty_like(big)
print("running", flush=True)
try:
    while True:
        pybn.dropout(big, 0.5, seed=1, out=out)
except KeyboardInterrupt:
    check_infer("after KeyboardInterrupt")
    print("ok", flush=True)
"""


@pytest.mark.parametrize("sig, mode, expected", [
    (signal.SIGINT, "default", 0),               # KeyboardInterrupt after the current call
    (signal.SIGTERM, "handler", 5),              # a Python handler runs (on the main thread)
    (signal.SIGTERM, "default", -signal.SIGTERM),  # the default action ends the process
])
def test_signals_during_long_kernels(sig, mode, expected):
    """A signal sent while calls of about 50 ms run back to back is handled as Python
    says; the pool's workers never take it (their asynchronous signals are blocked)."""
    env = dict(os.environ)
    env.pop("PYBN_ISA", None)
    proc = subprocess.Popen([sys.executable, "-c", LONG_KERNELS, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd="/", start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the child did not end after the signal")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == expected, (proc.returncode, err[-500:])
    if expected == 0:
        assert out.strip().splitlines()[-1] == "ok", out + err


LAYER_INTERRUPTED = PRELUDE + """
import signal
import pybn.nn
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
pybn.set_num_threads(2)
base = np.random.default_rng(0).standard_normal((64, 64, 64, 64), dtype=np.float32)
batches = [base + k for k in range(4)]  # unlike batches: the running mean depends on how many were counted
layer = pybn.nn.BatchNorm(64, momentum=None)
print("running", flush=True)
try:
    for i in range(10**6):
        layer(batches[i % 4])
except KeyboardInterrupt:
    counted = layer.num_batches_tracked
    replay = pybn.nn.BatchNorm(64, momentum=None)
    for i in range(counted):
        replay(batches[i % 4])
    assert np.array_equal(layer.running_mean, replay.running_mean), counted
    assert np.array_equal(layer.running_var, replay.running_var), counted
    print("ok", counted, flush=True)
"""


def test_interrupted_training_forward_counts_what_it_updated():
    """Ctrl-C arrives while a layer's kernel runs (and is raised as the kernel returns, the
    running statistics updated): the batch is counted too, so that momentum=None's weights
    (1 / num_batches_tracked) stay right. The layer then equals one run over as many batches."""
    proc = subprocess.Popen([sys.executable, "-c", LAYER_INTERRUPTED], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/", start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-800:]
    assert out.strip().splitlines()[-1].startswith("ok"), out + err
