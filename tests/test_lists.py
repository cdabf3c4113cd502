"""The lists the compiled module is built from (csrc/include/pybn/kernel_list.h, the ISA list
of CMakeLists.txt) and what derives from them: the bindings, the diagnostics table, the
stub, the thresholds the kernels own, and the test-only instantiation with float32 storage
computing in double."""

import inspect
import os
import pathlib
import re
from fractions import Fraction

import numpy as np
import pytest

import pybn
import pybn._checks
import reference_dropout as rd
import stubgen
from pybn import _C
from test_philox import KATS_ALL

# the module's functions that are not kernel entries
RUNTIME = {"isa", "supported_isas", "use_isa", "get_num_threads", "set_num_threads", "cache_sizes",
           "advise_huge_pages", "stream_min_bytes"}
# batch_norm_*'s common calls taken whole (csrc/bindings/plain_calls.h): not entries either,
# each ends in the binding of the entry its name starts with
PLAIN_CALLS = {"bn_infer_plain", "bn_train_plain", "bn_backward_plain"}


def functions(module):
    return {name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name))}


def test_stub_is_generated_from_the_module():
    """src/pybn/_C.pyi is what tests/stubgen.py writes from the built module: a binding
    added, renamed or changed without `python tests/stubgen.py` fails here."""
    committed = pathlib.Path(stubgen.STUB).read_text()
    assert committed == stubgen.render(), "src/pybn/_C.pyi is out of date: run python tests/stubgen.py"


# The scripts that call every public array function, each listing its calls by hand (the
# leak check under valgrind, concurrent calls, memory growth, tails, memory limits), and
# the public names that compute on no array (runtime, result types, counters, scalars)
HAND_LISTS = ("leak_script.py", "test_concurrency.py", "test_memory.py", "test_tails.py", "memory_limit_child.py")
NO_ARRAY_KERNEL = {"__version__", "isa", "supported_isas", "get_num_threads", "set_num_threads",
                   "keep_freed_memory", "BatchNormTrainResult", "BatchNormGrads", "BatchNormResidualGrads",
                   "BatchNormStats", "BatchNormGradSums", "FoldedWeights", "dropout_scale", "counters_used",
                   "normal_counters_used", "recalibrate"}


@pytest.mark.parametrize("script", HAND_LISTS)
def test_every_public_array_function_is_called_in_each_hand_kept_script(script):
    text = (pathlib.Path(__file__).parent / script).read_text()
    missing = [name for name in pybn.__all__
               if name not in NO_ARRAY_KERNEL and not re.search(rf"\b{name}\(", text)]
    assert not missing, f"{script} does not call {missing} (docs/architecture.md, adding a kernel entry)"


def test_each_kernel_entry_has_one_binding_and_each_binding_an_entry():
    assert len(set(_C.KERNELS)) == len(_C.KERNELS)
    assert functions(_C) - RUNTIME - PLAIN_CALLS == set(_C.KERNELS)
    assert {name.removesuffix("_plain") for name in PLAIN_CALLS} <= set(_C.KERNELS)
    assert set(_C.diagnostics.KERNELS) <= functions(_C.diagnostics)


def test_diagnostics_are_not_in_the_kernel_table():
    assert {"philox", "probe_read", "probe_stream"} <= set(_C.diagnostics.KERNELS)
    assert not set(_C.diagnostics.KERNELS) & functions(_C)


def test_the_typed_kernels_are_in_the_float_computing_in_double_table():
    typed = functions(_C.diagnostics.float_computing_in_double)
    assert typed and typed <= set(_C.KERNELS)
    assert {"bn_train", "dropout", "fold_scale"} <= typed


def test_dtypes_are_the_lists():
    assert pybn._checks.DTYPE_NAMES == tuple(_C.DTYPES)  # (ml_dtypes installed here)
    assert all(pybn._checks.is_float_dtype(pybn._checks.float_dtype(name)) for name in _C.DTYPES)
    assert {"float32", "float64"} <= set(_C.DTYPES)


def test_isas_lowest_first_with_their_cpu_features():
    assert next(iter(_C.ISAS)) == "scalar" and _C.ISAS["scalar"] == ()
    assert pybn.supported_isas() == [name for name in _C.ISAS if name in pybn.supported_isas()]


