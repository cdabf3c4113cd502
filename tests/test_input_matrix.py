"""Input-validation matrix.

ONE table, MATRIX, built systematically: for every public array function (and the
pybn.nn and pybn.distributed layers' constructors and calls) and every argument, the bad
values a user can pass, each row ``(function, argument, label, bad value, expected
exception[, names])``. A row starts from a call that works (SPECS[...].good()), replaces
that one argument (a few rows replace two, e.g. an `out` that overlaps an input) and
asserts:

* the exception type (TypeError for a wrong kind or dtype, ValueError for a wrong
  shape, layout or value), and that the message names the argument (or one of the
  row's names; an overlap of two arrays must name both);
* every ndarray passed in, running statistics first, is unchanged afterwards (no
  half-updated running stats, nothing written into a rejected `out`).

Every array argument also gets the arrays whose conversion would lose something (a
masked array's mask, a torch tensor's autograd graph, a meta tensor's absent data):
foreign_arrays(). The valid odd inputs (other byte orders, memmaps, exact in-place)
are in test_odd_inputs.py.

test_every_argument_is_covered checks that the table leaves out no parameter of any
public function, except the flags listed in FLAGS. The count of cases is printed at
the end of the run (pytest_terminal_summary in conftest.py, through summary()).
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

import pybn
import pybn.distributed
import pybn.nn
from error_checks import assert_raises_naming, bad_outs, misaligned, name_re

C = 3
SHAPE = (4, C, 5)          # (N, C, L): 60 elements, channel axis 1
DT = np.float32
W = 2                      # workers for batch_norm_merge_stats
NBYTES = (math.prod(SHAPE) + 7) // 8   # a packed mask of x


def rand(shape, dtype=DT, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def positive(shape=(C,), dtype=DT, seed=1):
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape).astype(dtype)


def read_only(a):
    a.flags.writeable = False
    return a


# --------------------------------------------------------------- the rows

@dataclass
class Spec:
    """A function under test: how to call it well, and its arguments' bad values."""

    name: str
    fn: Callable[..., Any]
    good: Callable[[], dict]                 # keyword arguments of a call that works
    args: dict[str, list] = field(default_factory=dict)   # argument -> [(label, make, exc)]
    watch: Callable[[dict], list] | None = None  # extra arrays that must stay unchanged


@dataclass
class Row:
    spec: Spec
    arg: str
    label: str
    make: Callable[[dict], dict]             # good kwargs -> the overrides of this row
    exc: type
    names: tuple[str, ...]                   # the message names one of these
    all_names: bool = False                  # ... or every one of them (an overlap names both arrays)

    @property
    def id(self):
        return f"{self.spec.name}-{self.arg}-{self.label}"


def put(arg, value_fn):
    """Overrides that set `arg` to a fresh value_fn() (fresh: rows must not share arrays)."""
    return lambda kw: {arg: value_fn()}


def cases(arg, table):
    """[(label, value_fn, exc)] -> [(label, make, exc)] setting `arg`."""
    return [(label, put(arg, value_fn), exc) for label, value_fn, exc in table]


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.longdouble, np.complex64, np.complex128, object]


def dtype_cases(arg, shape, required=True):
    """Every unsupported dtype, a string, a ragged list (and None when the array is required)."""
    table = [(f"dtype-{np.dtype(dt).name}", (lambda dt=dt: np.ones(shape, dt)), TypeError) for dt in BAD_DTYPES]
    table += [("str", lambda: "abc", TypeError),
              ("ragged-list", lambda: [[1.0], [1.0, 2.0]], ValueError)]
    if required:
        table.append(("None", lambda: None, TypeError))
    return cases(arg, table)


def data_cases(arg, shape=SHAPE, ndim_min=2):
    """The main array of a call (x, dy): dtypes, and too few dimensions."""
    table = []
    if ndim_min >= 2:
        table += [("1-d", lambda: np.ones(5, DT), ValueError),
                  ("0-d", lambda: np.float32(1.0), ValueError),
                  ("python-float", lambda: 1.0, ValueError),
                  ("flat-list", lambda: [1.0, 2.0, 3.0], ValueError),
                  ("1-d-empty", lambda: np.ones(0, DT), ValueError)]
    table += foreign_arrays(lambda: rand(shape))
    return dtype_cases(arg, shape) + cases(arg, table)


def matching_cases(arg, shape=SHAPE, required=True):
    """An array that must have the lead array's shape and dtype (x and y of a backward)."""
    table = [("other-shape", lambda: np.ones(shape[:-1] + (shape[-1] + 1,), DT), ValueError),
             ("transposed-shape", lambda: np.ones(shape[::-1], DT), ValueError),
             ("fewer-dims", lambda: np.ones(shape[:-1], DT), ValueError),
             ("0-d", lambda: np.float32(1.0), ValueError),
             ("float64-vs-float32", lambda: np.ones(shape, np.float64), TypeError)]
    table += foreign_arrays(lambda: rand(shape))
    return dtype_cases(arg, shape, required) + cases(arg, table)


def per_channel_cases(arg, channels=C, required=False):
    """A read-only per-channel array of shape (channels,): never broadcast."""
    table = [("length-C-1", lambda: np.ones(channels - 1, DT), ValueError),
             ("length-C+1", lambda: np.ones(channels + 1, DT), ValueError),
             ("length-0", lambda: np.ones(0, DT), ValueError),
             ("shape-(C,1)", lambda: np.ones((channels, 1), DT), ValueError),
             ("shape-(1,C)", lambda: np.ones((1, channels), DT), ValueError),
             ("python-float", lambda: 2.0, ValueError),
             ("list-wrong-length", lambda: [1.0] * (channels + 1), ValueError)]
    table += foreign_arrays(lambda: positive((channels,)))
    return dtype_cases(arg, (channels,), required) + cases(arg, table)


def in_place_cases(arg, partner):
    """running_mean / running_var of batch_norm_train: updated in place, so exactly right."""
    other = np.float64 if DT == np.float32 else np.float32
    table = [("list", lambda: [0.5] * C, TypeError),
             ("tuple", lambda: (0.5,) * C, TypeError),
             ("python-float", lambda: 0.5, TypeError),
             ("None-alone", lambda: None, ValueError),   # its partner is given
             (f"dtype-{np.dtype(other).name}", lambda: np.ones(C, other), TypeError)]
    table += [(f"dtype-{np.dtype(dt).name}", (lambda dt=dt: np.ones(C, dt)), TypeError)
              for dt in BAD_DTYPES]
    table += [("length-C-1", lambda: np.ones(C - 1, DT), ValueError),
              ("length-C+1", lambda: np.ones(C + 1, DT), ValueError),
              ("shape-(C,1)", lambda: np.ones((C, 1), DT), ValueError),
              ("shape-(1,C)", lambda: np.ones((1, C), DT), ValueError),
              ("shape-()", lambda: np.ones((), DT), ValueError),
              ("read-only", lambda: read_only(np.ones(C, DT)), ValueError),
              ("non-contiguous", lambda: np.ones(2 * C, DT)[::2], ValueError),
              ("negative-stride", lambda: np.ones(C, DT)[::-1], ValueError),
              ("stride-0-writeable", lambda: stride0(C), ValueError),
              ("misaligned", lambda: misaligned(np.ones(C, DT)), ValueError),
              ("non-native-byte-order", lambda: np.ones(C, np.dtype(DT).newbyteorder()), TypeError),
              ("memmap-read-only", lambda: memmap_of(np.ones(C, DT), "r"), ValueError)]
    table += foreign_arrays(lambda: np.ones(C, DT))
    rows = cases(arg, table)
    # views that overlap what the kernel reads or writes at the same time: the kernel
    # updates the statistics, then normalizes with weight and bias
    rows.append(("view-of-x", lambda kw: {arg: kw["x"].reshape(-1)[:C]}, ValueError))
    for read in (partner, "weight", "bias"):
        rows.append((f"same-array-as-{read}", lambda kw, read=read: _same(arg, read, kw), ValueError))
        rows.append((f"overlaps-{read}", lambda kw, read=read: _shifted_pair(arg, read, kw), ValueError))
    return rows


def _same(arg, other, kw):
    """`arg` and `other` the same array, holding other's good values."""
    arr = np.array(kw[other], DT)
    return {other: arr, arg: arr}


