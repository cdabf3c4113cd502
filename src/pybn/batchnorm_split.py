"""Batch normalization in phases, for statistics combined across processes (SyncBatchNorm).

Training forward: ``batch_norm_stats`` on each worker's slice, an all-reduce (or gather) of
the per-channel ``(count, mean, m2)``, ``batch_norm_merge_stats``, then ``batch_norm_apply``
with the merged mean and ``invstd = 1/sqrt(m2/count + eps)``. Backward:
``batch_norm_backward_reduce`` gives per-channel ``sum(dy)`` and ``sum(dy * xhat)``, which
are summed over the workers, then ``batch_norm_backward_apply``. The result equals
single-process batch norm over the concatenated batch.

Statistics are returned in float64 whatever x's dtype, so that merging loses nothing; the
merge is Chan et al.'s pairwise formula, exact for unequal counts and empty workers.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _C
from ._memory_order import call_in_memory_order
from ._checks import (as_array, channel_layout, contiguous_float_array, flag, float_array, output, param_dtype,
                      per_channel, real_number)
from .batchnorm import backward_inputs, residual_grad, residual_input, running_stats_as, write_back

__all__ = ["BatchNormStats", "BatchNormGradSums", "batch_norm_stats", "batch_norm_merge_stats",
           "batch_norm_invstd", "batch_norm_apply", "batch_norm_backward_reduce", "batch_norm_backward_apply"]


class BatchNormStats(NamedTuple):
    """Per-channel statistics of a set of values."""

    count: Any
    """Number of values per channel: an int, or an array of shape (C,) after merging per-channel counts."""
    mean: np.ndarray
    """Mean per channel, float64, shape (C,)."""
    m2: np.ndarray
    """Sum of squared deviations from the mean per channel, float64, shape (C,)."""


class BatchNormGradSums(NamedTuple):
    """Per-channel sums of the backward's reduction (add them over the workers)."""

    sum_dy: np.ndarray
    """sum(dy) per channel, float64 (the bias gradient)."""
    sum_dy_xhat: np.ndarray
    """sum(dy * xhat) per channel, float64 (the weight gradient)."""


def batch_norm_stats(x: Any, *, axis: int = 1) -> BatchNormStats:
    """Count, mean and m2 per channel of x over every axis but `axis` (one pass, float64).

    An empty x gives count 0, mean 0 and m2 0.
    """
    moved = call_in_memory_order(batch_norm_stats, locals(), "x")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    x = contiguous_float_array(x, "x")
    _, outer, channels, inner = channel_layout(x.shape, axis)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    _C.bn_moments(x, mean, m2, outer, channels, inner)
    return BatchNormStats(outer * inner, mean, m2)


def batch_norm_merge_stats(count: Any, mean: Any, m2: Any) -> BatchNormStats:
    """Combine the statistics of W workers, stacked on a first axis of length W.

    Parameters
    ----------
    count : array_like of shape (W,) or (W, C)
        Values per worker (per channel, for the second form); 0 marks an empty worker, whose
        mean and m2 are ignored.
    mean, m2 : array_like of shape (W, C)

    Returns
    -------
    BatchNormStats
        The statistics of all the values together: count (an int for integer counts of shape
        (W,); for shape (W, C) an array of NumPy's integer sum (int64 or uint64), or float64
        where a total passes its range; float counts give float64), mean and m2 in float64.
    """
    # (aligned too: the kernel reads them as doubles)
    mean = np.require(float_array(mean, "mean"), np.float64, ["C", "A"])
    m2 = np.require(float_array(m2, "m2"), np.float64, ["C", "A"])
    if mean.ndim != 2 or mean.shape[0] == 0:
        raise ValueError(f"mean: expected shape (W, C) with W >= 1 (one row per worker), got {mean.shape}")
    if m2.shape != mean.shape:
        raise ValueError(f"m2: shape {m2.shape} does not match mean {mean.shape}")
    counts = as_array(count, "count")
    if counts.dtype.kind not in "iuf" or counts.dtype == np.float16:
        raise TypeError(f"count: must be integer or float counts, got dtype {counts.dtype}")
    if counts.shape not in ((mean.shape[0],), mean.shape):
        raise ValueError(f"count: expected shape ({mean.shape[0]},) or {mean.shape}, got {counts.shape}")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("count: must be finite and >= 0")
    c = np.ascontiguousarray(np.broadcast_to(counts.astype(np.float64).reshape(mean.shape[0], -1), mean.shape))
    if np.any((m2 < 0) & (c > 0)):
        raise ValueError("m2: must be >= 0 (a sum of squared deviations), got a negative entry")
    mu, s = np.empty(mean.shape[1]), np.empty(mean.shape[1])
    _C.bn_merge_stats(c, mean, m2, mu, s)
    return BatchNormStats(_total_count(counts), mu, s)


