"""Batch norm on arrays whose elements are dense in memory in another axis order than C's.

A transposed array, or NumPy's view of a channels_last torch tensor (NCHW indices over
NHWC memory), is not C-contiguous, and the kernels take C-order arrays: copying such an
input into C order (a transposing copy, several times slower than the kernel itself) is
what pybn did. But batch norm only needs each channel's values, in any order. So
:func:`in_memory_order` calls the function on the C-contiguous view with the axes in memory
order (the channel axis moved to its place there), and transposes the results back: they
are laid out as x is, as NumPy's ufuncs lay out theirs (``order="K"``).

Dropout is not done this way: its mask is a function of each element's C-order index.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import numpy as np

from ._checks import as_array

F = TypeVar("F", bound=Callable[..., Any])


def in_memory_order(*names: str) -> Callable[[F], F]:
    """Decorate a batch-norm function whose array arguments `names` (the first positional,
    the others keyword or positional, None allowed) have one shape and its channel axis
    argument ``axis``."""

    def decorate(function: F) -> F:
        parameters = inspect.signature(function).parameters
        positional = [n for n, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        default_axis = parameters["axis"].default

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else kwargs.get(names[0])
            if type(first) is np.ndarray and first.flags.c_contiguous:  # the common case, first
                return function(*args, **kwargs)
            if len(args) > len(positional):
                return function(*args, **kwargs)  # (the function's own TypeError)
            given = dict(zip(positional, args), **kwargs)  # every argument by name (no *args here)
            arrays = {name: given.get(name) for name in names}
            order = memory_order(arrays, given.get("axis", default_axis))
            if order is None:
                return function(*args, **kwargs)
            perm, axis = order
            views = {}  # id(an argument's transposed view) -> the argument (out= comes back as itself)
            for name, value in arrays.items():
                if value is not None:
                    given[name] = view = value.transpose(perm)
                    views[id(view)] = value
            given["axis"] = axis
            shape = given[names[0]].shape  # (x in memory order)
            return _back(function(**given), tuple(np.argsort(perm)), shape, views)

        return call  # type: ignore[return-value]

    return decorate


def memory_order(arrays: dict[str, Any], axis: Any) -> tuple[tuple[int, ...], int] | None:
    """(perm, the channel axis of ``x.transpose(perm)``) for the first of `arrays`, x, when it
    converts without a copy to an array that is not C-contiguous but whose transpose by
    `perm` is (aligned), and every other array given is an ndarray of x's shape and strides;
    else None (the function then checks and copies as for any other input). `arrays` gets
    the converted x."""
    name, x = next(iter(arrays.items()))
    if isinstance(x, (list, tuple)) or x is None or type(axis) is not int:
        return None
    try:
        x = as_array(x, name)
    except (TypeError, ValueError):
        return None  # (the function raises its own error)
    if x.ndim < 2 or not -x.ndim <= axis < x.ndim or x.flags.c_contiguous:
        return None
    for other in list(arrays.values())[1:]:
        if other is not None and not (type(other) is np.ndarray and other.shape == x.shape and
                                      other.strides == x.strides):
            return None
    perm = tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))  # (stable: size-1 axes keep their order)
    view = x.transpose(perm)
    if not (view.flags.c_contiguous and view.flags.aligned):
        return None
    arrays[name] = x
    return perm, perm.index(axis % x.ndim)


def _back(result: Any, inverse: tuple[int, ...], shape: tuple[int, ...], given: dict[int, Any]) -> Any:
    """`result` with each array of the transposed shape transposed back, or, when it is an
    argument's view, that argument (per-channel arrays and numbers as they are)."""
    if isinstance(result, np.ndarray):
        if id(result) in given:
            return given[id(result)]
        return result.transpose(inverse) if result.shape == shape and result.ndim == len(inverse) else result
    if isinstance(result, tuple):
        items = [_back(item, inverse, shape, given) for item in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    return result