def _shifted_pair(arg, other, kw):
    buf = np.ones(C + 1, DT)
    return {other: buf[:C], arg: buf[1:]}


def stride0(n, dtype=DT):
    """A writeable view of n elements that are all one element (stride 0)."""
    return np.lib.stride_tricks.as_strided(np.ones(1, dtype), shape=(n,), strides=(0,), writeable=True)


MEMMAPS = []   # kept open until the end of the session (a row's array must outlive its call)


def memmap_of(values, mode):
    """`values` in a file mapped with `mode` ("r": read-only)."""
    import tempfile
    f = tempfile.NamedTemporaryFile(suffix=".bin")
    MEMMAPS.append(f)
    values.tofile(f.name)
    return np.memmap(f.name, dtype=values.dtype, mode=mode, shape=values.shape)


def foreign_arrays(make, grad=True):
    """Arrays whose conversion to an ndarray would lose something: a masked array (its mask),
    a torch tensor that requires grad (its graph), one on the meta device (it has no data)."""
    table = [("masked", lambda: np.ma.masked_array(make(), mask=np.eye(1, make().size, dtype=bool)
                                                   .reshape(make().shape)), TypeError)]
    try:
        import torch
    except ImportError:   # pragma: no cover - torch is a test dependency
        return table
    if grad:
        table.append(("torch-requires-grad", lambda: torch.from_numpy(make()).requires_grad_(), TypeError))
    table.append(("torch-meta", lambda: torch.from_numpy(make()).to("meta"), TypeError))
    return table


def out_cases(leads, shape=SHAPE, per_channel=()):
    """`out=`: error_checks.bad_outs (shape, dtype, layout, read-only, a list), and the
    overlaps: with a lead input shifted by a few elements, or containing a per-channel input."""
    rows = []
    for label, _, exc in bad_outs(shape, DT):
        rows.append((label, lambda kw, label=label: {"out": _bad_out(label, shape)}, exc))
    rows.append(("tuple", put("out", lambda: (0.0,) * math.prod(shape)), TypeError))
    rows.append(("python-float", put("out", lambda: 0.0), TypeError))
    n = math.prod(shape)
    odd = [("negative-stride", lambda: np.zeros(shape, DT)[::-1], ValueError),
           ("stride-0-writeable", lambda: stride0(n).reshape(shape), ValueError),
           ("non-native-byte-order", lambda: np.zeros(shape, np.dtype(DT).newbyteorder()), TypeError),
           ("memmap-read-only", lambda: memmap_of(np.zeros(shape, DT), "r"), ValueError),
           ("torch-tensor", lambda: __import__("torch").zeros(shape), TypeError)]
    odd += foreign_arrays(lambda: np.zeros(shape, DT))
    rows += cases("out", odd)
    for lead in leads:
        rows.append((f"overlaps-{lead}-shifted", lambda kw, lead=lead: _shifted_out(lead, kw, shape), ValueError))
    for arg in per_channel:
        rows.append((f"contains-{arg}", lambda kw, arg=arg: _out_containing(arg, kw, shape), ValueError))
    return rows


def _bad_out(label, shape):
    return {k: a for k, a, _ in bad_outs(shape, DT)}[label]   # fresh arrays


def _shifted_out(lead, kw, shape):
    """The lead input and out: two views of one buffer, 5 elements apart."""
    n = math.prod(shape)
    buf = np.empty(n + 5, DT)
    buf[:n] = np.asarray(kw[lead], DT).reshape(-1)
    return {lead: buf[:n].reshape(shape), "out": buf[5:].reshape(shape)}


def _out_containing(arg, kw, shape):
    """An `out` whose first bytes hold the per-channel input `arg` (same values)."""
    value = np.asarray(kw[arg])
    out = np.zeros(shape, DT)
    view = out.reshape(-1).view(np.uint8)[:value.nbytes].view(value.dtype)
    view[:] = value
    return {"out": out, arg: view}


def axis_cases(ndim=len(SHAPE)):
    table = [(f"{ndim}", lambda: ndim, ValueError),
             (f"{-ndim - 1}", lambda: -ndim - 1, ValueError),
             ("99", lambda: 99, ValueError),
             ("float", lambda: 1.0, TypeError),
             ("np.float64", lambda: np.float64(1), TypeError),
             ("str", lambda: "1", TypeError),
             ("None", lambda: None, TypeError),
             ("bool", lambda: True, TypeError),
             ("list", lambda: [1], TypeError),
             ("masked-0-d", lambda: np.ma.array(1, mask=True), TypeError)]
    return cases("axis", table)


NON_NUMBERS = [("str", lambda: "0.5", TypeError),
               ("None", lambda: None, TypeError),
               ("list", lambda: [0.5], TypeError),
               ("bool", lambda: True, TypeError),
               ("complex", lambda: 0.5j, TypeError),
               ("array-1", lambda: np.array([0.5]), TypeError),
               # (0-d masked arrays: item() and float() read the data under the mask)
               ("masked-0-d", lambda: np.ma.array(0.5, mask=True), TypeError),
               ("np.ma.masked", lambda: np.ma.masked, TypeError)]
NON_FINITE = [("nan", lambda: float("nan"), ValueError),
              ("inf", lambda: float("inf"), ValueError),
              ("-inf", lambda: float("-inf"), ValueError),
              ("np.float32-nan", lambda: np.float32("nan"), ValueError)]


def eps_cases(arg="eps"):
    return cases(arg, NON_FINITE + NON_NUMBERS + [("negative", lambda: -1e-5, ValueError)])


def momentum_cases(allow_none=False):
    table = NON_FINITE + NON_NUMBERS
    if allow_none:
        table = [t for t in table if t[0] != "None"]
    return cases("momentum", table)


def p_cases():
    return cases("p", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.1, ValueError),
                                                  ("above-1", lambda: 1.5, ValueError),
                                                  ("just-above-1", lambda: np.nextafter(1.0, 2.0), ValueError)])


def rate_cases():
    """Gaussian dropout's rate: [0, 1), 1 itself refused (an infinite standard deviation)."""
    return cases("rate", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.1, ValueError),
                                                     ("1", lambda: 1.0, ValueError),
                                                     ("above-1", lambda: 1.5, ValueError)])


def stddev_cases():
    return cases("stddev", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.1, ValueError)])


def u64_cases(arg, allow_none=False):
    table = [("-1", lambda: -1, ValueError),
             ("np.int64(-1)", lambda: np.int64(-1), ValueError),
             ("2**64", lambda: 2**64, ValueError),
             ("2**70", lambda: 2**70, ValueError),
             ("float", lambda: 1.0, TypeError),
             ("np.float64", lambda: np.float64(1), TypeError),
             ("str", lambda: "1", TypeError),
             ("bool", lambda: True, TypeError),
             ("masked-0-d", lambda: np.ma.array(1, mask=True), TypeError),
             ("list", lambda: [1], TypeError)]
    if not allow_none:
        table.append(("None", lambda: None, TypeError))
    return cases(arg, table)


def int_cases(arg, minimum, maximum=None):
    table = [(f"{minimum - 1}", lambda: minimum - 1, ValueError),
             ("-5", lambda: -5, ValueError),
             ("float", lambda: 1.5, TypeError),
             ("str", lambda: "1", TypeError),
             ("None", lambda: None, TypeError),
             ("bool", lambda: True, TypeError)]
    if maximum is not None:
        table.append((f"{maximum}", lambda: maximum, ValueError))
    return cases(arg, table)


def count_cases():
    """The positive count of batch_norm_backward_apply: a number, or one per channel."""
    table = [("0", lambda: 0, ValueError), ("-1", lambda: -1, ValueError)]
    table += [t for t in NON_FINITE + NON_NUMBERS if t[0] not in ("array-1", "list")]
    table += [("list-of-1", lambda: [0.5], ValueError),
              ("per-channel-C+1", lambda: np.full(C + 1, 20), ValueError),
              ("per-channel-2-d", lambda: np.full((1, C), 20), ValueError),
              ("per-channel-with-a-0", lambda: np.array([20] * (C - 1) + [0]), ValueError),
              ("per-channel-nan", lambda: np.array([20.0] * (C - 1) + [np.nan]), ValueError),
              ("per-channel-str", lambda: ["20"] * C, TypeError),
              ("per-channel-bool", lambda: np.ones(C, bool), TypeError)]
    return cases("count", table)


