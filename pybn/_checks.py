"""Argument checks shared by every array function (DESIGN.md, "Conventions").

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, layout or
value) with a message that starts with the argument's name, and never copies an array
that the caller expects to be updated in place.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_F32, _F64 = FLOAT_DTYPES


def float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a float32/float64 ndarray (array-likes accepted; no copy when possible)."""
    if type(value) is np.ndarray and (value.dtype is _F32 or value.dtype is _F64):
        return value  # the common case, checked first: small calls are dominated by checks
    arr = as_array(value, name)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {arr.dtype} is not supported (pybn takes float32 or float64)")
    return arr


def as_array(value: Any, name: str) -> np.ndarray:
    """np.asarray(value), with NumPy's own conversion errors (a ragged list...) naming `name`."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: cannot be converted to an array ({e})") from None


def running_stats_disjoint(running_mean: np.ndarray, running_var: np.ndarray, x: np.ndarray) -> None:
    """The running statistics (updated in place) share memory neither with x nor with each other.
    Only views can; callers skip this when both arrays own their data and are distinct."""
    if np.may_share_memory(running_mean, running_var):
        raise ValueError("running_var: shares memory with running_mean (each is updated in place)")
    for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
        if np.may_share_memory(arr, x):
            raise ValueError(f"{name}: shares memory with x (it is updated in place while x is read)")


def contiguous_float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a C-contiguous float32/float64 ndarray whose elements are aligned to their
    size (a copy only when needed: an array viewed at an odd offset of a byte buffer is not)."""
    arr = float_array(value, name)
    flags = arr.flags
    return arr if flags.carray or (flags.c_contiguous and flags.aligned) else np.array(arr, order="C")


_LAYOUTS: dict[tuple[tuple[int, ...], Any], tuple[int, int, int, int]] = {}


def channel_layout(shape: tuple[int, ...], axis: Any, name: str = "x") -> tuple[int, int, int, int]:
    """The canonical view around the channel axis: (axis, outer, C, inner), axis >= 0."""
    if type(axis) is int:  # networks call with a few shapes over and over: remember them
        known = _LAYOUTS.get((shape, axis))
        if known is not None:
            return known
    layout = _channel_layout(shape, axis, name)
    if type(axis) is int:
        if len(_LAYOUTS) >= 1024:
            _LAYOUTS.clear()
        _LAYOUTS[shape, axis] = layout
    return layout


def _channel_layout(shape: tuple[int, ...], axis: Any, name: str) -> tuple[int, int, int, int]:
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name}: needs at least 2 dimensions (batch and channels), got shape {shape}")
    if type(axis) is not int:
        axis = integer(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: {axis} is out of range for {name} with {ndim} dimensions")
    axis %= ndim
    return axis, math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def per_channel(value: Any, name: str, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """A read-only per-channel input: shape (C,), converted to `dtype` (None stays None)."""
    if value is None:
        return None
    if type(value) is np.ndarray and value.dtype is dtype and value.shape == (channels,) and value.flags.carray:
        return value  # carray: C-contiguous, aligned (and writeable), one flags lookup
    arr = float_array(value, name)
    if arr.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), got {arr.shape}")
    return np.require(arr, dtype=dtype, requirements=["C", "A"])


def in_place(value: Any, name: str, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """An array updated in place: must already be exactly right, or the update would be lost."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: must be a numpy.ndarray (it is updated in place), got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{name}: dtype {value.dtype} does not match x ({dtype}); it is updated in place, "
                        "so pybn will not convert it")
    if value.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), got {value.shape}")
    if not value.flags.carray:
        _not_writable_carray(value, name, " (it is updated in place)")
    return value


def _not_writable_carray(arr: np.ndarray, name: str, why: str = "") -> None:
    """Raises the ValueError saying which of C-contiguous, writeable and aligned (numpy's
    flags.carray, checked by the caller) `arr`, an array written to, is not."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous{why}")
    if not arr.flags.writeable:
        raise ValueError(f"{name}: is read-only{why}")
    raise ValueError(f"{name}: {MISALIGNED}{why}")


def integer(value: Any, name: str) -> int:
    """An int argument (NumPy integers too; bool and float are TypeErrors naming it)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}") from None


def real_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    if type(value) is float and math.isfinite(value) and (minimum is None or value >= minimum):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


def output(out: Any, like: np.ndarray, inputs: tuple[Any, ...] = ()) -> np.ndarray:
    """The result array, of like's shape and dtype: `out` checked, or a new one. `out` may
    be exactly one of `inputs` (in place), but must not overlap any of them partially."""
    shape, dtype = like.shape, like.dtype
    if out is None:
        return np.empty_like(like) if like.nbytes < ALIGNED_MIN_BYTES else empty_aligned(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out: dtype {out.dtype} does not match the result ({dtype})")
    if out.shape != tuple(shape):
        raise ValueError(f"out: shape {out.shape} does not match the result {tuple(shape)}")
    if not out.flags.carray:
        _not_writable_carray(out, "out")
    out_owns = out.base is None
    for arr in inputs:
        # two arrays that each own their memory cannot overlap (base None): the common case
        # skips np.may_share_memory
        if not isinstance(arr, np.ndarray) or arr is out or (out_owns and arr.base is None):
            continue
        if np.may_share_memory(out, arr) and not _same_buffer(out, arr):
            raise ValueError("out: overlaps an input without being the same array (only exact in-place is allowed)")
    return out


MISALIGNED = ("its elements are not aligned to their size (a view at an odd offset of a byte buffer); "
              "pass a copy, e.g. np.array(out), and copy the result back")
ALIGNMENT = 64  # bytes: one cache line, one AVX-512 vector
ALIGNED_MIN_BYTES = 1 << 20


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, but starting on a 64-byte boundary (NumPy only promises 16), so the
    kernels' non-temporal stores need no unaligned head."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.__array_interface__["data"][0] % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)
