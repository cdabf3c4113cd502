"""The common call taken whole (the bindings bn_infer_plain, bn_train_plain and
bn_backward_plain; csrc/bindings/plain_calls.h, docs/architecture.md "How a call flows"):
a common call gives the bits of the checked path on every ISA and thread count, against an
independent reference too, and every other form of an argument is declined (None), so that
the Python checks, not the binding, convert or reject it."""
import numpy as np
import pytest

import pybn
import reference as ref
from pybn import _C
from reference import assert_bits_equal

C = 5
TOL = {np.float32: 1e-5, np.float64: 1e-12}
BWD_TOL = {np.float32: 1e-4, np.float64: 1e-11}


def _inputs(rng, shape=(3, C, 4), dtype=np.float32, axis=1):
    c = shape[axis]
    return dict(x=rng.standard_normal(shape).astype(dtype), dy=rng.standard_normal(shape).astype(dtype),
                mean=rng.standard_normal(c).astype(dtype), var=rng.uniform(0.5, 2.0, c).astype(dtype),
                weight=rng.standard_normal(c).astype(dtype), bias=rng.standard_normal(c).astype(dtype))


# Each binding with its arguments in the order it takes them; a dict per call, so that one
# argument at a time can be replaced.
def _infer_args(a, axis=1):
    return dict(x=a["x"], running_mean=a["mean"], running_var=a["var"], weight=a["weight"], bias=a["bias"],
                eps=1e-5, axis=axis, relu=False, out=None)


def _train_args(a, axis=1):
    return dict(x=a["x"], weight=a["weight"], bias=a["bias"], running_mean=a["mean"].copy(),
                running_var=a["var"].copy(), momentum=0.1, eps=1e-5, axis=axis, relu=False, out=None)


def _backward_args(a, axis=1):
    invstd = (1 / np.sqrt(a["var"].astype(np.float64) + 1e-5)).astype(a["x"].dtype)
    return dict(dy=a["dy"], x=a["x"], mean=a["mean"], invstd=invstd, weight=a["weight"], training=True,
                axis=axis, y=None, out=None)


BINDINGS = {"infer": (_C.bn_infer_plain, _infer_args), "train": (_C.bn_train_plain, _train_args),
            "backward": (_C.bn_backward_plain, _backward_args)}


def _plain(kind, args):
    return BINDINGS[kind][0](*args.values())


def _public(kind, args, checked=False):
    """The public function on the same arguments; `checked`: through the Python checks, by
    a numpy float for eps (backward: a numpy bool for training), which the binding declines."""
    a = dict(args)
    if kind == "infer":
        eps = np.float64(a["eps"]) if checked else a["eps"]
        return pybn.batch_norm_infer(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], eps=eps,
                                     axis=a["axis"], relu=a["relu"], out=a["out"])
    if kind == "train":
        eps = np.float64(a["eps"]) if checked else a["eps"]
        return pybn.batch_norm_train(a["x"], a["weight"], a["bias"], running_mean=a["running_mean"],
                                     running_var=a["running_var"], momentum=a["momentum"], eps=eps, axis=a["axis"],
                                     relu=a["relu"], out=a["out"])
    training = np.bool_(a["training"]) if checked else a["training"]
    return pybn.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], training=training,
                                    axis=a["axis"], y=a["y"], out=a["out"])


CASES = [((3, C, 4), 1), ((3, C, 4), -1), ((3, C, 4), 0), ((1, 64, 8, 8), 1), ((2, 3, 4, 5, 6), 3),
         ((7, 1), 1), ((9, 17), -1), ((4, 64, 32, 32), 1), ((4, 32, 32, 64), -1)]


def over_common_calls(test):
    """Parametrize `test` over every layout of CASES in both dtypes."""
    test = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])(test)
    return pytest.mark.parametrize("shape,axis", CASES)(test)