def shape_cases():
    table = [("negative", lambda: (2, -1), ValueError),
             ("negative-int", lambda: -1, ValueError),
             ("float", lambda: 2.5, TypeError),
             ("float-entry", lambda: (2.0, 3), TypeError),
             ("str", lambda: "ab", TypeError),
             ("None", lambda: None, TypeError),
             ("nested", lambda: [[1, 2]], TypeError),
             ("bool", lambda: True, TypeError),
             ("bool-entry", lambda: (True, 3), TypeError),
             ("more-elements-than-memory", lambda: (2**40, 2**40), ValueError)]
    return cases("shape", table)


def mask_cases():
    table = [("length-n/8-1", lambda: np.zeros(NBYTES - 1, np.uint8), ValueError),
             ("length-n/8+1", lambda: np.zeros(NBYTES + 1, np.uint8), ValueError),
             ("length-0", lambda: np.zeros(0, np.uint8), ValueError),
             ("unpacked", lambda: np.ones(math.prod(SHAPE), np.uint8), ValueError),
             ("2-d", lambda: np.zeros((1, NBYTES), np.uint8), ValueError),
             ("0-d", lambda: np.uint8(255), ValueError),
             ("list-of-ints", lambda: [255] * NBYTES, TypeError),
             ("ragged-list", lambda: [[1], [1, 2]], ValueError),
             ("None", lambda: None, TypeError),
             ("str", lambda: "abc", TypeError)]
    table += [(f"dtype-{np.dtype(dt).name}", (lambda dt=dt: np.zeros(NBYTES, dt)), TypeError)
              for dt in (np.int8, np.uint16, np.int64, np.bool_, np.float32, object)]
    table += foreign_arrays(lambda: np.full(NBYTES, 0x5A, np.uint8), grad=False)
    return cases("mask", table)


def noise_shape_cases():
    table = [("fewer-entries", lambda: SHAPE[:-1], ValueError),
             ("more-entries", lambda: SHAPE + (1,), ValueError),
             ("entry-not-1-or-extent", lambda: SHAPE[:-1] + (2,), ValueError),
             ("entry-0", lambda: SHAPE[:-1] + (0,), ValueError),
             ("None-entry-and-fewer-entries", lambda: (None,) + SHAPE[1:-1], ValueError),
             ("larger-entry", lambda: SHAPE[:-1] + (10,), ValueError),
             ("int", lambda: 5, TypeError),
             ("float-entry", lambda: SHAPE[:-1] + (1.5,), TypeError),
             ("bool-entry", lambda: (SHAPE[0], True, SHAPE[2]), TypeError),
             ("str", lambda: "abc", TypeError)]
    return cases("noise_shape", table)


def merge_count_cases():
    table = [(f"dtype-{np.dtype(dt).name}", (lambda dt=dt: np.ones(W, dt)), TypeError)
             for dt in (np.bool_, np.float16, np.complex128, object)]
    table += [("str", lambda: ["a", "b"], TypeError),
              ("length-W+1", lambda: np.ones(W + 1, np.int64), ValueError),
              ("scalar", lambda: 5, ValueError),
              ("shape-(W,C+1)", lambda: np.ones((W, C + 1), np.int64), ValueError),
              ("negative", lambda: np.array([5, -1]), ValueError),
              ("nan", lambda: np.array([5.0, np.nan]), ValueError),
              ("inf", lambda: np.array([5.0, np.inf]), ValueError),
              ("ragged-list", lambda: [[1], [1, 2]], ValueError),
              ("None", lambda: None, TypeError)]
    return cases("count", table)


def merge_stat_cases(arg):
    table = [("1-d", lambda: np.ones(C), ValueError),
             ("3-d", lambda: np.ones((W, C, 1)), ValueError),
             ("shape-(W+1,C)", lambda: np.ones((W + 1, C)), ValueError),
             ("python-float", lambda: 1.0, ValueError),
             ("zero-workers", lambda: np.ones((0, C)), ValueError)]
    table += foreign_arrays(lambda: positive((W, C), np.float64))
    return dtype_cases(arg, (W, C)) + cases(arg, table)


def stats_cases():
    stats = pybn.BatchNormStats
    table = [("None", lambda: None, TypeError),
             ("int", lambda: 5, TypeError),
             ("pair", lambda: (5, np.ones(C)), TypeError),
             ("count-0", lambda: stats(0, np.zeros(C), np.ones(C)), ValueError),
             ("count-negative", lambda: stats(-2, np.zeros(C), np.ones(C)), ValueError),
             ("count-per-channel-with-a-0", lambda: stats(np.array([5, 0, 5]), np.zeros(C), np.ones(C)), ValueError),
             ("count-str", lambda: stats("5", np.zeros(C), np.ones(C)), TypeError),
             ("count-wrong-length", lambda: stats(np.ones(C + 1), np.zeros(C), np.ones(C)), ValueError),
             ("m2-int", lambda: stats(5, np.zeros(C), np.ones(C, np.int64)), TypeError),
             ("m2-2-d", lambda: stats(5, np.zeros(C), np.ones((1, C))), ValueError),
             ("m2-None", lambda: stats(5, np.zeros(C), None), TypeError),
             ("m2-negative", lambda: stats(5, np.zeros(C), np.array([1.0, -1e-12, 1.0])), ValueError),
             ("count-nan", lambda: stats(float("nan"), np.zeros(C), np.ones(C)), ValueError),
             ("count-inf", lambda: stats(float("inf"), np.zeros(C), np.ones(C)), ValueError),
             ("m2-masked", lambda: stats(5, np.zeros(C), np.ma.masked_array(np.ones(C), [0, 1, 0])), TypeError),
             ("m2-torch-requires-grad", lambda: stats(5, np.zeros(C), __import__("torch").ones(C, requires_grad=True)),
              TypeError)]
    return cases("stats", table)


def fold_weight_cases(pointwise=False):
    table = [("1-d", lambda: np.ones(C, DT), ValueError),
             ("0-d", lambda: np.float32(1), ValueError),
             ("python-float", lambda: 1.0, ValueError)]
    if pointwise:
        table.append(("kernel-3x3", lambda: np.ones((5, C, 3, 3), DT), ValueError))
    shape = (5, C) if pointwise else (C, 2, 3, 3)
    table += foreign_arrays(lambda: rand(shape))
    return dtype_cases("weight", shape) + cases("weight", table)


def negative_variance():
    return cases("running_var", [("negative-entry", lambda: np.array([1.0, -0.5, 1.0], DT), ValueError)])


# ------------------------------------------------------------ the functions

def bn_train_good():
    return dict(x=rand(SHAPE), weight=positive(seed=2), bias=rand((C,), seed=3),
                running_mean=rand((C,), seed=4), running_var=positive(seed=5), momentum=0.1, eps=1e-5,
                axis=1, relu=False, out=None)


def bn_infer_good():
    return dict(x=rand(SHAPE), running_mean=rand((C,), seed=4), running_var=positive(seed=5),
                weight=positive(seed=2), bias=rand((C,), seed=3), eps=1e-5, axis=1, relu=False, out=None)


def backward_good(**extra):
    kw = dict(dy=rand(SHAPE, seed=6), x=rand(SHAPE), mean=rand((C,), seed=4), invstd=positive(seed=5),
              axis=1, y=None)
    kw.update(extra)
    return kw


def sums_good():
    return backward_good(sum_dy=rand((C,), np.float64, seed=7), sum_dy_xhat=rand((C,), np.float64, seed=8),
                         count=20, weight=positive(seed=2), out=None)


def fold_conv_good():
    return dict(weight=rand((C, 2, 3, 3)), bias=rand((C,), seed=3), running_mean=rand((C,), seed=4),
                running_var=positive(seed=5), gamma=positive(seed=2), beta=rand((C,), seed=9), eps=1e-5,
                transposed=False, groups=1)


def fold_linear_good():
    kw = fold_conv_good()
    del kw["transposed"], kw["groups"]
    kw.update(weight=rand((5, C)), bias=rand((5,), seed=3))
    return kw


def layer_state(kw):
    layer = kw["layer"]
    return [a for a in (getattr(layer, k, None) for k in ("running_mean", "running_var", "weight", "bias"))
            if isinstance(a, np.ndarray)]