def _total_count(counts: np.ndarray) -> Any:
    """The counts summed over the workers, exactly: integer counts as Python ints where the
    dtype's sum could wrap (int64 past 2**63)."""
    if counts.dtype.kind not in "iu":
        return float(counts.sum()) if counts.ndim == 1 else counts.sum(axis=0, dtype=np.float64)
    if counts.ndim == 1:
        return sum(int(v) for v in counts)
    total = counts.sum(axis=0)  # (NumPy sums narrower integers in int64 / uint64)
    limit = np.iinfo(total.dtype).max
    if int(counts.max(initial=0)) * counts.shape[0] <= limit:
        return total
    exact = [sum(int(v) for v in column) for column in counts.T]
    return np.array(exact, total.dtype if max(exact) <= limit else np.float64)


def batch_norm_invstd(stats: BatchNormStats, eps: float = 1e-5) -> np.ndarray:
    """``1/sqrt(m2/count + eps)`` per channel (the biased variance, as the forward uses), float64.

    With ``eps=0`` a channel of variance 0 (all its values equal) gets 0, as in
    :func:`pybn.batch_norm_train` and PyTorch's kernels: its normalized values are 0.
    """
    eps = real_number(eps, "eps", minimum=0.0)
    try:
        count, _, m2 = stats
    except (TypeError, ValueError):
        raise TypeError(f"stats: must be a BatchNormStats (count, mean, m2), got {type(stats).__name__}") from None
    if isinstance(count, int) and not isinstance(count, bool):  # (a merge's exact total, past int64 too)
        count = float(count)
    count = as_array(count, "stats")
    if count.dtype.kind not in "iuf":
        raise TypeError(f"stats: count must be a number or an array of numbers, got dtype {count.dtype}")
    m2 = float_array(m2, "stats").astype(np.float64, copy=False)
    if m2.ndim != 1 or count.shape not in ((), m2.shape):
        raise ValueError(f"stats: m2 of shape {m2.shape} and count of shape {count.shape} are not per-channel "
                         "statistics")
    count = count.astype(np.float64)
    if np.any(count <= 0):
        raise ValueError("stats: count must be > 0 to normalize (every worker was empty)")
    if not np.all(np.isfinite(count)):
        raise ValueError("stats: count must be finite")
    if np.any(m2 < 0):
        raise ValueError("stats: m2 must be >= 0 (a sum of squared deviations), got a negative entry")
    var_eps = m2 / count + eps
    with np.errstate(divide="ignore"):
        invstd: np.ndarray = 1.0 / np.sqrt(var_eps)
    invstd[var_eps == 0.0] = 0.0  # eps = 0 and a constant channel: 0/0 normalizes to 0
    return invstd


