"""ISA dispatch, threads and the command line."""

import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pybn
import pybn._runtime

# every path of this build, lowest first (the ISA list of CMakeLists.txt), with the CPU
# features each needs
ALL_ISAS = list(pybn._C.ISAS)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    # Linux spells AVX-512 sub-features with an underscore (avx512_bf16) where
                    # GCC's __builtin_cpu_supports, and so pybn._C.ISAS, does not (avx512bf16).
                    names = line.split(":", 1)[1].split()
                    return set(names) | {n.replace("avx512_", "avx512") for n in names}
    except OSError:  # pragma: no cover
        pass
    return None


def run_python(code, tmp_path, **env_over):
    """Run `python -c code` in a clean directory (so the installed pybn is
    imported) with PYBN_ISA / OMP_NUM_THREADS removed unless given."""
    env = dict(os.environ)
    for k in ("PYBN_ISA", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(env_over)
    return subprocess.run([sys.executable, *code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_version():
    assert isinstance(pybn.__version__, str) and pybn.__version__
    assert pybn.__version__ == importlib.metadata.version("pybn-kernels")


def test_supported_isas():
    isas = pybn.supported_isas()
    assert isinstance(isas, list) and isas
    assert isas[0] == "scalar"
    assert all(i in ALL_ISAS for i in isas)
    # lowest first, no duplicates
    assert isas == sorted(set(isas), key=ALL_ISAS.index)
    assert pybn.isa() in isas


def cpu_features_aarch64():
    """The AArch64 features Linux reports (the "Features" line), or None where there is none
    (under QEMU user emulation, /proc/cpuinfo is the host's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover
        pass
    return None


def test_supported_isas_match_cpu():
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        # ASIMD is mandatory in AArch64: every AArch64 CPU runs the NEON path
        assert list(pybn._C.ISAS) == ["scalar", "neon"]
        assert pybn._C.ISAS["neon"] == ("asimd",)
        assert pybn.supported_isas() == ["scalar", "neon"]
        features = cpu_features_aarch64()
        if features is not None:
            assert "asimd" in features
        return
    if machine not in ("x86_64", "AMD64"):
        # other architectures build the portable path alone
        assert pybn.supported_isas() == ["scalar"]
        return
    flags = cpu_flags()
    if flags is None:  # pragma: no cover
        pytest.skip("no /proc/cpuinfo")
    isas = pybn.supported_isas()
    built = pybn._C.ISAS  # (every path, but in a development build with PYBN_DEV_ISAS: docs/install.md)
    for name, required in built.items():
        assert (name in isas) == (set(required) <= flags), (name, required)
    if "avx2" in built:
        assert ("avx2" in isas) == ({"avx2", "fma"} <= flags)
    if "avx512" in isas:
        assert "avx512f" in flags
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags and "avx512" in built:
        assert "avx512" in isas
    if "avx512bf16" in isas:
        assert "avx512_bf16" in flags and "avx512" in isas


def test_default_isa_is_the_best(tmp_path):
    r = run_python(["-c", "import pybn; print(pybn.isa()); "
                    "print(','.join(pybn.supported_isas()))"], tmp_path)
    assert r.returncode == 0, r.stderr
    best, supported = r.stdout.split()
    assert best == supported.split(",")[-1]
    assert supported.split(",") == pybn.supported_isas()


def test_use_isa_switches_and_restores():
    before = pybn.isa()
    for name in pybn.supported_isas():
        with pybn._runtime.use_isa(name):
            assert pybn.isa() == name
        assert pybn.isa() == before
    # nested, and restored after an exception
    isas = pybn.supported_isas()
    with pytest.raises(RuntimeError), pybn._runtime.use_isa(isas[0]):
        with pybn._runtime.use_isa(isas[-1]):
            assert pybn.isa() == isas[-1]
        assert pybn.isa() == isas[0]
        raise RuntimeError("boom")
    assert pybn.isa() == before


@pytest.mark.parametrize("name", pybn.supported_isas())
def test_pybn_isa_env_forces_path(name, tmp_path):
    r = run_python(["-c", "import pybn; print(pybn.isa())"], tmp_path,
                   PYBN_ISA=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


@pytest.mark.parametrize("name", [i for i in ALL_ISAS if i not in pybn.supported_isas()] or ["none"])
def test_pybn_isa_env_naming_a_path_this_cpu_cannot_run_is_an_error(name, tmp_path):
    if name == "none":
        pytest.skip("this CPU runs every path pybn has")
    r = run_python(["-c", "import pybn"], tmp_path, PYBN_ISA=name)
    assert r.returncode == 1  # a Python exception, not a crash (SIGILL)
    best = pybn.supported_isas()[-1]
    assert f"PYBN_ISA={name}: this CPU supports only up to {best}" in r.stderr, r.stderr


def test_pybn_isa_env_bogus_is_an_error(tmp_path):
    r = run_python(["-c", "import pybn"], tmp_path, PYBN_ISA="bogus")
    assert r.returncode == 1  # a Python exception, not a crash
    assert "PYBN_ISA" in r.stderr


@pytest.mark.parametrize(("name", "says"), [("PYBN_ISA", "is not one of"),
                                           ("PYBN_THREADING", "must be own, openmp or auto"),
                                           ("PYBN_L2_BYTES", "must be a size from"),
                                           ("PYBN_L3_BYTES", "must be a size from")])
def test_a_variable_that_is_not_utf8_is_named_in_the_error(name, says, tmp_path):
    r"""A byte that is not UTF-8 (a Latin-1 shell's \xe9) is written as \xNN in the message:
    raw, it made Python's decoding of the message fail, a bare UnicodeDecodeError."""
    env = {k: v for k, v in os.environb.items() if k not in (b"PYBN_ISA", b"OMP_NUM_THREADS")}
    env[name.encode()] = b"sc\xe9lar"
    r = subprocess.run([sys.executable, "-c", "import pybn"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and "UnicodeDecodeError" not in err, err
    assert f"ImportError: {name}=sc\\xe9lar: " in err and says in err, err


def test_pybn_isa_env_forced_path_computes(tmp_path):
    code = (
        "import numpy as np, pybn\n"
        "x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)\n"
        "y, m, s = pybn.batch_norm_train(x)\n"
        "print(pybn.isa(), ' '.join(repr(float(v)) for v in m))\n"
    )
    # per channel c, the values are 4c + {0,1,2,3} and 12 + 4c + {0,1,2,3}
    expected_means = [7.5, 11.5, 15.5]
    for name in pybn.supported_isas():
        r = run_python(["-c", code], tmp_path, PYBN_ISA=name)
        assert r.returncode == 0, r.stderr
        got = r.stdout.split()
        assert got[0] == name
        assert [float(v) for v in got[1:]] == expected_means


def test_use_isa_rejects_unknown_name():
    before = pybn.isa()
    with pytest.raises(ValueError), pybn._runtime.use_isa("bogus"):
        pass  # pragma: no cover
    assert pybn.isa() == before


@pytest.mark.parametrize("n", [0, -1, 257, 1024, 2**31])
def test_set_num_threads_rejects_out_of_range(n):
    prev = pybn.get_num_threads()
    with pytest.raises(ValueError, match=r"^n: must be in \[1, 256\]"):
        pybn.set_num_threads(n)
    if abs(n) < 2**31:   # the compiled module's own guard
        with pytest.raises(ValueError, match=r"^n: must be in \[1, 256\]"):
            pybn._C.set_num_threads(n)
    assert pybn.get_num_threads() == prev


def test_set_num_threads_accepts_the_maximum():
    prev = pybn.get_num_threads()
    try:
        pybn.set_num_threads(256)
        assert pybn.get_num_threads() == pybn._runtime.MAX_THREADS == 256
    finally:
        pybn.set_num_threads(prev)


def test_set_get_num_threads():
    prev = pybn.get_num_threads()
    assert isinstance(prev, int) and prev >= 1
    try:
        pybn.set_num_threads(1)
        assert pybn.get_num_threads() == 1
        pybn.set_num_threads(2)
        assert pybn.get_num_threads() == 2
    finally:
        pybn.set_num_threads(prev)
    assert pybn.get_num_threads() == prev


@pytest.mark.parametrize("value, n", [("1", 1), ("2", 2), (" 3 ", 3), ("5,2", 5), ("256", 256)])
def test_omp_num_threads_honoured(value, n, tmp_path):
    # as OpenMP reads it: a positive integer, the first of a list of nesting levels
    r = run_python(["-W", "error", "-c", "import pybn; print(pybn.get_num_threads())"],
                   tmp_path, OMP_NUM_THREADS=value)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == n


@pytest.mark.parametrize("value", ["257", "999", "100000000000000000000"])
def test_omp_num_threads_above_the_maximum_is_clamped_with_a_warning(value, tmp_path):
    r = run_python(["-c", "import pybn; print(pybn.get_num_threads())"], tmp_path, OMP_NUM_THREADS=value)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == 256
    assert f"RuntimeWarning: OMP_NUM_THREADS='{value}' is above pybn's maximum: pybn uses 256 threads" in r.stderr


@pytest.mark.parametrize("value", ["0", "-2", "abc", "2.5", ",4"])
def test_omp_num_threads_invalid_falls_back_with_a_warning(value, tmp_path):
    code = "import os, pybn; print(pybn.get_num_threads(), len(os.sched_getaffinity(0)))"
    r = run_python(["-c", code], tmp_path, OMP_NUM_THREADS=value)
    assert r.returncode == 0, r.stderr
    got, cpus = r.stdout.split()
    assert got == cpus
    assert f"RuntimeWarning: OMP_NUM_THREADS={value!r} is not a positive integer" in r.stderr


@pytest.mark.parametrize("cpus", [{0}, None])
def test_default_threads_are_the_cpus_of_the_affinity_mask(cpus, tmp_path):
    code = ("import os, sys\n"
            "if sys.argv[1] == '0': os.sched_setaffinity(0, {0})\n"
            "import pybn\n"
            "print(pybn.get_num_threads(), len(os.sched_getaffinity(0)))\n")
    r = run_python(["-W", "error", "-c", code, "0" if cpus else "all"], tmp_path)
    assert r.returncode == 0, r.stderr
    got, mask = (int(v) for v in r.stdout.split())
    assert got == min(mask, 256)
    if cpus:
        assert got == 1


GRAIN = 1 << 15


def trace(n, work):
    """{begin: (end, on the calling thread, OS thread id)} of parallel_for(n, work)."""
    rows = np.full((n, 4), -1, np.int64)
    pybn._C.diagnostics.trace_parallel_for(n, work, rows)
    return {int(r[0]): (int(r[1]), bool(r[2]), int(r[3])) for r in rows if r[0] >= 0}


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n, grains", [(1, 9), (2, 9), (5, 9), (10, 9), (1000, 3), (1000, 1), (997, 64)])
def test_parallel_for_slices(threads, n, grains):
    """Slice t of a team of k covers [n t / k, n (t + 1) / k), with k = min(threads, grains of
    work, n); slice 0 runs on the calling thread, every other on its own worker."""
    prev = pybn.get_num_threads()
    pybn.set_num_threads(threads)
    try:
        got = trace(n, grains * GRAIN)
    finally:
        pybn.set_num_threads(prev)
    team = min(threads, grains, n)
    assert sorted(got) == [n * t // team for t in range(team)]
    for t in range(team):
        end, on_caller, tid = got[n * t // team]
        assert end == n * (t + 1) // team
        assert on_caller == (t == 0)
    tids = [tid for _, _, tid in got.values()]
    assert len(set(tids)) == team
    assert got[0][2] == threading.get_native_id()


def test_a_call_finding_the_pool_busy_runs_on_its_own_thread():
    """While one Python thread's job holds the pool, another thread's call runs whole on
    the calling thread instead of waiting (no deadlock between callers)."""
    prev = pybn.get_num_threads()
    pybn.set_num_threads(2)
    rows = np.full((4, 4), -1, np.int64)
    holder = threading.Thread(target=pybn._C.diagnostics.trace_parallel_for, args=(4, 4 * GRAIN, rows, -1, 1500))
    try:
        holder.start()
        time.sleep(0.25)
        t0 = time.perf_counter()
        got = trace(4, 4 * GRAIN)
        waited = time.perf_counter() - t0
        holder.join()
    finally:
        pybn.set_num_threads(prev)
    assert got == {0: (4, True, threading.get_native_id())}
    assert waited < 1.0, f"the second caller waited {waited:.3f} s for the pool"
    assert rows[0, 1] == 2 and rows[2, 1] == 4   # the holder's job used both threads


IDLE_AFTER_CALLS = """
import json, sys, time
if sys.argv[1] == "torch":
    import torch
    import pybn
else:
    import pybn
    import torch
import numpy as np

def os_threads():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))

pybn.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((32, 64, 32, 32)).astype(np.float32)
mean, var, out = np.zeros(64, np.float32), np.ones(64, np.float32), np.empty_like(x)
before = os_threads()
idle = []
for _ in range(15):
    for _ in range(3):
        pybn.batch_norm_infer(x, mean, var, out=out)
    c0 = time.process_time()
    time.sleep(0.05)
    idle.append(time.process_time() - c0)
print(json.dumps({"started_threads": os_threads() > before, "idle_cpu": sorted(idle)}))
"""


@pytest.mark.parametrize("first", ["torch", "pybn"])
@pytest.mark.parametrize("threading_env", [{"PYBN_THREADING": "own"},
                                           {"PYBN_THREADING": "auto", "OMP_WAIT_POLICY": "passive"}],
                         ids=["own", "openmp_passive"])
def test_idle_threads_sleep_whichever_library_is_imported_first(first, threading_env, tmp_path):
    """The CPU time the whole process uses during a 50 ms sleep right after multi-threaded
    calls: pybn's idle threads spin about 0.1 ms, then sleep, in both import orders. (With
    GNU OpenMP, torch imported first made the runtime ignore pybn's spin setting: 5-10 ms
    of each 50 ms idle period spent spinning.) On torch's libgomp (PYBN_THREADING=auto, the
    default, with torch loaded) idle threads follow OMP_WAIT_POLICY, as torch's do: passive
    makes them sleep at once (docs/threads.md)."""
    import json

    pytest.importorskip("torch")
    r = run_python(["-c", IDLE_AFTER_CALLS, first], tmp_path, **threading_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["started_threads"], "the calls did not start a thread"
    idle_ms = [round(v * 1e3, 2) for v in got["idle_cpu"]]
    assert idle_ms[len(idle_ms) // 2] < 1.0, f"CPU ms per 50 ms idle period, sorted: {idle_ms}"


SHARED_CPU_CALLS = """
import json, os, time
import numpy as np
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # (threads started later inherit it)
import pybn
x = np.random.default_rng(0).standard_normal((4, 64, 16, 16)).astype(np.float32)
rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
def median_call(threads):
    pybn.set_num_threads(threads)
    pybn.batch_norm_infer(x, rm, rv)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        pybn.batch_norm_infer(x, rm, rv)
        times.append(time.perf_counter() - t)
    return sorted(times)[150]
rounds = [(median_call(1), median_call(2)) for _ in range(3)]
print(json.dumps({"threads": pybn.get_num_threads(), "rounds": rounds}))
"""


def test_two_threads_on_one_cpu_are_not_pathologically_slow(tmp_path):
    """A process confined to one CPU asking for 2 threads (a `taskset`, or a busy second
    core): the caller and the worker take turns on that CPU. Each used to spin
    its whole 0.1 ms before the other could run, so a 2-thread call of 65536 elements took
    about 210 us against 6 us on 1 thread (35x); a spinning thread now yields the CPU it
    shares with the thread it waits for (about 2x). Not a speed test: the bound is 5x."""
    import json

    r = run_python(["-c", SHARED_CPU_CALLS], tmp_path, PYBN_THREADING="own")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["threads"] == 2
    ratios = sorted(two / one for one, two in got["rounds"])
    assert ratios[1] < 5, f"2-thread / 1-thread call time on one CPU, per round: {ratios}"


@pytest.mark.parametrize("command", [["pybn", "info"], ["pybn", "bench", "--help"], ["pybn", "fold", "--help"],
                                     ["pybn.bench.fold_models", "--help"]], ids=lambda c: " ".join(c))
def test_command_lines_run_without_docstrings(command, tmp_path):
    """python -OO strips docstrings: a command whose help was its module's docstring split
    into paragraphs raised AttributeError ('NoneType' object has no attribute 'split')."""
    r = run_python(["-OO", "-m", *command], tmp_path)
    assert r.returncode == 0 and r.stdout, r.stderr


def test_cli_info(tmp_path):
    r = run_python(["-m", "pybn", "info"], tmp_path, PYBN_ISA="scalar",
                   OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert pybn.__version__ in out
    assert "scalar" in out
    low = out.lower()
    assert "isa" in low and "thread" in low
    # the thread count is shown
    thread_lines = [ln for ln in out.splitlines() if "thread" in ln.lower()]
    assert any("1" in ln for ln in thread_lines), out


def test_cli_info_from_source_checkout():
    """`python -m pybn info` also works from the repository root (the sources live under
    src/, so the installed package, which holds the compiled module, is the one imported)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "src" / "pybn" / "__init__.py").is_file():  # pragma: no cover
        pytest.skip("not running from a source checkout")
    r = run_python(["-m", "pybn", "info"], root, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert pybn.__version__ in r.stdout


def test_cli_help_is_plain_text(tmp_path):
    """argparse printed the module docstring as the description, reST markup and all."""
    r = run_python(["-m", "pybn", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "``" not in r.stdout and "info, bench and fold" in r.stdout


def test_cli_info_default(tmp_path):
    r = run_python(["-m", "pybn", "info"], tmp_path, OMP_NUM_THREADS="2")
    assert r.returncode == 0, r.stderr
    assert pybn.supported_isas()[-1] in r.stdout
    thread_lines = [ln for ln in r.stdout.splitlines() if "thread" in ln.lower()]
    assert any("2" in ln for ln in thread_lines), r.stdout


def test_bench_runs_and_checks_results(tmp_path):
    # The benchmark's quickest run: every implementation's result is checked against a float64
    # reference before it is timed, and a wrong one makes the exit status 1.
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    # under emulation (tools/aarch64_test.sh sets PYBN_TEST_EMULATED) T's cells alone: the
    # sections after them, on arrays of up to 100 MB, took more than the 300 s there
    emulated = bool(os.environ.get("PYBN_TEST_EMULATED"))
    sections = ["--no-dropout", "--no-half", "--no-fold", "--no-residual"] if emulated else []
    proc = subprocess.run([sys.executable, "-m", "pybn", "bench", "--quick", "--shapes", "T",
                           "--peers", "numpy", "--json", str(out), *sections],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    cells = data["cells"]
    assert {c["kernel"] for c in cells} == {"infer", "train", "backward"}
    assert all(c["pybn_s"] > 0 and not c["errors"] for c in cells)
    if not emulated:
        assert data["fold"]["pairs"] == 53 and data["fold"]["pybn_s"] > 0 and "numpy" in data["fold"]["peers"]


def test_bench_alternating_timing_calls_in_turn():
    # The bound's probes are timed call for call with pybn's kernel: every timed call of one
    # function sits between calls of the others, and each Timing holds its own function's calls.
    from pybn.bench.timing import TimingConfig, measure_alternating

    log = []
    fns = [lambda: log.append("k"), lambda: log.append("r"), lambda: (log.append("s"), time.sleep(0.002))]
    cfg = TimingConfig(budget=0.01, warmup=2, min_reps=4, max_reps=50, pause=0)
    kernel, read, stream = measure_alternating(fns, cfg)
    assert "".join(log) == "krs" * (len(log) // 3) and len(log) % 3 == 0
    assert kernel.reps == read.reps == stream.reps == len(log) // 3 - cfg.warmup >= cfg.min_reps
    assert stream.median >= 0.002 > kernel.median and stream.median > read.median


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unpickled_arrays_are_accepted(dtype):
    # An unpickled array (as multiprocessing passes it) has a dtype equal to float32/64 but
    # not the same object: every kernel must compare dtypes by value.
    import pickle

    def roundtrip(a):
        return pickle.loads(pickle.dumps(a))

    x = roundtrip(np.arange(24, dtype=dtype).reshape(4, 3, 2))
    want = pybn.batch_norm_train(np.ascontiguousarray(x, dtype=dtype))
    got = pybn.batch_norm_train(x, roundtrip(np.ones(3, dtype)), roundtrip(np.zeros(3, dtype)),
                                running_mean=roundtrip(np.zeros(3, dtype)), running_var=roundtrip(np.ones(3, dtype)))
    np.testing.assert_array_equal(got.y, want.y)
    dx = pybn.batch_norm_backward(roundtrip(np.ones_like(x)), x, roundtrip(got.mean), roundtrip(got.invstd)).dx
    np.testing.assert_allclose(dx, 0, atol=1e-4)
    np.testing.assert_array_equal(pybn.batch_norm_infer(x, roundtrip(got.mean), np.ones(3)),
                                  pybn.batch_norm_infer(want.y * 0 + x, got.mean, np.ones(3)))
    np.testing.assert_array_equal(pybn.dropout(x, 0.5, seed=3), pybn.dropout(np.array(x), 0.5, seed=3))
    np.testing.assert_array_equal(pybn.dropout_apply(x, roundtrip(pybn.dropout_mask(x.shape, 0.5, seed=3)), 0.5),
                                  pybn.dropout(x, 0.5, seed=3))
    np.testing.assert_array_equal(pybn.fold_conv_bn(x, None, np.zeros(4), np.ones(4)).weight,
                                  pybn.fold_conv_bn(np.array(x), None, np.zeros(4), np.ones(4)).weight)
    assert pybn.batch_norm_stats(x).count == 8