def bn_layer_good():
    return dict(layer=pybn.nn.BatchNorm(C), x=rand(SHAPE))


def bn_layer_backward_good():
    layer = pybn.nn.BatchNorm(C)
    layer(rand(SHAPE))
    return dict(layer=layer, dy=rand(SHAPE, seed=6))


def dropout_layer_backward_good():
    layer = pybn.nn.Dropout(0.5, seed=1)
    layer(rand(SHAPE))
    return dict(layer=layer, dy=rand(SHAPE, seed=6))


def noise_layer_backward_good():
    layer = pybn.nn.AlphaDropout(0.5, seed=1)
    layer(rand(SHAPE))
    return dict(layer=layer, dy=rand(SHAPE, seed=6))


def recalibrate_good():
    layer = pybn.nn.BatchNorm(C)
    layer.running_mean[...] = [0.5, -1.0, 2.0]
    return dict(model=layer, batches=[rand(SHAPE, seed=s) for s in range(3)], forward=None, comm=None)


SHAPE4 = (2, C, 5, 6)   # DropBlock's (N, C, H, W)


def drop_block_good():
    return dict(x=rand(SHAPE4), p=0.5, block_size=3, seed=1, offset=0, gamma_scale=1.0, couple_channels=True,
                batchwise=False, scale_by_keep=True, axis=1, out=None)


def bool_cases(arg):
    return cases(arg, [("int", lambda: 1, TypeError), ("None", lambda: None, TypeError),
                       ("str", lambda: "yes", TypeError), ("array", lambda: np.array([True]), TypeError)])


def mode_cases():
    return cases("mode", [("unknown", lambda: "rows", ValueError), ("upper-case", lambda: "ROW", ValueError),
                          ("None", lambda: None, TypeError), ("int", lambda: 0, TypeError)])


def layer_call(kw_name):
    def call(layer, **kw):
        return layer(kw[kw_name]) if kw_name == "x" else layer.backward(kw[kw_name])
    return call


def load_state(layer, state_dict):
    layer.load_state_dict(state_dict)


def state_good():
    layer = pybn.nn.BatchNorm(C)
    layer(rand(SHAPE))   # running statistics and num_batches_tracked away from their initial values
    state = layer.state_dict()
    state["weight"] = positive(seed=2)
    return dict(layer=layer, state_dict=state)


def state_cases():
    """load_state_dict: a bad value under one key; the message names the key."""
    def entry(key, value_fn):
        return lambda kw: {"state_dict": {**kw["state_dict"], key: value_fn()}}

    def without(key):
        return lambda kw: {"state_dict": {k: v for k, v in kw["state_dict"].items() if k != key}}

    torch = __import__("torch")
    rows = [("list", put("state_dict", lambda: [1, 2]), TypeError, ("state_dict",)),
            ("None", put("state_dict", lambda: None), TypeError, ("state_dict",)),
            ("missing-weight", without("weight"), KeyError, ("weight",)),
            ("extra-key", entry("momentum", lambda: np.array(0.1)), KeyError, ("momentum",))]
    table = {
        "num_batches_tracked": [("-1", lambda: np.array(-1), ValueError),
                                ("2**63", lambda: np.uint64(2**63), ValueError),
                                ("1.5", lambda: np.array(1.5), TypeError), ("bool", lambda: np.array(True), TypeError),
                                ("str", lambda: "3", TypeError), ("shape-(1,)", lambda: np.array([3]), ValueError),
                                ("requires-grad", lambda: torch.tensor(3.0, requires_grad=True), TypeError)],
        "weight": [("overflows-float32", lambda: np.full(C, 1e300), ValueError),
                   ("complex", lambda: np.ones(C, complex), TypeError),
                   ("object", lambda: np.ones(C, object), TypeError),
                   ("length-C+1", lambda: np.ones(C + 1, DT), ValueError)] + foreign_arrays(lambda: positive()),
        "running_var": [("negative-entry", lambda: np.array([1.0, -1e-30, 1.0], DT), ValueError),
                        ("-inf", lambda: np.array([1.0, -np.inf, 1.0]), ValueError)],
        "running_mean": [("str", lambda: "abc", TypeError)],
    }
    for key, key_rows in table.items():
        rows += [(f"{key}-{label}", entry(key, value_fn), exc, (key,)) for label, value_fn, exc in key_rows]
    return rows


def keras_good():
    return dict(gamma=positive(seed=2), beta=rand((C,), seed=3), moving_mean=rand((C,), seed=4),
                moving_variance=positive(seed=5), momentum=0.99, epsilon=1e-3, axis=-1)


def keras_cases(arg, variance=False):
    table = [("length-C+1", lambda: np.ones(C + 1, DT), ValueError),
             ("shape-(1,C)", lambda: np.ones((1, C), DT), ValueError),
             ("complex", lambda: np.ones(C, complex), TypeError),
             ("object", lambda: np.ones(C, object), TypeError),
             ("str", lambda: "abc", TypeError),
             ("ragged-list", lambda: [[1.0], [1.0, 2.0]], ValueError)] + foreign_arrays(lambda: positive())
    if variance:
        table += [("negative-entry", lambda: np.array([1.0, -0.5, 1.0], DT), ValueError),
                  ("None", lambda: None, TypeError)]
    return cases(arg, table)


def residual_cases():
    """`residual=` of a forward: x's shape and dtype (another float dtype is refused, not
    converted), and `out` may be it exactly (an in-place add) but not overlap it partially."""
    rows = matching_cases("residual", required=False)
    rows.append(("overlaps-out-shifted", lambda kw: _shifted_pair_of("residual", "out"), ValueError))
    return rows


def _shifted_pair_of(a, b):
    """Two arrays of SHAPE, views of one buffer 5 elements apart."""
    n = math.prod(SHAPE)
    buf = rand((n + 5,))
    return {a: buf[:n].reshape(SHAPE), b: buf[5:].reshape(SHAPE)}


def residual_flag_cases():
    """`residual=` of a backward: a bool (an array there is a forward's argument, mistaken)."""
    return cases("residual", [("array", lambda: rand(SHAPE), TypeError), ("int", lambda: 1, TypeError),
                              ("None", lambda: None, TypeError), ("str", lambda: "yes", TypeError)])


def d_residual_out_cases():
    """`d_residual_out=` (with residual=True): an output like `out`; it may be dy itself, but
    share memory with nothing else (nor with dy when dx is written there)."""
    def with_residual(value_fn):
        return lambda kw: {"residual": True, "d_residual_out": value_fn(kw)}

    rows = [(label, with_residual(lambda kw, label=label: _bad_out(label, SHAPE)), exc)
            for label, _, exc in bad_outs(SHAPE, DT)]
    rows += [("without-residual", lambda kw: {"d_residual_out": np.zeros(SHAPE, DT)}, ValueError),
             ("python-float", with_residual(lambda kw: 0.0), TypeError),
             ("same-array-as-x", with_residual(lambda kw: kw["x"]), ValueError),
             ("same-array-as-out", lambda kw: {"residual": True, "out": kw["dy"], "d_residual_out": kw["dy"]},
              ValueError),
             ("overlaps-dy-shifted", lambda kw: {"residual": True, **_shifted_pair_of("dy", "d_residual_out")},
              ValueError)]
    rows += [(label, with_residual(lambda kw, f=f: f()), exc) for label, f, exc in foreign_arrays(
        lambda: np.zeros(SHAPE, DT))]
    return rows


