"""Batch normalization with PyTorch's semantics (docs/batchnorm.md)."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _C
from ._memory_order import call_in_memory_order
from ._checks import (channel_layout, contiguous_float_array, flag, in_place, output, param_dtype, per_channel,
                      real_number, same_shape_array, shares_memory, written_apart)

__all__ = ["BatchNormTrainResult", "BatchNormGrads", "BatchNormResidualGrads", "batch_norm_train",
           "batch_norm_infer", "batch_norm_backward"]


class BatchNormTrainResult(NamedTuple):
    """Output of :func:`batch_norm_train`."""

    y: np.ndarray
    """The normalized output, shape of x."""
    mean: np.ndarray
    """Batch mean per channel, shape (C,)."""
    invstd: np.ndarray
    """1 / sqrt(batch variance + eps) per channel (biased variance), shape (C,)."""


class BatchNormGrads(NamedTuple):
    """Output of :func:`batch_norm_backward`."""

    dx: np.ndarray
    dweight: np.ndarray
    """sum(dy * xhat) per channel."""
    dbias: np.ndarray
    """sum(dy) per channel."""


class BatchNormResidualGrads(NamedTuple):
    """Output of :func:`batch_norm_backward` with ``residual=True``."""

    dx: np.ndarray
    dweight: np.ndarray
    """sum(dy * xhat) per channel (dy masked where y <= 0 when y is given)."""
    dbias: np.ndarray
    """sum(dy) per channel (masked likewise)."""
    d_residual: np.ndarray
    """The gradient of the residual the forward added: dy masked where ``y <= 0`` when y is
    given, else dy itself (docs/batchnorm.md, "Fused residual")."""


def residual_input(residual: Any, x: np.ndarray) -> np.ndarray | None:
    """The residual of a forward: an array of x's shape and dtype (None stays None)."""
    return None if residual is None else same_shape_array(residual, "residual", x, "x")


