"""Batch norm on arrays whose elements are dense in memory in another axis order than C's.

A transposed array, or NumPy's view of a channels_last torch tensor (NCHW indices over
NHWC memory), is not C-contiguous, and the kernels take C-order arrays: copying such an
input into C order (a transposing copy, 6-13x the kernel's time) is what pybn did. But batch
norm only needs each channel's values, in any order. So :func:`call_in_memory_order` calls
the function on the C-contiguous view with the axes in memory order (the channel axis moved
to its place there), and transposes the results back: they are laid out as x is, as NumPy's
ufuncs lay out theirs (``order="K"``). Each function asks it first thing on its Python path,
after the C++ path for plain calls (which takes C-contiguous arrays only) has declined.

Dropout is not done this way: its mask is a function of each element's C-order index.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import numpy as np

from ._checks import as_array

R = TypeVar("R")


def call_in_memory_order(function: Callable[..., R], arguments: dict[str, Any], *names: str) -> R | None:
    """`function`'s result for `arguments` (its parameters by name, and maybe other locals),
    computed on the memory-order views of the arrays `names` (x first, then others of its
    shape, None allowed) when x is dense in another axis order and the others share its
    strides; else None, and the function goes on as for any other input."""
    order = memory_order(arguments[names[0]], names[0], [arguments[name] for name in names[1:]],
                         arguments["axis"])
    if order is None:
        return None
    perm, axis, x = order
    given = {name: arguments[name] for name in _parameters(function)}
    views = {}  # id(an argument's transposed view) -> the argument (out= comes back as itself)
    for name, value in zip(names, (x, *(arguments[name] for name in names[1:]))):
        if value is not None:
            given[name] = view = value.transpose(perm)
            views[id(view)] = value
    given["axis"] = axis
    result: R = _back(function(**given), tuple(np.argsort(perm)), given[names[0]].shape, views)
    return result


@functools.cache
def _parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def memory_order(x: Any, name: str, others: list[Any], axis: Any) -> tuple[tuple[int, ...], int, np.ndarray] | None:
    """(perm, the channel axis of ``x.transpose(perm)``, x as an ndarray) when x is an ndarray,
    or an array that is memory already (``__dlpack__``: a torch tensor; converting an array-like
    that computes its values, such as a dask array, would compute them twice), that is not
    C-contiguous but whose transpose by `perm` is (aligned), and each of `others` given is an
    ndarray of x's shape and strides; else None."""
    if isinstance(x, np.ndarray) and x.flags.c_contiguous:  # (the usual call on this path)
        return None
    if type(axis) is not int or not (isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")):
        return None
    try:
        x = as_array(x, name)
    except (TypeError, ValueError):
        return None  # (the function raises its own error)
    if x.ndim < 2 or not -x.ndim <= axis < x.ndim or x.flags.c_contiguous:
        return None
    for other in others:
        if other is not None and not (isinstance(other, np.ndarray) and other.shape == x.shape and
                                      other.strides == x.strides):
            return None
    perm = tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))  # (stable: size-1 axes keep their order)
    view = x.transpose(perm)
    if not (view.flags.c_contiguous and view.flags.aligned):
        return None
    return perm, perm.index(axis % x.ndim), x


def _back(result: Any, inverse: tuple[int, ...], shape: tuple[int, ...], given: dict[int, Any]) -> Any:
    """`result` with each array of the transposed shape transposed back, or, when it is an
    argument's view, that argument (per-channel arrays and numbers as they are)."""
    if isinstance(result, np.ndarray):
        if id(result) in given:
            return given[id(result)]
        return result.transpose(inverse) if result.shape == shape else result
    if isinstance(result, tuple):
        items = [_back(item, inverse, shape, given) for item in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    return result
