"""Bad inputs: TypeError / ValueError naming the argument; never a crash,
never a silent broadcast, and running statistics untouched on any error."""


import numpy as np
import pytest

import pybn
from error_checks import assert_raises_naming, bad_outs

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


# ------------------------------------------------------------------- x dtype

@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.bool_,
                                   np.complex64, np.uint8])
def test_bad_x_dtype(dtype):
    x = np.ones((4, C, 5), dtype=dtype)
    dtname = np.dtype(dtype).name
    st = Stats()
    for fn, args, kw in [
        (pybn.batch_norm_train, (x,), st.kw()),
        (pybn.batch_norm_infer, (x, st.rm, st.rv), {}),
        (pybn.batch_norm_backward,
         (np.ones((4, C, 5), np.float32), x, st.rm, st.rv), {}),
    ]:
        msg = assert_raises_naming(TypeError, "x", fn, *args, **kw)
        assert dtname in msg, f"dtype {dtname} not named in {msg!r}"
        st.unchanged()


@pytest.mark.parametrize("dtype", [np.int64, np.float16])
def test_bad_dy_dtype(dtype):
    x, rm, rv = good()
    msg = assert_raises_naming(TypeError, "dy", pybn.batch_norm_backward,
                               x.astype(dtype), x, rm, rv)
    assert np.dtype(dtype).name in msg


def test_bad_weight_bias_dtype():
    x, rm, rv = good()
    st = Stats()
    w = np.ones(C, np.float16)
    msg = assert_raises_naming(TypeError, "weight", pybn.batch_norm_train, x, w,
                               **st.kw())
    assert "float16" in msg
    st.unchanged()
    assert_raises_naming(TypeError, "bias", pybn.batch_norm_train, x, None,
                         np.ones(C, np.complex128), **st.kw())
    st.unchanged()
    assert_raises_naming(TypeError, "weight", pybn.batch_norm_infer, x, rm, rv,
                         np.ones(C, np.float16))
    assert_raises_naming(TypeError, "weight", pybn.batch_norm_backward, x, x,
                         rm, rv, np.ones(C, np.float16))


# ------------------------------------------------------------------- x shape

@pytest.mark.parametrize("x", [np.ones(5, np.float32), np.float32(1.0),
                               np.ones(0, np.float32)], ids=["1d", "0d", "1d-empty"])
def test_x_needs_two_dims(x):
    st = Stats()
    assert_raises_naming(ValueError, "x", pybn.batch_norm_train, x, **st.kw())
    st.unchanged()
    assert_raises_naming(ValueError, "x", pybn.batch_norm_infer, x, st.rm, st.rv)
    # dy and x are both bad here; either may be reported first
    assert_raises_naming(ValueError, ("x", "dy"), pybn.batch_norm_backward, x,
                         x, st.rm, st.rv)
    good_dy = np.ones((4, C, 5), np.float32)
    assert_raises_naming(ValueError, "x", pybn.batch_norm_backward, good_dy,
                         x, st.rm, st.rv)


def test_numpy_integer_axis_is_fine():
    x, rm, rv = good(shape=(4, 5, C))
    for axis in (np.int64(-1), np.int32(2)):
        y, mean, _ = pybn.batch_norm_train(x, axis=axis)
        assert mean.shape == (C,)
        np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 1)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [3, -4, 10, -100])
def test_axis_out_of_range(axis):
    x, rm, rv = good()
    st = Stats()
    assert_raises_naming(ValueError, "axis", pybn.batch_norm_train, x,
                         axis=axis, **st.kw())
    st.unchanged()
    assert_raises_naming(ValueError, "axis", pybn.batch_norm_infer, x, rm, rv,
                         axis=axis)
    assert_raises_naming(ValueError, "axis", pybn.batch_norm_backward, x, x,
                         rm, rv, axis=axis)


def test_axis_not_an_integer():
    x, rm, rv = good()
    st = Stats()
    for bad in (1.0, "1", None):
        assert_raises_naming((TypeError, ValueError), "axis",
                             pybn.batch_norm_train, x, axis=bad, **st.kw())
        st.unchanged()
        assert_raises_naming((TypeError, ValueError), "axis",
                             pybn.batch_norm_infer, x, rm, rv, axis=bad)


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


def test_empty_channel_dimension_in_train():
    # zero positions per channel is also fewer than 2 values
    x = np.ones((0, C, 4), np.float32)
    st = Stats()
    with pytest.raises(ValueError):
        pybn.batch_norm_train(x, **st.kw())
    st.unchanged()


# ---------------------------------------------------------- weight and bias

