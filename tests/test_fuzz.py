"""Property-based fuzzing with hypothesis.

Random shapes (2-5 dimensions of 0-9, so size-1 and size-0 axes), channel axes,
dtypes, parameters and memory layouts (steps, negative steps, transposes) for the
batch-norm kernels, the split-phase kernels and dropout, against the independent
references: tests/reference.py (float64 batch norm) and tests/reference_dropout.py
(the normative mask stream, compared bit for bit). Each example also picks the
kernel path (scalar / AVX2 / AVX-512).

Profiles (tests/conftest.py): "ci", the default, is derandomized (the same examples on
every run) and small; ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``
searches far longer with fresh random examples.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import pybn
import pybn._runtime
import reference as ref
import reference_dropout as rd

DTYPES = [np.float32, np.float64]
FWD_TOL = {np.float32: 1e-5, np.float64: 1e-12}   # relative to max(1, max |expected|)
BWD_TOL = {np.float32: 1e-4, np.float64: 1e-11}
U64 = 2**64
ISAS = list(pybn.supported_isas())
_profile = settings()   # the loaded profile (tests/conftest.py)
FIGURES = [f"fuzz: {_profile.max_examples} examples per property test (4 tests), derandomize={_profile.derandomize}"]


# ------------------------------------------------------------------ helpers

def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what)


def assert_bitwise(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    ui = {1: np.uint8, 4: np.uint32, 8: np.uint64}[got.itemsize]
    a = np.ascontiguousarray(got).view(ui).reshape(-1)
    b = np.ascontiguousarray(want).view(ui).reshape(-1)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, f"{what}: {bad.size} of {a.size} elements differ, first at flat index {bad[0]}"


def normalize_ref(x, mean, invstd, weight, bias, axis, relu):
    """float64 ``(x - mean) * invstd * weight + bias`` with the given per-channel mean.

    The kernels subtract the mean rounded to x's dtype (docs/batchnorm.md: the mean is returned in
    x's dtype; pybn.batch_norm_apply's docstring), so the expected output takes that
    rounded mean too: with an exact mean, a channel of nearly equal values (invstd up to
    1/sqrt(eps)) would amplify the half-ulp rounding of the mean past any fixed tolerance.
    """
    v = ref.canonical(np.asarray(x, np.float64), axis)
    c = v.shape[1]
    scale = np.asarray(invstd, np.float64) * (1.0 if weight is None else np.asarray(weight, np.float64))
    shift = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    y = (v - np.asarray(mean, np.float64)[None, :, None]) * scale[None, :, None] + shift[None, :, None]
    return (np.maximum(y, 0.0) if relu else y).reshape(np.shape(x))


def laid_out(values, layout):
    """A copy of `values` stored in another layout: axes permuted by `perm`, each
    stored axis taken with a step (negative: reversed). The gaps hold NaN, so a kernel
    that reads them would show it."""
    perm, steps = layout
    if values.ndim == 0:
        return values.copy()
    stored = values.transpose(perm)
    base = np.full(tuple(n * abs(k) for n, k in zip(stored.shape, steps)), np.nan, values.dtype)
    view = base[tuple(slice(None, None, k) for k in steps)]
    view[...] = stored
    result = view.transpose(np.argsort(perm))
    assert result.shape == values.shape
    return result


def c_order_flags(a):
    return "C" if a.flags.c_contiguous else "strided"


def describe(x, axis=None):
    """Hypothesis events (--hypothesis-show-statistics): which kinds of input ran."""
    event(f"layout: {c_order_flags(x)}")
    event(f"size: {'0' if x.size == 0 else '1' if x.size == 1 else '>1'}")
    if axis is not None and x.size:
        n = values_per_channel(x.shape, axis)
        event(f"values per channel: {'1' if n == 1 else '>1'}")


# --------------------------------------------------------------- strategies

@st.composite
def shapes(draw, min_ndim=2, max_ndim=5):
    """Extents 1-9 (1 included), and in about one shape in eight a 0 on some axis."""
    ndim = draw(st.integers(min_ndim, max_ndim))
    shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
    if ndim and draw(st.integers(0, 7)) == 0:
        shape[draw(st.integers(0, ndim - 1))] = 0
    return tuple(shape)


@st.composite
def layouts(draw, ndim):
    """(perm, steps): contiguous about a third of the time."""
    if draw(st.integers(0, 2)) == 0:
        return tuple(range(ndim)), (1,) * ndim
    perm = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3, -1, -2]), min_size=ndim, max_size=ndim)))
    return perm, steps


@st.composite
def arrays(draw, shape, dtype, loc=0.0, scale=1.0):
    """Normal values (seeded by hypothesis) of `shape` in a random layout."""
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.array(loc + scale * np.random.default_rng(seed).standard_normal(shape), dtype)
    return laid_out(values, draw(layouts(len(shape))))


eps_values = st.one_of(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]), st.floats(1e-5, 2.0))
momenta = st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0))


@st.composite
def bn_problems(draw):
    shape = draw(shapes())
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    if draw(st.integers(0, 9)) == 0:   # one value per channel (a ValueError in training)
        shape = tuple(s if i == axis % len(shape) else 1 for i, s in enumerate(shape))
    dtype = draw(st.sampled_from(DTYPES))
    c = shape[axis]
    loc = draw(st.sampled_from([0.0, 3.0, -2.0]))
    scale = draw(st.sampled_from([1.0, 0.5, 10.0]))
    x = draw(arrays(shape, dtype, loc, scale))
    affine = draw(st.booleans())
    weight = draw(arrays((c,), dtype, 1.0, 0.5)) if affine else None
    bias = draw(arrays((c,), dtype)) if affine else None
    stats_seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(stats_seed)
    running_mean = rng.standard_normal(c).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    return dict(x=x, axis=axis, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                eps=draw(eps_values), momentum=draw(momenta), relu=draw(st.booleans()),
                out=draw(st.sampled_from(["new", "given", "in-place"])), isa=draw(st.sampled_from(ISAS)),
                dy=draw(arrays(shape, dtype)))


def values_per_channel(shape, axis):
    return math.prod(s for i, s in enumerate(shape) if i != axis % len(shape))


def input_and_out(kind, x):
    """(x to pass, out=) for an out= mode: "new" (no out), "given" (a fresh out), or
    "in-place" (a C-contiguous copy of x, passed as both)."""
    if kind == "new":
        return x, None
    if kind == "given":
        return x, np.full(x.shape, 7, x.dtype)
    inplace = np.array(x, order="C")
    return inplace, inplace


# ---------------------------------------------------------------- batch norm

@given(bn_problems())
def test_batch_norm_train_infer_backward(problem):
    p = problem
    x, axis, dtype = p["x"], p["axis"], p["x"].dtype.type
    note(f"shape {x.shape} axis {axis} {x.dtype} layout {c_order_flags(x)} strides {x.strides} isa {p['isa']}")
    describe(x, axis)
    x0 = x.copy()
    n = values_per_channel(x.shape, axis)
    c = x.shape[axis]
    tol, btol = FWD_TOL[dtype], BWD_TOL[dtype]
    rm, rv = p["running_mean"].copy(), p["running_var"].copy()
    w, b = p["weight"], p["bias"]
    with pybn._runtime.use_isa(p["isa"]):
        # training forward: fewer than 2 values per channel is a ValueError, stats untouched
        if n < 2:
            with pytest.raises(ValueError, match="x"):
                pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv, momentum=p["momentum"],
                                      eps=p["eps"], axis=axis, relu=p["relu"])
            np.testing.assert_array_equal(rm, p["running_mean"])
            np.testing.assert_array_equal(rv, p["running_var"])
            r = None
        else:
            x_in, out = input_and_out(p["out"], x)
            y, mean, invstd = pybn.batch_norm_train(x_in, w, b, running_mean=rm, running_var=rv,
                                                    momentum=p["momentum"], eps=p["eps"], axis=axis,
                                                    relu=p["relu"], out=out)
            assert ref.long_axis_strides(y) == ref.result_strides(x_in, out)  # (C order, or x's memory order)
            assert y.dtype == x.dtype and mean.shape == invstd.shape == (c,)
            if out is not None:
                assert y is out
            if x.size:
                r = ref.batch_norm_train(x0, w, b, running_mean=p["running_mean"], running_var=p["running_var"],
                                         momentum=p["momentum"], eps=p["eps"], axis=axis, relu=p["relu"])
                want_y = normalize_ref(x0, r.mean.astype(dtype), r.invstd, w, b, axis, p["relu"])
                assert_close(y, want_y, tol, "y")
                assert_close(mean, r.mean, tol, "mean")
                assert_close(invstd, r.invstd, tol, "invstd")
                assert_close(rm, r.running_mean, tol, "running_mean")
                assert_close(rv, r.running_var, tol, "running_var")
            else:   # no channels: nothing to compute
                r = None
                assert y.shape == x.shape

        # inference forward
        x_in, out = input_and_out(p["out"], x)
        yi = pybn.batch_norm_infer(x_in, p["running_mean"], p["running_var"], w, b, eps=p["eps"], axis=axis,
                                   relu=p["relu"], out=out)
        want = ref.batch_norm_infer(x0, p["running_mean"], p["running_var"], w, b, eps=p["eps"], axis=axis,
                                    relu=p["relu"])
        assert_close(yi, want, tol, "infer")

        # backward, with the batch statistics (training) and the running ones (eval)
        dy = p["dy"]
        if r is not None:
            m, s = r.mean.astype(dtype), r.invstd.astype(dtype)
            yy = r.y.astype(dtype) if p["relu"] else None
            want_dx, want_dw, want_db = ref.batch_norm_backward(dy, x0, m, s, w, training=True, axis=axis, y=yy)
            dx, dw, db = pybn.batch_norm_backward(dy, x, m, s, w, training=True, axis=axis, y=yy)
            assert_close(dx, want_dx, btol, "dx")
            assert_close(dw, want_dw, btol, "dweight")
            assert_close(db, want_db, btol, "dbias")
        m = p["running_mean"]
        s = (1.0 / np.sqrt(p["running_var"].astype(np.float64) + p["eps"])).astype(dtype)
        dx, dw, db = pybn.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
        if x.size:
            want_dx, want_dw, want_db = ref.batch_norm_backward(dy, x0, m, s, w, training=False, axis=axis)
        else:
            want_dx, want_dw, want_db = np.zeros(x.shape), np.zeros(c), np.zeros(c)
        assert_close(dx, want_dx, btol, "dx (eval)")
        assert_close(dw, want_dw, btol, "dweight (eval)")
        assert_close(db, want_db, btol, "dbias (eval)")
    np.testing.assert_array_equal(x, x0)   # inputs untouched


@st.composite
def split_problems(draw):
    """x and its split into W pieces (some empty) along an axis that is not the channel axis."""
    shape = draw(shapes(max_ndim=4))
    axis = draw(st.integers(-len(shape), len(shape) - 1)) % len(shape)
    split_axis = draw(st.sampled_from([i for i in range(len(shape)) if i != axis]))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(arrays(shape, dtype, draw(st.sampled_from([0.0, 3.0])), 1.0))
    cuts = sorted(draw(st.lists(st.integers(0, shape[split_axis]), min_size=0, max_size=3)))
    bounds = [0] + cuts + [shape[split_axis]]
    pieces = [x[(slice(None),) * split_axis + (slice(lo, hi),)] for lo, hi in zip(bounds, bounds[1:])]
    c = shape[axis]
    affine = draw(st.booleans())
    return dict(x=x, axis=axis, pieces=pieces, split_axis=split_axis, eps=draw(eps_values), relu=draw(st.booleans()),
                weight=draw(arrays((c,), dtype, 1.0, 0.5)) if affine else None,
                bias=draw(arrays((c,), dtype)) if affine else None,
                dy_seed=draw(st.integers(0, 2**32 - 1)), isa=draw(st.sampled_from(ISAS)))


@given(split_problems())
def test_split_phase_equals_whole(problem):
    p = problem
    x, axis, pieces, eps = p["x"], p["axis"], p["pieces"], p["eps"]
    dtype = x.dtype.type
    c = x.shape[axis]
    n = values_per_channel(x.shape, axis)
    note(f"shape {x.shape} axis {axis} pieces {[q.shape for q in pieces]} isa {p['isa']}")
    describe(x, axis)
    event(f"pieces: {len(pieces)}, empty: {sum(q.size == 0 for q in pieces)}")
    with pybn._runtime.use_isa(p["isa"]):
        parts = [pybn.batch_norm_stats(q, axis=axis) for q in pieces]
        assert all(s.count == values_per_channel(q.shape, axis) for s, q in zip(parts, pieces))
        merged = pybn.batch_norm_merge_stats([s.count for s in parts], np.stack([s.mean for s in parts]),
                                             np.stack([s.m2 for s in parts]))
        assert merged.count == n
        if n == 0:
            with pytest.raises(ValueError, match="stats"):
                pybn.batch_norm_invstd(merged, eps)
            return
        if c == 0:
            assert merged.mean.shape == merged.m2.shape == (0,)
            return
        # float64 results, accurate to x's precision (the kernels accumulate in x's dtype
        # within short blocks, in float64 across them)
        mean64, var64 = ref.mean_var(x, axis)
        tol = FWD_TOL[dtype]
        assert_close(merged.mean, mean64, tol, "merged mean")
        assert_close(merged.m2, var64 * n, tol, "merged m2")
        invstd = pybn.batch_norm_invstd(merged, eps)
        assert_close(invstd, 1.0 / np.sqrt(var64 + eps), tol, "invstd")

        # forward: apply with the merged statistics equals the reference (and train, for n >= 2)
        w, b = p["weight"], p["bias"]
        mean_x = merged.mean.astype(dtype)
        y = pybn.batch_norm_apply(x, mean_x, invstd, w, b, axis=axis, relu=p["relu"])
        want = normalize_ref(x, mean_x, 1.0 / np.sqrt(var64 + eps), w, b, axis, p["relu"])
        assert_close(y, want, FWD_TOL[dtype], "apply")
        y_pieces = np.concatenate([pybn.batch_norm_apply(q, mean_x, invstd, w, b, axis=axis, relu=p["relu"])
                                   for q in pieces], axis=p["split_axis"])
        assert_close(y_pieces, want, FWD_TOL[dtype], "apply on the pieces")
        if n >= 2:
            whole = pybn.batch_norm_train(x, w, b, eps=eps, axis=axis, relu=p["relu"])
            assert_close(whole.mean, merged.mean, FWD_TOL[dtype], "train mean vs merged")

        # backward: the sums over the pieces, then each piece's dx, equal the whole batch's
        dy = np.random.default_rng(p["dy_seed"]).standard_normal(x.shape).astype(dtype)
        dy_pieces = np.split(dy, np.cumsum([q.shape[p["split_axis"]] for q in pieces])[:-1], axis=p["split_axis"])
        yy = y if p["relu"] else None
        yy_pieces = np.split(y, np.cumsum([q.shape[p["split_axis"]] for q in pieces])[:-1],
                             axis=p["split_axis"]) if p["relu"] else [None] * len(pieces)
        invstd_x = invstd.astype(dtype)
        sums = [pybn.batch_norm_backward_reduce(g, q, mean_x, invstd_x, axis=axis, y=r)
                for g, q, r in zip(dy_pieces, pieces, yy_pieces)]
        sum_dy = np.sum([s.sum_dy for s in sums], axis=0)
        sum_dy_xhat = np.sum([s.sum_dy_xhat for s in sums], axis=0)
        want_dx, want_dw, want_db = ref.batch_norm_backward(dy, x, mean_x, invstd_x, w, axis=axis, y=yy)
        assert_close(sum_dy, want_db, BWD_TOL[dtype], "sum_dy")
        assert_close(sum_dy_xhat, want_dw, BWD_TOL[dtype], "sum_dy_xhat")
        dx = np.concatenate([pybn.batch_norm_backward_apply(g, q, mean_x, invstd_x, sum_dy, sum_dy_xhat, n, w,
                                                            axis=axis, y=r)
                             for g, q, r in zip(dy_pieces, pieces, yy_pieces)], axis=p["split_axis"])
        assert_close(dx, want_dx, BWD_TOL[dtype], "dx from the pieces")
        whole_dx = pybn.batch_norm_backward(dy, x, mean_x, invstd_x, w, axis=axis, y=yy).dx
        assert_close(dx, whole_dx, BWD_TOL[dtype], "dx pieces vs whole")


# ------------------------------------------------------------------ dropout

probabilities = st.one_of(
    st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    st.sampled_from([0.5, 0.1, 1 / 65536, 2 / 65536, 65535 / 65536, 0.9999999, 0.0, 1.0]))
u64s = st.one_of(st.integers(0, U64 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, U64 - 1]))
offsets = st.one_of(st.integers(0, U64 - 1), st.integers(U64 - 2000, U64 - 1), st.integers(0, 2000))


@st.composite
def dropout_problems(draw):
    one_dim = draw(st.integers(0, 4)) == 0   # long enough for several groups of 128 and the vector bodies
    shape = (draw(st.integers(0, 1500)),) if one_dim else draw(shapes(min_ndim=0, max_ndim=4))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(arrays(shape, dtype))
    if x.ndim and x.size and draw(st.booleans()):   # specials: kept NaN/Inf/-0.0 propagate, dropped ones are +0.0
        flat = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, x.size, 3)
        specials = np.array([np.nan, -np.inf, -0.0], dtype)
        idx = np.unravel_index(flat, shape)
        x[idx] = specials
    noise_shape = None
    if draw(st.booleans()):
        noise_shape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    return dict(x=x, p=draw(probabilities), seed=draw(u64s), offset=draw(offsets), noise_shape=noise_shape,
                out=draw(st.sampled_from(["new", "given", "in-place"])), isa=draw(st.sampled_from(ISAS)))


@given(dropout_problems())
def test_dropout_bit_for_bit(problem):
    p = problem
    x, prob, seed, offset, ns = p["x"], p["p"], p["seed"], p["offset"], p["noise_shape"]
    note(f"shape {x.shape} {x.dtype} {c_order_flags(x)} p {prob!r} seed {seed} offset {offset} noise_shape {ns} "
         f"isa {p['isa']}")
    describe(x)
    event(f"noise_shape: {ns is not None}; p in {{0, 1}}: {prob in (0.0, 1.0)}; out: {p['out']}")
    x0 = x.copy()
    mask_shape = ns if ns is not None else x.shape
    n = math.prod(mask_shape)
    with pybn._runtime.use_isa(p["isa"]):
        # (reshape: the reference's np.ascontiguousarray turns a 0-d result into shape (1,))
        want = rd.dropout_ref(x0, prob, seed, offset, ns).reshape(x.shape)
        x_in, out = input_and_out(p["out"], x)
        y = pybn.dropout(x_in, prob, seed=seed, offset=offset, noise_shape=ns, out=out)
        assert_bitwise(y, want, "dropout")

        mask = pybn.dropout_mask(mask_shape, prob, seed=seed, offset=offset)
        assert_bitwise(mask, rd.packed_mask(n, prob, seed, offset), "dropout_mask")

        x_in, out = input_and_out(p["out"], x)
        y2 = pybn.dropout_apply(x_in, mask, prob, noise_shape=ns, out=out)
        assert_bitwise(y2, rd.dropout_apply_ref(x0, mask, prob, ns).reshape(x.shape), "dropout_apply")
        assert_bitwise(y2, want, "dropout_apply vs dropout")
        assert pybn.counters_used(n) == rd.n_counters(n)
    np.testing.assert_array_equal(x, x0)


@given(st.integers(0, 700), u64s, offsets, probabilities, st.integers(1, 400))
def test_dropout_mask_streams_concatenate(n, seed, offset, prob, m):
    """Two masks drawn one after the other (offset advanced by counters_used) are the
    stream of one mask as long as both, when the first ends on a group of 128 elements."""
    first = 128 * (n // 128)
    a = pybn.dropout_mask(first, prob, seed=seed, offset=offset)
    b = pybn.dropout_mask(m, prob, seed=seed, offset=(offset + pybn.counters_used(first)) % U64)
    whole = rd.mask_bits(first + m, prob, seed, offset)
    bits = np.concatenate([np.unpackbits(a, count=first, bitorder="little"),
                           np.unpackbits(b, count=m, bitorder="little")]).astype(bool)
    np.testing.assert_array_equal(bits, whole)