SPECS = [
    Spec("batch_norm_train", pybn.batch_norm_train, bn_train_good, {
        "x": data_cases("x") + cases("x", [   # training needs 2 values per channel
            ("one-value-per-channel", lambda: np.ones((1, C, 1), DT), ValueError),
            ("empty-batch", lambda: np.ones((0, C, 5), DT), ValueError)]),
        "weight": per_channel_cases("weight"),
        "bias": per_channel_cases("bias"),
        "running_mean": in_place_cases("running_mean", "running_var"),
        "running_var": in_place_cases("running_var", "running_mean"),
        "momentum": momentum_cases(),
        "eps": eps_cases(),
        "axis": axis_cases(),
        "out": out_cases(["x"], per_channel=["weight", "bias", "running_mean", "running_var"]),
        "residual": residual_cases(),
    }),
    Spec("batch_norm_infer", pybn.batch_norm_infer, bn_infer_good, {
        "x": data_cases("x"),
        "running_mean": per_channel_cases("running_mean", required=True),
        "running_var": per_channel_cases("running_var", required=True),
        "weight": per_channel_cases("weight"),
        "bias": per_channel_cases("bias"),
        "eps": eps_cases(),
        "axis": axis_cases(),
        "out": out_cases(["x"], per_channel=["running_mean", "running_var", "weight", "bias"]),
        "residual": residual_cases(),
    }),
    Spec("batch_norm_backward", pybn.batch_norm_backward,
         lambda: backward_good(weight=positive(seed=2), training=True, out=None), {
             "dy": data_cases("dy"),
             "x": matching_cases("x"),
             "mean": per_channel_cases("mean", required=True),
             "invstd": per_channel_cases("invstd", required=True),
             "weight": per_channel_cases("weight"),
             "axis": axis_cases(),
             "y": matching_cases("y", required=False),
             "out": out_cases(["dy", "x"], per_channel=["mean", "invstd", "weight"]),
             "residual": residual_flag_cases(),
             "d_residual_out": d_residual_out_cases(),
         }),
    Spec("batch_norm_stats", pybn.batch_norm_stats, lambda: dict(x=rand(SHAPE), axis=1), {
        "x": data_cases("x"),
        "axis": axis_cases(),
    }),
    Spec("batch_norm_merge_stats", pybn.batch_norm_merge_stats,
         lambda: dict(count=np.array([20, 20]), mean=rand((W, C), np.float64), m2=positive((W, C), np.float64)), {
             "count": merge_count_cases(),
             "mean": merge_stat_cases("mean") + [
                 ("zero-workers-all-three", lambda kw: dict(count=np.zeros(0, np.int64), mean=np.zeros((0, C)),
                                                            m2=np.zeros((0, C))), ValueError)],
             "m2": merge_stat_cases("m2") + cases("m2", [
                 ("negative-entry", lambda: np.array([[1.0, 2.0, 3.0], [1.0, -0.5, 1.0]]), ValueError)]),
         }),
    Spec("batch_norm_invstd", pybn.batch_norm_invstd,
         lambda: dict(stats=pybn.BatchNormStats(20, rand((C,), np.float64), positive(dtype=np.float64)), eps=1e-5), {
             "stats": stats_cases(),
             "eps": eps_cases(),
         }),
    Spec("batch_norm_apply", pybn.batch_norm_apply,
         lambda: dict(x=rand(SHAPE), mean=rand((C,), seed=4), invstd=positive(dtype=np.float64, seed=5),
                      weight=positive(seed=2), bias=rand((C,), seed=3), axis=1, relu=False, out=None), {
             "x": data_cases("x"),
             "mean": per_channel_cases("mean", required=True),
             "invstd": per_channel_cases("invstd", required=True),
             "weight": per_channel_cases("weight"),
             "bias": per_channel_cases("bias"),
             "axis": axis_cases(),
             "out": out_cases(["x"], per_channel=["mean", "invstd", "weight", "bias"]),
             "residual": residual_cases(),
         }),
    Spec("batch_norm_backward_reduce", pybn.batch_norm_backward_reduce, backward_good, {
        "dy": data_cases("dy"),
        "x": matching_cases("x"),
        "mean": per_channel_cases("mean", required=True),
        "invstd": per_channel_cases("invstd", required=True),
        "axis": axis_cases(),
        "y": matching_cases("y", required=False),
    }),
    Spec("batch_norm_backward_apply", pybn.batch_norm_backward_apply, sums_good, {
        "dy": data_cases("dy"),
        "x": matching_cases("x"),
        "mean": per_channel_cases("mean", required=True),
        "invstd": per_channel_cases("invstd", required=True),
        "sum_dy": per_channel_cases("sum_dy", required=True),
        "sum_dy_xhat": per_channel_cases("sum_dy_xhat", required=True),
        "count": count_cases(),
        "weight": per_channel_cases("weight"),
        "axis": axis_cases(),
        "y": matching_cases("y", required=False),
        "out": out_cases(["dy", "x"], per_channel=["mean", "invstd", "sum_dy", "sum_dy_xhat", "weight"]),
        "residual": residual_flag_cases(),
        "d_residual_out": d_residual_out_cases(),
    }),
    Spec("dropout", pybn.dropout,
         lambda: dict(x=rand(SHAPE), p=0.5, seed=1, offset=0, noise_shape=None, out=None), {
             "x": data_cases("x", ndim_min=0),
             "p": p_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "noise_shape": noise_shape_cases(),
             "relu": bool_cases("relu"),
             "out": out_cases(["x"]),
         }),
    Spec("dropout_mask", pybn.dropout_mask, lambda: dict(shape=SHAPE, p=0.5, seed=1, offset=0), {
        "shape": shape_cases(),
        "p": p_cases(),
        "seed": u64_cases("seed"),
        "offset": u64_cases("offset"),
    }),
    Spec("dropout_apply", pybn.dropout_apply,
         lambda: dict(x=rand(SHAPE), mask=np.full(NBYTES, 0x5A, np.uint8), p=0.5, noise_shape=None, out=None), {
             "x": data_cases("x", ndim_min=0),
             "mask": mask_cases(),
             "p": p_cases(),
             "noise_shape": noise_shape_cases(),
             "relu": bool_cases("relu"),
             "out": out_cases(["x"], per_channel=["mask"]),
         }),
    Spec("relu_dropout_backward", pybn.relu_dropout_backward,
         lambda: dict(dy=rand(SHAPE), y=rand(SHAPE), p=0.5, out=None), {
             "dy": data_cases("dy", ndim_min=0),
             "y": matching_cases("y"),
             "p": p_cases(),
             "out": out_cases(["dy", "y"]),
         }),
    Spec("drop_path", pybn.drop_path,
         lambda: dict(x=rand(SHAPE), p=0.5, seed=1, offset=0, mode="row", out=None), {
             "x": data_cases("x", ndim_min=0) + cases("x", [("0-d-row-mode", lambda: np.float32(1.0), ValueError)]),
             "p": p_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "mode": mode_cases(),
             "out": out_cases(["x"]),
         }),
    Spec("alpha_dropout", pybn.alpha_dropout,
         lambda: dict(x=rand(SHAPE), p=0.5, seed=1, offset=0, out=None), {
             "x": data_cases("x", ndim_min=0),
             "p": p_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "out": out_cases(["x"]),
         }),
    Spec("alpha_dropout_backward", pybn.alpha_dropout_backward,
         lambda: dict(dy=rand(SHAPE), p=0.5, seed=1, offset=0, out=None), {
             "dy": data_cases("dy", ndim_min=0),
             "p": p_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "out": out_cases(["dy"]),
         }),
    Spec("gaussian_dropout", pybn.gaussian_dropout,
         lambda: dict(x=rand(SHAPE), rate=0.3, seed=1, offset=0, out=None), {
             "x": data_cases("x", ndim_min=0),
             "rate": rate_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "out": out_cases(["x"]),
         }),
    Spec("gaussian_noise", pybn.gaussian_noise,
         lambda: dict(x=rand(SHAPE), stddev=0.5, seed=1, offset=0, out=None), {
             "x": data_cases("x", ndim_min=0),
             "stddev": stddev_cases(),
             "seed": u64_cases("seed"),
             "offset": u64_cases("offset"),
             "out": out_cases(["x"]),
         }),
    Spec("normal_counters_used", pybn.normal_counters_used, lambda: dict(n=100), {
        "n": int_cases("n", 0),
    }),
    Spec("drop_block", pybn.drop_block, drop_block_good, {
        "x": data_cases("x", shape=SHAPE4) + cases("x", [("3-d", lambda: rand(SHAPE), ValueError),
                                                         ("5-d", lambda: rand(SHAPE4 + (1,)), ValueError)]),
        "p": p_cases(),
        "block_size": int_cases("block_size", 1),
        "seed": u64_cases("seed"),
        "offset": u64_cases("offset"),
        "gamma_scale": cases("gamma_scale", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.5, ValueError)]),
        "couple_channels": bool_cases("couple_channels"),
        "batchwise": bool_cases("batchwise"),
        "scale_by_keep": bool_cases("scale_by_keep"),
        "axis": cases("axis", [("2", lambda: 2, ValueError), ("0", lambda: 0, ValueError),
                               ("-2", lambda: -2, ValueError), ("4", lambda: 4, ValueError),
                               ("float", lambda: 1.0, TypeError),
                               ("None", lambda: None, TypeError), ("bool", lambda: True, TypeError)]),
        "out": out_cases(["x"], shape=SHAPE4),
    }),
    Spec("drop_block_mask", pybn.drop_block_mask,
         lambda: dict(shape=SHAPE4, p=0.5, block_size=3, seed=1, offset=0, gamma_scale=1.0, couple_channels=True,
                      batchwise=False), {
        "shape": cases("shape", [("3-d", lambda: (2, 3, 4), ValueError),
                                 ("negative", lambda: (2, 3, -1, 4), ValueError),
                                 ("float-entry", lambda: (2.0, 3, 4, 4), TypeError), ("str", lambda: "abcd", TypeError),
                                 ("None", lambda: None, TypeError), ("int", lambda: 5, TypeError),
                                 ("more-elements-than-memory", lambda: (2**40, 1, 2**40, 1), ValueError)]),
        "p": p_cases(),
        "block_size": int_cases("block_size", 1),
        "seed": u64_cases("seed"),
        "offset": u64_cases("offset"),
        "gamma_scale": cases("gamma_scale", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.5, ValueError)]),
        "couple_channels": bool_cases("couple_channels"),
        "batchwise": bool_cases("batchwise"),
    }),
    Spec("recalibrate", pybn.recalibrate, recalibrate_good, {
        "model": cases("model", [("object", lambda: object(), TypeError), ("str", lambda: "bn", TypeError),
                                 ("list-of-arrays", lambda: [np.ones(C)], TypeError),
                                 ("no-batch-norm", lambda: [pybn.nn.Dropout(0.5, seed=1)], ValueError)]),
        "batches": cases("batches", [("int", lambda: 5, TypeError), ("None", lambda: None, TypeError),
                                     ("empty", list, ValueError)]) + [
            ("one-value-per-channel", put("batches", lambda: [rand((1, C))]), ValueError, ("batches", "x"))],
        "forward": cases("forward", [("int", lambda: 5, TypeError), ("str", lambda: "run", TypeError)]),
        "comm": cases("comm", [("object", lambda: object(), TypeError), ("str", lambda: "gloo", TypeError)]),
    }, watch=lambda kw: layer_state({"layer": kw["model"]}) if isinstance(kw["model"], pybn.nn.BatchNorm) else []),
    Spec("dropout_scale", pybn.dropout_scale, lambda: dict(p=0.3), {
        "p": p_cases(),
    }),
    Spec("counters_used", pybn.counters_used, lambda: dict(n=100), {
        "n": int_cases("n", 0),
    }),
    Spec("fold_conv_bn", pybn.fold_conv_bn, fold_conv_good, {
        "weight": fold_weight_cases(),
        "bias": per_channel_cases("bias"),
        "running_mean": per_channel_cases("running_mean", required=True),
        "running_var": per_channel_cases("running_var", required=True) + negative_variance(),
        "gamma": per_channel_cases("gamma"),
        "beta": per_channel_cases("beta"),
        "eps": eps_cases(),
        "groups": int_cases("groups", 1) + cases("groups", [("not-dividing", lambda: 2, ValueError)]),
    }),
    Spec("fold_bn_linear", pybn.fold_bn_linear, fold_linear_good, {
        "weight": fold_weight_cases(pointwise=True),
        "bias": per_channel_cases("bias", channels=5),
        "running_mean": per_channel_cases("running_mean", required=True),
        "running_var": per_channel_cases("running_var", required=True) + negative_variance(),
        "gamma": per_channel_cases("gamma"),
        "beta": per_channel_cases("beta"),
        "eps": eps_cases(),
    }),
    Spec("set_num_threads", pybn.set_num_threads, lambda: dict(n=1), {
        "n": int_cases("n", 1, maximum=2**31),
    }),
    Spec("nn.BatchNorm", pybn.nn.BatchNorm, lambda: dict(num_features=C), {
        "num_features": int_cases("num_features", 1) + cases("num_features", [("2**62", lambda: 2**62, ValueError)]),
        "axis": [r for r in axis_cases() if r[2] is TypeError],   # the range needs x: see nn.BatchNorm.__call__
        "eps": eps_cases(),
        "momentum": momentum_cases(allow_none=True),
        "dtype": cases("dtype", [("int32", lambda: "int32", TypeError),
                                 ("longdouble", lambda: np.longdouble, TypeError),
                                 ("complex", lambda: complex, TypeError), ("not-a-dtype", lambda: "foo", TypeError)]),
    }),
    Spec("nn.BatchNorm.__call__", layer_call("x"), bn_layer_good, {
        "x": dtype_cases("x", SHAPE) + cases("x", [
            ("1-d", lambda: np.ones(5, DT), ValueError),
            ("0-d", lambda: np.float32(1.0), ValueError),
            ("channels-C+1", lambda: np.ones((4, C + 1, 5), DT), ValueError),
            ("float64-vs-float32", lambda: np.ones(SHAPE, np.float64), TypeError),
            ("one-value-per-channel", lambda: np.ones((1, C), DT), ValueError)] + foreign_arrays(lambda: rand(SHAPE))),
    }, watch=layer_state),
    Spec("nn.BatchNorm.backward", layer_call("dy"), bn_layer_backward_good, {
        "dy": matching_cases("dy"),
    }, watch=layer_state),
    Spec("nn.BatchNorm.__call__[residual]", lambda layer, x, residual: layer(x, residual),
         lambda: dict(bn_layer_good(), residual=rand(SHAPE, seed=7)), {
             "x": cases("x", [("float64-vs-float32", lambda: np.ones(SHAPE, np.float64), TypeError)]),
             "residual": matching_cases("residual", required=False),
         }, watch=layer_state),
    Spec("nn.Dropout", pybn.nn.Dropout, lambda: dict(p=0.5, seed=1, noise_shape=None), {
        "p": p_cases(),
        "seed": u64_cases("seed", allow_none=True),
        "noise_shape": cases("noise_shape", [("int", lambda: 5, TypeError),
                                             ("float-entry", lambda: (4, 1.5), TypeError),
                                             ("negative-entry", lambda: (None, -1), ValueError)]),
    }),
    Spec("nn.DropPath", pybn.nn.DropPath, lambda: dict(p=0.5, mode="row", seed=1, rank=0, world_size=1), {
        "p": p_cases(),
        "mode": mode_cases(),
        "seed": u64_cases("seed", allow_none=True),
        "rank": int_cases("rank", 0) + cases("rank", [("world_size", lambda: 1, ValueError)]),
        "world_size": int_cases("world_size", 1),
    }),
    Spec("nn.AlphaDropout", pybn.nn.AlphaDropout, lambda: dict(p=0.5, seed=1), {
        "p": p_cases(),
        "seed": u64_cases("seed", allow_none=True),
    }),
    Spec("nn.GaussianDropout", pybn.nn.GaussianDropout, lambda: dict(rate=0.5, seed=1), {
        "rate": rate_cases(),
        "seed": u64_cases("seed", allow_none=True),
    }),
    Spec("nn.GaussianNoise", pybn.nn.GaussianNoise, lambda: dict(stddev=0.5, seed=1), {
        "stddev": stddev_cases(),
        "seed": u64_cases("seed", allow_none=True),
    }),
    Spec("nn.DropBlock2d", pybn.nn.DropBlock2d,
         lambda: dict(p=0.5, block_size=3, seed=1, gamma_scale=1.0, couple_channels=True, batchwise=False,
                      scale_by_keep=True, rank=0, world_size=1), {
             "p": p_cases(),
             "block_size": int_cases("block_size", 1),
             "seed": u64_cases("seed", allow_none=True),
             "gamma_scale": cases("gamma_scale", NON_FINITE + NON_NUMBERS + [("negative", lambda: -0.5, ValueError)]),
             "couple_channels": bool_cases("couple_channels"),
             "batchwise": bool_cases("batchwise"),
             "scale_by_keep": bool_cases("scale_by_keep"),
             "rank": int_cases("rank", 0) + cases("rank", [("world_size", lambda: 1, ValueError)]),
             "world_size": int_cases("world_size", 1),
         }),
    Spec("distributed.SyncBatchNorm", pybn.distributed.SyncBatchNorm, lambda: dict(num_features=C, comm=None), {
        "num_features": int_cases("num_features", 1),
        "comm": cases("comm", [("object", lambda: object(), TypeError), ("str", lambda: "gloo", TypeError),
                               ("int", lambda: 3, TypeError), ("ndarray", lambda: np.zeros(2), TypeError),
                               ("torch-tensor", lambda: __import__("torch").zeros(2), TypeError),
                               ("not-a-member", lambda: __import__("torch.distributed").distributed.GroupMember
                                .NON_GROUP_MEMBER, ValueError)]),
    }),
    Spec("nn.BatchNorm.load_state_dict", load_state, state_good, {
        "state_dict": state_cases(),
    }, watch=layer_state),
    Spec("nn.BatchNorm.from_keras", pybn.nn.BatchNorm.from_keras, keras_good, {
        "gamma": keras_cases("gamma"),
        "beta": keras_cases("beta"),
        # C is moving_mean's length: a wrong one is reported against the others' length
        "moving_mean": [(label, make, exc, ("moving_mean", "moving_variance"))
                        for label, make, exc in keras_cases("moving_mean")] + cases("moving_mean", [
            ("int", lambda: np.zeros(C, np.int64), TypeError), ("None", lambda: None, TypeError)]),
        "moving_variance": keras_cases("moving_variance", variance=True),
        "momentum": cases("momentum", NON_FINITE + NON_NUMBERS + [("1.5", lambda: 1.5, ValueError)]),
        "epsilon": eps_cases("epsilon"),
        "axis": [r for r in axis_cases() if r[2] is TypeError],
    }),
    Spec("nn.Dropout.__call__", layer_call("x"), lambda: dict(layer=pybn.nn.Dropout(0.5, seed=1), x=rand(SHAPE)), {
        "x": data_cases("x", ndim_min=0),
    }),
    Spec("nn.Dropout.backward", layer_call("dy"), dropout_layer_backward_good, {
        "dy": matching_cases("dy"),
    }),
    Spec("nn.GaussianNoise.__call__", layer_call("x"),
         lambda: dict(layer=pybn.nn.GaussianNoise(0.5, seed=1), x=rand(SHAPE)), {
             "x": data_cases("x", ndim_min=0),
         }),
    Spec("nn.AlphaDropout.backward", layer_call("dy"), noise_layer_backward_good, {
        "dy": matching_cases("dy"),
    }),
    Spec("nn.DropPath.__call__", layer_call("x"), lambda: dict(layer=pybn.nn.DropPath(0.5, seed=1), x=rand(SHAPE)), {
        "x": data_cases("x", ndim_min=1),  # (samples on axis 0)
    }),
    Spec("nn.GaussianDropout.__call__", layer_call("x"),
         lambda: dict(layer=pybn.nn.GaussianDropout(0.5, seed=1), x=rand(SHAPE)), {
             "x": data_cases("x", ndim_min=0),
         }),
    Spec("nn.DropBlock2d.__call__", layer_call("x"),
         lambda: dict(layer=pybn.nn.DropBlock2d(0.5, 3, seed=1), x=rand(SHAPE4)), {
             "x": data_cases("x", shape=SHAPE4) + cases("x", [("3-d", lambda: rand(SHAPE), ValueError)]),
         }),
]

