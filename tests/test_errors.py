"""Bad inputs the input matrix (test_input_matrix.py) does not cover: running statistics of
another float dtype, mean/invstd of the wrong length in both backward modes, the shapes
training rejects but inference accepts, flags that are not bools, and entry points whose
optional dependency is missing; plus NumPy integer axes (accepted)."""


import subprocess
import sys

import numpy as np
import pytest

import pybn
from error_checks import assert_raises_naming

C = 3


def good(dtype=np.float32, shape=(4, C, 5)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    return x, rm, rv


class Stats:
    """Running stats plus a snapshot, to check they are left unchanged."""

    def __init__(self, dtype=np.float32):
        _, self.rm, self.rv = good(dtype)
        self.rm0, self.rv0 = self.rm.copy(), self.rv.copy()

    def kw(self, **over):
        d = dict(running_mean=self.rm, running_var=self.rv)
        d.update(over)
        return d

    def unchanged(self):
        np.testing.assert_array_equal(self.rm, self.rm0)
        np.testing.assert_array_equal(self.rv, self.rv0)


def test_numpy_integer_axis_is_fine():
    x, rm, rv = good(shape=(4, 5, C))
    for axis in (np.int64(-1), np.int32(2)):
        y, mean, _ = pybn.batch_norm_train(x, axis=axis)
        assert mean.shape == (C,)
        np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 1)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((1, C), 1), ((1, C, 1, 1), 1),
                                        ((1, 1, C), -1), ((C, 1), 0)])
def test_train_needs_two_values_per_channel(shape, axis):
    x = np.ones(shape, np.float32)
    st = Stats()
    with pytest.raises(ValueError):
        pybn.batch_norm_train(x, axis=axis, **st.kw())
    st.unchanged()
    with pytest.raises(ValueError):
        pybn.batch_norm_train(x, axis=axis)
    # inference on the same shape is fine
    y = pybn.batch_norm_infer(x, st.rm, st.rv, axis=axis)
    assert y.shape == shape


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("xdt,sdt", [(np.float32, np.float64),
                                     (np.float64, np.float32),
                                     (np.float32, np.float16),
                                     (np.float32, np.int64)])
def test_running_stat_wrong_dtype(which, xdt, sdt):
    x, _, _ = good(xdt)
    st = Stats(xdt)
    kw = st.kw(**{which: np.zeros(C, sdt)})
    assert_raises_naming(TypeError, which, pybn.batch_norm_train, x, **kw)
    st.unchanged()


@pytest.mark.parametrize("n", [C - 1, C + 1, 1])
def test_backward_stats_wrong_length(n):
    x, rm, rv = good()
    bad = np.ones(n, np.float32)
    for training in (True, False):
        assert_raises_naming(ValueError, "mean", pybn.batch_norm_backward, x,
                             x, bad, rv, training=training)
        assert_raises_naming(ValueError, "invstd", pybn.batch_norm_backward, x,
                             x, rm, bad, training=training)




def _flag_calls():
    """(id, call taking one flag value, the flag's name) for every batch-norm flag."""
    from pybn import nn
    x, rm, rv = good()
    r = pybn.batch_norm_train(x)
    dy = np.ones_like(x)
    return [
        ("train relu", lambda v: pybn.batch_norm_train(x, relu=v), "relu"),
        ("infer relu", lambda v: pybn.batch_norm_infer(x, rm, rv, relu=v), "relu"),
        ("apply relu", lambda v: pybn.batch_norm_apply(x, r.mean, r.invstd, relu=v), "relu"),
        ("backward training", lambda v: pybn.batch_norm_backward(dy, x, r.mean, r.invstd, training=v), "training"),
        ("layer affine", lambda v: nn.BatchNorm(C, affine=v), "affine"),
        ("layer track_running_stats", lambda v: nn.BatchNorm(C, track_running_stats=v), "track_running_stats"),
        ("layer relu", lambda v: nn.BatchNorm(C)(x, relu=v), "relu"),
        ("layer train", lambda v: nn.BatchNorm(C).train(v), "mode"),
        ("DropBlock2d scale_by_keep", lambda v: nn.DropBlock2d(0.1, 3, seed=0, scale_by_keep=v), "scale_by_keep"),
    ]


@pytest.mark.parametrize("value", [None, "False", 0, [0], np.array([True])], ids=repr)
@pytest.mark.parametrize("case", _flag_calls(), ids=lambda c: c[0])
def test_flags_must_be_bools(case, value):
    """A merely truthy value is refused (None means False and "False" True when coerced),
    as dropout's flags are; NumPy's bools are fine."""
    _, call, name = case
    assert_raises_naming(TypeError, name, call, value)
    call(np.True_)
    call(False)


@pytest.mark.parametrize("missing, code, message", [
    ("ml_dtypes", "import pybn.nn; pybn.nn.BatchNorm(3, dtype='bfloat16')",
     "TypeError: dtype: bfloat16 needs ml_dtypes (pip install ml_dtypes)"),
    ("torch", "import pybn.nn; pybn.nn.BatchNorm.from_torch(object())",
     "ImportError: BatchNorm.from_torch needs torch (pip install 'pybn-kernels[torch]')"),
    ("onnx", "import sys; from pybn._fold_cli import main; sys.exit(main(['in.onnx', 'out.onnx']))",
     "pybn fold: error: pybn.onnx needs the onnx package: pip install 'pybn-kernels[onnx]'"),
], ids=["ml_dtypes", "torch", "onnx"])
def test_a_missing_optional_dependency_is_named(missing, code, message):
    """Without an extra, what needs it says what to install (not a bare ModuleNotFoundError)."""
    prelude = f"import sys; sys.modules[{missing!r}] = None  # as if it were not installed\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