@pytest.mark.parametrize("n", [C - 1, C + 1, 1, 0])
def test_weight_bias_wrong_length(n):
    x, rm, rv = good()
    st = Stats()
    bad = np.ones(n, np.float32)
    ok = np.ones(C, np.float32)
    assert_raises_naming(ValueError, "weight", pybn.batch_norm_train, x, bad,
                         ok, **st.kw())
    st.unchanged()
    assert_raises_naming(ValueError, "bias", pybn.batch_norm_train, x, ok, bad,
                         **st.kw())
    st.unchanged()
    assert_raises_naming(ValueError, "weight", pybn.batch_norm_infer, x, rm,
                         rv, bad, ok)
    assert_raises_naming(ValueError, "bias", pybn.batch_norm_infer, x, rm, rv,
                         ok, bad)
    assert_raises_naming(ValueError, "weight", pybn.batch_norm_backward, x, x,
                         rm, rv, bad)


def test_weight_wrong_ndim_is_not_broadcast():
    x, rm, rv = good()
    st = Stats()
    for bad in (np.ones((C, 1), np.float32), np.ones((1, C), np.float32),
                np.float32(2.0)):
        assert_raises_naming(ValueError, "weight", pybn.batch_norm_train, x,
                             bad, **st.kw())
        st.unchanged()
        assert_raises_naming(ValueError, "weight", pybn.batch_norm_infer, x,
                             rm, rv, bad)


# ------------------------------------------------------------ running stats

@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_list_is_rejected(which):
    """A Python list cannot be updated in place: error, not a silent copy."""
    x, _, _ = good()
    st = Stats()
    kw = st.kw(**{which: [0.0] * C})
    assert_raises_naming(TypeError, which, pybn.batch_norm_train, x, **kw)
    st.unchanged()


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


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (1,), (C, 1), (1, C), ()])
def test_running_stat_wrong_shape(which, shape):
    x, _, _ = good()
    st = Stats()
    kw = st.kw(**{which: np.zeros(shape, np.float32)})
    assert_raises_naming(ValueError, which, pybn.batch_norm_train, x, **kw)
    st.unchanged()


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_read_only(which):
    x, _, _ = good()
    st = Stats()
    ro = np.zeros(C, np.float32)
    ro.flags.writeable = False
    assert_raises_naming(ValueError, which, pybn.batch_norm_train, x,
                         **st.kw(**{which: ro}))
    st.unchanged()
    np.testing.assert_array_equal(ro, 0)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_non_contiguous(which):
    x, _, _ = good()
    st = Stats()
    base = np.zeros(2 * C, np.float32)
    view = base[::2]
    assert view.shape == (C,) and not view.flags.c_contiguous
    assert_raises_naming(ValueError, which, pybn.batch_norm_train, x,
                         **st.kw(**{which: view}))
    st.unchanged()
    np.testing.assert_array_equal(base, 0)


def test_infer_running_stats_wrong_length():
    x, rm, rv = good()
    assert_raises_naming(ValueError, "running_mean", pybn.batch_norm_infer, x,
                         np.zeros(C + 1, np.float32), rv)
    assert_raises_naming(ValueError, "running_var", pybn.batch_norm_infer, x,
                         rm, np.ones(C - 1, np.float32))


def test_running_stats_unchanged_when_a_later_argument_is_bad():
    """Validation happens before any update (here: the other stat, weight,
    out and the per-channel count are bad)."""
    x, _, _ = good()
    st = Stats()
    bad_rv = np.ones(C + 1, np.float32)
    with pytest.raises(ValueError):
        pybn.batch_norm_train(x, running_mean=st.rm, running_var=bad_rv)
    st.unchanged()
    np.testing.assert_array_equal(bad_rv, 1)
    with pytest.raises((TypeError, ValueError)):
        pybn.batch_norm_train(x, np.ones(C + 2, np.float32), **st.kw())
    st.unchanged()
    with pytest.raises((TypeError, ValueError)):
        pybn.batch_norm_train(x, **st.kw(), out=np.empty((4, C, 6), np.float32))
    st.unchanged()
    with pytest.raises((TypeError, ValueError)):
        pybn.batch_norm_train(x, **st.kw(), out=np.empty(x.shape, np.float64))
    st.unchanged()


# --------------------------------------------------------------------- out=

BAD_OUT_IDS = [k for k, _, _ in bad_outs((4, C, 5), np.float32)]