def test_python_allocates_aligned_where_the_kernel_streams():
    """The size from which outputs are allocated aligned is the least streaming threshold
    of the kernels, and the alignment the kernel's, not numbers of the Python layer. The
    threshold itself is a quarter of the L3 where that is more, and the L3 counted is at
    most 32 MiB (a server's reading is its socket's; PYBN_L3_BYTES may set more), so the
    threshold is 4 to 8 MiB."""
    assert pybn._checks.ALIGNED_MIN_BYTES == _C.STREAM_MIN_BYTES == 4 << 20
    assert _C.cache_sizes()[1] <= 32 << 20 or "PYBN_L3_BYTES" in os.environ
    assert _C.stream_min_bytes() == max(_C.STREAM_MIN_BYTES, _C.cache_sizes()[1] // 4)
    assert pybn._checks.ALIGNMENT == _C.ALIGNMENT == 64
    n = _C.STREAM_MIN_BYTES // 4
    y = pybn.dropout(np.ones(n, np.float32), 0.5, seed=1)
    assert y.ctypes.data % _C.ALIGNMENT == 0


def test_philox_diagnostic_matches_random123_on_every_path(isa):
    """The vector Philox4x32-10 of the active path against Random123's known answers and
    the NumPy reference, many counters at once (every lane and a partial last vector)."""
    for ctr, key, want in KATS_ALL:
        got = _C.diagnostics.philox(np.array([ctr], np.uint32), key[0] | key[1] << 32)
        assert [hex(v) for v in got[0]] == [hex(v) for v in want]
    rng = np.random.default_rng(5)
    counters = rng.integers(0, 2**32, size=(37, 4), dtype=np.uint32)
    key = 0x0123456789ABCDEF
    want = rd.philox4x32_10(counters, np.array([key & 0xFFFFFFFF, key >> 32], np.uint32))
    np.testing.assert_array_equal(_C.diagnostics.philox(counters, key), want)


# ------------------------------------------------------------------ storage and compute types

WIDE = _C.diagnostics.float_computing_in_double


def reference_bn(x, mean, var_or_invstd, weight, bias, eps=None):
    """Inference batch norm over axis 1 in float64."""
    shape = (1, -1, 1)
    invstd = 1 / np.sqrt(var_or_invstd + eps) if eps is not None else var_or_invstd
    return ((x - mean.reshape(shape)) * (invstd * weight).reshape(shape) + bias.reshape(shape))


def close_to_float32_rounding(got, want64):
    """got (float32) is want64 rounded to float32, up to the rounding of want64's own
    float64 arithmetic."""
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.astype(np.float64), want64, rtol=2**-23, atol=1e-30)


def test_float32_storage_computing_in_double_normalizes(isa):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 37)).astype(np.float32) * 100 + 7
    mean = rng.standard_normal(5).astype(np.float32)
    var = rng.random(5).astype(np.float32) + 0.5
    w, b = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    y = np.empty_like(x)
    WIDE.bn_infer(x, y, mean, var, w, b, 3, 5, 37, 1e-5, False)
    x64 = x.astype(np.float64)
    want = reference_bn(x64, mean.astype(np.float64), var.astype(np.float64), w.astype(np.float64),
                        b.astype(np.float64), eps=1e-5)
    close_to_float32_rounding(y, want)