def batch_norm_apply(x: Any, mean: Any, invstd: Any, weight: Any = None, bias: Any = None, *, axis: int = 1,
                     relu: bool = False, residual: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """``y = (x - mean) * invstd * weight + bias`` per channel (plus `residual`, then the
    ReLU, when given), in one pass. As in :func:`pybn.batch_norm_train`, the mean is rounded
    to x's dtype and ``invstd * weight`` is taken in float64 and rounded once."""
    moved = call_in_memory_order(batch_norm_apply, locals(), "x", "residual", "out")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    x = contiguous_float_array(x, "x")
    _, outer, channels, inner = channel_layout(x.shape, axis)
    pdt = param_dtype(x.dtype)
    m = per_channel(mean, "mean", channels, pdt)
    s = per_channel(invstd, "invstd", channels, np.dtype(np.float64))
    if m is None or s is None:
        raise TypeError(f"{'mean' if m is None else 'invstd'}: is required")
    w = per_channel(weight, "weight", channels, pdt)
    b = per_channel(bias, "bias", channels, pdt)
    r = residual_input(residual, x)
    y = output(out, x, (("x", x), ("mean", m), ("invstd", s), ("weight", w), ("bias", b), ("residual", r)))
    _C.bn_apply(x, y, m, s, w, b, outer, channels, inner, flag(relu, "relu"), r)
    return y


def batch_norm_backward_reduce(dy: Any, x: Any, mean: Any, invstd: Any, *, axis: int = 1,
                               y: Any = None) -> BatchNormGradSums:
    """Per-channel ``sum(dy)`` and ``sum(dy * xhat)``, ``xhat = (x - mean) * invstd``, in
    float64. `y` (the forward output) masks dy where ``y <= 0``, for a forward with relu."""
    moved = call_in_memory_order(batch_norm_backward_reduce, locals(), "dy", "x", "y")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    b = backward_inputs(dy, x, y, mean, invstd, axis)
    sums = BatchNormGradSums(np.empty(b.channels), np.empty(b.channels))
    _C.bn_backward_reduce(b.dy, b.x, b.y, b.mean, b.invstd, sums.sum_dy, sums.sum_dy_xhat, b.outer, b.channels,
                          b.inner)
    return sums


def _per_value(sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, count: Any, channels: int) -> tuple[Any, Any, float]:
    """The sums and the count the kernel takes: a number as it is; per-channel counts (the
    count of batch_norm_merge_stats over (W, C) counts) divide the sums here, in float64 as
    the kernel divides by a number, and the kernel's count is 1 (so the same bits where
    every channel's count is the same)."""
    if np.ndim(count) == 0:
        count = real_number(count, "count")
        if not count > 0:
            raise ValueError(f"count: must be > 0, got {count}")
        return sum_dy, sum_dy_xhat, count
    counts = as_array(count, "count")
    if counts.dtype.kind not in "iuf":
        raise TypeError(f"count: must be a number or per-channel numbers, got dtype {counts.dtype}")
    if counts.shape != (channels,):
        raise ValueError(f"count: expected a number or shape ({channels},) (one count per channel), got "
                         f"{counts.shape}")
    counts = counts.astype(np.float64)
    if not np.all(counts > 0) or not np.all(np.isfinite(counts)):
        raise ValueError("count: must be finite and > 0 in every channel")
    return sum_dy / counts, sum_dy_xhat / counts, 1.0


def batch_norm_backward_apply(dy: Any, x: Any, mean: Any, invstd: Any, sum_dy: Any, sum_dy_xhat: Any,
                              count: Any, weight: Any = None, *, axis: int = 1, y: Any = None,
                              out: np.ndarray | None = None, residual: bool = False,
                              d_residual_out: np.ndarray | None = None) -> Any:
    """dx of training-mode batch norm from the sums over every worker:
    ``dx = weight * invstd * (g - sum_dy/count - xhat * sum_dy_xhat/count)``, g = dy (masked
    where ``y <= 0`` when y is given), count the number of values per channel in all (a
    number, or one per channel: the count of :func:`batch_norm_merge_stats` over (W, C) counts).
    With ``residual=True``, returns ``(dx, d_residual)``, d_residual = g written in the same
    pass (as :func:`pybn.batch_norm_backward`'s, `d_residual_out` likewise)."""
    moved = call_in_memory_order(batch_norm_backward_apply, locals(), "dy", "x", "y", "out", "d_residual_out")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    b = backward_inputs(dy, x, y, mean, invstd, axis)
    sd = per_channel(sum_dy, "sum_dy", b.channels, np.dtype(np.float64))
    sx = per_channel(sum_dy_xhat, "sum_dy_xhat", b.channels, np.dtype(np.float64))
    if sd is None or sx is None:
        raise TypeError(f"{'sum_dy' if sd is None else 'sum_dy_xhat'}: is required")
    sd, sx, count = _per_value(sd, sx, count, b.channels)
    w = per_channel(weight, "weight", b.channels, param_dtype(b.dy.dtype))
    dx = output(out, b.dy, (("dy", b.dy), ("x", b.x), ("y", b.y), ("mean", b.mean), ("invstd", b.invstd),
                            ("sum_dy", sd), ("sum_dy_xhat", sx), ("weight", w)))
    dr, dr_written = residual_grad(residual, d_residual_out, b, dx,
                                   (("sum_dy", sd), ("sum_dy_xhat", sx), ("weight", w)))
    _C.bn_backward_apply(b.dy, b.x, b.y, b.mean, b.invstd, w, sd, sx, count, dx, b.outer, b.channels, b.inner,
                         dr_written)
    return dx if dr is None else (dx, dr)


def _update_running_stats(running_mean: np.ndarray | None, running_var: np.ndarray | None, stats: BatchNormStats,
                          momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place, in float64 and
    rounded once, the batch variance unbiased (``m2 / (count - 1)``): the update of
    :func:`pybn.batch_norm_train`, for statistics merged over workers (SyncBatchNorm). The
    running statistics are checked by the caller (of a dtype pybn takes, C-contiguous,
    shape (C,)); count is a number > 1. 16-bit ones are updated as float32 ones, then
    rounded to their dtype, as :func:`pybn.batch_norm_train` does (docs/dtypes.md)."""
    held = running_mean if running_mean is not None else running_var
    if held is None:
        return
    rm, rv = running_stats_as(param_dtype(held.dtype), running_mean, running_var)
    _C.bn_update_running_stats(rm, rv, stats.mean, stats.m2, float(stats.count), momentum)
    write_back((running_mean, rm), (running_var, rv))
