"""ISA dispatch, threads and the command line."""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import time

import numpy as np
import pytest

import pybn
import pybn._runtime

ALL_ISAS = ["scalar", "avx2", "avx512"]


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
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
    assert pybn.__version__ == importlib.metadata.version("pybn")


def test_supported_isas():
    isas = pybn.supported_isas()
    assert isinstance(isas, list) and isas
    assert isas[0] == "scalar"
    assert all(i in ALL_ISAS for i in isas)
    # lowest first, no duplicates
    assert isas == sorted(set(isas), key=ALL_ISAS.index)
    assert pybn.isa() in isas


def test_supported_isas_match_cpu():
    flags = cpu_flags()
    if flags is None:  # pragma: no cover
        pytest.skip("no /proc/cpuinfo")
    isas = pybn.supported_isas()
    assert ("avx2" in isas) == ({"avx2", "fma"} <= flags)
    if "avx512" in isas:
        assert "avx512f" in flags
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert "avx512" in isas


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
    with pytest.raises(RuntimeError):
        with pybn._runtime.use_isa(isas[0]):
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


def test_pybn_isa_env_bogus_is_an_error(tmp_path):
    r = run_python(["-c", "import pybn"], tmp_path, PYBN_ISA="bogus")
    assert r.returncode == 1  # a Python exception, not a crash
    assert "PYBN_ISA" in r.stderr


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
    with pytest.raises(ValueError):
        with pybn._runtime.use_isa("bogus"):
            pass  # pragma: no cover
    assert pybn.isa() == before


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_rejects_non_positive(n):
    prev = pybn.get_num_threads()
    with pytest.raises(ValueError):
        pybn.set_num_threads(n)
    assert pybn.get_num_threads() == prev


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


@pytest.mark.parametrize("n", [1, 2])
def test_omp_num_threads_honoured(n, tmp_path):
    r = run_python(["-c", "import pybn; print(pybn.get_num_threads())"],
                   tmp_path, OMP_NUM_THREADS=str(n))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == n


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
    """`python -m pybn info` also works from the repository root, where the
    source package comes first on sys.path."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "pybn" / "__init__.py").is_file():  # pragma: no cover
        pytest.skip("not running from a source checkout")
    r = run_python(["-m", "pybn", "info"], root, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert pybn.__version__ in r.stdout


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
    proc = subprocess.run([sys.executable, "-m", "pybn", "bench", "--quick", "--shapes", "T",
                           "--peers", "numpy", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    cells = data["cells"]
    assert {c["kernel"] for c in cells} == {"infer", "train", "backward"}
    assert all(c["pybn_s"] > 0 and not c["errors"] for c in cells)
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


def test_import_leaves_the_openmp_environment_as_it_was():
    # pybn shortens GNU OpenMP's idle spinning only while its own runtime loads: the
    # environment seen by later imports (torch's OpenMP) and by child processes is the user's.
    code = "import os, pybn; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "active"]