def test_float32_storage_computing_in_double_keeps_the_moments_of_float32_input(isa):
    """bn_moments of float32 storage read as double vectors: the mean and M2 of the float32
    values, exactly as a float64 sum gives them."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 3, 129)) * 1e3 + 1e4).astype(np.float32)
    mean, m2 = np.empty(3), np.empty(3)
    WIDE.bn_moments(x, mean, m2, 4, 3, 129)
    x64 = x.astype(np.float64).transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(mean, x64.mean(axis=1), rtol=1e-15)
    np.testing.assert_allclose(m2, ((x64 - x64.mean(axis=1, keepdims=True)) ** 2).sum(axis=1), rtol=1e-12)


def test_float32_storage_computing_in_double_trains(isa):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 33)).astype(np.float32)
    y = np.empty_like(x)
    save_mean, save_invstd = np.empty(4, np.float32), np.empty(4, np.float32)
    WIDE.bn_train(x, y, None, None, None, None, save_mean, save_invstd, 6, 4, 33, 0.1, 1e-5, False)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    invstd = 1 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    close_to_float32_rounding(save_mean, mean)
    np.testing.assert_allclose(y, reference_bn(x64, mean, invstd, np.ones(4), np.zeros(4)), rtol=1e-6, atol=1e-6)


def test_float32_storage_computing_in_double_drops_as_float32_does(isa):
    """The same mask as the float32 kernel (the mask stream does not depend on the types),
    kept values x * scale rounded once from double."""
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    y, y32 = np.empty_like(x), np.empty_like(x)
    scale = 1 / 0.7
    WIDE.dropout(x, y, 11, 0, int(0.3 * 65536), scale)
    _C.dropout(x, y32, 11, 0, int(0.3 * 65536), scale)
    np.testing.assert_array_equal(y == 0, y32 == 0)
    kept = y32 != 0
    np.testing.assert_array_equal(y[kept], (x[kept].astype(np.float64) * scale).astype(np.float32))


def test_float32_storage_computing_in_double_folds(isa):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 3, 5)).astype(np.float32)
    scale = rng.standard_normal(3)
    out = np.empty_like(w)
    WIDE.fold_scale(w, scale, out, 1, 2, 3, 5)
    want = (w.astype(np.float64) * scale.reshape(1, 3, 1)).astype(np.float32)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_storage_computing_in_double_backward(isa, threads):
    rng = np.random.default_rng(6)
    dy, x = rng.standard_normal((2, 2, 3, 300)).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2))
    invstd = 1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)
    dx, dw, db = np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32)
    prev = pybn.get_num_threads()
    pybn.set_num_threads(threads)
    try:
        WIDE.bn_backward(dy, x, None, mean.astype(np.float32), invstd.astype(np.float32), None, dx, dw, db, 2, 3, 300,
                         True)
    finally:
        pybn.set_num_threads(prev)
    shape = (1, -1, 1)
    xhat = (x.astype(np.float64) - mean.reshape(shape)) * invstd.reshape(shape)
    g = dy.astype(np.float64)
    np.testing.assert_allclose(db, g.sum(axis=(0, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, (g * xhat).sum(axis=(0, 2)), rtol=1e-5, atol=1e-4)
    want = invstd.reshape(shape) * (g - g.mean(axis=(0, 2)).reshape(shape)
                                    - xhat * (g * xhat).mean(axis=(0, 2)).reshape(shape))
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ one merge, one running-statistics update

def running_update(running, batch, momentum):
    """momentum * batch + (1 - momentum) * running with one rounding of the sum (a fused
    multiply-add), (1 - momentum) * running rounded first: exact rational arithmetic."""
    part = [float((1 - momentum) * float(r)) for r in running]
    return np.array([float(Fraction(momentum) * Fraction(float(b)) + Fraction(p)) for b, p in zip(batch, part)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_stats_update_is_pytorchs_in_double_rounded_once(isa, dtype):
    """The update bn_train makes, as its own entry (SyncBatchNorm calls it after the merge):
    (1 - momentum) * running + momentum * batch, the variance unbiased, in double with the
    same roundings on every path, then rounded once to the dtype."""
    rng = np.random.default_rng(7)
    rm, rv = rng.standard_normal(64).astype(dtype), rng.random(64).astype(dtype)
    mean, m2, count, momentum = rng.standard_normal(64), rng.random(64) * 50, 37.0, 0.3
    want_m = running_update(rm, mean, momentum).astype(dtype)
    want_v = running_update(rv, m2 / (count - 1), momentum).astype(dtype)
    only_var = rv.copy()
    _C.bn_update_running_stats(rm, rv, mean, m2, count, momentum)
    np.testing.assert_array_equal(rm, want_m)
    np.testing.assert_array_equal(rv, want_v)
    _C.bn_update_running_stats(None, only_var, mean, m2, count, momentum)
    np.testing.assert_array_equal(only_var, want_v)
    with pytest.raises(ValueError, match="^count: "):
        _C.bn_update_running_stats(rm, rv, mean, m2, 1.0, momentum)


def test_bn_train_running_stats_equal_the_update_entry():
    """bn_train's running statistics are those of bn_update_running_stats applied to the
    batch's moments (one formula, used by both)."""
    x = np.random.default_rng(8).standard_normal((5, 3, 41)).astype(np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    pybn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.2)
    stats = pybn.batch_norm_stats(x)
    rm2, rv2 = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    _C.bn_update_running_stats(rm2, rv2, stats.mean, stats.m2, float(stats.count), 0.2)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)


def test_merge_of_workers_is_the_float64_moments_of_the_union():
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal((n, 4)) * 3 + 5 for n in (3, 0, 10, 1)]
    count = np.array([[len(p)] * 4 for p in parts], np.float64)
    mean = np.array([p.mean(axis=0) if len(p) else np.zeros(4) for p in parts])
    m2 = np.array([((p - p.mean(axis=0)) ** 2).sum(axis=0) if len(p) else np.zeros(4) for p in parts])
    merged_mean, merged_m2 = np.empty(4), np.empty(4)
    _C.bn_merge_stats(count, mean, m2, merged_mean, merged_m2)
    union = np.concatenate(parts)
    np.testing.assert_allclose(merged_mean, union.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged_m2, ((union - union.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-13)


def test_every_function_with_out_has_the_overlap_and_16bit_rows():
    """A public function taking ``out=`` is in test_errors' OUT_CALLS (an out overlapping an
    input given as another array-like) and has a float16 row in the input matrix."""
    import test_errors
    import test_input_matrix

    half = {spec.name.split("[")[0] for spec in test_input_matrix.HALF_SPECS}
    takes_out = [name for name in pybn.__all__ if inspect.isfunction(getattr(pybn, name))
                 and "out" in inspect.signature(getattr(pybn, name)).parameters]
    assert len(takes_out) >= 14
    assert [n for n in takes_out if n not in test_errors.OUT_CALLS] == []
    assert [n for n in takes_out if n not in half] == []
