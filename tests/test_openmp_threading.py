"""pybn's parallel regions on a GNU OpenMP runtime already loaded in the process (torch's
libgomp), and the PYBN_THREADING switch (docs/threads.md).

The backend is chosen when pybn is imported, so every case runs in a child process with a
timeout (tests/child_process.py): a hang or an abort fails the test instead of the run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from child_process import run_child

pytest.importorskip("torch")

BACKENDS = {"own": {"PYBN_THREADING": "own"}, "openmp": {"PYBN_THREADING": "openmp"},
            "auto_torch": {"PYBN_THREADING": "auto", "IMPORT_TORCH": "1"}}

# Imports torch first when asked (its libgomp is then loaded), and names the backend in use.
PRELUDE = """
import json, os, sys, threading
import numpy as np
if os.environ.get("IMPORT_TORCH"):
    import torch
import pybn
diag = pybn._C.diagnostics
GRAIN = 1 << 15

def thread_names(tids):
    names = []
    for tid in tids:
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names

def trace(n, work, throw_in=-1, slice_ms=0):
    rows = np.full((n, 4), -1, np.int64)
    diag.trace_parallel_for(n, work, rows, throw_in, slice_ms)
    return rows
"""


def assert_ok(proc):
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ which backend runs

WHICH = PRELUDE + """
pybn.set_num_threads(3)
rows = trace(3, 3 * GRAIN)
tids = [int(t) for t in rows[:, 3]]
print(json.dumps({"runtime": diag.openmp_runtime(), "caller": bool(rows[0, 2]) and tids[0] == threading.get_native_id(),
                  "tids": len(set(tids)), "names": thread_names(tids[1:])}))
"""


@pytest.mark.parametrize("env, runtime, worker_name", [
    ({"PYBN_THREADING": "auto", "IMPORT_TORCH": "1"}, "torch", "python"),   # torch's libgomp, its threads
    ({"IMPORT_TORCH": "1"}, "torch", "python"),                             # auto is the default
    ({"PYBN_THREADING": "own", "IMPORT_TORCH": "1"}, None, "pybn-worker"),
    ({"PYBN_THREADING": "auto"}, None, "pybn-worker"),                      # no libgomp loaded
    ({"PYBN_THREADING": "openmp"}, "libgomp", "python"),                    # the system's, loaded at import
])
def test_slices_run_on_the_backend_chosen(env, runtime, worker_name):
    """With torch imported (its libgomp loaded) the slices of a parallel region run on
    libgomp's threads: slice 0 on the caller, the others on threads that are not pybn's
    workers, one thread per slice, as many as set_num_threads asks."""
    got = assert_ok(run_child(WHICH, env=env, timeout=60))
    if runtime is None:
        assert got["runtime"] is None
    else:
        assert got["runtime"] is not None and runtime in got["runtime"] and "libgomp" in got["runtime"], got
    assert got["caller"] and got["tids"] == 3
    assert got["names"] == [worker_name] * 2, got


def test_a_bad_pybn_threading_fails_the_import_with_its_message():
    proc = run_child("import pybn", env={"PYBN_THREADING": "gomp"}, timeout=60)
    assert proc.returncode != 0
    assert "PYBN_THREADING=gomp: must be own, openmp or auto" in proc.stderr


# -------------------------------------------------------- identical results, every path

RESULTS = PRELUDE + """
rng = np.random.default_rng(7)
x = rng.standard_normal((16, 24, 30, 30)).astype(sys.argv[1])
dy = rng.standard_normal(x.shape).astype(x.dtype)
w = rng.uniform(0.5, 1.5, 24).astype(x.dtype)
b = rng.standard_normal(24).astype(x.dtype)
out = {}
for isa in pybn.supported_isas():
    for threads in (1, 2):
        with pybn._runtime.use_isa(isa):
            pybn.set_num_threads(threads)
            r = pybn.batch_norm_train(x, w, b)
            g = pybn.batch_norm_backward(dy, x, r.mean, r.invstd, w)
            d = pybn.dropout(x, 0.3, seed=11, offset=5)
            cl = pybn.batch_norm_train(np.moveaxis(x, 1, -1).copy(), w, b, axis=-1)
        for name, a in {"y": r.y, "mean": r.mean, "invstd": r.invstd, "dx": g.dx, "dw": g.dweight,
                        "db": g.dbias, "dropout": d, "y_last": cl.y}.items():
            out[f"{isa}/{threads}/{name}"] = a
