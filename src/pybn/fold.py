"""Folding inference-mode batch norm into the neighbouring conv / linear weights.

With ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``:

* BN after a layer (:func:`fold_conv_bn`): ``W' = W * s`` along the output channels,
  ``b' = (b - running_mean) * s + beta``.
* BN before a Linear or pointwise conv (:func:`fold_bn_linear`): ``W' = W * diag(s)``,
  ``b' = b + W t``.

``s`` and ``t`` are computed in float64 and every result element is rounded once to the
weight's dtype (the products and the sums of ``W t`` are taken in float64).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _C
from ._checks import contiguous_float_array, flag, integer, per_channel, real_number, round_to

__all__ = ["FoldedWeights", "fold_conv_bn", "fold_bn_linear"]


class FoldedWeights(NamedTuple):
    """The folded layer's parameters, in the weight's dtype."""

    weight: np.ndarray
    bias: np.ndarray


def _weight(weight: Any) -> np.ndarray:
    w = contiguous_float_array(weight, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight: expected a Linear (out, in) or conv (out, in/groups, *kernel) weight, "
                         f"got shape {w.shape}")
    return w


def _per_channel(value: Any, name: str, channels: int, default: float | None = None) -> np.ndarray:
    """A per-channel float64 vector of length `channels` (None: `default` everywhere)."""
    arr = per_channel(value, name, channels, np.dtype(np.float64))
    if arr is not None:
        return arr
    if default is None:
        raise TypeError(f"{name}: is required")
    return np.full(channels, default)


def _bn_scale_shift(channels: int, running_mean: Any, running_var: Any, gamma: Any, beta: Any,
                    eps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, s, beta) in float64, each of shape (channels,)."""
    eps = real_number(eps, "eps", minimum=0.0)
    mean = _per_channel(running_mean, "running_mean", channels)
    var = _per_channel(running_var, "running_var", channels)
    if np.any(var < 0):
        raise ValueError("running_var: has negative entries (a variance is >= 0)")
    g = _per_channel(gamma, "gamma", channels, 1.0)
    b = _per_channel(beta, "beta", channels, 0.0)
    with _ieee():
        return mean, g / np.sqrt(var + eps), b


