"""Bad inputs the input matrix (test_input_matrix.py) does not cover: running statistics of
another float dtype, mean/invstd of the wrong length in both backward modes, the shapes
training rejects but inference accepts, flags that are not bools, entry points whose
optional dependency is missing, and overlaps through inputs given as other array-likes
(tensors, memoryviews) or through the residual; plus NumPy integer axes (accepted)."""


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
        ("fold transposed", lambda v: pybn.fold_conv_bn(np.ones((C, C, 3, 3), np.float32), None, rm, rv,
                                                        transposed=v), "transposed"),
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


# --------------------------------------------------------------------------- overlaps through other array-likes

SHAPE = (2, C, 4, 4)
ONES, ZEROS = np.ones(C, np.float32), np.zeros(C, np.float32)
MASK = pybn.dropout_mask(SHAPE, 0.5, seed=1)

# name -> call(lead, other, out): `lead` is the input given as an array-like other than an
# ndarray, `other` an ndarray of the same shape for the calls that read two
OUT_CALLS = {
    "batch_norm_train": lambda a, o, out: pybn.batch_norm_train(a, out=out),
    "batch_norm_infer": lambda a, o, out: pybn.batch_norm_infer(a, ZEROS, ONES, out=out),
    "batch_norm_apply": lambda a, o, out: pybn.batch_norm_apply(a, ZEROS, ONES, out=out),
    "batch_norm_backward": lambda a, o, out: pybn.batch_norm_backward(a, o, ZEROS, ONES, out=out),
    "batch_norm_backward_apply": lambda a, o, out: pybn.batch_norm_backward_apply(a, o, ZEROS, ONES, ZEROS, ZEROS,
                                                                                  32, out=out),
    "dropout": lambda a, o, out: pybn.dropout(a, 0.5, seed=1, out=out),
    "dropout_apply": lambda a, o, out: pybn.dropout_apply(a, MASK, 0.5, out=out),
    "relu_dropout_backward": lambda a, o, out: pybn.relu_dropout_backward(a, o, 0.5, out=out),
    "alpha_dropout": lambda a, o, out: pybn.alpha_dropout(a, 0.5, seed=1, out=out),
    "alpha_dropout_backward": lambda a, o, out: pybn.alpha_dropout_backward(a, 0.5, seed=1, out=out),
    "gaussian_noise": lambda a, o, out: pybn.gaussian_noise(a, 0.5, seed=1, out=out),
    "gaussian_dropout": lambda a, o, out: pybn.gaussian_dropout(a, 0.5, seed=1, out=out),
    "drop_path": lambda a, o, out: pybn.drop_path(a, 0.5, seed=1, out=out),
    "drop_block": lambda a, o, out: pybn.drop_block(a, 0.5, block_size=3, seed=1, out=out),
}


def _torch_view(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(a)


@pytest.mark.parametrize("given", [memoryview, _torch_view], ids=["memoryview", "torch"])
@pytest.mark.parametrize("name", sorted(OUT_CALLS))
def test_out_overlapping_an_input_given_as_another_array_like_is_refused(name, given):
    """The overlap check looked only at inputs given as ndarrays: a tensor or memoryview over
    the same memory as a shifted `out` gave a wrong result silently."""
    n = int(np.prod(SHAPE))
    buf = np.random.default_rng(0).standard_normal(n + 5).astype(np.float32)
    lead = buf[:n].reshape(SHAPE)
    other = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    before = buf.copy()
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        OUT_CALLS[name](given(lead), other, buf[5:].reshape(SHAPE))
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_statistic_sharing_memory_with_the_residual_is_refused(which):
    """The kernel updates the running statistics before it adds the residual: one inside the
    residual changed the residual it then read."""
    x, rm, rv = good()
    residual = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    stats = {"running_mean": rm, "running_var": rv}
    stats[which] = residual.reshape(-1)[:C]
    before = residual.copy()
    with pytest.raises(ValueError, match=rf"^{which}: shares memory with residual "):
        pybn.batch_norm_train(x, residual=residual, **stats)
    np.testing.assert_array_equal(residual, before)


def test_misaligned_and_overlap_messages_suggest_what_can_be_done():
    """A misaligned running_mean was told to pass np.array(out); an out overlapping a
    per-channel array was told out=running_mean is allowed (their shapes differ)."""
    x = np.ones((6, 3), np.float32)
    rm = np.frombuffer(bytearray(13), np.float32, offset=1)
    with pytest.raises(ValueError, match=r"^running_mean: .*np\.array\(running_mean\)"):
        pybn.batch_norm_train(x, running_mean=rm, running_var=np.ones(3, np.float32))
    buf = np.zeros(x.size + 3, np.float32)
    with pytest.raises(ValueError, match=r"^out: overlaps running_mean .*of another shape") as e:
        pybn.batch_norm_train(x, running_mean=buf[x.size - 1:x.size + 2], running_var=np.ones(3, np.float32),
                              out=buf[:x.size].reshape(x.shape))
    assert "out=running_mean" not in str(e.value)