# ------------------------------------------------------------ 16-bit data (docs/dtypes.md)
# x, y, dy, dx and out share one dtype; beside 16-bit data the parameters and statistics are
# float32: read-only per-channel inputs of any float dtype are converted (so a bfloat16 weight
# beside float16 x is a valid call), running statistics, updated in place, must be float32 or
# x's dtype. These specs start from float16 calls; their rows are the boundaries those rules
# add (another 16-bit dtype of the same size, float32 where x's dtype is required); every
# other bad value is the float32 matrix's.

H = np.dtype(np.float16)
BF16 = pybn._checks.bfloat16()   # None without ml_dtypes: then only float32 is "another dtype"
OTHERS = [np.dtype(np.float32)] + ([BF16] if BF16 is not None else [])


def other_dtypes(arg, shape, dtypes=OTHERS):
    """`arg` of each dtype in `dtypes` (not x's): a TypeError naming it."""
    return cases(arg, [(f"dtype-{dt.name}", (lambda dt=dt: rand(shape).astype(dt)), TypeError) for dt in dtypes])


def stats_of_another_dtype(arg):
    """In-place running statistics: float32 or x's float16 pass; bfloat16 and float64 do not."""
    dtypes = [np.dtype(np.float64)] + ([BF16] if BF16 is not None else [])
    return cases(arg, [(f"dtype-{dt.name}", (lambda dt=dt: positive().astype(dt)), TypeError) for dt in dtypes])