np.savez(sys.argv[2], **out)
print(json.dumps({"runtime": diag.openmp_runtime()}))
"""


def reference_train(x, w, b, eps=1e-5):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + eps)
    c = (slice(None), None, None)
    return (x64 - mean[c]) * invstd[c] * w[c] + b[c], mean, invstd


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_results_are_bitwise_identical_on_both_backends(dtype, tmp_path):
    """Batch norm (forward, backward, channels last) and dropout, on every ISA path with 1
    and 2 threads: the OpenMP backend gives the very bytes pybn's own pool gives, and both
    match a float64 reference."""
    files = {}
    for backend, env in BACKENDS.items():
        files[backend] = tmp_path / f"{backend}.npz"
        got = assert_ok(run_child(RESULTS, dtype, str(files[backend]), env=env, timeout=180))
        assert (got["runtime"] is None) == (backend == "own"), got
    own, others = np.load(files["own"]), [np.load(files[b]) for b in BACKENDS if b != "own"]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 24, 30, 30)).astype(dtype)
    rng.standard_normal(x.shape)
    w = rng.uniform(0.5, 1.5, 24).astype(dtype)
    b = rng.standard_normal(24).astype(dtype)
    want_y, want_mean, want_invstd = reference_train(x, w, b)
    tol = 1e-4 if dtype == "float32" else 1e-10
    for key in own.files:
        for other in others:
            assert own[key].tobytes() == other[key].tobytes(), key
        if key.endswith("/y"):
            np.testing.assert_allclose(own[key], want_y, rtol=tol, atol=tol, err_msg=key)
        if key.endswith("/mean"):
            np.testing.assert_allclose(own[key], want_mean, rtol=tol, atol=tol, err_msg=key)
        if key.endswith("/invstd"):
            np.testing.assert_allclose(own[key], want_invstd, rtol=tol, atol=tol, err_msg=key)
        if key.endswith("/y_last"):
            np.testing.assert_allclose(np.moveaxis(own[key], -1, 1), want_y, rtol=tol, atol=tol, err_msg=key)
        if key.endswith("/dropout"):
            kept = own[key] != 0
            q = (65536 - np.floor(0.3 * 65536)) / 65536   # the keep probability (docs/dropout.md)
            np.testing.assert_allclose(own[key][kept], x[kept] / q, rtol=tol, err_msg=key)
            assert 0.6 < kept.mean() < 0.8


# ------------------------------------------------------------------------------ fork

FORK = PRELUDE + """
import multiprocessing as mp, queue
t = torch.randn(1 << 22)
torch.relu(t)                       # libgomp's team exists in the parent: its workers are running
pybn.set_num_threads(2)
x = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)
parent = pybn.dropout(x, 0.4, seed=3)
assert diag.openmp_runtime() is not None

def child(q):
    default = pybn.get_num_threads()
    pybn.set_num_threads(2)
    y = pybn.dropout(x, 0.4, seed=3)
    rows = trace(2, 2 * GRAIN)
    q.put((default, diag.openmp_runtime(), y, thread_names([int(rows[1, 3])])))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
try:
    default, runtime, y, names = q.get(timeout=60)
except queue.Empty:
    p.kill()
    sys.exit("the forked child did not answer: hung")
p.join()
assert p.exitcode == 0, p.exitcode
assert y.tobytes() == parent.tobytes()
print(json.dumps({"default": default, "runtime": runtime, "names": names}))
"""


@pytest.mark.parametrize("threading_env", ["auto", "openmp"])
def test_a_forked_child_computes_on_pybns_own_threads(threading_env):
    """libgomp's pool does not survive fork (its next 2-thread region in the child waits
    for the parent's workers forever): after a parent's calls on the OpenMP backend, a fork
    child starts with 1 thread and, given 2, runs them on pybn's own workers, right."""
    got = assert_ok(run_child(FORK, env={"PYBN_THREADING": threading_env, "IMPORT_TORCH": "1"}, timeout=120))
    assert got == {"default": 1, "runtime": None, "names": ["pybn-worker"]}


