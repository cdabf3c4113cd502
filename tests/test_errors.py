"""Bad inputs the input matrix (test_input_matrix.py) does not cover: running statistics of
another float dtype, mean/invstd of the wrong length in both backward modes, and the
shapes training rejects but inference accepts; plus NumPy integer axes (accepted)."""


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