def half(kw):
    """`kw` with its data arrays (x, dy, y) in float16 and per-channel inputs of other float
    dtypes, which are accepted: a bfloat16 (else float64) weight, float64 mean, invstd, bias."""
    other = BF16 if BF16 is not None else np.dtype(np.float64)
    for k in ("x", "dy", "y"):
        if isinstance(kw.get(k), np.ndarray):
            kw[k] = kw[k].astype(H)
    if isinstance(kw.get("weight"), np.ndarray) and kw["weight"].ndim == 1:
        kw["weight"] = kw["weight"].astype(other)
    for k in ("mean", "invstd", "bias"):
        if isinstance(kw.get(k), np.ndarray):
            kw[k] = kw[k].astype(np.float64)
    return kw


def half_good(good, train=False):
    """The float16 form of a good call (`train`: with float16 running statistics, x's dtype)."""
    def make():
        kw = good()
        if train:
            kw["running_mean"], kw["running_var"] = kw["running_mean"].astype(H), kw["running_var"].astype(H)
        return half(kw)
    return make


def half_layer(cls_kw, forward=False):
    """A float16 layer (and its last forward on float16 x, for the backward rows)."""
    def make():
        layer = cls_kw()
        x = rand(SHAPE).astype(H)
        if forward:
            layer(x)
            return dict(layer=layer, dy=rand(SHAPE, seed=6).astype(H))
        return dict(layer=layer, x=x)
    return make


def packed_mask_of(dt):
    return lambda: np.zeros(NBYTES, dt)


def seeded_good(data, **kw):
    """A good call of a seeded element-wise function on SHAPE: its `data` argument, `kw`."""
    return lambda: {data: rand(SHAPE), **kw, "seed": 1, "offset": 0, "out": None}


