"""batch_norm_infer's one-call path (the binding bn_infer_plain, docs/architecture.md "How a
call flows"): the common call gives the bits of the checked path on every ISA and thread
count, and every other form of an argument is declined (None), so that the Python checks,
not the binding, convert or reject it."""
import numpy as np
import pytest

import pybn
from pybn import _C
from reference import assert_bits_equal
import reference as ref

C = 5


def _common(rng, shape=(3, C, 4), dtype=np.float32, axis=1):
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, eps=1e-5, axis=axis, relu=False)


def _plain(args):
    return _C.bn_infer_plain(args["x"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
                             args["eps"], args["axis"], args["relu"])


CASES = [((3, C, 4), 1), ((3, C, 4), -1), ((3, C, 4), 0), ((1, 64, 8, 8), 1), ((2, 3, 4, 5, 6), 3),
         ((7, 1), 1), ((9, 17), -1), ((4, 64, 32, 32), 1), ((4, 32, 32, 64), -1)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", CASES)
def test_common_call_gives_the_checked_paths_bits(shape, axis, dtype, affine, relu, isa, threads, rng):
    args = _common(rng, shape, dtype, axis)
    args["relu"] = relu
    if not affine:
        args["weight"] = args["bias"] = None
    x = args["x"]
    y = _plain(args)
    assert y is not None, "the common call was declined"
    assert type(y) is np.ndarray and y.dtype == dtype and y.shape == x.shape and y.flags.c_contiguous
    public = pybn.batch_norm_infer(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                   eps=1e-5, axis=axis, relu=relu)
    # out= takes the checked path (step 1 of docs/architecture.md's call flow)
    checked = pybn.batch_norm_infer(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                    eps=1e-5, axis=axis, relu=relu, out=np.empty_like(x))
    assert_bits_equal(y, checked)
    assert_bits_equal(public, checked)
    want = ref.batch_norm_infer(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                eps=1e-5, axis=axis, relu=relu)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def test_read_only_inputs_are_common(rng):
    args = _common(rng)
    for name in ("x", "running_mean", "running_var", "weight", "bias"):
        args[name].flags.writeable = False
    assert _plain(args) is not None


def _misaligned(a):
    """a's values in an array one byte off its dtype's alignment (C-contiguous, unaligned)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    view = np.frombuffer(raw.data, a.dtype, a.size, 1).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


def _big(args):
    shape = (1, C, pybn._C.STREAM_MIN_BYTES // (4 * C) + 1)
    args["x"] = np.zeros(shape, np.float32)


OTHER_FORMS = {
    "x a list": lambda a: a.update(x=a["x"].tolist()),
    "x a masked array": lambda a: a.update(x=np.ma.masked_array(a["x"])),
    "x not contiguous": lambda a: a.update(x=np.repeat(a["x"], 2, axis=2)[:, :, ::2]),
    "x misaligned": lambda a: a.update(x=_misaligned(a["x"])),
    "x float16": lambda a: a.update(x=a["x"].astype(np.float16)),
    "x int32": lambda a: a.update(x=a["x"].astype(np.int32)),
    "x big-endian": lambda a: a.update(x=a["x"].astype(">f4")),
    "x 1-D": lambda a: a.update(x=a["x"][0, :, 0].copy(), axis=0),
    "x empty": lambda a: a.update(x=np.zeros((0, C, 4), np.float32)),
    "x past STREAM_MIN_BYTES": _big,
    "eps an int": lambda a: a.update(eps=0),
    "eps a numpy float": lambda a: a.update(eps=np.float64(1e-5)),
    "eps infinite": lambda a: a.update(eps=float("inf")),
    "eps NaN": lambda a: a.update(eps=float("nan")),
    "eps negative": lambda a: a.update(eps=-1e-5),
    "axis a bool": lambda a: a.update(axis=True),
    "axis a numpy int": lambda a: a.update(axis=np.int64(1)),
    "axis past ndim": lambda a: a.update(axis=3),
    "axis before -ndim": lambda a: a.update(axis=-4),
    "axis past int64": lambda a: a.update(axis=2**70),
    "relu an int": lambda a: a.update(relu=1),
    "relu a numpy bool": lambda a: a.update(relu=np.bool_(True)),
    "relu None": lambda a: a.update(relu=None),
    "running_mean None": lambda a: a.update(running_mean=None),
    "running_var a list": lambda a: a.update(running_var=a["running_var"].tolist()),
    "running_mean float64": lambda a: a.update(running_mean=a["running_mean"].astype(np.float64)),
    "running_var of shape (C, 1)": lambda a: a.update(running_var=a["running_var"].reshape(C, 1)),
    "weight of C + 1": lambda a: a.update(weight=np.ones(C + 1, np.float32)),
    "weight not contiguous": lambda a: a.update(weight=np.ones(2 * C, np.float32)[::2]),
    "bias misaligned": lambda a: a.update(bias=_misaligned(a["bias"])),
    "bias a masked array": lambda a: a.update(bias=np.ma.masked_array(a["bias"])),
    "bias a scalar": lambda a: a.update(bias=0.5),
}


@pytest.mark.parametrize("form", OTHER_FORMS)
def test_other_forms_are_left_to_the_checks(form, rng):
    args = _common(rng)
    assert _plain(args) is not None  # (so the one change below is what is declined)
    OTHER_FORMS[form](args)
    assert _plain(args) is None