def _close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("given_out", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@over_common_calls
def test_infer_gives_the_checked_paths_bits(shape, axis, dtype, affine, given_out, isa, threads, rng):
    args = _infer_args(_inputs(rng, shape, dtype, axis), axis)
    args["relu"] = affine  # (both relu values, with and without the affine parameters)
    if not affine:
        args["weight"] = args["bias"] = None
    if given_out:
        args["out"] = np.empty_like(args["x"])
    y = _plain("infer", args)
    assert y is not None, "the common call was declined"
    assert type(y) is np.ndarray and y.dtype == dtype and y.shape == args["x"].shape and y.flags.c_contiguous
    if given_out:
        assert y is args["out"]
    assert_bits_equal(y, _public("infer", dict(args, out=None), checked=True))
    assert_bits_equal(_public("infer", dict(args, out=None)), y)
    want = ref.batch_norm_infer(args["x"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                eps=1e-5, axis=axis, relu=args["relu"])
    _close(y, want, TOL[dtype])


@pytest.mark.parametrize("given_out", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@over_common_calls
def test_train_gives_the_checked_paths_bits(shape, axis, dtype, affine, given_out, isa, threads, rng):
    a = _inputs(rng, shape, dtype, axis)
    args = _train_args(a, axis)
    args["relu"] = affine
    if not affine:
        args["weight"] = args["bias"] = None
    if given_out:
        args["out"] = np.empty_like(a["x"])
    checked_args = dict(args, running_mean=a["mean"].copy(), running_var=a["var"].copy(),
                        out=np.empty_like(a["x"]) if given_out else None)
    got = _plain("train", args)
    assert got is not None, "the common call was declined"
    y, mean, invstd = got
    if given_out:
        assert y is args["out"]
    want = _public("train", checked_args, checked=True)
    for g, w in zip((y, mean, invstd, args["running_mean"], args["running_var"]),
                    (*want, checked_args["running_mean"], checked_args["running_var"])):
        assert g.dtype == dtype
        assert_bits_equal(g, w)
    r = ref.batch_norm_train(a["x"], args["weight"], args["bias"], a["mean"], a["var"], momentum=0.1, eps=1e-5,
                             axis=axis, relu=args["relu"])
    for g, w in ((y, r.y), (mean, r.mean), (invstd, r.invstd), (args["running_mean"], r.running_mean),
                 (args["running_var"], r.running_var)):
        _close(g, w, TOL[dtype])


@pytest.mark.parametrize("given_out", [False, True])
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("training", [True, False])
@over_common_calls
def test_backward_gives_the_checked_paths_bits(shape, axis, dtype, training, with_y, given_out, isa, threads, rng):
    a = _inputs(rng, shape, dtype, axis)
    args = _backward_args(a, axis)
    args["training"] = training
    if with_y:  # a forward with relu=True: dy masked where y <= 0
        args["y"] = rng.standard_normal(shape).astype(dtype)
    if given_out:
        args["out"] = np.empty_like(a["dy"])
    got = _plain("backward", args)
    assert got is not None, "the common call was declined"
    if given_out:
        assert got[0] is args["out"]
    want = _public("backward", dict(args, out=None), checked=True)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_bits_equal(g, w)
    want = ref.batch_norm_backward(a["dy"], a["x"], args["mean"], args["invstd"], args["weight"],
                                   training=training, axis=axis, y=args["y"])
    for g, w in zip(got, want):
        _close(g, w, BWD_TOL[dtype])


def test_read_only_inputs_are_common(rng):
    a = _inputs(rng)
    for array in a.values():
        array.flags.writeable = False
    assert _plain("infer", _infer_args(a)) is not None
    assert _plain("backward", _backward_args(a)) is not None
    assert _plain("train", _train_args(a)) is not None  # (the running statistics are copies)


def _misaligned(a):
    """a's values in an array one byte off its dtype's alignment (C-contiguous, unaligned)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    view = np.frombuffer(raw.data, a.dtype, a.size, 1).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _past_stream_min_bytes(args, name):
    args[name] = np.zeros((1, C, pybn._C.STREAM_MIN_BYTES // (4 * C) + 1), np.float32)
    return args


def _x_forms(name):
    """Forms of the main array `name` (x, or dy for the backward) the bindings decline."""
    return {
        f"{name} a list": lambda a: a.update({name: a[name].tolist()}),
        f"{name} a masked array": lambda a: a.update({name: np.ma.masked_array(a[name])}),
        f"{name} not contiguous": lambda a: a.update({name: np.repeat(a[name], 2, axis=2)[:, :, ::2]}),
        f"{name} misaligned": lambda a: a.update({name: _misaligned(a[name])}),
        f"{name} float16": lambda a: a.update({name: a[name].astype(np.float16)}),
        f"{name} int32": lambda a: a.update({name: a[name].astype(np.int32)}),
        f"{name} big-endian": lambda a: a.update({name: a[name].astype(">f4")}),
        f"{name} 1-D": lambda a: a.update({name: a[name][0, :, 0].copy(), "axis": 0}),
        f"{name} empty": lambda a: a.update({name: np.zeros((0, C, 4), np.float32)}),
        f"{name} past STREAM_MIN_BYTES, no out": lambda a: _past_stream_min_bytes(a, name),
        "axis a bool": lambda a: a.update(axis=True),
        "axis a numpy int": lambda a: a.update(axis=np.int64(1)),
        "axis past ndim": lambda a: a.update(axis=3),
        "axis before -ndim": lambda a: a.update(axis=-4),
        "axis past int64": lambda a: a.update(axis=2**70),
    }


def _channel_forms(name, optional):
    forms = {
        f"{name} a list": lambda a: a.update({name: a[name].tolist()}),
        f"{name} float64": lambda a: a.update({name: a[name].astype(np.float64)}),
        f"{name} big-endian": lambda a: a.update({name: a[name].astype(">f4")}),
        f"{name} of shape (C, 1)": lambda a: a.update({name: a[name].reshape(C, 1)}),
        f"{name} of C + 1": lambda a: a.update({name: np.ones(C + 1, np.float32)}),
        f"{name} not contiguous": lambda a: a.update({name: np.ones(2 * C, np.float32)[::2]}),
        f"{name} misaligned": lambda a: a.update({name: _misaligned(a[name])}),
        f"{name} a masked array": lambda a: a.update({name: np.ma.masked_array(a[name])}),
        f"{name} a scalar": lambda a: a.update({name: 0.5}),
    }
    if not optional:
        forms[f"{name} None"] = lambda a: a.update({name: None})
    return forms


def _flag_forms(name):
    return {f"{name} an int": lambda a: a.update({name: 1}),
            f"{name} a numpy bool": lambda a: a.update({name: np.bool_(True)}),
            f"{name} None": lambda a: a.update({name: None})}


def _real_forms(name, nonnegative):
    forms = {f"{name} an int": lambda a: a.update({name: 0}),
             f"{name} a numpy float": lambda a: a.update({name: np.float64(1e-5)}),
             f"{name} infinite": lambda a: a.update({name: float("inf")}),
             f"{name} NaN": lambda a: a.update({name: float("nan")})}
    if nonnegative:
        forms[f"{name} negative"] = lambda a: a.update({name: -1e-5})
    return forms


def _out_forms(main):
    return {
        "out a list": lambda a: a.update(out=np.zeros((3, C, 4)).tolist()),
        "out float64": lambda a: a.update(out=np.empty((3, C, 4), np.float64)),
        "out big-endian": lambda a: a.update(out=np.empty((3, C, 4), ">f4")),
        "out a masked array": lambda a: a.update(out=np.ma.masked_array(np.empty((3, C, 4), np.float32))),
        "out of another shape": lambda a: a.update(out=np.empty((3, C, 5), np.float32)),
        "out read-only": lambda a: a.update(out=_read_only(np.empty((3, C, 4), np.float32))),
        "out not contiguous": lambda a: a.update(out=np.empty((3, C, 8), np.float32)[:, :, ::2]),
        f"out {main} itself (in place)": lambda a: a.update(out=a[main]),
        f"out overlapping {main}": lambda a: a.update(out=_shifted_view(a, main)),
    }


def _read_from_out(args, name, main):
    """A new out, and the per-channel argument `name` a view of its first C elements."""
    args["out"] = np.empty_like(args[main])
    args[name] = args["out"].reshape(-1)[:C]


def _shifted_view(args, name):
    """args[name] (x's shape and dtype) remade in memory that an array returned overlaps partially."""
    like = args["x"]
    base = np.empty(like.size + 1, like.dtype)
    args[name] = base[:-1].reshape(like.shape)
    return base[1:].reshape(like.shape)


OTHER_FORMS = {
    "infer": {**_x_forms("x"), **_channel_forms("running_mean", False), **_channel_forms("running_var", False),
              **_channel_forms("weight", True), **_channel_forms("bias", True), **_real_forms("eps", True),
              **_flag_forms("relu"), **_out_forms("x"),
              "running_mean inside out": lambda a: _read_from_out(a, "running_mean", "x")},
    "train": {**_x_forms("x"), **_channel_forms("weight", True), **_channel_forms("bias", True),
              **_channel_forms("running_mean", True), **_channel_forms("running_var", True),
              **_real_forms("momentum", False), **_real_forms("eps", True), **_flag_forms("relu"),
              **_out_forms("x"),
              "x of one value per channel": lambda a: a.update(x=a["x"][:1, :, :1].copy()),
              "running_mean without running_var": lambda a: a.update(running_var=None),
              "running_var read-only": lambda a: a.update(running_var=_read_only(a["running_var"])),
              "running_mean is running_var": lambda a: a.update(running_var=a["running_mean"]),
              "running_mean is weight": lambda a: a.update(running_mean=a["weight"]),
              "running_var overlapping x": lambda a: a.update(running_var=a["x"].reshape(-1)[:C]),
              "running_mean inside out": lambda a: _read_from_out(a, "running_mean", "x"),
              "weight inside out": lambda a: _read_from_out(a, "weight", "x")},
    "backward": {**_x_forms("dy"), **_channel_forms("mean", False), **_channel_forms("invstd", False),
                 **_channel_forms("weight", True), **_flag_forms("training"), **_out_forms("dy"),
                 "x float64": lambda a: a.update(x=a["x"].astype(np.float64)),
                 "x of another shape": lambda a: a.update(x=np.zeros((3, C, 5), np.float32)),
                 "x a list": lambda a: a.update(x=a["x"].tolist()),
                 "y float64": lambda a: a.update(y=a["x"].astype(np.float64)),
                 "y not contiguous": lambda a: a.update(y=np.repeat(a["x"], 2, axis=2)[:, :, ::2]),
                 "out is x": lambda a: a.update(out=a["x"]),
                 "invstd inside out": lambda a: _read_from_out(a, "invstd", "dy"),
                 "y overlapping out": lambda a: a.update(out=_shifted_view(a, "y")),
                 "out overlapping x": lambda a: a.update(out=_shifted_view(a, "x"))},
}


@pytest.mark.parametrize("kind,form", [(k, f) for k, forms in OTHER_FORMS.items() for f in forms])
def test_other_forms_are_left_to_the_checks(kind, form, rng):
    args = BINDINGS[kind][1](_inputs(rng))
    assert _plain(kind, args) is not None  # (so the one change below is what is declined)
    OTHER_FORMS[kind][form](args)
    if kind == "backward" and form.startswith("dy ") and type(args["dy"]) is np.ndarray:
        args["x"] = np.zeros_like(args["dy"])  # (x in dy's shape and dtype: declined for dy's sake)
        assert type(args["x"]) is np.ndarray and args["x"].flags.carray
    assert _plain(kind, args) is None


@pytest.mark.parametrize("kind", BINDINGS)
def test_a_new_output_below_stream_min_bytes_only(kind, rng):
    """Python's checks allocate outputs from STREAM_MIN_BYTES aligned (for streaming stores);
    the bindings allocate below it only, and take any size with out= given."""
    c = 4
    n = pybn._C.STREAM_MIN_BYTES // (4 * c)  # x of exactly STREAM_MIN_BYTES
    for size, taken in ((n - 1, True), (n, False)):
        args = BINDINGS[kind][1](_inputs(rng, (1, c, size)))
        assert (_plain(kind, args) is not None) == taken, size
        args["out"] = np.empty_like(args["x"])
        assert _plain(kind, args) is not None, size


def test_kernel_bindings_refuse_unaligned_arrays():
    """The kernels' bindings (pybn._C, below the public functions, which copy or refuse such
    arrays) refuse an array one byte off its alignment: past STREAM_MIN_BYTES the streaming
    stores of an unaligned output faulted (found by a C++ review, through _C.dropout)."""
    n = pybn._C.STREAM_MIN_BYTES // 4 + 4096
    x = np.ones(n, np.float32)
    with pytest.raises(ValueError, match="^out: must be aligned"):
        pybn._C.dropout(x, _misaligned(np.empty_like(x)), 1, 0, 0, 1.0, False)
    with pytest.raises(ValueError, match="^x: must be aligned"):
        pybn._C.dropout(_misaligned(x[:1000]), np.empty(1000, np.float32), 1, 0, 0, 1.0, False)
    xs = np.ones((1, 4, 5), np.float32)
    stats = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="must be aligned"):
        pybn._C.bn_infer(xs, np.empty_like(xs), _misaligned(stats), stats, None, None, 1, 4, 5, 1e-5, False, None)