@pytest.mark.parametrize("which", range(len(BAD_OUT_IDS)), ids=BAD_OUT_IDS)
def test_bad_out(which):
    x, rm, rv = good()
    _, out, exc = bad_outs(x.shape, x.dtype)[which]
    st = Stats()
    snapshot = out.copy() if isinstance(out, np.ndarray) else None
    assert_raises_naming(exc, "out", pybn.batch_norm_train, x, **st.kw(),
                         out=out)
    st.unchanged()
    assert_raises_naming(exc, "out", pybn.batch_norm_infer, x, rm, rv, out=out)
    mean = np.zeros(C, np.float32)
    invstd = np.ones(C, np.float32)
    assert_raises_naming(exc, "out", pybn.batch_norm_backward, x, x, mean,
                         invstd, out=out)
    if snapshot is not None:
        # nothing was written into a rejected out
        np.testing.assert_array_equal(out, snapshot)


# ----------------------------------------------------------------- backward

def test_backward_y_wrong_shape():
    x, rm, rv = good()
    for y in (np.ones((4, C, 6), np.float32), np.ones((4, C), np.float32),
              np.ones(x.shape[::-1], np.float32)):
        assert_raises_naming(ValueError, "y", pybn.batch_norm_backward, x, x,
                             rm, rv, y=y)


def test_backward_y_wrong_dtype():
    x, rm, rv = good()
    assert_raises_naming(TypeError, "y", pybn.batch_norm_backward, x, x, rm,
                         rv, y=np.ones(x.shape, np.int32))


@pytest.mark.parametrize("n", [C - 1, C + 1, 1])
def test_backward_stats_wrong_length(n):
    x, rm, rv = good()
    bad = np.ones(n, np.float32)
    for training in (True, False):
        assert_raises_naming(ValueError, "mean", pybn.batch_norm_backward, x,
                             x, bad, rv, training=training)
        assert_raises_naming(ValueError, "invstd", pybn.batch_norm_backward, x,
                             x, rm, bad, training=training)


def test_backward_dy_shape_mismatch():
    x, rm, rv = good()
    for dy in (np.ones((4, C, 6), np.float32), np.ones((1, C, 5), np.float32),
               np.ones((C, 5), np.float32)):
        assert_raises_naming(ValueError, "dy", pybn.batch_norm_backward, dy, x,
                             rm, rv)


def test_out_partially_overlapping_an_input():
    """out may be exactly an input (in place) but not a shifted view of it."""
    buf = np.random.default_rng(1).standard_normal(4 * C * 5 + 5).astype(np.float32)
    x = buf[:-5].reshape(4, C, 5)
    out = buf[5:].reshape(4, C, 5)
    assert np.may_share_memory(x, out)
    st = Stats()
    before = buf.copy()
    assert_raises_naming(ValueError, "out", pybn.batch_norm_train, x,
                         **st.kw(), out=out)
    st.unchanged()
    assert_raises_naming(ValueError, "out", pybn.batch_norm_infer, x, st.rm,
                         st.rv, out=out)
    assert_raises_naming(ValueError, "out", pybn.batch_norm_backward, x, x,
                         st.rm, st.rv, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("momentum", [None, "0.1", [0.1], float("nan")],
                         ids=["none", "str", "list", "nan"])
def test_bad_momentum(momentum):
    x, _, _ = good()
    st = Stats()
    assert_raises_naming((TypeError, ValueError), "momentum",
                         pybn.batch_norm_train, x, **st.kw(), momentum=momentum)
    st.unchanged()


@pytest.mark.parametrize("eps", [None, "1e-5", float("nan")],
                         ids=["none", "str", "nan"])
def test_bad_eps(eps):
    x, rm, rv = good()
    st = Stats()
    assert_raises_naming((TypeError, ValueError), "eps",
                         pybn.batch_norm_train, x, **st.kw(), eps=eps)
    st.unchanged()
    assert_raises_naming((TypeError, ValueError), "eps",
                         pybn.batch_norm_infer, x, rm, rv, eps=eps)


def test_infer_requires_running_stats():
    x, rm, rv = good()
    assert_raises_naming((TypeError, ValueError), "running_mean",
                         pybn.batch_norm_infer, x, None, rv)
    assert_raises_naming((TypeError, ValueError), "running_var",
                         pybn.batch_norm_infer, x, rm, None)


def test_train_running_stats_given_alone():
    """Only one of running_mean / running_var: an error, never a silent
    half-update."""
    x, _, _ = good()
    st = Stats()
    with pytest.raises((TypeError, ValueError)):
        pybn.batch_norm_train(x, running_mean=st.rm)
    with pytest.raises((TypeError, ValueError)):
        pybn.batch_norm_train(x, running_var=st.rv)
    st.unchanged()