def _ieee() -> np.errstate:
    """NaN and infinities in the statistics propagate as IEEE arithmetic says, as in the
    kernels, without NumPy's warnings (a variance of 0 with eps = 0 divides by zero)."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _channels(indices: np.ndarray, total: int) -> str:
    """"channel 3", "channels 1, 4, 9 (of 64)", "channels 0, 1, 2, 3, 4, ... (12 of 64)"."""
    shown = ", ".join(str(i) for i in indices[:5])
    if indices.size == 1:
        return f"channel {shown}"
    more = f", ... ({indices.size} of {total})" if indices.size > 5 else f" (of {total})"
    return f"channels {shown}{more}"


def batch_norm_fold_problem(params: dict[str, np.ndarray | None], var: str, eps: float) -> str | None:
    """Why no folded layer equals this batch norm exactly, or None when one does.

    For the model folders (pybn.torch, pybn.onnx), before they fold: `params` maps the name
    each parameter has in the caller's model (``running_var``, ``weight``...) to its values
    (None: absent), `var` is the name of the variance among them. The fold needs finite
    parameters and a finite scale ``gamma / sqrt(var + eps)``: a negative variance, or
    ``var + eps == 0``, makes the batch norm itself compute NaN or infinities whose pattern
    no folded weight reproduces.
    """
    if not (math.isfinite(eps) and eps >= 0):
        return f"eps = {eps} is not a finite number >= 0"
    for name, values in params.items():
        if values is not None and not np.all(np.isfinite(values)):
            bad = np.flatnonzero(~np.isfinite(values))
            return f"{name} is not finite in {_channels(bad, values.size)}"
    v = np.asarray(params[var], dtype=np.float64)
    negative = np.flatnonzero(v < 0)
    if negative.size:
        return f"{var} is negative in {_channels(negative, v.size)} (a variance is >= 0)"
    zero = np.flatnonzero(v + eps <= 0)
    if zero.size:
        return f"{var} + eps is 0 in {_channels(zero, v.size)} (the batch norm divides by 0 there)"
    return None



# A batch norm folded into the layer after it hands that layer s * x and W t instead of the
# normalized values s * (x - mean) + beta: per channel |s * mean| / (|gamma| + |beta|) times
# their size (|mean| / std for gamma 1, beta 0), and the layer's sums cancel the excess. Each
# output then carries about that many roundings of its own magnitude (float16 through
# onnxruntime: 7x the unfolded error at 10 standard deviations, 60x at 100). The model folders
# promise a few roundings (docs/folding.md), so they leave such a batch norm; fold_bn_linear
# computes the fold for whoever wants it anyway.
CANCELLATION_LIMIT = 8.0


def cancellation_problem(running_mean: Any, running_var: Any, eps: float, gamma: Any = None,
                         beta: Any = None) -> str | None:
    """Why a batch norm should not fold into the layer after it (see above), or None."""
    with _ieee():
        mean = np.asarray(running_mean, dtype=np.float64)
        g = np.abs(np.broadcast_to(1.0 if gamma is None else np.asarray(gamma, dtype=np.float64), mean.shape))
        b = np.abs(np.broadcast_to(0.0 if beta is None else np.asarray(beta, dtype=np.float64), mean.shape))
        excess = g * np.abs(mean) / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps) / (g + b)
    far = np.flatnonzero(excess > CANCELLATION_LIMIT)  # (NaN, for gamma = beta = 0: no excess)
    if not far.size:
        return None
    return (f"the layer after it would sum terms up to {float(excess[far].max()):.3g} times the normalized values "
            f"and cancel them ({_channels(far, excess.size)}: a mean far from 0 against the spread), each output off "
            f"by about as many roundings, past the {CANCELLATION_LIMIT:g} a fold may cost")

def fold_conv_bn(weight: Any, bias: Any, running_mean: Any, running_var: Any, gamma: Any = None,
                 beta: Any = None, *, eps: float = 1e-5, transposed: bool = False,
                 groups: int = 1) -> FoldedWeights:
    """Fold a batch norm that *follows* a Linear, Conv or ConvTranspose layer into it.

    Parameters
    ----------
    weight : array_like, float32, float64, float16 or bfloat16
        Linear ``(out, in)``, Conv ``(out, in/groups, *kernel)``, or with ``transposed=True``
        ConvTranspose ``(in, out/groups, *kernel)`` (PyTorch's layouts).
    bias : array_like of shape (out,) or None
        The layer's bias; None means zeros.
    running_mean, running_var : array_like of shape (out,)
        The batch norm's running statistics.
    gamma, beta : array_like of shape (out,), optional
        The batch norm's affine parameters (default 1 and 0, as ``affine=False``).
    eps : float
        The batch norm's epsilon.
    transposed : bool
        The weight is a ConvTranspose weight, whose output channels are its second axis
        within each of the `groups` groups.
    groups : int
        The layer's groups (depthwise: ``groups == channels``).

    Returns
    -------
    FoldedWeights
        ``(weight, bias)`` of the single layer equal to layer-then-BN, in the weight's dtype.
        The inputs are not modified.
    """
    w = _weight(weight)
    groups = integer(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups: must be >= 1, got {groups}")
    if flag(transposed, "transposed"):
        if w.shape[0] % groups:
            raise ValueError(f"weight: a ConvTranspose weight (in, out/groups, *kernel) needs in = {w.shape[0]} "
                             f"divisible by groups = {groups}")
        out = groups * w.shape[1]
        # (in, out/g, k) seen as (g, in/g, out/g, k): the output channel of [g, i, j] is g*(out/g) + j
        view = (groups, w.shape[0] // groups, w.shape[1], math.prod(w.shape[2:]))
    else:
        out = w.shape[0]
        if out % groups:
            raise ValueError(f"weight: {out} output channels are not divisible by groups = {groups}")
        view = (1, 1, out, math.prod(w.shape[1:]))
    b = _per_channel(bias, "bias", out, 0.0)
    mean, s, beta_ = _bn_scale_shift(out, running_mean, running_var, gamma, beta, eps)
    w_out = np.empty_like(w)
    _C.fold_scale(w, s, w_out, *view)
    with _ieee():
        b_out = round_to((b - mean) * s + beta_, w.dtype)
    return FoldedWeights(w_out, b_out)


def fold_bn_linear(weight: Any, bias: Any, running_mean: Any, running_var: Any, gamma: Any = None,
                   beta: Any = None, *, eps: float = 1e-5) -> FoldedWeights:
    """Fold a batch norm that *precedes* a Linear or pointwise (1x1) conv layer into it.

    Parameters
    ----------
    weight : array_like, float32, float64, float16 or bfloat16
        Linear ``(out, in)`` or conv ``(out, in, 1, ...)`` with every kernel size 1. A larger
        kernel is a ValueError: the conv's zero padding would meet BN's shift ``t`` at the
        border, so no folded conv equals BN-then-conv there.
    bias : array_like of shape (out,) or None
        The layer's bias; None means zeros.
    running_mean, running_var, gamma, beta : array_like of shape (in,)
        The batch norm's statistics and affine parameters (gamma, beta default 1 and 0).
    eps : float
        The batch norm's epsilon.

    Returns
    -------
    FoldedWeights
        ``(weight, bias)`` with ``W' = W diag(s)`` and ``b' = b + W t``, in the weight's dtype.
    """
    w = _weight(weight)
    if any(k != 1 for k in w.shape[2:]):
        raise ValueError(f"weight: kernel size {w.shape[2:]} is not pointwise; a batch norm before a conv "
                         "folds only into a 1x1 conv (with a larger kernel the conv's zero padding breaks "
                         "the fold at the border)")
    out, inp = w.shape[0], w.shape[1]
    b = _per_channel(bias, "bias", out, 0.0)
    mean, s, beta_ = _bn_scale_shift(inp, running_mean, running_var, gamma, beta, eps)
    with _ieee():
        t = beta_ - mean * s
    view = (1, out, inp, 1)
    w_out = np.empty_like(w)
    _C.fold_scale(w, s, w_out, *view)
    b_out = np.empty(out, w.dtype)
    _C.fold_bias(w, t, b, b_out, out, inp)
    return FoldedWeights(w_out, b_out)