HALF_SPECS = [
    Spec("batch_norm_train[float16]", pybn.batch_norm_train, half_good(bn_train_good, train=True), {
        "running_mean": stats_of_another_dtype("running_mean"),
        "running_var": stats_of_another_dtype("running_var"),
        "out": other_dtypes("out", SHAPE),
    }),
    Spec("batch_norm_infer[float16]", pybn.batch_norm_infer, half_good(bn_infer_good), {
        "out": other_dtypes("out", SHAPE),
    }),
    Spec("batch_norm_backward[float16]", pybn.batch_norm_backward,
         half_good(lambda: backward_good(weight=positive(seed=2), training=True, out=None)), {
             "x": other_dtypes("x", SHAPE),   # dy leads: x must match it
             "y": other_dtypes("y", SHAPE),
             "out": other_dtypes("out", SHAPE),
         }),
    Spec("batch_norm_apply[float16]", pybn.batch_norm_apply,
         half_good(lambda: dict(x=rand(SHAPE), mean=rand((C,), seed=4), invstd=positive(seed=5),
                                weight=positive(seed=2), bias=rand((C,), seed=3), axis=1, relu=False, out=None)), {
             "out": other_dtypes("out", SHAPE),
         }),
    Spec("batch_norm_backward_reduce[float16]", pybn.batch_norm_backward_reduce, half_good(backward_good), {
        "x": other_dtypes("x", SHAPE),
        "y": other_dtypes("y", SHAPE),
    }),
    Spec("batch_norm_backward_apply[float16]", pybn.batch_norm_backward_apply, half_good(sums_good), {
        "x": other_dtypes("x", SHAPE),
        "out": other_dtypes("out", SHAPE),
    }),
    Spec("dropout[float16]", pybn.dropout,
         half_good(lambda: dict(x=rand(SHAPE), p=0.5, seed=1, offset=0, noise_shape=None, out=None)), {
             "out": other_dtypes("out", SHAPE),
         }),
    Spec("dropout_apply[float16]", pybn.dropout_apply,
         half_good(lambda: dict(x=rand(SHAPE), mask=np.full(NBYTES, 0x5A, np.uint8), p=0.5, noise_shape=None,
                                out=None)), {
             # a mask is packed bits: never x's (16-bit) dtype, even of the same itemsize as uint16
             "mask": cases("mask", [(f"dtype-{dt.name}", packed_mask_of(dt), TypeError) for dt in [H, *OTHERS[1:]]]),
             "out": other_dtypes("out", SHAPE),
         }),
    Spec("batch_norm_stats[float16]", pybn.batch_norm_stats, half_good(lambda: dict(x=rand(SHAPE), axis=1)), {
        "x": cases("x", [("int16", lambda: rand(SHAPE).astype(np.int16), TypeError)]),
    }),
    Spec("relu_dropout_backward[float16]", pybn.relu_dropout_backward,
         half_good(lambda: dict(dy=rand(SHAPE), y=rand(SHAPE), p=0.5, out=None)), {
             "y": other_dtypes("y", SHAPE),
             "out": other_dtypes("out", SHAPE),
         }),
    *[Spec(f"{fn.__name__}[float16]", fn, half_good(good), {"out": other_dtypes("out", SHAPE)})
      for fn, good in ((pybn.drop_path, seeded_good("x", p=0.5)), (pybn.alpha_dropout, seeded_good("x", p=0.5)),
                       (pybn.alpha_dropout_backward, seeded_good("dy", p=0.5)),
                       (pybn.gaussian_dropout, seeded_good("x", rate=0.3)),
                       (pybn.gaussian_noise, seeded_good("x", stddev=0.5)))],
    Spec("drop_block[float16]", pybn.drop_block, half_good(drop_block_good), {
        "out": other_dtypes("out", SHAPE4),
    }),
    Spec("nn.BatchNorm.__call__[float16]", layer_call("x"), half_layer(lambda: pybn.nn.BatchNorm(C, dtype=H)), {
        "x": other_dtypes("x", SHAPE),
    }, watch=layer_state),
    Spec("nn.BatchNorm.backward[float16]", layer_call("dy"),
         half_layer(lambda: pybn.nn.BatchNorm(C, dtype=H), forward=True), {
             "dy": other_dtypes("dy", SHAPE),
         }, watch=layer_state),
    Spec("nn.Dropout.backward[float16]", layer_call("dy"),
         half_layer(lambda: pybn.nn.Dropout(0.5, seed=1), forward=True), {
             "dy": other_dtypes("dy", SHAPE),
         }),
]


def test_running_statistics_of_another_dtype_are_told_what_they_may_be():
    """The message says which dtypes the statistics of float16 x may have (not "x (float32)")."""
    kw = half_good(bn_train_good, train=True)()
    kw["running_var"] = positive().astype(np.float64)
    msg = assert_raises_naming(TypeError, "running_var", pybn.batch_norm_train, **kw)
    assert "float64 is not float32 or float16" in msg


# Parameters that take any value: flags read with bool() as Python does, and the
# layer object the nn rows call.
FLAGS = {"relu", "training", "transposed", "layer", "affine", "track_running_stats"}


OVERLAP = re.compile(r"^(?:view-of|same-array-as|overlaps|contains)-(\w+?)(?:-shifted)?$")


def build_matrix():
    rows = []
    for spec in SPECS + HALF_SPECS:
        for arg, arg_cases in spec.args.items():
            for label, make, exc, *names in arg_cases:   # names: the message names one of these
                overlap = OVERLAP.match(label)
                if overlap:   # an overlap names both arrays
                    rows.append(Row(spec, arg, label, make, exc, (arg, overlap.group(1)), all_names=True))
                else:
                    rows.append(Row(spec, arg, label, make, exc, names[0] if names else (arg,)))
    return rows


MATRIX = build_matrix()
RUN = {"passed": 0}


def summary():
    """One line for the terminal summary (conftest.py)."""
    functions = {r.spec.name.split("[")[0] for r in MATRIX}   # "dropout[float16]" is dropout
    layers = {f for f in functions if f.startswith(("nn.", "distributed."))}
    arguments = len({(r.spec.name.split("[")[0], r.arg) for r in MATRIX})
    return (f"input matrix: {len(MATRIX)} cases over {len(functions)} functions ({len(functions) - len(layers)} "
            f"in pybn, {len(layers)} pybn.nn and pybn.distributed constructors and methods) and {arguments} "
            f"arguments ({RUN['passed']} passed in this run)")


@pytest.fixture
def restore_threads():
    n = pybn.get_num_threads()
    yield
    pybn.set_num_threads(n)


@pytest.mark.parametrize("row", MATRIX, ids=[r.id for r in MATRIX])
def test_bad_input(row, restore_threads):
    kw = row.spec.good()
    kw.update(row.make(kw))
    watched = [a for a in kw.values() if isinstance(a, np.ndarray)]
    if row.spec.watch is not None:
        watched += row.spec.watch(kw)
    before = [a.copy() for a in watched]
    msg = assert_raises_naming(row.exc, row.names, row.spec.fn, **kw)
    if row.all_names:
        missing = [n for n in row.names if not name_re(n).search(msg)]
        assert not missing, f"{missing} not named in {msg!r}"
    if row.label.startswith("dtype-"):   # a wrong dtype is named too
        assert row.label[len("dtype-"):] in msg, f"dtype not named in {msg!r}"
    for a, a0 in zip(watched, before):   # running stats, out and every other array untouched
        np.testing.assert_array_equal(a, a0)
    RUN["passed"] += 1


@pytest.mark.parametrize("spec", SPECS + HALF_SPECS, ids=[s.name for s in SPECS + HALF_SPECS])
def test_good_call_works(spec, restore_threads):
    """The call every row starts from is accepted: a row fails for its one bad value only."""
    spec.fn(**spec.good())


@pytest.mark.parametrize("spec", HALF_SPECS, ids=[s.name for s in HALF_SPECS])
def test_valid_16bit_call_leaves_its_inputs_unchanged(spec, restore_threads):
    """A float16 call with parameters of other float dtypes (converted to float32 on the way
    in) writes nothing into any input but the running statistics it updates."""
    kw = spec.good()
    inputs = {k: a for k, a in kw.items() if isinstance(a, np.ndarray) and k not in ("running_mean", "running_var")}
    before = {k: a.copy() for k, a in inputs.items()}
    dtypes = {k: a.dtype for k, a in inputs.items()}
    spec.fn(**kw)
    for k, a in inputs.items():
        assert a.dtype == dtypes[k]
        np.testing.assert_array_equal(a.view(np.uint8), before[k].view(np.uint8), err_msg=k)


def _parameters(spec):
    fn = spec.fn
    if isinstance(fn, type):
        fn = fn.__init__
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "kw", "kwargs")]


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.name.endswith(("__call__", "backward"))
                                  or s.name == "batch_norm_backward"], ids=lambda s: s.name)
def test_every_argument_is_covered(spec):
    missing = [p for p in _parameters(spec) if p not in spec.args and p not in FLAGS]
    assert not missing, f"{spec.name}: no bad-value rows for {missing}"


def test_every_layer_is_in_the_matrix():
    """pybn.nn's layers: the constructor's arguments, and a call or backward of each."""
    covered = {s.name for s in SPECS}
    for name in pybn.nn.__all__:
        if isinstance(getattr(pybn.nn, name), type):
            assert f"nn.{name}" in covered, f"pybn.nn.{name}(...) has no rows in the input matrix"
            assert {f"nn.{name}.__call__", f"nn.{name}.backward"} & covered, f"pybn.nn.{name}: no call in the matrix"

def test_every_public_function_is_in_the_matrix():
    no_arguments = {"isa", "supported_isas", "get_num_threads", "keep_freed_memory"}
    covered = {s.name for s in SPECS}
    for name in pybn.__all__:
        obj = getattr(pybn, name)
        if not callable(obj) or isinstance(obj, type) or name in no_arguments:
            continue   # the version string, the result named tuples
        assert name in covered, f"pybn.{name} has no rows in the input matrix"