def batch_norm_train(x: Any, weight: Any = None, bias: Any = None, *, running_mean: np.ndarray | None = None,
                     running_var: np.ndarray | None = None, momentum: float = 0.1, eps: float = 1e-5,
                     axis: int = 1, relu: bool = False, residual: Any = None,
                     out: np.ndarray | None = None) -> BatchNormTrainResult:
    """Training-mode batch normalization over every axis but `axis`.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
        (16-bit x: float32 parameters and statistics, docs/dtypes.md)
        Input; `axis` is its channel axis (1 for NCHW, -1 for channels-last / Keras).
    weight, bias : array_like of shape (C,), optional
        Affine parameters gamma and beta (default 1 and 0).
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place, PyTorch's convention:
        ``r = (1 - momentum) * r + momentum * batch_stat``, the variance unbiased.
        Must be writable, C-contiguous and of x's dtype (never silently copied), and
        share memory with no other argument. For 16-bit x: float32, or x's dtype (then
        updated as float32 and rounded to it).
    momentum, eps : float
        ``eps >= 0``. With ``eps=0`` a channel whose values are all equal gets invstd 0
        where its m2 comes out 0, so its y is bias (and its dx 0): what PyTorch's kernels
        (``torch.batch_norm``) compute; ``torch.nn.functional.batch_norm`` refuses eps <= 0
        in training. The one-pass sums can leave such a channel a rounding residue of m2
        (about n * (x * 2**-24)**2 for float32): then invstd is large, y is still bias, and
        dx is large. Use eps > 0 where channels may be constant.
    relu : bool
        Fuse ``max(y, 0)`` into the same pass.
    residual : array_like, optional
        Of x's shape and dtype (another dtype is a TypeError, not a conversion): added to
        the normalized values before the ReLU, ``y = relu(bn(x) + residual)``, in the same
        pass (the tail of a ResNet block; docs/batchnorm.md, "Fused residual").
    out : ndarray, optional
        C-contiguous array of x's shape and dtype for y (or laid out as x is, when every array of
        x's shape is: docs/conventions.md, "Layout"); may be x itself, or the residual
        itself (an in-place add), but must not overlap either partially.

    Returns
    -------
    BatchNormTrainResult
        ``(y, mean, invstd)``: the output, the batch mean and 1/sqrt(biased var + eps).
    """
    if residual is None:  # the common call whole, as batch_norm_infer's
        plain = _C.bn_train_plain(x, weight, bias, running_mean, running_var, momentum, eps, axis, relu, out)
        if plain is not None:
            return BatchNormTrainResult(*plain)
    moved = call_in_memory_order(batch_norm_train, locals(), "x", "residual", "out")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    x = contiguous_float_array(x, "x")
    axis, outer, channels, inner = channel_layout(x.shape, axis)
    if outer * inner < 2:
        raise ValueError(f"x: training needs more than 1 value per channel, got shape {x.shape} "
                         f"with channel axis {axis}")
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"{missing}: running_mean and running_var must be given together")
    pdt = param_dtype(x.dtype)
    w = per_channel(weight, "weight", channels, pdt)
    b = per_channel(bias, "bias", channels, pdt)
    # 16-bit running statistics (of x's dtype) are updated through float32 copies
    also = x.dtype if pdt != x.dtype else None
    rm = in_place(running_mean, "running_mean", channels, pdt, also)
    rv = in_place(running_var, "running_var", channels, pdt, also)
    r = residual_input(residual, x)
    if rm is not None:  # the kernel updates them, then reads weight, bias and residual to normalize
        written_apart((("running_mean", rm), ("running_var", rv)),
                      (("x", x), ("weight", w), ("bias", b), ("residual", r)))
    momentum = real_number(momentum, "momentum")
    eps = real_number(eps, "eps", minimum=0.0)
    y = output(out, x, (("x", x), ("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv),
                        ("residual", r)))
    mean = np.empty(channels, pdt)
    invstd = np.empty(channels, pdt)
    rm_k, rv_k = running_stats_as(pdt, rm, rv)
    _C.bn_train(x, y, w, b, rm_k, rv_k, mean, invstd, outer, channels, inner, momentum, eps, flag(relu, "relu"), r)
    write_back((rm, rm_k), (rv, rv_k))
    return BatchNormTrainResult(y, mean, invstd)


def running_stats_as(dtype: np.dtype, *stats: np.ndarray | None) -> list[np.ndarray | None]:
    """The running statistics as the kernel updates them, in `dtype`: each array itself, or
    a copy of one kept in x's 16-bit dtype (each on its own: the two may differ), which
    write_back then rounds into it."""
    return [s if s is None or s.dtype == dtype else s.astype(dtype) for s in stats]


def write_back(*pairs: tuple[np.ndarray | None, np.ndarray | None]) -> None:
    """Each (running statistic, what the kernel updated) of running_stats_as: the copies'
    values rounded into the statistics."""
    for held, updated in pairs:
        if held is not None and updated is not held:
            held[...] = updated


def batch_norm_infer(x: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None, *,
                     eps: float = 1e-5, axis: int = 1, relu: bool = False, residual: Any = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Inference-mode batch normalization with the given statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` (plus `residual`,
    then the ReLU, when given), per channel along `axis`, in one pass over x. Parameters as
    in :func:`batch_norm_train`; here the statistics are read, not updated, and may be any
    float array-likes of shape (C,).
    """
    if residual is None:
        # the common call (plain ndarrays of one float dtype, out= given or x under STREAM_MIN_BYTES)
        # recognised and run in one C++ call (csrc/bindings/plain_calls.h); None for any other,
        # which the checks below convert or reject
        y = _C.bn_infer_plain(x, running_mean, running_var, weight, bias, eps, axis, relu, out)
        if y is not None:
            return y
    moved = call_in_memory_order(batch_norm_infer, locals(), "x", "residual", "out")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    x = contiguous_float_array(x, "x")
    axis, outer, channels, inner = channel_layout(x.shape, axis)
    pdt = param_dtype(x.dtype)
    rm = per_channel(running_mean, "running_mean", channels, pdt)
    rv = per_channel(running_var, "running_var", channels, pdt)
    if rm is None or rv is None:
        raise TypeError(f"{'running_mean' if rm is None else 'running_var'}: is required for inference")
    w = per_channel(weight, "weight", channels, pdt)
    b = per_channel(bias, "bias", channels, pdt)
    eps = real_number(eps, "eps", minimum=0.0)
    r = residual_input(residual, x)
    y = output(out, x, (("x", x), ("running_mean", rm), ("running_var", rv), ("weight", w), ("bias", b),
                        ("residual", r)))
    _C.bn_infer(x, y, rm, rv, w, b, outer, channels, inner, eps, flag(relu, "relu"), r)
    return y


def batch_norm_backward(dy: Any, x: Any, mean: Any, invstd: Any, weight: Any = None, *, training: bool = True,
                        axis: int = 1, y: Any = None, out: np.ndarray | None = None, residual: bool = False,
                        d_residual_out: np.ndarray | None = None) -> BatchNormGrads | BatchNormResidualGrads:
    """Gradients of batch normalization.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the forward output.
    x : array_like
        The forward input (same shape and dtype as dy).
    mean, invstd : array_like of shape (C,)
        ``training=True``: the batch statistics :func:`batch_norm_train` returned; the
        gradient includes the path through them. ``training=False``: the running statistics
        as ``invstd = 1/sqrt(running_var + eps)``; then ``dx = dy * weight * invstd``.
    weight : array_like of shape (C,), optional
    y : array_like, optional
        The forward output; required when the forward used ``relu=True`` (dy is masked
        where ``y <= 0``).
    out : ndarray, optional
        For dx; may be dy itself.
    residual : bool
        The forward added a residual (``batch_norm_train(..., residual=r)``): also return
        its gradient, d_residual, the dy masked where ``y <= 0`` (given y), written in the
        same pass as dx. Without y (no ReLU) d_residual is dy itself, not a copy, unless
        dx is written into dy (``out=dy``) or `d_residual_out` is given: then the pass
        copies dy there.
    d_residual_out : ndarray, optional
        With ``residual=True``: C-contiguous array (or laid out as dy, as `out`) of dy's shape
        and dtype for d_residual; may be dy itself (masked in place) unless dx goes there
        too, and must share memory with no other argument.

    Returns
    -------
    BatchNormGrads
        ``(dx, dweight, dbias)`` with ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.
    BatchNormResidualGrads
        With ``residual=True``: ``(dx, dweight, dbias, d_residual)``.
    """
    if residual is False and d_residual_out is None:  # the common call whole, as batch_norm_infer's
        plain = _C.bn_backward_plain(dy, x, mean, invstd, weight, training, axis, y, out)
        if plain is not None:
            return BatchNormGrads(*plain)
    moved = call_in_memory_order(batch_norm_backward, locals(), "dy", "x", "y", "out", "d_residual_out")
    if moved is not None:  # (x dense in another axis order: docs/conventions.md, "Layout")
        return moved
    b = backward_inputs(dy, x, y, mean, invstd, axis)
    pdt = param_dtype(b.dy.dtype)
    w = per_channel(weight, "weight", b.channels, pdt)
    dx = output(out, b.dy, (("dy", b.dy), ("x", b.x), ("y", b.y), ("mean", b.mean), ("invstd", b.invstd),
                            ("weight", w)))
    dr, dr_written = residual_grad(residual, d_residual_out, b, dx, (("weight", w),))
    dweight = np.empty(b.channels, pdt)
    dbias = np.empty(b.channels, pdt)
    _C.bn_backward(b.dy, b.x, b.y, b.mean, b.invstd, w, dx, dweight, dbias, b.outer, b.channels, b.inner,
                   flag(training, "training"), dr_written)
    if dr is None:
        return BatchNormGrads(dx, dweight, dbias)
    return BatchNormResidualGrads(dx, dweight, dbias, dr)


def residual_grad(residual: Any, d_residual_out: Any, b: BackwardInputs, dx: np.ndarray,
                  params: tuple[tuple[str, np.ndarray | None], ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """d_residual (None without ``residual=True``) and the array the kernel writes it to:
    b.dy itself, written by no one, when there is no mask to apply and nothing overwrites
    dy; else `d_residual_out` checked, or a new array, both times."""
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual: must be a bool (whether to return d_residual), got {type(residual).__name__}")
    if not residual:
        if d_residual_out is not None:
            raise ValueError("d_residual_out: given without residual=True")
        return None, None
    if d_residual_out is None and b.y is None and not shares_memory(dx, b.dy):
        return b.dy, None
    dr = output(d_residual_out, b.dy, (("dy", b.dy),), name="d_residual_out")
    for name, arr in (("out", dx), ("x", b.x), ("y", b.y), ("mean", b.mean), ("invstd", b.invstd)) + params:
        if shares_memory(dr, arr):
            raise ValueError(f"d_residual_out: shares memory with {name} (only dy itself may be overwritten "
                             "by d_residual, and only when dx is not written there)")
    return dr, dr


class BackwardInputs(NamedTuple):
    """The checked arrays of a backward call and the canonical layout."""

    dy: np.ndarray
    x: np.ndarray
    y: np.ndarray | None
    mean: np.ndarray
    invstd: np.ndarray
    outer: int
    channels: int
    inner: int


def backward_inputs(dy: Any, x: Any, y: Any, mean: Any, invstd: Any, axis: Any) -> BackwardInputs:
    """dy, x (and y) of one shape and dtype, mean and invstd per channel (shared by the
    single-process backward and its two phases)."""
    dy = contiguous_float_array(dy, "dy")
    axis, outer, channels, inner = channel_layout(dy.shape, axis, "dy")
    x = contiguous_float_array(x, "x")
    if x.dtype != dy.dtype:
        raise TypeError(f"x: dtype {x.dtype} does not match dy ({dy.dtype})")
    if x.shape != dy.shape:
        raise ValueError(f"x: shape {x.shape} does not match dy {dy.shape}")
    if y is not None:
        y = contiguous_float_array(y, "y")
        if y.dtype != dy.dtype:
            raise TypeError(f"y: dtype {y.dtype} does not match dy ({dy.dtype})")
        if y.shape != dy.shape:
            raise ValueError(f"y: shape {y.shape} does not match dy {dy.shape}")
    m = per_channel(mean, "mean", channels, param_dtype(dy.dtype))
    s = per_channel(invstd, "invstd", channels, param_dtype(dy.dtype))
    if m is None or s is None:
        raise TypeError(f"{'mean' if m is None else 'invstd'}: is required")
    return BackwardInputs(dy, x, y, m, s, outer, channels, inner)
