"""threadpoolctl sees pybn's thread pool and limits it (pybn/_threadpoolctl.py).

Each scenario runs in a fresh interpreter: registration depends on what was imported
first, and a limit left behind by a failing check must not leak into other tests.
"""
import os

import pytest

import pybn
from child_process import run_child

threadpoolctl = pytest.importorskip("threadpoolctl", reason="needs threadpoolctl (pip install threadpoolctl)")


def run_ok(code, env=None):
    out = run_child(code, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    return out


def test_threadpool_info_lists_pybn_with_its_thread_count():
    run_ok("""
        import os
        import pybn
        from threadpoolctl import threadpool_info
        pybn.set_num_threads(3)
        [lib] = [lib for lib in threadpool_info() if lib["internal_api"] == "pybn"]
        assert lib["user_api"] == "pybn" and lib["num_threads"] == 3, lib
        assert lib["filepath"] == os.path.realpath(pybn._C.__file__), lib
        assert lib["version"] == pybn.__version__, lib
        pybn.set_num_threads(2)
        [lib] = [lib for lib in threadpool_info() if lib["internal_api"] == "pybn"]
        assert lib["num_threads"] == 2, lib
        print("ok")
    """)


@pytest.mark.parametrize("order", ["pybn first", "threadpoolctl first"])
def test_registered_whichever_is_imported_first(order):
    first, second = ("pybn", "threadpoolctl") if order == "pybn first" else ("threadpoolctl", "pybn")
    run_ok(f"""
        import sys
        import {first}
        import {second}
        import pybn, threadpoolctl
        names = [lib["internal_api"] for lib in threadpoolctl.threadpool_info()]
        assert names.count("pybn") == 1, names
        print("ok")
    """)


def test_import_pybn_does_not_import_threadpoolctl():
    run_ok("""
        import sys
        import pybn
        assert "threadpoolctl" not in sys.modules
        print("ok")
    """)


def test_threadpool_limits_limits_pybns_kernels_and_restores():
    run_ok("""
        import numpy as np
        import pybn
        from threadpoolctl import threadpool_limits

        def slices_off_caller():
            # how many of parallel_for's 8 slices ran on another thread than the caller
            rows = np.full((8, 4), -1, np.int64)
            pybn._C.diagnostics.trace_parallel_for(8, 8 << 15, rows, slice_ms=20)
            return int((rows[:, 2] == 0).sum())

        pybn.set_num_threads(4)
        assert slices_off_caller() > 0          # the pool is used at 4 threads
        with threadpool_limits(1):
            assert pybn.get_num_threads() == 1
            assert slices_off_caller() == 0     # everything on the calling thread
            x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
            y = pybn.batch_norm_infer(x, np.zeros(16), np.ones(16), eps=0.0)
            assert np.array_equal(y, x)         # the kernels run under the limit
        assert pybn.get_num_threads() == 4      # restored
        with threadpool_limits(limits=2, user_api="pybn"):
            assert pybn.get_num_threads() == 2
        with threadpool_limits(limits=1, user_api="blas"):
            assert pybn.get_num_threads() == 4  # another API's limit leaves pybn alone
        assert pybn.get_num_threads() == 4
        print("ok")
    """)


def test_a_limit_outside_pybns_range_is_clamped():
    run_ok("""
        import pybn
        from threadpoolctl import threadpool_limits
        pybn.set_num_threads(2)
        with threadpool_limits(10_000):
            assert pybn.get_num_threads() == pybn._runtime.MAX_THREADS
        with threadpool_limits(limits={"pybn": 0}):
            assert pybn.get_num_threads() == 1
        assert pybn.get_num_threads() == 2
        print("ok")
    """)


def test_omp_num_threads_still_sets_the_default():
    run_ok("""
        import pybn
        from threadpoolctl import threadpool_info
        [lib] = [lib for lib in threadpool_info() if lib["internal_api"] == "pybn"]
        assert lib["num_threads"] == pybn.get_num_threads() == 3, lib
        print("ok")
    """, env={"OMP_NUM_THREADS": "3"})


def test_other_extension_modules_named_C_are_not_taken_for_pybn():
    pytest.importorskip("torch", reason="needs torch, whose extension module is also torch/_C*.so")
    run_ok("""
        import os
        import torch, pybn
        from threadpoolctl import threadpool_info
        libs = [lib for lib in threadpool_info() if lib["internal_api"] == "pybn"]
        assert [lib["filepath"] for lib in libs] == [os.path.realpath(pybn._C.__file__)], libs
        assert os.path.basename(torch._C.__file__).lower().startswith("_c.")  # the case this guards
        print("ok")
    """)


def test_an_old_threadpoolctl_is_left_alone():
    """Before 3.3 threadpoolctl matched controllers by file name only: pybn does not register."""
    from pybn import _threadpoolctl

    calls = []

    class Old:
        __version__ = "3.2.0"
        register = staticmethod(calls.append)

    assert _threadpoolctl.register(Old) is False
    assert calls == []


def test_the_c_entry_points_refuse_counts_out_of_range():
    import ctypes

    lib = ctypes.CDLL(pybn._C.__file__, mode=os.RTLD_NOLOAD)
    before = pybn.get_num_threads()
    try:
        assert lib.pybn_set_num_threads(0) == -1
        assert lib.pybn_set_num_threads(pybn._runtime.MAX_THREADS + 1) == -1
        assert lib.pybn_get_num_threads() == before
        assert lib.pybn_set_num_threads(1) == 0
        assert pybn.get_num_threads() == lib.pybn_get_num_threads() == 1
    finally:
        pybn.set_num_threads(before)


def test_the_import_hook_is_gone_once_it_has_fired():
    run_ok("""
        import sys
        import pybn
        from pybn._threadpoolctl import RegisterOnImport
        assert sum(isinstance(f, RegisterOnImport) for f in sys.meta_path) == 1
        import threadpoolctl
        assert not any(isinstance(f, RegisterOnImport) for f in sys.meta_path)
        print("ok")
    """)

