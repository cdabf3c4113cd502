"""Inverted dropout with a counter-based mask (docs/dropout.md).

The mask of ``(seed, offset, p, shape)`` is the same on every machine, ISA and thread count:
element k of the mask (C order over the mask's shape) keeps its value when a 16-bit word of
Philox4x32-10, drawn from counter ``offset + 16 * (k // 128) + (k % 32) // 2`` under key
``seed``, is at least ``floor(p * 65536)``. A mask of n elements uses the counters
``offset .. offset + 16 * ceil(n / 128) - 1``: advance ``offset`` by that much for a fresh mask.

Kept elements are multiplied by :func:`dropout_scale`, ``1 / q`` where
``q = 1 - floor(p * 65536) / 65536`` is the probability that the 16-bit test keeps an
element, so that ``E[y] = x`` exactly for every p < 1.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _C
from ._checks import (as_array, contiguous_float_array, flag, integer, output, real_number, round_to,
                      same_shape_array)

__all__ = ["dropout", "dropout_mask", "dropout_apply", "dropout_scale", "counters_used", "relu_dropout_backward"]

_U64 = 1 << 64


def counters_used(n: int) -> int:
    """Philox counters a mask of n elements uses: advance ``offset`` by this for the next one."""
    n = integer(n, "n")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    return 16 * ((n + 127) // 128)


def _probability(p: Any) -> float:
    prob = real_number(p, "p")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"p: the drop probability must be in [0, 1], got {prob}")
    return prob


def _counter_arg(value: Any, name: str) -> int:
    v = integer(value, name)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: must be in [0, 2**64), got {v}")
    return v


def _threshold(p: float) -> int:
    return math.floor(p * 65536)


def dropout_scale(p: float) -> float:
    """The factor kept elements are multiplied by: ``65536 / (65536 - floor(p * 65536))``.

    An element is kept when its 16-bit random word is at least ``T = floor(p * 65536)``,
    so with probability ``q = 1 - T / 65536``, and scaling by ``1 / q`` keeps the
    expectation of every element exactly (inverted dropout is unbiased for every p).
    For p a multiple of 2**-16 (0.5, 0.25, ...) this is PyTorch's ``1 / (1 - p)``; for
    other p it differs from it by less than 2**-16 / (1 - p) relative (1.7e-5 for
    p = 0.3); near 1 it stays bounded by 65536 where ``1 / (1 - p)`` would not. p == 1
    keeps nothing and gives 0.0.

    A reference of pybn's dropout is ``x * keep * dropout_scale(p)`` with ``keep`` the
    unpacked :func:`dropout_mask` (pybn rounds the scale to x's dtype once, then
    multiplies).
    """
    p = _probability(p)
    if p == 1.0:
        return 0.0
    return 65536.0 / (65536 - _threshold(p))


def _noise_shape(noise_shape: Any, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """None when the mask covers x itself; else the checked mask shape (Keras semantics: an
    entry None is x's extent on that axis)."""
    if noise_shape is None:
        return None
    try:
        entries = tuple(None if d is None else integer(d, "noise_shape") for d in noise_shape)
    except TypeError:
        raise TypeError(f"noise_shape: must be a sequence of ints (or None), got {noise_shape!r}") from None
    ns = tuple(s if d is None else d for d, s in zip(entries, shape))
    if len(entries) != len(shape) or any(d != 1 and d != s for d, s in zip(ns, shape)):
        raise ValueError(f"noise_shape: {entries} does not broadcast to x's shape {shape} "
                         "(one entry per axis, each 1, None or equal to that axis)")
    return None if ns == shape else ns


def _broadcast_view(shape: tuple[int, ...], noise: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """x's shape as (f0, b1, f2, b3) for the broadcast kernel: runs of axes where the mask
    is drawn (f) and where it is broadcast (b), aligned at the end (a last drawn run is f2,
    b3 = 1); None for a pattern of more than four runs."""
    runs: list[list[Any]] = []  # [kind, size], adjacent axes of one kind merged; size-1 axes are either
    for s, d in zip(shape, noise):
        if s == 1:
            continue
        kind = "f" if d == s else "b"
        if runs and runs[-1][0] == kind:
            runs[-1][1] *= s
        else:
            runs.append([kind, s])
    slots = {"f0": 1, "b1": 1, "f2": 1, "b3": 1}
    order = ["f0", "b1", "f2", "b3"] if not runs or runs[-1][0] == "b" else ["f0", "b1", "f2"]
    if len(runs) > len(order):
        return None
    for (_, size), slot in zip(runs, order[len(order) - len(runs):]):
        slots[slot] = size
    f0, b1, f2, b3 = slots["f0"], slots["b1"], slots["f2"], slots["b3"]
    if b1 == 1:  # no middle run: one row per drawn element, so the rows spread over threads
        f0, f2 = f0 * f2, 1
    return f0, b1, f2, b3


def apply_mask(x: np.ndarray, mask: np.ndarray, shape: tuple[int, ...], scale: float, y: np.ndarray,
               relu: bool = False) -> None:
    """y = x * scale (relu(x) * scale with `relu`) where the packed mask (of `shape`, x's or
    one that broadcasts to it) keeps, +0.0 elsewhere, as the kernels give (multiplying by a
    0/scale array would give -0.0 for negative x). The scale is rounded once to x's compute
    type."""
    if shape == x.shape:
        _C.dropout_apply(x, mask, y, scale, relu)
        return
    view = _broadcast_view(x.shape, shape)
    if view is not None:
        _C.dropout_apply_broadcast(x, mask, y, scale, relu, *view)
        return
    keep = np.unpackbits(mask, count=math.prod(shape), bitorder="little").reshape(shape).astype(bool)
    if relu:
        x = relu_of(x)
    if x.dtype.itemsize == 2:  # as the kernels: the exact product with the float32 scale, rounded once
        kept = round_to(x.astype(np.float64) * np.float64(np.float32(scale)), x.dtype)
    else:
        kept = np.multiply(x, x.dtype.type(scale))
    np.copyto(y, kept, where=keep)  # in place too: x is read first
    np.copyto(y, 0, where=~keep)


def relu_of(x: np.ndarray) -> np.ndarray:
    """torch.relu's values in x's dtype, as the kernels' ReLU: x < 0 gives 0, NaN and -0.0 stay."""
    with np.errstate(invalid="ignore"):  # (NumPy 1.x flags bfloat16's NaN < 0 as invalid)
        return np.where(x < 0, x.dtype.type(0), x)


def dropout(x: Any, p: float, *, seed: int, offset: int = 0, noise_shape: Any = None, relu: bool = False,
            out: np.ndarray | None = None) -> np.ndarray:
    """Inverted dropout: each element dropped with probability `p`, kept ones scaled by
    :func:`dropout_scale` (``1/(1-p)`` for p a multiple of 2**-16), so that ``E[y] = x``.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16
    p : float in [0, 1]
        Probability of dropping an element (PyTorch's ``p``, Keras' ``rate``). 0 is the
        identity, 1 gives zeros.
    seed, offset : int in [0, 2**64)
        Select the mask (see the module docstring); the same arguments give the same mask
        everywhere. The backward pass is ``dropout(dy, p, seed=seed, offset=offset)``.
    noise_shape : sequence of int or None, optional
        Keras semantics: the mask is drawn over this shape (each entry 1, x's extent, or None
        for x's extent) and broadcast where it is 1; ``(N, C, 1, 1)`` is PyTorch's Dropout2d.
    relu : bool, default False
        ``dropout(relu(x))`` in the same pass (ReLU as ``torch.relu``: NaN propagates), the
        same mask. Its gradient comes from the output alone: :func:`relu_dropout_backward`.
    out : ndarray, optional
        C-contiguous, x's shape and dtype; may be x itself.
    """
    x = contiguous_float_array(x, "x")
    p = _probability(p)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    ns = _noise_shape(noise_shape, x.shape)
    relu = flag(relu, "relu")
    y = output(out, x, (("x", x),))
    if p == 1.0:
        y.fill(0)
    elif ns is not None:
        if x.size:  # (an empty x has nothing to mask, and its noise shape's other extents may be huge)
            apply_mask(x, dropout_mask(ns, p, seed=seed, offset=offset), ns, dropout_scale(p), y, relu)
    else:
        _C.dropout(x, y, seed, offset, _threshold(p), dropout_scale(p), relu)
    return y


def relu_dropout_backward(dy: Any, y: Any, p: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The gradient of ``y = dropout(x, p, relu=True, ...)`` from its output: ``dy`` times
    :func:`dropout_scale` where ``y > 0``, +0.0 where ``y <= 0`` (y is positive exactly where
    the mask kept a positive x, so no mask is drawn again; a NaN y, a kept NaN x, passes the
    gradient as torch's ReLU does). Kept values are rounded once to dy's dtype, as dropout's.

    Parameters
    ----------
    dy : array_like, float32, float64, float16 or bfloat16
    y : array_like
        The forward's output: dy's shape and dtype.
    p : float in [0, 1]
        The forward's drop probability.
    out : ndarray, optional
        C-contiguous, dy's shape and dtype; may be dy itself.
    """
    dy = contiguous_float_array(dy, "dy")
    y = same_shape_array(y, "y", dy, "dy")
    p = _probability(p)
    dx = output(out, dy, (("dy", dy), ("y", y)))
    if p == 1.0:
        dx.fill(0)
    else:
        _C.relu_dropout_backward(dy, y, dx, dropout_scale(p))
    return dx


def dropout_mask(shape: Any, p: float, *, seed: int, offset: int = 0) -> np.ndarray:
    """The packed keep mask of `shape`: uint8, ceil(n/8) bytes, bit k % 8 of byte k // 8 is
    element k (``np.unpackbits(m, count=n, bitorder="little")`` unpacks it)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        shape = tuple(integer(d, "shape") for d in shape)
    except TypeError:
        raise TypeError(f"shape: must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape: negative extent in {shape}")
    if math.prod(shape) > np.iinfo(np.intp).max:
        raise ValueError(f"shape: {shape} has more elements than an array can hold")
    p = _probability(p)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    n = math.prod(shape)
    mask = np.empty((n + 7) // 8, np.uint8)
    if p == 1.0:
        mask.fill(0)
    else:
        _C.dropout_mask(mask, n, seed, offset, _threshold(p))
    return mask


def dropout_apply(x: Any, mask: Any, p: float, *, noise_shape: Any = None, relu: bool = False,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Apply a packed mask from :func:`dropout_mask`: kept elements times
    :func:`dropout_scale` (``relu(x)`` times it with ``relu=True``), others +0.0.
    The same call (without ``relu``) applies it to the gradient in the backward pass."""
    x = contiguous_float_array(x, "x")
    p = _probability(p)
    ns = _noise_shape(noise_shape, x.shape)
    relu = flag(relu, "relu")
    n = math.prod(ns if ns is not None else x.shape)
    mask = as_array(mask, "mask")
    if mask.dtype != np.uint8:
        raise TypeError(f"mask: dtype {mask.dtype} is not uint8 (a packed mask from dropout_mask)")
    if mask.ndim != 1 or mask.size != (n + 7) // 8:
        raise ValueError(f"mask: expected {(n + 7) // 8} bytes (a packed mask of {n} elements), "
                         f"got shape {mask.shape}")
    mask = np.ascontiguousarray(mask)
    y = output(out, x, (("x", x), ("mask", mask)))
    if p == 1.0:
        y.fill(0)
    elif ns is not None:
        apply_mask(x, mask, ns, dropout_scale(p), y, relu)
    else:
        _C.dropout_apply(x, mask, y, dropout_scale(p), relu)
    return y
