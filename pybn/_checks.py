"""Argument checks shared by every array function (DESIGN.md, "Conventions").

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, layout or
value) with a message that starts with the argument's name, and never copies an array
that the caller expects to be updated in place.
"""
from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a float32/float64 ndarray (array-likes accepted; no copy when possible)."""
    arr = np.asarray(value)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {arr.dtype} is not supported (pybn takes float32 or float64)")
    return arr


def contiguous_float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a C-contiguous float32/float64 ndarray (a copy only when needed)."""
    return np.ascontiguousarray(float_array(value, name))


class ChannelLayout(NamedTuple):
    """The canonical (outer, C, inner) view of an array around its channel axis."""

    axis: int
    outer: int
    channels: int
    inner: int


def channel_layout(shape: tuple[int, ...], axis: Any, name: str = "x") -> ChannelLayout:
    if len(shape) < 2:
        raise ValueError(f"{name}: needs at least 2 dimensions (batch and channels), got shape {shape}")
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis: must be an int, got {axis!r}")
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis: must be an int, got {type(axis).__name__}") from None
    if not -len(shape) <= ax < len(shape):
        raise ValueError(f"axis: {ax} is out of range for {name} with {len(shape)} dimensions")
    ax %= len(shape)
    return ChannelLayout(ax, math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :]))


def per_channel(value: Any, name: str, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """A read-only per-channel input: shape (C,), converted to `dtype` (None stays None)."""
    if value is None:
        return None
    arr = float_array(value, name)
    if arr.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


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
    if not value.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (it is updated in place)")
    if not value.flags.writeable:
        raise ValueError(f"{name}: is read-only (it is updated in place)")
    return value


def real_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


def output(out: Any, shape: tuple[int, ...], dtype: np.dtype, inputs: tuple[Any, ...] = ()) -> np.ndarray:
    """The result array: `out` checked, or a new one. `out` may be exactly one of `inputs`
    (in place), but must not overlap any of them partially."""
    if out is None:
        return empty_aligned(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out: dtype {out.dtype} does not match the result ({dtype})")
    if out.shape != tuple(shape):
        raise ValueError(f"out: shape {out.shape} does not match the result {tuple(shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out: must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out: is read-only")
    for arr in inputs:
        if isinstance(arr, np.ndarray) and np.may_share_memory(out, arr) and not _same_buffer(out, arr):
            raise ValueError("out: overlaps an input without being the same array (only exact in-place is allowed)")
    return out


ALIGNMENT = 64  # bytes: one cache line, one AVX-512 vector
ALIGNED_MIN_BYTES = 1 << 20


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, but starting on a 64-byte boundary (NumPy only promises 16), so the
    kernels' non-temporal stores need no unaligned head."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < ALIGNED_MIN_BYTES:  # small: not worth the extra microsecond
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.__array_interface__["data"][0] % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)