# ------------------------------------------------------------------------ exceptions

THROWS = PRELUDE + """
assert diag.openmp_runtime() is not None
pybn.set_num_threads(4)
for throw_in in (0, 7):        # in the caller's slice, in a libgomp thread's slice
    try:
        rows = np.full((8, 4), -1, np.int64)
        diag.trace_parallel_for(8, 8 * GRAIN, rows, throw_in, 100)
    except MemoryError:
        pass
    else:
        raise AssertionError("no MemoryError")
    done = sorted(tuple(int(v) for v in r[:2]) for r in rows if r[0] >= 0)
    expected = [(b, b + 2) for b in (0, 2, 4, 6) if not b <= throw_in < b + 2]
    assert done == expected, (throw_in, done)
rows = trace(8, 8 * GRAIN)            # the runtime still works
assert sorted(int(b) for b in rows[:, 0] if b >= 0) == [0, 2, 4, 6]
print(json.dumps({"tids": len(set(int(t) for t in rows[:, 3] if t >= 0))}))
"""


def test_an_exception_in_a_slice_on_the_openmp_backend_reaches_python():
    """std::bad_alloc in one slice becomes MemoryError after the other slices finished; no
    exception crosses libgomp's frames (the process would terminate)."""
    got = assert_ok(run_child(THROWS, env=BACKENDS["auto_torch"], timeout=120))
    assert got == {"tids": 4}


# ------------------------------------------------------ nested calls, concurrent calls

NESTED = PRELUDE + """
import ctypes
path = diag.openmp_runtime()
gomp = ctypes.CDLL(path)                   # the same libgomp torch loaded (already loaded: no new copy)
pybn.set_num_threads(2)
x = np.random.default_rng(1).standard_normal(1 << 21).astype(np.float32)
want = pybn.dropout(x, 0.5, seed=9)
results = {}

@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def region(_):                             # runs on each thread of an OpenMP team of 2
    me = gomp.omp_get_thread_num()
    rows = trace(4, 4 * GRAIN)
    rows = rows[rows[:, 0] >= 0]
    results[me] = (pybn.dropout(x, 0.5, seed=9).tobytes() == want.tobytes(),
                   [[int(v) for v in r[:3]] for r in rows], int(rows[0, 3]) == threading.get_native_id())

gomp.GOMP_parallel(region, None, 2, 0)
print(json.dumps({str(k): v for k, v in sorted(results.items())}))
"""


def test_a_call_from_inside_an_openmp_region_runs_on_its_own_thread():
    """pybn called from each thread of an OpenMP team (as from inside a torch op's parallel
    region): no deadlock, the right result, and every slice on the calling thread: a nested
    team would multiply the threads."""
    got = assert_ok(run_child(NESTED, env=BACKENDS["auto_torch"], timeout=60))
    assert got == {"0": [True, [[0, 4, 1]], True], "1": [True, [[0, 4, 1]], True]}, got


CONCURRENT = PRELUDE + """
import concurrent.futures
pybn.set_num_threads(2)
rng = np.random.default_rng(2)
inputs = [rng.standard_normal((8, 16, 64, 64)).astype(np.float32) for _ in range(6)]
def work(i):
    x = inputs[i]
    return [pybn.dropout(x, 0.2, seed=i).tobytes(), pybn.batch_norm_train(x).y.tobytes()]
serial = [work(i) for i in range(6)]
t = torch.randn(1 << 20)
def torch_too(i):
    torch.relu(t)
    return work(i)
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    for _ in range(5):
        assert list(ex.map(torch_too, range(6))) == serial
print(json.dumps({"runtime": diag.openmp_runtime() is not None}))
"""


def test_several_python_threads_at_once_match_serial_results():
    """Four Python threads interleaving torch ops and pybn calls on the OpenMP backend: each
    libgomp root thread has its own team, pybn's one-job-at-a-time rule still holds, and
    the results are those of serial calls."""
    assert assert_ok(run_child(CONCURRENT, env=BACKENDS["auto_torch"], timeout=180)) == {"runtime": True}
